#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/metrics/server_metrics.h"
#include "tests/support/test_env.h"

namespace sessionledger {
namespace {

// A server with METRICS_PORT set stops its metrics endpoint on every shutdown. civetweb notices
// a stop only between its 2-second waits for a connection, and a scrape starts a new one: the
// stop right after a scrape used to take the full 2 s.
TEST(MetricsHttpServerTest, StopsAtOnceRightAfterAScrape) {
  ServerMetrics metrics;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server = MetricsHttpServer::Start(0, metrics);
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  ASSERT_GT(port, 0);
  const absl::StatusOr<std::string> scraped = testing::HttpGet(port, "/metrics");
  ASSERT_TRUE(scraped.ok()) << scraped.status();
  EXPECT_TRUE(absl::StrContains(*scraped, "sessionledger_rpc_in_flight")) << *scraped;

  const absl::Time stopping = absl::Now();
  server->reset();
  const absl::Duration took = absl::Now() - stopping;
  // 2 s before; well under that on a loaded machine now.
  EXPECT_LT(took, absl::Milliseconds(1000)) << "stopping took " << took;
  EXPECT_FALSE(testing::HttpGet(port, "/metrics").ok()) << "still serving after the stop";
}

}  // namespace
}  // namespace sessionledger
