#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/metrics/server_metrics.h"
#include "tests/support/test_env.h"

namespace sessionledger {
namespace {

// Whether this host has an IPv6 loopback address. Some containers have none (builds on Docker
// engines before 26.1); the server then listens on IPv4 alone.
bool HasIpv6Loopback() {
  const int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in6 address{};
  address.sin6_family = AF_INET6;
  address.sin6_addr = in6addr_loopback;
  const bool bound = bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
  close(fd);
  return bound;
}

// gRPC listens on [::], so a scraper that reaches pods over IPv6 expects /metrics there too;
// civetweb as Debian builds it listened on IPv4 only. Both must answer.
TEST(MetricsHttpServerTest, ServesOverIpv6AndIpv4) {
  ServerMetrics metrics;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start("[::]", 0, metrics);
  ASSERT_TRUE(server.ok()) << server.status();
  const absl::StatusOr<std::string> over_ipv4 = testing::HttpGet((*server)->port(), "/metrics");
  ASSERT_TRUE(over_ipv4.ok()) << over_ipv4.status();
  EXPECT_TRUE(absl::StrContains(*over_ipv4, "\nsessionledger_rpc_in_flight 0\n")) << *over_ipv4;
  if (!HasIpv6Loopback()) GTEST_SKIP() << "this host has no ::1; served over IPv4";
  const absl::StatusOr<std::string> over_ipv6 =
      testing::HttpGet((*server)->port(), "/metrics", /*over_ipv6=*/true);
  ASSERT_TRUE(over_ipv6.ok()) << over_ipv6.status();
  EXPECT_TRUE(absl::StartsWith(*over_ipv6, "HTTP/1.1 200 OK\r\n")) << *over_ipv6;
  EXPECT_TRUE(absl::StrContains(*over_ipv6, "\nsessionledger_rpc_in_flight 0\n")) << *over_ipv6;
}

// LISTEN_ADDRESS narrows /metrics as it narrows the gRPC port: an address of one family does not
// answer on the other's loopback, so neither would it on another interface.
TEST(MetricsHttpServerTest, ListensOnlyOnTheListenAddress) {
  ServerMetrics metrics;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> ipv4 =
      MetricsHttpServer::Start("127.0.0.1", 0, metrics);
  ASSERT_TRUE(ipv4.ok()) << ipv4.status();
  const absl::StatusOr<std::string> over_ipv4 = testing::HttpGet((*ipv4)->port(), "/metrics");
  ASSERT_TRUE(over_ipv4.ok()) << over_ipv4.status();
  EXPECT_TRUE(absl::StrContains(*over_ipv4, "\nsessionledger_rpc_in_flight 0\n")) << *over_ipv4;
  if (!HasIpv6Loopback()) GTEST_SKIP() << "this host has no ::1";
  EXPECT_FALSE(testing::HttpGet((*ipv4)->port(), "/metrics", /*over_ipv6=*/true).ok())
      << "127.0.0.1 answered on ::1";

  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> ipv6 =
      MetricsHttpServer::Start("[::1]", 0, metrics);
  ASSERT_TRUE(ipv6.ok()) << ipv6.status();
  const absl::StatusOr<std::string> over_ipv6 =
      testing::HttpGet((*ipv6)->port(), "/metrics", /*over_ipv6=*/true);
  ASSERT_TRUE(over_ipv6.ok()) << over_ipv6.status();
  EXPECT_TRUE(absl::StrContains(*over_ipv6, "\nsessionledger_rpc_in_flight 0\n")) << *over_ipv6;
  EXPECT_FALSE(testing::HttpGet((*ipv6)->port(), "/metrics").ok()) << "[::1] answered on 127.0.0.1";
}

// localhost is both loopback addresses, on one port, as gRPC listens on every address the name
// has.
TEST(MetricsHttpServerTest, LocalhostServesOnBothLoopbacks) {
  ServerMetrics metrics;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start("localhost", 0, metrics);
  ASSERT_TRUE(server.ok()) << server.status();
  const absl::StatusOr<std::string> over_ipv4 = testing::HttpGet((*server)->port(), "/metrics");
  ASSERT_TRUE(over_ipv4.ok()) << over_ipv4.status();
  EXPECT_TRUE(absl::StartsWith(*over_ipv4, "HTTP/1.1 200 OK\r\n")) << *over_ipv4;
  if (!HasIpv6Loopback()) GTEST_SKIP() << "this host has no ::1; served over IPv4";
  const absl::StatusOr<std::string> over_ipv6 =
      testing::HttpGet((*server)->port(), "/metrics", /*over_ipv6=*/true);
  ASSERT_TRUE(over_ipv6.ok()) << over_ipv6.status();
  EXPECT_TRUE(absl::StartsWith(*over_ipv6, "HTTP/1.1 200 OK\r\n")) << *over_ipv6;
}

TEST(MetricsHttpServerTest, NamesAnAddressItCannotListenOn) {
  ServerMetrics metrics;
  for (const char* address : {"", "example.com", "127.0.0.1:9464", "::1"}) {
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
        MetricsHttpServer::Start(address, 0, metrics);
    ASSERT_FALSE(server.ok()) << "listened on '" << address << "'";
    EXPECT_EQ(server.status().code(), absl::StatusCode::kUnavailable) << address;
    EXPECT_TRUE(absl::StartsWith(server.status().message(), "METRICS_PORT: ")) << server.status();
    EXPECT_TRUE(absl::StrContains(server.status().message(), "LISTEN_ADDRESS")) << server.status();
  }
}

TEST(MetricsHttpServerTest, AnswersOtherPathsWithNotFound) {
  ServerMetrics metrics;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start("[::]", 0, metrics);
  ASSERT_TRUE(server.ok()) << server.status();
  const absl::StatusOr<std::string> root = testing::HttpGet((*server)->port(), "/");
  ASSERT_TRUE(root.ok()) << root.status();
  EXPECT_TRUE(absl::StartsWith(*root, "HTTP/1.1 404 ")) << *root;
  const absl::StatusOr<std::string> query = testing::HttpGet((*server)->port(), "/metrics?x=1");
  ASSERT_TRUE(query.ok()) << query.status();
  EXPECT_TRUE(absl::StartsWith(*query, "HTTP/1.1 200 ")) << *query;
}

// A client that connects and never sends its request holds the one serving thread; a stop
// must not wait for it to give up.
TEST(MetricsHttpServerTest, StopsAtOnceWhileAClientSendsNothing) {
  ServerMetrics metrics;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start("[::]", 0, metrics);
  ASSERT_TRUE(server.ok()) << server.status();
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(static_cast<uint16_t>((*server)->port()));
  ASSERT_EQ(connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address), 0);
  absl::SleepFor(absl::Milliseconds(100));  // Accepted by now, and waiting for the request.
  const absl::Time stopping = absl::Now();
  server->reset();
  // Well under the 1 s a silent client is given, counted from the accept: a stop that waited it
  // out would come ~900 ms from here.
  EXPECT_LT(absl::Now() - stopping, absl::Milliseconds(400));
  close(fd);
}

// Connections are served one at a time: three that never send their request hold a scrape up
// for about a second each, not for the five seconds an answer may take (three of those would
// pass Prometheus's 10 s scrape timeout).
TEST(MetricsHttpServerTest, SilentClientsHoldAScrapeUpOnlyBriefly) {
  ServerMetrics metrics;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start("[::]", 0, metrics);
  ASSERT_TRUE(server.ok()) << server.status();
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(static_cast<uint16_t>((*server)->port()));
  std::vector<int> silent;
  for (int i = 0; i < 3; ++i) {
    silent.push_back(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    ASSERT_EQ(connect(silent.back(), reinterpret_cast<const sockaddr*>(&address), sizeof address),
              0);
  }
  const absl::Time start = absl::Now();
  const absl::StatusOr<std::string> scraped = testing::HttpGet((*server)->port(), "/metrics");
  const absl::Duration took = absl::Now() - start;
  for (int fd : silent) close(fd);
  ASSERT_TRUE(scraped.ok()) << scraped.status();
  EXPECT_TRUE(absl::StartsWith(*scraped, "HTTP/1.1 200 ")) << *scraped;
  EXPECT_LT(took, absl::Seconds(6)) << "each silent client held the thread for 5 s";
}

// Out of descriptors, an accept fails and the connection stays queued: accepting again at once
// spun the serving thread on a core until one was free. It pauses instead, and serves the
// connection once a descriptor is free again.
TEST(MetricsHttpServerTest, OutOfDescriptorsItWaitsInsteadOfSpinning) {
  ServerMetrics metrics;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start("[::]", 0, metrics);
  ASSERT_TRUE(server.ok()) << server.status();
  rlimit before{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &before), 0);
  // With the limit at the lowest free descriptor, the server's accept has none left.
  const int client = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(client, 0);
  const int lowest_free = dup(client);
  ASSERT_GE(lowest_free, 0);
  close(lowest_free);
  rlimit scarce = before;
  scarce.rlim_cur = static_cast<rlim_t>(lowest_free);
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &scarce), 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(static_cast<uint16_t>((*server)->port()));
  const bool connected =
      connect(client, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0;
  timespec cpu_start{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu_start);
  absl::SleepFor(absl::Milliseconds(500));
  timespec cpu_end{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu_end);
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &before), 0);
  ASSERT_TRUE(connected);
  const absl::Duration cpu =
      absl::DurationFromTimespec(cpu_end) - absl::DurationFromTimespec(cpu_start);
  EXPECT_LT(cpu, absl::Milliseconds(100)) << "the serving thread spun while out of descriptors";
  // With a descriptor free again, the queued connection is served.
  const std::string request = "GET /metrics HTTP/1.1\r\n\r\n";
  ASSERT_EQ(write(client, request.data(), request.size()), static_cast<ssize_t>(request.size()));
  std::string response;
  char buffer[4096];
  ssize_t n;
  while ((n = read(client, buffer, sizeof buffer)) > 0)
    response.append(buffer, static_cast<size_t>(n));
  close(client);
  EXPECT_TRUE(absl::StartsWith(response, "HTTP/1.1 200 ")) << response;
}

// A server with METRICS_PORT set stops its metrics endpoint on every shutdown. civetweb (which
// served it before) noticed a stop only between its 2-second waits for a connection, and a
// scrape started a new one: the stop right after a scrape took the full 2 s.
TEST(MetricsHttpServerTest, StopsAtOnceRightAfterAScrape) {
  ServerMetrics metrics;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start("[::]", 0, metrics);
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
