#include "server/postgres/pg_pool.h"

#include <poll.h>

#include <algorithm>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/common/fd_wait.h"
#include "server/domain/caller_message.h"

namespace sessionledger {
namespace {

// libpq messages end in a newline and may span lines; logs want one line.
std::string OneLine(const char* message) {
  std::string text = message != nullptr ? message : "";
  for (char& c : text) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

absl::Status StatusFromResult(const PGresult* result) {
  const char* state = PQresultErrorField(result, PG_DIAG_SQLSTATE);
  const std::string sqlstate = state != nullptr ? state : "";
  const char* primary = PQresultErrorField(result, PG_DIAG_MESSAGE_PRIMARY);
  const std::string message = absl::StrCat(
      "postgres: ", OneLine(primary != nullptr ? primary : PQresultErrorMessage(result)),
      sqlstate.empty() ? "" : absl::StrCat(" (SQLSTATE ", sqlstate, ")"));
  absl::Status status;
  if (sqlstate == "40001" || sqlstate == "40P01") {
    status = absl::AbortedError(message);
  } else if (absl::StartsWith(sqlstate, "23")) {
    // The domain's rules run first, so a constraint of the schema refusing a change is its
    // backstop; PostgreSQL's words name tables, columns and values, for the log only.
    status = ForCallers(absl::StatusCode::kFailedPrecondition, kRefusedByAConstraint,
                        absl::FailedPreconditionError(message));
  } else if (sqlstate == "57014" || absl::StartsWith(sqlstate, "08") || sqlstate == "57P01" ||
             sqlstate == "57P02" || sqlstate == "57P03" || sqlstate == "57P05" ||
             absl::StartsWith(sqlstate, "53") || sqlstate == "25006" || sqlstate == "55P03" ||
             sqlstate == "58030") {
    // query_canceled (statement_timeout), connection exceptions, admin/crash shutdown, the
    // server starting up, an idle session closed, insufficient resources (disk, memory,
    // connections), a read-only server (a standby, say the old primary after a failover), a
    // lock_timeout, an I/O error: the database's trouble, not the call's. The contract makes
    // that UNAVAILABLE, which clients retry, never INTERNAL.
    status = absl::UnavailableError(message);
  } else {
    status = absl::InternalError(message);
  }
  if (!sqlstate.empty()) status.SetPayload(kSqlStatePayload, absl::Cord(sqlstate));
  return status;
}

// Why each attempt at a host list failed, in the order they were made, as one status.
absl::Status OneFailure(const std::vector<absl::Status>& failures) {
  if (failures.size() == 1) return failures.front();
  return absl::UnavailableError(absl::StrJoin(
      failures, "; ",
      [](std::string* out, const absl::Status& s) { absl::StrAppend(out, s.message()); }));
}

// When one attempt of a host list gives up on its host, with `after` more hosts to try: after
// an even share of what is left, so that every host gets a chance within the deadline (the
// pool's 3 s, the health probe's 1 s), or the conninfo's connect_timeout (which libpq itself
// ignores in PQconnectPoll) when that is sooner. The last host has what is left.
SteadyTime AttemptDeadline(absl::Duration connect_timeout, size_t after, SteadyTime give_up) {
  const SteadyTime now = SteadyNow();
  SteadyTime limit = give_up;
  if (after > 0 && give_up > now) limit = now + (give_up - now) / static_cast<int64_t>(after + 1);
  if (connect_timeout > absl::ZeroDuration()) {
    limit = std::min(limit, now + ToSteadyDuration(connect_timeout));
  }
  return limit;
}

}  // namespace

std::string SqlStateOf(const absl::Status& status) {
  absl::optional<absl::Cord> payload = status.GetPayload(kSqlStatePayload);
  return payload.has_value() ? std::string(*payload) : std::string();
}

bool NeedsFreshConnection(const absl::Status& status) {
  // After a failover the pooled connections may still lead to the old primary, now read-only;
  // a new connection resolves the host again and finds the new one.
  return SqlStateOf(status) == "25006";
}

bool IsRetryableTransactionFailure(const absl::Status& status) {
  const std::string state = SqlStateOf(status);
  return state == "40001" || state == "40P01";
}

absl::StatusOr<PgConnection> PgConnection::Connect(const std::string& conninfo, absl::Time deadline,
                                                   const Clock* wall_clock) {
  // Every wait is timed on the steady clock, so that a wall-clock step neither stretches it nor
  // cuts it short: the caller's deadline is turned into a steady one once, where it comes in.
  HostResolver resolver(nullptr, "sl-pg-dns");
  return ConnectBy(PgConnectTarget(conninfo), resolver, SteadyDeadline(deadline, wall_clock));
}

absl::StatusOr<PgConnection> PgConnection::Connect(const PgConnectTarget& target,
                                                   HostResolver& resolver, absl::Time deadline,
                                                   const Clock* wall_clock) {
  return ConnectBy(target, resolver, SteadyDeadline(deadline, wall_clock));
}

absl::StatusOr<PgConnection> PgConnection::ConnectBy(const PgConnectTarget& target,
                                                     HostResolver& resolver, SteadyTime give_up) {
  // libpq looks host names up synchronously inside PQconnectStartParams/PQconnectPoll, beyond
  // any deadline; only a `hostaddr` spares it that. So names are looked up here first, on the
  // resolver's threads and within the deadline, and libpq is handed the addresses.
  if (target.entry_count() == 0) return ConnectTo(target.conninfo(), nullptr, give_up);
  // libpq tries the hosts of a list in order and looks a name up only when it comes to it, so a
  // fallback host's lookup never delays the hosts before it. The same here: every lookup starts
  // at once, but each attempt waits only for the first name it comes to, and takes the hosts
  // after it up to the first name whose lookup has not answered yet; the next attempt, if this
  // one fails, starts there.
  HostResolver::Pending lookups = resolver.Start(target.names());
  std::vector<absl::StatusOr<std::vector<std::string>>> addresses(
      target.names().size(), absl::UnknownError("not looked up"));
  std::vector<bool> answered(target.names().size(), false);
  std::vector<absl::Status> failures;
  for (size_t begin = 0; begin < target.entry_count() && SteadyNow() < give_up;) {
    size_t end = begin;
    for (; end < target.entry_count(); ++end) {
      const int name = target.name_index(end);
      if (name < 0 || answered[name]) continue;
      if (end > begin && !lookups.Answered(name)) break;
      std::optional<absl::StatusOr<std::vector<std::string>>> found = lookups.Await(name, give_up);
      if (!found.has_value()) {  // Nothing is left to try in time.
        failures.push_back(absl::UnavailableError(absl::StrCat(
            "postgres: looking up '", target.names()[name], "' took longer than the deadline")));
        return OneFailure(failures);
      }
      addresses[name] = *std::move(found);
      answered[name] = true;
    }
    if (target.needs_whole_list()) {
      absl::StatusOr<PgConnectTarget::Overrides> by_address =
          target.WithAddresses(addresses, begin, end);
      begin = end;
      if (!by_address.ok()) {
        failures.push_back(by_address.status());
        continue;
      }
      absl::StatusOr<PgConnection> conn = ConnectTo(target.conninfo(), &*by_address, give_up);
      if (conn.ok()) return conn;
      failures.push_back(conn.status());
      continue;
    }
    absl::StatusOr<std::vector<PgConnectTarget::Overrides>> candidates =
        target.Candidates(addresses, begin, end);
    begin = end;
    if (!candidates.ok()) {
      failures.push_back(candidates.status());
      continue;
    }
    // One address at a time, each within its own limit: libpq cannot be told to give up on a
    // host and go on to the next, so a host that never answers (its node gone, the packets
    // dropped) would hold the whole list until the deadline, and a failover to the next host
    // would never happen.
    for (size_t i = 0; i < candidates->size() && SteadyNow() < give_up; ++i) {
      const PgConnectTarget::Overrides& candidate = (*candidates)[i];
      const size_t after = candidates->size() - i - 1 + (target.entry_count() - begin);
      absl::StatusOr<PgConnection> conn = ConnectTo(
          target.conninfo(), &candidate, AttemptDeadline(target.connect_timeout(), after, give_up));
      if (conn.ok()) return conn;
      failures.push_back(absl::Status(
          conn.status().code(),
          absl::StrCat(conn.status().message(), " (", candidate.host,
                       candidate.hostaddr.empty() || candidate.hostaddr == candidate.host
                           ? ""
                           : absl::StrCat(" at ", candidate.hostaddr),
                       ")")));
    }
  }
  if (failures.empty()) return absl::UnavailableError("postgres: connect timed out");
  return OneFailure(failures);
}

absl::StatusOr<PgConnection> PgConnection::ConnectTo(const std::string& conninfo,
                                                     const PgConnectTarget::Overrides* overrides,
                                                     SteadyTime give_up) {
  // expand_dbname = 1: "dbname" holds the whole URL; the other keywords fill what it leaves out,
  // and those after it (non-empty ones) override it.
  std::vector<const char*> keywords = {"dbname", "application_name"};
  std::vector<const char*> values = {conninfo.c_str(), "sessionledger"};
  if (overrides != nullptr) {
    keywords.insert(keywords.end(), {"host", "hostaddr"});
    values.insert(values.end(), {overrides->host.c_str(), overrides->hostaddr.c_str()});
    if (!overrides->port.empty()) {
      keywords.push_back("port");
      values.push_back(overrides->port.c_str());
    }
  }
  keywords.push_back(nullptr);
  values.push_back(nullptr);
  PGconn* raw = PQconnectStartParams(keywords.data(), values.data(), 1);
  if (raw == nullptr) return absl::ResourceExhaustedError("postgres: out of memory");
  PgConnection conn(raw);
  if (PQstatus(raw) == CONNECTION_BAD) {
    return absl::UnavailableError(absl::StrCat("postgres: ", OneLine(PQerrorMessage(raw))));
  }
  for (;;) {
    const PostgresPollingStatusType poll_status = PQconnectPoll(raw);
    if (poll_status == PGRES_POLLING_OK) break;
    if (poll_status == PGRES_POLLING_FAILED) {
      return absl::UnavailableError(
          absl::StrCat("postgres: connect failed: ", OneLine(PQerrorMessage(raw))));
    }
    if (absl::Status s = conn.WaitSocket(poll_status == PGRES_POLLING_WRITING, give_up); !s.ok()) {
      return absl::UnavailableError("postgres: connect timed out");
    }
  }
  // Notices ("relation already exists, skipping") would go to stderr as plain text and break
  // the one-JSON-object-per-line log; they carry nothing we act on.
  PQsetNoticeProcessor(
      raw, [](void*, const char*) {}, nullptr);
  if (PQsetnonblocking(raw, 1) != 0) {
    return absl::UnavailableError("postgres: cannot switch the connection to non-blocking mode");
  }
  return conn;
}

PgConnection& PgConnection::operator=(PgConnection&& other) noexcept {
  if (this != &other) {
    if (conn_ != nullptr) PQfinish(conn_);
    conn_ = std::exchange(other.conn_, nullptr);
  }
  return *this;
}

PgConnection::~PgConnection() {
  if (conn_ != nullptr) PQfinish(conn_);
}

absl::Status PgConnection::WaitSocket(bool for_write, SteadyTime give_up) {
  const int fd = PQsocket(conn_);
  if (fd < 0) return absl::UnavailableError("postgres: connection has no socket");
  switch (WaitForFd(fd, for_write ? POLLOUT : POLLIN, give_up)) {
    case FdWait::kReady:
      return absl::OkStatus();
    case FdWait::kTimedOut:
      return absl::DeadlineExceededError("postgres: deadline passed");
    case FdWait::kFailed:
      break;
  }
  return absl::UnavailableError("postgres: poll failed");
}

void PgConnection::CancelAndBreak() {
  // Closing the socket makes the server abort the open transaction once it reads again; what
  // was already sent (a pipeline up to its COMMIT) still runs, bounded by the statement_timeout
  // callers set per transaction. So a call answered UNAVAILABLE may still commit; its
  // idempotency key makes the retry answer with that transaction.
  if (conn_ != nullptr) {
    PQfinish(conn_);
    conn_ = nullptr;
  }
}

absl::StatusOr<PgResultPtr> PgConnection::Collect(SteadyTime give_up) {
  // Flush the request.
  for (;;) {
    const int flushed = PQflush(conn_);
    if (flushed == 0) break;
    if (flushed < 0 || !WaitSocket(/*for_write=*/true, give_up).ok()) {
      CancelAndBreak();
      return absl::UnavailableError("postgres: sending the statement failed or timed out");
    }
  }
  PgResultPtr kept;
  absl::Status first_error;
  for (;;) {
    while (PQisBusy(conn_)) {
      if (!WaitSocket(/*for_write=*/false, give_up).ok()) {
        CancelAndBreak();
        return absl::UnavailableError("postgres: statement did not finish within the deadline");
      }
      if (PQconsumeInput(conn_) == 0) {
        const std::string why = OneLine(PQerrorMessage(conn_));
        CancelAndBreak();
        return absl::UnavailableError(absl::StrCat("postgres: connection lost: ", why));
      }
    }
    PgResultPtr result(PQgetResult(conn_));
    if (result == nullptr) break;
    const ExecStatusType status = PQresultStatus(result.get());
    if (status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK || status == PGRES_EMPTY_QUERY) {
      kept = std::move(result);
    } else if (first_error.ok()) {
      first_error = StatusFromResult(result.get());
    }
  }
  if (PQstatus(conn_) != CONNECTION_OK) {
    CancelAndBreak();
    return first_error.ok() ? absl::UnavailableError("postgres: connection lost") : first_error;
  }
  if (!first_error.ok()) return first_error;
  if (kept == nullptr) return absl::InternalError("postgres: statement returned no result");
  return kept;
}

absl::StatusOr<PgResultPtr> PgConnection::Exec(
    absl::string_view sql, const std::vector<std::optional<std::string>>& params,
    absl::Time deadline) {
  return Exec(sql, params, SteadyDeadline(deadline));
}

absl::StatusOr<PgResultPtr> PgConnection::Exec(
    absl::string_view sql, const std::vector<std::optional<std::string>>& params,
    SteadyTime give_up) {
  if (!healthy()) return absl::UnavailableError("postgres: connection is closed");
  const std::string statement(sql);
  std::vector<const char*> values;
  values.reserve(params.size());
  for (const auto& p : params) values.push_back(p.has_value() ? p->c_str() : nullptr);
  if (PQsendQueryParams(conn_, statement.c_str(), static_cast<int>(values.size()), nullptr,
                        values.data(), nullptr, nullptr, 0) == 0) {
    const std::string why = OneLine(PQerrorMessage(conn_));
    CancelAndBreak();
    return absl::UnavailableError(absl::StrCat("postgres: send failed: ", why));
  }
  return Collect(give_up);
}

absl::StatusOr<std::vector<PgResultPtr>> PgConnection::ExecPipeline(
    const std::vector<PgStatement>& statements, SteadyTime give_up) {
  if (!healthy()) return absl::UnavailableError("postgres: connection is closed");
  if (PQenterPipelineMode(conn_) != 1) {
    CancelAndBreak();
    return absl::UnavailableError("postgres: cannot enter pipeline mode");
  }
  for (const PgStatement& statement : statements) {
    const std::string sql(statement.sql);
    std::vector<const char*> values;
    values.reserve(statement.params.size());
    for (const auto& p : statement.params) values.push_back(p.has_value() ? p->c_str() : nullptr);
    if (PQsendQueryParams(conn_, sql.c_str(), static_cast<int>(values.size()), nullptr,
                          values.data(), nullptr, nullptr, 0) == 0) {
      const std::string why = OneLine(PQerrorMessage(conn_));
      CancelAndBreak();
      return absl::UnavailableError(absl::StrCat("postgres: send failed: ", why));
    }
  }
  if (PQpipelineSync(conn_) == 0) {
    CancelAndBreak();
    return absl::UnavailableError("postgres: send failed");
  }
  for (;;) {
    const int flushed = PQflush(conn_);
    if (flushed == 0) break;
    if (flushed < 0 || !WaitSocket(/*for_write=*/true, give_up).ok()) {
      CancelAndBreak();
      return absl::UnavailableError("postgres: sending the statements failed or timed out");
    }
  }
  std::vector<PgResultPtr> results(statements.size());
  absl::Status first_error;
  size_t index = 0;  // The statement whose results come next.
  for (;;) {
    while (PQisBusy(conn_)) {
      if (!WaitSocket(/*for_write=*/false, give_up).ok()) {
        CancelAndBreak();
        return absl::UnavailableError("postgres: statements did not finish within the deadline");
      }
      if (PQconsumeInput(conn_) == 0) {
        const std::string why = OneLine(PQerrorMessage(conn_));
        CancelAndBreak();
        return absl::UnavailableError(absl::StrCat("postgres: connection lost: ", why));
      }
    }
    PgResultPtr result(PQgetResult(conn_));
    if (result == nullptr) {
      // End of one statement's results. More ends than statements means the connection is in
      // a state we do not understand: drop it rather than loop.
      if (++index > statements.size() + 1 || PQstatus(conn_) != CONNECTION_OK) {
        CancelAndBreak();
        return first_error.ok() ? absl::UnavailableError("postgres: connection lost") : first_error;
      }
      continue;
    }
    const ExecStatusType status = PQresultStatus(result.get());
    if (status == PGRES_PIPELINE_SYNC) break;
    if (status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK) {
      if (index < results.size()) results[index] = std::move(result);
    } else if (status != PGRES_PIPELINE_ABORTED && first_error.ok()) {
      first_error = StatusFromResult(result.get());
    }
  }
  if (PQexitPipelineMode(conn_) != 1) {
    CancelAndBreak();
    return first_error.ok() ? absl::UnavailableError("postgres: cannot leave pipeline mode")
                            : first_error;
  }
  if (!first_error.ok()) return first_error;
  for (const PgResultPtr& r : results) {
    if (r == nullptr) return absl::InternalError("postgres: a statement returned no result");
  }
  return results;
}

bool PgConnection::StillUsable() const {
  if (!healthy()) return false;
  pollfd pfd{PQsocket(conn_), POLLIN, 0};
  return ::poll(&pfd, 1, 0) == 0;
}

absl::StatusOr<PgResultPtr> PgConnection::ExecSimple(absl::string_view sql, absl::Time deadline) {
  const SteadyTime give_up = SteadyDeadline(deadline);
  if (!healthy()) return absl::UnavailableError("postgres: connection is closed");
  const std::string statement(sql);
  if (PQsendQuery(conn_, statement.c_str()) == 0) {
    const std::string why = OneLine(PQerrorMessage(conn_));
    CancelAndBreak();
    return absl::UnavailableError(absl::StrCat("postgres: send failed: ", why));
  }
  return Collect(give_up);
}

PgPool::Lease::~Lease() {
  if (pool_ != nullptr) pool_->Return(std::move(conn_), broken_);
}

PgPool::PgPool(PgPoolOptions options)
    : options_(std::move(options)),
      target_(options_.conninfo),
      resolver_(options_.resolver != nullptr
                    ? options_.resolver
                    : std::make_shared<HostResolver>(nullptr, "sl-pg-dns")) {}

absl::StatusOr<PgPool::Lease> PgPool::Acquire(absl::Time deadline) {
  return Acquire(SteadyDeadline(deadline, options_.wall_clock));
}

absl::StatusOr<PgPool::Lease> PgPool::Acquire(SteadyTime give_up) {
  std::unique_lock<std::mutex> lock(mutex_);
  bool waited = false;
  for (;;) {
    if (!idle_.empty()) {
      PgConnection conn = std::move(idle_.back());
      idle_.pop_back();
      if (conn.StillUsable()) return Lease(this, std::move(conn));
      --open_;  // Drop a connection PostgreSQL closed (e.g. after a restart) and open anew.
      continue;
    }
    if (open_ < options_.size) {
      ++open_;
      lock.unlock();
      absl::StatusOr<PgConnection> conn = PgConnection::ConnectBy(
          target_, *resolver_,
          std::min(give_up, SteadyNow() + ToSteadyDuration(options_.connect_timeout)));
      if (!conn.ok()) {
        lock.lock();
        --open_;
        returned_.notify_one();
        return conn.status();
      }
      return Lease(this, *std::move(conn));
    }
    if (!waited) {
      ++waits_;
      waited = true;
    }
    if (returned_.wait_until(lock, give_up) == std::cv_status::timeout && idle_.empty() &&
        open_ >= options_.size) {
      return absl::UnavailableError(
          absl::StrCat("postgres: no pooled connection free within the deadline (pool size ",
                       options_.size, ")"));
    }
  }
}

void PgPool::Return(std::optional<PgConnection> conn, bool broken) {
  std::lock_guard<std::mutex> lock(mutex_);
  // A connection inside a transaction (the user returned early) must not serve the next caller.
  if (broken || !conn.has_value() || !conn->healthy() ||
      PQtransactionStatus(conn->raw()) != PQTRANS_IDLE) {
    --open_;
  } else {
    idle_.push_back(std::move(*conn));
  }
  returned_.notify_one();
}

void PgPool::DropIdle() {
  std::vector<PgConnection> dropped;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ -= static_cast<int>(idle_.size());
    dropped.swap(idle_);
    // The slots they held are free for new connections.
    returned_.notify_all();
  }
  // Closed (PQfinish, a network write) outside the lock.
}

int PgPool::open_connections() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return open_;
}

int PgPool::idle_connections() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int>(idle_.size());
}

int64_t PgPool::total_waits() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return waits_;
}

}  // namespace sessionledger
