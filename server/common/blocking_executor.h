#ifndef SESSIONLEDGER_SERVER_COMMON_BLOCKING_EXECUTOR_H_
#define SESSIONLEDGER_SERVER_COMMON_BLOCKING_EXECUTOR_H_

#include <deque>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"

namespace sessionledger {

// A fixed set of threads for work that may block on the network (a store call through a
// blocking client), handed over by threads that must never block: gRPC callback handlers and
// the Memcached reader's I/O thread. Work beyond the thread count queues in order; each piece
// carries its own deadline, so a long queue turns into fast UNAVAILABLE answers, not hangs.
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

  absl::Mutex mu_;
  std::deque<absl::AnyInvocable<void() &&>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_COMMON_BLOCKING_EXECUTOR_H_
