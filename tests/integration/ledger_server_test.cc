// TransactionService end to end: real sessionledger-server processes (two of them where the
// issue asks for it) over the memcached and PostgreSQL of scripts/backing-services. Sessions
// come from SessionService.CreateSession, as clients get them.
#include <signal.h>

#include <atomic>
#include <functional>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/postgres/pg_pool.h"
#include "sessionledger/v1/session.grpc.pb.h"
#include "sessionledger/v1/transaction.grpc.pb.h"
#include "tests/support/server_process.h"
#include "tests/support/test_env.h"

namespace sessionledger::testing {
namespace {

namespace pb = ::sessionledger::v1;

std::string Unique() {
  static std::atomic<int> counter{0};
  std::random_device random;
  return absl::StrCat(random(), "-", counter++);
}

absl::Time Soon() { return absl::Now() + absl::Seconds(10); }

std::unique_ptr<ServerProcess> StartServer() {
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  options.env["LOG_LEVEL"] = "warn";
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

// A client of one server: a channel, stubs and helpers that attach the bearer token.
class Client {
 public:
  explicit Client(const ServerProcess& server)
      : channel_(server.NewChannel()),
        sessions_(pb::SessionService::NewStub(channel_)),
        ledger_(pb::TransactionService::NewStub(channel_)) {}

  std::string NewSession(const std::string& user_id) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    pb::CreateSessionRequest request;
    request.set_user_id(user_id);
    pb::Session session;
    grpc::Status status = sessions_->CreateSession(&context, request, &session);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return session.token();
  }

  void Prepare(grpc::ClientContext& context, const std::string& token,
               absl::Duration timeout = absl::Seconds(10)) {
    if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  }

  grpc::Status Open(const std::string& token, const std::string& currency, pb::Account* out) {
    grpc::ClientContext context;
    Prepare(context, token);
    pb::OpenAccountRequest request;
    request.set_currency(currency);
    return ledger_->OpenAccount(&context, request, out);
  }
  pb::Account MustOpen(const std::string& token, const std::string& currency = "EUR") {
    pb::Account account;
    grpc::Status status = Open(token, currency, &account);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return account;
  }
  grpc::Status Get(const std::string& token, const std::string& id, pb::Account* out) {
    grpc::ClientContext context;
    Prepare(context, token);
    pb::GetAccountRequest request;
    request.set_account_id(id);
    return ledger_->GetAccount(&context, request, out);
  }
  int64_t Balance(const std::string& token, const std::string& id) {
    pb::Account account;
    grpc::Status status = Get(token, id, &account);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return account.balance_minor();
  }
  grpc::Status Deposit(const std::string& token, const std::string& id, int64_t amount,
                       const std::string& key, pb::Transaction* out,
                       absl::Duration timeout = absl::Seconds(10)) {
    grpc::ClientContext context;
    Prepare(context, token, timeout);
    pb::DepositRequest request;
    request.set_account_id(id);
    request.set_amount_minor(amount);
    request.set_idempotency_key(key);
    return ledger_->Deposit(&context, request, out);
  }
  grpc::Status Transfer(const std::string& token, const std::string& from, const std::string& to,
                        int64_t amount, const std::string& key, pb::Transaction* out,
                        absl::Duration timeout = absl::Seconds(10)) {
    grpc::ClientContext context;
    Prepare(context, token, timeout);
    pb::TransferRequest request;
    request.set_from_account_id(from);
    request.set_to_account_id(to);
    request.set_amount_minor(amount);
    request.set_idempotency_key(key);
    return ledger_->Transfer(&context, request, out);
  }
  grpc::Status List(const std::string& token, const std::string& id, int page_size,
                    const std::string& page_token, pb::ListTransactionsResponse* out) {
    grpc::ClientContext context;
    Prepare(context, token);
    pb::ListTransactionsRequest request;
    request.set_account_id(id);
    request.set_page_size(page_size);
    request.set_page_token(page_token);
    return ledger_->ListTransactions(&context, request, out);
  }
  // Every transaction of the account, following next_page_token to the end; `between_pages`
  // runs after each page but the last.
  std::vector<pb::Transaction> ListAll(const std::string& token, const std::string& id,
                                       int page_size = 100,
                                       const std::function<void()>& between_pages = nullptr) {
    std::vector<pb::Transaction> all;
    std::string page_token;
    do {
      pb::ListTransactionsResponse page;
      grpc::Status status = List(token, id, page_size, page_token, &page);
      EXPECT_TRUE(status.ok()) << status.error_message();
      if (!status.ok()) break;
      all.insert(all.end(), page.transactions().begin(), page.transactions().end());
      page_token = page.next_page_token();
      if (!page_token.empty() && between_pages) between_pages();
    } while (!page_token.empty());
    return all;
  }
  grpc::Status DeleteSession(const std::string& token) {
    grpc::ClientContext context;
    Prepare(context, "");
    pb::DeleteSessionRequest request;
    request.set_token(token);
    pb::DeleteSessionResponse response;
    return sessions_->DeleteSession(&context, request, &response);
  }

 private:
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<pb::SessionService::Stub> sessions_;
  std::unique_ptr<pb::TransactionService::Stub> ledger_;
};

// Sum of the account's transaction rows as the API lists them: deposits and transfers in,
// minus transfers out.
int64_t SumOfRows(Client& client, const std::string& token, const std::string& id) {
  int64_t sum = 0;
  for (const pb::Transaction& t : client.ListAll(token, id, 1000)) {
    sum += t.to_account_id() == id ? t.amount_minor() : -t.amount_minor();
  }
  return sum;
}

constexpr char kMissing[] = "6d9d2f4e-8a3b-4c55-9e0f-00000000abcd";

class LedgerServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_a_ = StartServer();
    server_b_ = StartServer();
    ASSERT_NE(server_a_, nullptr);
    ASSERT_NE(server_b_, nullptr);
    a_ = std::make_unique<Client>(*server_a_);
    b_ = std::make_unique<Client>(*server_b_);
  }
  void TearDown() override {
    // The servers' logs explain most failures; show them only then.
    if (HasFailure()) {
      if (server_a_ != nullptr) std::cerr << "server A output:\n" << server_a_->Output();
      if (server_b_ != nullptr) std::cerr << "server B output:\n" << server_b_->Output();
    }
  }

