#include "server/rpc/call_logging.h"

#include <grpcpp/server_context.h>

#include <chrono>
#include <string>

#include "absl/strings/match.h"

namespace sessionledger {
namespace {

using grpc::experimental::InterceptionHookPoints;

class CallLoggingInterceptor final : public grpc::experimental::Interceptor {
 public:
  CallLoggingInterceptor(Logger& logger, grpc::experimental::ServerRpcInfo* info)
      : logger_(logger), info_(info), start_(std::chrono::steady_clock::now()) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      LogFinished(methods->GetSendStatus());
    }
    methods->Proceed();
  }

 private:
  void LogFinished(const grpc::Status& status) {
    const absl::string_view method = info_->method() != nullptr ? info_->method() : "";
    const bool is_probe = absl::StartsWith(method, "/grpc.health.v1.Health/") ||
                          absl::StartsWith(method, "/grpc.reflection.");
    const LogLevel level = is_probe ? LogLevel::kDebug
                           : status.error_code() == grpc::StatusCode::INTERNAL ||
                                   status.error_code() == grpc::StatusCode::UNKNOWN
                               ? LogLevel::kError
                               : LogLevel::kInfo;
    if (!logger_.Enabled(level)) return;
    const double duration_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_)
            .count();
    const std::string peer = info_->server_context()->peer();
    if (status.ok()) {
      logger_.Log(level, "rpc finished",
                  {{"method", method},
                   {"code", StatusCodeName(status.error_code())},
                   {"duration_ms", duration_ms},
                   {"peer", peer}});
    } else {
      logger_.Log(level, "rpc finished",
                  {{"method", method},
                   {"code", StatusCodeName(status.error_code())},
                   {"duration_ms", duration_ms},
                   {"peer", peer},
                   {"error", status.error_message()}});
    }
  }

  Logger& logger_;
  grpc::experimental::ServerRpcInfo* info_;
  const std::chrono::steady_clock::time_point start_;
};

}  // namespace

grpc::experimental::Interceptor* CallLoggingFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  return new CallLoggingInterceptor(logger_, info);
}

const char* StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    default:
      return "UNKNOWN";
  }
}

}  // namespace sessionledger
