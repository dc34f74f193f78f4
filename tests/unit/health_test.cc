#include "server/rpc/health.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>

#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace sessionledger {
namespace {

using grpc::health::v1::HealthCheckResponse;

TEST(HealthBoardTest, StartsServingOverallAndNotServingPerService) {
  HealthBoard board;
  EXPECT_EQ(board.Get(""), HealthCheckResponse::SERVING);
  EXPECT_EQ(board.Get(kSessionServiceName), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(board.Get(kTransactionServiceName), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(board.Get("no.such.Service"), std::nullopt);
}

// An unknown name is NOT_FOUND, named in the answer only when short and printable: a long one
// would not fit the client's trailer limit.
TEST(HealthServiceTest, UnknownNamesAreNotFoundAndOnlyShortOnesAreNamed) {
  HealthBoard board;
  HealthService service(board);
  grpc::health::v1::HealthCheckRequest request;
  grpc::health::v1::HealthCheckResponse response;
  request.set_service("no.such.Service");
  grpc::Status status = service.Check(nullptr, &request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(status.error_message(), "service: unknown service name 'no.such.Service'");
  for (const std::string& name : {std::string(100'000, 'x'), std::string("bad\nname")}) {
    request.set_service(name);
    status = service.Check(nullptr, &request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_EQ(status.error_message(), "service: unknown service name");
  }
}

TEST(HealthBoardTest, ShutdownIsFinal) {
  HealthBoard board;
  board.Set(kSessionServiceName, true);
  board.Shutdown();
  board.Set(kSessionServiceName, true);
  EXPECT_EQ(board.Get(""), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(board.Get(kSessionServiceName), HealthCheckResponse::NOT_SERVING);
  EXPECT_TRUE(board.shutting_down());
}

// Counts the wake-ups the board gives it.
class CountingWatcher final : public HealthBoard::Watcher {
 public:
  void Changed() override { ++changes_; }
  int changes() const { return changes_.load(); }

 private:
  std::atomic<int> changes_{0};
};

TEST(HealthBoardTest, WatchersHearOfChangesToTheirServiceOnly) {
  HealthBoard board;
  CountingWatcher session;
  CountingWatcher overall;
  board.AddWatcher(kSessionServiceName, &session);
  board.AddWatcher("", &overall);
  board.Set(kSessionServiceName, true);
  board.Set(kSessionServiceName, true);  // No change, no wake-up.
  board.Set(kTransactionServiceName, true);
  EXPECT_EQ(session.changes(), 1);
  EXPECT_EQ(overall.changes(), 0);
  board.Set(kSessionServiceName, false);
  EXPECT_EQ(session.changes(), 2);
  board.RemoveWatcher(kSessionServiceName, &session);
  board.RemoveWatcher("", &overall);
  EXPECT_EQ(board.watchers(), 0u);
}

// A Watch of a name the board does not know waits like any other: an unknown name once counted
// as a change, and its Watch loop spun on a core for as long as the stream stayed open.
TEST(HealthBoardTest, AWatcherOfAnUnknownServiceIsWokenOnlyWhenThatNameAppears) {
  HealthBoard board;
  CountingWatcher unknown;
  board.AddWatcher("no.such.Service", &unknown);
  board.Set(kSessionServiceName, true);
  board.Set(kTransactionServiceName, true);
  EXPECT_EQ(unknown.changes(), 0);
  board.Set("no.such.Service", true);
  EXPECT_EQ(unknown.changes(), 1);
  board.RemoveWatcher("no.such.Service", &unknown);
}

TEST(HealthBoardTest, ShutdownWakesEveryWatcherOnceAndRemovedOnesNever) {
  HealthBoard board;
  CountingWatcher a;
  CountingWatcher b;
  CountingWatcher removed;
  board.AddWatcher("", &a);
  board.AddWatcher("no.such.Service", &b);
  board.AddWatcher(kSessionServiceName, &removed);
  board.RemoveWatcher(kSessionServiceName, &removed);
  board.Shutdown();
  board.Shutdown();  // ServerApp's destructor shuts down again: no second round.
  board.Set("", true);
  EXPECT_EQ(a.changes(), 1);
  EXPECT_EQ(b.changes(), 1);
  EXPECT_EQ(removed.changes(), 0);
  board.RemoveWatcher("", &a);
  board.RemoveWatcher("no.such.Service", &b);
  EXPECT_EQ(board.watchers(), 0u);
}

// The notice's end wakes every watcher once more (their streams end then), however often it
// is called; a board that was never shut down is shut down by it.
TEST(HealthBoardTest, EndingWatchesWakesEveryWatcherOnceMore) {
  HealthBoard board;
  CountingWatcher a;
  board.AddWatcher("", &a);
  board.Shutdown();
  EXPECT_FALSE(board.watches_ending());
  board.EndWatches();
  board.EndWatches();
  EXPECT_TRUE(board.watches_ending());
  EXPECT_EQ(a.changes(), 2);
  board.RemoveWatcher("", &a);

  HealthBoard never_shut_down;
  CountingWatcher b;
  never_shut_down.AddWatcher(kSessionServiceName, &b);
  never_shut_down.EndWatches();
  EXPECT_TRUE(never_shut_down.shutting_down());
  EXPECT_TRUE(never_shut_down.watches_ending());
  EXPECT_EQ(never_shut_down.Get(""), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(b.changes(), 2);
  never_shut_down.RemoveWatcher(kSessionServiceName, &b);
}

TEST(HealthMonitorTest, MapsProbesToServices) {
  HealthBoard board;
  Logger logger(LogLevel::kError, -1);
  std::atomic<bool> memcached_up{true};
  std::atomic<bool> postgres_up{false};
  HealthMonitor monitor(board,
                        {[&] { return memcached_up.load(); }, [&] { return postgres_up.load(); }},
                        absl::Hours(1), logger);
  monitor.ProbeOnce();
  EXPECT_EQ(board.Get(kSessionServiceName), HealthCheckResponse::SERVING);
  EXPECT_EQ(board.Get(kTransactionServiceName), HealthCheckResponse::NOT_SERVING);

  postgres_up = true;
  monitor.ProbeOnce();
  EXPECT_EQ(board.Get(kTransactionServiceName), HealthCheckResponse::SERVING);

  memcached_up = false;
  monitor.ProbeOnce();
  EXPECT_EQ(board.Get(kSessionServiceName), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(board.Get(kTransactionServiceName), HealthCheckResponse::NOT_SERVING)
      << "transactions authenticate through the session store";
  EXPECT_EQ(board.Get(""), HealthCheckResponse::SERVING) << "the process itself still works";
}

TEST(HealthMonitorTest, ProbesPeriodicallyOnItsOwnThread) {
  HealthBoard board;
  Logger logger(LogLevel::kError, -1);
  std::atomic<int> probes{0};
  {
    HealthMonitor monitor(board, {[&] { return ++probes > 0; }, [] { return true; }},
                          absl::Milliseconds(20), logger);
    const absl::Time give_up = absl::Now() + absl::Seconds(10);
    while (probes < 3 && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_GE(probes.load(), 3);
  EXPECT_EQ(board.Get(kSessionServiceName), HealthCheckResponse::SERVING);
}

// Start-up runs a round on its own thread while the monitor's thread starts counting its
// interval: a probe slower than the interval made the two rounds overlap, and the older result
// could then overwrite the newer one.
TEST(HealthMonitorTest, RoundsOfProbesNeverOverlap) {
  HealthBoard board;
  Logger logger(LogLevel::kError, -1);
  std::mutex mutex;
  std::condition_variable changed;
  int probing = 0;
  int most_at_once = 0;
  // Stays in the probe until another one joins it, or 1 s has passed: long enough for the
  // monitor's thread to come due on a loaded machine, so that an overlap would show.
  const auto slow_probe = [&] {
    std::unique_lock<std::mutex> lock(mutex);
    most_at_once = std::max(most_at_once, ++probing);
    changed.notify_all();
    changed.wait_for(lock, std::chrono::seconds(1), [&] { return probing > 1; });
    --probing;
    return true;
  };
  {
    // The monitor's first round comes due 10 ms into this thread's round.
    HealthMonitor monitor(board, {slow_probe, [] { return true; }}, absl::Milliseconds(10), logger);
    monitor.ProbeOnce();
  }
  std::lock_guard<std::mutex> lock(mutex);
  EXPECT_EQ(most_at_once, 1);
}

}  // namespace
}  // namespace sessionledger
