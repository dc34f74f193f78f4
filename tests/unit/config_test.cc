#include "server/config/config.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "google/protobuf/map.h"
#include "gtest/gtest.h"
#include "server/session/token.h"
#include "sessionledger/v1/session.pb.h"

namespace sessionledger {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

EnvLookup FakeEnv(std::map<std::string, std::string> values) {
  return [values = std::move(values)](absl::string_view name) -> std::optional<std::string> {
    auto it = values.find(std::string(name));
    if (it == values.end()) return std::nullopt;
    return it->second;
  };
}

std::map<std::string, std::string> MinimalEnv() {
  return {{"MEMCACHED_URL", "memcached://127.0.0.1:11211"},
          {"DATABASE_URL", "postgres://u:p@127.0.0.1:5432/db?sslmode=disable"}};
}

// The error for `name` = `value` on top of a valid environment.
std::string ErrorFor(const std::string& name, const std::string& value) {
  auto env = MinimalEnv();
  env[name] = value;
  absl::StatusOr<Config> config = LoadConfig(FakeEnv(env));
  EXPECT_FALSE(config.ok()) << name << "=" << value << " was accepted";
  return config.ok() ? "" : std::string(config.status().message());
}

TEST(MemcachedUrlTest, ParsesSingleNode) {
  absl::StatusOr<MemcachedUrl> url = ParseMemcachedUrl("memcached://cache-0:11311");
  ASSERT_TRUE(url.ok()) << url.status();
  ASSERT_EQ(url->nodes.size(), 1u);
  EXPECT_EQ(url->nodes[0].host, "cache-0");
  EXPECT_EQ(url->nodes[0].port, 11311);
  EXPECT_EQ(url->replicas, 0);
}

TEST(MemcachedUrlTest, ParsesManyNodesReplicasAndIpv6) {
  absl::StatusOr<MemcachedUrl> url =
      ParseMemcachedUrl("memcached://10.0.0.1:1,[::1]:2,mc.svc.cluster.local?replicas=2");
  ASSERT_TRUE(url.ok()) << url.status();
  ASSERT_EQ(url->nodes.size(), 3u);
  EXPECT_EQ(url->nodes[1].host, "::1");
  EXPECT_EQ(url->nodes[1].port, 2);
  EXPECT_EQ(url->nodes[2].host, "mc.svc.cluster.local");
  EXPECT_EQ(url->nodes[2].port, 11211) << "default port";
  EXPECT_EQ(url->replicas, 2);
}

TEST(MemcachedUrlTest, RejectsMalformedUrls) {
  const char* const bad[] = {
      "",
      "127.0.0.1:11211",
      "redis://127.0.0.1:6379",
      "memcached://",
      "memcached://host:",
      "memcached://host:0",
      "memcached://host:65536",
      "memcached://host:port",
      "memcached://:11211",
      "memcached://a:1,,b:2",
      "memcached://a:1,a:1",
      "memcached://::1:11211",
      "memcached://[::1:11211",
      "memcached://a:1?replicas=1",
      "memcached://a:1,b:2?replicas=-1",
      "memcached://a:1,b:2?replicas=x",
      "memcached://a:1,b:2?weight=3",
      "memcached://a b:1",
  };
  for (const char* url : bad) {
    EXPECT_FALSE(ParseMemcachedUrl(url).ok()) << "accepted: " << url;
  }
}

TEST(DatabaseUrlTest, AcceptsLibpqUrls) {
  EXPECT_TRUE(ValidateDatabaseUrl("postgres://u:p@h:5432/db?sslmode=disable").ok());
  EXPECT_TRUE(ValidateDatabaseUrl("postgresql://h/db").ok());
  EXPECT_TRUE(ValidateDatabaseUrl("postgres://u@[::1]:5432/db?connect_timeout=3").ok());
}

// libpq reads a host without a port as one on 5432: its port list then has empty entries.
TEST(DatabaseUrlTest, AcceptsHostsWithoutAPortInAMultiHostUrl) {
  for (const char* url : {"postgres://u:p@pg-0,pg-1,pg-2/db?target_session_attrs=read-write",
                          "postgres://u:p@h1,h2:5433/db", "postgres://u:p@h1:5433,h2/db",
                          "postgres://u:p@h1:5432,h2:5433/db"}) {
    const absl::Status status = ValidateDatabaseUrl(url);
    EXPECT_TRUE(status.ok()) << url << ": " << status;
  }
  EXPECT_FALSE(ValidateDatabaseUrl("postgres://u:p@h1,h2:0/db").ok());
  EXPECT_FALSE(ValidateDatabaseUrl("postgres://u:p@h1:x,h2/db").ok());
}

TEST(DatabaseUrlTest, RejectsMalformedUrls) {
  EXPECT_FALSE(ValidateDatabaseUrl("mysql://h/db").ok());
  EXPECT_FALSE(ValidateDatabaseUrl("host=h dbname=db").ok()) << "URL form only, as the contract";
  EXPECT_FALSE(ValidateDatabaseUrl("postgres://h/db?no_such_option=1").ok());
  EXPECT_FALSE(ValidateDatabaseUrl("postgres://h:99999999999/db?sslmode=bogus").ok());
}

// A service named in the URL is read by libpq alone, at connect time, with its unbounded name
// lookup: refused at start-up, with the way out.
TEST(DatabaseUrlTest, RefusesANamedService) {
  for (const char* url : {"postgres:///db?service=ledger", "postgres://h:5432/db?service=ledger",
                          "postgres://h/db?sslmode=disable&%73ervice=ledger"}) {
    const absl::Status status = ValidateDatabaseUrl(url);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << url;
    EXPECT_THAT(status.message(), HasSubstr("service=")) << url;
    EXPECT_THAT(status.message(), HasSubstr("PGSERVICE")) << url;
  }
}

// Start-up errors end up in logs; a mistyped URL must not put its password there.
TEST(DatabaseUrlTest, ErrorsDoNotQuoteTheUrl) {
  // libpq's own parse error quotes the bad token, here the password.
  const absl::Status bad_escape = ValidateDatabaseUrl("postgres://app:Zq7%zzpw@db/x");
  EXPECT_FALSE(bad_escape.ok());
  EXPECT_THAT(bad_escape.message(), HasSubstr("percent-encoded"));
  EXPECT_THAT(bad_escape.message(), Not(HasSubstr("Zq7")));
  EXPECT_THAT(bad_escape.message(), Not(HasSubstr("zzpw")));
  // An unencoded '/' in the password makes libpq read "app:Zq7" as host:port.
  const absl::Status slash = ValidateDatabaseUrl("postgres://app:Zq7/pw9@db/x");
  EXPECT_FALSE(slash.ok());
  EXPECT_THAT(slash.message(), HasSubstr("port"));
  EXPECT_THAT(slash.message(), Not(HasSubstr("Zq7")));
  for (const char* url :
       {"postgres://db/x?sslmode=Zq7pw9", "postgres://db/x?connect_timeout=Zq7pw9",
        "postgres://db/x?Zq7pw9", "postgres://db/x?password=a=Zq7pw9"}) {
    const absl::Status status = ValidateDatabaseUrl(url);
    EXPECT_FALSE(status.ok()) << url;
    EXPECT_THAT(status.message(), Not(HasSubstr("Zq7"))) << url;
  }
}

TEST(DatabaseUrlTest, RedactsPasswords) {
  EXPECT_EQ(RedactDatabaseUrl("postgres://alice:s3cret@db:5432/ledger?sslmode=require"),
            "postgres://alice:****@db:5432/ledger?sslmode=require");
  EXPECT_EQ(RedactDatabaseUrl("postgres://alice@db/ledger"), "postgres://alice@db/ledger");
  EXPECT_EQ(RedactDatabaseUrl("postgres://db/ledger?user=a&password=s3cret"),
            "postgres://db/ledger?user=a&password=****");
  EXPECT_THAT(RedactDatabaseUrl("postgres://a:p%40ss@db"), ::testing::Not(HasSubstr("p%40ss")));
}

TEST(LoadConfigTest, DefaultsMatchTheContract) {
  absl::StatusOr<Config> config = LoadConfig(FakeEnv(MinimalEnv()));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->port, 50051);
  EXPECT_EQ(config->listen_address, "[::]") << "every interface, as before LISTEN_ADDRESS";
  EXPECT_EQ(config->session_ttl, absl::Seconds(1800));
  EXPECT_EQ(config->session_max_lifetime, absl::Seconds(86400));
  EXPECT_EQ(config->shutdown_grace, absl::Seconds(20));
  EXPECT_EQ(config->shutdown_notice, absl::Seconds(1));
  EXPECT_EQ(config->log_level, LogLevel::kInfo);
  EXPECT_EQ(config->metrics_port, 9464);
  EXPECT_EQ(config->grpc_max_recv_bytes, 1 << 20);
  EXPECT_EQ(config->max_user_id_bytes, 128);
  EXPECT_EQ(config->max_attribute_key_bytes, 128);
  EXPECT_EQ(config->max_session_attributes_bytes, 64 * 1024);
  EXPECT_EQ(config->max_idempotency_key_bytes, 128);
  EXPECT_EQ(config->malloc_arena_max, 2);
  EXPECT_EQ(config->grpc_max_connection_age, absl::Seconds(300));
  EXPECT_TRUE(config->memcached_pipeline);
}

