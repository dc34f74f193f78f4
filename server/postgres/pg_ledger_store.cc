#include "server/postgres/pg_ledger_store.h"

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <random>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "server/common/clock.h"
#include "server/common/status_macros.h"

namespace sessionledger {
namespace {

// A movement with less time left than this does not join a batch (it runs alone): the batch's
// statement_timeout comes from its earliest deadline, and one hurried caller should not cut
// the budget of the others.
constexpr absl::Duration kMinBatchBudget = absl::Milliseconds(100);

constexpr absl::string_view kDeadlinePassed = "postgres: the call's deadline has passed";

constexpr absl::string_view kSetStatementTimeout =
    "SELECT set_config('statement_timeout', $1, true)";

constexpr absl::string_view kCreateAccount = R"sql(
INSERT INTO accounts (account_id, owner_user_id, currency)
VALUES (gen_random_uuid(), $1, $2)
RETURNING account_id, owner_user_id, currency, balance_minor,
          (extract(epoch FROM created_at) * 1000000)::bigint)sql";

constexpr absl::string_view kGetAccount = R"sql(
SELECT account_id, owner_user_id, currency, balance_minor,
       (extract(epoch FROM created_at) * 1000000)::bigint
FROM accounts WHERE account_id = $1::uuid)sql";

// $1 user, $2 key, $3 fingerprint (bytea), $4 from (NULL for deposits), $5 to, $6 amount,
// $7 kind. The CTE lives in the function (migration 2) so that its plan is cached per
// connection; its 20 output columns are read by position below.
constexpr absl::string_view kApplyMovement =
    "SELECT * FROM ledger_apply_movement($1, $2, $3::bytea, $4::uuid, $5::uuid, $6::bigint, $7)";

// The columns of ledger_apply_movement's row.
constexpr int kMovementColumns = 20;

// Locks every account of a batch ($1, a uuid[] literal) before any movement runs. The LockRows
// node sits above the Sort, so rows are locked in account_id order: the order in which
// ledger_apply_movement locks its two accounts, which keeps batches, single movements and other
// replicas free of deadlocks over accounts.
constexpr absl::string_view kLockAccounts =
    "SELECT 1 FROM accounts WHERE account_id = ANY($1::uuid[]) ORDER BY account_id FOR UPDATE";

// The key alone, with a fresh snapshot: after a refused movement, a concurrent request with the
// same key may have committed while this one waited for the account locks.
constexpr absl::string_view kLookupKey = R"sql(
SELECT transaction_id, kind, from_account_id, to_account_id, amount_minor, currency,
       (extract(epoch FROM created_at) * 1000000)::bigint, seq,
       encode(request_fingerprint, 'hex')
FROM transactions WHERE user_id = $1 AND idempotency_key = $2)sql";

// $1 account, $2 acting user, $3 before_seq, $4 limit + 1 (one extra row says "more").
// One row with NULL transaction columns when the account exists but has no (visible) rows or
// is not the user's; no row when the account does not exist. The owner check sits inside the
// lateral subquery, where PostgreSQL makes it a one-time filter: in the join's ON clause it was
// a join filter, and a stranger's call read up to 2 x (page_size + 1) of the account's rows
// before they were thrown away.
constexpr absl::string_view kListTransactions = R"sql(
SELECT a.owner_user_id, t.transaction_id, t.kind, t.from_account_id, t.to_account_id,
       t.amount_minor, t.currency, (extract(epoch FROM t.created_at) * 1000000)::bigint,
       t.seq, t.idempotency_key, t.user_id
FROM accounts a
LEFT JOIN LATERAL (
  SELECT * FROM (
    (SELECT * FROM transactions
     WHERE from_account_id = $1::uuid AND seq < $3::bigint ORDER BY seq DESC LIMIT $4::int)
    UNION ALL
    (SELECT * FROM transactions
     WHERE to_account_id = $1::uuid AND seq < $3::bigint ORDER BY seq DESC LIMIT $4::int)
  ) u
  WHERE a.owner_user_id = $2
  ORDER BY seq DESC LIMIT $4::int
) t ON true
WHERE a.account_id = $1::uuid
ORDER BY t.seq DESC)sql";

