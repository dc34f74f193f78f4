#ifndef SESSIONLEDGER_TESTS_SUPPORT_STEP_PER_READ_CLOCK_H_
#define SESSIONLEDGER_TESTS_SUPPORT_STEP_PER_READ_CLOCK_H_

#include <atomic>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/common/clock.h"

namespace sessionledger::testing {

// A wall clock that reads true the first time after Reset and `step` further at every read after
// (NTP stepping it, a VM resumed), counting its reads: a call that reads it once per call is
// unaffected by the steps, and the count shows how often it was read. Thread-safe.
class StepPerReadClock final : public Clock {
 public:
  explicit StepPerReadClock(absl::Duration step) : step_(step) {}
  absl::Time Now() const override { return absl::Now() + step_ * reads_.fetch_add(1); }
  int reads() const { return reads_.load(); }
  void Reset() { reads_ = 0; }

 private:
  const absl::Duration step_;
  mutable std::atomic<int> reads_{0};
};

}  // namespace sessionledger::testing

#endif  // SESSIONLEDGER_TESTS_SUPPORT_STEP_PER_READ_CLOCK_H_
