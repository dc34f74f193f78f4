#include "server/ledger/in_memory_ledger_store.h"

#include <cstdio>
#include <utility>

#include "absl/time/clock.h"
#include "server/common/status_macros.h"

namespace sessionledger {
namespace {

absl::Status Unavailable() { return absl::UnavailableError("ledger store: unavailable (test)"); }

}  // namespace

std::string InMemoryLedgerStore::NewId() {
  // Deterministic UUID-shaped ids keep tests reproducible.
  char buffer[40];
  std::snprintf(buffer, sizeof(buffer), "00000000-0000-4000-8000-%012llx",
                static_cast<unsigned long long>(next_id_++));
  return buffer;
}

void InMemoryLedgerStore::set_unavailable(bool unavailable) {
  set_failure(unavailable ? Unavailable() : absl::OkStatus());
}

void InMemoryLedgerStore::set_failure(absl::Status failure) {
  std::lock_guard<std::mutex> lock(mutex_);
  failure_ = std::move(failure);
}

absl::Status InMemoryLedgerStore::Refusal(absl::Time deadline) const {
  if (!failure_.ok()) return failure_;
  if (deadline <= absl::Now()) return absl::UnavailableError("ledger store: deadline passed");
  return absl::OkStatus();
}

absl::StatusOr<Account> InMemoryLedgerStore::CreateAccount(absl::string_view owner_user_id,
                                                           absl::string_view currency,
                                                           absl::Time deadline) {
  std::lock_guard<std::mutex> lock(mutex_);
  SL_RETURN_IF_ERROR(Refusal(deadline));
  Account account;
  account.account_id = NewId();
  account.owner_user_id = std::string(owner_user_id);
  account.currency = std::string(currency);
  account.created_at = clock_.Now();
  accounts_[account.account_id] = account;
  return account;
}

absl::StatusOr<Account> InMemoryLedgerStore::GetAccount(absl::string_view account_id,
                                                        absl::Time deadline) {
  std::lock_guard<std::mutex> lock(mutex_);
  SL_RETURN_IF_ERROR(Refusal(deadline));
  auto it = accounts_.find(std::string(account_id));
  if (it == accounts_.end()) return absl::NotFoundError("account_id: no such account");
  return it->second;
}

absl::StatusOr<Transaction> InMemoryLedgerStore::ApplyMovement(const MoneyMovement& m,
                                                               absl::Time deadline) {
  std::lock_guard<std::mutex> lock(mutex_);
  SL_RETURN_IF_ERROR(Refusal(deadline));
  if (auto it = by_key_.find({m.acting_user_id, m.idempotency_key}); it != by_key_.end()) {
    const StoredTransaction& stored = transactions_[it->second];
    if (stored.fingerprint != m.fingerprint) {
      return absl::AlreadyExistsError(
          "idempotency_key: already used by this user with different parameters");
    }
    return stored.transaction;
  }
  const bool transfer = m.kind == TransactionKind::kTransfer;
  MovementFacts facts;
  auto from = accounts_.end();
  if (transfer) {
    from = accounts_.find(m.from_account_id);
    if (from != accounts_.end()) {
      facts.from_found = true;
      facts.from_owner = from->second.owner_user_id;
      facts.from_currency = from->second.currency;
      facts.from_balance = from->second.balance_minor;
    }
  }
  auto to = accounts_.find(m.to_account_id);
  if (to != accounts_.end()) {
    facts.to_found = true;
    facts.to_owner = to->second.owner_user_id;
    facts.to_currency = to->second.currency;
    facts.to_balance = to->second.balance_minor;
  }
  if (absl::Status failure = MovementFailure(m, facts); !failure.ok()) return failure;

  if (transfer) from->second.balance_minor -= m.amount_minor;
  to->second.balance_minor += m.amount_minor;
  StoredTransaction stored;
  stored.transaction.transaction_id = NewId();
  stored.transaction.kind = m.kind;
  stored.transaction.from_account_id = m.from_account_id;
  stored.transaction.to_account_id = m.to_account_id;
  stored.transaction.amount_minor = m.amount_minor;
  stored.transaction.currency = to->second.currency;
  stored.transaction.created_at = clock_.Now();
  stored.transaction.idempotency_key = m.idempotency_key;
  stored.transaction.seq = static_cast<int64_t>(transactions_.size()) + 1;
  stored.user_id = m.acting_user_id;
  stored.fingerprint = m.fingerprint;
  transactions_.push_back(stored);
  by_key_[{m.acting_user_id, m.idempotency_key}] = transactions_.size() - 1;
  return stored.transaction;
}

absl::StatusOr<TransactionPage> InMemoryLedgerStore::ListTransactions(
    absl::string_view acting_user_id, absl::string_view account_id, int64_t before_seq, int limit,
    absl::Time deadline) {
  std::lock_guard<std::mutex> lock(mutex_);
  SL_RETURN_IF_ERROR(Refusal(deadline));
  auto account = accounts_.find(std::string(account_id));
  if (account == accounts_.end()) return absl::NotFoundError("account_id: no such account");
  if (account->second.owner_user_id != acting_user_id) {
    return absl::PermissionDeniedError("account_id: not an account of the acting user");
  }
  TransactionPage page;
  for (auto it = transactions_.rbegin(); it != transactions_.rend(); ++it) {
    const Transaction& t = it->transaction;
    if (t.seq >= before_seq) continue;
    if (t.from_account_id != account_id && t.to_account_id != account_id) continue;
    if (static_cast<int>(page.transactions.size()) == limit) {
      page.more = true;
      break;
    }
    page.transactions.push_back(t);
    if (it->user_id != acting_user_id) page.transactions.back().idempotency_key.clear();
  }
  return page;
}

std::pair<int64_t, int64_t> InMemoryLedgerStore::BalanceAndDepositTotals() const {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t balances = 0;
  int64_t deposits = 0;
  for (const auto& [id, account] : accounts_) balances += account.balance_minor;
  for (const auto& stored : transactions_) {
    if (stored.transaction.kind == TransactionKind::kDeposit) {
      deposits += stored.transaction.amount_minor;
    }
  }
  return {balances, deposits};
}

}  // namespace sessionledger
