// BlockingExecutor: every piece of work runs exactly once, at most `threads` at a time, in
// order of submission, and destruction still runs what is queued.
#include "server/common/blocking_executor.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/synchronization/blocking_counter.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/common/notification.h"
#include "server/common/thread_name.h"

namespace sessionledger {
namespace {

// Long enough never to expire on a loaded CI machine; reaching it means the executor lost or
// wedged work.
constexpr absl::Duration kPatience = absl::Seconds(30);

TEST(BlockingExecutorTest, RunsEveryPieceOfWorkExactlyOnce) {
  constexpr int kPieces = 2000;
  std::vector<std::atomic<int>> runs(kPieces);
  absl::BlockingCounter all_done(kPieces);
  {
    BlockingExecutor executor(4);
    for (int i = 0; i < kPieces; ++i) {
      executor.Run([&runs, &all_done, i] {
        runs[i].fetch_add(1);
        all_done.DecrementCount();
      });
    }
    // Done before destruction: the threads run work as it comes, not only when stopping.
    all_done.Wait();
  }
  for (int i = 0; i < kPieces; ++i) EXPECT_EQ(runs[i].load(), 1) << "piece " << i;
}

TEST(BlockingExecutorTest, WorkRunsOnThreadsNamedForTheExecutor) {
  std::string name;
  Notification ran;
  BlockingExecutor executor(1);
  executor.Run([&] {
    name = ThisThreadName();
    ran.Notify();
  });
  ASSERT_TRUE(ran.WaitForNotificationWithTimeout(kPatience));
  EXPECT_EQ(name, "sl-blocking");
}

TEST(BlockingExecutorTest, OneThreadRunsWorkInOrderOfSubmission) {
  std::vector<int> order;  // Written by the executor's only thread, read after its destruction.
  {
    BlockingExecutor executor(1);
    for (int i = 0; i < 500; ++i) executor.Run([&order, i] { order.push_back(i); });
  }
  ASSERT_EQ(order.size(), 500u);
  for (int i = 0; i < 500; ++i) EXPECT_EQ(order[i], i);
}

// Work that blocks until the test opens the gate, and counts how many run at once.
class Occupancy {
 public:
  absl::AnyInvocable<void() &&> Piece() {
    return [this] {
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++running_;
        max_running_ = std::max(max_running_, running_);
        changed_.notify_all();
      }
      gate_.WaitForNotification();
      std::lock_guard<std::mutex> lock(mu_);
      --running_;
      ++finished_;
      changed_.notify_all();
    };
  }
  // Waits until exactly `n` pieces are running; false if that does not happen in time.
  bool AwaitRunning(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    const bool reached = changed_.wait_for(lock, absl::ToChronoNanoseconds(kPatience),
                                           [this, n] { return running_ >= n; });
    return reached && running_ == n;
  }
  bool AwaitFinished(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    return changed_.wait_for(lock, absl::ToChronoNanoseconds(kPatience),
                             [this, n] { return finished_ >= n; });
  }
  int running() {
    std::lock_guard<std::mutex> lock(mu_);
    return running_;
  }
  int max_running() {
    std::lock_guard<std::mutex> lock(mu_);
    return max_running_;
  }
  // Idempotent, so that a cleanup may open the gate again after the test did.
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!gate_.HasBeenNotified()) gate_.Notify();
  }

 private:
  std::mutex mu_;
  std::condition_variable changed_;  // Notified whenever running_ or finished_ changes.
  int running_ = 0;                  // Guarded by mu_.
  int max_running_ = 0;              // Guarded by mu_.
  int finished_ = 0;                 // Guarded by mu_.
  Notification gate_;
};

class BlockingExecutorConcurrencyTest : public ::testing::TestWithParam<int> {};

TEST_P(BlockingExecutorConcurrencyTest, RunsUpToThreadsPiecesAtOnceAndNoMore) {
  const int threads = GetParam();
  const int limit = std::max(1, threads);  // Fewer than one thread means one.
  const int pieces = limit + 3;
  Occupancy occupancy;
  {
    BlockingExecutor executor(threads);
    // Destruction waits for running pieces: whatever fails below, let them finish first.
    absl::Cleanup open_gate = [&occupancy] { occupancy.Open(); };
    for (int i = 0; i < pieces; ++i) executor.Run(occupancy.Piece());
    // All `limit` pieces start although none can finish: they run side by side.
    ASSERT_TRUE(occupancy.AwaitRunning(limit)) << "running: " << occupancy.running();
    // The others stay queued while every thread is busy. The pause gives a surplus thread, if
    // there were one, the time to pick a piece up; the check does not depend on its length.
    absl::SleepFor(absl::Milliseconds(100));
    EXPECT_EQ(occupancy.running(), limit);
    occupancy.Open();
    ASSERT_TRUE(occupancy.AwaitFinished(pieces));
  }
  EXPECT_EQ(occupancy.max_running(), limit);
}

INSTANTIATE_TEST_SUITE_P(ThreadCounts, BlockingExecutorConcurrencyTest,
                         ::testing::Values(0, 1, 2, 4, 8));

TEST(BlockingExecutorTest, DestructionRunsQueuedWorkAfterWaitingForRunningWork) {
  constexpr int kQueued = 100;
  Occupancy blocker;
  std::vector<std::atomic<int>> runs(kQueued);
  auto executor = std::make_unique<BlockingExecutor>(1);
  absl::Cleanup open_gate = [&blocker] { blocker.Open(); };
  executor->Run(blocker.Piece());
  ASSERT_TRUE(blocker.AwaitRunning(1));
  // The only thread is busy: all of these are still queued when destruction begins.
  for (int i = 0; i < kQueued; ++i) executor->Run([&runs, i] { runs[i].fetch_add(1); });

  Notification destroyed;
  std::thread destroyer([&] {
    executor.reset();
    destroyed.Notify();
  });
  // Destruction waits for the running piece (and gives the destroyer time to begin stopping,
  // so that the queued work is still queued when it does).
  EXPECT_FALSE(destroyed.WaitForNotificationWithTimeout(absl::Milliseconds(200)));
  for (int i = 0; i < kQueued; ++i) EXPECT_EQ(runs[i].load(), 0) << "piece " << i;
  blocker.Open();
  destroyer.join();
  EXPECT_TRUE(destroyed.HasBeenNotified());
  for (int i = 0; i < kQueued; ++i) EXPECT_EQ(runs[i].load(), 1) << "piece " << i;
}

TEST(BlockingExecutorTest, RunIsSafeFromManyThreadsAtOnce) {
  constexpr int kSubmitters = 8;
  constexpr int kEach = 500;
  std::vector<std::atomic<int>> runs(kSubmitters * kEach);
  {
    BlockingExecutor executor(3);
    std::vector<std::thread> submitters;
    for (int s = 0; s < kSubmitters; ++s) {
      submitters.emplace_back([&executor, &runs, s] {
        for (int i = 0; i < kEach; ++i) {
          executor.Run([&runs, n = s * kEach + i] { runs[n].fetch_add(1); });
        }
      });
    }
    for (std::thread& t : submitters) t.join();
  }
  for (size_t i = 0; i < runs.size(); ++i) EXPECT_EQ(runs[i].load(), 1) << "piece " << i;
}

}  // namespace
}  // namespace sessionledger
