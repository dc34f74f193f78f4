// PgLedgerStore against the real PostgreSQL of scripts/backing-services (DATABASE_URL), through
// LedgerService with a fake authenticator: every rule, concurrency, timeouts and outages at the
// store level, without server processes.

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/common/clock.h"
#include "server/common/logger.h"
#include "server/common/notification.h"
#include "server/common/status_macros.h"
#include "server/domain/caller_message.h"
#include "server/ledger/fake_token_authenticator.h"
#include "server/ledger/ledger_service.h"
#include "server/postgres/migrations.h"
#include "server/postgres/pg_ledger_store.h"
#include "tests/support/step_per_read_clock.h"
#include "tests/support/test_env.h"

namespace sessionledger {
namespace {

using ::sessionledger::testing::BackingServices;
using ::sessionledger::testing::PollUntil;
using ::sessionledger::testing::RequiredEnv;

std::string UniqueSuffix() {
  static std::atomic<int> counter{0};
  std::random_device random;
  return absl::StrCat(random(), "-", counter++);
}

absl::Time Soon() { return absl::Now() + absl::Seconds(10); }

// Every call succeeded, and all of them with the same transaction (one money movement).
void ExpectOneTransaction(const std::vector<absl::StatusOr<Transaction>>& results) {
  std::set<std::string> ids;
  for (const auto& r : results) {
    ASSERT_TRUE(r.ok()) << r.status();
    ids.insert(r->transaction_id);
  }
  EXPECT_EQ(ids.size(), 1u);
}

class LedgerPgStoreTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string url = RequiredEnv("DATABASE_URL");
    Logger logger(LogLevel::kWarn);
    absl::StatusOr<PgConnection> conn = PgConnection::Connect(url, Soon());
    ASSERT_TRUE(conn.ok()) << conn.status();
    absl::StatusOr<int> version = ApplyMigrations(*conn, logger, Soon());
    ASSERT_TRUE(version.ok()) << version.status();
  }

  LedgerPgStoreTest()
      : pool_(PgPoolOptions{RequiredEnv("DATABASE_URL"), 16, absl::Seconds(2), nullptr}),
        store_(pool_),
        ledger_(store_, auth_) {}

  // A new user with a fresh token; returns the token.
  std::string NewUser(const std::string& name) {
    const std::string user = absl::StrCat(name, "-", UniqueSuffix());
    const std::string token = absl::StrCat("token-", user);
    auth_.Add(token, user);
    users_[token] = user;
    return token;
  }
  // A session of its own holding the row locks of `account_ids` (FOR UPDATE, in an open
  // transaction) until it rolls back or closes.
  absl::StatusOr<PgConnection> LockAccountRows(const std::vector<std::string>& account_ids) {
    absl::StatusOr<PgConnection> holder =
        PgConnection::Connect(RequiredEnv("DATABASE_URL"), Soon());
    if (!holder.ok()) return holder.status();
    SL_RETURN_IF_ERROR(holder->ExecSimple("BEGIN", Soon()).status());
    SL_RETURN_IF_ERROR(
        holder
            ->Exec("SELECT 1 FROM accounts WHERE account_id = ANY($1::uuid[]) FOR UPDATE",
                   {absl::StrCat("{", absl::StrJoin(account_ids, ","), "}")}, Soon())
            .status());
    return holder;
  }
  absl::StatusOr<PgConnection> LockAccountRow(const std::string& account_id) {
    return LockAccountRows({account_id});
  }

  Account Open(const std::string& token, const std::string& currency = "EUR") {
    absl::StatusOr<Account> a = ledger_.OpenAccount(token, currency, Soon());
    EXPECT_TRUE(a.ok()) << a.status();
    return a.value_or(Account{});
  }
  int64_t Balance(const std::string& token, const std::string& id) {
    absl::StatusOr<Account> a = ledger_.GetAccount(token, id, Soon());
    EXPECT_TRUE(a.ok()) << a.status();
    return a.ok() ? a->balance_minor : -1;
  }
  // SQL check of the invariants over `accounts`: balance = deposits in + transfers in -
  // transfers out, as recorded in the transaction rows.
  void ExpectBalancesMatchRows(const std::vector<std::string>& account_ids) {
    absl::StatusOr<PgPool::Lease> lease = pool_.Acquire(Soon());
    ASSERT_TRUE(lease.ok());
    for (const std::string& id : account_ids) {
      absl::StatusOr<PgResultPtr> r = (*lease)->Exec(
          "SELECT a.balance_minor, "
          "  coalesce((SELECT sum(amount_minor) FROM transactions WHERE to_account_id = "
          "a.account_id), 0)"
          "  - coalesce((SELECT sum(amount_minor) FROM transactions WHERE from_account_id = "
          "a.account_id), 0)"
          " FROM accounts a WHERE a.account_id = $1::uuid",
          {id}, Soon());
      ASSERT_TRUE(r.ok()) << r.status();
      ASSERT_EQ(PQntuples(r->get()), 1);
      EXPECT_EQ(std::string(PQgetvalue(r->get(), 0, 0)), std::string(PQgetvalue(r->get(), 0, 1)))
          << "account " << id;
    }
  }

  PgPool pool_;
  PgLedgerStore store_;
  FakeAuthenticator auth_;
  LedgerService ledger_;
  std::map<std::string, std::string> users_;
};

