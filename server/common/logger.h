#ifndef SESSIONLEDGER_SERVER_COMMON_LOGGER_H_
#define SESSIONLEDGER_SERVER_COMMON_LOGGER_H_

#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <string>
#include <variant>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

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

// Writes structured logs as one JSON object per line:
//   {"ts":"2026-11-29T15:09:24.123456Z","level":"info","msg":"...", <fields>}
// to a file descriptor (stdout in production; the Twelve-Factor app never writes log files).
// Thread-safe: each line is emitted with a single write(2) under a mutex, so lines from
// concurrent RPCs never interleave.
class Logger {
 public:
  explicit Logger(LogLevel min_level, int fd = 1) : min_level_(min_level), fd_(fd) {}
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
  const LogLevel min_level_;
  const int fd_;
  std::mutex write_mutex_;
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
