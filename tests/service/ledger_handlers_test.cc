// TransactionHandlers over a real gRPC server in this process (in-process channel), with the
// in-memory store and a fake authenticator: metadata parsing, proto mapping, status codes.
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>

#include <algorithm>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/common/clock.h"
#include "server/ledger/fake_token_authenticator.h"
#include "server/ledger/in_memory_ledger_store.h"
#include "server/ledger/late_bound_authenticator.h"
#include "server/rpc/transaction_handlers.h"

namespace sessionledger {
namespace {

namespace pb = ::sessionledger::v1;

// Passes every call to `inner`, noting the latest deadline it was given.
class DeadlineRecordingStore final : public LedgerStore {
 public:
  explicit DeadlineRecordingStore(LedgerStore& inner) : inner_(inner) {}

  absl::StatusOr<Account> CreateAccount(absl::string_view owner_user_id, absl::string_view currency,
                                        absl::Time deadline) override {
    Note(deadline);
    return inner_.CreateAccount(owner_user_id, currency, deadline);
  }
  absl::StatusOr<Account> GetAccount(absl::string_view account_id, absl::Time deadline) override {
    Note(deadline);
    return inner_.GetAccount(account_id, deadline);
  }
  absl::StatusOr<Transaction> ApplyMovement(const MoneyMovement& movement,
                                            absl::Time deadline) override {
    Note(deadline);
    return inner_.ApplyMovement(movement, deadline);
  }
  absl::StatusOr<TransactionPage> ListTransactions(absl::string_view acting_user_id,
                                                   absl::string_view account_id, int64_t before_seq,
                                                   int limit, absl::Time deadline) override {
    Note(deadline);
    return inner_.ListTransactions(acting_user_id, account_id, before_seq, limit, deadline);
  }

  // The latest deadline given since the last call of this (InfinitePast: no call).
  absl::Time TakeLatestDeadline() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(latest_, absl::InfinitePast());
  }

 private:
  void Note(absl::Time deadline) {
    std::lock_guard<std::mutex> lock(mutex_);
    latest_ = std::max(latest_, deadline);
  }

  LedgerStore& inner_;
  std::mutex mutex_;
  absl::Time latest_ = absl::InfinitePast();
};

// A default call timeout far longer than the 5 s the calls here wait, so that which of the two
// reached the store shows.
constexpr absl::Duration kDefaultCallTimeout = absl::Seconds(60);

class LedgerHandlersTest : public ::testing::Test {
 protected:
  LedgerHandlersTest()
      : memory_(clock_), store_(memory_), handlers_(store_, auth_, kDefaultCallTimeout) {
    auth_.Add("tok-alice", "alice");
    grpc::ServerBuilder builder;
    builder.RegisterService(&handlers_);
    server_ = builder.BuildAndStart();
    stub_ = pb::TransactionService::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
  }
  ~LedgerHandlersTest() override { server_->Shutdown(); }

  std::unique_ptr<grpc::ClientContext> Context(const std::string& authorization) {
    auto context = std::make_unique<grpc::ClientContext>();
    if (!authorization.empty()) context->AddMetadata("authorization", authorization);
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    return context;
  }

  // Two EUR accounts of alice's.
  void OpenTwoEuroAccounts(pb::Account* a, pb::Account* b) {
    pb::OpenAccountRequest open;
    open.set_currency("EUR");
    ASSERT_TRUE(stub_->OpenAccount(Context("Bearer tok-alice").get(), open, a).ok());
    ASSERT_TRUE(stub_->OpenAccount(Context("Bearer tok-alice").get(), open, b).ok());
  }

