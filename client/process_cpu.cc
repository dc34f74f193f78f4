#include "client/process_cpu.h"

#include <sys/resource.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace sessionledger::client {
namespace {

// Fields after the command name, counted from field 3 (the state).
constexpr size_t kFirstFieldAfterName = 3;
constexpr size_t kUtimeField = 14;
constexpr size_t kStimeField = 15;
constexpr size_t kStartTimeField = 22;

absl::Duration FromTimeval(const timeval& tv) {
  return absl::Seconds(tv.tv_sec) + absl::Microseconds(tv.tv_usec);
}

}  // namespace

absl::StatusOr<ProcStat> ParseProcStat(absl::string_view text) {
  const size_t open = text.find('(');
  const size_t close = text.rfind(')');
  if (open == absl::string_view::npos || close == absl::string_view::npos || close < open) {
    return absl::InvalidArgumentError("not a /proc/PID/stat line: no (command name)");
  }
  const std::vector<absl::string_view> fields =
      absl::StrSplit(text.substr(close + 1), absl::ByAnyChar(" \n"), absl::SkipEmpty());
  auto field = [&](size_t number) { return fields[number - kFirstFieldAfterName]; };
  if (fields.size() <= kStartTimeField - kFirstFieldAfterName || field(3).size() != 1) {
    return absl::InvalidArgumentError("not a /proc/PID/stat line: too few fields");
  }
  ProcStat stat;
  stat.state = field(3)[0];
  if (!absl::SimpleAtoi(field(kUtimeField), &stat.utime_ticks) ||
      !absl::SimpleAtoi(field(kStimeField), &stat.stime_ticks) ||
      !absl::SimpleAtoi(field(kStartTimeField), &stat.start_ticks)) {
    return absl::InvalidArgumentError("not a /proc/PID/stat line: utime, stime or starttime");
  }
  return stat;
}

absl::StatusOr<std::vector<ProcessCpu>> ReadProcessesCpu(const std::vector<int>& pids) {
  const long ticks_per_second = sysconf(_SC_CLK_TCK);
  if (ticks_per_second <= 0) return absl::InternalError("sysconf(_SC_CLK_TCK) failed");
  std::vector<ProcessCpu> result;
  for (const int pid : pids) {
    std::ifstream file(absl::StrCat("/proc/", pid, "/stat"));
    std::ostringstream text;
    if (!(file && text << file.rdbuf())) {
      return absl::NotFoundError(absl::StrCat("pid ", pid, " is gone"));
    }
    absl::StatusOr<ProcStat> stat = ParseProcStat(text.str());
    if (!stat.ok())
      return absl::InternalError(absl::StrCat("pid ", pid, ": ", stat.status().message()));
    // A zombie's counters are final: it is no longer running whatever the window measures.
    if (stat->state == 'Z' || stat->state == 'X') {
      return absl::NotFoundError(absl::StrCat("pid ", pid, " has ended"));
    }
    const auto ticks = static_cast<int64_t>(stat->utime_ticks + stat->stime_ticks);
    result.push_back({pid, stat->start_ticks, absl::Seconds(1) * ticks / ticks_per_second});
  }
  return result;
}

absl::StatusOr<absl::Duration> CpuUsedBetween(const std::vector<ProcessCpu>& start,
                                              const std::vector<ProcessCpu>& end) {
  if (start.size() != end.size()) {
    return absl::InvalidArgumentError("CPU readings of different processes");
  }
  absl::Duration used;
  for (size_t i = 0; i < start.size(); ++i) {
    if (start[i].pid != end[i].pid) {
      return absl::InvalidArgumentError("CPU readings of different processes");
    }
    if (start[i].start_ticks != end[i].start_ticks) {
      return absl::NotFoundError(
          absl::StrCat("pid ", start[i].pid, " ended and was reused by another process"));
    }
    used += end[i].cpu - start[i].cpu;
  }
  return used;
}

absl::StatusOr<absl::Duration> SelfCpuTime() {
  rusage usage{};
  if (getrusage(RUSAGE_SELF, &usage) != 0) return absl::InternalError("getrusage failed");
  return FromTimeval(usage.ru_utime) + FromTimeval(usage.ru_stime);
}

}  // namespace sessionledger::client