bool IsNull(const PGresult* r, int row, int col) { return PQgetisnull(r, row, col) == 1; }
std::string Text(const PGresult* r, int row, int col) {
  return IsNull(r, row, col) ? std::string() : std::string(PQgetvalue(r, row, col));
}
int64_t Int(const PGresult* r, int row, int col) {
  int64_t value = 0;
  if (!IsNull(r, row, col)) (void)absl::SimpleAtoi(PQgetvalue(r, row, col), &value);
  return value;
}
absl::Time Micros(const PGresult* r, int row, int col) {
  return absl::FromUnixMicros(Int(r, row, col));
}

Account AccountFromRow(const PGresult* r, int row) {
  Account account;
  account.account_id = Text(r, row, 0);
  account.owner_user_id = Text(r, row, 1);
  account.currency = Text(r, row, 2);
  account.balance_minor = Int(r, row, 3);
  account.created_at = Micros(r, row, 4);
  return account;
}

// Columns from `first`: transaction_id, kind, from, to, amount, currency, created_at micros,
// seq.
Transaction TransactionFromColumns(const PGresult* r, int row, int first,
                                   absl::string_view idempotency_key) {
  Transaction t;
  t.transaction_id = Text(r, row, first);
  t.kind = Text(r, row, first + 1) == "transfer" ? TransactionKind::kTransfer
                                                 : TransactionKind::kDeposit;
  t.from_account_id = Text(r, row, first + 2);
  t.to_account_id = Text(r, row, first + 3);
  t.amount_minor = Int(r, row, first + 4);
  t.currency = Text(r, row, first + 5);
  t.created_at = Micros(r, row, first + 6);
  t.seq = Int(r, row, first + 7);
  t.idempotency_key = std::string(idempotency_key);
  return t;
}

absl::StatusOr<Transaction> Replay(const MoneyMovement& m, Transaction stored,
                                   absl::string_view stored_fingerprint_hex) {
  if (stored_fingerprint_hex != absl::BytesToHexString(m.fingerprint)) {
    return absl::AlreadyExistsError(
        "idempotency_key: already used by this user with different parameters");
  }
  return stored;
}

// What is left until `give_up`, negative once it has passed.
absl::Duration Left(SteadyTime give_up) { return absl::FromChrono(give_up - SteadyNow()); }

// A short randomised pause before re-running a transaction that lost a serialization race, so
// that the competitors do not collide again in lockstep.
void Backoff(int attempt, SteadyTime give_up) {
  thread_local std::minstd_rand random(std::random_device{}());
  const int64_t max_micros = 1000 << std::min(attempt, 5);
  const absl::Duration pause =
      absl::Microseconds(std::uniform_int_distribution<int64_t>(0, max_micros)(random));
  absl::SleepFor(std::min(pause, std::max(absl::ZeroDuration(), Left(give_up))));
}

// The statement_timeout for a transaction with `left` until its deadline. It leaves PostgreSQL
// a margin to report its own timeout before our deadline, so the connection survives (a
// client-side timeout has to drop it).
// A far deadline is cut to the most statement_timeout takes, which PostgreSQL keeps in a 32-bit
// count of milliseconds and refuses (22023) above it (a steady deadline is at most
// kLongestSteadyWait away, well below that, but the cut costs nothing).
absl::Duration ServerBudget(absl::Duration left) {
  constexpr absl::Duration kLongestStatementTimeout = absl::Milliseconds(INT32_MAX);
  return std::clamp(left - std::min(left / 5, absl::Milliseconds(200)), absl::Milliseconds(1),
                    kLongestStatementTimeout);
}

