#ifndef SESSIONLEDGER_CLIENT_PROCESS_CPU_H_
#define SESSIONLEDGER_CLIENT_PROCESS_CPU_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace sessionledger::client {

// The fields of a /proc/PID/stat line that CPU accounting needs (proc(5) numbering).
struct ProcStat {
  char state = '?';          // field 3: R, S, D, Z (zombie), X (dead), ...
  uint64_t utime_ticks = 0;  // field 14, clock ticks (sysconf(_SC_CLK_TCK)), all threads
  uint64_t stime_ticks = 0;  // field 15
  uint64_t start_ticks = 0;  // field 22: start time after boot, tells a reused pid apart
};

// Parses the text of /proc/PID/stat. Field 2, the command name, is in parentheses and may itself
// hold spaces and ')', so the other fields are counted from after the last ')'.
// INVALID_ARGUMENT for text that is not such a line.
absl::StatusOr<ProcStat> ParseProcStat(absl::string_view text);

// One process's CPU time (user + system, all its threads) at one moment.
struct ProcessCpu {
  int pid = 0;
  uint64_t start_ticks = 0;
  absl::Duration cpu;
};

// Reads /proc/PID/stat of each of `pids`, in order. NOT_FOUND naming the pid when one of them
// has ended (no such file, or a zombie); INTERNAL when the file does not parse.
absl::StatusOr<std::vector<ProcessCpu>> ReadProcessesCpu(const std::vector<int>& pids);

// The CPU time the processes of `start` used until `end` (two readings of the same pids).
// NOT_FOUND when a pid names another process at the end (it ended and the pid was reused).
absl::StatusOr<absl::Duration> CpuUsedBetween(const std::vector<ProcessCpu>& start,
                                              const std::vector<ProcessCpu>& end);

// This process's CPU time (user + system, all threads) from getrusage(RUSAGE_SELF).
absl::StatusOr<absl::Duration> SelfCpuTime();

}  // namespace sessionledger::client

#endif  // SESSIONLEDGER_CLIENT_PROCESS_CPU_H_
