// Connections by host name to the real PostgreSQL of scripts/backing-services (DATABASE_URL,
// which names 127.0.0.1): the name is looked up by HostResolver and libpq is handed the
// address, while the name stays the one libpq reports (and would verify a certificate against).

#include <atomic>
#include <map>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/common/host_resolver.h"
#include "server/common/notification.h"
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

// `host` with the backing server's port: in a URL's host list, a host without a port of its own
// has libpq's default, 5432.
std::string OnServerPort(const std::string& host) {
  return host + ":" + RequiredEnv("SL_POSTGRES_PORT");
}

absl::Time Soon() { return absl::Now() + absl::Seconds(10); }

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
  const char* hostaddr = PQhostaddr(conn->raw());
  ASSERT_NE(hostaddr, nullptr);
  EXPECT_TRUE(IsNumericAddress(hostaddr)) << hostaddr;
  ExpectWorks(*conn);
}

TEST(PgHostLookupTest, PoolConnectsByNameWithASharedResolver) {
  PgPoolOptions options;
  options.conninfo = UrlWithHosts("localhost");
  options.size = 2;
  options.resolver = std::make_shared<HostResolver>();
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
  HostResolver resolver([](const std::string& host) -> absl::StatusOr<std::vector<std::string>> {
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

// A lookup of made-up names: each answers 127.0.0.1 (the real server) after its delay; a name
// with a delay of 10 s or more answers only when `release` is notified. Held by shared_ptr:
// lookup threads are detached and may outlive the test.
struct DelayedNames {
  std::map<std::string, absl::Duration> delays;
  Notification release;

  HostLookupFn Lookup(std::shared_ptr<DelayedNames> self) {
    return [self](const std::string& host) -> absl::StatusOr<std::vector<std::string>> {
      const absl::Duration delay = self->delays.at(host);
      if (delay >= absl::Seconds(10)) {
        self->release.WaitForNotification();
      } else {
        absl::SleepFor(delay);
      }
      return std::vector<std::string>{"127.0.0.1"};
    };
  }
};

// The defect this guards against: every name was looked up before libpq was called, so a
// fallback host whose name server hangs held up a connection to a primary that was there.
TEST(PgHostLookupTest, AFallbackHostsHangingLookupDoesNotDelayTheHostBeforeIt) {
  auto names = std::make_shared<DelayedNames>();
  names->delays = {{"db.test", absl::ZeroDuration()}, {"hanging.test", absl::Seconds(10)}};
  HostResolver resolver(names->Lookup(names));
  const PgConnectTarget target(UrlWithHosts(OnServerPort("db.test") + ",hanging.test") +
                               "&target_session_attrs=read-write");
  const absl::Time start = absl::Now();
  absl::StatusOr<PgConnection> conn = PgConnection::Connect(target, resolver, Soon());
  const absl::Duration took = absl::Now() - start;
  names->release.Notify();
  ASSERT_TRUE(conn.ok()) << conn.status();
  EXPECT_STREQ(PQhost(conn->raw()), "db.test");
  EXPECT_LT(took, absl::Seconds(3));  // The deadline is 10 s away.
  ExpectWorks(*conn);
}

// As libpq does: the first host is tried first, even when a later name answers sooner.
TEST(PgHostLookupTest, HostsAreTriedInTheirOrderWhicheverLookupAnswersFirst) {
  auto names = std::make_shared<DelayedNames>();
  names->delays = {{"first.test", absl::Milliseconds(300)}, {"second.test", absl::ZeroDuration()}};
  HostResolver resolver(names->Lookup(names));
  absl::StatusOr<PgConnection> conn = PgConnection::Connect(
      PgConnectTarget(UrlWithHosts(OnServerPort("first.test") + ",second.test")), resolver, Soon());
  ASSERT_TRUE(conn.ok()) << conn.status();
  EXPECT_STREQ(PQhost(conn->raw()), "first.test");
}

// The first host refuses (nothing listens on port 1) before the second name has answered: the
// connect then waits for that name and goes on to it, as libpq would.
TEST(PgHostLookupTest, AHostWhoseLookupWasStillRunningIsTriedAfterTheOnesBeforeItFail) {
  auto names = std::make_shared<DelayedNames>();
  names->delays = {{"down.test", absl::ZeroDuration()}, {"db.test", absl::Milliseconds(500)}};
  HostResolver resolver(names->Lookup(names));
  // Per-host ports: down.test:1, db.test on the real server's port.
  absl::StatusOr<PgConnection> conn =
      PgConnection::Connect(PgConnectTarget(UrlWithHosts("down.test:1,db.test")), resolver, Soon());
  ASSERT_TRUE(conn.ok()) << conn.status();
  EXPECT_STREQ(PQhost(conn->raw()), "db.test");
  ExpectWorks(*conn);
}

// Every host failed: the answer says why for each of them.
TEST(PgHostLookupTest, WhenEveryHostFailsEachOneSaysWhy) {
  auto names = std::make_shared<DelayedNames>();
  names->delays = {{"down.test", absl::ZeroDuration()}, {"hanging.test", absl::Seconds(10)}};
  HostResolver resolver(names->Lookup(names));
  absl::StatusOr<PgConnection> conn =
      PgConnection::Connect(PgConnectTarget(UrlWithHosts("down.test:1,hanging.test")), resolver,
                            absl::Now() + absl::Seconds(1));
  names->release.Notify();
  ASSERT_FALSE(conn.ok());
  EXPECT_EQ(conn.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(conn.status().message(), HasSubstr("connect failed"));
  // Named, with the address it was reached at: which host of a failover list refused.
  EXPECT_THAT(conn.status().message(), HasSubstr("(down.test at 127.0.0.1)"));
  EXPECT_THAT(conn.status().message(),
              HasSubstr("looking up 'hanging.test' took longer than the deadline"));
}

// A host that takes the connection and never answers (or whose packets are dropped: its node
// gone) must not hold up the hosts after it: libpq cannot be told to give up on one host, so
// each is tried on its own, within connect_timeout. Before, the whole list waited out the
// deadline on the first host, and a failover to the second never happened.
TEST(PgHostLookupTest, AHostThatNeverAnswersDoesNotHoldUpTheNextOne) {
  testing::SilentListener silent(/*backlog=*/4);
  ASSERT_NE(silent.port(), 0);
  const std::string hosts = absl::StrCat("127.0.0.1:", silent.port(), ",127.0.0.1");
  struct Case {
    const char* what;
    std::string timeout;
    absl::Duration deadline;
    absl::Duration at_most;  // The silent host's time, and a margin for the second.
  };
  const Case cases[] = {
      {"connect_timeout=1 (libpq's 2 s at least)", "&connect_timeout=1", absl::Seconds(8),
       absl::Seconds(4)},
      {"no connect_timeout: half of the deadline", "", absl::Seconds(8), absl::Seconds(6)},
      // The pool's 3 s: a longer connect_timeout gives the first host only its share.
      {"connect_timeout=5 within 3 s: half of them", "&connect_timeout=5", absl::Seconds(3),
       absl::Seconds(3)},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const absl::Time start = absl::Now();
    absl::StatusOr<PgConnection> conn =
        PgConnection::Connect(UrlWithHosts(hosts) + "&target_session_attrs=read-write" + c.timeout,
                              absl::Now() + c.deadline);
    const absl::Duration took = absl::Now() - start;
    ASSERT_TRUE(conn.ok()) << conn.status();
    EXPECT_EQ(std::string(PQport(conn->raw())), RequiredEnv("SL_POSTGRES_PORT"));
    EXPECT_LT(took, c.at_most);
    ExpectWorks(*conn);
  }
}

TEST(PgHostLookupTest, AGivenHostaddrIsUsedAsIs) {
  auto lookups = std::make_shared<std::atomic<int>>(0);
  HostResolver resolver([lookups](const std::string&) -> absl::StatusOr<std::vector<std::string>> {
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
