#ifndef SESSIONLEDGER_SERVER_DOMAIN_LEDGER_STORE_H_
#define SESSIONLEDGER_SERVER_DOMAIN_LEDGER_STORE_H_

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace sessionledger {

// Account ids and transaction ids are UUIDs in canonical lower-case text form
// ("0b6f5c1e-...") everywhere in the domain; the ledger layer canonicalises what clients send.
struct Account {
  std::string account_id;
  std::string owner_user_id;
  std::string currency;  // Three upper-case ASCII letters.
  int64_t balance_minor = 0;
  absl::Time created_at;
};

enum class TransactionKind { kDeposit, kTransfer };
absl::string_view TransactionKindName(TransactionKind kind);  // "deposit" / "transfer"

struct Transaction {
  std::string transaction_id;
  TransactionKind kind = TransactionKind::kDeposit;
  std::string from_account_id;  // Empty for deposits.
  std::string to_account_id;
  int64_t amount_minor = 0;
  std::string currency;
  absl::Time created_at;
  std::string idempotency_key;
  // Position in the global insertion order; the keyset of ListTransactions. Not exposed to
  // clients except inside an opaque page token.
  int64_t seq = 0;
};

// A validated Deposit or Transfer, ready to be applied atomically.
struct MoneyMovement {
  std::string acting_user_id;
  std::string idempotency_key;
  // Digest of the request's parameters (kind, accounts, amount); compared on replay.
  std::string fingerprint;
  TransactionKind kind = TransactionKind::kDeposit;
  std::string from_account_id;  // Empty for deposits.
  std::string to_account_id;
  int64_t amount_minor = 0;
};

// What a store saw of the accounts of a movement that it could not apply, under the same
// locks it would have applied it with. Every implementation turns these facts into a status
// with MovementFailure(), so the fake and the real store order errors identically.
struct MovementFacts {
  bool from_found = false;  // Ignored for deposits.
  std::string from_owner;
  std::string from_currency;
  int64_t from_balance = 0;
  bool to_found = false;
  std::string to_owner;
  std::string to_currency;
  int64_t to_balance = 0;
};

// The error for a movement that could not be applied, in the contract's order: NOT_FOUND
// (either account), PERMISSION_DENIED (the acting user does not own the source, or for a
// deposit the destination), INVALID_ARGUMENT (currency mismatch, destination balance would
// overflow), FAILED_PRECONDITION (insufficient funds). OK when nothing forbids the movement.
// Currency and overflow depend on the destination, so they come after PERMISSION_DENIED, and
// for a transfer into another user's account after the funds check too: otherwise a caller
// with an empty account could read a stranger's currency off the error, and the exact balance
// by bisecting the amount until "would overflow" turns into "insufficient funds". Past the
// funds check the caller could make the transfer, which would tell them the currency anyway.
inline absl::Status MovementFailure(const MoneyMovement& m, const MovementFacts& f) {
  const bool transfer = m.kind == TransactionKind::kTransfer;
  const auto insufficient_funds = [] {
    return absl::FailedPreconditionError("amount_minor: insufficient funds in from_account_id");
  };
  if (transfer && !f.from_found) return absl::NotFoundError("from_account_id: no such account");
  if (!f.to_found) {
    return absl::NotFoundError(transfer ? "to_account_id: no such account"
                                        : "account_id: no such account");
  }
  if (transfer && f.from_owner != m.acting_user_id) {
    return absl::PermissionDeniedError("from_account_id: not an account of the acting user");
  }
  if (!transfer && f.to_owner != m.acting_user_id) {
    return absl::PermissionDeniedError("account_id: not an account of the acting user");
  }
  const bool into_strangers_account = transfer && f.to_owner != m.acting_user_id;
  if (into_strangers_account && f.from_balance < m.amount_minor) return insufficient_funds();
  if (transfer && f.from_currency != f.to_currency) {
    return absl::InvalidArgumentError(
        "to_account_id: currency differs from that of from_account_id");
  }
  if (f.to_balance > std::numeric_limits<int64_t>::max() - m.amount_minor) {
    return absl::InvalidArgumentError("amount_minor: the destination balance would overflow");
  }
  if (transfer && f.from_balance < m.amount_minor) return insufficient_funds();
  return absl::OkStatus();
}

// One page of an account's history, newest first.
struct TransactionPage {
  std::vector<Transaction> transactions;
  bool more = false;  // Older transactions exist beyond the last one returned.
};

// Persistence of accounts and transactions. Implementations: PgLedgerStore (PostgreSQL) and
// InMemoryLedgerStore (unit tests). Implementations are thread-safe. No method blocks past its
// `deadline`; a backing service that is down or too slow gives UNAVAILABLE.
class LedgerStore {
 public:
  virtual ~LedgerStore() = default;

  // Creates an account with balance 0. UNAVAILABLE.
  virtual absl::StatusOr<Account> CreateAccount(absl::string_view owner_user_id,
                                                absl::string_view currency,
                                                absl::Time deadline) = 0;

  // NOT_FOUND when no account has this id. UNAVAILABLE.
  virtual absl::StatusOr<Account> GetAccount(absl::string_view account_id, absl::Time deadline) = 0;

  // Applies a deposit or transfer exactly once per (acting_user_id, idempotency_key), in one
  // database transaction that is committed before this returns:
  //   - key unused: check with MovementFailure() under locks, move the money, record the
  //     transaction with its key; the new Transaction.
  //   - key used with the same fingerprint: the stored Transaction, no money moves.
  //   - key used with another fingerprint: ALREADY_EXISTS.
  //   - otherwise the MovementFailure() error; the key stays unused.
  // ABORTED when serialization/deadlock failures persist after bounded retries; UNAVAILABLE.
  virtual absl::StatusOr<Transaction> ApplyMovement(const MoneyMovement& movement,
                                                    absl::Time deadline) = 0;

  // The account's transactions (as source or destination) with seq < `before_seq`, newest
  // first, at most `limit` (>= 1). NOT_FOUND when the account does not exist;
  // PERMISSION_DENIED when it is not `acting_user_id`'s (both checked in the same query, so
  // listing costs one round trip). A transaction made by another user (a transfer into this
  // account) is listed with an empty idempotency_key: the key belongs to its user. UNAVAILABLE.
  virtual absl::StatusOr<TransactionPage> ListTransactions(absl::string_view acting_user_id,
                                                           absl::string_view account_id,
                                                           int64_t before_seq, int limit,
                                                           absl::Time deadline) = 0;
};

inline absl::string_view TransactionKindName(TransactionKind kind) {
  return kind == TransactionKind::kTransfer ? "transfer" : "deposit";
}

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_DOMAIN_LEDGER_STORE_H_