// statement_timeout for a connection just taken from the pool: the budget of what is left
// now, not of what was left before waiting for a connection (that wait can take most of it,
// and then the call's deadline, which breaks the connection, would come before PostgreSQL's).
std::string StatementTimeoutMillis(SteadyTime give_up) {
  return absl::StrCat(absl::ToInt64Milliseconds(ServerBudget(Left(give_up))));
}

// A batch's two statements (its lock, then its movements) as statement_timeouts that together
// stay within one budget: each statement gets a whole statement_timeout of its own. The lock
// gets a quarter. Batches lock accounts only for the milliseconds a batch runs, so a lock that
// takes longer is held by something else (a long transaction, another stuck caller), and every
// movement of the batch that does not need that account should not wait on it for most of its
// deadline: the batch gives up and each movement runs alone with three quarters left.
struct BatchTimeouts {
  std::string lock_millis;
  std::string apply_millis;
};
BatchTimeouts BatchStatementTimeouts(SteadyTime give_up) {
  const int64_t budget = absl::ToInt64Milliseconds(ServerBudget(Left(give_up)));
  const int64_t lock = std::max<int64_t>(1, budget / 4);
  return {absl::StrCat(lock), absl::StrCat(std::max<int64_t>(1, budget - lock))};
}

PgStatement MovementStatement(const MoneyMovement& m) {
  const bool transfer = m.kind == TransactionKind::kTransfer;
  return {kApplyMovement,
          {m.acting_user_id, m.idempotency_key,
           absl::StrCat("\\x", absl::BytesToHexString(m.fingerprint)),
           transfer ? std::optional<std::string>(m.from_account_id) : std::nullopt, m.to_account_id,
           absl::StrCat(m.amount_minor), std::string(TransactionKindName(m.kind))}};
}

// One statement applying `batch.size()` movements in order, each through ledger_apply_movement
// (one call per row of the VALUES list, in list order: the lateral call runs in a nested loop
// over the Values Scan). A volatile function sees what the calls before it in the same statement
// wrote, so each movement sees the balances and keys the earlier ones left. One statement rather
// than one per movement: parsing, planning and executor start-up once per batch cost about a
// third less PostgreSQL CPU per movement. Output: the function's columns, then the movement's
// position (1-based), ordered by it.
std::string BatchApplySql(size_t movements) {
  std::string sql = "SELECT r.*, m.ord FROM (VALUES ";
  for (size_t i = 0; i < movements; ++i) {
    const size_t p = 7 * i;
    absl::StrAppend(&sql, i == 0 ? "" : ", ", "($", p + 1, "::text, $", p + 2, "::text, $", p + 3,
                    "::bytea, $", p + 4, "::uuid, $", p + 5, "::uuid, $", p + 6, "::bigint, $",
                    p + 7, "::text, ", i + 1, ")");
  }
  absl::StrAppend(&sql,
                  ") AS m (usr, key, fingerprint, src, dst, amount, kind, ord) "
                  "CROSS JOIN LATERAL ledger_apply_movement(m.usr, m.key, m.fingerprint, m.src, "
                  "m.dst, m.amount, m.kind) AS r ORDER BY m.ord");
  return sql;
}

// What one row of ledger_apply_movement means for its movement.
enum class MovementRow {
  kAnswer,   // *answer is final: the new or the replayed transaction, or an error.
  kKeyRace,  // Allowed but not inserted: a concurrent request with the key won the insert.
  kRefused,  // *answer is the MovementFailure() error seen with the statement's snapshot.
};

