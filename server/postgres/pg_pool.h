#ifndef SESSIONLEDGER_SERVER_POSTGRES_PG_POOL_H_
#define SESSIONLEDGER_SERVER_POSTGRES_PG_POOL_H_

#include <libpq-fe.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/common/clock.h"
#include "server/common/host_resolver.h"
#include "server/postgres/pg_connect_target.h"

namespace sessionledger {

struct PgResultDeleter {
  void operator()(PGresult* r) const { PQclear(r); }
};
using PgResultPtr = std::unique_ptr<PGresult, PgResultDeleter>;

// Payload key under which a failed statement's SQLSTATE is attached to its absl::Status.
inline constexpr char kSqlStatePayload[] = "sessionledger/sqlstate";

// What a caller reads when a constraint of the schema (SQLSTATE class 23) refused a change.
inline constexpr char kRefusedByAConstraint[] =
    "request: refused by a rule of the ledger's records; nothing was changed";

// The SQLSTATE attached to `status`, or "" when there is none.
std::string SqlStateOf(const absl::Status& status);
// True for SQLSTATE 40001 (serialization_failure) and 40P01 (deadlock_detected): the
// transaction did nothing and may simply be run again.
bool IsRetryableTransactionFailure(const absl::Status& status);
// True when the connection that gave `status` should be replaced even though it is still up:
// SQLSTATE 25006, a read-only server (a standby, or the old primary after a failover).
bool NeedsFreshConnection(const absl::Status& status);

// One statement of a pipeline: SQL with $n placeholders and its text parameters.
struct PgStatement {
  absl::string_view sql;
  std::vector<std::optional<std::string>> params;
};

// One libpq connection, move-only, closed on destruction. Every call takes a deadline and
// never blocks past it: libpq is driven in non-blocking mode with poll(2), and at the deadline
// the connection is closed and marked broken (no cancel request: PostgreSQL runs the statement
// on until its statement_timeout, which the ledger sets before every statement).
// Not thread-safe: one thread uses a connection at a time (the pool guarantees that).
class PgConnection {
 public:
  // Connects without blocking past `deadline`, host name lookups included (they run on
  // `resolver`'s threads, see HostResolver). UNAVAILABLE when a host name does not resolve in
  // time or at all, or PostgreSQL cannot be reached or refuses (the message never contains the
  // password). `wall_clock`: what `deadline` is read against (absl::Now() when unset; tests
  // step one).
  static absl::StatusOr<PgConnection> Connect(const PgConnectTarget& target, HostResolver& resolver,
                                              absl::Time deadline,
                                              const Clock* wall_clock = nullptr);
  // The same for a one-off connection, with a resolver of its own: its lookup is shared with no
  // other caller. Repeated connects (probes, retries) should share a resolver instead, so that
  // a DNS outage costs one lookup thread per name rather than one per attempt.
  static absl::StatusOr<PgConnection> Connect(const std::string& conninfo, absl::Time deadline,
                                              const Clock* wall_clock = nullptr);

  PgConnection(PgConnection&& other) noexcept : conn_(std::exchange(other.conn_, nullptr)) {}
  PgConnection& operator=(PgConnection&& other) noexcept;
  PgConnection(const PgConnection&) = delete;
  PgConnection& operator=(const PgConnection&) = delete;
  ~PgConnection();

  // Runs one parameterized statement (text parameters; std::nullopt is SQL NULL).
  // Result status: OK with the result for PGRES_COMMAND_OK / TUPLES_OK; UNAVAILABLE for a lost
  // connection or the deadline; otherwise a status by SQLSTATE (23xxx integrity violations
  // FAILED_PRECONDITION, 40001/40P01 ABORTED, 57014 query_canceled UNAVAILABLE, the rest
  // INTERNAL), with the SQLSTATE attached as payload. SQL text never goes into the message.
  absl::StatusOr<PgResultPtr> Exec(absl::string_view sql,
                                   const std::vector<std::optional<std::string>>& params,
                                   absl::Time deadline);
  // The same, for a deadline already on the steady clock: a caller that makes several calls
  // for one request converts its deadline once and passes that (a wall-clock step between the
  // calls then changes none of their budgets).
  absl::StatusOr<PgResultPtr> Exec(absl::string_view sql,
                                   const std::vector<std::optional<std::string>>& params,
                                   SteadyTime give_up);
  // Sends every statement and then a Sync in one network round trip (libpq pipeline mode).
  // PostgreSQL runs them as one implicit transaction that commits at the Sync, or rolls back
  // entirely at the first error; so this returns only after the commit is durable, and the
  // connection is idle again afterwards (no session state left behind, which keeps it usable
  // behind PgBouncer's transaction pooling). Unnamed statements only. The results, one per
  // statement, or the first error with the same mapping as Exec. `give_up` is on the steady
  // clock (see Exec).
  absl::StatusOr<std::vector<PgResultPtr>> ExecPipeline(const std::vector<PgStatement>& statements,
                                                        SteadyTime give_up);
  // Runs SQL without parameters (several statements allowed); for BEGIN/COMMIT and migrations.
  absl::StatusOr<PgResultPtr> ExecSimple(absl::string_view sql, absl::Time deadline);

