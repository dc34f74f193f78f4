#include "server/ledger/ledger_service.h"

#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/common/clock.h"
#include "server/ledger/fake_token_authenticator.h"
#include "server/ledger/in_memory_ledger_store.h"
#include "server/ledger/page_token.h"

namespace sessionledger {
namespace {

using ::testing::HasSubstr;

const absl::Time kDeadline = absl::InfiniteFuture();
constexpr char kNoSuchAccount[] = "4f1c2a9e-0000-4000-8000-00000000ffff";

MATCHER_P(StatusIs, code, "") { return arg.code() == code; }
MATCHER_P2(StatusIsAndSays, code, text, "") {
  return arg.code() == code && absl::StrContains(arg.message(), text);
}

// For messages that must name their field first ("to_account_id: ...").
MATCHER_P2(StatusIsAndBegins, code, prefix, "") {
  return arg.code() == code && absl::StartsWith(arg.message(), prefix);
}

class LedgerServiceTest : public ::testing::Test {
 protected:
  LedgerServiceTest() : store_(clock_), ledger_(store_, auth_) {
    auth_.Add("alice-token", "alice");
    auth_.Add("bob-token", "bob");
  }

  Account Open(const std::string& token, const std::string& currency = "EUR") {
    absl::StatusOr<Account> account = ledger_.OpenAccount(token, currency, kDeadline);
    EXPECT_TRUE(account.ok()) << account.status();
    return account.value_or(Account{});
  }
  absl::StatusOr<Transaction> Deposit(const std::string& token, const std::string& account,
                                      int64_t amount, const std::string& key) {
    return ledger_.Deposit(token, {account, amount, key}, kDeadline);
  }
  absl::StatusOr<Transaction> Transfer(const std::string& token, const std::string& from,
                                       const std::string& to, int64_t amount,
                                       const std::string& key) {
    return ledger_.Transfer(token, {from, to, amount, key}, kDeadline);
  }