// Reads `row` of a result whose first kMovementColumns columns are ledger_apply_movement's.
MovementRow ReadMovementRow(const MoneyMovement& m, const PGresult* r, int row,
                            absl::StatusOr<Transaction>* answer) {
  const bool transfer = m.kind == TransactionKind::kTransfer;
  if (!IsNull(r, row, 0)) {
    if (Int(r, row, 4) != (transfer ? 2 : 1)) {
      // Cannot happen with the locks held; refuse loudly rather than report a half move. The
      // transaction has committed, so this is worth an alert, not a retry.
      *answer =
          absl::InternalError("postgres: movement recorded with an unexpected balance update");
      return MovementRow::kAnswer;
    }
    Transaction t;
    t.transaction_id = Text(r, row, 0);
    t.created_at = Micros(r, row, 1);
    t.seq = Int(r, row, 2);
    t.currency = Text(r, row, 3);
    t.kind = m.kind;
    t.from_account_id = m.from_account_id;
    t.to_account_id = m.to_account_id;
    t.amount_minor = m.amount_minor;
    t.idempotency_key = m.idempotency_key;
    *answer = std::move(t);
    return MovementRow::kAnswer;
  }
  if (!IsNull(r, row, 5)) {
    *answer = Replay(m, TransactionFromColumns(r, row, 5, m.idempotency_key), Text(r, row, 13));
    return MovementRow::kAnswer;
  }
  MovementFacts facts;
  facts.from_found = !IsNull(r, row, 14);
  facts.from_owner = Text(r, row, 14);
  facts.from_currency = Text(r, row, 15);
  facts.from_balance = Int(r, row, 16);
  facts.to_found = !IsNull(r, row, 17);
  facts.to_owner = Text(r, row, 17);
  facts.to_currency = Text(r, row, 18);
  facts.to_balance = Int(r, row, 19);
  absl::Status failure = MovementFailure(m, facts);
  if (failure.ok()) {
    *answer = absl::AbortedError("postgres: idempotency key race");
    return MovementRow::kKeyRace;
  }
  *answer = std::move(failure);
  return MovementRow::kRefused;
}

}  // namespace

SteadyTime PgLedgerStore::GiveUpAt(absl::Time deadline) const {
  return SteadyDeadline(deadline, pool_.wall_clock());
}

