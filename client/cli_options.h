#ifndef SESSIONLEDGER_CLIENT_CLI_OPTIONS_H_
#define SESSIONLEDGER_CLIENT_CLI_OPTIONS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/channel.h"

namespace sessionledger::client {

inline constexpr char kDefaultTarget[] = "localhost:50051";
inline constexpr char kTargetEnv[] = "SESSIONLEDGER_TARGET";
inline constexpr char kTokenEnv[] = "SESSIONLEDGER_TOKEN";

// Reads one environment variable; std::nullopt when unset. Injected so that parsing is a pure
// function of its inputs (tests pass a map, main passes getenv).
using EnvLookup = std::function<std::optional<std::string>(const std::string& name)>;

enum class Command {
  kHelp,
  kHealth,
  kSessionCreate,
  kSessionGet,
  kSessionUpdate,
  kSessionRotate,
  kSessionDelete,
  kSessionList,
  kSessionRevoke,
  kAccountOpen,
  kAccountGet,
  kDeposit,
  kTransfer,
  kHistory,
  kBench,
};

// What `bench --rpc` drives. kCreateGetSession creates a session and reads it back (two calls
// per iteration); scripts/bench uses it to fill the server with sessions for the RSS check.
enum class BenchRpc {
  kHealth,
  kCreateSession,
  kGetSession,
  kUpdateSession,
  kTransfer,
  kCreateGetSession
};

// --cpu-of NAME=PID[+PID...]: processes whose CPU time the bench report divides by the calls.
struct CpuOf {
  std::string name;       // the report's key; letters, digits, '-', '_', '.'; never "client"
  std::vector<int> pids;  // positive, no pid twice
};

struct BenchOptions {
  BenchRpc rpc = BenchRpc::kHealth;
  int concurrency = 16;
  // 0 = 4; the generator opens at most `concurrency` of them. Separate HTTP/2 connections, so
  // the server can spread the load over its threads as many independent clients would.
  int connections = 0;
  // Each at most 24h (the parser's bound; beyond it steady_clock arithmetic would overflow).
  absl::Duration duration = absl::Seconds(10);
  absl::Duration warmup = absl::Seconds(2);
  // > 0: stop after this many iterations instead of after `duration` (no warm-up).
  int64_t requests = 0;
  // > 0: pace the slots to this many iterations per second in total (each slot starts its
  // calls on a fixed schedule). Latency is then measured from the scheduled start, so a
  // server that falls behind shows its queueing delay (no coordinated omission). The parser
  // allows 0 or 0.001..1e9, so one slot's interval (concurrency / rate) fits in int64 ns.
  double rate = 0;
  // GetSession with touch = true (a write to Memcached) instead of a pure read.
  bool touch = false;
  bool progress = true;
  // In the order given; the client's own CPU is always reported, under "client".
  std::vector<CpuOf> cpu_of;
};

// Everything a command line says, already validated for shape (numbers parse, required
// arguments are present). Values the server validates (currency format, user_id limits) are
// passed through so that the contract has one owner.
struct CliOptions {
  Command command = Command::kHelp;

  // Global options.
  // Each element is one address (host:port, dns:///host:port, ipv4:..., unix:...); more than
  // one means a client-side round_robin list.
  std::vector<std::string> targets;
  // Sent as `authorization: Bearer <token>`; also the default TOKEN of session commands.
  std::string token;
  absl::Duration deadline = absl::Seconds(10);
  bool json = false;
  TlsOptions tls;

  // Per-command arguments.
  std::string health_service;
  std::string user_id;
  int64_t ttl_seconds = 0;
  std::map<std::string, std::string> attributes;  // session create --attr, session update --set
  std::vector<std::string> remove;
  int64_t expected_version = 0;
  bool touch = false;
  std::string session_token;  // the request field of session get/update/rotate/delete
  std::string currency;
  std::string account_id;
  std::string from_account_id;
  std::string to_account_id;
  int64_t amount_minor = 0;
  std::string idempotency_key;  // empty: the CLI generates one and prints it
  int32_t page_size = 0;
  std::string page_token;
  bool all_pages = false;

  BenchOptions bench;
};

// Parses argv[1..] (without the program name). Global options may appear before or after the
// command words. A usage error is INVALID_ARGUMENT with a message fit for stderr.
absl::StatusOr<CliOptions> ParseCommandLine(const std::vector<std::string>& args,
                                            const EnvLookup& env);

// Accepts "2.5s", "300ms", "1m" (absl duration syntax) or a bare number of seconds.
absl::StatusOr<absl::Duration> ParseDurationFlag(const std::string& name, const std::string& value);

std::string UsageText();

const char* BenchRpcName(BenchRpc rpc);

}  // namespace sessionledger::client

#endif  // SESSIONLEDGER_CLIENT_CLI_OPTIONS_H_
