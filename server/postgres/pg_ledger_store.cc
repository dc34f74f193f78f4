#include "server/postgres/pg_ledger_store.h"

#include <random>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/common/status_macros.h"

namespace sessionledger {
namespace {

// Serialization/deadlock retries, and key-race re-runs, per call.
constexpr int kMaxAttempts = 5;

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

// The key alone, with a fresh snapshot: after a refused movement, a concurrent request with the
// same key may have committed while this one waited for the account locks.
constexpr absl::string_view kLookupKey = R"sql(
SELECT transaction_id, kind, from_account_id, to_account_id, amount_minor, currency,
       (extract(epoch FROM created_at) * 1000000)::bigint, seq,
       encode(request_fingerprint, 'hex')
FROM transactions WHERE user_id = $1 AND idempotency_key = $2)sql";

// $1 account, $2 acting user, $3 before_seq, $4 limit + 1 (one extra row says "more").
// One row with NULL transaction columns when the account exists but has no (visible) rows or
// is not the user's; no row when the account does not exist.
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
  ORDER BY seq DESC LIMIT $4::int
) t ON a.owner_user_id = $2
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

// A short randomised pause before re-running a transaction that lost a serialization race, so
// that the competitors do not collide again in lockstep.
void Backoff(int attempt, absl::Time deadline) {
  thread_local std::minstd_rand random(std::random_device{}());
  const int64_t max_micros = 1000 << std::min(attempt, 5);
  const absl::Duration pause =
      absl::Microseconds(std::uniform_int_distribution<int64_t>(0, max_micros)(random));
  absl::SleepFor(std::min(pause, std::max(absl::ZeroDuration(), deadline - absl::Now())));
}

}  // namespace

