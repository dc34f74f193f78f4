// Connections by host name to the real PostgreSQL of scripts/backing-services (DATABASE_URL,
// which names 127.0.0.1): the name is looked up by PgHostResolver and libpq is handed the
// address, while the name stays the one libpq reports (and would verify a certificate against).
#include <arpa/inet.h>

#include <atomic>
#include <memory>
#include <string>

#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/postgres/pg_pool.h"
#include "tests/support/test_env.h"

namespace sessionledger {
namespace {

using ::sessionledger::testing::RequiredEnv;
using ::testing::HasSubstr;

// DATABASE_URL with its host replaced by `hosts` (a URL host list).
std::string UrlWithHosts(const std::string& hosts) {
  const std::string url = RequiredEnv("DATABASE_URL");
  EXPECT_THAT(url, HasSubstr("@127.0.0.1:"));
  return absl::StrReplaceAll(url, {{"@127.0.0.1:", "@" + hosts + ":"}});
}

absl::Time Soon() { return absl::Now() + absl::Seconds(10); }

bool IsNumeric(const char* address) {
  in6_addr buffer;
  return address != nullptr &&
         (inet_pton(AF_INET, address, &buffer) == 1 || inet_pton(AF_INET6, address, &buffer) == 1);
}

void ExpectWorks(PgConnection& conn) {
  absl::StatusOr<PgResultPtr> r = conn.ExecSimple("SELECT 1", Soon());
  ASSERT_TRUE(r.ok()) << r.status();
}

TEST(PgHostLookupTest, LocalhostConnectsByItsAddressKeepingTheName) {
  // getaddrinfo (the default lookup) through /etc/hosts. localhost may also give ::1, where
  // nothing listens: libpq tries the next address, as it did when it looked the name up itself.
  absl::StatusOr<PgConnection> conn = PgConnection::Connect(UrlWithHosts("localhost"), Soon());
  ASSERT_TRUE(conn.ok()) << conn.status();
  EXPECT_STREQ(PQhost(conn->raw()), "localhost");
  EXPECT_TRUE(IsNumeric(PQhostaddr(conn->raw()))) << PQhostaddr(conn->raw());
  ExpectWorks(*conn);
}

TEST(PgHostLookupTest, PoolConnectsByNameWithASharedResolver) {
  PgPoolOptions options;
  options.conninfo = UrlWithHosts("localhost");
  options.size = 2;
  options.resolver = std::make_shared<PgHostResolver>();
  PgPool pool(options);
  absl::StatusOr<PgPool::Lease> lease = pool.Acquire(Soon());
  ASSERT_TRUE(lease.ok()) << lease.status();
  ExpectWorks(lease->conn());
  EXPECT_EQ(options.resolver->lookups_started(), 1);
}

// An injected lookup maps made-up names: the first host does not exist, the second leads to
// the real server. libpq skips the first as it skips a host it cannot resolve, and
// target_session_attrs still applies (the backing server is a primary).
TEST(PgHostLookupTest, AMultiHostListSkipsANameThatDoesNotResolve) {
  PgHostResolver resolver([](const std::string& host) -> absl::StatusOr<std::vector<std::string>> {
    if (host == "db.test") return std::vector<std::string>{"127.0.0.1"};
    return absl::NotFoundError("Name or service not known");
  });
  const PgConnectTarget target(UrlWithHosts("gone.test,db.test") +
                               "&target_session_attrs=read-write");
  absl::StatusOr<PgConnection> conn = PgConnection::Connect(target, resolver, Soon());
  ASSERT_TRUE(conn.ok()) << conn.status();
  EXPECT_STREQ(PQhost(conn->raw()), "db.test");
  EXPECT_STREQ(PQhostaddr(conn->raw()), "127.0.0.1");
  ExpectWorks(*conn);
}

TEST(PgHostLookupTest, AGivenHostaddrIsUsedAsIs) {
  auto lookups = std::make_shared<std::atomic<int>>(0);
  PgHostResolver resolver(
      [lookups](const std::string&) -> absl::StatusOr<std::vector<std::string>> {
        lookups->fetch_add(1);
        return absl::NotFoundError("not asked for");
      });
  const PgConnectTarget target(UrlWithHosts("db.test") + "&hostaddr=127.0.0.1");
  EXPECT_TRUE(target.names().empty());
  absl::StatusOr<PgConnection> conn = PgConnection::Connect(target, resolver, Soon());
  ASSERT_TRUE(conn.ok()) << conn.status();
  EXPECT_STREQ(PQhost(conn->raw()), "db.test");
  EXPECT_EQ(lookups->load(), 0);
}

TEST(PgHostLookupTest, ANameThatDoesNotResolveIsUnavailableNamingIt) {
  // Real getaddrinfo: ".invalid" never resolves (RFC 6761). Where no name server answers at all,
  // the deadline ends the wait instead; either way the caller hears about the name in time.
  const absl::Time start = absl::Now();
  absl::StatusOr<PgConnection> conn =
      PgConnection::Connect(UrlWithHosts("sessionledger-test.invalid"), start + absl::Seconds(2));
  ASSERT_FALSE(conn.ok());
  EXPECT_EQ(conn.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(conn.status().message(), HasSubstr("'sessionledger-test.invalid'"));
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(2500));
}

}  // namespace
}  // namespace sessionledger
