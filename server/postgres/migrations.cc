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
  if (version > latest) {
    return absl::FailedPreconditionError(absl::StrCat("database schema is at version ", version,
                                                      ", newer than this binary knows (", latest,
                                                      "): deploy a newer binary"));
  }
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
    return absl::FailedPreconditionError(absl::StrCat("database schema is at version ", version,
                                                      ", newer than this binary knows (",
                                                      LatestSchemaVersion(), ")"));
  }
  for (const Migration& migration : Migrations()) {
    if (migration.version <= version) continue;
    SL_RETURN_IF_ERROR(conn.ExecSimple("BEGIN", deadline).status());
    absl::Status applied = conn.ExecSimple(migration.sql, deadline).status();
    if (applied.ok()) {
      applied = conn.Exec("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                          {absl::StrCat(migration.version), std::string(migration.name)}, deadline)
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