absl::StatusOr<PgResultPtr> PgLedgerStore::Run(const PgStatement& statement, bool idempotent,
                                               absl::Time deadline) {
  absl::Status last;
  bool retried_connection = false;
  for (int attempt = 0; attempt < kMaxAttempts; ++attempt) {
    // Back off here, after the previous attempt's lease went back to the pool, so a sleeping
    // retry never holds a connection that another call could use.
    if (IsRetryableTransactionFailure(last)) Backoff(attempt, deadline);
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return last.ok() ? absl::UnavailableError("postgres: the call's deadline has passed") : last;
    }
    SL_ASSIGN_OR_RETURN(PgPool::Lease lease, pool_.Acquire(deadline));
    // Leave PostgreSQL a margin to report its own timeout before our deadline, so the
    // connection survives (a client-side timeout has to drop it).
    const absl::Duration server_budget =
        std::max(absl::Milliseconds(1), left - std::min(left / 5, absl::Milliseconds(200)));
    const std::vector<PgStatement> statements = {
        {kSetStatementTimeout, {absl::StrCat(absl::ToInt64Milliseconds(server_budget))}},
        statement};
    absl::StatusOr<std::vector<PgResultPtr>> results = lease->ExecPipeline(statements, deadline);
    if (results.ok()) return std::move((*results)[1]);
    last = results.status();
    if (!lease->healthy()) lease.MarkBroken();
    if (IsRetryableTransactionFailure(last)) {
      retries_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    // A pooled connection can die between its stale check and its use (PostgreSQL restarting):
    // one retry on a fresh connection, only when running the statement twice is harmless.
    if (idempotent && !retried_connection && last.code() == absl::StatusCode::kUnavailable &&
        !lease->healthy()) {
      retried_connection = true;
      retries_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    return last;
  }
  if (IsRetryableTransactionFailure(last)) {
    return absl::AbortedError(
        "postgres: the transaction kept conflicting with concurrent ones; retry the call");
  }
  return last;
}

absl::StatusOr<Account> PgLedgerStore::CreateAccount(absl::string_view owner_user_id,
                                                     absl::string_view currency,
                                                     absl::Time deadline) {
  // Not idempotent: a retry after a lost reply could open a second account.
  SL_ASSIGN_OR_RETURN(PgResultPtr result,
                      Run({kCreateAccount, {std::string(owner_user_id), std::string(currency)}},
                          /*idempotent=*/false, deadline));
  if (PQntuples(result.get()) != 1) return absl::InternalError("postgres: account not created");
  return AccountFromRow(result.get(), 0);
}

absl::StatusOr<Account> PgLedgerStore::GetAccount(absl::string_view account_id,
                                                  absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(PgResultPtr result, Run({kGetAccount, {std::string(account_id)}},
                                              /*idempotent=*/true, deadline));
  if (PQntuples(result.get()) == 0) return absl::NotFoundError("account_id: no such account");
  return AccountFromRow(result.get(), 0);
}

absl::StatusOr<Transaction> PgLedgerStore::ApplyOnce(const MoneyMovement& m, absl::Time deadline,
                                                     bool* retry_key_race) {
  *retry_key_race = false;
  const bool transfer = m.kind == TransactionKind::kTransfer;
  // Idempotent thanks to the key: a re-run after a lost connection replays or applies once.
  SL_ASSIGN_OR_RETURN(PgResultPtr result,
                      Run({kApplyMovement,
                           {m.acting_user_id, m.idempotency_key,
                            absl::StrCat("\\x", absl::BytesToHexString(m.fingerprint)),
                            transfer ? std::optional<std::string>(m.from_account_id) : std::nullopt,
                            m.to_account_id, absl::StrCat(m.amount_minor),
                            std::string(TransactionKindName(m.kind))}},
                          /*idempotent=*/true, deadline));
  const PGresult* r = result.get();
  if (PQntuples(r) != 1 || PQnfields(r) != 20) {
    return absl::InternalError("postgres: unexpected result shape for a movement");
  }
  if (!IsNull(r, 0, 0)) {
    if (Int(r, 0, 4) != (transfer ? 2 : 1)) {
      // Cannot happen with the locks held; refuse loudly rather than report a half move. The
      // transaction has committed, so this is worth an alert, not a retry.
      return absl::InternalError("postgres: movement recorded with an unexpected balance update");
    }
    Transaction t;
    t.transaction_id = Text(r, 0, 0);
    t.created_at = Micros(r, 0, 1);
    t.seq = Int(r, 0, 2);
    t.currency = Text(r, 0, 3);
    t.kind = m.kind;
    t.from_account_id = m.from_account_id;
    t.to_account_id = m.to_account_id;
    t.amount_minor = m.amount_minor;
    t.idempotency_key = m.idempotency_key;
    return t;
  }
  if (!IsNull(r, 0, 5)) {
    return Replay(m, TransactionFromColumns(r, 0, 5, m.idempotency_key), Text(r, 0, 13));
  }
  MovementFacts facts;
  facts.from_found = !IsNull(r, 0, 14);
  facts.from_owner = Text(r, 0, 14);
  facts.from_currency = Text(r, 0, 15);
  facts.from_balance = Int(r, 0, 16);
  facts.to_found = !IsNull(r, 0, 17);
  facts.to_owner = Text(r, 0, 17);
  facts.to_currency = Text(r, 0, 18);
  facts.to_balance = Int(r, 0, 19);
  absl::Status failure = MovementFailure(m, facts);
  if (failure.ok()) {
    // Allowed but not inserted: a concurrent request with the same key won the insert.
    *retry_key_race = true;
    return absl::AbortedError("postgres: idempotency key race");
  }
  // The key was looked up with the snapshot taken before this statement waited for the
  // account locks; an identical request may have committed meanwhile and changed the
  // balances this refusal is based on. Its transaction, not the refusal, is the answer.
  SL_ASSIGN_OR_RETURN(PgResultPtr again, Run({kLookupKey, {m.acting_user_id, m.idempotency_key}},
                                             /*idempotent=*/true, deadline));
  if (PQntuples(again.get()) == 1) {
    return Replay(m, TransactionFromColumns(again.get(), 0, 0, m.idempotency_key),
                  Text(again.get(), 0, 8));
  }
  return failure;
}

absl::StatusOr<Transaction> PgLedgerStore::ApplyMovement(const MoneyMovement& m,
                                                         absl::Time deadline) {
  for (int attempt = 0;; ++attempt) {
    bool key_race = false;
    absl::StatusOr<Transaction> result = ApplyOnce(m, deadline, &key_race);
    if (!key_race) return result;
    if (attempt + 1 >= kMaxAttempts) {
      return absl::AbortedError("postgres: the idempotency key kept racing; retry the call");
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
                          /*idempotent=*/true, deadline));
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
