#include "server/metrics/server_metrics.h"

#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"

namespace sessionledger {
namespace {

// The value of the sample line starting with `series` (name and labels, exactly as rendered),
// or -1 when there is none.
double Sample(const std::string& exposition, const std::string& series) {
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    if (!absl::StartsWith(line, series + " ")) continue;
    double value = 0;
    if (absl::SimpleAtod(line.substr(series.size() + 1), &value)) return value;
  }
  return -1;
}

std::string Requests(const std::string& method, const std::string& code) {
  return absl::StrCat("sessionledger_rpc_requests_total{code=\"", code, "\",method=\"", method,
                      "\"}");
}

std::string DurationCount(const std::string& method) {
  return absl::StrCat("sessionledger_rpc_duration_seconds_count{method=\"", method, "\"}");
}

TEST(ServerMetricsTest, CountsEachMethodAndCodeInItsOwnSeries) {
  ServerMetrics metrics;
  const std::string get = "/sessionledger.v1.SessionService/GetSession";
  const std::string create = "/sessionledger.v1.SessionService/CreateSession";
  for (int i = 0; i < 3; ++i) {
    metrics.RpcStarted();
    metrics.RpcFinished(get, "OK", 0.001);
  }
  metrics.RpcStarted();
  metrics.RpcFinished(get, "NOT_FOUND", 0.002);
  metrics.RpcStarted();
  metrics.RpcFinished(create, "OK", 0.003);
  metrics.RpcStarted();
  metrics.RpcFinished(get, "OK", 0.004);

  const std::string text = metrics.RenderText();
  EXPECT_EQ(Sample(text, Requests(get, "OK")), 4);
  EXPECT_EQ(Sample(text, Requests(get, "NOT_FOUND")), 1);
  EXPECT_EQ(Sample(text, Requests(create, "OK")), 1);
  EXPECT_EQ(Sample(text, Requests(create, "NOT_FOUND")), -1) << "no series for codes never seen";
  EXPECT_EQ(Sample(text, DurationCount(get)), 5);
  EXPECT_EQ(Sample(text, DurationCount(create)), 1);
  EXPECT_DOUBLE_EQ(
      Sample(text, absl::StrCat("sessionledger_rpc_duration_seconds_sum{method=\"", create, "\"}")),
      0.003);
  EXPECT_EQ(Sample(text, "sessionledger_rpc_in_flight"), 0);
  metrics.RpcStarted();
  EXPECT_EQ(Sample(metrics.RenderText(), "sessionledger_rpc_in_flight"), 1)
      << "a call still running";
}

// The bucket bounds are the configured ones, on the first series and on later ones alike.
TEST(ServerMetricsTest, EveryMethodGetsTheLatencyBuckets) {
  ServerMetrics metrics;
  metrics.RpcStarted();
  metrics.RpcFinished("/a", "OK", 0.0003);
  metrics.RpcStarted();
  metrics.RpcFinished("/b", "OK", 3);
  const std::string text = metrics.RenderText();
  EXPECT_EQ(Sample(text, "sessionledger_rpc_duration_seconds_bucket{method=\"/a\",le=\"0.0005\"}"),
            1);
  EXPECT_EQ(Sample(text, "sessionledger_rpc_duration_seconds_bucket{method=\"/a\",le=\"0.00025\"}"),
            0);
  EXPECT_EQ(Sample(text, "sessionledger_rpc_duration_seconds_bucket{method=\"/b\",le=\"2.5\"}"), 0);
  EXPECT_EQ(Sample(text, "sessionledger_rpc_duration_seconds_bucket{method=\"/b\",le=\"5\"}"), 1);
}

TEST(ServerMetricsTest, ConcurrentCallsAreAllCounted) {
  ServerMetrics metrics;
  constexpr int kThreads = 8;
  constexpr int kCalls = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&metrics, t] {
      const std::string method = absl::StrCat("/m", t % 3);
      for (int i = 0; i < kCalls; ++i) {
        metrics.RpcStarted();
        metrics.RpcFinished(method, i % 2 == 0 ? "OK" : "ABORTED", 0.001);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  const std::string text = metrics.RenderText();
  double total = 0;
  for (int m = 0; m < 3; ++m) {
    const std::string method = absl::StrCat("/m", m);
    const int threads_of_method = (kThreads - m + 2) / 3;
    EXPECT_EQ(Sample(text, Requests(method, "OK")), threads_of_method * kCalls / 2) << method;
    EXPECT_EQ(Sample(text, Requests(method, "ABORTED")), threads_of_method * kCalls / 2) << method;
    total += Sample(text, DurationCount(method));
  }
  EXPECT_EQ(total, kThreads * kCalls);
  EXPECT_EQ(Sample(text, "sessionledger_rpc_in_flight"), 0);
}

}  // namespace
}  // namespace sessionledger
