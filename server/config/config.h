#ifndef SESSIONLEDGER_SERVER_CONFIG_CONFIG_H_
#define SESSIONLEDGER_SERVER_CONFIG_CONFIG_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/common/logger.h"

namespace sessionledger {

struct MemcachedNode {
  std::string host;  // Name or IP literal (IPv6 without brackets).
  uint16_t port = 11211;
  friend bool operator==(const MemcachedNode& a, const MemcachedNode& b) {
    return a.host == b.host && a.port == b.port;
  }
};

// Parsed MEMCACHED_URL: memcached://host:port[,host:port...][?replicas=N]
struct MemcachedUrl {
  std::vector<MemcachedNode> nodes;
  // Extra copies of each session on other nodes (0 .. nodes-1).
  int replicas = 0;
};

absl::StatusOr<MemcachedUrl> ParseMemcachedUrl(absl::string_view url);

// Checks a libpq connection string (URL or key=value form) without connecting.
absl::Status ValidateDatabaseUrl(absl::string_view url);
// The same string with any password replaced by "****", safe to log.
std::string RedactDatabaseUrl(absl::string_view url);

// Everything the process reads from its environment, validated once at start-up. Components
// receive the plain values they need, never the environment.
struct Config {
  uint16_t port = 50051;
  MemcachedUrl memcached;
  std::string database_url;
  absl::Duration session_ttl = absl::Seconds(1800);
  absl::Duration session_max_lifetime = absl::Seconds(86400);
  absl::Duration shutdown_grace = absl::Seconds(20);
  LogLevel log_level = LogLevel::kInfo;
  uint16_t metrics_port = 9464;  // 0 = off.
  int memcached_pool_size = 16;
  int database_pool_size = 8;
  // How long a call may wait for a backing service when its caller set no deadline.
  absl::Duration default_call_timeout = absl::Seconds(5);
  absl::Duration health_check_interval = absl::Seconds(2);
  absl::Duration grpc_max_connection_age = absl::Seconds(300);
  int64_t grpc_max_recv_bytes = 1 << 20;
};

// One row of the configuration table: `--help` prints these and the README mirrors them.
struct ConfigVariable {
  absl::string_view name;
  absl::string_view default_value;  // Empty = required.
  absl::string_view meaning;
};
const std::vector<ConfigVariable>& ConfigVariables();
std::string ConfigHelpText();

using EnvLookup = std::function<std::optional<std::string>(absl::string_view name)>;
// Reads the real process environment.
EnvLookup ProcessEnvironment();

// Validates every variable. The error message is one line that starts with the variable's
// name and says what is wrong, e.g. "MEMCACHED_URL: required, e.g. memcached://127.0.0.1:11211".
absl::StatusOr<Config> LoadConfig(const EnvLookup& env);
// For `sessionledger-server migrate`, which needs only the database: DATABASE_URL (required)
// and LOG_LEVEL.
absl::StatusOr<Config> LoadMigrateConfig(const EnvLookup& env);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_CONFIG_CONFIG_H_