  FakeClock clock_;
  FakeAuthenticator auth_;
  InMemoryLedgerStore memory_;
  DeadlineRecordingStore store_;
  TransactionHandlers handlers_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<pb::TransactionService::Stub> stub_;
};

TEST_F(LedgerHandlersTest, BearerMetadata) {
  pb::OpenAccountRequest request;
  request.set_currency("EUR");
  pb::Account account;
  for (const char* bad : {"", "tok-alice", "Basic tok-alice", "Bearer ", "Bearer nope"}) {
    EXPECT_EQ(stub_->OpenAccount(Context(bad).get(), request, &account).error_code(),
              grpc::StatusCode::UNAUTHENTICATED)
        << bad;
  }
  // Two credentials, even two good ones, are ambiguous: neither is taken.
  auth_.Add("tok-bob", "bob");
  for (const char* second : {"Bearer tok-bob", "Bearer tok-alice"}) {
    std::unique_ptr<grpc::ClientContext> twice = Context("Bearer tok-alice");
    twice->AddMetadata("authorization", second);
    EXPECT_EQ(stub_->OpenAccount(twice.get(), request, &account).error_code(),
              grpc::StatusCode::UNAUTHENTICATED)
        << second;
  }
  EXPECT_TRUE(stub_->OpenAccount(Context("Bearer tok-alice").get(), request, &account).ok());
  EXPECT_TRUE(stub_->OpenAccount(Context("bearer tok-alice").get(), request, &account).ok());
  EXPECT_EQ(account.owner_user_id(), "alice");
  EXPECT_EQ(account.currency(), "EUR");
  EXPECT_EQ(account.balance_minor(), 0);
  EXPECT_EQ(account.created_at().seconds(), 1'700'000'000);
}

TEST_F(LedgerHandlersTest, DepositTransferListRoundTrip) {
  pb::Account a;
  pb::Account b;
  ASSERT_NO_FATAL_FAILURE(OpenTwoEuroAccounts(&a, &b));

  pb::DepositRequest deposit;
  deposit.set_account_id(a.account_id());
  deposit.set_amount_minor(1000);
  deposit.set_idempotency_key("d-1");
  pb::Transaction t;
  ASSERT_TRUE(stub_->Deposit(Context("Bearer tok-alice").get(), deposit, &t).ok());
  EXPECT_EQ(t.kind(), "deposit");
  EXPECT_EQ(t.from_account_id(), "");
  EXPECT_EQ(t.to_account_id(), a.account_id());
  EXPECT_EQ(t.idempotency_key(), "d-1");

  pb::TransferRequest transfer;
  transfer.set_from_account_id(a.account_id());
  transfer.set_to_account_id(b.account_id());
  transfer.set_amount_minor(2000);
  transfer.set_idempotency_key("t-1");
  grpc::Status s = stub_->Transfer(Context("Bearer tok-alice").get(), transfer, &t);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("amount_minor"), std::string::npos);
  transfer.set_amount_minor(400);
  ASSERT_TRUE(stub_->Transfer(Context("Bearer tok-alice").get(), transfer, &t).ok());
  EXPECT_EQ(t.kind(), "transfer");
  EXPECT_EQ(t.currency(), "EUR");

  pb::ListTransactionsRequest list;
  list.set_account_id(a.account_id());
  list.set_page_size(1);
  pb::ListTransactionsResponse page;
  ASSERT_TRUE(stub_->ListTransactions(Context("Bearer tok-alice").get(), list, &page).ok());
  ASSERT_EQ(page.transactions_size(), 1);
  EXPECT_EQ(page.transactions(0).transaction_id(), t.transaction_id());
  ASSERT_FALSE(page.next_page_token().empty());
  list.set_page_token(page.next_page_token());
  ASSERT_TRUE(stub_->ListTransactions(Context("Bearer tok-alice").get(), list, &page).ok());
  ASSERT_EQ(page.transactions_size(), 1);
  EXPECT_EQ(page.transactions(0).kind(), "deposit");
  EXPECT_TRUE(page.next_page_token().empty());

  pb::GetAccountRequest get;
  get.set_account_id(b.account_id());
  pb::Account got;
  ASSERT_TRUE(stub_->GetAccount(Context("Bearer tok-alice").get(), get, &got).ok());
  EXPECT_EQ(got.balance_minor(), 400);
}

// Every method hands the store the caller's deadline (less a margin for the answer), so that a
// slow database ends in the server's UNAVAILABLE before the caller gives up on its own, not
// only DEFAULT_CALL_TIMEOUT_MS later.
TEST_F(LedgerHandlersTest, EveryMethodHandsTheStoreTheCallersDeadline) {
  const auto expect_callers_deadline = [&](const char* method, auto rpc) {
    std::unique_ptr<grpc::ClientContext> context = Context("Bearer tok-alice");
    const absl::Time callers = absl::FromChrono(context->deadline());
    const grpc::Status status = rpc(context.get());
    EXPECT_TRUE(status.ok()) << method << ": " << status.error_message();
    const absl::Time given = store_.TakeLatestDeadline();
    EXPECT_LT(given, callers) << method;
    EXPECT_GT(given, callers - absl::Seconds(1)) << method;
  };
  pb::OpenAccountRequest open;
  open.set_currency("EUR");
  pb::Account a;
  pb::Account b;
  expect_callers_deadline("OpenAccount",
                          [&](grpc::ClientContext* c) { return stub_->OpenAccount(c, open, &a); });
  ASSERT_TRUE(stub_->OpenAccount(Context("Bearer tok-alice").get(), open, &b).ok());
  pb::GetAccountRequest get;
  get.set_account_id(a.account_id());
  pb::Account got;
  expect_callers_deadline("GetAccount",
                          [&](grpc::ClientContext* c) { return stub_->GetAccount(c, get, &got); });
  pb::DepositRequest deposit;
  deposit.set_account_id(a.account_id());
  deposit.set_amount_minor(1000);
  deposit.set_idempotency_key("d-1");
  pb::Transaction t;
  expect_callers_deadline("Deposit",
                          [&](grpc::ClientContext* c) { return stub_->Deposit(c, deposit, &t); });
  pb::TransferRequest transfer;
  transfer.set_from_account_id(a.account_id());
  transfer.set_to_account_id(b.account_id());
  transfer.set_amount_minor(400);
  transfer.set_idempotency_key("t-1");
  expect_callers_deadline("Transfer",
                          [&](grpc::ClientContext* c) { return stub_->Transfer(c, transfer, &t); });
  pb::ListTransactionsRequest list;
  list.set_account_id(a.account_id());
  pb::ListTransactionsResponse page;
  expect_callers_deadline("ListTransactions", [&](grpc::ClientContext* c) {
    return stub_->ListTransactions(c, list, &page);
  });
}

TEST_F(LedgerHandlersTest, StoreOutageIsUnavailable) {
  memory_.set_unavailable(true);
  pb::OpenAccountRequest open;
  open.set_currency("EUR");
  pb::Account a;
  EXPECT_EQ(stub_->OpenAccount(Context("Bearer tok-alice").get(), open, &a).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

// What only PostgreSQL produces reaches the caller with its own code: ABORTED after a movement
// lost to concurrent transactions five times (the contract's "retry with the same key"), and a
// refusal the database made. Neither may turn into INTERNAL, nor lose its words for callers.
TEST_F(LedgerHandlersTest, StoreOutcomesOnlyPostgresGivesKeepTheirCode) {
  pb::Account a;
  pb::Account b;
  ASSERT_NO_FATAL_FAILURE(OpenTwoEuroAccounts(&a, &b));
  pb::TransferRequest transfer;
  transfer.set_from_account_id(a.account_id());
  transfer.set_to_account_id(b.account_id());
  transfer.set_amount_minor(1);
  transfer.set_idempotency_key("t-outcome");
  for (const auto& [failure, code] : std::vector<std::pair<absl::Status, grpc::StatusCode>>{
           {absl::AbortedError("transfer: lost to concurrent transactions 5 times; retry"),
            grpc::StatusCode::ABORTED},
           {absl::FailedPreconditionError("amount_minor: refused by the database"),
            grpc::StatusCode::FAILED_PRECONDITION},
       }) {
    SCOPED_TRACE(failure.ToString());
    memory_.set_failure(failure);
    pb::Transaction t;
    const grpc::Status status = stub_->Transfer(Context("Bearer tok-alice").get(), transfer, &t);
    EXPECT_EQ(status.error_code(), code);
    EXPECT_EQ(status.error_message(), failure.message());
  }
  memory_.set_failure(absl::OkStatus());
}

// The server wires the ledger to the app's authenticator slot; an empty slot (no session layer)
// must give a clean UNAVAILABLE, and a filled one must be used without rewiring.
TEST(LedgerLateBoundAuthenticator, EmptySlotIsUnavailableThenForwards) {
  std::unique_ptr<TokenAuthenticator> slot;
  LateBoundAuthenticator late(slot);
  EXPECT_EQ(late.UserIdForToken("t", absl::InfiniteFuture()).status().code(),
            absl::StatusCode::kUnavailable);
  auto fake = std::make_unique<FakeAuthenticator>();
  fake->Add("t", "carol");
  slot = std::move(fake);
  EXPECT_EQ(late.UserIdForToken("t", absl::InfiniteFuture()).value_or(""), "carol");
  EXPECT_EQ(late.UserIdForToken("u", absl::InfiniteFuture()).status().code(),
            absl::StatusCode::kUnauthenticated);
}

}  // namespace
}  // namespace sessionledger
