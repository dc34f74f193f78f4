// Host name lookups for PostgreSQL connections: bounded by the caller's deadline, shared
// between concurrent callers, never cached past one lookup; and how conninfo host lists are
// turned into host/hostaddr/port for libpq. No PostgreSQL needed: a lookup that never answers
// in time fails the connect before libpq is ever called.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/common/host_resolver.h"
#include "server/common/notification.h"
#include "server/common/thread_name.h"
#include "server/postgres/pg_connect_target.h"
#include "server/postgres/pg_pool.h"

namespace sessionledger {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

using Addresses = absl::StatusOr<std::vector<std::string>>;

// A lookup that answers only when released (or after `longest`), counting its calls. Held by
// shared_ptr: lookup threads are detached and may outlive the test's stack frame.
struct GatedLookup {
  Notification release;
  std::atomic<int> calls{0};

  static std::shared_ptr<GatedLookup> Make() { return std::make_shared<GatedLookup>(); }
};

// A lookup that answers `answer` once `gate` is released, or after 10 s.
HostLookupFn Gated(std::shared_ptr<GatedLookup> gate,
                   std::vector<std::string> answer = {"10.0.0.1"}) {
  return [gate, answer](const std::string&) {
    gate->calls.fetch_add(1);
    gate->release.WaitForNotificationWithTimeout(absl::Seconds(10));
    return Addresses(answer);
  };
}

SteadyTime In(absl::Duration d) { return SteadyNow() + ToSteadyDuration(d); }

absl::Duration Since(SteadyTime start) {
  return absl::FromChrono(
      std::chrono::duration_cast<std::chrono::nanoseconds>(SteadyNow() - start));
}

// One host's lookup; DEADLINE_EXCEEDED when it has not answered by `give_up`.
Addresses LookUp(HostResolver& resolver, const std::string& host, SteadyTime give_up) {
  std::optional<Addresses> found = resolver.Start({host}).Await(0, give_up);
  return found.has_value() ? *found : absl::DeadlineExceededError("not answered");
}

TEST(HostResolverTest, ASlowLookupEndsAtTheDeadline) {
  auto gate = GatedLookup::Make();
  HostResolver resolver(Gated(gate));
  const SteadyTime start = SteadyNow();
  HostResolver::Pending pending = resolver.Start({"db.example"});
  EXPECT_FALSE(pending.Await(0, In(absl::Seconds(1))).has_value());
  const absl::Duration took = Since(start);
  EXPECT_FALSE(pending.Answered(0));
  EXPECT_GE(took, absl::Milliseconds(990));
  EXPECT_LT(took, absl::Milliseconds(1500));
  gate->release.Notify();
  // The lookup went on: the same Pending gets its answer.
  std::optional<Addresses> late = pending.Await(0, In(absl::Seconds(10)));
  ASSERT_TRUE(late.has_value() && late->ok());
  EXPECT_THAT(**late, ElementsAre("10.0.0.1"));
}

// The defect this guards against: libpq looked names up inside PQconnectStartParams, where the
// deadline never reached. Here the lookup sleeps 10 s; the connect must give up after 1 s.
TEST(HostResolverTest, ConnectWithASlowLookupAnswersUnavailableByTheDeadline) {
  auto gate = GatedLookup::Make();
  HostResolver resolver(Gated(gate));
  const PgConnectTarget target("postgres://app@db.example:5432/app?sslmode=disable");
  const SteadyTime start = SteadyNow();
  absl::StatusOr<PgConnection> conn =
      PgConnection::Connect(target, resolver, absl::Now() + absl::Seconds(1));
  const absl::Duration took = Since(start);
  ASSERT_FALSE(conn.ok());
  EXPECT_EQ(conn.status().code(), absl::StatusCode::kUnavailable) << conn.status();
  EXPECT_THAT(conn.status().message(),
              HasSubstr("looking up 'db.example' took longer than the deadline"));
  EXPECT_LT(took, absl::Milliseconds(1500));
  EXPECT_EQ(gate->calls.load(), 1);
  gate->release.Notify();
}

TEST(HostResolverTest, PoolAcquireWithASlowLookupAnswersUnavailableByTheDeadline) {
  auto gate = GatedLookup::Make();
  PgPoolOptions options;
  options.conninfo = "postgres://app@db.example:5432/app?sslmode=disable";
  options.size = 2;
  options.connect_timeout = absl::Seconds(30);  // The caller's deadline is the tighter one.
  options.resolver = std::make_shared<HostResolver>(Gated(gate));
  PgPool pool(options);
  const SteadyTime start = SteadyNow();
  absl::StatusOr<PgPool::Lease> lease = pool.Acquire(absl::Now() + absl::Seconds(1));
  const absl::Duration took = Since(start);
  ASSERT_FALSE(lease.ok());
  EXPECT_EQ(lease.status().code(), absl::StatusCode::kUnavailable) << lease.status();
  EXPECT_LT(took, absl::Milliseconds(1500));
  // The slot is given back: nothing stays open for a connect that never happened.
  EXPECT_EQ(pool.open_connections(), 0);
  gate->release.Notify();
}

TEST(HostResolverTest, ConcurrentCallersShareOneLookup) {
  auto gate = GatedLookup::Make();
  HostResolver resolver(Gated(gate, {"10.0.0.7"}));
  Addresses first, second;
  std::thread a([&] { first = LookUp(resolver, "db.example", In(absl::Seconds(10))); });
  std::thread b([&] { second = LookUp(resolver, "db.example", In(absl::Seconds(10))); });
  for (int i = 0; i < 1000 && resolver.waiting() < 2; ++i) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(resolver.waiting(), 2);
  gate->release.Notify();
  a.join();
  b.join();
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_THAT(*first, ElementsAre("10.0.0.7"));
  EXPECT_THAT(*second, ElementsAre("10.0.0.7"));
  EXPECT_EQ(gate->calls.load(), 1);
  EXPECT_EQ(resolver.lookups_started(), 1);
}

// A caller that gave up leaves the lookup running; the next caller waits on that one rather
// than starting another, so a DNS outage costs one thread per name, not one per call.
TEST(HostResolverTest, CallersThatGaveUpDoNotPileUpThreads) {
  auto gate = GatedLookup::Make();
  HostResolver resolver(Gated(gate));
  for (int i = 0; i < 5; ++i) {
    EXPECT_FALSE(LookUp(resolver, "db.example", In(absl::Milliseconds(20))).ok());
  }
  EXPECT_EQ(resolver.lookups_started(), 1);
  gate->release.Notify();
}

// After a failover the name leads elsewhere: an answered lookup is not reused.
TEST(HostResolverTest, EachStartAfterAnAnswerLooksUpAgain) {
  auto answers = std::make_shared<std::atomic<int>>(0);
  HostResolver resolver([answers](const std::string&) -> Addresses {
    return std::vector<std::string>{answers->fetch_add(1) == 0 ? "10.0.0.1" : "10.0.0.2"};
  });
  Addresses before = LookUp(resolver, "db.example", In(absl::Seconds(5)));
  Addresses after = LookUp(resolver, "db.example", In(absl::Seconds(5)));
  ASSERT_TRUE(before.ok() && after.ok());
  EXPECT_THAT(*before, ElementsAre("10.0.0.1"));
  EXPECT_THAT(*after, ElementsAre("10.0.0.2"));
  EXPECT_EQ(resolver.lookups_started(), 2);
}

TEST(HostResolverTest, DestroyingTheResolverDoesNotWaitForAStuckLookup) {
  auto gate = GatedLookup::Make();
  auto resolver = std::make_unique<HostResolver>(Gated(gate));
  EXPECT_FALSE(LookUp(*resolver, "db.example", In(absl::Milliseconds(10))).ok());
  const SteadyTime start = SteadyNow();
  resolver.reset();
  EXPECT_LT(Since(start), absl::Milliseconds(100));
  gate->release.Notify();  // Lets the detached thread finish (and free the shared state).
}

TEST(HostResolverTest, AFailedLookupIsReportedWithTheHostName) {
  HostResolver resolver([](const std::string&) -> Addresses {
    return absl::NotFoundError("Name or service not known");
  });
  const PgConnectTarget target("postgres://app@nowhere.example/app");
  absl::StatusOr<PgConnection> conn =
      PgConnection::Connect(target, resolver, absl::Now() + absl::Seconds(5));
  ASSERT_FALSE(conn.ok());
  EXPECT_EQ(conn.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(conn.status().message(),
              HasSubstr("cannot look up 'nowhere.example': Name or service not known"));
}

// top -H tells the health probe's lookups of Memcached names from PostgreSQL's.
TEST(HostResolverTest, LookupThreadsCarryTheGivenName) {
  auto seen = std::make_shared<std::string>();
  HostResolver named(
      [seen](const std::string&) {
        *seen = ThisThreadName();
        return Addresses(std::vector<std::string>{"10.0.0.1"});
      },
      "sl-probe-dns");
  ASSERT_TRUE(LookUp(named, "db", In(absl::Seconds(10))).ok());
  EXPECT_EQ(*seen, "sl-probe-dns");
  HostResolver unnamed([seen](const std::string&) {
    *seen = ThisThreadName();
    return Addresses(std::vector<std::string>{"10.0.0.1"});
  });
  ASSERT_TRUE(LookUp(unnamed, "db", In(absl::Seconds(10))).ok());
  EXPECT_EQ(*seen, "sl-dns");
}

TEST(LookUpHostTest, NumericAndLocalNamesResolveWithoutDns) {
  auto numeric = LookUpHost("127.0.0.1");
  ASSERT_TRUE(numeric.ok()) << numeric.status();
  EXPECT_THAT(*numeric, ElementsAre("127.0.0.1"));
  auto local = LookUpHost("localhost");  // /etc/hosts
  ASSERT_TRUE(local.ok()) << local.status();
  EXPECT_THAT(*local, ::testing::Contains("127.0.0.1"));
}

// --- conninfo forms ---

PgConnectTarget::Overrides Expect(const PgConnectTarget& target,
                                  const std::vector<Addresses>& addresses) {
  absl::StatusOr<PgConnectTarget::Overrides> o = target.WithAddresses(addresses);
  EXPECT_TRUE(o.ok()) << o.status();
  return o.ok() ? *o : PgConnectTarget::Overrides{};
}

TEST(PgConnectTargetTest, MultiHostUrlExpandsEachNameToItsAddresses) {
  const PgConnectTarget target(
      "postgres://app:secret@db1.example:5432,db2.example:5433/"
      "app?target_session_attrs=read-write");
  EXPECT_THAT(target.names(), ElementsAre("db1.example", "db2.example"));
  const auto o = Expect(target, {std::vector<std::string>{"10.0.0.1", "fd00::1"},
                                 std::vector<std::string>{"10.0.0.3"}});
  EXPECT_EQ(o.host, "db1.example,db1.example,db2.example");
  EXPECT_EQ(o.hostaddr, "10.0.0.1,fd00::1,10.0.0.3");
  EXPECT_EQ(o.port, "5432,5432,5433");
}

// One candidate per address, for connecting to them one at a time; each keeps its entry's port.
TEST(PgConnectTargetTest, CandidatesAreOneAddressEachInLibpqsOrder) {
  const PgConnectTarget target("postgres://app@db1.example:5432,10.0.0.9:5433/app");
  absl::StatusOr<std::vector<PgConnectTarget::Overrides>> candidates =
      target.Candidates({std::vector<std::string>{"10.0.0.1", "fd00::1"}});
  ASSERT_TRUE(candidates.ok()) << candidates.status();
  ASSERT_EQ(candidates->size(), 3u);
  EXPECT_EQ((*candidates)[0].host, "db1.example");
  EXPECT_EQ((*candidates)[0].hostaddr, "10.0.0.1");
  EXPECT_EQ((*candidates)[0].port, "5432");
  EXPECT_EQ((*candidates)[1].hostaddr, "fd00::1");
  EXPECT_EQ((*candidates)[2].host, "10.0.0.9");
  EXPECT_EQ((*candidates)[2].hostaddr, "");
  EXPECT_EQ((*candidates)[2].port, "5433");
}

// What decides how long one host of a list gets: libpq's connect_timeout (2 s at least, none
// when 0 or unset), and whether only libpq can walk the list (prefer-standby's two passes).
TEST(PgConnectTargetTest, ConnectTimeoutAndPreferStandbyAreReadAsLibpqReadsThem) {
  EXPECT_EQ(PgConnectTarget("postgres://a@db1.example,db2.example/app?connect_timeout=5")
                .connect_timeout(),
            absl::Seconds(5));
  EXPECT_EQ(PgConnectTarget("postgres://a@db.example/app?connect_timeout=1").connect_timeout(),
            absl::Seconds(2));
  EXPECT_EQ(PgConnectTarget("postgres://a@db.example/app?connect_timeout=0").connect_timeout(),
            absl::ZeroDuration());
  EXPECT_EQ(PgConnectTarget("postgres://a@db.example/app").connect_timeout(), absl::ZeroDuration());
  EXPECT_TRUE(PgConnectTarget("postgres://a@db1.example,db2.example/app"
                              "?target_session_attrs=prefer-standby")
                  .needs_whole_list());
  EXPECT_FALSE(PgConnectTarget("postgres://a@db1.example,db2.example/app"
                               "?target_session_attrs=read-write")
                   .needs_whole_list());
  // libpq drops an empty value, so such an entry alone would mean the conninfo's whole list.
  EXPECT_TRUE(PgConnectTarget("host=,db2.example dbname=app").needs_whole_list());
  EXPECT_TRUE(
      PgConnectTarget("host=10.0.0.1,10.0.0.2 hostaddr=,10.0.0.3 dbname=app").needs_whole_list());
  EXPECT_FALSE(PgConnectTarget("host=db1.example,db2.example hostaddr=10.0.0.1,10.0.0.3 dbname=app")
                   .needs_whole_list());
}

TEST(PgConnectTargetTest, OnePortForAllIsLeftToTheConninfo) {
  const PgConnectTarget target("postgres://app@db.example:6000/app");
  EXPECT_THAT(target.names(), ElementsAre("db.example"));
  const auto o = Expect(target, {std::vector<std::string>{"10.0.0.1", "10.0.0.2"}});
  EXPECT_EQ(o.host, "db.example,db.example");
  EXPECT_EQ(o.hostaddr, "10.0.0.1,10.0.0.2");
  EXPECT_EQ(o.port, "");
}

TEST(PgConnectTargetTest, UnixSocketsNumericHostsAndGivenHostaddrsNeedNoLookup) {
  EXPECT_THAT(PgConnectTarget("postgresql:///app?host=/var/run/postgresql").names(), IsEmpty());
  EXPECT_THAT(PgConnectTarget("host=@abstract dbname=app").names(), IsEmpty());
  EXPECT_THAT(PgConnectTarget("postgresql:///app").names(), IsEmpty());
  EXPECT_THAT(PgConnectTarget("postgres://app@127.0.0.1:5432/app").names(), IsEmpty());
  EXPECT_THAT(PgConnectTarget("postgres://app@[::1]:5432/app").names(), IsEmpty());
  EXPECT_THAT(PgConnectTarget("host=db.example hostaddr=10.1.1.1 dbname=app").names(), IsEmpty());
  EXPECT_THAT(PgConnectTarget("postgres://app@db.example/app?hostaddr=10.1.1.1").names(),
              IsEmpty());
}

TEST(PgConnectTargetTest, MixedListsKeepWhatNeedsNoLookup) {
  const PgConnectTarget target(
      "host=a.example,/tmp,b.example,10.0.0.9 hostaddr=,,,10.0.0.9 port=1,2,3,4 dbname=x");
  EXPECT_THAT(target.names(), ElementsAre("a.example", "b.example"));
  const auto o = Expect(target, {std::vector<std::string>{"10.0.0.1"},
                                 std::vector<std::string>{"10.0.0.2", "10.0.0.3"}});
  EXPECT_EQ(o.host, "a.example,/tmp,b.example,b.example,10.0.0.9");
  EXPECT_EQ(o.hostaddr, "10.0.0.1,,10.0.0.2,10.0.0.3,10.0.0.9");
  EXPECT_EQ(o.port, "1,2,3,3,4");
}

// A host list passed on in parts keeps each part's ports; an entry without one has libpq's
// default, not the next entry's.
TEST(PgConnectTargetTest, PartsOfTheListKeepTheirOwnPorts) {
  const PgConnectTarget target("postgres://app@a.example,b.example:6000/app");
  const std::vector<Addresses> addresses = {std::vector<std::string>{"10.0.0.1"},
                                            std::vector<std::string>{"10.0.0.2"}};
  absl::StatusOr<PgConnectTarget::Overrides> first = target.WithAddresses(addresses, 0, 1);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->host, "a.example");
  EXPECT_EQ(first->hostaddr, "10.0.0.1");
  EXPECT_EQ(first->port, "5432");
  absl::StatusOr<PgConnectTarget::Overrides> second = target.WithAddresses(addresses, 1, 2);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->host, "b.example");
  EXPECT_EQ(second->port, "6000");
}

