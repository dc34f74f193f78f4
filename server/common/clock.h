#ifndef SESSIONLEDGER_SERVER_COMMON_CLOCK_H_
#define SESSIONLEDGER_SERVER_COMMON_CLOCK_H_

#include <atomic>

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

// Whether `now` falls in a window of `length` that ends at `until` (a node skipped after a
// failure, say). A window that seems to end more than twice its length ahead was opened on a
// wall clock that has since stepped back (NTP, a resumed VM): it counts as over, rather than
// lasting for as long as the step. (Not just its length: a `now` read shortly before another
// thread opened the window is still inside it.)
inline bool InWindowEnding(absl::Time now, absl::Time until, absl::Duration length) {
  return now < until && until - now <= 2 * length;
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

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_COMMON_CLOCK_H_