  bool healthy() const { return conn_ != nullptr && PQstatus(conn_) == CONNECTION_OK; }
  // False when an idle connection has been closed by the server (restart, admin shutdown,
  // idle timeout): an idle connection has nothing to read, so a readable socket means a
  // termination notice or EOF. One non-blocking poll(2); the pool calls it before lending.
  bool StillUsable() const;
  PGconn* raw() const { return conn_; }

 private:
  explicit PgConnection(PGconn* conn) : conn_(conn) {}
  friend class PgPool;
  // Connect, by a deadline on the steady clock (the pool's, already converted).
  static absl::StatusOr<PgConnection> ConnectBy(const PgConnectTarget& target,
                                                HostResolver& resolver, SteadyTime give_up);
  // One connection attempt by libpq, to the hosts `overrides` lists (all of the conninfo's when
  // null).
  static absl::StatusOr<PgConnection> ConnectTo(const std::string& conninfo,
                                                const PgConnectTarget::Overrides* overrides,
                                                SteadyTime give_up);
  // Sends with PQsend*, then waits for and collects the results until `give_up`.
  absl::StatusOr<PgResultPtr> Collect(SteadyTime give_up);
  absl::Status WaitSocket(bool for_write, SteadyTime give_up);
  void CancelAndBreak();

  PGconn* conn_;
};

struct PgPoolOptions {
  std::string conninfo;  // DATABASE_URL.
  int size = 8;
  absl::Duration connect_timeout = absl::Seconds(3);
  // Looks up the hosts of `conninfo` for each new connection; when unset, the pool makes its
  // own (getaddrinfo). Share one with other connects to the same database (the health probe).
  std::shared_ptr<HostResolver> resolver;
  // What a caller's deadline is read against, once per call (absl::Now() when unset; tests step
  // one): every later wait of the call is timed on the steady clock. PgLedgerStore reads it
  // too, through wall_clock().
  const Clock* wall_clock = nullptr;
};

// A bounded, thread-safe pool of PgConnections. Connections are opened lazily up to `size` and
// reopened when found broken, so the pool recovers by itself after PostgreSQL restarts. Each new
// connection looks its host names up again (a failover may have moved them), within the
// caller's deadline.
// A lease whose user saw a connection-level failure (or is unsure of the session state, e.g. a
// transaction left open) calls MarkBroken(): the connection is closed instead of returned.
class PgPool {
 public:
  class Lease {
   public:
    Lease(Lease&& other) noexcept
        : pool_(std::exchange(other.pool_, nullptr)),
          conn_(std::move(other.conn_)),
          broken_(other.broken_) {}
    Lease& operator=(Lease&&) = delete;
    Lease(const Lease&) = delete;
    ~Lease();

    PgConnection& conn() { return *conn_; }
    PgConnection* operator->() { return &*conn_; }
    void MarkBroken() { broken_ = true; }

   private:
    friend class PgPool;
    Lease(PgPool* pool, PgConnection conn) : pool_(pool), conn_(std::move(conn)) {}
    PgPool* pool_;
    std::optional<PgConnection> conn_;
    bool broken_ = false;
  };

  explicit PgPool(PgPoolOptions options);
  PgPool(const PgPool&) = delete;
  PgPool& operator=(const PgPool&) = delete;

  // An idle connection, or a new one while fewer than `size` are open; otherwise waits for a
  // return until `deadline` (read against options.wall_clock). UNAVAILABLE on timeout or when
  // PostgreSQL cannot be reached.
  absl::StatusOr<Lease> Acquire(absl::Time deadline);
  // The same, for a deadline already on the steady clock.
  absl::StatusOr<Lease> Acquire(SteadyTime give_up);

  // Closes every idle connection, so that the next Acquire opens a new one. For a failure that
  // says where the pooled connections lead is wrong (a read-only server after a failover): the
  // idle ones were opened to the same address, and retrying on one of them fails the same way.
  void DropIdle();

  int size() const { return options_.size; }
  // options.wall_clock: null for absl::Now().
  const Clock* wall_clock() const { return options_.wall_clock; }
  // Connections open now (idle + leased) and callers waiting for one; for metrics.
  int open_connections() const;
  int idle_connections() const;
  int64_t total_waits() const;

 private:
  void Return(std::optional<PgConnection> conn, bool broken);

  const PgPoolOptions options_;
  const PgConnectTarget target_;  // options_.conninfo, parsed once.
  const std::shared_ptr<HostResolver> resolver_;
  mutable std::mutex mutex_;
  std::condition_variable returned_;
  std::vector<PgConnection> idle_;
  int open_ = 0;
  int64_t waits_ = 0;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_POSTGRES_PG_POOL_H_
