#ifndef SESSIONLEDGER_CLIENT_CHANNEL_H_
#define SESSIONLEDGER_CLIENT_CHANNEL_H_

#include <grpcpp/channel.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sessionledger::client {

// Turns the --target addresses into one gRPC target string.
//   one address          passed through unchanged (host:port uses gRPC's DNS resolver, and
//                        dns:///, ipv4:, ipv6:, unix: keep their meaning)
//   several addresses    an `ipv4:` or `ipv6:` address list (gRPC's static multi-address
//                        syntax); host names are resolved once, here, because those schemes
//                        take literals only. Mixing IPv4 and IPv6 is an error, since one
//                        target can name only one scheme.
// A "dns:///" prefix on a list element is accepted and stripped.
absl::StatusOr<std::string> BuildChannelTarget(const std::vector<std::string>& targets);

// The service config every CLI channel uses: round_robin over all resolved addresses, and a
// retry policy for UNAVAILABLE on the idempotent methods only (reads, DeleteSession, and
// Deposit/Transfer, which carry an idempotency key). Writes that are not idempotent
// (CreateSession, UpdateSession, RotateSession, RevokeUserSessions, OpenAccount) are never
// retried: a retry after a lost response could apply them twice.
std::string ServiceConfigJson();

struct ChannelOptions {
  // Off for the load generator: it must see every error as it happened.
  bool enable_retries = true;
  // Channels with different indexes never share a connection, so N channels are N TCP
  // connections (gRPC otherwise pools subchannels with equal arguments).
  int connection_index = 0;
};

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target,
                                           const ChannelOptions& options);

}  // namespace sessionledger::client

#endif  // SESSIONLEDGER_CLIENT_CHANNEL_H_