TEST(PgConnectTargetTest, ARepeatedNameIsLookedUpOnce) {
  const PgConnectTarget target("host=db.example,db.example port=5432,5433 dbname=x");
  EXPECT_THAT(target.names(), ElementsAre("db.example"));
  const auto o = Expect(target, {std::vector<std::string>{"10.0.0.1"}});
  EXPECT_EQ(o.host, "db.example,db.example");
  EXPECT_EQ(o.hostaddr, "10.0.0.1,10.0.0.1");
  EXPECT_EQ(o.port, "5432,5433");
}

TEST(PgConnectTargetTest, AHostThatDoesNotResolveIsSkippedLikeLibpqDoes) {
  const PgConnectTarget target("postgres://app@gone.example,db.example/app");
  const auto o = Expect(target, {absl::NotFoundError("Name or service not known"),
                                 std::vector<std::string>{"10.0.0.2"}});
  EXPECT_EQ(o.host, "db.example");
  EXPECT_EQ(o.hostaddr, "10.0.0.2");
  absl::StatusOr<PgConnectTarget::Overrides> none = target.WithAddresses(
      {absl::NotFoundError("Name or service not known"), absl::UnavailableError("SERVFAIL")});
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(none.status().message(), HasSubstr("'gone.example'"));
}

// A lookup that answers without an address (an injected one; getaddrinfo's never does) leaves
// nothing to try: UNAVAILABLE, not an OK status in a StatusOr (which Abseil turns into INTERNAL).
TEST(PgConnectTargetTest, AnAnswerWithoutAddressesLeavesNothingToTry) {
  const PgConnectTarget target("postgres://app@db.example/app");
  absl::StatusOr<PgConnectTarget::Overrides> none =
      target.WithAddresses({std::vector<std::string>{}});
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(none.status().message(), HasSubstr("no address"));
  // An empty part of the list likewise.
  EXPECT_EQ(target.WithAddresses({std::vector<std::string>{"10.0.0.1"}}, 1, 1).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST(PgConnectTargetTest, WhatLibpqWouldRefuseIsPassedOnUnchanged) {
  // libpq's own error ("could not match 3 port numbers to 2 hosts") stays the one reported.
  EXPECT_THAT(PgConnectTarget("host=a.example,b.example port=1,2,3 dbname=x").names(), IsEmpty());
  EXPECT_THAT(PgConnectTarget("host=a.example,b.example hostaddr=10.0.0.1 dbname=x").names(),
              IsEmpty());
  EXPECT_THAT(PgConnectTarget("postgres://[oops").names(), IsEmpty());
}

// Sets (or, with nullopt, unsets) environment variables for its lifetime, as they were after.
class ScopedEnv {
 public:
  explicit ScopedEnv(std::map<std::string, std::optional<std::string>> values) {
    for (const auto& [name, value] : values) {
      const char* old = std::getenv(name.c_str());
      saved_[name] = old == nullptr ? std::nullopt : std::optional<std::string>(old);
      Set(name, value);
    }
  }
  ~ScopedEnv() {
    for (const auto& [name, value] : saved_) Set(name, value);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  static void Set(const std::string& name, const std::optional<std::string>& value) {
    if (value.has_value()) {
      setenv(name.c_str(), value->c_str(), 1);
    } else {
      unsetenv(name.c_str());
    }
  }
  std::map<std::string, std::optional<std::string>> saved_;
};

// None of libpq's defaults for host, hostaddr and port, so that each test sets its own.
std::map<std::string, std::optional<std::string>> NoLibpqDefaults() {
  return {{"PGHOST", std::nullopt},
          {"PGHOSTADDR", std::nullopt},
          {"PGPORT", std::nullopt},
          {"PGSERVICE", std::nullopt},
          {"PGSERVICEFILE", std::nullopt}};
}

TEST(PgConnectTargetTest, HostsFromTheEnvironmentAreLookedUpToo) {
  auto env = NoLibpqDefaults();
  env["PGHOST"] = "a.example,b.example";
  env["PGPORT"] = "5432,5433";
  ScopedEnv scoped(env);
  const PgConnectTarget target("dbname=app user=app");
  EXPECT_THAT(target.names(), ElementsAre("a.example", "b.example"));
  const auto o =
      Expect(target, {std::vector<std::string>{"10.0.0.1"}, std::vector<std::string>{"10.0.0.2"}});
  EXPECT_EQ(o.host, "a.example,b.example");
  EXPECT_EQ(o.hostaddr, "10.0.0.1,10.0.0.2");
  EXPECT_EQ(o.port, "5432,5433");
  // What the conninfo says comes first, as in libpq: its host, with PGPORT's ports.
  EXPECT_THAT(PgConnectTarget("host=c.example,d.example dbname=app").names(),
              ElementsAre("c.example", "d.example"));
}

TEST(PgConnectTargetTest, AHostaddrFromTheEnvironmentNeedsNoLookup) {
  auto env = NoLibpqDefaults();
  env["PGHOSTADDR"] = "10.1.1.1";
  ScopedEnv scoped(env);
  EXPECT_THAT(PgConnectTarget("postgres://app@db.example/app").names(), IsEmpty());
}

TEST(PgConnectTargetTest, HostsFromThePgServiceServiceAreLookedUp) {
  const std::string file = ::testing::TempDir() + "/pg_service_test.conf";
  {
    std::ofstream out(file);
    out << "[ledger]\nhost=svc.example\nport=6000\n";
  }
  auto env = NoLibpqDefaults();
  env["PGSERVICEFILE"] = file;
  env["PGSERVICE"] = "ledger";
  ScopedEnv scoped(env);
  EXPECT_THAT(PgConnectTarget("dbname=app").names(), ElementsAre("svc.example"));
  // A service the conninfo names itself is read by libpq alone: its hosts are left to it.
  EXPECT_THAT(PgConnectTarget("service=ledger dbname=app").names(), IsEmpty());
  std::remove(file.c_str());
}

}  // namespace
}  // namespace sessionledger