TEST(LoadConfigTest, ReadsEveryVariable) {
  auto env = MinimalEnv();
  env["PORT"] = "6000";
  env["LISTEN_ADDRESS"] = "127.0.0.1";
  env["SESSION_TTL_SECONDS"] = "60";
  env["SESSION_MAX_LIFETIME_SECONDS"] = "2592000";
  env["SHUTDOWN_GRACE_SECONDS"] = "3";
  env["LOG_LEVEL"] = "DEBUG";
  env["METRICS_PORT"] = "0";
  env["MEMCACHED_POOL_SIZE"] = "4";
  env["DATABASE_POOL_SIZE"] = "5";
  env["MALLOC_ARENA_MAX"] = "1";
  env["GRPC_MAX_CONNECTION_AGE_SECONDS"] = "60";
  env["MEMCACHED_PIPELINE"] = "0";
  absl::StatusOr<Config> config = LoadConfig(FakeEnv(env));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->port, 6000);
  EXPECT_EQ(config->listen_address, "127.0.0.1");
  EXPECT_EQ(config->session_ttl, absl::Seconds(60));
  EXPECT_EQ(config->session_max_lifetime, absl::Hours(24 * 30));
  EXPECT_EQ(config->shutdown_grace, absl::Seconds(3));
  EXPECT_EQ(config->log_level, LogLevel::kDebug);
  EXPECT_EQ(config->metrics_port, 0);
  EXPECT_EQ(config->memcached_pool_size, 4);
  EXPECT_EQ(config->database_pool_size, 5);
  EXPECT_EQ(config->malloc_arena_max, 1);
  EXPECT_EQ(config->grpc_max_connection_age, absl::Seconds(60));
  EXPECT_FALSE(config->memcached_pipeline);
}

