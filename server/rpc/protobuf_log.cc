#include "server/rpc/protobuf_log.h"

#include <atomic>

#include "absl/strings/match.h"
#include "absl/strings/string_view.h"

namespace sessionledger {
namespace {

// Where protobuf's lines go. Set and reset only by ProtobufLogToLogger; atomic as it is read on
// every thread that logs.
std::atomic<Logger*> protobuf_logger{nullptr};

// This thread's memo: one small string, overwritten by each complaint, so it never grows with
// the number of complaints. (The string keeps its capacity between calls.)
struct Utf8Complaint {
  bool recorded = false;
  std::string field;
};
thread_local Utf8Complaint utf8_complaint;

// The field of a line protobuf 3.21 logs (wire_format_lite.cc, PrintUTF8ErrorLog) when a
// string is not UTF-8 while parsing: "String field '<full field name>' contains invalid UTF-8
// data when parsing a protocol buffer. ...". Nothing for any other line, including the same
// complaint while serializing (that is the server's own message, not a request).
std::optional<absl::string_view> Utf8ParseComplaintField(absl::string_view message) {
  constexpr absl::string_view kPrefix = "String field '";
  constexpr absl::string_view kSuffix = "' contains invalid UTF-8 data when parsing ";
  if (!absl::StartsWith(message, kPrefix)) return std::nullopt;
  const size_t end = message.find(kSuffix, kPrefix.size());
  if (end == absl::string_view::npos) return std::nullopt;
  const absl::string_view field = message.substr(kPrefix.size(), end - kPrefix.size());
  if (field.empty() || field.find('\'') != absl::string_view::npos) return std::nullopt;
  return field;
}

LogLevel FromProtobuf(google::protobuf::LogLevel level) {
  switch (level) {
    case google::protobuf::LOGLEVEL_INFO:
      return LogLevel::kInfo;
    case google::protobuf::LOGLEVEL_WARNING:
      return LogLevel::kWarn;
    case google::protobuf::LOGLEVEL_ERROR:
    case google::protobuf::LOGLEVEL_FATAL:
      return LogLevel::kError;
  }
  return LogLevel::kError;
}

void HandleProtobufLog(google::protobuf::LogLevel level, const char* filename, int line,
                       const std::string& message) {
  LogLevel ours = FromProtobuf(level);
  if (const std::optional<absl::string_view> field = Utf8ParseComplaintField(message)) {
    utf8_complaint.recorded = true;
    utf8_complaint.field.assign(field->data(), field->size());
    ours = LogLevel::kDebug;  // A client's bad input; see the header.
  }
  Logger* logger = protobuf_logger.load(std::memory_order_acquire);
  if (logger == nullptr) return;
  logger->Log(
      ours, message,
      {{"source", "protobuf"}, {"file", filename != nullptr ? filename : ""}, {"line", line}});
}

}  // namespace

ProtobufLogToLogger::ProtobufLogToLogger(Logger& logger)
    : previous_logger_(protobuf_logger.exchange(&logger, std::memory_order_acq_rel)),
      previous_handler_(google::protobuf::SetLogHandler(&HandleProtobufLog)) {}

ProtobufLogToLogger::~ProtobufLogToLogger() {
  google::protobuf::SetLogHandler(previous_handler_);
  protobuf_logger.store(previous_logger_, std::memory_order_release);
}

std::optional<std::string> TakeUtf8ParseComplaint() {
  if (!utf8_complaint.recorded) return std::nullopt;
  utf8_complaint.recorded = false;
  return utf8_complaint.field;
}

}  // namespace sessionledger
