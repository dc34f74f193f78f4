#ifndef SESSIONLEDGER_SERVER_RPC_CALL_DEADLINE_H_
#define SESSIONLEDGER_SERVER_RPC_CALL_DEADLINE_H_

#include <grpc/support/time.h>
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

// The caller's deadline as gRPC keeps it (ServerContextBase::raw_deadline()), on the wall
// clock; absl::InfiniteFuture() when the caller set none. ServerContextBase::deadline() is no
// use here: it converts to system_clock nanoseconds without saturating, so a deadline past the
// year 2262 came out in the past, and Go's and Java's clients send one ~292 years away for
// "no deadline" (grpc-timeout 2562047H); every such call then failed at once, UNAVAILABLE.
inline absl::Time CallerDeadline(gpr_timespec raw) {
  if (gpr_time_cmp(raw, gpr_inf_future(raw.clock_type)) == 0) return absl::InfiniteFuture();
  const gpr_timespec wall = gpr_convert_clock_type(raw, GPR_CLOCK_REALTIME);
  // Saturating arithmetic: a time beyond absl::Time's range is its infinite future.
  return absl::FromUnixSeconds(wall.tv_sec) + absl::Nanoseconds(wall.tv_nsec);
}

inline absl::Time AnswerBy(const grpc::ServerContextBase& context, absl::Duration default_timeout) {
  return AnswerBy(absl::Now(), CallerDeadline(context.raw_deadline()), default_timeout);
}

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_CALL_DEADLINE_H_
