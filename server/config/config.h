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

// Checks a libpq URL (postgres:// or postgresql://) without connecting. Its errors never quote
// the URL, which may hold a password.
absl::Status ValidateDatabaseUrl(absl::string_view url);
// The same string with any password replaced by "****", safe to log.
std::string RedactDatabaseUrl(absl::string_view url);

// Transport security of the gRPC port, read once at start-up (TLS_CERT_FILE, TLS_KEY_FILE,
// TLS_CLIENT_CA_FILE). The PEM contents, not the paths, are kept: a certificate rotated on disk
// takes effect at the next restart, never halfway through the process's life.
struct TlsConfig {
  bool enabled() const { return !cert_chain_pem.empty(); }
  // Mutual TLS: clients must present a certificate that chains to client_ca_pem.
  bool require_client_cert() const { return !client_ca_pem.empty(); }
  std::string cert_chain_pem;
  std::string private_key_pem;
  std::string client_ca_pem;
};

// Reads and checks the three TLS files (any may be unset or empty = not configured): the
// certificate and key must come together and match, the client CA needs TLS and must hold at
// least one certificate. Errors name the variable on one line, like every config error.
absl::StatusOr<TlsConfig> LoadTlsFiles(std::optional<std::string> cert_file,
                                       std::optional<std::string> key_file,
                                       std::optional<std::string> client_ca_file);

// Everything the process reads from its environment, validated once at start-up. Components
// receive the plain values they need, never the environment.
struct Config {
  uint16_t port = 50051;
  // LISTEN_ADDRESS, as ParseListenAddress returns it: the address both the gRPC port and
  // /metrics listen on.
  std::string listen_address = "[::]";
  MemcachedUrl memcached;
  std::string database_url;
  absl::Duration session_ttl = absl::Seconds(1800);
  absl::Duration session_max_lifetime = absl::Seconds(86400);
  absl::Duration shutdown_grace = absl::Seconds(20);
  // Between health going NOT_SERVING and the server refusing new calls.
  absl::Duration shutdown_notice = absl::Seconds(1);
  LogLevel log_level = LogLevel::kInfo;
  uint16_t metrics_port = 9464;  // 0 = off.
  int memcached_pool_size = 16;
  bool memcached_pipeline = true;
  int database_pool_size = 8;
  // The longest a call waits on a backing service, whatever the caller's deadline (an earlier
  // one of the caller's comes first): server/rpc/call_deadline.h.
  absl::Duration default_call_timeout = absl::Seconds(5);
  absl::Duration health_check_interval = absl::Seconds(2);
  absl::Duration grpc_max_connection_age = absl::Seconds(300);
  int64_t grpc_max_recv_bytes = 1 << 20;
  // The contract's input limits (its defaults); requests beyond them are INVALID_ARGUMENT.
  int64_t max_user_id_bytes = 128;
  int64_t max_attribute_key_bytes = 128;
  int64_t max_session_attributes_bytes = 64 * 1024;
  int64_t max_idempotency_key_bytes = 128;
  // Per HTTP/2 connection; a client that opens more waits for a free stream instead of making
  // the server allocate for an unbounded number of calls at once.
  int grpc_max_concurrent_streams = 100;
  TlsConfig tls;  // Plaintext when !tls.enabled().
  // glibc's malloc arenas (MALLOC_ARENA_MAX): the server applies it with mallopt, so its default
  // holds even though glibc itself reads the variable only when set.
  int malloc_arena_max = 2;
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

// LISTEN_ADDRESS's value in the form gRPC's AddListeningPort takes before ":port": "[::]" (every
// IPv6 and IPv4 address), an IPv4 literal ("127.0.0.1"; "0.0.0.0" is every IPv4 address), an
// IPv6 literal in brackets ("[::1]", given with or without them; written as inet_ntop writes
// it), or "localhost" (the loopback addresses, 127.0.0.1 and ::1). Anything else (empty, a
// port, another name, an IPv6 zone) is INVALID_ARGUMENT, its message not naming the variable.
absl::StatusOr<std::string> ParseListenAddress(absl::string_view text);

// LISTEN_ADDRESS alone (default "[::]"), checked as LoadConfig checks it: for `healthcheck`.
absl::StatusOr<std::string> ListenAddress(const EnvLookup& env);

// The target ("host:port") at which a process on this machine reaches a server listening on
// `listen_address` (ParseListenAddress's form) and `port`: 127.0.0.1 for the wildcards and
// localhost, the address itself otherwise.
std::string LocalTarget(absl::string_view listen_address, uint16_t port);

// PORT alone (default 50051), checked as LoadConfig checks it: for `healthcheck`, which needs
// no other variable.
absl::StatusOr<uint16_t> ListenPort(const EnvLookup& env);

// The most bytes a CreateSessionRequest, or an UpdateSessionRequest without `remove`, can take
// on the wire when it keeps to MAX_SESSION_ATTRIBUTES_BYTES and MAX_USER_ID_BYTES (within the
// ranges LoadConfig accepts for them). LoadConfig refuses a GRPC_MAX_RECV_BYTES below it.
int64_t LargestSessionWriteRequestBytes(int64_t max_session_attributes_bytes,
                                        int64_t max_user_id_bytes);

// Validates every variable. The error message is one line that starts with the variable's
// name and says what is wrong, e.g. "MEMCACHED_URL: required, e.g. memcached://127.0.0.1:11211".
absl::StatusOr<Config> LoadConfig(const EnvLookup& env);
// For `sessionledger-server migrate`, which needs only the database: DATABASE_URL (required)
// and LOG_LEVEL.
absl::StatusOr<Config> LoadMigrateConfig(const EnvLookup& env);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_CONFIG_CONFIG_H_
