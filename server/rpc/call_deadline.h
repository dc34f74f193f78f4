#ifndef SESSIONLEDGER_SERVER_RPC_CALL_DEADLINE_H_
#define SESSIONLEDGER_SERVER_RPC_CALL_DEADLINE_H_

#include <grpcpp/server_context.h>

#include <algorithm>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace sessionledger {

// The time by which backing-service work must end so that the caller still receives our answer
// (UNAVAILABLE with a reason, which it may retry) rather than its own DEADLINE_EXCEEDED.
//
// `caller_deadline` is absl::InfiniteFuture() when the caller set none. `default_timeout`
// bounds every call, also one whose caller would wait longer, so that a stalled backing service
// holds no call (and its connection or thread) for longer than that. The margin left for the
// reply grows with the budget (a tenth of it, 50 ms to 500 ms): sending the reply, scheduling on
// a loaded machine and libmemcached's per-wait timeouts all overrun by more than a fixed few
// milliseconds, and a long call can spare more.
inline absl::Time AnswerBy(absl::Time now, absl::Time caller_deadline,
                           absl::Duration default_timeout) {
  const absl::Time deadline = std::min(caller_deadline, now + default_timeout);
  const absl::Duration budget = deadline - now;
  const absl::Duration margin = std::min(
      std::clamp(budget / 10, absl::Milliseconds(50), absl::Milliseconds(500)), budget / 2);
  return deadline - std::max(margin, absl::ZeroDuration());
}

inline absl::Time AnswerBy(const grpc::ServerContextBase& context, absl::Duration default_timeout) {
  const auto deadline = context.deadline();
  const absl::Time caller_deadline = deadline == std::chrono::system_clock::time_point::max()
                                         ? absl::InfiniteFuture()
                                         : absl::FromChrono(deadline);
  return AnswerBy(absl::Now(), caller_deadline, default_timeout);
}

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_CALL_DEADLINE_H_