absl::StatusOr<PgResultPtr> PgLedgerStore::Run(const PgStatement& statement, bool idempotent,
                                               SteadyTime give_up) {
  absl::Status last;
  bool retried_connection = false;
  for (int attempt = 0; attempt < max_attempts_; ++attempt) {
    // Back off here, after the previous attempt's lease went back to the pool, so a sleeping
    // retry never holds a connection that another call could use.
    if (IsRetryableTransactionFailure(last)) Backoff(attempt, give_up);
    if (give_up <= SteadyNow()) {
      if (last.ok()) return absl::UnavailableError(kDeadlinePassed);
      // Out of time while conflicting transactions kept it from committing: the database is too
      // busy for this call, which may be retried, not a conflict the caller could resolve.
      if (IsRetryableTransactionFailure(last)) {
        return absl::UnavailableError(absl::StrCat(kDeadlinePassed, " (", last.message(), ")"));
      }
      return last;
    }
    SL_ASSIGN_OR_RETURN(PgPool::Lease lease, pool_.Acquire(give_up));
    // A connection handed back just as the wait for it ended leaves no time to run anything:
    // sent now, the statement would outlive its caller, and the connection be dropped.
    if (give_up <= SteadyNow()) return absl::UnavailableError(kDeadlinePassed);
    const std::vector<PgStatement> statements = {
        {kSetStatementTimeout, {StatementTimeoutMillis(give_up)}}, statement};
    absl::StatusOr<std::vector<PgResultPtr>> results = lease->ExecPipeline(statements, give_up);
    if (results.ok()) return std::move((*results)[1]);
    last = results.status();
    const bool replace_connection = !lease->healthy() || NeedsFreshConnection(last);
    if (replace_connection) lease.MarkBroken();
    if (NeedsFreshConnection(last)) pool_.DropIdle();
    if (IsRetryableTransactionFailure(last)) {
      retries_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    // A pooled connection can die between its stale check and its use (PostgreSQL restarting),
    // or lead to a server that became read-only (a failover): one retry on a fresh connection,
    // only when running the statement twice is harmless, or when it cannot have run (a
    // read-only server refuses a write before doing anything).
    if ((idempotent || NeedsFreshConnection(last)) && !retried_connection &&
        last.code() == absl::StatusCode::kUnavailable && replace_connection) {
      retried_connection = true;
      retries_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    return last;
  }
  if (IsRetryableTransactionFailure(last)) {
    return absl::AbortedError(
        "request: the transaction kept conflicting with concurrent ones; retry the call");
  }
  return last;
}

absl::StatusOr<Account> PgLedgerStore::CreateAccount(absl::string_view owner_user_id,
                                                     absl::string_view currency,
                                                     absl::Time deadline) {
  // Not idempotent: a retry after a lost reply could open a second account.
  SL_ASSIGN_OR_RETURN(PgResultPtr result,
                      Run({kCreateAccount, {std::string(owner_user_id), std::string(currency)}},
                          /*idempotent=*/false, GiveUpAt(deadline)));
  if (PQntuples(result.get()) != 1) return absl::InternalError("postgres: account not created");
  return AccountFromRow(result.get(), 0);
}

absl::StatusOr<Account> PgLedgerStore::GetAccount(absl::string_view account_id,
                                                  absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(PgResultPtr result, Run({kGetAccount, {std::string(account_id)}},
                                              /*idempotent=*/true, GiveUpAt(deadline)));
  if (PQntuples(result.get()) == 0) return absl::NotFoundError("account_id: no such account");
  return AccountFromRow(result.get(), 0);
}

absl::StatusOr<Transaction> PgLedgerStore::ApplyOnce(const MoneyMovement& m, SteadyTime give_up,
                                                     bool* retry_key_race) {
  *retry_key_race = false;
  // Idempotent thanks to the key: a re-run after a lost connection replays or applies once.
  SL_ASSIGN_OR_RETURN(PgResultPtr result, Run(MovementStatement(m), /*idempotent=*/true, give_up));
  if (PQntuples(result.get()) != 1 || PQnfields(result.get()) != kMovementColumns) {
    return absl::InternalError("postgres: unexpected result shape for a movement");
  }
  absl::StatusOr<Transaction> answer = absl::UnknownError("postgres: no answer");
  switch (ReadMovementRow(m, result.get(), 0, &answer)) {
    case MovementRow::kAnswer:
      return answer;
    case MovementRow::kKeyRace:
      *retry_key_race = true;
      return answer;
    case MovementRow::kRefused:
      break;
  }
  // The key was looked up with the snapshot taken before this statement waited for the
  // account locks; an identical request may have committed meanwhile and changed the
  // balances this refusal is based on. Its transaction, not the refusal, is the answer.
  SL_ASSIGN_OR_RETURN(PgResultPtr again, Run({kLookupKey, {m.acting_user_id, m.idempotency_key}},
                                             /*idempotent=*/true, give_up));
  if (PQntuples(again.get()) == 1) {
    return Replay(m, TransactionFromColumns(again.get(), 0, 0, m.idempotency_key),
                  Text(again.get(), 0, 8));
  }
  return answer;
}

absl::StatusOr<Transaction> PgLedgerStore::ApplyAlone(const MoneyMovement& m, SteadyTime give_up) {
  for (int attempt = 0;; ++attempt) {
    bool key_race = false;
    absl::StatusOr<Transaction> result = ApplyOnce(m, give_up, &key_race);
    if (!key_race) return result;
    if (attempt + 1 >= max_attempts_) {
      return absl::AbortedError(
          "idempotency_key: kept racing with another call that uses it; retry the call");
    }
  }
}

// One queued movement, owned by the caller's stack frame. The caller leaves ApplyMovement only
// when its movement is no longer referenced: still queued (it dequeues itself), or settled.
struct PgLedgerStore::Pending {
  enum class State {
    kQueued,    // In queue_.
    kTaken,     // In a leader's batch.
    kDone,      // `result` is the answer.
    kRunAlone,  // The caller runs it through the single path.
  };
  Pending(const MoneyMovement& m, SteadyTime g) : movement(m), give_up(g) {}

  const MoneyMovement& movement;
  // The caller's deadline on the steady clock, read once when the call came in: the leader
  // that runs this movement times it on that, not on the wall clock of its own moment.
  const SteadyTime give_up;
  // Guarded by batch_mutex_.
  State state = State::kQueued;
  absl::StatusOr<Transaction> result = absl::UnknownError("postgres: no answer");
  std::condition_variable wake;
};

absl::Status CheckTransactionIsolation(PgConnection& conn, absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(
      PgResultPtr result,
      conn.Exec("SELECT current_setting('default_transaction_isolation')", {}, deadline));
  const absl::string_view level = PQgetvalue(result.get(), 0, 0);
  // PostgreSQL runs READ UNCOMMITTED as READ COMMITTED.
  if (level == "read committed" || level == "read uncommitted") return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "PostgreSQL's default_transaction_isolation is '", level,
      "'; the ledger needs 'read committed' (under a stricter level every transfer that waits "
      "for a busy account fails): ALTER ROLE <this role> SET default_transaction_isolation = "
      "'read committed', or RESET it where it was set (database, role, PgBouncer connect_query)"));
}

