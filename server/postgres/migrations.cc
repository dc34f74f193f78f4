#include "server/postgres/migrations.h"

#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "server/common/status_macros.h"

namespace sessionledger {
namespace {

// Arbitrary constant shared by every sessionledger process: the key of the advisory lock that
// serialises concurrent `migrate` runs.
constexpr absl::string_view kMigrationLockKey = "7216100341122029";

constexpr absl::string_view kCreateSchemaTable = R"sql(
CREATE TABLE IF NOT EXISTS schema_migrations (
  version    integer     PRIMARY KEY,
  name       text        NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
))sql";
// Added after the table was released, so by ALTER; empty in rows recorded before it (read as
// the row's own version: no older binary may run on them).
constexpr absl::string_view kAddCompatibilityColumn = R"sql(
ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS works_with_binaries_from integer)sql";

// Checks that this binary may run on a schema at `version`, newer than it knows: every
// migration it does not know must work with binaries of its LatestSchemaVersion().
absl::Status CheckNewerSchemaWorksWithThisBinary(PgConnection& conn, int version,
                                                 absl::Time deadline) {
  const int latest = LatestSchemaVersion();
  const absl::Status refused = absl::FailedPreconditionError(
      absl::StrCat("database schema is at version ", version, ", newer than this binary knows (",
                   latest, ") and not compatible with it: deploy a newer binary"));
  absl::StatusOr<PgResultPtr> needs = conn.Exec(
      "SELECT max(coalesce(works_with_binaries_from, version)) FROM schema_migrations "
      "WHERE version > $1::integer",
      {absl::StrCat(latest)}, deadline);
  // No such column: the newer schema was recorded by a release that did not say.
  if (!needs.ok()) return SqlStateOf(needs.status()) == "42703" ? refused : needs.status();
  int oldest = 0;
  if (!absl::SimpleAtoi(PQgetvalue(needs->get(), 0, 0), &oldest) || oldest > latest) {
    return refused;
  }
  return absl::OkStatus();
}

}  // namespace

const std::vector<Migration>& Migrations() {
  static const auto* const kMigrations = new std::vector<Migration>{
#include "server/postgres/migrations.inc"
  };
  return *kMigrations;
}

int LatestSchemaVersion() { return static_cast<int>(Migrations().size()); }

absl::StatusOr<int> CurrentSchemaVersion(PgConnection& conn, absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(
      PgResultPtr exists,
      conn.Exec("SELECT to_regclass('schema_migrations') IS NOT NULL", {}, deadline));
  if (absl::string_view(PQgetvalue(exists.get(), 0, 0)) != "t") return 0;
  SL_ASSIGN_OR_RETURN(
      PgResultPtr result,
      conn.Exec("SELECT coalesce(max(version), 0) FROM schema_migrations", {}, deadline));
  int version = 0;
  if (!absl::SimpleAtoi(PQgetvalue(result.get(), 0, 0), &version)) {
    return absl::InternalError("schema_migrations holds a version that is not a number");
  }
  return version;
}

absl::Status CheckSchemaCurrent(PgConnection& conn, absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(const int version, CurrentSchemaVersion(conn, deadline));
  const int latest = LatestSchemaVersion();
  if (version < latest) {
    return absl::FailedPreconditionError(
        absl::StrCat("database schema is at version ", version, ", this binary needs ", latest,
                     ": run `sessionledger-server migrate` first"));
  }
  if (version > latest) return CheckNewerSchemaWorksWithThisBinary(conn, version, deadline);
  return absl::OkStatus();
}

absl::StatusOr<int> ApplyMigrations(PgConnection& conn, Logger& logger, absl::Time deadline) {
  SL_RETURN_IF_ERROR(
      conn.Exec("SELECT pg_advisory_lock($1::bigint)", {std::string(kMigrationLockKey)}, deadline)
          .status());
  // Runs on every exit path; a failure to unlock is harmless because closing the connection
  // releases the lock too.
  struct Unlock {
    PgConnection& conn;
    absl::Time deadline;
    ~Unlock() {
      if (conn.healthy()) {
        (void)conn.Exec("SELECT pg_advisory_unlock($1::bigint)", {std::string(kMigrationLockKey)},
                        deadline);
      }
    }
  } unlock{conn, deadline};

  SL_RETURN_IF_ERROR(conn.ExecSimple(kCreateSchemaTable, deadline).status());
  SL_ASSIGN_OR_RETURN(int version, CurrentSchemaVersion(conn, deadline));
  if (version > LatestSchemaVersion()) {
    // A rollback's migrate job: nothing to apply, and fine if this binary may run on it.
    SL_RETURN_IF_ERROR(CheckNewerSchemaWorksWithThisBinary(conn, version, deadline));
    return version;
  }
  // Only when there is something to record: it needs the table's owner and an exclusive lock,
  // and a migrate with nothing to do must keep working for whoever could run it before.
  if (version < LatestSchemaVersion()) {
    SL_RETURN_IF_ERROR(conn.ExecSimple(kAddCompatibilityColumn, deadline).status());
  }
  for (const Migration& migration : Migrations()) {
    if (migration.version <= version) continue;
    SL_RETURN_IF_ERROR(conn.ExecSimple("BEGIN", deadline).status());
    absl::Status applied = conn.ExecSimple(migration.sql, deadline).status();
    if (applied.ok()) {
      applied = conn.Exec(
                        "INSERT INTO schema_migrations (version, name, works_with_binaries_from) "
                        "VALUES ($1, $2, $3)",
                        {absl::StrCat(migration.version), std::string(migration.name),
                         absl::StrCat(migration.works_with_binaries_from)},
                        deadline)
                    .status();
    }
    if (applied.ok()) applied = conn.ExecSimple("COMMIT", deadline).status();
    if (!applied.ok()) {
      if (conn.healthy()) (void)conn.ExecSimple("ROLLBACK", deadline);
      return absl::Status(applied.code(), absl::StrCat("migration ", migration.version, " (",
                                                       migration.name, "): ", applied.message()));
    }
    logger.Info("schema migration applied",
                {{"version", migration.version}, {"name", migration.name}});
    version = migration.version;
  }
  return version;
}

}  // namespace sessionledger