  std::unique_ptr<ServerProcess> server_a_;
  std::unique_ptr<ServerProcess> server_b_;
  std::unique_ptr<Client> a_;
  std::unique_ptr<Client> b_;
};

TEST_F(LedgerServerTest, EveryMethodAndErrorCode) {
  const std::string alice = a_->NewSession("alice-" + Unique());
  const std::string bob = a_->NewSession("bob-" + Unique());
  pb::Account account;
  pb::Transaction t;

  // UNAUTHENTICATED: missing, malformed, unknown token; INVALID_ARGUMENT wins over it.
  EXPECT_EQ(a_->Open("", "EUR", &account).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(a_->Open("not-a-token", "EUR", &account).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(a_->Open("", "eur", &account).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(a_->Open(alice, "EURO", &account).error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  const pb::Account a1 = a_->MustOpen(alice);
  const pb::Account a_usd = a_->MustOpen(alice, "USD");
  const pb::Account b1 = b_->MustOpen(bob);  // Through the other server.
  EXPECT_EQ(a1.balance_minor(), 0);
  EXPECT_EQ(a1.currency(), "EUR");
  ASSERT_TRUE(b_->Get(alice, a1.account_id(), &account).ok());
  EXPECT_EQ(account.owner_user_id(), a1.owner_user_id());
  EXPECT_EQ(a_->Get(alice, kMissing, &account).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(a_->Get(alice, "", &account).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(a_->Get(alice, b1.account_id(), &account).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);

  // Deposit.
  EXPECT_EQ(a_->Deposit(alice, a1.account_id(), 0, "d1", &t).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(a_->Deposit(alice, a1.account_id(), 10, "", &t).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(a_->Deposit(alice, b1.account_id(), 10, "d1", &t).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(a_->Deposit(alice, kMissing, 10, "d1", &t).error_code(), grpc::StatusCode::NOT_FOUND);
  ASSERT_TRUE(a_->Deposit(alice, a1.account_id(), 1000, "d1", &t).ok());
  EXPECT_EQ(t.kind(), "deposit");
  EXPECT_EQ(t.from_account_id(), "");
  EXPECT_EQ(t.idempotency_key(), "d1");
  pb::Transaction replay;
  ASSERT_TRUE(b_->Deposit(alice, a1.account_id(), 1000, "d1", &replay).ok());
  EXPECT_EQ(replay.transaction_id(), t.transaction_id());
  EXPECT_EQ(a_->Deposit(alice, a1.account_id(), 1001, "d1", &replay).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(a_->Balance(alice, a1.account_id()), 1000);

  // Transfer.
  EXPECT_EQ(a_->Transfer(alice, a1.account_id(), a1.account_id(), 5, "t1", &t).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(a_->Transfer(alice, a1.account_id(), a_usd.account_id(), 5, "t1", &t).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(a_->Transfer(alice, a1.account_id(), kMissing, 5, "t1", &t).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(a_->Transfer(bob, a1.account_id(), b1.account_id(), 5, "t1", &t).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(a_->Transfer(alice, a1.account_id(), b1.account_id(), 5000, "t1", &t).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(a_->Transfer(alice, a1.account_id(), b1.account_id(), 5, "d1", &t).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);
  ASSERT_TRUE(a_->Transfer(alice, a1.account_id(), b1.account_id(), 400, "t1", &t).ok());
  EXPECT_EQ(t.kind(), "transfer");
  EXPECT_EQ(t.currency(), "EUR");
  EXPECT_EQ(a_->Balance(alice, a1.account_id()), 600);
  EXPECT_EQ(b_->Balance(bob, b1.account_id()), 400);

  // ListTransactions.
  pb::ListTransactionsResponse page;
  ASSERT_TRUE(a_->List(alice, a1.account_id(), 1, "", &page).ok());
  ASSERT_EQ(page.transactions_size(), 1);
  EXPECT_EQ(page.transactions(0).transaction_id(), t.transaction_id());
  const std::string next = page.next_page_token();
  ASSERT_FALSE(next.empty());
  ASSERT_TRUE(b_->List(alice, a1.account_id(), 1, next, &page).ok());  // Tokens work anywhere.
  ASSERT_EQ(page.transactions_size(), 1);
  EXPECT_EQ(page.transactions(0).kind(), "deposit");
  EXPECT_TRUE(page.next_page_token().empty());
  EXPECT_EQ(a_->List(alice, a_usd.account_id(), 1, next, &page).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  std::string altered = next;
  altered[3] = altered[3] == 'A' ? 'B' : 'A';
  EXPECT_EQ(a_->List(alice, a1.account_id(), 1, altered, &page).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  ASSERT_TRUE(b_->List(bob, b1.account_id(), 0, "", &page).ok());
  ASSERT_EQ(page.transactions_size(), 1);
  EXPECT_EQ(page.transactions(0).transaction_id(), t.transaction_id());
  EXPECT_EQ(page.transactions(0).idempotency_key(), "");  // Alice's key stays hers.
  EXPECT_EQ(a_->List(alice, a1.account_id(), -1, "", &page).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(a_->List(bob, a1.account_id(), 0, "", &page).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(a_->List(bob, kMissing, 0, "", &page).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(a_->List("", a1.account_id(), 0, "", &page).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);

  // A deleted session no longer authenticates, on either server.
  ASSERT_TRUE(a_->DeleteSession(bob).ok());
  EXPECT_EQ(b_->Get(bob, b1.account_id(), &account).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(LedgerServerTest, FiftyConcurrentIdenticalTransfersThroughTwoServersMoveMoneyOnce) {
  const std::string alice = a_->NewSession("alice-" + Unique());
  const pb::Account from = a_->MustOpen(alice);
  const pb::Account to = a_->MustOpen(alice);
  pb::Transaction t;
  // Funds for exactly one transfer.
  ASSERT_TRUE(a_->Deposit(alice, from.account_id(), 2500, "fund", &t).ok());
  std::vector<std::thread> threads;
  std::vector<std::string> ids(50);
  std::vector<grpc::Status> statuses(50);
  for (int i = 0; i < 50; ++i) {
    threads.emplace_back([&, i] {
      Client& client = i % 2 == 0 ? *a_ : *b_;
      pb::Transaction result;
      statuses[i] =
          client.Transfer(alice, from.account_id(), to.account_id(), 2500, "once", &result);
      ids[i] = result.transaction_id();
    });
  }
  for (auto& thread : threads) thread.join();
  for (int i = 0; i < 50; ++i) {
    EXPECT_TRUE(statuses[i].ok()) << i << ": " << statuses[i].error_message();
  }
  EXPECT_EQ(std::set<std::string>(ids.begin(), ids.end()).size(), 1u);
  EXPECT_EQ(a_->Balance(alice, from.account_id()), 0);
  EXPECT_EQ(b_->Balance(alice, to.account_id()), 2500);
  EXPECT_EQ(a_->ListAll(alice, to.account_id()).size(), 1u);
}

TEST_F(LedgerServerTest, ConservationWith4000RandomConcurrentTransfersThroughTwoServers) {
  struct Acct {
    std::string token;
    std::string id;
  };
  std::vector<Acct> accounts;
  int64_t deposited = 0;
  for (int u = 0; u < 8; ++u) {
    const std::string token = a_->NewSession(absl::StrCat("cons-", u, "-", Unique()));
    for (int k = 0; k < 4; ++k) {
      const pb::Account account = a_->MustOpen(token);
      pb::Transaction t;
      ASSERT_TRUE(
          a_->Deposit(token, account.account_id(), 5000, absl::StrCat("seed-", k), &t).ok());
      deposited += 5000;
      accounts.push_back({token, account.account_id()});
    }
  }
  constexpr int kThreads = 32;
  constexpr int kTransfers = 4000;
  std::atomic<int> next{0}, ok{0}, insufficient{0};
  std::mutex failures_mutex;
  std::vector<std::string> failures;
  std::vector<std::thread> threads;
  const absl::Time start = absl::Now();
  for (int w = 0; w < kThreads; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937 random(w * 7919);
      Client& client = w % 2 == 0 ? *a_ : *b_;
      for (int i = next++; i < kTransfers; i = next++) {
        const Acct& from = accounts[random() % accounts.size()];
        const Acct* to = &accounts[random() % accounts.size()];
        while (to->id == from.id) to = &accounts[random() % accounts.size()];
        // Amounts up to 3000 against 5000 starting balances: many transfers must fail.
        pb::Transaction t;
        grpc::Status s =
            client.Transfer(from.token, from.id, to->id, static_cast<int64_t>(random() % 3000 + 1),
                            absl::StrCat("c-", i), &t);
        if (s.ok()) {
          ++ok;
        } else if (s.error_code() == grpc::StatusCode::FAILED_PRECONDITION) {
          ++insufficient;
        } else {
          std::lock_guard<std::mutex> lock(failures_mutex);
          failures.push_back(absl::StrCat(s.error_code(), ": ", s.error_message()));
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  const absl::Duration took = absl::Now() - start;
  EXPECT_TRUE(failures.empty()) << failures.size()
                                << " unexpected failures, first: " << failures.front();
  EXPECT_EQ(ok + insufficient + static_cast<int>(failures.size()), kTransfers);
  EXPECT_GT(insufficient.load(), 0);
  EXPECT_GT(ok.load(), kTransfers / 4);
  std::cout << "4000 transfers in " << took << ": " << ok << " applied, " << insufficient
            << " refused for lack of funds\n";

  int64_t total = 0;
  for (const Acct& acct : accounts) {
    const int64_t balance = b_->Balance(acct.token, acct.id);
    EXPECT_GE(balance, 0);
    total += balance;
    EXPECT_EQ(balance, SumOfRows(*a_, acct.token, acct.id)) << acct.id;
  }
  EXPECT_EQ(total, deposited);
}

// Server A is killed while calls stream through it; every call that got no answer is retried
// through server B with its key. What this always checks: the calls in flight at the kill that
// had not committed, and those sent after it, are applied exactly once by their retry, and the
// balances and history come out exact. A call whose transfer committed but whose answer died
// with the server (the retry must then return that transaction, not apply it again) happens
// here only by chance; TransferCommittedWhileItsServerDiedIsRetriedExactly makes it happen.
TEST_F(LedgerServerTest, Kill9MidStreamThenRetriesThroughAnotherServerAreExact) {
  const std::string alice = a_->NewSession("crash-" + Unique());
  const pb::Account from = a_->MustOpen(alice);
  const pb::Account to = a_->MustOpen(alice);
  pb::Transaction t;
  ASSERT_TRUE(a_->Deposit(alice, from.account_id(), 1'000'000, "fund", &t).ok());

  constexpr int kThreads = 8;
  constexpr int kPerThread = 150;
  std::atomic<int> answered{0};
  std::mutex unanswered_mutex;
  std::vector<std::pair<std::string, int64_t>> unanswered;  // (key, amount)
  std::vector<std::thread> threads;
  for (int w = 0; w < kThreads; ++w) {
    threads.emplace_back([&, w] {
      for (int i = 0; i < kPerThread; ++i) {
        const std::string key = absl::StrCat("k-", w, "-", i);
        const int64_t amount = w * 10 + i + 1;
        pb::Transaction result;
        grpc::Status s = a_->Transfer(alice, from.account_id(), to.account_id(), amount, key,
                                      &result, absl::Seconds(3));
        if (s.ok()) {
          ++answered;
        } else {
          std::lock_guard<std::mutex> lock(unanswered_mutex);
          unanswered.emplace_back(key, amount);
        }
      }
    });
  }
  // Let the stream get going, then kill the server without any chance to clean up.
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (answered.load() < 200 && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(5));
  server_a_->Signal(SIGKILL);
  for (auto& thread : threads) thread.join();
  EXPECT_GT(unanswered.size(), 0u) << "every call was answered before the kill: none to retry";

  int64_t expected = 0;
  for (int w = 0; w < kThreads; ++w) {
    for (int i = 0; i < kPerThread; ++i) expected += w * 10 + i + 1;
  }
  for (const auto& [key, amount] : unanswered) {
    pb::Transaction result;
    grpc::Status s = b_->Transfer(alice, from.account_id(), to.account_id(), amount, key, &result);
    EXPECT_TRUE(s.ok()) << key << ": " << s.error_message();
  }
  EXPECT_EQ(b_->Balance(alice, to.account_id()), expected);
  EXPECT_EQ(b_->Balance(alice, from.account_id()), 1'000'000 - expected);
  // One row per key, none twice: the funding deposit went into `from`, so `to` holds exactly
  // the transfers.
  EXPECT_EQ(b_->ListAll(alice, to.account_id(), 1000).size(),
            static_cast<size_t>(kThreads * kPerThread));
}

// A Transfer that PostgreSQL committed but whose answer never left server A, which died first:
// the caller saw the call fail, retries it through server B with the same key, and must get
// the transaction that committed, with the money moved once. A transfer is one statement in
// autocommit (ledger_apply_movement, which locks both accounts FOR UPDATE), so a session of
// the test's own that holds the source account's row lock parks it inside PostgreSQL. Server A
// is stopped, every thread of it, before the lock is released: the statement then commits
// while A cannot read its answer, and A is killed.
// The movement may be batched with others (PgLedgerStore::RunBatch): a batch waits for its
// locks for a quarter of the call's budget, then each movement runs alone. Of this call's
// 20 s that is 5 s, far longer than the lock is held here; either way one statement commits
// the transfer, and the row it writes is what the test waits for.
TEST_F(LedgerServerTest, TransferCommittedWhileItsServerDiedIsRetriedExactly) {
  const std::string user = "lost-reply-" + Unique();
  const std::string alice = a_->NewSession(user);
  const pb::Account from = a_->MustOpen(alice);
  const pb::Account to = a_->MustOpen(alice);
  pb::Transaction t;
  ASSERT_TRUE(a_->Deposit(alice, from.account_id(), 1000, "fund", &t).ok());
  const std::string key = "lost-reply";

  const std::string url = RequiredEnv("DATABASE_URL");
  absl::StatusOr<PgConnection> watcher = PgConnection::Connect(url, Soon());
  ASSERT_TRUE(watcher.ok()) << watcher.status();
  absl::StatusOr<PgConnection> holder = PgConnection::Connect(url, Soon());
  ASSERT_TRUE(holder.ok()) << holder.status();
  ASSERT_TRUE(holder->ExecSimple("BEGIN", Soon()).ok());
  absl::StatusOr<PgResultPtr> locked = holder->Exec(
      "SELECT 1 FROM accounts WHERE account_id = $1::uuid FOR UPDATE", {from.account_id()}, Soon());
  ASSERT_TRUE(locked.ok()) << locked.status();
  ASSERT_EQ(PQntuples(locked->get()), 1);
  const std::string holder_pid = absl::StrCat(PQbackendPID(holder->raw()));

  // No ASSERT from here until the thread is joined: a joinable std::thread destroyed by an
  // early return would end the whole test binary.
  grpc::Status through_a(grpc::StatusCode::UNKNOWN, "not run");
  std::thread call([&] {
    pb::Transaction unanswered;
    through_a = a_->Transfer(alice, from.account_id(), to.account_id(), 250, key, &unanswered,
                             absl::Seconds(20));
  });
  EXPECT_TRUE(PollUntil(
      Soon(),
      [&] {
        absl::StatusOr<PgResultPtr> r = watcher->Exec(
            "SELECT count(*) FROM pg_stat_activity WHERE $1::int = ANY(pg_blocking_pids(pid))",
            {holder_pid}, Soon());
        return r.ok() && std::string(PQgetvalue(r->get(), 0, 0)) != "0";
      },
      absl::Milliseconds(5)))
      << "the transfer never waited for the held row";
  server_a_->Signal(SIGSTOP);
  EXPECT_TRUE(PollUntil(
      Soon(), [&] { return EveryThreadStopped(server_a_->pid()); }, absl::Milliseconds(1)))
      << "server A still has a running thread after SIGSTOP";
  EXPECT_TRUE(holder->ExecSimple("ROLLBACK", Soon()).ok());
  // Other sessions see the transfer's row once it has committed.
  std::string committed_id;
  EXPECT_TRUE(PollUntil(
      Soon(),
      [&] {
        absl::StatusOr<PgResultPtr> r = watcher->Exec(
            "SELECT transaction_id FROM transactions WHERE user_id = $1 AND idempotency_key = $2",
            {user, key}, Soon());
        if (!r.ok() || PQntuples(r->get()) != 1) return false;
        committed_id = PQgetvalue(r->get(), 0, 0);
        return true;
      },
      absl::Milliseconds(5)))
      << "the transfer did not commit";
  server_a_->Signal(SIGKILL);
  call.join();
  EXPECT_FALSE(through_a.ok()) << "server A answered: the answer was not lost";
  ASSERT_FALSE(committed_id.empty());

  pb::Transaction retried;
  const grpc::Status through_b =
      b_->Transfer(alice, from.account_id(), to.account_id(), 250, key, &retried);
  ASSERT_TRUE(through_b.ok()) << through_b.error_message();
  EXPECT_EQ(retried.transaction_id(), committed_id);
  EXPECT_EQ(b_->Balance(alice, from.account_id()), 750);
  EXPECT_EQ(b_->Balance(alice, to.account_id()), 250);
  int rows_of_the_key = 0;
  for (const pb::Transaction& listed : b_->ListAll(alice, from.account_id())) {
    if (listed.idempotency_key() != key) continue;
    ++rows_of_the_key;
    EXPECT_EQ(listed.transaction_id(), committed_id);
    EXPECT_EQ(listed.kind(), "transfer");
  }
  EXPECT_EQ(rows_of_the_key, 1);
  EXPECT_EQ(b_->ListAll(alice, to.account_id()).size(), 1u);
}

TEST_F(LedgerServerTest, PaginationUnderConcurrentInsertsReturnsEveryTransactionOnce) {
  const std::string alice = a_->NewSession("pages-" + Unique());
  const pb::Account acct = a_->MustOpen(alice);
  const pb::Account other = a_->MustOpen(alice);
  pb::Transaction t;
  ASSERT_TRUE(a_->Deposit(alice, acct.account_id(), 1'000'000, "fund", &t).ok());
  std::set<std::string> existing = {t.transaction_id()};
  for (int i = 0; i < 150; ++i) {
    ASSERT_TRUE(
        a_->Transfer(alice, acct.account_id(), other.account_id(), 1, absl::StrCat("pre-", i), &t)
            .ok());
    existing.insert(t.transaction_id());
  }
  std::atomic<bool> stop{false};
  std::atomic<int> committed{0};
  std::thread writer([&] {
    for (int i = 0; !stop.load(); ++i) {
      pb::Transaction w;
      if (b_->Transfer(alice, acct.account_id(), other.account_id(), 1, absl::StrCat("during-", i),
                       &w)
              .ok()) {
        committed.fetch_add(1);
      }
    }
  });
  // A new transaction commits between every two pages, whatever the two threads' timing.
  int pages_without_an_insert = 0;
  const auto await_an_insert = [&] {
    const int before = committed.load();
    if (!PollUntil(
            absl::Now() + absl::Seconds(5), [&] { return committed.load() > before; },
            absl::Milliseconds(1))) {
      ++pages_without_an_insert;
    }
  };
  std::map<std::string, int> seen;
  for (const pb::Transaction& listed : a_->ListAll(alice, acct.account_id(), 9, await_an_insert)) {
    ++seen[listed.transaction_id()];
  }
  stop = true;
  writer.join();
  EXPECT_EQ(pages_without_an_insert, 0);
  for (const auto& [id, count] : seen) EXPECT_EQ(count, 1) << id;
  for (const std::string& id : existing) EXPECT_EQ(seen.count(id), 1u) << id;
}

TEST_F(LedgerServerTest, PostgresStoppedIsUnavailableQuicklyAndRecoversWithoutRestart) {
  const std::string alice = a_->NewSession("pgdown-" + Unique());
  const pb::Account acct = a_->MustOpen(alice);
  pb::Transaction t;
  ASSERT_TRUE(a_->Deposit(alice, acct.account_id(), 10, "before", &t).ok());

  BackingServices({"stop-postgres"});
  const absl::Time start = absl::Now();
  grpc::Status down = a_->Deposit(alice, acct.account_id(), 10, "during", &t, absl::Seconds(5));
  EXPECT_EQ(down.error_code(), grpc::StatusCode::UNAVAILABLE) << down.error_message();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  pb::Account account;
  EXPECT_EQ(b_->Get(alice, acct.account_id(), &account).error_code(),
            grpc::StatusCode::UNAVAILABLE);

  BackingServices({"start-postgres"});
  grpc::Status up = a_->Deposit(alice, acct.account_id(), 10, "during", &t);
  EXPECT_TRUE(up.ok()) << up.error_message();
  EXPECT_EQ(b_->Balance(alice, acct.account_id()), 20);
}

}  // namespace
}  // namespace sessionledger::testing