PgLedgerStore::PgLedgerStore(PgPool& pool, PgLedgerStoreOptions options)
    : pool_(pool),
      max_batch_(std::max(1, options.max_batch)),
      max_leaders_(options.max_concurrent_batches > 0 ? options.max_concurrent_batches
                                                      : std::max(1, pool.size())),
      parallel_threshold_(options.parallel_batch_threshold > 0 ? options.parallel_batch_threshold
                                                               : std::max(1, max_batch_ / 2)),
      eager_leaders_(std::min(max_leaders_, std::max(1, options.eager_batches))),
      max_attempts_(std::max(1, options.max_attempts)) {}

int PgLedgerStore::queued_movements() const {
  std::lock_guard<std::mutex> lock(batch_mutex_);
  return static_cast<int>(queue_.size());
}

absl::StatusOr<Transaction> PgLedgerStore::ApplyMovement(const MoneyMovement& m,
                                                         absl::Time deadline) {
  // The one reading of the wall clock for this call: the wait below, the batch that carries the
  // movement and the single path all time it on the steady clock, so that a wall-clock step
  // neither stretches what is left of it nor ends it early.
  const SteadyTime give_up = GiveUpAt(deadline);
  Pending self(m, give_up);
  std::unique_lock<std::mutex> lock(batch_mutex_);
  queue_.push_back(&self);
  for (;;) {
    switch (self.state) {
      case Pending::State::kDone:
        return std::move(self.result);
      case Pending::State::kRunAlone:
        lock.unlock();
        return ApplyAlone(m, give_up);
      case Pending::State::kTaken:
        // The leader answers within the batch's deadline, which is at most ours.
        self.wake.wait(lock);
        continue;
      case Pending::State::kQueued:
        break;
    }
    if (SteadyNow() >= give_up) {
      queue_.erase(std::find(queue_.begin(), queue_.end(), &self));
      // A leader that finished may have woken this caller as the next one: pass that on, or
      // the callers behind it would wait for a free slot until their own deadlines.
      WakeNextLeaderLocked();
      return absl::UnavailableError(
          "postgres: the call's deadline passed while it waited for a connection");
    }
    if (MayLeadLocked()) {
      ++leaders_;
      const std::vector<Pending*> batch = TakeBatchLocked(&self);
      WakeNextLeaderLocked();  // Another slot may be free as well.
      lock.unlock();
      RunBatch(batch);
      lock.lock();
      --leaders_;
      WakeNextLeaderLocked();
      continue;  // Settled now: kDone or kRunAlone.
    }
    self.wake.wait_until(lock, give_up);
  }
}

bool PgLedgerStore::MayLeadLocked() const {
  return leaders_ < eager_leaders_ ||
         (leaders_ < max_leaders_ && static_cast<int>(queue_.size()) >= parallel_threshold_);
}

void PgLedgerStore::WakeNextLeaderLocked() {
  if (!queue_.empty() && MayLeadLocked()) queue_.front()->wake.notify_one();
}