TEST(LoadConfigTest, MissingRequiredVariablesAreNamed) {
  auto env = MinimalEnv();
  env.erase("MEMCACHED_URL");
  absl::StatusOr<Config> config = LoadConfig(FakeEnv(env));
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(std::string(config.status().message()), StartsWith("MEMCACHED_URL: required"));

  env = MinimalEnv();
  env["DATABASE_URL"] = "";
  config = LoadConfig(FakeEnv(env));
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(std::string(config.status().message()), StartsWith("DATABASE_URL: required"));
}

TEST(LoadConfigTest, MalformedValuesAreNamedOnOneLine) {
  const std::pair<const char*, const char*> cases[] = {
      {"PORT", "0"},
      {"PORT", "http"},
      {"PORT", "70000"},
      {"PORT", " 80"},
      {"LISTEN_ADDRESS", ""},
      {"LISTEN_ADDRESS", "127.0.0.1:50051"},
      {"LISTEN_ADDRESS", "my-host"},
      {"MEMCACHED_URL", "memcached://a:1?replicas=3"},
      {"DATABASE_URL", "mysql://x"},
      {"SESSION_TTL_SECONDS", "-5"},
      {"SESSION_TTL_SECONDS", "1.5"},
      {"SESSION_MAX_LIFETIME_SECONDS", "2592001"},
      {"SESSION_TTL_SECONDS", "2592001"},
      {"SHUTDOWN_GRACE_SECONDS", "soon"},
      {"SHUTDOWN_NOTICE_MS", "-1"},
      {"LOG_LEVEL", "verbose"},
      {"METRICS_PORT", "50051"},
      {"MEMCACHED_POOL_SIZE", "0"},
      {"DATABASE_POOL_SIZE", "many"},
      {"GRPC_MAX_RECV_BYTES", "12"},
      {"MAX_USER_ID_BYTES", "0"},
      {"MAX_ATTRIBUTE_KEY_BYTES", "4097"},
      {"MAX_SESSION_ATTRIBUTES_BYTES", "1048576"},
      {"MAX_IDEMPOTENCY_KEY_BYTES", "x"},
      // One below each minimum (the minimum itself: AcceptsEachMinimum).
      {"DEFAULT_CALL_TIMEOUT_MS", "0"},
      {"HEALTH_CHECK_INTERVAL_MS", "49"},
      // glibc would ignore these without a word, leaving no arena cap at all.
      {"MALLOC_ARENA_MAX", "two"},
      {"MALLOC_ARENA_MAX", "0"},
      {"MALLOC_ARENA_MAX", "-1"},
      // A value read from a file keeps its line ending; quoted, it is escaped.
      {"PORT", "50051\n"},
      {"LOG_LEVEL", "info\r\n"},
      {"LISTEN_ADDRESS", "127.0.0.1\n"},
      {"MEMCACHED_URL", "memcached://a:1\n"},
      {"SHUTDOWN_GRACE_SECONDS", "5\n"},
  };
  for (const auto& [name, value] : cases) {
    const std::string message = ErrorFor(name, value);
    EXPECT_THAT(message, StartsWith(std::string(name) + ": ")) << name << "=" << value;
    EXPECT_EQ(message.find_first_of("\r\n"), std::string::npos) << message;
  }
  EXPECT_THAT(ErrorFor("PORT", "50051\n"), HasSubstr("'50051\\x0a'"));
}