TEST_F(LedgerPgStoreTest, EveryMethodAndErrorCode) {
  const std::string alice = NewUser("alice");
  const std::string bob = NewUser("bob");
  const Account a = Open(alice);
  const Account a_usd = Open(alice, "USD");
  const Account b = Open(bob);
  EXPECT_EQ(a.owner_user_id, users_[alice]);
  EXPECT_EQ(a.balance_minor, 0);
  EXPECT_LT(absl::AbsDuration(a.created_at - absl::Now()), absl::Minutes(1));
  const std::string missing = "6d9d2f4e-8a3b-4c55-9e0f-000000000000";

  EXPECT_EQ(ledger_.GetAccount(alice, missing, Soon()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(ledger_.GetAccount(alice, b.account_id, Soon()).status().code(),
            absl::StatusCode::kPermissionDenied);

  absl::StatusOr<Transaction> d = ledger_.Deposit(alice, {a.account_id, 1000, "dep-1"}, Soon());
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->kind, TransactionKind::kDeposit);
  EXPECT_EQ(d->currency, "EUR");
  absl::StatusOr<Transaction> replay =
      ledger_.Deposit(alice, {a.account_id, 1000, "dep-1"}, Soon());
  ASSERT_TRUE(replay.ok()) << replay.status();
  EXPECT_EQ(replay->transaction_id, d->transaction_id);
  EXPECT_EQ(replay->created_at, d->created_at);
  EXPECT_EQ(Balance(alice, a.account_id), 1000);
  EXPECT_EQ(ledger_.Deposit(alice, {a.account_id, 999, "dep-1"}, Soon()).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(
      ledger_.Transfer(alice, {a.account_id, b.account_id, 1000, "dep-1"}, Soon()).status().code(),
      absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(ledger_.Deposit(alice, {b.account_id, 5, "dep-2"}, Soon()).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(ledger_.Deposit(alice, {missing, 5, "dep-2"}, Soon()).status().code(),
            absl::StatusCode::kNotFound);

  auto transfer = [&](const std::string& token, const std::string& from, const std::string& to,
                      int64_t amount, const std::string& key) {
    return ledger_.Transfer(token, {from, to, amount, key}, Soon());
  };
  EXPECT_EQ(transfer(alice, a.account_id, missing, 5, "t").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(transfer(alice, missing, a.account_id, 5, "t").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(transfer(bob, a.account_id, b.account_id, 5, "t").status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(transfer(alice, a.account_id, a_usd.account_id, 5, "t").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(transfer(alice, a.account_id, b.account_id, 1001, "t").status().code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(ledger_.Deposit(alice, {a.account_id, 1, "dep-3"}, Soon()).ok());
  absl::StatusOr<Transaction> t = transfer(alice, a.account_id, b.account_id, 1001, "t");
  ASSERT_TRUE(t.ok()) << t.status();  // The failed attempt left the key unused.
  EXPECT_EQ(t->from_account_id, a.account_id);
  EXPECT_EQ(Balance(alice, a.account_id), 0);
  EXPECT_EQ(Balance(bob, b.account_id), 1001);

  // Overflow of the destination.
  const Account big = Open(bob);
  ASSERT_TRUE(ledger_.Deposit(bob, {big.account_id, INT64_MAX, "max"}, Soon()).ok());
  EXPECT_EQ(ledger_.Deposit(bob, {big.account_id, 1, "over"}, Soon()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(transfer(bob, b.account_id, big.account_id, 1, "over-t").status().code(),
            absl::StatusCode::kInvalidArgument);

  absl::StatusOr<ListResult> page = ledger_.ListTransactions(alice, {a.account_id, 2, ""}, Soon());
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->transactions.size(), 2u);
  EXPECT_EQ(page->transactions[0].transaction_id, t->transaction_id);
  EXPECT_EQ(page->transactions[0].idempotency_key, "t");
  page = ledger_.ListTransactions(alice, {a.account_id, 2, page->next_page_token}, Soon());
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->transactions.size(), 1u);
  EXPECT_EQ(page->transactions[0].transaction_id, d->transaction_id);
  EXPECT_TRUE(page->next_page_token.empty());
  EXPECT_EQ(ledger_.ListTransactions(bob, {a.account_id, 0, ""}, Soon()).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(ledger_.ListTransactions(bob, {missing, 0, ""}, Soon()).status().code(),
            absl::StatusCode::kNotFound);
  ExpectBalancesMatchRows({a.account_id, a_usd.account_id, b.account_id, big.account_id});
}

TEST_F(LedgerPgStoreTest, ConcurrentIdenticalTransfersMoveMoneyOnce) {
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  const Account b = Open(alice);
  // Exactly enough for one transfer: a second application would fail for lack of funds, and
  // must instead be answered with the first one's transaction.
  ASSERT_TRUE(ledger_.Deposit(alice, {a.account_id, 700, "fund"}, Soon()).ok());
  std::vector<std::thread> threads;
  std::vector<absl::StatusOr<Transaction>> results(50, absl::UnknownError("not run"));
  for (int i = 0; i < 50; ++i) {
    threads.emplace_back([&, i] {
      results[i] = ledger_.Transfer(alice, {a.account_id, b.account_id, 700, "same-key"}, Soon());
    });
  }
  for (auto& t : threads) t.join();
  ExpectOneTransaction(results);
  EXPECT_EQ(Balance(alice, a.account_id), 0);
  EXPECT_EQ(Balance(alice, b.account_id), 700);
}

TEST_F(LedgerPgStoreTest, ConservationUnderConcurrentRandomTransfers) {
  std::vector<std::string> tokens;
  std::vector<std::pair<std::string, std::string>> accounts;  // (token, id)
  int64_t deposited = 0;
  for (int u = 0; u < 8; ++u) {
    tokens.push_back(NewUser("user"));
    for (int k = 0; k < 4; ++k) {
      const Account acc = Open(tokens.back());
      accounts.emplace_back(tokens.back(), acc.account_id);
      ASSERT_TRUE(
          ledger_.Deposit(tokens.back(), {acc.account_id, 1000, absl::StrCat("seed-", k)}, Soon())
              .ok());
      deposited += 1000;
    }
  }
  std::atomic<int> ok{0}, insufficient{0}, other{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < 16; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937 random(w);
      for (int i = 0; i < 125; ++i) {
        const auto& from = accounts[random() % accounts.size()];
        const auto& to = accounts[random() % accounts.size()];
        if (from.second == to.second) continue;
        absl::StatusOr<Transaction> r =
            ledger_.Transfer(from.first,
                             {from.second, to.second, static_cast<int64_t>(random() % 700 + 1),
                              absl::StrCat("w", w, "-", i)},
                             Soon());
        if (r.ok()) {
          ++ok;
        } else if (r.status().code() == absl::StatusCode::kFailedPrecondition) {
          ++insufficient;
        } else {
          ++other;
          ADD_FAILURE() << r.status();
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_GT(ok.load(), 0);
  EXPECT_EQ(other.load(), 0);
  int64_t total = 0;
  std::vector<std::string> ids;
  for (const auto& [token, id] : accounts) {
    const int64_t balance = Balance(token, id);
    EXPECT_GE(balance, 0);
    total += balance;
    ids.push_back(id);
  }
  EXPECT_EQ(total, deposited);
  ExpectBalancesMatchRows(ids);
}

TEST_F(LedgerPgStoreTest, PaginationUnderConcurrentInsertsIsExactlyOnce) {
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  const Account b = Open(alice);
  ASSERT_TRUE(ledger_.Deposit(alice, {a.account_id, 1'000'000, "fund"}, Soon()).ok());
  std::set<std::string> before;
  for (int i = 0; i < 120; ++i) {
    absl::StatusOr<Transaction> t =
        ledger_.Transfer(alice, {a.account_id, b.account_id, 1, absl::StrCat("pre-", i)}, Soon());
    ASSERT_TRUE(t.ok()) << t.status();
    before.insert(t->transaction_id);
  }
  std::atomic<bool> stop{false};
  std::atomic<int> committed{0};
  std::thread writer([&] {
    for (int i = 0; !stop.load(); ++i) {
      // Both directions, so new rows land on both of the account's indexes.
      const bool out = i % 2 == 0;
      if (ledger_
              .Transfer(alice,
                        {out ? a.account_id : b.account_id, out ? b.account_id : a.account_id, 1,
                         absl::StrCat("during-", i)},
                        Soon())
              .ok()) {
        committed.fetch_add(1);
      }
    }
  });
  std::map<std::string, int> seen;
  std::string token;
  int pages_without_an_insert = 0;
  do {
    absl::StatusOr<ListResult> page =
        ledger_.ListTransactions(alice, {a.account_id, 7, token}, Soon());
    if (!page.ok()) {
      ADD_FAILURE() << page.status();
      break;
    }
    for (const Transaction& t : page->transactions) ++seen[t.transaction_id];
    token = page->next_page_token;
    // A new transaction commits between every two pages, whatever the two threads' timing.
    const int before = committed.load();
    if (!token.empty() && !PollUntil(
                              absl::Now() + absl::Seconds(5),
                              [&] { return committed.load() > before; }, absl::Milliseconds(1))) {
      ++pages_without_an_insert;
    }
  } while (!token.empty());
  stop = true;
  writer.join();
  EXPECT_EQ(pages_without_an_insert, 0);
  for (const auto& [id, count] : seen) EXPECT_EQ(count, 1) << id;
  for (const std::string& id : before) EXPECT_EQ(seen.count(id), 1u) << id;
}

// An account's history is newest first, and its times say so too: a transfer that waited for
// a lock while a deposit into the same account committed is newer than the deposit, though its
// database transaction began first.
TEST_F(LedgerPgStoreTest, HistoryTimesNeverGoBackwards) {
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  const Account b = Open(alice);
  // The transfer locks its accounts in account_id order: held at the first, it has locked
  // nothing yet, and a deposit into the second goes through meanwhile.
  const Account& first = a.account_id < b.account_id ? a : b;
  const Account& second = a.account_id < b.account_id ? b : a;
  ASSERT_TRUE(ledger_.Deposit(alice, {first.account_id, 10, "fund"}, Soon()).ok());
  absl::StatusOr<PgConnection> holder = LockAccountRow(first.account_id);
  ASSERT_TRUE(holder.ok()) << holder.status();
  absl::StatusOr<PgResultPtr> holder_pid = holder->ExecSimple("SELECT pg_backend_pid()", Soon());
  ASSERT_TRUE(holder_pid.ok()) << holder_pid.status();
  const std::string pid = PQgetvalue(holder_pid->get(), 0, 0);

  absl::StatusOr<PgConnection> watcher = PgConnection::Connect(RequiredEnv("DATABASE_URL"), Soon());
  ASSERT_TRUE(watcher.ok()) << watcher.status();

  absl::StatusOr<Transaction> transfer = absl::UnknownError("not run");
  std::thread waiting_transfer([&] {
    transfer = ledger_.Transfer(alice, {first.account_id, second.account_id, 5, "waits"}, Soon());
  });
  bool blocked = false;
  for (int i = 0; i < 500 && !blocked; ++i) {
    absl::StatusOr<PgResultPtr> r = watcher->Exec(
        "SELECT count(*) FROM pg_stat_activity WHERE $1::int = ANY(pg_blocking_pids(pid))", {pid},
        Soon());
    if (!r.ok()) {
      ADD_FAILURE() << r.status();
      break;
    }
    blocked = std::string(PQgetvalue(r->get(), 0, 0)) != "0";
    if (!blocked) absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_TRUE(blocked) << "the transfer never waited for the held row";
  const absl::StatusOr<Transaction> deposit =
      ledger_.Deposit(alice, {second.account_id, 7, "meanwhile"}, Soon());
  EXPECT_TRUE(deposit.ok()) << deposit.status();
  EXPECT_TRUE(holder->ExecSimple("ROLLBACK", Soon()).ok());
  waiting_transfer.join();
  ASSERT_TRUE(transfer.ok()) << transfer.status();

  absl::StatusOr<ListResult> history =
      ledger_.ListTransactions(alice, {second.account_id, 10, ""}, Soon());
  ASSERT_TRUE(history.ok()) << history.status();
  ASSERT_EQ(history->transactions.size(), 2u);
  EXPECT_EQ(history->transactions[0].transaction_id, transfer->transaction_id);
  EXPECT_EQ(history->transactions[1].transaction_id, deposit->transaction_id);
  EXPECT_GE(history->transactions[0].created_at, history->transactions[1].created_at)
      << "the transfer carries a time from before the deposit it follows";
}

TEST_F(LedgerPgStoreTest, SlowPostgresGivesUnavailableWithinTheDeadline) {
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  const Account b = Open(alice);
  ASSERT_TRUE(ledger_.Deposit(alice, {a.account_id, 10, "fund"}, Soon()).ok());
  // Another session holds the source row lock, so the transfer waits until its
  // statement_timeout (derived from the deadline) cancels it.
  absl::StatusOr<PgConnection> blocker = PgConnection::Connect(RequiredEnv("DATABASE_URL"), Soon());
  ASSERT_TRUE(blocker.ok());
  ASSERT_TRUE(blocker->ExecSimple("BEGIN", Soon()).ok());
  ASSERT_TRUE(blocker
                  ->Exec("SELECT 1 FROM accounts WHERE account_id = $1::uuid FOR UPDATE",
                         {a.account_id}, Soon())
                  .ok());
  const int connections_before = pool_.open_connections();
  const absl::Time start = absl::Now();
  // Long enough for the 200 ms PostgreSQL gets to report its own timeout before ours, as in
  // production, so a loaded machine does not turn the test into a race.
  const absl::Time deadline = start + absl::Milliseconds(1500);
  absl::StatusOr<Transaction> t =
      ledger_.Transfer(alice, {a.account_id, b.account_id, 5, "slow"}, deadline);
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(t.status().code(), absl::StatusCode::kUnavailable) << t.status();
  // PostgreSQL cancelled the statement itself (query_canceled), so the connection came back to
  // the pool. Had the client's own deadline ended the wait instead, it would have closed the
  // connection: that is what this tells apart from a lost statement_timeout.
  EXPECT_EQ(SqlStateOf(t.status()), "57014") << t.status();
  EXPECT_EQ(pool_.open_connections(), connections_before)
      << "the connection was dropped rather than its statement cancelled by PostgreSQL";
  // Cancelled near the deadline, not after the lock is released; the slack absorbs sanitized
  // builds on a loaded machine. Nor long before it: PostgreSQL gets all but 200 ms of what is
  // left, so the statement cannot end before 1.3 s, and a budget cut short (say, to half) would
  // fail calls that wait briefly on a busy account at a fraction of their deadline.
  EXPECT_LE(took, absl::Milliseconds(2000));
  EXPECT_GE(took, absl::Milliseconds(1100));
  ASSERT_TRUE(blocker->ExecSimple("ROLLBACK", Soon()).ok());
  // The key stayed unused and the pool's connection is still good.
  absl::StatusOr<Transaction> retry =
      ledger_.Transfer(alice, {a.account_id, b.account_id, 5, "slow"}, Soon());
  EXPECT_TRUE(retry.ok()) << retry.status();
  EXPECT_EQ(Balance(alice, b.account_id), 5);
}

// LedgerStore allows a call without a deadline (InfiniteFuture), as the service tests make.
// statement_timeout stops at INT32_MAX ms; a longer one failed every such call (22023).
TEST_F(LedgerPgStoreTest, ACallWithoutADeadlineRuns) {
  const absl::Time none = absl::InfiniteFuture();
  const std::string alice = NewUser("alice");
  absl::StatusOr<Account> from = ledger_.OpenAccount(alice, "EUR", none);
  ASSERT_TRUE(from.ok()) << from.status();
  const Account to = Open(alice);
  absl::StatusOr<Transaction> deposit =
      ledger_.Deposit(alice, {from->account_id, 100, "no-deadline-1"}, none);
  EXPECT_TRUE(deposit.ok()) << deposit.status();
  absl::StatusOr<Transaction> transfer =
      ledger_.Transfer(alice, {from->account_id, to.account_id, 40, "no-deadline-2"}, none);
  EXPECT_TRUE(transfer.ok()) << transfer.status();
  absl::StatusOr<Account> read = ledger_.GetAccount(alice, from->account_id, none);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->balance_minor, 60);
}

// The ledger relies on READ COMMITTED; a connection whose transactions start at another level
// is refused with the setting's name and its value.
TEST(PgTransactionIsolationTest, OnlyReadCommittedPasses) {
  absl::StatusOr<PgConnection> conn = PgConnection::Connect(RequiredEnv("DATABASE_URL"), Soon());
  ASSERT_TRUE(conn.ok()) << conn.status();
  EXPECT_TRUE(CheckTransactionIsolation(*conn, Soon()).ok());
  ASSERT_TRUE(
      conn->ExecSimple("SET default_transaction_isolation = 'read uncommitted'", Soon()).ok());
  EXPECT_TRUE(CheckTransactionIsolation(*conn, Soon()).ok()) << "runs as READ COMMITTED";
  for (const std::string level : {"repeatable read", "serializable"}) {
    ASSERT_TRUE(
        conn->ExecSimple(absl::StrCat("SET default_transaction_isolation = '", level, "'"), Soon())
            .ok());
    const absl::Status refused = CheckTransactionIsolation(*conn, Soon());
    EXPECT_TRUE(absl::IsFailedPrecondition(refused)) << refused;
    EXPECT_THAT(std::string(refused.message()),
                ::testing::AllOf(::testing::HasSubstr("default_transaction_isolation"),
                                 ::testing::HasSubstr(level)));
  }
  ASSERT_TRUE(
      conn->ExecSimple("SET default_transaction_isolation = 'read committed'", Soon()).ok());
  EXPECT_TRUE(CheckTransactionIsolation(*conn, Soon()).ok());
}

// A connection's waits run on the steady clock: a wall-clock step back while PostgreSQL keeps
// it waiting does not stretch them (they used to reread the wall clock on every poll, and so
// waited for as long as the step). The server here is a socket that never answers.
TEST(PgConnectionTest, AWallClockStepBackDoesNotStretchAWait) {
  std::optional<testing::SilentListener> listener;
  listener.emplace(/*backlog=*/4);
  ASSERT_NE(listener->port(), 0);
  const std::string url =
      absl::StrCat("postgres://nobody@127.0.0.1:", listener->port(), "/none?sslmode=disable");

  struct Outcome {
    SteppingClock wall;
    Notification done;
    absl::Status status;
    absl::Duration took;
  };
  auto outcome = std::make_shared<Outcome>();
  const absl::Duration wait = absl::Seconds(1);
  // Detached, so that a wait that does stretch fails the test instead of hanging it.
  std::thread([outcome, url, wait] {
    const absl::Time start = absl::Now();
    absl::StatusOr<PgConnection> conn =
        PgConnection::Connect(url, outcome->wall.Now() + wait, &outcome->wall);
    outcome->status = conn.status();
    outcome->took = absl::Now() - start;
    outcome->done.Notify();
  }).detach();
  absl::SleepFor(absl::Milliseconds(200));
  outcome->wall.Step(-absl::Hours(1));
  const bool answered = outcome->done.WaitForNotificationWithTimeout(wait + absl::Seconds(5));
  listener.reset();  // Resets the connection, so a stretched wait ends too.
  ASSERT_TRUE(answered) << "still waiting 5 s after the deadline";
  EXPECT_TRUE(absl::IsUnavailable(outcome->status)) << outcome->status;
  EXPECT_GE(outcome->took, wait - absl::Milliseconds(50));
  EXPECT_LE(outcome->took, wait + absl::Milliseconds(1500));
}

TEST_F(LedgerPgStoreTest, PostgresDownIsUnavailableAndRecoversWithoutRestart) {
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  // Warm the pool so it holds connections that the restart will kill.
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(ledger_.GetAccount(alice, a.account_id, Soon()).ok());

  BackingServices({"stop-postgres"});
  const absl::Time start = absl::Now();
  absl::StatusOr<Transaction> down =
      ledger_.Deposit(alice, {a.account_id, 5, "while-down"}, absl::Now() + absl::Seconds(5));
  EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable) << down.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  EXPECT_EQ(ledger_.GetAccount(alice, a.account_id, absl::Now() + absl::Seconds(5)).status().code(),
            absl::StatusCode::kUnavailable);

  BackingServices({"start-postgres"});
  // No restart of anything on our side: the first call after PostgreSQL is back succeeds.
  absl::StatusOr<Transaction> up = ledger_.Deposit(alice, {a.account_id, 5, "while-down"}, Soon());
  EXPECT_TRUE(up.ok()) << up.status();
  EXPECT_EQ(Balance(alice, a.account_id), 5);
}

// A ledger over a store of its own, whose batching a test shapes, on `connections`
// connections, reading deadlines against `wall_clock` (absl::Now() when null).
struct BatchingLedger {
  BatchingLedger(int connections, const PgLedgerStoreOptions& options,
                 TokenAuthenticator& authenticator, const Clock* wall_clock = nullptr)
      : pool(PgPoolOptions{RequiredEnv("DATABASE_URL"), connections, absl::Seconds(2), nullptr,
                           wall_clock}),
        store(pool, options),
        ledger(store, authenticator) {}
  PgPool pool;
  PgLedgerStore store;
  LedgerService ledger;
};

// Threads a test starts, joined when the test ends (before the stores and the results they
// write go away, even when an assertion returns early) or when it says so.
class TestThreads {
 public:
  ~TestThreads() { JoinAll(); }
  void Start(std::function<void()> work) { threads_.emplace_back(std::move(work)); }
  void JoinAll() {
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

 private:
  std::vector<std::thread> threads_;
};

// One batch at a time, of up to four movements.
PgLedgerStoreOptions OneBatchAtATime() {
  PgLedgerStoreOptions options;
  options.max_batch = 4;
  options.max_concurrent_batches = 1;
  options.eager_batches = 1;
  options.parallel_batch_threshold = 100;
  return options;
}

// Runs `call` on one of `threads`; returns once `queued` movements wait in `store`'s queue.
void StartQueued(TestThreads& threads, const PgLedgerStore& store, int queued,
                 std::function<void()> call) {
  threads.Start(std::move(call));
  const absl::Time give_up = Soon();
  while (store.queued_movements() < queued) {
    ASSERT_LT(absl::Now(), give_up) << "the movement did not queue";
    absl::SleepFor(absl::Milliseconds(1));
  }
}

// The batching path of PgLedgerStore, on a store whose pool has one connection, so that it runs
// at most one batch at a time: while a "gate" movement holds that slot (waiting on a row lock
// another session holds), the movements started next queue up, and they all form the next
// batch when the gate opens. That makes the batch's composition and order deterministic.
class LedgerPgBatchTest : public LedgerPgStoreTest {
 protected:
  LedgerPgBatchTest()
      : small_pool_(PgPoolOptions{RequiredEnv("DATABASE_URL"), 1, absl::Seconds(2), nullptr}),
        batch_store_(small_pool_),
        batch_ledger_(batch_store_, auth_) {}

  ~LedgerPgBatchTest() override {
    for (auto& t : threads_) t.join();
  }

  // Backend pids of the sessions blocked by `conn`'s session.
  int BlockedBy(PgConnection& conn) {
    absl::StatusOr<PgPool::Lease> lease = pool_.Acquire(Soon());
    EXPECT_TRUE(lease.ok());
    if (!lease.ok()) return -1;
    absl::StatusOr<PgResultPtr> r = (*lease)->Exec(
        "SELECT count(*) FROM pg_stat_activity WHERE $1::int = ANY(pg_blocking_pids(pid))",
        {absl::StrCat(PQbackendPID(conn.raw()))}, Soon());
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? std::atoi(PQgetvalue(r->get(), 0, 0)) : -1;
  }
  void WaitUntilBlockedBy(PgConnection& conn, int sessions) {
    const absl::Time give_up = Soon();
    while (BlockedBy(conn) < sessions) {
      ASSERT_LT(absl::Now(), give_up) << "nobody waits on the blocking session";
      absl::SleepFor(absl::Milliseconds(5));
    }
  }
  // Waits until `sessions` sessions wait on `conn`'s session, directly or behind another waiter
  // (a second session waiting for a row lock queues behind the first, not behind the holder).
  void WaitUntilQueuedBehind(PgConnection& conn, int sessions) {
    const absl::Time give_up = Soon();
    for (;;) {
      absl::StatusOr<PgPool::Lease> lease = pool_.Acquire(Soon());
      ASSERT_TRUE(lease.ok()) << lease.status();
      absl::StatusOr<PgResultPtr> r = (*lease)->Exec(
          "WITH RECURSIVE behind(pid) AS ("
          "  SELECT pid FROM pg_stat_activity WHERE $1::int = ANY(pg_blocking_pids(pid))"
          "  UNION SELECT a.pid FROM pg_stat_activity a"
          "  JOIN behind b ON b.pid = ANY(pg_blocking_pids(a.pid)))"
          " SELECT count(*) FROM behind",
          {absl::StrCat(PQbackendPID(conn.raw()))}, Soon());
      ASSERT_TRUE(r.ok()) << r.status();
      if (std::atoi(PQgetvalue(r->get(), 0, 0)) >= sessions) return;
      ASSERT_LT(absl::Now(), give_up) << "fewer than " << sessions << " sessions queued";
      absl::SleepFor(absl::Milliseconds(5));
    }
  }
  // Waits until no session waits on `conn`'s locks any more.
  void WaitUntilNobodyWaitsOn(PgConnection& conn) {
    const absl::Time give_up = Soon();
    while (BlockedBy(conn) > 0) {
      ASSERT_LT(absl::Now(), give_up) << "a session still waits on the blocking session";
      absl::SleepFor(absl::Milliseconds(5));
    }
  }

  // Runs `call` on a thread; returns once `queued` movements wait in batch_store_'s queue.
  void Start(std::function<void()> call, int queued) {
    threads_.emplace_back(std::move(call));
    const absl::Time give_up = Soon();
    while (batch_store_.queued_movements() < queued) {
      ASSERT_LT(absl::Now(), give_up) << "the movement did not queue";
      absl::SleepFor(absl::Milliseconds(1));
    }
  }

  // Occupies the store's only batch slot: a deposit into a fresh account of `token` waits on
  // that account's row lock, held by `blocker` until OpenGate().
  void CloseGate(const std::string& token, absl::Time deadline = Soon()) {
    const Account gate = Open(token);
    absl::StatusOr<PgConnection> blocker = LockAccountRow(gate.account_id);
    ASSERT_TRUE(blocker.ok()) << blocker.status();
    blocker_.emplace(*std::move(blocker));
    threads_.emplace_back([this, token, gate, deadline] {
      gate_result_ = batch_ledger_.Deposit(token, {gate.account_id, 1, "gate"}, deadline);
    });
    WaitUntilBlockedBy(*blocker_, 1);
  }
  void OpenGate() { ASSERT_TRUE(blocker_->ExecSimple("ROLLBACK", Soon()).ok()); }
  void JoinAll() {
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

  PgPool small_pool_;
  PgLedgerStore batch_store_;
  LedgerService batch_ledger_;
  std::optional<PgConnection> blocker_;
  absl::StatusOr<Transaction> gate_result_ = absl::UnknownError("not run");
  std::vector<std::thread> threads_;
};

// PostgreSQL's statement_timeout is what lets a statement stuck behind a lock end before the
// call's deadline, so that the connection goes back to the pool whole; the deadline itself can
// only break the connection. The budget must be what is left once a connection is ours: a call
// that spent most of its deadline waiting for one still needs PostgreSQL to give up first.
TEST_F(LedgerPgBatchTest, ACallThatWaitedForAConnectionGivesPostgresOnlyWhatIsLeft) {
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  absl::StatusOr<PgConnection> blocker = LockAccountRow(a.account_id);
  ASSERT_TRUE(blocker.ok()) << blocker.status();
  // The pool's only connection, held for half of the call's three seconds.
  std::optional<PgPool::Lease> held;
  {
    absl::StatusOr<PgPool::Lease> lease = small_pool_.Acquire(Soon());
    ASSERT_TRUE(lease.ok()) << lease.status();
    held.emplace(*std::move(lease));
  }
  ASSERT_EQ(small_pool_.open_connections(), 1);
  std::thread release([&] {
    absl::SleepFor(absl::Milliseconds(1500));
    held.reset();
  });
  const absl::Time start = absl::Now();
  const absl::StatusOr<Transaction> late =
      batch_ledger_.Deposit(alice, {a.account_id, 1, "late"}, start + absl::Seconds(3));
  const absl::Duration took = absl::Now() - start;
  release.join();
  EXPECT_EQ(late.status().code(), absl::StatusCode::kUnavailable) << late.status();
  // All of what was left, but 200 ms: it ends near 2.8 s however late the connection came.
  EXPECT_GE(took, absl::Milliseconds(2600)) << "PostgreSQL was given less than was left";
  EXPECT_EQ(small_pool_.open_connections(), 1)
      << "the call's deadline broke the connection: PostgreSQL was given more time than was left";
  ASSERT_TRUE(blocker->ExecSimple("ROLLBACK", Soon()).ok());
  EXPECT_EQ(Balance(alice, a.account_id), 0);
}

// After a failover a pooled connection may lead to the old primary, now read-only (SQLSTATE
// 25006): that connection is replaced and the call retried on a new one, which finds a
// writable server; the caller never sees INTERNAL.
TEST_F(LedgerPgBatchTest, AConnectionToAReadOnlyServerIsReplaced) {
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  const auto pooled_connection_turns_read_only = [&] {
    absl::StatusOr<PgPool::Lease> lease = small_pool_.Acquire(Soon());
    ASSERT_TRUE(lease.ok()) << lease.status();
    ASSERT_TRUE((*lease)->ExecSimple("SET default_transaction_read_only = on", Soon()).ok());
  };
  pooled_connection_turns_read_only();
  absl::StatusOr<Transaction> deposit =
      batch_ledger_.Deposit(alice, {a.account_id, 5, "after-failover"}, Soon());
  EXPECT_TRUE(deposit.ok()) << deposit.status();
  EXPECT_EQ(Balance(alice, a.account_id), 5);
  // OpenAccount is not idempotent, but a read-only server refused it before doing anything.
  pooled_connection_turns_read_only();
  absl::StatusOr<Account> opened = batch_ledger_.OpenAccount(alice, "EUR", Soon());
  EXPECT_TRUE(opened.ok()) << opened.status();
  absl::StatusOr<PgPool::Lease> lease = small_pool_.Acquire(Soon());
  ASSERT_TRUE(lease.ok()) << lease.status();
  absl::StatusOr<PgResultPtr> mode =
      (*lease)->Exec("SELECT current_setting('default_transaction_read_only')", {}, Soon());
  ASSERT_TRUE(mode.ok()) << mode.status();
  EXPECT_STREQ(PQgetvalue(mode->get(), 0, 0), "off") << "the read-only connection is still pooled";
}

// After a failover every pooled connection leads to the old primary: the retry must not take
// another of them, or the call fails again with the same read-only error.
TEST_F(LedgerPgStoreTest, AfterAFailoverNoPooledConnectionIsReusedForTheRetry) {
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  const auto every_pooled_connection_turns_read_only = [&] {
    std::vector<PgPool::Lease> leases;
    for (int i = 0; i < 4; ++i) {
      absl::StatusOr<PgPool::Lease> lease = pool_.Acquire(Soon());
      ASSERT_TRUE(lease.ok()) << lease.status();
      ASSERT_TRUE((*lease)->ExecSimple("SET default_transaction_read_only = on", Soon()).ok());
      leases.push_back(*std::move(lease));
    }
    leases.clear();
    ASSERT_EQ(pool_.idle_connections(), pool_.open_connections());
    ASSERT_GE(pool_.idle_connections(), 4);
  };
  every_pooled_connection_turns_read_only();
  absl::StatusOr<Transaction> deposit =
      ledger_.Deposit(alice, {a.account_id, 5, "after-failover-all"}, Soon());
  EXPECT_TRUE(deposit.ok()) << deposit.status();
  EXPECT_EQ(Balance(alice, a.account_id), 5);
  every_pooled_connection_turns_read_only();
  absl::StatusOr<Account> opened = ledger_.OpenAccount(alice, "EUR", Soon());
  EXPECT_TRUE(opened.ok()) << opened.status();
  std::vector<PgPool::Lease> every_idle_one;
  for (int idle = pool_.idle_connections(); idle > 0; --idle) {
    absl::StatusOr<PgPool::Lease> lease = pool_.Acquire(Soon());
    ASSERT_TRUE(lease.ok()) << lease.status();
    absl::StatusOr<PgResultPtr> mode =
        (*lease)->Exec("SELECT current_setting('default_transaction_read_only')", {}, Soon());
    ASSERT_TRUE(mode.ok()) << mode.status();
    EXPECT_STREQ(PQgetvalue(mode->get(), 0, 0), "off") << "a read-only connection is still pooled";
    every_idle_one.push_back(*std::move(lease));
  }
}

// Failures that are the database's trouble rather than the call's are UNAVAILABLE, which
// clients retry, never INTERNAL: a read-only server and a lock_timeout among them.
TEST_F(LedgerPgStoreTest, DatabaseTroubleIsUnavailable) {
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  absl::StatusOr<PgConnection> conn = PgConnection::Connect(RequiredEnv("DATABASE_URL"), Soon());
  ASSERT_TRUE(conn.ok()) << conn.status();
  ASSERT_TRUE(conn->ExecSimple("SET default_transaction_read_only = on", Soon()).ok());
  absl::StatusOr<PgResultPtr> write =
      conn->Exec("UPDATE accounts SET balance_minor = balance_minor WHERE account_id = $1::uuid",
                 {a.account_id}, Soon());
  EXPECT_EQ(write.status().code(), absl::StatusCode::kUnavailable) << write.status();
  EXPECT_EQ(SqlStateOf(write.status()), "25006");
  EXPECT_TRUE(NeedsFreshConnection(write.status()));

  absl::StatusOr<PgConnection> holder = LockAccountRow(a.account_id);
  ASSERT_TRUE(holder.ok()) << holder.status();
  ASSERT_TRUE(conn->ExecSimple("SET default_transaction_read_only = off", Soon()).ok());
  ASSERT_TRUE(conn->ExecSimple("SET lock_timeout = '20ms'", Soon()).ok());
  absl::StatusOr<PgResultPtr> locked = conn->Exec(
      "SELECT 1 FROM accounts WHERE account_id = $1::uuid FOR UPDATE", {a.account_id}, Soon());
  EXPECT_EQ(locked.status().code(), absl::StatusCode::kUnavailable) << locked.status();
  EXPECT_EQ(SqlStateOf(locked.status()), "55P03");
  EXPECT_FALSE(NeedsFreshConnection(locked.status()));
  ASSERT_TRUE(holder->ExecSimple("ROLLBACK", Soon()).ok());
}

// A constraint of the schema is the domain rules' backstop. What PostgreSQL says of it names
// tables, columns and values: the log reads it, the caller gets words of its own.
TEST_F(LedgerPgStoreTest, AConstraintsWordsAreForTheLog) {
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  absl::StatusOr<PgConnection> conn = PgConnection::Connect(RequiredEnv("DATABASE_URL"), Soon());
  ASSERT_TRUE(conn.ok()) << conn.status();
  absl::StatusOr<PgResultPtr> negative = conn->Exec(
      "UPDATE accounts SET balance_minor = -1 WHERE account_id = $1::uuid", {a.account_id}, Soon());
  EXPECT_EQ(negative.status().code(), absl::StatusCode::kFailedPrecondition) << negative.status();
  EXPECT_EQ(SqlStateOf(negative.status()), "23514");
  EXPECT_EQ(CallerMessage(negative.status()).value_or(""), kRefusedByAConstraint);
  EXPECT_TRUE(absl::StrContains(negative.status().message(), "accounts")) << negative.status();
  EXPECT_EQ(Balance(alice, a.account_id), 0);
}

// A transaction that loses to concurrent ones (40001/40P01) runs again a bounded number of
// times. When they are used up the call is ABORTED, a conflict the caller may retry; when its
// deadline comes first, the database was too busy for it: UNAVAILABLE, with PostgreSQL's words
// for the log. A trigger that always answers 40001 for one owner makes both deterministic.
TEST_F(LedgerPgStoreTest, AConflictThatNeverResolvesIsAbortedOrUnavailableByItsDeadline) {
  const std::string owner = absl::StrCat("always-conflicting-", UniqueSuffix());
  const std::string name = absl::StrCat("test_always_conflicting_", std::random_device{}());
  absl::StatusOr<PgConnection> admin = PgConnection::Connect(RequiredEnv("DATABASE_URL"), Soon());
  ASSERT_TRUE(admin.ok()) << admin.status();
  // DDL takes no parameters; both names are made here, of digits, letters, '-' and '_'.
  ASSERT_TRUE(admin
                  ->ExecSimple(absl::StrCat("CREATE FUNCTION ", name,
                                            "() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                                            "RAISE EXCEPTION 'a conflict that never resolves' "
                                            "USING ERRCODE = 'serialization_failure'; END $$"),
                               Soon())
                  .ok());
  ASSERT_TRUE(admin
                  ->ExecSimple(absl::StrCat("CREATE TRIGGER ", name,
                                            " BEFORE INSERT ON accounts FOR EACH ROW WHEN "
                                            "(NEW.owner_user_id = '",
                                            owner, "') EXECUTE FUNCTION ", name, "()"),
                               Soon())
                  .ok());
  struct DropTrigger {
    PgConnection& admin;
    const std::string& name;
    ~DropTrigger() {
      EXPECT_TRUE(
          admin.ExecSimple(absl::StrCat("DROP TRIGGER IF EXISTS ", name, " ON accounts"), Soon())
              .ok());
      EXPECT_TRUE(
          admin.ExecSimple(absl::StrCat("DROP FUNCTION IF EXISTS ", name, "()"), Soon()).ok());
    }
  } drop_trigger{*admin, name};

  const int64_t retries_before = store_.retries();
  absl::StatusOr<Account> aborted = store_.CreateAccount(owner, "EUR", Soon());
  EXPECT_EQ(aborted.status().code(), absl::StatusCode::kAborted) << aborted.status();
  EXPECT_TRUE(absl::StartsWith(aborted.status().message(), "request: ")) << aborted.status();
  EXPECT_EQ(store_.retries() - retries_before, 5) << "the default is five runs";

  // So many runs allowed that the deadline ends them: each one after the first waits up to
  // 2-32 ms first, so 300 ms cannot hold the 1,000,000.
  PgLedgerStoreOptions patient;
  patient.max_attempts = 1000000;
  PgLedgerStore patient_store(pool_, patient);
  const absl::Time start = absl::Now();
  absl::StatusOr<Account> unavailable =
      patient_store.CreateAccount(owner, "EUR", start + absl::Milliseconds(300));
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(unavailable.status().code(), absl::StatusCode::kUnavailable) << unavailable.status();
  // Between two runs it says so, with the last conflict's words; during one, the run's own
  // timeout speaks. Either is for the log only.
  EXPECT_TRUE(absl::StartsWith(unavailable.status().message(), "postgres: "))
      << unavailable.status();
  EXPECT_FALSE(CallerMessage(unavailable.status()).has_value())
      << "PostgreSQL's words are not for callers";
  EXPECT_GT(patient_store.retries(), 5);
  // Ends at its deadline, not later; the slack absorbs sanitized builds on a loaded machine.
  EXPECT_LE(took, absl::Milliseconds(800));
}

TEST_F(LedgerPgBatchTest, EachMovementOfABatchGetsTheSinglePathsAnswer) {
  const std::string alice = NewUser("alice");
  const std::string bob = NewUser("bob");
  const Account a1 = Open(alice);
  const Account a2 = Open(alice);
  const Account b1 = Open(bob);
  ASSERT_TRUE(ledger_.Deposit(alice, {a1.account_id, 1000, "fund"}, Soon()).ok());
  const std::string missing = "6d9d2f4e-8a3b-4c55-9e0f-000000000000";

  CloseGate(alice);
  const int64_t batches = batch_store_.batches();
  const int64_t batched = batch_store_.batched_movements();
  constexpr int kMovements = 9;
  std::vector<absl::StatusOr<Transaction>> r(kMovements, absl::UnknownError("not run"));
  auto transfer = [&](int i, const std::string& token, const std::string& from,
                      const std::string& to, int64_t amount, const std::string& key) {
    Start(
        [&, i, token, from, to, amount, key] {
          r[i] = batch_ledger_.Transfer(token, {from, to, amount, key}, Soon());
        },
        i + 1);
  };
  // In this order in one transaction, each sees the effects of those before it.
  transfer(0, alice, a1.account_id, b1.account_id, 600, "k1");  // applied
  transfer(1, alice, a1.account_id, b1.account_id, 600, "k2");  // 400 left: insufficient
  transfer(2, alice, a1.account_id, a2.account_id, 400, "k3");  // applied, a1 empty
  transfer(3, alice, a1.account_id, b1.account_id, 600, "k1");  // replay of 0
  transfer(4, alice, a1.account_id, b1.account_id, 5, "k1");    // key used otherwise
  Start([&] { r[5] = batch_ledger_.Deposit(alice, {a2.account_id, 100, "d1"}, Soon()); }, 6);
  transfer(6, bob, a1.account_id, b1.account_id, 1, "k6");      // not bob's account
  transfer(7, alice, a2.account_id, missing, 1, "k7");          // no such account
  transfer(8, alice, a2.account_id, a1.account_id, 450, "k8");  // 400 + 100 in a2: applied
  OpenGate();
  JoinAll();

  ASSERT_TRUE(gate_result_.ok()) << gate_result_.status();
  EXPECT_EQ(batch_store_.batches(), batches + 1) << "the 9 movements were not one batch";
  EXPECT_EQ(batch_store_.batched_movements(), batched + kMovements);
  EXPECT_EQ(batch_store_.batch_fallbacks(), 0);
  ASSERT_TRUE(r[0].ok()) << r[0].status();
  EXPECT_EQ(r[1].status().code(), absl::StatusCode::kFailedPrecondition) << r[1].status();
  EXPECT_TRUE(r[2].ok()) << r[2].status();
  ASSERT_TRUE(r[3].ok()) << r[3].status();
  EXPECT_EQ(r[3]->transaction_id, r[0]->transaction_id);
  EXPECT_EQ(r[3]->created_at, r[0]->created_at);
  EXPECT_EQ(r[4].status().code(), absl::StatusCode::kAlreadyExists) << r[4].status();
  EXPECT_TRUE(r[5].ok()) << r[5].status();
  EXPECT_EQ(r[6].status().code(), absl::StatusCode::kPermissionDenied) << r[6].status();
  EXPECT_EQ(r[7].status().code(), absl::StatusCode::kNotFound) << r[7].status();
  EXPECT_TRUE(r[8].ok()) << r[8].status();
  EXPECT_EQ(Balance(alice, a1.account_id), 450);
  EXPECT_EQ(Balance(alice, a2.account_id), 50);
  EXPECT_EQ(Balance(bob, b1.account_id), 600);
  // The refused key stayed unused.
  EXPECT_TRUE(
      batch_ledger_.Transfer(alice, {a1.account_id, b1.account_id, 450, "k2"}, Soon()).ok());
  ExpectBalancesMatchRows({a1.account_id, a2.account_id, b1.account_id});
}

TEST_F(LedgerPgBatchTest, SameKeyManyTimesInOneBatchAppliesOnce) {
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  const Account b = Open(alice);
  // Enough for exactly one transfer, as in ConcurrentIdenticalTransfersMoveMoneyOnce.
  ASSERT_TRUE(ledger_.Deposit(alice, {a.account_id, 700, "fund"}, Soon()).ok());
  CloseGate(alice);
  const int64_t batches = batch_store_.batches();
  constexpr int kCalls = 12;
  std::vector<absl::StatusOr<Transaction>> r(kCalls, absl::UnknownError("not run"));
  for (int i = 0; i < kCalls; ++i) {
    Start(
        [&, i] {
          r[i] = batch_ledger_.Transfer(alice, {a.account_id, b.account_id, 700, "same"}, Soon());
        },
        i + 1);
  }
  OpenGate();
  JoinAll();
  EXPECT_EQ(batch_store_.batches(), batches + 1);
  ExpectOneTransaction(r);
  EXPECT_EQ(Balance(alice, a.account_id), 0);
  EXPECT_EQ(Balance(alice, b.account_id), 700);
}

// Two identical transfers, each run alone (never batched), that both looked their key up before
// the first of them committed: the second then finds the money gone. Its answer must be the
// first one's transaction, which it finds by looking the key up again, not a refusal for lack
// of funds that the caller would take for the outcome of its request.
TEST_F(LedgerPgBatchTest, AnIdenticalTransferThatCommittedMeanwhileIsTheAnswerNotARefusal) {
  PgLedgerStoreOptions alone_options;
  alone_options.max_batch = 1;
  PgLedgerStore alone_store(pool_, alone_options);
  LedgerService alone_ledger(alone_store, auth_);
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  const Account b = Open(alice);
  ASSERT_TRUE(ledger_.Deposit(alice, {a.account_id, 700, "fund"}, Soon()).ok());
  absl::StatusOr<PgConnection> blocker = LockAccountRow(a.account_id);
  ASSERT_TRUE(blocker.ok()) << blocker.status();

  std::vector<absl::StatusOr<Transaction>> results(2, absl::UnknownError("not run"));
  TestThreads threads;  // Joined before the store it calls goes away.
  for (auto& result : results) {
    threads.Start([&] {
      result = alone_ledger.Transfer(alice, {a.account_id, b.account_id, 700, "same-key"}, Soon());
    });
  }
  WaitUntilQueuedBehind(*blocker, 2);  // Both past their key lookup, waiting for the account.
  if (HasFatalFailure()) return;
  ASSERT_TRUE(blocker->ExecSimple("ROLLBACK", Soon()).ok());
  threads.JoinAll();
  ExpectOneTransaction(results);
  EXPECT_EQ(alone_store.batches(), 0) << "ran in a batch, not alone";
  EXPECT_EQ(Balance(alice, a.account_id), 0);
  EXPECT_EQ(Balance(alice, b.account_id), 700);
}

TEST_F(LedgerPgBatchTest, KeyRaceWithAnotherTransactionIsAnsweredAsAlone) {
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  const Account b = Open(alice);
  const Account c = Open(alice);
  ASSERT_TRUE(ledger_.Deposit(alice, {a.account_id, 1000, "fund"}, Soon()).ok());
  ASSERT_TRUE(ledger_.Transfer(alice, {a.account_id, b.account_id, 10, "model"}, Soon()).ok());
  CloseGate(alice);
  // Another transaction records the key "raced" for the same parameters (the model's
  // fingerprint) and stays open, so the batch's insert of that key has to wait for it.
  absl::StatusOr<PgConnection> other = PgConnection::Connect(RequiredEnv("DATABASE_URL"), Soon());
  ASSERT_TRUE(other.ok());
  ASSERT_TRUE(other->ExecSimple("BEGIN", Soon()).ok());
  absl::StatusOr<PgResultPtr> raced = other->Exec(
      "INSERT INTO transactions (transaction_id, kind, from_account_id, to_account_id, "
      "amount_minor, currency, user_id, idempotency_key, request_fingerprint) "
      "SELECT gen_random_uuid(), kind, from_account_id, to_account_id, amount_minor, currency, "
      "user_id, 'raced', request_fingerprint FROM transactions "
      "WHERE user_id = $1 AND idempotency_key = 'model' RETURNING transaction_id",
      {users_[alice]}, Soon());
  ASSERT_TRUE(raced.ok()) << raced.status();
  const std::string raced_id = PQgetvalue(raced->get(), 0, 0);

  const int64_t batches = batch_store_.batches();
  absl::StatusOr<Transaction> racing = absl::UnknownError("not run");
  absl::StatusOr<Transaction> plain = absl::UnknownError("not run");
  Start(
      [&] {
        racing = batch_ledger_.Transfer(alice, {a.account_id, b.account_id, 10, "raced"}, Soon());
      },
      1);
  Start(
      [&] {
        plain = batch_ledger_.Transfer(alice, {a.account_id, c.account_id, 20, "plain"}, Soon());
      },
      2);
  OpenGate();
  WaitUntilBlockedBy(*other, 1);
  ASSERT_TRUE(other->ExecSimple("COMMIT", Soon()).ok());
  JoinAll();
  EXPECT_EQ(batch_store_.batches(), batches + 1);
  EXPECT_EQ(batch_store_.batch_fallbacks(), 0);
  ASSERT_TRUE(racing.ok()) << racing.status();
  EXPECT_EQ(racing->transaction_id, raced_id);  // The winner's, as a replay.
  EXPECT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(Balance(alice, a.account_id), 1000 - 10 - 20);  // "raced" itself moved nothing.
  EXPECT_EQ(Balance(alice, c.account_id), 20);
}

TEST_F(LedgerPgBatchTest, BatchThatFailsAsAWholeRunsEachMovementAlone) {
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  const Account b = Open(alice);
  const Account held = Open(alice);
  ASSERT_TRUE(ledger_.Deposit(alice, {a.account_id, 1000, "fund"}, Soon()).ok());
  ASSERT_TRUE(ledger_.Deposit(alice, {held.account_id, 1000, "fund-held"}, Soon()).ok());
  // The gate gives up first (its statement_timeout), then the batch behind it waits on the
  // same lock until the earliest deadline in it (`stuck`'s) cancels the whole transaction.
  // Generous windows: the gate, the lock and the four queued movements must all be in place
  // before the gate gives up, which under a sanitizer on a busy machine takes a while.
  const absl::Time start = absl::Now();
  CloseGate(alice, start + absl::Seconds(2));
  ASSERT_TRUE(blocker_
                  ->Exec("SELECT 1 FROM accounts WHERE account_id = $1::uuid FOR UPDATE",
                         {held.account_id}, Soon())
                  .ok());
  const int64_t fallbacks = batch_store_.batch_fallbacks();
  const int64_t batches = batch_store_.batches();
  absl::StatusOr<Transaction> stuck = absl::UnknownError("not run");
  std::vector<absl::StatusOr<Transaction>> ok(3, absl::UnknownError("not run"));
  Start(
      [&] {
        stuck = batch_ledger_.Transfer(alice, {held.account_id, b.account_id, 5, "stuck"},
                                       start + absl::Seconds(4));
      },
      1);
  for (int i = 0; i < 3; ++i) {
    Start(
        [&, i] {
          ok[i] = batch_ledger_.Transfer(
              alice, {a.account_id, b.account_id, 100, absl::StrCat("ok", i)}, Soon());
        },
        i + 2);
  }
  // The batch: the three good transfers only commit after their fallback, alone.
  const absl::Time give_up = Soon();
  while (batch_store_.batch_fallbacks() == fallbacks && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  JoinAll();
  // A caller whose deadline passed first drops its connection, but PostgreSQL still runs what
  // was sent (up to the COMMIT) until its statement_timeout, a little later: an UNAVAILABLE
  // answer can still commit, which the idempotency key makes safe to retry. On a loaded machine
  // the stuck transfer's statement can outlive its caller that way; releasing the lock under
  // it would let it commit, so wait for it to time out first.
  WaitUntilNobodyWaitsOn(*blocker_);
  OpenGate();
  EXPECT_EQ(gate_result_.status().code(), absl::StatusCode::kUnavailable) << gate_result_.status();
  EXPECT_EQ(batch_store_.batch_fallbacks(), fallbacks + 1);
  EXPECT_EQ(batch_store_.batches(), batches);
  EXPECT_EQ(stuck.status().code(), absl::StatusCode::kUnavailable) << stuck.status();
  for (const auto& t : ok) EXPECT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(Balance(alice, a.account_id), 700);
  EXPECT_EQ(Balance(alice, b.account_id), 300);
  EXPECT_EQ(Balance(alice, held.account_id), 1000);
  // The stuck one's key stayed unused; the others replay.
  EXPECT_TRUE(
      batch_ledger_.Transfer(alice, {held.account_id, b.account_id, 5, "stuck"}, Soon()).ok());
  absl::StatusOr<Transaction> again =
      batch_ledger_.Transfer(alice, {a.account_id, b.account_id, 100, "ok0"}, Soon());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->transaction_id, ok[0]->transaction_id);
  ExpectBalancesMatchRows({a.account_id, b.account_id, held.account_id});
}

// A batch locks every account of its movements first. When one of them is held by something
// else, the movements that do not need it must not wait for it until the batch's deadline (and
// then run alone with a fifth of their time left): the lock gets a quarter of the batch's
// budget, then each movement runs alone.
TEST_F(LedgerPgBatchTest, ABatchGivesUpOnAHeldAccountWithMostOfItsTimeLeft) {
  // Connections for the movements to run alone side by side.
  BatchingLedger shaped(5, OneBatchAtATime(), auth_);
  PgLedgerStore& store = shaped.store;
  LedgerService& ledger = shaped.ledger;
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  const Account b = Open(alice);
  const Account held = Open(alice);
  const Account gate = Open(alice);
  ASSERT_TRUE(ledger_.Deposit(alice, {a.account_id, 1000, "fund"}, Soon()).ok());
  absl::StatusOr<PgConnection> blocker = LockAccountRows({gate.account_id, held.account_id});
  ASSERT_TRUE(blocker.ok()) << blocker.status();
  const absl::Time start = absl::Now();
  const absl::Time deadline = start + absl::Seconds(6);
  absl::StatusOr<Transaction> gated = absl::UnknownError("not run");
  absl::StatusOr<Transaction> stuck = absl::UnknownError("not run");
  std::vector<absl::StatusOr<Transaction>> free(3, absl::UnknownError("not run"));
  // When each free transfer finished (Unix nanoseconds; 0 while it runs), read while they run.
  std::vector<std::atomic<int64_t>> finished(3);
  TestThreads threads;
  // The only batch slot, taken until its deadline (a second) passes; meanwhile the others queue.
  threads.Start([&] {
    gated = ledger.Deposit(alice, {gate.account_id, 1, "gate"}, start + absl::Seconds(1));
  });
  WaitUntilBlockedBy(*blocker, 1);
  StartQueued(threads, store, 1, [&] {
    stuck = ledger.Deposit(alice, {held.account_id, 5, "stuck"}, deadline);
  });
  for (int i = 0; i < 3; ++i) {
    StartQueued(threads, store, i + 2, [&, i] {
      free[i] = ledger.Transfer(alice, {a.account_id, b.account_id, 100, absl::StrCat("free", i)},
                                deadline);
      finished[i].store(absl::ToUnixNanos(absl::Now()));
    });
  }
  // Then let the stuck deposit through: alone, it waits on its account with time to spare.
  const absl::Time give_up = Soon();
  while (std::any_of(finished.begin(), finished.end(), [](auto& t) { return t.load() == 0; }) &&
         absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_TRUE(blocker->ExecSimple("ROLLBACK", Soon()).ok());
  threads.JoinAll();
  EXPECT_EQ(gated.status().code(), absl::StatusCode::kUnavailable) << gated.status();
  EXPECT_TRUE(stuck.ok()) << stuck.status();
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(free[i].ok()) << free[i].status();
    // The batch started when the gate gave up, ~0.8 s in, with ~5 s of budget: its lock may
    // wait a quarter of that, so these finish ~2 s in; with the whole budget, ~5.8 s in.
    const absl::Time finished_at = absl::FromUnixNanos(finished[i].load());
    EXPECT_LT(finished_at, start + absl::Seconds(4))
        << "free transfer " << i << " waited " << (finished_at - start)
        << " for an account it does not use";
  }
  EXPECT_EQ(store.batch_fallbacks(), 1);
  EXPECT_EQ(Balance(alice, a.account_id), 700);
  EXPECT_EQ(Balance(alice, b.account_id), 300);
  EXPECT_EQ(Balance(alice, held.account_id), 5);
}

// A batch answers all its movements at once, so it must end by the earliest of their
// deadlines: a hurried caller batched with a patient one that waits on a held account gets its
// answer in its own time, not when the patient one's budget runs out.
TEST_F(LedgerPgBatchTest, ABatchEndsByItsEarliestDeadline) {
  BatchingLedger shaped(3, OneBatchAtATime(), auth_);
  const std::string alice = NewUser("alice");
  const Account held = Open(alice);
  const Account gate = Open(alice);
  const Account free = Open(alice);
  // Two blockers: the gate opens when the test says so, whatever the machine's pace, and the
  // held account stays held until the hurried deposit has its answer.
  absl::StatusOr<PgConnection> gate_blocker = LockAccountRow(gate.account_id);
  ASSERT_TRUE(gate_blocker.ok()) << gate_blocker.status();
  absl::StatusOr<PgConnection> held_blocker = LockAccountRow(held.account_id);
  ASSERT_TRUE(held_blocker.ok()) << held_blocker.status();
  absl::StatusOr<Transaction> gated = absl::UnknownError("not run");
  absl::StatusOr<Transaction> patient = absl::UnknownError("not run");
  absl::StatusOr<Transaction> hurried = absl::UnknownError("not run");
  // Unix nanoseconds; 0 until set.
  std::atomic<int64_t> hurried_deadline{0};
  std::atomic<int64_t> hurried_finished{0};
  TestThreads threads;
  // The only batch slot, taken until the gate opens; meanwhile the others queue.
  threads.Start([&] {
    gated = shaped.ledger.Deposit(alice, {gate.account_id, 1, "gate"}, Soon());
  });
  WaitUntilBlockedBy(*gate_blocker, 1);
  if (HasFatalFailure()) return;
  StartQueued(threads, shaped.store, 1, [&] {
    patient = shaped.ledger.Deposit(alice, {held.account_id, 5, "patient"},
                                    absl::Now() + absl::Seconds(20));
  });
  if (HasFatalFailure()) return;
  StartQueued(threads, shaped.store, 2, [&] {
    const absl::Time deadline = absl::Now() + absl::Seconds(3);
    hurried_deadline.store(absl::ToUnixNanos(deadline));
    hurried = shaped.ledger.Deposit(alice, {free.account_id, 7, "hurried"}, deadline);
    hurried_finished.store(absl::ToUnixNanos(absl::Now()));
  });
  if (HasFatalFailure()) return;
  const absl::Time opened = absl::Now();
  ASSERT_TRUE(gate_blocker->ExecSimple("ROLLBACK", Soon()).ok());
  // Taking the patient deadline, the batch's lock would wait ~5 s for the held account.
  const absl::Time give_up = opened + absl::Seconds(10);
  while (hurried_finished.load() == 0 && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_TRUE(held_blocker->ExecSimple("ROLLBACK", Soon()).ok());
  threads.JoinAll();
  EXPECT_TRUE(gated.ok()) << gated.status();
  EXPECT_TRUE(patient.ok()) << patient.status();
  EXPECT_TRUE(hurried.ok()) << hurried.status();
  ASSERT_NE(hurried_finished.load(), 0);
  const absl::Time finished_at = absl::FromUnixNanos(hurried_finished.load());
  EXPECT_LT(finished_at, absl::FromUnixNanos(hurried_deadline.load()))
      << "answered " << (finished_at - opened) << " after the gate opened";
  EXPECT_EQ(shaped.store.batch_fallbacks(), 1) << "the two did not run as one batch";
  EXPECT_EQ(Balance(alice, free.account_id), 7);
  EXPECT_EQ(Balance(alice, held.account_id), 5);
}

TEST_F(LedgerPgBatchTest, ABatchStuckOnALockHoldsOthersBackOnlyUntilEnoughQueue) {
  // Three batch slots, two of them eager; the third batch starts once 2 movements wait.
  PgLedgerStoreOptions options;
  options.max_batch = 4;
  options.eager_batches = 2;
  options.parallel_batch_threshold = 2;
  BatchingLedger shaped(3, options, auth_);
  PgLedgerStore& store = shaped.store;
  LedgerService& ledger = shaped.ledger;
  const std::string alice = NewUser("alice");
  const Account held = Open(alice);
  const Account held2 = Open(alice);
  const Account a = Open(alice);
  const Account b = Open(alice);
  ASSERT_TRUE(ledger_.Deposit(alice, {a.account_id, 1000, "fund"}, Soon()).ok());
  absl::StatusOr<PgConnection> blocker = LockAccountRows({held.account_id, held2.account_id});
  ASSERT_TRUE(blocker.ok()) << blocker.status();
  absl::StatusOr<Transaction> stuck = absl::UnknownError("not run");
  absl::StatusOr<Transaction> stuck2 = absl::UnknownError("not run");
  std::atomic<int> done{0};
  std::vector<absl::StatusOr<Transaction>> r(2, absl::UnknownError("not run"));
  TestThreads threads;
  threads.Start([&] { stuck = ledger.Deposit(alice, {held.account_id, 1, "stuck"}, Soon()); });
  WaitUntilBlockedBy(*blocker, 1);
  threads.Start([&] { stuck2 = ledger.Deposit(alice, {held2.account_id, 1, "stuck2"}, Soon()); });
  WaitUntilBlockedBy(*blocker, 2);  // Both eager batches are stuck.
  auto transfer = [&](int i) {
    threads.Start([&, i] {
      r[i] = ledger.Transfer(alice, {a.account_id, b.account_id, 10, absl::StrCat("t", i)}, Soon());
      ++done;
    });
  };
  transfer(0);
  const absl::Time give_up = Soon();
  while (store.queued_movements() < 1) {
    ASSERT_LT(absl::Now(), give_up);
    absl::SleepFor(absl::Milliseconds(1));
  }
  // One movement waiting is not enough to start a third batch beside the stuck ones.
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(store.queued_movements(), 1);
  EXPECT_EQ(done.load(), 0);
  transfer(1);
  while (done.load() < 2) {
    ASSERT_LT(absl::Now(), give_up) << "the queued movements waited for the stuck batch";
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_TRUE(r[0].ok()) << r[0].status();
  EXPECT_TRUE(r[1].ok()) << r[1].status();
  EXPECT_EQ(store.batches(), 1);
  EXPECT_EQ(store.batched_movements(), 2);
  ASSERT_TRUE(blocker->ExecSimple("ROLLBACK", Soon()).ok());
  threads.JoinAll();
  EXPECT_TRUE(stuck.ok()) << stuck.status();  // Through once the locks went.
  EXPECT_TRUE(stuck2.ok()) << stuck2.status();
}

// Many callers moving money both ways between a few accounts (crossing pairs, the classic
// deadlock) through few batch slots: batches form, nothing deadlocks, money is conserved.
TEST_F(LedgerPgStoreTest, CrossingTransfersInBatchesConserveMoneyWithoutDeadlocks) {
  PgPool pool(PgPoolOptions{RequiredEnv("DATABASE_URL"), 2, absl::Seconds(2), nullptr});
  PgLedgerStore store(pool, PgLedgerStoreOptions{8, 0});
  LedgerService ledger(store, auth_);
  std::vector<std::pair<std::string, std::string>> accounts;  // (token, id)
  for (int u = 0; u < 4; ++u) {
    const std::string token = NewUser("cross");
    const Account acc = Open(token);
    ASSERT_TRUE(ledger_.Deposit(token, {acc.account_id, 10'000, "seed"}, Soon()).ok());
    accounts.emplace_back(token, acc.account_id);
  }
  std::atomic<int> ok{0}, insufficient{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < 24; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937 random(w);
      for (int i = 0; i < 40; ++i) {
        const size_t from = random() % accounts.size();
        const size_t to = (from + 1 + random() % (accounts.size() - 1)) % accounts.size();
        absl::StatusOr<Transaction> r = ledger.Transfer(
            accounts[from].first,
            {accounts[from].second, accounts[to].second, static_cast<int64_t>(random() % 3000 + 1),
             absl::StrCat("x", w, "-", i)},
            Soon());
        if (r.ok()) {
          ++ok;
        } else if (r.status().code() == absl::StatusCode::kFailedPrecondition) {
          ++insufficient;
        } else {
          ADD_FAILURE() << r.status();
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_GT(ok.load(), 0);
  EXPECT_GT(store.batches(), 0) << "no batch ever carried more than one movement";
  EXPECT_GT(store.batched_movements(), store.batches());
  // Every account is locked in one order, by batches and single movements alike: a deadlock
  // (40P01) would have failed a batch as a whole or forced a retry.
  EXPECT_EQ(store.batch_fallbacks(), 0);
  EXPECT_EQ(store.retries(), 0);
  int64_t total = 0;
  std::vector<std::string> ids;
  for (const auto& [token, id] : accounts) {
    const int64_t balance = Balance(token, id);
    EXPECT_GE(balance, 0);
    total += balance;
    ids.push_back(id);
  }
  EXPECT_EQ(total, 40'000);
  ExpectBalancesMatchRows(ids);
  std::cout << "batches " << store.batches() << ", movements in them " << store.batched_movements()
            << ", ok " << ok << ", insufficient " << insufficient << "\n";
}

// Every store call reads its deadline against the wall clock once, when it comes in, and times
// the rest (the wait for a connection, statement_timeout, the wait for PostgreSQL's answer) on
// the steady clock. A second reading here would be an hour on and take the deadline for passed.
TEST_F(LedgerPgStoreTest, AWallClockStepDuringACallDoesNotEndIt) {
  testing::StepPerReadClock clock(absl::Hours(1));
  BatchingLedger clocked(2, PgLedgerStoreOptions{}, auth_, &clock);
  const std::string alice = NewUser("alice");
  const Account other = Open(alice);
  const auto in_5s = [] { return absl::Now() + absl::Seconds(5); };

  clock.Reset();
  absl::StatusOr<Account> opened = clocked.ledger.OpenAccount(alice, "EUR", in_5s());
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(clock.reads(), 1) << "OpenAccount reads the wall clock once";
  clock.Reset();
  absl::StatusOr<Transaction> deposit =
      clocked.ledger.Deposit(alice, {opened->account_id, 10, "clock-deposit"}, in_5s());
  ASSERT_TRUE(deposit.ok()) << deposit.status();
  EXPECT_EQ(clock.reads(), 1) << "Deposit reads the wall clock once";
  clock.Reset();
  absl::StatusOr<Transaction> transfer = clocked.ledger.Transfer(
      alice, {opened->account_id, other.account_id, 4, "clock-transfer"}, in_5s());
  ASSERT_TRUE(transfer.ok()) << transfer.status();
  EXPECT_EQ(clock.reads(), 1) << "Transfer reads the wall clock once";
  clock.Reset();
  absl::StatusOr<Account> read = clocked.ledger.GetAccount(alice, opened->account_id, in_5s());
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->balance_minor, 6);
  EXPECT_EQ(clock.reads(), 1) << "GetAccount reads the wall clock once";
  clock.Reset();
  absl::StatusOr<ListResult> listed =
      clocked.ledger.ListTransactions(alice, {opened->account_id, 10, ""}, in_5s());
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->transactions.size(), 2u);
  EXPECT_EQ(clock.reads(), 1) << "ListTransactions reads the wall clock once";
}

// A batch's leader runs the others' movements by the deadlines their callers read, without
// reading the wall clock again for them. Whether batches form depends on timing, so rounds of
// concurrent deposits run until one has: a test in which none formed would prove nothing.
TEST_F(LedgerPgStoreTest, BatchedMovementsReadTheWallClockOncePerCall) {
  testing::StepPerReadClock clock(absl::ZeroDuration());
  BatchingLedger clocked(2, PgLedgerStoreOptions{}, auth_, &clock);
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  constexpr int kCalls = 16;
  constexpr int kMaxRounds = 20;
  int deposited = 0;
  for (int round = 0; round < kMaxRounds && clocked.store.batched_movements() == 0; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    std::vector<absl::StatusOr<Transaction>> results(kCalls, absl::UnknownError("not run"));
    clock.Reset();
    {
      TestThreads threads;
      for (int i = 0; i < kCalls; ++i) {
        threads.Start([&, i] {
          results[i] = clocked.ledger.Deposit(
              alice, {a.account_id, 1, absl::StrCat("clock-batch-", round, "-", i)}, Soon());
        });
      }
    }
    for (const auto& r : results) EXPECT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(clock.reads(), kCalls);
    deposited += kCalls;
  }
  EXPECT_GT(clocked.store.batched_movements(), 0)
      << "no batch formed in " << kMaxRounds << " rounds: the leader's path never ran";
  EXPECT_EQ(Balance(alice, a.account_id), deposited);
}

// A transfer waiting on a row lock while the wall clock steps back an hour still ends by its
// 2 s deadline: its statement_timeout and its wait for the answer come from the deadline as read
// when it came in. (Read again after the step, they would have let it wait an hour.)
TEST_F(LedgerPgStoreTest, AWallClockStepBackDoesNotStretchAWaitForARowLock) {
  testing::StepPerReadClock clock(-absl::Hours(1));
  BatchingLedger clocked(2, PgLedgerStoreOptions{}, auth_, &clock);
  const std::string alice = NewUser("alice");
  const Account a = Open(alice);
  const Account b = Open(alice);
  ASSERT_TRUE(ledger_.Deposit(alice, {a.account_id, 10, "fund"}, Soon()).ok());
  absl::StatusOr<PgConnection> blocker = LockAccountRow(a.account_id);
  ASSERT_TRUE(blocker.ok()) << blocker.status();

  clock.Reset();
  absl::StatusOr<Transaction> t = absl::UnknownError("not answered");
  absl::Duration took;
  Notification answered;
  std::thread call([&] {
    const absl::Time start = absl::Now();
    t = clocked.ledger.Transfer(alice, {a.account_id, b.account_id, 5, "stepped-back"},
                                start + absl::Seconds(2));
    took = absl::Now() - start;
    answered.Notify();
  });
  // Should the call wait past its deadline, the lock goes anyway, so that it ends (and fails
  // the checks below) instead of holding the test for the hour.
  const bool in_time = answered.WaitForNotificationWithTimeout(absl::Seconds(5));
  EXPECT_TRUE(blocker->ExecSimple("ROLLBACK", Soon()).ok());
  call.join();
  EXPECT_TRUE(in_time) << "the transfer outlived its deadline";
  EXPECT_EQ(t.status().code(), absl::StatusCode::kUnavailable) << t.status();
  // The slack absorbs sanitized builds on a loaded machine.
  EXPECT_LE(took, absl::Seconds(3));
  EXPECT_EQ(clock.reads(), 1) << "the wall clock is read once per call";
}

}  // namespace
}  // namespace sessionledger