std::vector<PgLedgerStore::Pending*> PgLedgerStore::TakeBatchLocked(Pending* self) {
  queue_.erase(std::find(queue_.begin(), queue_.end(), self));
  self->state = Pending::State::kTaken;
  std::vector<Pending*> batch = {self};
  const SteadyTime now = SteadyNow();
  const SteadyDuration min_budget = ToSteadyDuration(kMinBatchBudget);
  // A hurried leader runs alone rather than shorten a batch's budget.
  if (self->give_up - now < min_budget) return batch;
  while (!queue_.empty() && static_cast<int>(batch.size()) < max_batch_) {
    Pending* p = queue_.front();
    queue_.pop_front();
    if (p->give_up <= now) {
      p->result = absl::UnavailableError(
          "postgres: the call's deadline passed while it waited for a connection");
      p->state = Pending::State::kDone;
      p->wake.notify_one();
    } else if (p->give_up - now < min_budget) {
      p->state = Pending::State::kRunAlone;
      p->wake.notify_one();
    } else {
      p->state = Pending::State::kTaken;
      batch.push_back(p);
    }
  }
  return batch;
}

void PgLedgerStore::Settle(Pending* p, std::optional<absl::StatusOr<Transaction>> result) {
  std::lock_guard<std::mutex> lock(batch_mutex_);
  if (result.has_value()) {
    p->result = *std::move(result);
    p->state = Pending::State::kDone;
  } else {
    p->state = Pending::State::kRunAlone;
  }
  // Under the mutex: once it sees the new state the caller may return and destroy `p`.
  p->wake.notify_one();
}

