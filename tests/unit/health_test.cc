#include "server/rpc/health.h"

#include <atomic>

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

TEST(HealthBoardTest, ShutdownIsFinal) {
  HealthBoard board;
  board.Set(kSessionServiceName, true);
  board.Shutdown();
  board.Set(kSessionServiceName, true);
  EXPECT_EQ(board.Get(""), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(board.Get(kSessionServiceName), HealthCheckResponse::NOT_SERVING);
  EXPECT_TRUE(board.shutting_down());
}

TEST(HealthBoardTest, WaitForChangeWakesOnChange) {
  HealthBoard board;
  std::thread setter([&] {
    absl::SleepFor(absl::Milliseconds(50));
    board.Set(kSessionServiceName, true);
  });
  const auto status =
      board.WaitForChange(kSessionServiceName, HealthCheckResponse::NOT_SERVING, absl::Seconds(10));
  setter.join();
  EXPECT_EQ(status, HealthCheckResponse::SERVING);
}

// Watch of a name the board does not know waits like any other: it used to return at once,
// and the Watch loop spun on a core for as long as the stream stayed open.
TEST(HealthBoardTest, WaitForChangeOfAnUnknownServiceWaits) {
  HealthBoard board;
  const absl::Time start = absl::Now();
  const auto status = board.WaitForChange("no.such.Service", HealthCheckResponse::SERVICE_UNKNOWN,
                                          absl::Milliseconds(200));
  EXPECT_EQ(status, std::nullopt);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(190));
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

}  // namespace
}  // namespace sessionledger
