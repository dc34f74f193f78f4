#include "server/rpc/grpc_log.h"

#include <grpc/support/log.h>

#include <atomic>
#include <cstdio>
#include <thread>

namespace sessionledger {
namespace {

// Where gRPC's lines go. Set and reset only by GrpcLogToLogger; atomic as gRPC logs from any of
// its threads.
std::atomic<Logger*> grpc_logger{nullptr};
// Lines being written through grpc_logger now. gRPC threads can outlive the server (a detached
// grpc_shutdown thread logs at exit): ~GrpcLogToLogger waits for these before its logger goes.
// Sequentially consistent with grpc_logger: a line either counts itself before the destructor
// looks, or reads the null the destructor stored.
std::atomic<int> lines_in_flight{0};

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
  lines_in_flight.fetch_add(1);
  Logger* logger = grpc_logger.load();
  if (logger == nullptr) {
    lines_in_flight.fetch_sub(1);
    // A line that raced the destructor (gRPC read this function before it was replaced): kept
    // on stderr, as gRPC would have, rather than lost.
    std::fprintf(stderr, "%s\n", args->message != nullptr ? args->message : "");
    return;
  }
  logger->Log(FromGrpc(args->severity), args->message != nullptr ? args->message : "",
              {{"source", "grpc"},
               {"file", args->file != nullptr ? args->file : ""},
               {"line", args->line}});
  lines_in_flight.fetch_sub(1);
}

}  // namespace

GrpcLogToLogger::GrpcLogToLogger(Logger& logger) : previous_logger_(grpc_logger.exchange(&logger)) {
  gpr_set_log_function(&HandleGrpcLog);
}

GrpcLogToLogger::~GrpcLogToLogger() {
  // gRPC 1.51 takes null for its own default function, which it does not export.
  if (previous_logger_ == nullptr) gpr_set_log_function(nullptr);
  grpc_logger.store(previous_logger_);
  // A line that read this logger before the store may still be writing through it.
  while (lines_in_flight.load() != 0) std::this_thread::yield();
}

}  // namespace sessionledger