void PgLedgerStore::RunBatch(const std::vector<Pending*>& batch) {
  if (batch.size() == 1) {
    Settle(batch[0], ApplyAlone(batch[0]->movement, batch[0]->give_up));
    return;
  }
  SteadyTime give_up = SteadyTime::max();
  std::vector<std::string> accounts;
  accounts.reserve(2 * batch.size());
  for (const Pending* p : batch) {
    give_up = std::min(give_up, p->give_up);
    if (p->movement.kind == TransactionKind::kTransfer) {
      accounts.push_back(p->movement.from_account_id);
    }
    accounts.push_back(p->movement.to_account_id);
  }
  std::sort(accounts.begin(), accounts.end());
  accounts.erase(std::unique(accounts.begin(), accounts.end()), accounts.end());

  const std::string apply_sql = BatchApplySql(batch.size());
  PgStatement apply{apply_sql, {}};
  apply.params.reserve(7 * batch.size());
  for (const Pending* p : batch) {
    PgStatement one = MovementStatement(p->movement);
    for (auto& param : one.params) apply.params.push_back(std::move(param));
  }
  // The timeouts are set once a connection is ours.
  constexpr size_t kLockTimeout = 0;
  constexpr size_t kApplyTimeout = 2;
  constexpr size_t kApplyRows = 3;
  std::vector<PgStatement> statements;
  statements.reserve(4);
  statements.push_back({kSetStatementTimeout, {""}});
  // Account ids are canonical UUIDs (the ledger layer checks them), so they need no quoting
  // inside the array literal; anything else fails the cast and the batch falls back.
  statements.push_back({kLockAccounts, {absl::StrCat("{", absl::StrJoin(accounts, ","), "}")}});
  statements.push_back({kSetStatementTimeout, {""}});
  statements.push_back(std::move(apply));

  // The lease goes back to the pool before anyone is answered, so a caller sent to the single
  // path finds it free.
  absl::StatusOr<std::vector<PgResultPtr>> results =
      [&]() -> absl::StatusOr<std::vector<PgResultPtr>> {
    if (give_up <= SteadyNow()) {
      return absl::UnavailableError(kDeadlinePassed);
    }
    SL_ASSIGN_OR_RETURN(PgPool::Lease lease, pool_.Acquire(give_up));
    if (give_up <= SteadyNow()) return absl::UnavailableError(kDeadlinePassed);
    BatchTimeouts timeouts = BatchStatementTimeouts(give_up);
    statements[kLockTimeout].params[0] = std::move(timeouts.lock_millis);
    statements[kApplyTimeout].params[0] = std::move(timeouts.apply_millis);
    absl::StatusOr<std::vector<PgResultPtr>> r = lease->ExecPipeline(statements, give_up);
    if (!r.ok() && (!lease->healthy() || NeedsFreshConnection(r.status()))) lease.MarkBroken();
    if (!r.ok() && NeedsFreshConnection(r.status())) pool_.DropIdle();
    if (!r.ok()) return r;
    // One row per movement, in order. Anything else (which cannot happen) is handled like a
    // failed batch: whatever committed is replayed by the single path.
    const PGresult* rows = (*r)[kApplyRows].get();
    if (PQntuples(rows) != static_cast<int>(batch.size()) ||
        PQnfields(rows) != kMovementColumns + 1) {
      return absl::InternalError("postgres: unexpected result shape for a batch");
    }
    for (int i = 0; i < PQntuples(rows); ++i) {
      if (Int(rows, i, kMovementColumns) != i + 1) {
        return absl::InternalError("postgres: batch rows out of order");
      }
    }
    return r;
  }();

  if (!results.ok()) {
    // Nothing, or (after a lost commit acknowledgement) everything, was applied: the single
    // path, idempotent by the key, applies or replays each movement.
    batch_fallbacks_.fetch_add(1, std::memory_order_relaxed);
    for (Pending* p : batch) Settle(p, std::nullopt);
    return;
  }
  batches_.fetch_add(1, std::memory_order_relaxed);
  batched_movements_.fetch_add(static_cast<int64_t>(batch.size()), std::memory_order_relaxed);
  for (size_t i = 0; i < batch.size(); ++i) {
    Pending* p = batch[i];
    absl::StatusOr<Transaction> answer = absl::UnknownError("postgres: no answer");
    switch (
        ReadMovementRow(p->movement, (*results)[kApplyRows].get(), static_cast<int>(i), &answer)) {
      case MovementRow::kAnswer:
      // The rows were read after the batch held every account lock, so a committed identical
      // request would have been seen as the key's transaction: no re-check of the key needed.
      case MovementRow::kRefused:
        Settle(p, std::move(answer));
        break;
      case MovementRow::kKeyRace:
        // Nothing applied for it; alone, it will replay the winner's transaction.
        Settle(p, std::nullopt);
        break;
    }
  }
}

absl::StatusOr<TransactionPage> PgLedgerStore::ListTransactions(absl::string_view acting_user_id,
                                                                absl::string_view account_id,
                                                                int64_t before_seq, int limit,
                                                                absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(PgResultPtr result,
                      Run({kListTransactions,
                           {std::string(account_id), std::string(acting_user_id),
                            absl::StrCat(before_seq), absl::StrCat(limit + 1)}},
                          /*idempotent=*/true, GiveUpAt(deadline)));
  const PGresult* r = result.get();
  const int rows = PQntuples(r);
  if (rows == 0) return absl::NotFoundError("account_id: no such account");
  if (Text(r, 0, 0) != acting_user_id) {
    return absl::PermissionDeniedError("account_id: not an account of the acting user");
  }
  TransactionPage page;
  for (int row = 0; row < rows; ++row) {
    if (IsNull(r, row, 1)) continue;  // The account has no transactions (before the cursor).
    if (static_cast<int>(page.transactions.size()) == limit) {
      page.more = true;
      break;
    }
    // Another user's key (a transfer into this account) is theirs, not the lister's: keys can
    // carry client-side identifiers such as order numbers.
    const bool own_key = Text(r, row, 10) == acting_user_id;
    page.transactions.push_back(
        TransactionFromColumns(r, row, 1, own_key ? Text(r, row, 9) : std::string()));
  }
  return page;
}

}  // namespace sessionledger
