#ifndef SESSIONLEDGER_SERVER_COMMON_FD_WAIT_H_
#define SESSIONLEDGER_SERVER_COMMON_FD_WAIT_H_

#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>

#include "server/common/clock.h"

namespace sessionledger {

enum class FdWait {
  kReady,     // Ready for the events, or with an error or hang-up that the next I/O reports.
  kTimedOut,  // `give_up` came first.
  kFailed,    // poll(2) itself failed.
};

// Waits until `fd` is ready for `events` (POLLIN, POLLOUT), until `give_up` on the steady clock,
// going on after a signal interrupted the wait.
inline FdWait WaitForFd(int fd, short events, SteadyTime give_up) {
  for (;;) {
    const int64_t left_ms =
        std::chrono::ceil<std::chrono::milliseconds>(give_up - SteadyNow()).count();
    if (left_ms <= 0) return FdWait::kTimedOut;
    pollfd pfd{fd, events, 0};
    // In steps of at most a minute, which keeps the cast to poll's int safe.
    const int n = ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left_ms, 60'000)));
    if (n > 0) return FdWait::kReady;
    if (n < 0 && errno != EINTR) return FdWait::kFailed;
  }
}

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_COMMON_FD_WAIT_H_