// LISTEN_ADDRESS is stored as gRPC's AddListeningPort takes it before ":port": IPv6 in
// brackets, however it was given.
TEST(ListenAddressTest, AcceptsAddressLiteralsAndLocalhost) {
  const std::pair<const char*, const char*> cases[] = {
      {"127.0.0.1", "127.0.0.1"},
      {"0.0.0.0", "0.0.0.0"},
      {"10.20.30.40", "10.20.30.40"},
      {"::1", "[::1]"},
      {"[::1]", "[::1]"},
      {"::", "[::]"},
      {"[::]", "[::]"},
      {"0:0:0:0:0:0:0:1", "[::1]"},
      {"[2001:DB8::1]", "[2001:db8::1]"},
      {"fd00::10", "[fd00::10]"},
      // An IPv4-mapped IPv6 address is that IPv4 address.
      {"::ffff:127.0.0.1", "127.0.0.1"},
      {"localhost", "localhost"},
  };
  for (const auto& [given, stored] : cases) {
    const absl::StatusOr<std::string> parsed = ParseListenAddress(given);
    ASSERT_TRUE(parsed.ok()) << given << ": " << parsed.status();
    EXPECT_EQ(*parsed, stored) << given;
    auto env = MinimalEnv();
    env["LISTEN_ADDRESS"] = given;
    const absl::StatusOr<Config> config = LoadConfig(FakeEnv(env));
    ASSERT_TRUE(config.ok()) << given << ": " << config.status();
    EXPECT_EQ(config->listen_address, stored) << given;
  }
}

TEST(ListenAddressTest, UnsetIsEveryInterface) {
  const absl::StatusOr<std::string> address = ListenAddress(FakeEnv({}));
  ASSERT_TRUE(address.ok()) << address.status();
  EXPECT_EQ(*address, "[::]");
}

// Unlike the other variables, an empty LISTEN_ADDRESS is not read as unset: that would listen
// on every interface. A port, a host name, a scope id and other text are refused too.
TEST(ListenAddressTest, RefusesAnythingButAnAddressOrLocalhostNamingTheVariable) {
  const char* const refused[] = {
      "",          " ",         " 127.0.0.1",   "127.0.0.1:50051", "[::1]:50051", "localhost:50051",
      "127.1",     "256.0.0.1", "1.2.3.4.5",    "[127.0.0.1]",     "[::1",        "::1]",
      "[]",        "[[::1]]",   "fe80::1%eth0", "my-host",         "example.com", "*",
      "0.0.0.0/0", "::1/128",
  };
  for (const char* value : refused) {
    EXPECT_EQ(ParseListenAddress(value).status().code(), absl::StatusCode::kInvalidArgument)
        << "accepted '" << value << "'";
    auto env = MinimalEnv();
    env["LISTEN_ADDRESS"] = value;
    const absl::StatusOr<Config> config = LoadConfig(FakeEnv(env));
    ASSERT_FALSE(config.ok()) << "accepted '" << value << "'";
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << value;
    const std::string message(config.status().message());
    EXPECT_THAT(message, StartsWith("LISTEN_ADDRESS: ")) << value;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    const absl::StatusOr<std::string> alone = ListenAddress(FakeEnv({{"LISTEN_ADDRESS", value}}));
    ASSERT_FALSE(alone.ok()) << value;
    EXPECT_THAT(std::string(alone.status().message()), StartsWith("LISTEN_ADDRESS: ")) << value;
  }
  EXPECT_THAT(ErrorFor("LISTEN_ADDRESS", "127.0.0.1:50051"), HasSubstr("PORT"))
      << "says where the port goes";
}

// A NUL inside the value must not let its first part pass for the whole.
TEST(ListenAddressTest, RefusesAnAddressFollowedByANul) {
  EXPECT_FALSE(ParseListenAddress(absl::string_view("127.0.0.1\0junk", 14)).ok());
  EXPECT_FALSE(ParseListenAddress(absl::string_view("::1\0junk", 8)).ok());
}

// What `healthcheck` connects to: the loopback for a wildcard or localhost, else the address.
TEST(ListenAddressTest, LocalTargetReachesTheListener) {
  EXPECT_EQ(LocalTarget("[::]", 50051), "127.0.0.1:50051");
  EXPECT_EQ(LocalTarget("0.0.0.0", 50051), "127.0.0.1:50051");
  EXPECT_EQ(LocalTarget("localhost", 6000), "127.0.0.1:6000");
  EXPECT_EQ(LocalTarget("127.0.0.1", 6000), "127.0.0.1:6000");
  EXPECT_EQ(LocalTarget("[::1]", 6000), "[::1]:6000");
  EXPECT_EQ(LocalTarget("10.1.2.3", 50051), "10.1.2.3:50051");
}

