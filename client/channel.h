#ifndef SESSIONLEDGER_CLIENT_CHANNEL_H_
#define SESSIONLEDGER_CLIENT_CHANNEL_H_

#include <grpcpp/channel.h>
#include <grpcpp/security/credentials.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/common/host_resolver.h"

namespace sessionledger::client {

// Turns the --target addresses into one gRPC target string.
//   one address          passed through unchanged (host:port uses gRPC's DNS resolver, and
//                        dns:///, ipv4:, ipv6:, unix: keep their meaning)
//   several addresses    an `ipv4:` or `ipv6:` address list (gRPC's static multi-address
//                        syntax); host names are resolved once, here, because those schemes
//                        take literals only. Mixing IPv4 and IPv6 is an error, since one
//                        target can name only one scheme.
// A "dns:///" prefix on a list element is accepted and stripped. The names of a list are looked
// up at once, on threads of their own (`lookup`: getaddrinfo when unset), and waited for until
// `lookup_limit` at most: DEADLINE_EXCEEDED names the host whose lookup took longer, UNAVAILABLE
// one that does not resolve.
absl::StatusOr<std::string> BuildChannelTarget(const std::vector<std::string>& targets,
                                               absl::Duration lookup_limit,
                                               HostLookupFn lookup = nullptr);

// The name to check the servers' certificates against when `targets` go over TLS without
// --tls-server-name: empty for one target (gRPC takes its host), the common host of a list
// whose entries differ in port only, and INVALID_ARGUMENT naming --tls-server-name for a list
// of different hosts. A list becomes one `ipv4:`/`ipv6:` target whose only name is the list
// itself, which no certificate carries, and gRPC checks one name for every address in it; so
// one explicit `ipv4:`/`ipv6:` target of several addresses counts as a list too.
absl::StatusOr<std::string> TlsNameForTargets(const std::vector<std::string>& targets);

// The service config every CLI channel uses: round_robin over all resolved addresses, and a
// retry policy for UNAVAILABLE on the idempotent methods only (reads, DeleteSession, and
// Deposit/Transfer, which carry an idempotency key). Writes that are not idempotent
// (CreateSession, UpdateSession, RotateSession, RevokeUserSessions, OpenAccount) are never
// retried: a retry after a lost response could apply them twice.
std::string ServiceConfigJson();

// Transport security of the channel. Off (plaintext) unless `enabled`; a CA file, client
// certificate or server-name override turns it on. Empty ca_file means the system roots.
struct TlsOptions {
  bool enabled = false;
  std::string ca_file;    // PEM roots that sign the server's certificate
  std::string cert_file;  // PEM client certificate chain, for servers that require mutual TLS
  std::string key_file;   // its unencrypted PEM private key
  // Name to check the server certificate against, when the target is an IP address or a
  // load balancer whose name differs from the certificate's.
  std::string server_name;
};

// Plaintext credentials, or TLS ones built from the files named in `tls` (read here, once).
// INVALID_ARGUMENT names the option whose file is missing, unreadable, empty, larger than
// 1 MiB or not PEM.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeCredentials(const TlsOptions& tls);

struct ChannelOptions {
  std::shared_ptr<grpc::ChannelCredentials> credentials;  // null: plaintext
  // Set with TlsOptions::server_name.
  std::string ssl_target_name_override;
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
