#ifndef SESSIONLEDGER_SERVER_POSTGRES_MIGRATIONS_H_
#define SESSIONLEDGER_SERVER_POSTGRES_MIGRATIONS_H_

#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/common/logger.h"
#include "server/postgres/pg_pool.h"

namespace sessionledger {

// One schema step. Versions start at 1 and increase by one; a released migration is never
// edited, only followed by a new one.
struct Migration {
  int version;
  absl::string_view name;
  absl::string_view sql;
  // The oldest binary (by its LatestSchemaVersion()) whose SQL still works once this migration
  // is applied: a version before this one for an additive change (a new table, a nullable
  // column, a function), this version itself when older code would break (a dropped or renamed
  // column). Recorded with the migration, so that older binaries can tell whether they may run
  // on a schema newer than they know: a rollback, or an old pod started in mid-rollout.
  int works_with_binaries_from;
};

// Every migration this binary knows, in order.
const std::vector<Migration>& Migrations();
int LatestSchemaVersion();

// Applies the missing migrations, each in its own transaction recorded in schema_migrations.
// Safe to run from many processes at once: a session-level advisory lock serialises them, and
// each one re-reads the applied versions after taking it. Idempotent. Returns the version the
// schema is at afterwards.
absl::StatusOr<int> ApplyMigrations(PgConnection& conn, Logger& logger, absl::Time deadline);

// The schema version recorded in the database (0 when never migrated).
absl::StatusOr<int> CurrentSchemaVersion(PgConnection& conn, absl::Time deadline);

// OK when the database is at LatestSchemaVersion(), or ahead of it by migrations that all work
// with this binary (works_with_binaries_from); FAILED_PRECONDITION with a message that says to
// run `sessionledger-server migrate` when it is behind, or to upgrade the binary when it is
// ahead by a migration this binary cannot work with.
absl::Status CheckSchemaCurrent(PgConnection& conn, absl::Time deadline);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_POSTGRES_MIGRATIONS_H_