TEST(LoadConfigTest, AcceptsEachMinimum) {
  auto env = MinimalEnv();
  env["DEFAULT_CALL_TIMEOUT_MS"] = "1";
  env["HEALTH_CHECK_INTERVAL_MS"] = "50";
  absl::StatusOr<Config> config = LoadConfig(FakeEnv(env));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->default_call_timeout, absl::Milliseconds(1));
  EXPECT_EQ(config->health_check_interval, absl::Milliseconds(50));
}

TEST(LoadConfigTest, TtlAboveMaxLifetimeIsAStartupError) {
  auto env = MinimalEnv();
  env["SESSION_TTL_SECONDS"] = "7200";
  env["SESSION_MAX_LIFETIME_SECONDS"] = "3600";
  absl::StatusOr<Config> config = LoadConfig(FakeEnv(env));
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(std::string(config.status().message()), StartsWith("SESSION_TTL_SECONDS: "));
  EXPECT_THAT(std::string(config.status().message()), HasSubstr("SESSION_MAX_LIFETIME_SECONDS"));
}

TEST(LoadConfigTest, MigrateNeedsOnlyTheDatabase) {
  EXPECT_TRUE(LoadMigrateConfig(FakeEnv({{"DATABASE_URL", "postgres://h/db"}})).ok());
  EXPECT_FALSE(LoadMigrateConfig(FakeEnv({})).ok());
}

TEST(ConfigHelpTest, ListsEveryVariableWithItsDefault) {
  const std::string help = ConfigHelpText();
  for (const ConfigVariable& v : ConfigVariables()) {
    EXPECT_THAT(help, HasSubstr(std::string(v.name)));
    if (!v.default_value.empty()) {
      EXPECT_THAT(help, HasSubstr("[" + std::string(v.default_value) + "]"));
    }
  }
}

// The table that --help prints (and the README mirrors) names exactly what LoadConfig reads: a
// variable read but not listed is undocumented, one listed but not read is silently ignored.
TEST(ConfigHelpTest, ListsExactlyTheVariablesLoadConfigReads) {
  std::set<std::string> read;
  const EnvLookup minimal = FakeEnv(MinimalEnv());
  const EnvLookup recording = [&read, &minimal](absl::string_view name) {
    read.insert(std::string(name));
    return minimal(name);
  };
  // A valid environment, so that LoadConfig reads every variable before it returns.
  const absl::StatusOr<Config> config = LoadConfig(recording);
  ASSERT_TRUE(config.ok()) << config.status();
  std::set<std::string> listed;
  for (const ConfigVariable& v : ConfigVariables()) listed.insert(std::string(v.name));
  EXPECT_EQ(listed.size(), ConfigVariables().size()) << "a variable is listed twice";
  EXPECT_EQ(read, listed);
}

// Every field of two Configs, each named when it differs. A field added to Config belongs here.
void ExpectSameConfig(const Config& a, const Config& b) {
  EXPECT_EQ(a.port, b.port) << "port";
  EXPECT_EQ(a.listen_address, b.listen_address) << "listen_address";
  EXPECT_EQ(a.memcached.nodes, b.memcached.nodes) << "memcached.nodes";
  EXPECT_EQ(a.memcached.replicas, b.memcached.replicas) << "memcached.replicas";
  EXPECT_EQ(a.database_url, b.database_url) << "database_url";
  EXPECT_EQ(a.session_ttl, b.session_ttl) << "session_ttl";
  EXPECT_EQ(a.session_max_lifetime, b.session_max_lifetime) << "session_max_lifetime";
  EXPECT_EQ(a.shutdown_grace, b.shutdown_grace) << "shutdown_grace";
  EXPECT_EQ(a.shutdown_notice, b.shutdown_notice) << "shutdown_notice";
  EXPECT_EQ(a.log_level, b.log_level) << "log_level";
  EXPECT_EQ(a.metrics_port, b.metrics_port) << "metrics_port";
  EXPECT_EQ(a.memcached_pool_size, b.memcached_pool_size) << "memcached_pool_size";
  EXPECT_EQ(a.memcached_pipeline, b.memcached_pipeline) << "memcached_pipeline";
  EXPECT_EQ(a.database_pool_size, b.database_pool_size) << "database_pool_size";
  EXPECT_EQ(a.default_call_timeout, b.default_call_timeout) << "default_call_timeout";
  EXPECT_EQ(a.health_check_interval, b.health_check_interval) << "health_check_interval";
  EXPECT_EQ(a.grpc_max_connection_age, b.grpc_max_connection_age) << "grpc_max_connection_age";
  EXPECT_EQ(a.grpc_max_recv_bytes, b.grpc_max_recv_bytes) << "grpc_max_recv_bytes";
  EXPECT_EQ(a.max_user_id_bytes, b.max_user_id_bytes) << "max_user_id_bytes";
  EXPECT_EQ(a.max_attribute_key_bytes, b.max_attribute_key_bytes) << "max_attribute_key_bytes";
  EXPECT_EQ(a.max_session_attributes_bytes, b.max_session_attributes_bytes)
      << "max_session_attributes_bytes";
  EXPECT_EQ(a.max_idempotency_key_bytes, b.max_idempotency_key_bytes)
      << "max_idempotency_key_bytes";
  EXPECT_EQ(a.grpc_max_concurrent_streams, b.grpc_max_concurrent_streams)
      << "grpc_max_concurrent_streams";
  EXPECT_EQ(a.tls.cert_chain_pem, b.tls.cert_chain_pem) << "tls.cert_chain_pem";
  EXPECT_EQ(a.tls.private_key_pem, b.tls.private_key_pem) << "tls.private_key_pem";
  EXPECT_EQ(a.tls.client_ca_pem, b.tls.client_ca_pem) << "tls.client_ca_pem";
  EXPECT_EQ(a.malloc_arena_max, b.malloc_arena_max) << "malloc_arena_max";
}

