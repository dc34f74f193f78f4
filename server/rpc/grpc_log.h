#ifndef SESSIONLEDGER_SERVER_RPC_GRPC_LOG_H_
#define SESSIONLEDGER_SERVER_RPC_GRPC_LOG_H_

#include "server/common/logger.h"

namespace sessionledger {

// While alive, gRPC core's own log lines (gpr_log: a failed TLS handshake, a port it cannot
// bind, ...) go to `logger` as JSON lines ("source":"grpc", with gRPC's file and line) instead of
// gRPC's text format on stderr, so that every line the server writes is one JSON object on
// stdout, as operators' log pipelines expect. gRPC's own threshold still applies first
// (GRPC_VERBOSITY, ERROR by default); gRPC's ERROR is our error, INFO info, DEBUG debug.
//
// gRPC has one log function per process and no way to read the current one back: create one,
// early, where the logger is created, before anything starts gRPC threads, and end it after they
// are gone (the destructor puts gRPC's default function back). `logger` must outlive it. Not
// copyable.
class GrpcLogToLogger {
 public:
  explicit GrpcLogToLogger(Logger& logger);
  ~GrpcLogToLogger();
  GrpcLogToLogger(const GrpcLogToLogger&) = delete;
  GrpcLogToLogger& operator=(const GrpcLogToLogger&) = delete;

 private:
  Logger* const previous_logger_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_GRPC_LOG_H_
