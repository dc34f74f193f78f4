#ifndef SESSIONLEDGER_SERVER_RPC_CALL_LOGGING_H_
#define SESSIONLEDGER_SERVER_RPC_CALL_LOGGING_H_

#include <grpcpp/support/server_interceptor.h>

#include "server/common/logger.h"

namespace sessionledger {

// Server interceptor that writes one JSON log line per finished RPC: method, gRPC status code
// name, duration in milliseconds and peer; failures also carry the status message. Health
// checks log at debug level only, so probes do not flood the log.
// The factory is thread-safe and keeps no per-call state beyond each interceptor's lifetime.
class CallLoggingFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit CallLoggingFactory(Logger& logger) : logger_(logger) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;

 private:
  Logger& logger_;
};

// "OK", "INVALID_ARGUMENT", ...: the canonical name, as logs and metrics show it.
const char* StatusCodeName(grpc::StatusCode code);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_CALL_LOGGING_H_
