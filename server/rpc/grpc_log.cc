#include "server/rpc/grpc_log.h"

#include <grpc/support/log.h>

#include <atomic>
#include <cstdio>

namespace sessionledger {
namespace {

// Where gRPC's lines go. Set and reset only by GrpcLogToLogger; atomic as gRPC logs from any of
// its threads.
std::atomic<Logger*> grpc_logger{nullptr};

LogLevel FromGrpc(gpr_log_severity severity) {
  switch (severity) {
    case GPR_LOG_SEVERITY_DEBUG:
      return LogLevel::kDebug;
    case GPR_LOG_SEVERITY_INFO:
      return LogLevel::kInfo;
    case GPR_LOG_SEVERITY_ERROR:
      return LogLevel::kError;
  }
  return LogLevel::kError;
}

void HandleGrpcLog(gpr_log_func_args* args) {
  Logger* logger = grpc_logger.load(std::memory_order_acquire);
  if (logger == nullptr) {
    // A line that raced the destructor (gRPC read this function before it was replaced): kept
    // on stderr, as gRPC would have, rather than lost.
    std::fprintf(stderr, "%s\n", args->message != nullptr ? args->message : "");
    return;
  }
  logger->Log(FromGrpc(args->severity), args->message != nullptr ? args->message : "",
              {{"source", "grpc"},
               {"file", args->file != nullptr ? args->file : ""},
               {"line", args->line}});
}

}  // namespace

GrpcLogToLogger::GrpcLogToLogger(Logger& logger)
    : previous_logger_(grpc_logger.exchange(&logger, std::memory_order_acq_rel)) {
  gpr_set_log_function(&HandleGrpcLog);
}

GrpcLogToLogger::~GrpcLogToLogger() {
  // gRPC 1.51 takes null for its own default function, which it does not export.
  if (previous_logger_ == nullptr) gpr_set_log_function(nullptr);
  grpc_logger.store(previous_logger_, std::memory_order_release);
}

}  // namespace sessionledger
