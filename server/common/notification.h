#ifndef SESSIONLEDGER_SERVER_COMMON_NOTIFICATION_H_
#define SESSIONLEDGER_SERVER_COMMON_NOTIFICATION_H_

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>

#include "absl/time/time.h"

namespace sessionledger {

// A one-shot event: Notify once, wait any number of times. Like absl::Notification, but on
// std::mutex, whose hand-overs ThreadSanitizer sees (Debian's Abseil is not built with it, so
// synchronisation inside absl::Mutex is invisible to `scripts/test --tsan`). Thread-safe.
class Notification {
 public:
  void Notify() {
    std::lock_guard<std::mutex> lock(mutex_);
    notified_ = true;
    changed_.notify_all();
  }
  bool HasBeenNotified() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return notified_;
  }
  void WaitForNotification() const {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [this] { return notified_; });
  }
  // False when `timeout` passed first. Timed on the steady clock: a wall-clock step neither
  // stretches the wait nor cuts it short.
  bool WaitForNotificationWithTimeout(absl::Duration timeout) const {
    // Bounded, so that adding it to the clock's reading cannot overflow.
    const absl::Duration bounded = std::clamp(timeout, absl::ZeroDuration(), absl::Hours(24 * 365));
    std::unique_lock<std::mutex> lock(mutex_);
    return changed_.wait_for(lock, absl::ToChronoNanoseconds(bounded),
                             [this] { return notified_; });
  }

 private:
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  bool notified_ = false;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_COMMON_NOTIFICATION_H_
