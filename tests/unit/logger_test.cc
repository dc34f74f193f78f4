#include "server/common/logger.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/civil_time.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sessionledger {
namespace {

using ::testing::HasSubstr;

// Captures what a Logger writes through a pipe.
class PipeCapture {
 public:
  PipeCapture() { EXPECT_EQ(pipe(fds_), 0); }
  ~PipeCapture() {
    close(fds_[0]);
    if (fds_[1] >= 0) close(fds_[1]);
  }
  int write_fd() const { return fds_[1]; }
  // What has been written so far, without waiting for more.
  std::string ReadAvailable() {
    std::string out;
    pollfd readable{fds_[0], POLLIN, 0};
    char buffer[4096];
    while (poll(&readable, 1, 0) == 1 && (readable.revents & POLLIN) != 0) {
      const ssize_t n = read(fds_[0], buffer, sizeof(buffer));
      if (n <= 0) break;
      out.append(buffer, n);
    }
    return out;
  }
  // At most `bytes` of what has been written, in one read(2).
  std::string ReadUpTo(size_t bytes) {
    std::string out(bytes, '\0');
    const ssize_t n = read(fds_[0], out.data(), bytes);
    out.resize(n > 0 ? static_cast<size_t>(n) : 0);
    return out;
  }
  // Room for `bytes` unread, so that a test can write that much without a reader.
  void Enlarge(int bytes) { EXPECT_GE(Resize(bytes), bytes); }
  // Sets the pipe's capacity to at least `bytes` (the kernel rounds it up to a power of two
  // pages); the capacity it got, or -1.
  int Resize(int bytes) { return fcntl(fds_[1], F_SETPIPE_SZ, bytes); }
  // Closes the write end: a reader then reads to the end of what was written.
  void CloseWriteEnd() {
    close(fds_[1]);
    fds_[1] = -1;
  }
  // Everything written until the write end is closed: the loggers' lines and CloseWriteEnd may
  // come from other threads meanwhile.
  std::string ReadUntilClosed() {
    std::string out;
    char buffer[4096];
    ssize_t n;
    while ((n = read(fds_[0], buffer, sizeof(buffer))) > 0) out.append(buffer, n);
    return out;
  }
  std::string CloseAndRead() {
    CloseWriteEnd();
    return ReadUntilClosed();
  }