// The defaults the table lists are LoadConfig's own: every variable set to its listed default
// loads the same Config as an environment with only the required variables.
TEST(ConfigHelpTest, ListedDefaultsAreLoadConfigsDefaults) {
  auto env = MinimalEnv();
  for (const ConfigVariable& v : ConfigVariables()) {
    if (v.default_value.empty()) {  // Required: no default, and MinimalEnv sets it.
      EXPECT_EQ(env.count(std::string(v.name)), 1u) << v.name << " is required";
      continue;
    }
    if (v.default_value == "unset") continue;  // Not a value but its absence (no TLS).
    env[std::string(v.name)] = std::string(v.default_value);
  }
  const absl::StatusOr<Config> listed = LoadConfig(FakeEnv(env));
  ASSERT_TRUE(listed.ok()) << listed.status();
  const absl::StatusOr<Config> unset = LoadConfig(FakeEnv(MinimalEnv()));
  ASSERT_TRUE(unset.ok()) << unset.status();
  ExpectSameConfig(*listed, *unset);
}

TEST(LoadConfigTest, GrpcLimitsHaveSafeDefaultsAndBounds) {
  absl::StatusOr<Config> config = LoadConfig(FakeEnv(MinimalEnv()));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->grpc_max_recv_bytes, 1 << 20);
  EXPECT_EQ(config->grpc_max_concurrent_streams, 100);
  EXPECT_FALSE(config->tls.enabled()) << "TLS is opt-in";

  auto env = MinimalEnv();
  env["GRPC_MAX_RECV_BYTES"] = "524288";
  env["GRPC_MAX_CONCURRENT_STREAMS"] = "8";
  config = LoadConfig(FakeEnv(env));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->grpc_max_recv_bytes, 524288);
  EXPECT_EQ(config->grpc_max_concurrent_streams, 8);

  for (const char* bad : {"0", "-1", "lots", "100001", "1e3"}) {
    const std::string message = ErrorFor("GRPC_MAX_CONCURRENT_STREAMS", bad);
    EXPECT_THAT(message, StartsWith("GRPC_MAX_CONCURRENT_STREAMS: ")) << bad;
  }
  // Below 1 KiB no real request fits; above 2 GiB gRPC's int argument overflows.
  EXPECT_THAT(ErrorFor("GRPC_MAX_RECV_BYTES", "1023"), StartsWith("GRPC_MAX_RECV_BYTES: "));
  EXPECT_THAT(ErrorFor("GRPC_MAX_RECV_BYTES", "2147483648"), StartsWith("GRPC_MAX_RECV_BYTES: "));
}

// Attributes of `total_bytes` (key and value bytes, as SessionService counts them) in as many
// entries as a map can hold: the shortest distinct keys, with empty values. Any byte may be in
// a key here; the server's rules for keys only allow fewer entries.
google::protobuf::Map<std::string, std::string> MostEntriesWithin(int64_t total_bytes) {
  google::protobuf::Map<std::string, std::string> attributes;
  int64_t bytes_left = total_bytes;
  for (size_t length = 0; static_cast<int64_t>(length) <= bytes_left; ++length) {
    // Every key of this length in turn, counting it up as a base-256 number.
    std::string key(length, '\0');
    for (;;) {
      if (static_cast<int64_t>(length) > bytes_left) return attributes;
      attributes[key] = "";
      bytes_left -= static_cast<int64_t>(length);
      size_t digit = 0;
      for (; digit < length; ++digit) {
        key[digit] = static_cast<char>(static_cast<unsigned char>(key[digit]) + 1);
        if (key[digit] != '\0') break;  // No carry into the next digit.
      }
      if (digit == length) break;  // Every key of this length is taken.
    }
  }
  return attributes;
}

