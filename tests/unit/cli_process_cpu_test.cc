#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/process_cpu.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sessionledger::client {
namespace {

using ::testing::HasSubstr;

// Fields 3..22 of a stat line after the command name, each value distinct so that reading a
// neighbouring field (cutime for utime, say) shows: utime (14) = 111, stime (15) = 22,
// cutime (16) = 999, cstime (17) = 888, starttime (22) = 5555.
constexpr char kAfterName[] =
    " S 1 1234 1234 0 -1 4194560 1000 7 3 2 111 22 999 888 20 0 9 0 5555 3133440 380 "
    "18446744073709551615 0 0\n";

TEST(CliProcessCpuTest, ParsesUtimeStimeAndStartTime) {
  absl::StatusOr<ProcStat> stat =
      ParseProcStat(absl::StrCat("1234 (sessionledger-se)", kAfterName));
  ASSERT_TRUE(stat.ok()) << stat.status();
  EXPECT_EQ(stat->state, 'S');
  EXPECT_EQ(stat->utime_ticks, 111u);
  EXPECT_EQ(stat->stime_ticks, 22u);
  EXPECT_EQ(stat->start_ticks, 5555u);
}

TEST(CliProcessCpuTest, CommandNameMayHoldSpacesAndParentheses) {
  for (const char* name : {"(a b)", "(x) S 1 2 3)", "())", "(a (b) c)"}) {
    absl::StatusOr<ProcStat> stat = ParseProcStat(absl::StrCat("42 ", name, kAfterName));
    ASSERT_TRUE(stat.ok()) << name << ": " << stat.status();
    EXPECT_EQ(stat->state, 'S') << name;
    EXPECT_EQ(stat->utime_ticks, 111u) << name;
    EXPECT_EQ(stat->stime_ticks, 22u) << name;
    EXPECT_EQ(stat->start_ticks, 5555u) << name;
  }
}

TEST(CliProcessCpuTest, RejectsWhatIsNotAStatLine) {
  for (const std::string& text :
       {std::string(""), std::string("1234 cat S 1 2 3"), std::string("1234 (cat) S 1 2 3 4 5"),
        absl::StrCat("1234 (cat) S 1 1234 1234 0 -1 4194560 1000 7 3 2 ticks 22 999 888 20 0 9 0 "
                     "5555 0\n"),
        absl::StrCat("1234 (cat) SS 1 1234 1234 0 -1 4194560 1000 7 3 2 111 22 999 888 20 0 9 0 "
                     "5555 0\n")}) {
    absl::StatusOr<ProcStat> stat = ParseProcStat(text);
    EXPECT_EQ(stat.status().code(), absl::StatusCode::kInvalidArgument) << text;
  }
}

TEST(CliProcessCpuTest, ReadsALiveProcessAndReportsAnEndedOne) {
  absl::StatusOr<std::vector<ProcessCpu>> self = ReadProcessesCpu({getpid()});
  ASSERT_TRUE(self.ok()) << self.status();
  ASSERT_EQ(self->size(), 1u);
  EXPECT_EQ((*self)[0].pid, getpid());
  EXPECT_GT((*self)[0].start_ticks, 0u);
  EXPECT_GE((*self)[0].cpu, absl::ZeroDuration());

  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) _exit(0);
  // Until it is reaped the child is a zombie: its /proc entry is still there.
  siginfo_t info{};
  ASSERT_EQ(waitid(P_PID, static_cast<id_t>(child), &info, WEXITED | WNOWAIT), 0);
  absl::StatusOr<std::vector<ProcessCpu>> zombie = ReadProcessesCpu({getpid(), child});
  EXPECT_EQ(zombie.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(zombie.status().message()), HasSubstr(absl::StrCat("pid ", child)));
  int wstatus = 0;
  ASSERT_EQ(waitpid(child, &wstatus, 0), child);
  absl::StatusOr<std::vector<ProcessCpu>> gone = ReadProcessesCpu({child});
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(gone.status().message()), HasSubstr(absl::StrCat("pid ", child)));
}

