#include "server/common/logger.h"

#include <unistd.h>

#include <cerrno>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/common/fd_wait.h"
#include "server/common/utf8.h"

namespace sessionledger {
namespace {

// Which bytes are copied into a JSON string as they are: printable ASCII other than '"' and
// '\\'. A table, as it is asked for every byte of every log line.
struct PlainJsonBytes {
  bool plain[256] = {};
  constexpr PlainJsonBytes() {
    for (int c = 0x20; c < 0x7F; ++c) plain[c] = c != '"' && c != '\\';
  }
};
constexpr PlainJsonBytes kPlainJson;

}  // namespace

absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view text) {
  const std::string lower = absl::AsciiStrToLower(text);
  if (lower == "debug") return LogLevel::kDebug;
  if (lower == "info") return LogLevel::kInfo;
  if (lower == "warn" || lower == "warning") return LogLevel::kWarn;
  if (lower == "error") return LogLevel::kError;
  return absl::InvalidArgumentError(
      absl::StrCat("'", text, "' is not one of debug, info, warn, error"));
}

absl::string_view LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarn:
      return "warn";
    case LogLevel::kError:
      return "error";
  }
  return "unknown";
}

void AppendJsonString(std::string& out, absl::string_view text) {
  out.push_back('"');
  for (size_t i = 0; i < text.size();) {
    // Most text (every access-log field) needs no escaping: append each such run at once
    // rather than character by character, which cost more than the rest of the line.
    size_t plain = i;
    while (plain < text.size() && kPlainJson.plain[static_cast<unsigned char>(text[plain])])
      ++plain;
    if (plain > i) {
      out.append(text.data() + i, plain - i);
      i = plain;
      continue;
    }
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c < 0x80) {
      switch (c) {
        case '"':
          out += "\\\"";
          break;
        case '\\':
          out += "\\\\";
          break;
        case '\n':
          out += "\\n";
          break;
        case '\r':
          out += "\\r";
          break;
        case '\t':
          out += "\\t";
          break;
        default:
          if (c < 0x20 || c == 0x7F) {
            absl::StrAppendFormat(&out, "\\u%04x", c);
          } else {
            out.push_back(static_cast<char>(c));
          }
      }
      ++i;
      continue;
    }
    const size_t length = Utf8SequenceLength(text, i);
    if (length == 0) {
      out += "\\ufffd";
      ++i;
    } else {
      out.append(text.data() + i, length);
      i += length;
    }
  }
  out.push_back('"');
}

void AppendUtcTimestamp(std::string& out, absl::Time t) {
  constexpr int64_t kMicrosPerSecond = 1000000;
  constexpr int64_t kSecondsPerDay = 86400;
  const int64_t micros_since_epoch = absl::ToUnixMicros(t);
  // Floor divisions, so that instants before 1970 split into a day and a time of day >= 0.
  const auto floor_div = [](int64_t a, int64_t b) { return a / b - (a % b < 0 ? 1 : 0); };
  const int64_t seconds = floor_div(micros_since_epoch, kMicrosPerSecond);
  const int64_t micros = micros_since_epoch - seconds * kMicrosPerSecond;
  const int64_t days = floor_div(seconds, kSecondsPerDay);
  const int64_t second_of_day = seconds - days * kSecondsPerDay;

  // Days since 1970-01-01 to a proleptic Gregorian date, counted in 400-year eras that start
  // on March 1st (so that the leap day ends a year): Howard Hinnant's civil_from_days.
  const int64_t shifted = days + 719468;  // Days from 0000-03-01 to 1970-01-01.
  const int64_t era = floor_div(shifted, 146097);
  const int64_t day_of_era = shifted - era * 146097;  // [0, 146096]
  const int64_t year_of_era =
      (day_of_era - day_of_era / 1460 + day_of_era / 36524 - day_of_era / 146096) / 365;
  const int64_t day_of_year =
      day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
  const int64_t month_from_march = (5 * day_of_year + 2) / 153;  // [0, 11]
  const int64_t day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
  const int64_t month = month_from_march < 10 ? month_from_march + 3 : month_from_march - 9;
  const int64_t year = year_of_era + era * 400 + (month <= 2 ? 1 : 0);
  if (year < 1000 || year > 9999) {  // absl writes these years unpadded or signed.
    out += absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", t, absl::UTCTimeZone());
    return;
  }

  char text[] = "YYYY-MM-DDTHH:MM:SS.ffffffZ";
  const auto put = [&text](size_t end, int64_t value, int width) {
    for (int k = 1; k <= width; ++k, value /= 10)
      text[end - k] = static_cast<char>('0' + value % 10);
  };
  put(4, year, 4);
  put(7, month, 2);
  put(10, day, 2);
  put(13, second_of_day / 3600, 2);
  put(16, second_of_day / 60 % 60, 2);
  put(19, second_of_day % 60, 2);
  put(26, micros, 6);
  out.append(text, sizeof(text) - 1);
}