// gRPC refuses a request above GRPC_MAX_RECV_BYTES before any handler runs, logging nothing;
// the bound LoadConfig holds it to must cover the largest request the other limits allow.
TEST(LoadConfigTest, LargestSessionWriteRequestBoundsWhatTheLimitsAllow) {
  const std::pair<int64_t, int64_t> limits[] = {{65536, 128}, {524288, 1024}, {1, 1},
                                                {200, 64},    {1000, 1},      {70000, 300}};
  for (const auto& [attributes_bytes, user_id_bytes] : limits) {
    const int64_t bound = LargestSessionWriteRequestBytes(attributes_bytes, user_id_bytes);
    const google::protobuf::Map<std::string, std::string> many =
        MostEntriesWithin(attributes_bytes);

    v1::CreateSessionRequest create;
    create.set_user_id(std::string(static_cast<size_t>(user_id_bytes), 'u'));
    create.set_ttl_seconds(-1);  // A negative varint takes the most bytes, 10.
    *create.mutable_attributes() = many;
    EXPECT_LE(static_cast<int64_t>(create.ByteSizeLong()), bound)
        << attributes_bytes << " attribute bytes in " << many.size() << " entries";

    v1::UpdateSessionRequest update;
    // config.cc keeps its own copy of the token length (its layer is below the session's).
    update.set_token(std::string(kTokenLength, 't'));
    update.set_expected_version(-1);
    *update.mutable_set() = many;
    EXPECT_LE(static_cast<int64_t>(update.ByteSizeLong()), bound) << attributes_bytes;

    // One entry as large as the limit allows: the framing of long lengths.
    v1::CreateSessionRequest one_large = create;
    one_large.clear_attributes();
    const size_t key_bytes = static_cast<size_t>(std::min<int64_t>(attributes_bytes, 128));
    (*one_large.mutable_attributes())[std::string(key_bytes, 'k')] =
        std::string(static_cast<size_t>(attributes_bytes) - key_bytes, 'v');
    EXPECT_LE(static_cast<int64_t>(one_large.ByteSizeLong()), bound) << attributes_bytes;

    // Sound, yet not so loose that it refuses GRPC_MAX_RECV_BYTES values that would serve.
    const int64_t largest =
        static_cast<int64_t>(std::max(create.ByteSizeLong(), update.ByteSizeLong()));
    EXPECT_GT(largest, bound - bound / 20) << attributes_bytes;
  }
}

TEST(LoadConfigTest, RefusesAReceiveLimitBelowARequestTheAttributeLimitAllows) {
  // 65536 bytes of attributes (the default) as 32,897 small entries take ~263 KB on the wire.
  const std::string message = ErrorFor("GRPC_MAX_RECV_BYTES", "65536");
  EXPECT_THAT(message, StartsWith("GRPC_MAX_RECV_BYTES: 65536 is below "));
  EXPECT_THAT(message, HasSubstr("MAX_SESSION_ATTRIBUTES_BYTES (65536)"));
  EXPECT_THAT(message, HasSubstr("MAX_USER_ID_BYTES (128)"));
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;

  const int64_t needed = LargestSessionWriteRequestBytes(65536, 128);
  auto env = MinimalEnv();
  env["GRPC_MAX_RECV_BYTES"] = std::to_string(needed);
  absl::StatusOr<Config> config = LoadConfig(FakeEnv(env));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->grpc_max_recv_bytes, needed);
  EXPECT_THAT(ErrorFor("GRPC_MAX_RECV_BYTES", std::to_string(needed - 1)),
              StartsWith("GRPC_MAX_RECV_BYTES: "));

  // The other way out: a smaller attribute limit fits the smaller receive limit.
  env["GRPC_MAX_RECV_BYTES"] = "65536";
  env["MAX_SESSION_ATTRIBUTES_BYTES"] = "8192";
  config = LoadConfig(FakeEnv(env));
  ASSERT_TRUE(config.ok()) << config.status();

  // The largest attribute limit needs more than the default receive limit.
  EXPECT_THAT(ErrorFor("MAX_SESSION_ATTRIBUTES_BYTES", "524288"),
              StartsWith("GRPC_MAX_RECV_BYTES: 1048576 is below "));
}

