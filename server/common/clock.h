#ifndef SESSIONLEDGER_SERVER_COMMON_CLOCK_H_
#define SESSIONLEDGER_SERVER_COMMON_CLOCK_H_

#include <algorithm>
#include <atomic>
#include <chrono>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace sessionledger {

// Source of wall-clock time, injected so that expiry rules can be unit-tested without sleeping.
// Implementations are thread-safe.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
};

class SystemClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
};

// Time on a clock that never steps (CLOCK_MONOTONIC), for timeouts kept inside the process: a
// wall-clock step (NTP, a resumed VM) must neither stretch a wait nor end it early. A caller's
// deadline (gRPC gives it as wall-clock time) is turned into one once, where it comes in.
using SteadyTime = std::chrono::steady_clock::time_point;
using SteadyDuration = std::chrono::steady_clock::duration;
inline SteadyTime SteadyNow() { return std::chrono::steady_clock::now(); }
inline SteadyDuration ToSteadyDuration(absl::Duration d) {
  return std::chrono::duration_cast<SteadyDuration>(absl::ToChronoNanoseconds(d));
}
// The steady time at which wall-clock `deadline` falls, as of the two clocks' readings `now` and
// `steady_now`: not before `steady_now` (a passed deadline), nor more than a finite `cap` after
// it (an infinite deadline included).
inline SteadyTime SteadyDeadline(absl::Time deadline, absl::Time now, SteadyTime steady_now,
                                 absl::Duration cap) {
  return steady_now + ToSteadyDuration(std::clamp(deadline - now, absl::ZeroDuration(), cap));
}

// A deadline further off than this (none at all, say) is waited for this long: steady time
// points must stay finite.
inline constexpr absl::Duration kLongestSteadyWait = absl::Hours(24);

// The steady time at which wall-clock `deadline` falls, read now against `wall_clock`
// (absl::Now() when unset; tests step one).
inline SteadyTime SteadyDeadline(absl::Time deadline, const Clock* wall_clock = nullptr) {
  const absl::Time now = wall_clock != nullptr ? wall_clock->Now() : absl::Now();
  return SteadyDeadline(deadline, now, SteadyNow(), kLongestSteadyWait);
}

// A clock that moves only when told to. Thread-safe.
class FakeClock final : public Clock {
 public:
  explicit FakeClock(absl::Time start = absl::FromUnixSeconds(1'700'000'000))
      : now_micros_(absl::ToUnixMicros(start)) {}
  absl::Time Now() const override { return absl::FromUnixMicros(now_micros_.load()); }
  void Advance(absl::Duration d) { now_micros_ += absl::ToInt64Microseconds(d); }
  void Set(absl::Time t) { now_micros_ = absl::ToUnixMicros(t); }

 private:
  std::atomic<int64_t> now_micros_;
};

// The system's wall clock with an offset that tests step, as NTP or a resumed VM steps the real
// one. Thread-safe.
class SteppingClock final : public Clock {
 public:
  absl::Time Now() const override {
    return absl::Now() + absl::Microseconds(offset_micros_.load());
  }
  void Step(absl::Duration by) { offset_micros_ += absl::ToInt64Microseconds(by); }

 private:
  std::atomic<int64_t> offset_micros_{0};
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_COMMON_CLOCK_H_
