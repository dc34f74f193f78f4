#ifndef SESSIONLEDGER_SERVER_LEDGER_IN_MEMORY_LEDGER_STORE_H_
#define SESSIONLEDGER_SERVER_LEDGER_IN_MEMORY_LEDGER_STORE_H_

#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "server/common/clock.h"
#include "server/domain/ledger_store.h"

namespace sessionledger {

// A LedgerStore in process memory with the same semantics as PgLedgerStore (idempotency,
// error order via MovementFailure, keyset pages), for unit tests. One mutex serialises every
// call, which makes it trivially atomic; thread-safe. set_unavailable(true) makes every call
// UNAVAILABLE, to test outage handling above the store; set_failure any other outcome that only
// PostgreSQL produces (ABORTED after serialization failures, say). A deadline already passed is
// UNAVAILABLE, as PgLedgerStore answers it.
class InMemoryLedgerStore final : public LedgerStore {
 public:
  explicit InMemoryLedgerStore(const Clock& clock) : clock_(clock) {}

  absl::StatusOr<Account> CreateAccount(absl::string_view owner_user_id, absl::string_view currency,
                                        absl::Time deadline) override;
  absl::StatusOr<Account> GetAccount(absl::string_view account_id, absl::Time deadline) override;
  absl::StatusOr<Transaction> ApplyMovement(const MoneyMovement& movement,
                                            absl::Time deadline) override;
  absl::StatusOr<TransactionPage> ListTransactions(absl::string_view acting_user_id,
                                                   absl::string_view account_id, int64_t before_seq,
                                                   int limit, absl::Time deadline) override;

  void set_unavailable(bool unavailable);
  // Every call fails with `failure` until set_failure(absl::OkStatus()).
  void set_failure(absl::Status failure);
  // Sum of all balances and of all deposits; equal whenever money is conserved.
  std::pair<int64_t, int64_t> BalanceAndDepositTotals() const;

 private:
  struct StoredTransaction {
    Transaction transaction;
    std::string user_id;
    std::string fingerprint;
  };

  std::string NewId();  // Requires mutex_.

  const Clock& clock_;
  mutable std::mutex mutex_;
  // Requires mutex_: the failure every call answers, or why its deadline passed.
  absl::Status Refusal(absl::Time deadline) const;

  absl::Status failure_;
  uint64_t next_id_ = 1;
  std::map<std::string, Account> accounts_;
  std::vector<StoredTransaction> transactions_;                   // Index = seq - 1.
  std::map<std::pair<std::string, std::string>, size_t> by_key_;  // (user, key) -> index.
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_LEDGER_IN_MEMORY_LEDGER_STORE_H_
