#ifndef SESSIONLEDGER_SERVER_RPC_PROTOBUF_LOG_H_
#define SESSIONLEDGER_SERVER_RPC_PROTOBUF_LOG_H_

#include <google/protobuf/stubs/logging.h>

#include <optional>
#include <string>

#include "server/common/logger.h"

namespace sessionledger {

// While alive, protobuf's log lines go to `logger` as JSON lines ("source":"protobuf") instead
// of raw text on stderr, and each thread remembers the field named by the latest complaint
// protobuf made on it about a string that is not valid UTF-8 while parsing
// (TakeUtf8ParseComplaint).
//
// Why the log handler: for the synchronous methods gRPC parses the request itself. When the
// parse fails, the interceptors get a null message and nothing else: protobuf's parse returns
// only a bool, and gRPC clears the request's bytes right after it (GenericDeserialize in
// grpcpp's proto_utils.h). The only place where the field is named is the ERROR line protobuf
// logs on the parsing thread, through its log handler, e.g.
//   String field 'sessionledger.v1.TransferRequest.idempotency_key' contains invalid UTF-8 data
//   when parsing a protocol buffer. Use the 'bytes' type if you intend to send raw bytes.
// gRPC 1.51's synchronous server runs the POST_RECV_MESSAGE interceptor hook on the same thread
// right after that parse (Server::SyncRequest::CallData::Run), where RequestParseErrors takes
// the memo (tests/service/request_parse_errors_test.cc shows it).
//
// Those complaints are logged at debug level: they are caused by a client, the access log line
// of the call already carries INVALID_ARGUMENT and the field, and at ERROR a client could fill
// the error log at will. Every other protobuf line keeps its level (FATAL as error; protobuf
// aborts after it, as it would have).
//
// Create one, early, where the logger is created (protobuf has one handler per process; the
// constructor and destructor are not thread-safe against protobuf logging on other threads, so
// make it before and end it after anything that uses protobuf). The destructor restores the
// previous handler. `logger` must outlive it. Not copyable.
class ProtobufLogToLogger {
 public:
  explicit ProtobufLogToLogger(Logger& logger);
  ~ProtobufLogToLogger();
  ProtobufLogToLogger(const ProtobufLogToLogger&) = delete;
  ProtobufLogToLogger& operator=(const ProtobufLogToLogger&) = delete;

 private:
  Logger* const previous_logger_;
  google::protobuf::LogHandler* const previous_handler_;
};

// The full name of the field ("sessionledger.v1.TransferRequest.idempotency_key") of the latest
// invalid-UTF-8 complaint protobuf made on this thread while parsing, since the last call; the
// memo is cleared. Nothing when there was none, or no ProtobufLogToLogger was alive. Memos are
// per thread: a parse on another thread never shows here.
std::optional<std::string> TakeUtf8ParseComplaint();

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_PROTOBUF_LOG_H_
