#ifndef SESSIONLEDGER_SERVER_POSTGRES_PG_LEDGER_STORE_H_
#define SESSIONLEDGER_SERVER_POSTGRES_PG_LEDGER_STORE_H_

#include <atomic>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <vector>

#include "server/domain/ledger_store.h"
#include "server/postgres/pg_pool.h"

namespace sessionledger {

// Tuning of PgLedgerStore's commit batching; the defaults suit the server.
struct PgLedgerStoreOptions {
  // Most movements that share one transaction (and so one commit).
  int max_batch = 16;
  // Most batches (transactions of ApplyMovement) in flight at once; 0 = the pool's size.
  int max_concurrent_batches = 0;
  // Batches that start as soon as a movement waits. Two keep PostgreSQL busy while one of
  // them waits for its commit to be flushed.
  int eager_batches = 2;
  // Beyond eager_batches, a batch starts only once this many movements wait; 0 = half of
  // max_batch.
  int parallel_batch_threshold = 0;
  // Runs of a statement that lost to a concurrent transaction (40001/40P01), and of a
  // movement whose idempotency key raced with another call's, before the call is ABORTED
  // (unless its deadline comes first, which makes it UNAVAILABLE).
  int max_attempts = 5;
};

// OK when transactions on `conn` start at READ COMMITTED, PostgreSQL's default, which
// PgLedgerStore relies on: a movement reads its accounts as its row locks leave them, and a
// refusal read under those locks needs no second look. A database or role set to another
// default_transaction_isolation (REPEATABLE READ, SERIALIZABLE) keeps the money right, but
// every movement that waited for a lock fails (40001), so a busy account's calls would end
// ABORTED. The ledger cannot set the level per transaction without PostgreSQL logging a
// warning for each one, nor per connection behind PgBouncer: FAILED_PRECONDITION instead,
// naming the setting and how to fix it.
absl::Status CheckTransactionIsolation(PgConnection& conn, absl::Time deadline);

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
// Commit batching (ApplyMovement). Under load PostgreSQL is bound by commit WAL flushes (and
// by per-transaction CPU), so concurrent Deposits/Transfers share commits. Each call queues
// its movement. A caller becomes a leader while fewer than `eager_batches` (2) batches run,
// or, while fewer than `max_concurrent_batches` run, once `parallel_batch_threshold` (8)
// movements wait: it takes its own movement and up to max_batch - 1 queued ones (in arrival
// order), runs them in one transaction on one pooled connection, hands every movement its
// result and wakes its caller. The other callers wait without holding a connection: for a
// leader to take their movement, or for their turn to lead (a finishing leader wakes the
// oldest queued caller, which then leads the movements queued meanwhile). Batches thus form
// only while others run, with no timer: a call alone runs alone, through exactly the
// single-movement path above, with no added latency. Two eager batches keep PostgreSQL busy
// while one waits for its commit flush; the threshold keeps batches large under load (fewer
// commits: at 32 clients on 2 cores, ~8 movements per commit instead of 1.6 made Transfer
// ~1.4x faster than one batch slot per pooled connection). Its price: when both eager batches
// are stuck on row locks, the movements queued behind them wait until 8 queue up or a batch
// ends (at the latest by its statement_timeout).
// A batch of more than one movement is one pipeline:
//   statement_timeout from the batch's earliest deadline (movements already past their
//   deadline are answered UNAVAILABLE, those nearly so run alone instead of cutting the
//   batch's budget);
//   `SELECT 1 FROM accounts WHERE account_id = ANY(<every account of the batch>)
//    ORDER BY account_id FOR UPDATE` (LockRows sits above the Sort, so rows are locked in
//   account_id order: the same global order as single movements, hence no deadlock between
//   batches, single movements and other replicas);
//   one statement calling ledger_apply_movement once per movement, in order (a lateral call
//   per row of a VALUES list; a volatile function sees what the earlier calls wrote: balances,
//   or the key of an identical movement earlier in the batch, which it replays), one row per
//   movement; Sync.
// Why it is safe: a batch is one transaction, so its movements commit together or not at all,
// and nobody is answered before the Sync acknowledges the commit. Each row is read exactly as
// the single path reads it; a refusal needs no key re-check since the rows were read after all
// locks were held, and a key race (a concurrent request with the key, inserting nothing) runs
// that movement alone afterwards. If the batch fails as a whole (40001/40P01, timeout, lost
// connection, anything) each movement runs again alone through the single path, in its
// caller's thread with its own deadline; that path is idempotent by the key, so a batch whose
// commit is unknown is replayed, never applied twice. (The only lock taken outside the global
// order is a key's index entry: two batches reusing each other's keys with other parameters
// can deadlock on those; PostgreSQL detects it and the batch it cancels falls back.)
//
// PgBouncer (transaction pooling): only unnamed statements, no session-level SET, and every
// transaction ends at its Sync, so any server connection can serve any call.
//
// Deadlines: each public method reads its wall-clock deadline once, on entry, against the
// pool's wall_clock() (absl::Now() when unset), and times everything after that on the steady
// clock: the wait in the batch queue and for a connection, statement_timeout, back-offs, the
// wait for PostgreSQL's answer. A wall-clock step (NTP, a resumed VM) in the middle of a call
// thus neither stretches what is left of it by the step nor ends it early.
//
// Thread-safe (connections come from the PgPool). Serialization failures and deadlocks
// (40001/40P01) are retried up to max_attempts runs in all, then ABORTED (UNAVAILABLE if the
// deadline comes first).
class PgLedgerStore final : public LedgerStore {
 public:
  explicit PgLedgerStore(PgPool& pool, PgLedgerStoreOptions options = {});