TEST(CliProcessCpuTest, CpuUsedBetweenSumsAndNoticesAReusedPid) {
  const std::vector<ProcessCpu> start = {{10, 500, absl::Milliseconds(100)},
                                         {11, 600, absl::Milliseconds(40)}};
  std::vector<ProcessCpu> end = {{10, 500, absl::Milliseconds(130)},
                                 {11, 600, absl::Milliseconds(45)}};
  absl::StatusOr<absl::Duration> used = CpuUsedBetween(start, end);
  ASSERT_TRUE(used.ok()) << used.status();
  EXPECT_EQ(*used, absl::Milliseconds(35));

  end[1].start_ticks = 700;  // pid 11 ended and a new process got the number
  used = CpuUsedBetween(start, end);
  EXPECT_EQ(used.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(used.status().message()), HasSubstr("pid 11"));

  EXPECT_FALSE(CpuUsedBetween(start, {end[0]}).ok());
}

// This thread's user and system time so far, by getrusage.
absl::Duration ThreadTime(bool system) {
  rusage usage{};
  getrusage(RUSAGE_THREAD, &usage);
  return absl::DurationFromTimeval(system ? usage.ru_stime : usage.ru_utime);
}

// /proc/PID/stat's reading is the process's user and system time, in seconds: compared with
// getrusage after ~150 ms of each (spinning, then the kernel copying from /dev/zero). Clock ticks
// are 10 ms; each of the two /proc fields may fall short by one.
TEST(CliProcessCpuTest, AProcessCpuIsItsUserAndSystemTime) {
  const absl::Duration user_from = ThreadTime(false);
  volatile uint64_t sink = 0;
  while (ThreadTime(false) - user_from < absl::Milliseconds(150)) {
    for (int i = 0; i < 100000; ++i) sink = sink + static_cast<uint64_t>(i);
  }
  const int zero = open("/dev/zero", O_RDONLY | O_CLOEXEC);
  ASSERT_GE(zero, 0);
  std::vector<char> buffer(1 << 20);
  const absl::Duration system_from = ThreadTime(true);
  while (ThreadTime(true) - system_from < absl::Milliseconds(150)) {
    ASSERT_GT(read(zero, buffer.data(), buffer.size()), 0);
  }
  close(zero);

  absl::StatusOr<absl::Duration> self = SelfCpuTime();
  ASSERT_TRUE(self.ok()) << self.status();
  absl::StatusOr<std::vector<ProcessCpu>> proc = ReadProcessesCpu({getpid()});
  ASSERT_TRUE(proc.ok()) << proc.status();
  const absl::Duration read = (*proc)[0].cpu;
  EXPECT_GE(read, absl::Milliseconds(280)) << "user and system time, in seconds";
  EXPECT_GE(read, *self - absl::Milliseconds(30)) << "some of it was left out";
  EXPECT_LE(read, *self + absl::Milliseconds(30));
}

TEST(CliProcessCpuTest, SelfCpuTimeGrowsWithWork) {
  absl::StatusOr<absl::Duration> before = SelfCpuTime();
  ASSERT_TRUE(before.ok()) << before.status();
  // 50 ms of this thread's CPU by the POSIX clock; getrusage must see most of it (it may be
  // charged in whole clock ticks).
  timespec start{};
  timespec now{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &start);
  volatile uint64_t sink = 0;
  do {
    for (int i = 0; i < 10000; ++i) sink = sink + static_cast<uint64_t>(i);
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  } while (absl::DurationFromTimespec(now) - absl::DurationFromTimespec(start) <
           absl::Milliseconds(50));
  absl::StatusOr<absl::Duration> after = SelfCpuTime();
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_GE(*after - *before, absl::Milliseconds(30));
}

}  // namespace
}  // namespace sessionledger::client