  FakeClock clock_;
  FakeAuthenticator auth_;
  InMemoryLedgerStore store_;
  LedgerService ledger_;
};

TEST_F(LedgerServiceTest, OpenAndGetAccount) {
  const Account a = Open("alice-token", "USD");
  EXPECT_EQ(a.owner_user_id, "alice");
  EXPECT_EQ(a.currency, "USD");
  EXPECT_EQ(a.balance_minor, 0);
  absl::StatusOr<Account> got = ledger_.GetAccount("alice-token", a.account_id, kDeadline);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->account_id, a.account_id);
  // Ids are accepted in either letter case.
  std::string upper = a.account_id;
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  EXPECT_TRUE(ledger_.GetAccount("alice-token", upper, kDeadline).ok());
}

TEST_F(LedgerServiceTest, ErrorOrderInvalidArgumentBeforeUnauthenticated) {
  EXPECT_THAT(ledger_.OpenAccount("", "eur", kDeadline).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ledger_.OpenAccount("", "EUR", kDeadline).status(),
              StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(ledger_.OpenAccount("forged", "EUR", kDeadline).status(),
              StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(ledger_.GetAccount("forged", "", kDeadline).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Deposit("forged", kNoSuchAccount, 0, "k").status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Transfer("forged", kNoSuchAccount, kNoSuchAccount, 5, "k").status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ledger_.ListTransactions("forged", {kNoSuchAccount, -1, ""}, kDeadline).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(
      ledger_.ListTransactions("forged", {kNoSuchAccount, 0, "garbage"}, kDeadline).status(),
      StatusIs(absl::StatusCode::kInvalidArgument));
  // UNAUTHENTICATED before NOT_FOUND, an account id that is no UUID included: it names no
  // account, which only a caller who may ask learns.
  EXPECT_THAT(ledger_.GetAccount("forged", kNoSuchAccount, kDeadline).status(),
              StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(Deposit("forged", "no-such-account", 5, "k").status(),
              StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(Transfer("forged", "no-such-account", kNoSuchAccount, 5, "k").status(),
              StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(ledger_.ListTransactions("forged", {"x", 0, ""}, kDeadline).status(),
              StatusIs(absl::StatusCode::kUnauthenticated));
}

TEST_F(LedgerServiceTest, NotFoundBeforePermissionDenied) {
  const Account bobs = Open("bob-token");
  EXPECT_THAT(ledger_.GetAccount("alice-token", kNoSuchAccount, kDeadline).status(),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(ledger_.GetAccount("alice-token", "no-such-account", kDeadline).status(),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(ledger_.GetAccount("alice-token", bobs.account_id, kDeadline).status(),
              StatusIs(absl::StatusCode::kPermissionDenied));
  // Source is bob's (PERMISSION_DENIED) but destination does not exist: NOT_FOUND wins.
  EXPECT_THAT(Transfer("alice-token", bobs.account_id, kNoSuchAccount, 5, "k").status(),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(LedgerServiceTest, SessionStoreOutageIsUnavailable) {
  auth_.set_unavailable(true);
  EXPECT_THAT(ledger_.OpenAccount("alice-token", "EUR", kDeadline).status(),
              StatusIs(absl::StatusCode::kUnavailable));
}

// An authenticator that fails with a fixed status.
class FailingAuthenticator final : public TokenAuthenticator {
 public:
  explicit FailingAuthenticator(absl::Status status) : status_(std::move(status)) {}
  absl::StatusOr<std::string> UserIdForToken(absl::string_view, absl::Time) override {
    return status_;
  }

 private:
  absl::Status status_;
};

TEST(LedgerServiceAuthTest, AuthenticatorCodesAreNormalised) {
  FakeClock clock;
  InMemoryLedgerStore store(clock);
  const std::pair<absl::Status, absl::StatusCode> cases[] = {
      {absl::NotFoundError("x"), absl::StatusCode::kUnauthenticated},
      {absl::InvalidArgumentError("x"), absl::StatusCode::kUnauthenticated},
      {absl::UnauthenticatedError("x"), absl::StatusCode::kUnauthenticated},
      {absl::UnavailableError("x"), absl::StatusCode::kUnavailable},
      {absl::InternalError("x"), absl::StatusCode::kUnavailable},
  };
  for (const auto& [given, want] : cases) {
    FailingAuthenticator auth(given);
    LedgerService ledger(store, auth);
    EXPECT_EQ(ledger.OpenAccount("tok", "EUR", kDeadline).status().code(), want) << given;
  }
}

TEST_F(LedgerServiceTest, StoreOutageIsUnavailable) {
  store_.set_unavailable(true);
  EXPECT_THAT(ledger_.OpenAccount("alice-token", "EUR", kDeadline).status(),
              StatusIs(absl::StatusCode::kUnavailable));
}

TEST_F(LedgerServiceTest, DepositRules) {
  const Account a = Open("alice-token");
  const Account b = Open("bob-token");
  EXPECT_THAT(Deposit("alice-token", a.account_id, 0, "k").status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Deposit("alice-token", a.account_id, -5, "k").status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Deposit("alice-token", a.account_id, 5, "").status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Deposit("alice-token", a.account_id, 5, std::string(129, 'k')).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Deposit("alice-token", b.account_id, 5, "k").status(),
              StatusIs(absl::StatusCode::kPermissionDenied));
  absl::StatusOr<Transaction> t = Deposit("alice-token", a.account_id, 500, "k");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->kind, TransactionKind::kDeposit);
  EXPECT_EQ(t->from_account_id, "");
  EXPECT_EQ(t->to_account_id, a.account_id);
  EXPECT_EQ(t->currency, "EUR");
  EXPECT_EQ(t->idempotency_key, "k");
  EXPECT_EQ(ledger_.GetAccount("alice-token", a.account_id, kDeadline)->balance_minor, 500);
}

TEST_F(LedgerServiceTest, IdempotentReplayAndAlreadyExists) {
  const Account a = Open("alice-token");
  const Account b = Open("bob-token");
  absl::StatusOr<Transaction> first = Deposit("alice-token", a.account_id, 100, "key-1");
  ASSERT_TRUE(first.ok());
  absl::StatusOr<Transaction> again = Deposit("alice-token", a.account_id, 100, "key-1");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->transaction_id, first->transaction_id);
  EXPECT_EQ(ledger_.GetAccount("alice-token", a.account_id, kDeadline)->balance_minor, 100);
  EXPECT_THAT(Deposit("alice-token", a.account_id, 101, "key-1").status(),
              StatusIs(absl::StatusCode::kAlreadyExists));
  // One key space for Deposit and Transfer.
  EXPECT_THAT(Transfer("alice-token", a.account_id, b.account_id, 100, "key-1").status(),
              StatusIs(absl::StatusCode::kAlreadyExists));
  // Keys are per user: bob may use the same key.
  EXPECT_TRUE(Deposit("bob-token", b.account_id, 7, "key-1").ok());
}

TEST_F(LedgerServiceTest, TransferRules) {
  const Account a = Open("alice-token");
  const Account a_usd = Open("alice-token", "USD");
  const Account b = Open("bob-token");
  ASSERT_TRUE(Deposit("alice-token", a.account_id, 100, "d1").ok());

  EXPECT_THAT(Transfer("alice-token", a.account_id, a.account_id, 5, "t").status(),
              StatusIsAndBegins(absl::StatusCode::kInvalidArgument,
                                "to_account_id: must differ from from_account_id"));
  // One account spelt in two letter cases is one account (the database would otherwise refuse
  // the row with a constraint error, FAILED_PRECONDITION).
  std::string upper = a.account_id;
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  EXPECT_THAT(Transfer("alice-token", a.account_id, upper, 5, "t").status(),
              StatusIsAndBegins(absl::StatusCode::kInvalidArgument,
                                "to_account_id: must differ from from_account_id"));
  EXPECT_THAT(Transfer("alice-token", "", b.account_id, 5, "t").status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Transfer("alice-token", a.account_id, b.account_id, 0, "t").status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  absl::Status mismatch = Transfer("alice-token", a.account_id, a_usd.account_id, 5, "t").status();
  EXPECT_THAT(mismatch, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(std::string(mismatch.message()), HasSubstr("currency"));
  // Each error names the field it is about.
  EXPECT_THAT(Transfer("alice-token", a.account_id, kNoSuchAccount, 5, "t").status(),
              StatusIsAndBegins(absl::StatusCode::kNotFound, "to_account_id: "));
  EXPECT_THAT(Transfer("alice-token", kNoSuchAccount, a.account_id, 5, "t").status(),
              StatusIsAndBegins(absl::StatusCode::kNotFound, "from_account_id: "));
  EXPECT_THAT(Transfer("alice-token", b.account_id, a.account_id, 5, "t").status(),
              StatusIsAndBegins(absl::StatusCode::kPermissionDenied, "from_account_id: "));
  EXPECT_THAT(Deposit("alice-token", kNoSuchAccount, 5, "d").status(),
              StatusIsAndBegins(absl::StatusCode::kNotFound, "account_id: "));
  EXPECT_THAT(Deposit("alice-token", b.account_id, 5, "d").status(),
              StatusIsAndBegins(absl::StatusCode::kPermissionDenied, "account_id: "));
  // Insufficient funds leaves the key unused: the same key works once the money is there.
  EXPECT_THAT(Transfer("alice-token", a.account_id, b.account_id, 150, "t").status(),
              StatusIsAndBegins(absl::StatusCode::kFailedPrecondition, "amount_minor: "));
  ASSERT_TRUE(Deposit("alice-token", a.account_id, 50, "d2").ok());
  absl::StatusOr<Transaction> t = Transfer("alice-token", a.account_id, b.account_id, 150, "t");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->kind, TransactionKind::kTransfer);
  EXPECT_EQ(ledger_.GetAccount("alice-token", a.account_id, kDeadline)->balance_minor, 0);
  EXPECT_EQ(ledger_.GetAccount("bob-token", b.account_id, kDeadline)->balance_minor, 150);
  const auto [balances, deposits] = store_.BalanceAndDepositTotals();
  EXPECT_EQ(balances, deposits);
}

TEST_F(LedgerServiceTest, OverflowIsInvalidArgument) {
  const Account a = Open("alice-token");
  const Account b = Open("alice-token");
  ASSERT_TRUE(Deposit("alice-token", a.account_id, INT64_MAX, "d1").ok());
  EXPECT_THAT(Deposit("alice-token", a.account_id, 1, "d2").status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_TRUE(Deposit("alice-token", b.account_id, 1, "d3").ok());
  EXPECT_THAT(Transfer("alice-token", b.account_id, a.account_id, 1, "t").status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

// A transfer into someone else's account must not tell a caller who cannot pay anything about
// that account: neither its currency nor, by bisecting the amount against the overflow check,
// its balance.
TEST_F(LedgerServiceTest, TransferErrorsRevealNothingOfAStrangersAccountToACallerWhoCannotPay) {
  const Account alices_euros = Open("alice-token", "EUR");
  const Account bobs_dollars = Open("bob-token", "USD");
  const Account bobs_euros = Open("bob-token", "EUR");
  ASSERT_TRUE(Deposit("bob-token", bobs_euros.account_id, INT64_MAX - 10, "rich").ok());

  EXPECT_THAT(
      Transfer("alice-token", alices_euros.account_id, bobs_dollars.account_id, 1, "t1").status(),
      StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(
      Transfer("alice-token", alices_euros.account_id, bobs_euros.account_id, 11, "t2").status(),
      StatusIs(absl::StatusCode::kFailedPrecondition));

  // Once the caller could pay, the destination's own checks apply as before.
  ASSERT_TRUE(Deposit("alice-token", alices_euros.account_id, 20, "d").ok());
  EXPECT_THAT(
      Transfer("alice-token", alices_euros.account_id, bobs_dollars.account_id, 1, "t3").status(),
      StatusIsAndSays(absl::StatusCode::kInvalidArgument, "currency"));
  EXPECT_THAT(
      Transfer("alice-token", alices_euros.account_id, bobs_euros.account_id, 11, "t4").status(),
      StatusIsAndSays(absl::StatusCode::kInvalidArgument, "overflow"));
}

// Between one's own accounts there is nothing to hide: the contract's order holds, and a
// currency mismatch is INVALID_ARGUMENT even with no money in the source.
TEST_F(LedgerServiceTest, OwnAccountsKeepTheContractOrder) {
  const Account euros = Open("alice-token", "EUR");
  const Account dollars = Open("alice-token", "USD");
  EXPECT_THAT(Transfer("alice-token", euros.account_id, dollars.account_id, 5, "t").status(),
              StatusIsAndSays(absl::StatusCode::kInvalidArgument, "currency"));
}

TEST_F(LedgerServiceTest, ListPaginatesNewestFirstAndChecksTokens) {
  const Account a = Open("alice-token");
  const Account other = Open("alice-token");
  const Account b = Open("bob-token");
  ASSERT_TRUE(Deposit("alice-token", a.account_id, 1000, "d").ok());
  for (int i = 0; i < 6; ++i) {
    ASSERT_TRUE(
        Transfer("alice-token", a.account_id, b.account_id, i + 1, "t" + std::to_string(i)).ok());
  }
  ASSERT_TRUE(Deposit("alice-token", other.account_id, 5, "unrelated").ok());

  std::vector<Transaction> all;
  std::string token;
  int pages = 0;
  do {
    absl::StatusOr<ListResult> page =
        ledger_.ListTransactions("alice-token", {a.account_id, 3, token}, kDeadline);
    ASSERT_TRUE(page.ok()) << page.status();
    all.insert(all.end(), page->transactions.begin(), page->transactions.end());
    token = page->next_page_token;
    ++pages;
  } while (!token.empty());
  EXPECT_EQ(pages, 3);
  ASSERT_EQ(all.size(), 7u);
  EXPECT_EQ(all.front().amount_minor, 6);  // Newest first.
  EXPECT_EQ(all.back().kind, TransactionKind::kDeposit);

  absl::StatusOr<ListResult> first =
      ledger_.ListTransactions("alice-token", {a.account_id, 2, ""}, kDeadline);
  ASSERT_TRUE(first.ok());
  ASSERT_FALSE(first->next_page_token.empty());
  // A token made for another account, even one of the same user.
  EXPECT_THAT(
      ledger_
          .ListTransactions("alice-token", {other.account_id, 2, first->next_page_token}, kDeadline)
          .status(),
      StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(
      ledger_.ListTransactions("alice-token", {a.account_id, 2, "garbage"}, kDeadline).status(),
      StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ledger_.ListTransactions("alice-token", {a.account_id, -1, ""}, kDeadline).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // Bob received transfers into b but may not list a.
  EXPECT_THAT(ledger_.ListTransactions("bob-token", {a.account_id, 0, ""}, kDeadline).status(),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(ledger_.ListTransactions("bob-token", {kNoSuchAccount, 0, ""}, kDeadline).status(),
              StatusIs(absl::StatusCode::kNotFound));
  absl::StatusOr<ListResult> bobs =
      ledger_.ListTransactions("bob-token", {b.account_id, 0, ""}, kDeadline);
  ASSERT_TRUE(bobs.ok());
  EXPECT_EQ(bobs->transactions.size(), 6u);
  EXPECT_EQ(bobs->transactions[0].idempotency_key, "");  // Alice's key is not bob's to see.
  EXPECT_EQ(all.front().idempotency_key, "t5");
  EXPECT_TRUE(bobs->next_page_token.empty());
}

}  // namespace
}  // namespace sessionledger