  absl::StatusOr<Account> CreateAccount(absl::string_view owner_user_id, absl::string_view currency,
                                        absl::Time deadline) override;
  absl::StatusOr<Account> GetAccount(absl::string_view account_id, absl::Time deadline) override;
  absl::StatusOr<Transaction> ApplyMovement(const MoneyMovement& movement,
                                            absl::Time deadline) override;
  absl::StatusOr<TransactionPage> ListTransactions(absl::string_view acting_user_id,
                                                   absl::string_view account_id, int64_t before_seq,
                                                   int limit, absl::Time deadline) override;

  // For metrics. Statements run again after a serialization failure, deadlock or lost
  // connection.
  int64_t retries() const { return retries_.load(std::memory_order_relaxed); }
  // Committed transactions that carried more than one movement, and the movements they
  // carried (their ratio is the mean batch size).
  int64_t batches() const { return batches_.load(std::memory_order_relaxed); }
  int64_t batched_movements() const { return batched_movements_.load(std::memory_order_relaxed); }
  // Batches that failed as a whole, so that each of their movements ran again alone.
  int64_t batch_fallbacks() const { return batch_fallbacks_.load(std::memory_order_relaxed); }
  // Movements waiting for a leader now (a gauge).
  int queued_movements() const;

 private:
  struct Pending;

  // The steady time at which a call's wall-clock `deadline` falls, read now (once per call).
  SteadyTime GiveUpAt(absl::Time deadline) const;
  // Runs `statement` after the statement_timeout prefix on a pooled connection and returns its
  // result. Retries 40001/40P01 and, when `idempotent`, one lost connection.
  absl::StatusOr<PgResultPtr> Run(const PgStatement& statement, bool idempotent,
                                  SteadyTime give_up);
  absl::StatusOr<Transaction> ApplyOnce(const MoneyMovement& movement, SteadyTime give_up,
                                        bool* retry_key_race);
  // The single-movement path: ApplyOnce, re-run after a key race.
  absl::StatusOr<Transaction> ApplyAlone(const MoneyMovement& movement, SteadyTime give_up);

  // With batch_mutex_ held: moves `self` and up to max_batch - 1 other queued movements out of
  // the queue; answers or releases those that cannot join.
  std::vector<Pending*> TakeBatchLocked(Pending* self);
  // Runs `batch` (the leader's movement first) and gives each movement its outcome.
  void RunBatch(const std::vector<Pending*>& batch);
  // Hands `p` its final result, or sends it to the single path when `result` is empty.
  void Settle(Pending* p, std::optional<absl::StatusOr<Transaction>> result);
  // With batch_mutex_ held: whether a queued caller may start a batch now.
  bool MayLeadLocked() const;
  // With batch_mutex_ held: wakes the oldest queued caller if it may start a batch.
  void WakeNextLeaderLocked();

  PgPool& pool_;
  const int max_batch_;
  const int max_leaders_;
  const int parallel_threshold_;
  const int eager_leaders_;
  const int max_attempts_;
  std::atomic<int64_t> retries_{0};
  std::atomic<int64_t> batches_{0};
  std::atomic<int64_t> batched_movements_{0};
  std::atomic<int64_t> batch_fallbacks_{0};

  mutable std::mutex batch_mutex_;
  std::deque<Pending*> queue_;  // Guarded by batch_mutex_; oldest first.
  int leaders_ = 0;             // Guarded by batch_mutex_.
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_POSTGRES_PG_LEDGER_STORE_H_
