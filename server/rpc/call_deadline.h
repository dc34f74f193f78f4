#ifndef SESSIONLEDGER_SERVER_RPC_CALL_DEADLINE_H_
#define SESSIONLEDGER_SERVER_RPC_CALL_DEADLINE_H_

#include <grpcpp/server_context.h>

#include <algorithm>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace sessionledger {

// The time by which a handler must have answered: the caller's deadline, or now +
// `default_timeout` when the caller set none (so a backing service never holds a call forever).
inline absl::Time CallDeadline(const grpc::ServerContext& context, absl::Duration default_timeout) {
  const absl::Time fallback = absl::Now() + default_timeout;
  const auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return fallback;
  return std::min(absl::FromChrono(deadline), fallback);
}

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_CALL_DEADLINE_H_