// A user id and an idempotency key are indexed together in PostgreSQL, whose btree entries
// hold at most 2704 bytes; limits above what fits would make Deposit fail with INTERNAL.
TEST(LoadConfigTest, IndexedInputLimitsStayWithinWhatPostgresCanIndex) {
  auto env = MinimalEnv();
  env["MAX_USER_ID_BYTES"] = "1024";
  env["MAX_IDEMPOTENCY_KEY_BYTES"] = "1024";
  absl::StatusOr<Config> config = LoadConfig(FakeEnv(env));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->max_user_id_bytes, 1024);
  EXPECT_EQ(config->max_idempotency_key_bytes, 1024);
  EXPECT_THAT(ErrorFor("MAX_USER_ID_BYTES", "1025"), StartsWith("MAX_USER_ID_BYTES: "));
  EXPECT_THAT(ErrorFor("MAX_IDEMPOTENCY_KEY_BYTES", "1025"),
              StartsWith("MAX_IDEMPOTENCY_KEY_BYTES: "));
}

TEST(ConfigHelpTest, DocumentsTheHardeningVariables) {
  const std::string help = ConfigHelpText();
  for (const char* name : {"GRPC_MAX_RECV_BYTES", "GRPC_MAX_CONCURRENT_STREAMS", "TLS_CERT_FILE",
                           "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE"}) {
    EXPECT_THAT(help, HasSubstr(name));
  }
  EXPECT_THAT(help, HasSubstr("RESOURCE_EXHAUSTED"));
}

TEST(DatabaseUrlTest, RedactsPasswordsWithReservedCharacters) {
  // libpq takes everything up to the first '@' before the first '/' as user info, '?' included,
  // so these are all passwords that must not reach a log line: every one a URL holds, in each
  // spelling it has.
  const std::pair<const char*, std::vector<std::string>> cases[] = {
      {"postgres://app:my?secret@db/ledger", {"my?secret"}},
      {"postgres://app:pw?x@db", {"pw?x"}},
      {"postgresql://app:top-secret@db:5432?password=other-secret", {"top-secret", "other-secret"}},
      {"postgres://db/ledger?user=app&password=qu%65ry-secret", {"qu%65ry-secret", "query-secret"}},
      // A keyword spelled with escapes is still the keyword to libpq (a security review).
      {"postgres://db/ledger?user=app&pass%77ord=s%65cr%65t", {"s%65cr%65t", "secret"}},
      // The passphrase of the client key for TLS to PostgreSQL is as secret as the password.
      {"postgres://app@db/ledger?sslmode=verify-full&sslpassword=TOPSECRET", {"TOPSECRET"}},
      {"postgres://app@db/ledger?ssl%70assword=TOP%53ECRET", {"TOP%53ECRET", "TOPSECRET"}},
  };
  for (const auto& [url, passwords] : cases) {
    ASSERT_TRUE(ValidateDatabaseUrl(url).ok()) << url;
    const std::string redacted = RedactDatabaseUrl(url);
    for (const std::string& password : passwords) {
      EXPECT_THAT(redacted, ::testing::Not(HasSubstr(password))) << url << " -> " << redacted;
    }
    EXPECT_THAT(redacted, HasSubstr("****")) << url;
  }
  EXPECT_EQ(RedactDatabaseUrl("postgres://app:my?secret@db/ledger"),
            "postgres://app:****@db/ledger");
}

// libpq ends the user info at the first '@', so the rest of such a password becomes the host, and
// its failed lookup would be logged: the URL is refused at start-up, without echoing any of it.
TEST(DatabaseUrlTest, AnUnencodedAtInThePasswordIsRefusedWithoutEchoingIt) {
  // Each URL with the part of its password that libpq would take for the host.
  const std::pair<const char*, const char*> cases[] = {
      {"postgres://app:pa@zzq@db/x", "zzq"},
      {"postgres://app:a?b@xqz@db/ledger", "xqz"},
      {"postgres://app:pw@qzx@db-0,db-1/ledger", "qzx"},
  };
  for (const auto& [url, rest] : cases) {
    const absl::Status status = ValidateDatabaseUrl(url);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << url;
    EXPECT_THAT(status.message(), HasSubstr("percent-encode")) << url;
    EXPECT_THAT(status.message(), ::testing::Not(HasSubstr(rest))) << url;
    // Redaction still hides everything up to the last '@'.
    EXPECT_THAT(RedactDatabaseUrl(url), ::testing::Not(HasSubstr(rest))) << url;
  }
  EXPECT_EQ(ValidateDatabaseUrl("postgres://db/x?host=a,b@c").code(),
            absl::StatusCode::kInvalidArgument);
  // Encoded, the same password is fine; so is an abstract unix socket's leading '@'.
  EXPECT_TRUE(ValidateDatabaseUrl("postgres://app:pa%40ss@db/x").ok());
  EXPECT_TRUE(ValidateDatabaseUrl("postgres://app@/ledger?host=@pgsock").ok());
  EXPECT_TRUE(ValidateDatabaseUrl("postgres:///ledger?host=/run/pg@main").ok());
}

}  // namespace
}  // namespace sessionledger
