#ifndef SESSIONLEDGER_SERVER_COMMON_BLOCKING_EXECUTOR_H_
#define SESSIONLEDGER_SERVER_COMMON_BLOCKING_EXECUTOR_H_

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/functional/any_invocable.h"

namespace sessionledger {

// A fixed set of threads for work that may block on the network (a store call through a
// blocking client), handed over by threads that must never block: the GetSession completion
// queue and the Memcached reader's I/O thread. Work beyond the thread count queues in order;
// each piece carries its own deadline, so a long queue turns into fast UNAVAILABLE answers,
// not hangs.
//
// Thread-safe. Destruction runs everything already queued, then joins the threads.
class BlockingExecutor {
 public:
  explicit BlockingExecutor(int threads);
  ~BlockingExecutor();
  BlockingExecutor(const BlockingExecutor&) = delete;
  BlockingExecutor& operator=(const BlockingExecutor&) = delete;

  void Run(absl::AnyInvocable<void() &&> work);

 private:
  void Work();

  // std::mutex rather than absl::Mutex: ThreadSanitizer sees its hand-overs (Debian's Abseil
  // is not instrumented).
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<absl::AnyInvocable<void() &&>> queue_;  // Guarded by mutex_.
  bool stopping_ = false;                            // Guarded by mutex_.
  std::vector<std::thread> threads_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_COMMON_BLOCKING_EXECUTOR_H_
