#ifndef SESSIONLEDGER_CLIENT_BENCH_H_
#define SESSIONLEDGER_CLIENT_BENCH_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/channel.h"
#include "client/cli_options.h"

namespace sessionledger::client {

// CPU time one process group used per call in the measured phase.
struct CpuPerCall {
  std::string name;                   // "client" or a --cpu-of NAME
  std::optional<double> us_per_call;  // none when it could not be measured ...
  std::string unavailable;            // ... and then why
};

struct BenchResult {
  std::string rpc;
  int concurrency = 0;
  int connections = 0;
  double seconds = 0;     // length of the measured phase
  uint64_t ok_calls = 0;  // successful calls in the measured phase
  double throughput = 0;  // ok_calls / seconds
  // Latency of successful calls (failures are often fast and would flatter the figures).
  double p50_ms = 0;
  double p90_ms = 0;
  double p99_ms = 0;
  double p999_ms = 0;
  double max_ms = 0;
  std::map<std::string, uint64_t> errors;  // status code name -> count, OK excluded
  // The calls still in flight when the measured phase ended (cancelled then, so in no other
  // figure), and the age of the oldest: a call stuck for most of the run shows here, not in
  // the latencies. With a server that answers, about one per slot, each younger than a call.
  uint64_t unfinished = 0;
  double oldest_unfinished_ms = 0;
  // Per successful and failed call of the measured phase: "client" (this process) first, then
  // each --cpu-of entry in the order given.
  std::vector<CpuPerCall> cpu;
};

// A closed-loop load generator on gRPC's callback API: `concurrency` slots, each with exactly
// one call in flight, issue the next call from the completion callback of the previous one, so
// a handful of gRPC threads drive any concurrency (no thread per call). Calls are spread over
// `connections` channels (separate HTTP/2 connections; never more than slots, so each carries
// calls), each balanced round_robin over the target's addresses. The run ends with the
// measured phase: calls still in flight then are cancelled (their CANCELLED is no error; they
// are reported as `unfinished`), and under `rate` slots waiting for their next turn are
// finished at once.
//
// Before the clock starts it prepares its own data through the same target: one session per
// slot for get-session / update-session, and for transfer a session, two accounts and a large
// deposit per slot, so slots never contend for a row and each transfer has a unique
// idempotency key. Progress goes to `progress` once a second (when options.progress).
//
// The CPU time of this process (getrusage) and of the options.cpu_of processes (/proc/PID/stat)
// is read when the measured phase starts and when it ends; a process that cannot be read then
// (it has ended) leaves its entry without a value, it does not fail the run.
absl::StatusOr<BenchResult> RunBench(const BenchOptions& options, const std::string& target,
                                     const ChannelOptions& channel_options,
                                     absl::Duration call_deadline, std::ostream& progress);

// --rate: when a slot's next call starts, from when its latency counts, and when the call after
// it is due. `due` is when the call was scheduled and `now` when the slot got to it (its
// previous call ended, or, for its first call, the client started the slot).
struct PacedCall {
  // Not due yet: the pacer starts it at `due` and times it from when it really starts (its
  // own lateness is the client's, not the server's), so `timed_from` is left unset.
  bool wait = false;
  // A call that starts at once (!wait): the time its latency counts from.
  std::chrono::steady_clock::time_point timed_from;
  std::chrono::steady_clock::time_point next_due;
};
PacedCall PlanPacedCall(bool first_call, std::chrono::steady_clock::time_point due,
                        std::chrono::steady_clock::time_point now,
                        std::chrono::nanoseconds interval);

// The readable report and the one-line JSON object (`--json`); both end with '\n'. CPU entries
// without a value are JSON null.
std::string FormatBenchResult(const BenchResult& result);
std::string BenchResultJson(const BenchResult& result);

// `sessionledger-cli bench`: runs, prints, returns the exit code (non-zero only when the run
// could not be prepared; call errors are part of the report). Says on `err` why a CPU entry has
// no value.
int RunBenchCommand(const CliOptions& options, const std::string& target,
                    const ChannelOptions& channel_options, std::ostream& out, std::ostream& err);

}  // namespace sessionledger::client

#endif  // SESSIONLEDGER_CLIENT_BENCH_H_
