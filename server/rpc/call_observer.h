#ifndef SESSIONLEDGER_SERVER_RPC_CALL_OBSERVER_H_
#define SESSIONLEDGER_SERVER_RPC_CALL_OBSERVER_H_

#include <grpcpp/support/server_interceptor.h>

#include <string>

#include "server/common/logger.h"
#include "server/metrics/server_metrics.h"

namespace sessionledger {

// Metadata key that correlates one call across services and log lines.
inline constexpr char kRequestIdHeader[] = "x-request-id";

// Server interceptor, one per call, that
//  - takes the caller's x-request-id (printable ASCII, at most 128 bytes; the first, if sent
//    twice) or makes one up, and echoes it in the response's initial metadata;
//  - writes one JSON log line per finished call: method, gRPC code name, duration, peer,
//    request_id, and the error message on failure (health and reflection calls at debug level,
//    so probes do not flood the log);
//  - keeps a backing service's words, which ToGrpcStatus passes in error_details, in that log
//    line: callers get the status without them, its message naming the request id instead;
//  - counts the call in ServerMetrics (optional: null means no metrics).
// The factory is thread-safe and keeps no state between calls.
class CallObserverFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  CallObserverFactory(Logger& logger, ServerMetrics* metrics)
      : logger_(logger), metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;

 private:
  Logger& logger_;
  ServerMetrics* metrics_;
};

// "OK", "INVALID_ARGUMENT", ...: the canonical name, as logs and metrics show it.
std::string StatusCodeName(grpc::StatusCode code);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_CALL_OBSERVER_H_