 private:
  int fds_[2] = {-1, -1};
};

TEST(LoggerTest, WritesOneJsonObjectPerLine) {
  PipeCapture capture;
  {
    Logger logger(LogLevel::kInfo, capture.write_fd());
    logger.Info("rpc finished",
                {{"method", "/a/B"}, {"code", "OK"}, {"duration_ms", 1.5}, {"n", 3}, {"ok", true}});
  }
  const std::string out = capture.CloseAndRead();
  EXPECT_THAT(out, ::testing::MatchesRegex(
                       R"(\{"ts":"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z","level":"info",)"
                       R"("msg":"rpc finished","method":"/a/B","code":"OK","duration_ms":1.5,)"
                       R"("n":3,"ok":true\}
)"));
}

TEST(LoggerTest, DropsLinesBelowTheLevel) {
  PipeCapture capture;
  {
    Logger logger(LogLevel::kWarn, capture.write_fd());
    logger.Info("hidden");
    logger.Debug("hidden");
    logger.Warn("shown");
  }
  const std::string out = capture.CloseAndRead();
  EXPECT_THAT(out, ::testing::Not(HasSubstr("hidden")));
  EXPECT_THAT(out, HasSubstr("\"level\":\"warn\""));
}

TEST(LoggerTest, EscapesControlCharactersAndInvalidUtf8) {
  std::string out;
  AppendJsonString(out, std::string("a\"b\\c\nd\x01\xff\xc3\xa9", 11));
  EXPECT_EQ(out, R"("a\"b\\c\nd\u0001\ufffdé")");
  // DEL is escaped too, and long plain runs around escapes are kept whole.
  out.clear();
  AppendJsonString(out, "plain run\x7f/sessionledger.v1.SessionService/GetSession\"");
  EXPECT_EQ(out, R"("plain run\u007f/sessionledger.v1.SessionService/GetSession\"")");
}

// The hand-written formatter against absl's own, over instants where dates go wrong: epoch and
// era edges, leap days (1900 and 2100 are not leap years, 2000 is), year and month ends, the
// last representable microsecond of 9999, and a spread of instants in between.
TEST(LoggerTest, UtcTimestampMatchesAbslFormatTime) {
  const absl::TimeZone utc = absl::UTCTimeZone();
  std::vector<absl::Time> instants = {
      absl::UnixEpoch(),
      absl::UnixEpoch() - absl::Microseconds(1),
      absl::FromCivil(absl::CivilSecond(1000, 1, 1, 0, 0, 0), utc),
      absl::FromCivil(absl::CivilSecond(1000, 3, 1, 0, 0, 0), utc) - absl::Microseconds(1),
      absl::FromCivil(absl::CivilSecond(1600, 2, 29, 12, 0, 0), utc),
      absl::FromCivil(absl::CivilSecond(1900, 2, 28, 23, 59, 59), utc) + absl::Microseconds(999999),
      absl::FromCivil(absl::CivilSecond(1900, 3, 1, 0, 0, 0), utc),
      absl::FromCivil(absl::CivilSecond(2000, 2, 29, 0, 0, 0), utc),
      absl::FromCivil(absl::CivilSecond(2000, 12, 31, 23, 59, 59), utc),
      absl::FromCivil(absl::CivilSecond(2026, 11, 29, 15, 9, 24), utc) + absl::Microseconds(123456),
      absl::FromCivil(absl::CivilSecond(2100, 2, 28, 0, 0, 0), utc),
      absl::FromCivil(absl::CivilSecond(2100, 3, 1, 0, 0, 0), utc),
      absl::FromCivil(absl::CivilSecond(9999, 12, 31, 23, 59, 59), utc) +
          absl::Microseconds(999999),
  };
  // From 1900 to 2200 in steps of 321,234 s and 12,345 us (~3.7 days, so that the time of day
  // and the microseconds move too).
  for (absl::Time t = absl::FromCivil(absl::CivilSecond(1900, 1, 1, 0, 0, 0), utc);
       t < absl::FromCivil(absl::CivilSecond(2200, 1, 1, 0, 0, 0), utc);
       t += absl::Seconds(321234) + absl::Microseconds(12345)) {
    instants.push_back(t);
  }
  for (const absl::Time t : instants) {
    std::string ours = "prefix:";
    AppendUtcTimestamp(ours, t);
    EXPECT_EQ(ours, "prefix:" + absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", t, utc));
  }
  // Outside years 1000-9999 the year is absl's: fewer digits, five, or signed.
  for (const absl::Time t : {absl::FromCivil(absl::CivilSecond(10000, 1, 1, 0, 0, 0), utc),
                             absl::FromCivil(absl::CivilSecond(999, 12, 31, 0, 0, 0), utc),
                             absl::FromCivil(absl::CivilSecond(-1, 12, 31, 0, 0, 0), utc)}) {
    std::string ours;
    AppendUtcTimestamp(ours, t);
    EXPECT_EQ(ours, absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", t, utc));
  }
}

// The lines of ConcurrentLinesNeverInterleave: writer w's fill is `fill_bytes` of one letter,
// its own.
constexpr int kWriters = 4;
constexpr int kLinesPerWriter = 24;
constexpr int kLinesPerBatch = 6;
static_assert(kLinesPerWriter % kLinesPerBatch == 0);
char FillByte(int writer) { return static_cast<char>('a' + writer); }

struct LongLine {
  int writer;
  int number;
};

// The writer and number of a whole line, exactly as the logger writes it:
//   {"ts":"<27 characters>","level":"info","msg":"long","writer":W,"i":I,"fill":"<fill>"}
// or std::nullopt for anything else (bytes of another line inside it, a line cut short).
std::optional<LongLine> ParseLongLine(absl::string_view line, size_t fill_bytes) {
  constexpr size_t kTimestampLength = sizeof("YYYY-MM-DDTHH:MM:SS.ffffffZ") - 1;
  if (!absl::ConsumePrefix(&line, R"({"ts":")") || line.find('"') != kTimestampLength) {
    return std::nullopt;
  }
  line.remove_prefix(kTimestampLength);
  if (!absl::ConsumePrefix(&line, R"(","level":"info","msg":"long","writer":)")) {
    return std::nullopt;
  }
  LongLine parsed{-1, -1};
  const size_t writer_end = line.find(',');
  if (writer_end == absl::string_view::npos ||
      !absl::SimpleAtoi(line.substr(0, writer_end), &parsed.writer) || parsed.writer < 0 ||
      parsed.writer >= kWriters) {
    return std::nullopt;
  }
  line.remove_prefix(writer_end);
  if (!absl::ConsumePrefix(&line, R"(,"i":)")) return std::nullopt;
  const size_t number_end = line.find(',');
  if (number_end == absl::string_view::npos ||
      !absl::SimpleAtoi(line.substr(0, number_end), &parsed.number)) {
    return std::nullopt;
  }
  line.remove_prefix(number_end);
  if (!absl::ConsumePrefix(&line, R"(,"fill":")") || !absl::ConsumeSuffix(&line, R"("})") ||
      line != std::string(fill_bytes, FillByte(parsed.writer))) {
    return std::nullopt;
  }
  return parsed;
}

// Lines far longer than PIPE_BUF, whose write(2) the kernel may split, through a pipe of a
// single page that a reader drains meanwhile: every write fills the pipe and waits for the
// reader midway, which is when another writer's write would get in, but for the logger's lock.
// (Lines under PIPE_BUF are written whole by the kernel itself, lock or no lock.) Odd writers
// log through LogBatch, whose writes carry several lines at once: past 64 KiB, and at its end.
TEST(LoggerTest, ConcurrentLinesNeverInterleave) {
  PipeCapture capture;
  const int capacity = capture.Resize(4096);
  ASSERT_GT(capacity, 0) << "F_SETPIPE_SZ failed";
  const size_t fill_bytes = std::max<size_t>(16 * 1024, 2 * static_cast<size_t>(capacity));
  std::string out;
  std::thread reader([&capture, &out] { out = capture.ReadUntilClosed(); });
  {
    Logger logger(LogLevel::kInfo, capture.write_fd());
    std::vector<std::thread> writers;
    for (int writer = 0; writer < kWriters; ++writer) {
      writers.emplace_back([&logger, writer, fill_bytes] {
        const std::string fill(fill_bytes, FillByte(writer));
        for (int first = 0; first < kLinesPerWriter; first += kLinesPerBatch) {
          std::optional<LogBatch> batch;
          if (writer % 2 == 1) batch.emplace();
          for (int i = first; i < first + kLinesPerBatch; ++i) {
            logger.Info("long", {{"writer", writer}, {"i", i}, {"fill", fill}});
          }
        }
      });
    }
    for (auto& writer : writers) writer.join();
  }
  capture.CloseWriteEnd();
  reader.join();

  const std::vector<absl::string_view> lines = absl::StrSplit(out, '\n', absl::SkipEmpty());
  EXPECT_EQ(lines.size(), static_cast<size_t>(kWriters * kLinesPerWriter));
  int next[kWriters] = {};  // Each writer's lines come in the order it logged them.
  int broken = 0;
  for (const absl::string_view line : lines) {
    const std::optional<LongLine> parsed = ParseLongLine(line, fill_bytes);
    if (!parsed.has_value()) {
      // The first only: the lines are long, and a missing lock breaks most of them.
      if (broken++ == 0) {
        ADD_FAILURE() << "a line that is not one writer's whole line (" << line.size()
                      << " bytes): " << line.substr(0, 120) << " ... "
                      << line.substr(line.size() > 120 ? line.size() - 120 : 0);
      }
      continue;
    }
    EXPECT_EQ(parsed->number, next[parsed->writer]) << "writer " << parsed->writer;
    next[parsed->writer] = parsed->number + 1;
  }
  EXPECT_EQ(broken, 0) << "lines broken by another writer's bytes";
  for (int writer = 0; writer < kWriters; ++writer) {
    EXPECT_EQ(next[writer], kLinesPerWriter) << "writer " << writer;
  }
}

std::vector<std::string> Lines(const std::string& text) {
  return absl::StrSplit(text, '\n', absl::SkipEmpty());
}

// A line of FillWithJsonLines's.
constexpr absl::string_view kFillerLine = R"({"f":1})";

// Makes `fd` non-blocking, as a stdout can be when a parent process set O_NONBLOCK on the pipe
// it shares with the server.
void SetNonBlocking(int fd) {
  const int flags = fcntl(fd, F_GETFL);
  ASSERT_GE(flags, 0);
  ASSERT_EQ(fcntl(fd, F_SETFL, flags | O_NONBLOCK), 0);
}

// Fills the pipe behind the non-blocking `write_fd` with kFillerLine lines until it takes no
// more, a page (4096 bytes, 512 lines) a write: a reader that reads one page then frees room
// for exactly one.
void FillWithJsonLines(int write_fd) {
  std::string page;
  while (page.size() < 4096) absl::StrAppend(&page, kFillerLine, "\n");
  while (write(write_fd, page.data(), page.size()) == static_cast<ssize_t>(page.size())) {
  }
}

// Every line of `text` is one whole JSON object: a filler line, or one of the logger's whose
// strings hold no braces, so that a fragment glued to the next line shows as a second '{'.
void ExpectWholeLines(const std::string& text) {
  ASSERT_FALSE(text.empty());
  EXPECT_EQ(text.back(), '\n');
  for (const std::string& line : Lines(text)) {
    if (line == kFillerLine) continue;
    EXPECT_THAT(line, ::testing::StartsWith(R"({"ts":")")) << line.substr(0, 200);
    EXPECT_EQ(line.back(), '}') << line.substr(0, 200);
    EXPECT_EQ(std::count(line.begin(), line.end(), '{'), 1) << line.substr(0, 200);
  }
}

// The logger's own lines of `text`, without the filler.
std::vector<std::string> LoggedLines(const std::string& text) {
  std::vector<std::string> logged;
  for (std::string& line : Lines(text)) {
    if (line != kFillerLine) logged.push_back(std::move(line));
  }
  return logged;
}

// A non-blocking stdout whose reader is behind answers EAGAIN: the lines wait for room instead
// of being dropped.
TEST(LoggerTest, WaitsForRoomWhenANonBlockingReaderIsBehind) {
  PipeCapture capture;
  SetNonBlocking(capture.write_fd());
  FillWithJsonLines(capture.write_fd());
  // Far longer than the reader below takes to catch up.
  Logger logger(LogLevel::kInfo, capture.write_fd(), absl::Seconds(60));
  std::atomic<bool> started{false};
  std::atomic<bool> logged{false};
  std::thread writer([&logger, &started, &logged] {
    started = true;
    for (int i = 0; i < 100; ++i) logger.Info("line", {{"i", i}});
    logged = true;
  });
  // The writer finds the pipe full meanwhile; a logger that did not wait would drop every line.
  // (Counted from when the writer runs: a writer scheduled late would find the reader draining.)
  while (!started) absl::SleepFor(absl::Milliseconds(1));
  absl::SleepFor(absl::Milliseconds(100));
  std::string out;
  while (!logged) {
    out += capture.ReadAvailable();
    absl::SleepFor(absl::Milliseconds(1));
  }
  writer.join();
  out += capture.CloseAndRead();
  ExpectWholeLines(out);
  const std::vector<std::string> lines = LoggedLines(out);
  ASSERT_EQ(lines.size(), 100u);
  for (int i = 0; i < 100; ++i) {
    EXPECT_THAT(lines[i], HasSubstr(absl::StrCat(R"("msg":"line","i":)", i, "}")));
  }
}

// A line that the reader took only part of before its wait ran out is finished before the next
// one, never left as a fragment that the next line is glued to.
TEST(LoggerTest, FinishesALineCutShortBeforeTheNextOne) {
  PipeCapture capture;
  SetNonBlocking(capture.write_fd());
  FillWithJsonLines(capture.write_fd());
  std::string out = capture.ReadUpTo(4096);  // Room for one page.
  constexpr absl::Duration kLongestWait = absl::Milliseconds(500);
  Logger logger(LogLevel::kInfo, capture.write_fd(), kLongestWait);
  // Three pages and more: the first goes in, then the pipe is full and the wait runs out.
  logger.Info("long", {{"padding", std::string(3 * 4096, 'p')}});
  // The reader is still behind, and half a line waits: this one is dropped, without a wait (a
  // stalled reader costs one wait, not one per line).
  const absl::Time stalled_line = absl::Now();
  logger.Info("while stalled");
  EXPECT_LT(absl::Now() - stalled_line, kLongestWait / 2) << "waited again for a stalled reader";
  out += capture.ReadAvailable();
  logger.Info("after");
  out += capture.CloseAndRead();
  ExpectWholeLines(out);
  const std::vector<std::string> lines = LoggedLines(out);
  ASSERT_EQ(lines.size(), 2u) << out.size();
  EXPECT_THAT(lines[0],
              HasSubstr(R"("msg":"long","padding":")" + std::string(3 * 4096, 'p') + R"("})"));
  EXPECT_THAT(lines[1], HasSubstr(R"("msg":"after"})"));
}

// README: a log reader that goes away does not stop the server, and its lines are dropped; with
// nobody to read, waiting for room would only hold every logging thread up.
TEST(LoggerTest, AClosedReaderDropsLinesWithoutWaiting) {
  signal(SIGPIPE, SIG_IGN);  // As the server does.
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  SetNonBlocking(fds[1]);
  close(fds[0]);
  Logger logger(LogLevel::kInfo, fds[1], absl::Seconds(60));
  const absl::Time start = absl::Now();
  logger.Info("nobody reads this");
  logger.Info("nor this");
  EXPECT_LT(absl::Now() - start, absl::Seconds(30));
  close(fds[1]);
}

TEST(LogBatchTest, HoldsItsThreadsLinesUntilItEnds) {
  PipeCapture capture;
  Logger logger(LogLevel::kInfo, capture.write_fd());
  {
    LogBatch batch;
    logger.Info("first", {{"n", 1}});
    logger.Info("second", {{"n", 2}});
    logger.Debug("below the level");
    EXPECT_EQ(capture.ReadAvailable(), "");
  }
  const std::vector<std::string> lines = Lines(capture.ReadAvailable());
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_THAT(lines[0], HasSubstr(R"("msg":"first","n":1})"));
  EXPECT_THAT(lines[1], HasSubstr(R"("msg":"second","n":2})"));
  // Without a batch, a line is written at once again.
  logger.Info("third");
  EXPECT_THAT(capture.ReadAvailable(), HasSubstr(R"("msg":"third")"));
}

TEST(LogBatchTest, NestedBatchesWriteWhenTheOutermostEnds) {
  PipeCapture capture;
  Logger logger(LogLevel::kInfo, capture.write_fd());
  {
    LogBatch outer;
    logger.Info("outer");
    {
      LogBatch inner;
      logger.Info("inner");
    }
    EXPECT_EQ(capture.ReadAvailable(), "");
  }
  const std::vector<std::string> lines = Lines(capture.ReadAvailable());
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_THAT(lines[0], HasSubstr(R"("msg":"outer")"));
  EXPECT_THAT(lines[1], HasSubstr(R"("msg":"inner")"));
}

TEST(LogBatchTest, OtherThreadsWriteAtOnce) {
  PipeCapture capture;
  Logger logger(LogLevel::kInfo, capture.write_fd());
  LogBatch batch;
  std::thread([&logger] { logger.Info("from another thread"); }).join();
  EXPECT_THAT(capture.ReadAvailable(), HasSubstr(R"("msg":"from another thread")"));
  logger.Info("held");
  EXPECT_EQ(capture.ReadAvailable(), "");
}

TEST(LogBatchTest, ALineForAnotherLoggerWritesOutTheFirstLoggersLines) {
  PipeCapture first_capture;
  PipeCapture second_capture;
  Logger first(LogLevel::kInfo, first_capture.write_fd());
  Logger second(LogLevel::kInfo, second_capture.write_fd());
  {
    LogBatch batch;
    first.Info("to the first");
    second.Info("to the second");
    EXPECT_THAT(first_capture.ReadAvailable(), HasSubstr(R"("msg":"to the first")"));
    EXPECT_EQ(second_capture.ReadAvailable(), "");
  }
  EXPECT_THAT(second_capture.ReadAvailable(), HasSubstr(R"("msg":"to the second")"));
  EXPECT_EQ(first_capture.ReadAvailable(), "");
}

TEST(LogBatchTest, WritesOutEarlyPast64KiB) {
  PipeCapture capture;
  capture.Enlarge(1 << 20);
  Logger logger(LogLevel::kInfo, capture.write_fd());
  const std::string filler(1000, 'x');
  std::string early;
  {
    LogBatch batch;
    for (int i = 0; i < 100; ++i) logger.Info("big", {{"i", i}, {"filler", filler}});
    early = capture.ReadAvailable();
    EXPECT_GE(early.size(), 64u * 1024);
    EXPECT_LT(early.size(), 100u * filler.size());
  }
  const std::vector<std::string> lines = Lines(early + capture.ReadAvailable());
  ASSERT_EQ(lines.size(), 100u);
  for (int i = 0; i < 100; ++i) {
    EXPECT_THAT(lines[i], HasSubstr(absl::StrCat(R"("msg":"big","i":)", i, ",")));
  }
}

TEST(LogLevelTest, ParsesKnownNames) {
  EXPECT_EQ(*ParseLogLevel("Info"), LogLevel::kInfo);
  EXPECT_EQ(*ParseLogLevel("warning"), LogLevel::kWarn);
  EXPECT_FALSE(ParseLogLevel("trace").ok());
}

}  // namespace
}  // namespace sessionledger
