#ifndef SESSIONLEDGER_SERVER_POSTGRES_PG_LEDGER_STORE_H_
#define SESSIONLEDGER_SERVER_POSTGRES_PG_LEDGER_STORE_H_

#include <atomic>
#include <functional>
#include <vector>

#include "server/domain/ledger_store.h"
#include "server/postgres/pg_pool.h"

namespace sessionledger {

// LedgerStore on PostgreSQL (schema: server/postgres/migrations.inc).
//
// Round trips: every call is exactly one network round trip in the common case. The statements
// go out as one libpq pipeline: `SELECT set_config('statement_timeout', <ms>, true)` (a
// transaction-local setting derived from the call's deadline, so a slow PostgreSQL cancels
// the statement itself and answers 57014 -> UNAVAILABLE before the caller gives up), then one
// data statement, then a Sync; they form one implicit transaction that commits at the Sync, and
// the reply is built only after the Sync is acknowledged, i.e. after a durable commit.
//
// A Deposit/Transfer is a single data-modifying CTE, wrapped in the PL/pgSQL function
// ledger_apply_movement (migration 2) only so that PostgreSQL caches its plan per connection:
// look the idempotency key up; lock both
// accounts FOR UPDATE in account_id order (a fixed order, so transfers never deadlock); check
// ownership, currency, overflow and funds on the locked rows; insert the transaction row with
// ON CONFLICT (user_id, idempotency_key) DO NOTHING; update both balances only if that insert
// happened. A concurrent request with the same key waits on the key's index entry and inserts
// nothing, and is then re-run once to return the winner's transaction (the only extra round
// trip, together with a key re-check after a refused movement).
//
// PgBouncer (transaction pooling): only unnamed statements, no session-level SET, and every
// transaction ends at its Sync, so any server connection can serve any call.
//
// Thread-safe (connections come from the PgPool). Serialization failures and deadlocks
// (40001/40P01) are retried a bounded number of times, then ABORTED.
class PgLedgerStore final : public LedgerStore {
 public:
  explicit PgLedgerStore(PgPool& pool) : pool_(pool) {}

  absl::StatusOr<Account> CreateAccount(absl::string_view owner_user_id, absl::string_view currency,
                                        absl::Time deadline) override;
  absl::StatusOr<Account> GetAccount(absl::string_view account_id, absl::Time deadline) override;
  absl::StatusOr<Transaction> ApplyMovement(const MoneyMovement& movement,
                                            absl::Time deadline) override;
  absl::StatusOr<TransactionPage> ListTransactions(absl::string_view acting_user_id,
                                                   absl::string_view account_id, int64_t before_seq,
                                                   int limit, absl::Time deadline) override;

  // Statements run again after a serialization failure, deadlock or lost connection (metrics).
  int64_t retries() const { return retries_.load(std::memory_order_relaxed); }

 private:
  // Runs `statement` after the statement_timeout prefix on a pooled connection and returns its
  // result. Retries 40001/40P01 and, when `idempotent`, one lost connection.
  absl::StatusOr<PgResultPtr> Run(const PgStatement& statement, bool idempotent,
                                  absl::Time deadline);
  absl::StatusOr<Transaction> ApplyOnce(const MoneyMovement& movement, absl::Time deadline,
                                        bool* retry_key_race);

  PgPool& pool_;
  std::atomic<int64_t> retries_{0};
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_POSTGRES_PG_LEDGER_STORE_H_
