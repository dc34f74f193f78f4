#ifndef SESSIONLEDGER_SERVER_COMMON_LOGGER_H_
#define SESSIONLEDGER_SERVER_COMMON_LOGGER_H_

#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <optional>
#include <string>
#include <variant>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/common/clock.h"

namespace sessionledger {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// Parses "debug", "info", "warn"/"warning", "error" (case-insensitive).
absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view text);
absl::string_view LogLevelName(LogLevel level);

// One key/value of a log line. Strings are JSON-escaped on output.
struct LogField {
  LogField(absl::string_view k, absl::string_view v) : key(k), value(v) {}
  LogField(absl::string_view k, const std::string& v) : key(k), value(absl::string_view(v)) {}
  LogField(absl::string_view k, const char* v) : key(k), value(absl::string_view(v)) {}
  LogField(absl::string_view k, int64_t v) : key(k), value(v) {}
  LogField(absl::string_view k, int v) : key(k), value(static_cast<int64_t>(v)) {}
  LogField(absl::string_view k, double v) : key(k), value(v) {}
  LogField(absl::string_view k, bool v) : key(k), value(v) {}

  absl::string_view key;
  std::variant<absl::string_view, int64_t, double, bool> value;
};

class LogBatch;

// Writes structured logs as one JSON object per line:
//   {"ts":"2026-11-29T15:09:24.123456Z","level":"info","msg":"...", <fields>}
// to a file descriptor (stdout in production; the Twelve-Factor app never writes log files).
// Thread-safe: each line (or a LogBatch's lines) is emitted with a single write(2) under a
// mutex, so lines from concurrent RPCs never interleave.
//
// When the descriptor cannot take a line: a closed reader (EPIPE) or another error drops the
// lines at once. On a non-blocking descriptor whose reader is behind (EAGAIN), a write waits for
// room up to `longest_write_wait`; when that runs out, lines are dropped without waiting until a
// write succeeds again, so a stalled reader costs one wait, not one per line. A line cut short
// (written in part) is finished before any later line is written, so the reader sees whole
// lines only. (On a blocking descriptor write(2) itself waits as long as its reader stalls.)
class Logger {
 public:
  explicit Logger(LogLevel min_level, int fd = 1,
                  absl::Duration longest_write_wait = absl::Seconds(1))
      : min_level_(min_level), fd_(fd), longest_write_wait_(longest_write_wait) {}
  Logger(const Logger&) = delete;
  Logger& operator=(const Logger&) = delete;

  bool Enabled(LogLevel level) const { return level >= min_level_; }
  void Log(LogLevel level, absl::string_view message, std::initializer_list<LogField> fields = {});

  void Debug(absl::string_view m, std::initializer_list<LogField> f = {}) {
    Log(LogLevel::kDebug, m, f);
  }
  void Info(absl::string_view m, std::initializer_list<LogField> f = {}) {
    Log(LogLevel::kInfo, m, f);
  }
  void Warn(absl::string_view m, std::initializer_list<LogField> f = {}) {
    Log(LogLevel::kWarn, m, f);
  }
  void Error(absl::string_view m, std::initializer_list<LogField> f = {}) {
    Log(LogLevel::kError, m, f);
  }

 private:
  friend class LogBatch;
  // Writes whole lines, retrying short writes, under write_mutex_; see the class comment for
  // what it does when the descriptor has no room.
  void WriteLines(absl::string_view lines);
  // Writes as much of `bytes` as the descriptor takes and returns how much that was. When it
  // has no room, waits until `give_up` (set at the first wait of the WriteLines call).
  size_t WriteLocked(absl::string_view bytes, std::optional<SteadyTime>& give_up);
  // Whether the descriptor may have room before `give_up`.
  bool WaitForRoomLocked(std::optional<SteadyTime>& give_up);

  const LogLevel min_level_;
  const int fd_;
  const absl::Duration longest_write_wait_;
  std::mutex write_mutex_;
  // The rest of a line that was cut short, written before any later line. Guarded by
  // write_mutex_.
  std::string unfinished_line_rest_;
  // A wait for room ran out and no write has succeeded since: a stalled reader costs one wait,
  // not one per line. Guarded by write_mutex_.
  bool stalled_ = false;
};

// While a LogBatch is alive, the lines its thread logs are kept in it and written together,
// in one write(2) per logger, when it ends (or when they pass 64 KiB). It is for a thread that
// finishes several calls in one turn of its event loop, such as the memcached pipeline's: one
// system call per turn instead of one per call, made after the turn's answers went out instead
// of before each of them. The price: a line waits for the rest of its turn (microseconds), and
// if the process dies within that turn, the turn's lines are lost.
// Batches nest (an inner one leaves its lines to the outermost). Lines of other threads are
// written as they come. A batch belongs to the thread that created it, and the loggers it
// holds lines for must outlive it.
class LogBatch {
 public:
  LogBatch();
  ~LogBatch();
  LogBatch(const LogBatch&) = delete;
  LogBatch& operator=(const LogBatch&) = delete;

 private:
  friend class Logger;
  // The outermost batch open on this thread, or null.
  static LogBatch* Current();
  // Where `logger`'s next line goes; writes out another logger's lines first.
  std::string& BufferFor(Logger& logger);
  void AfterLine();
  void Flush();

  LogBatch* const enclosing_;
  Logger* logger_ = nullptr;
  std::string lines_;
};

// Appends `text` to `out` as a JSON string literal (with quotes). Invalid UTF-8 bytes are
// replaced by U+FFFD so that every line stays valid JSON whatever a client sent.
void AppendJsonString(std::string& out, absl::string_view text);

// Appends `t` as "YYYY-MM-DDTHH:MM:SS.ffffffZ" (UTC, microseconds), the "ts" of every line.
// The same text as absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", t, UTC) for years 1000 to 9999, in
// about a tenth of its instructions; other years are left to absl::FormatTime.
void AppendUtcTimestamp(std::string& out, absl::Time t);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_COMMON_LOGGER_H_