void Logger::Log(LogLevel level, absl::string_view message,
                 std::initializer_list<LogField> fields) {
  if (!Enabled(level)) return;
  LogBatch* batch = LogBatch::Current();
  std::string single_line;
  // Inside a batch the line is formatted straight into the batch's buffer.
  std::string& line = batch != nullptr ? batch->BufferFor(*this) : single_line;
  // An access-log line is ~250 bytes; growing the buffer midway would copy it.
  line.reserve(line.size() + 320 + message.size());
  line += "{\"ts\":\"";
  AppendUtcTimestamp(line, absl::Now());
  line += "\",\"level\":\"";
  absl::StrAppend(&line, LogLevelName(level));
  line += "\",\"msg\":";
  AppendJsonString(line, message);
  for (const LogField& field : fields) {
    line.push_back(',');
    AppendJsonString(line, field.key);
    line.push_back(':');
    if (const auto* s = std::get_if<absl::string_view>(&field.value)) {
      AppendJsonString(line, *s);
    } else if (const auto* i = std::get_if<int64_t>(&field.value)) {
      absl::StrAppend(&line, *i);
    } else if (const auto* d = std::get_if<double>(&field.value)) {
      absl::StrAppendFormat(&line, "%.6g", *d);
    } else {
      line += std::get<bool>(field.value) ? "true" : "false";
    }
  }
  line += "}\n";
  if (batch != nullptr) {
    batch->AfterLine();
  } else {
    WriteLines(line);
  }
}

void Logger::WriteLines(absl::string_view lines) {
  std::lock_guard<std::mutex> lock(write_mutex_);
  // One bound for the whole call, the rest of an earlier line included.
  std::optional<SteadyTime> give_up;
  if (!unfinished_line_rest_.empty()) {
    unfinished_line_rest_.erase(0, WriteLocked(unfinished_line_rest_, give_up));
    // Nothing may follow half a line: these lines are dropped.
    if (!unfinished_line_rest_.empty()) return;
  }
  const size_t written = WriteLocked(lines, give_up);
  // Cut short inside a line: its rest goes out first next time, so that the reader never sees a
  // fragment glued to the next line (which would not be JSON). The lines after it are dropped,
  // so at most one line is ever kept. Every line ends in '\n', Log and LogBatch see to that.
  if (written == 0 || written == lines.size() || lines[written - 1] == '\n') return;
  const size_t line_end = lines.find('\n', written);
  const absl::string_view rest = lines.substr(
      written, line_end == absl::string_view::npos ? line_end : line_end + 1 - written);
  unfinished_line_rest_.assign(rest.data(), rest.size());
}

size_t Logger::WriteLocked(absl::string_view bytes, std::optional<SteadyTime>& give_up) {
  size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t n = ::write(fd_, bytes.data() + written, bytes.size() - written);
    if (n > 0) {
      written += static_cast<size_t>(n);
      stalled_ = false;
      continue;
    }
    const int error = n < 0 ? errno : 0;
    if (error == EINTR) continue;
    // A non-blocking descriptor whose reader is behind. Anything else (a closed reader, EPIPE,
    // or write returning 0) will not get better by waiting: the lines are dropped at once, and
    // nowhere is left to report it.
    const bool no_room = error == EAGAIN || error == EWOULDBLOCK;
    if (no_room && !stalled_ && WaitForRoomLocked(give_up)) continue;
    if (no_room) stalled_ = true;
    break;
  }
  return written;
}

bool Logger::WaitForRoomLocked(std::optional<SteadyTime>& give_up) {
  if (!give_up.has_value()) give_up = SteadyNow() + ToSteadyDuration(longest_write_wait_);
  // Ready includes an error or hang-up, which the next write turns into its error.
  return WaitForFd(fd_, POLLOUT, *give_up) == FdWait::kReady;
}

namespace {
// The outermost LogBatch open on this thread. Only LogBatch's constructor and destructor, on
// their own thread, change it, so no other thread ever sees it.
thread_local LogBatch* current_log_batch = nullptr;

// A batch writes out early past this size, so that a long turn cannot hold many lines back.
constexpr size_t kLogBatchFlushBytes = 64 * 1024;
}  // namespace

LogBatch::LogBatch() : enclosing_(current_log_batch) {
  if (enclosing_ == nullptr) current_log_batch = this;
}

LogBatch::~LogBatch() {
  if (enclosing_ != nullptr) return;
  Flush();
  current_log_batch = nullptr;
}

LogBatch* LogBatch::Current() { return current_log_batch; }

std::string& LogBatch::BufferFor(Logger& logger) {
  if (logger_ != &logger) {
    Flush();
    logger_ = &logger;
  }
  return lines_;
}

void LogBatch::AfterLine() {
  if (lines_.size() >= kLogBatchFlushBytes) Flush();
}

void LogBatch::Flush() {
  if (logger_ != nullptr && !lines_.empty()) logger_->WriteLines(lines_);
  lines_.clear();
}

}  // namespace sessionledger
