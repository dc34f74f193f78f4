#include "server/rpc/call_observer.h"

#include <grpcpp/server_context.h>
#include <sys/random.h>

#include <chrono>
#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"

namespace sessionledger {
namespace {

using grpc::experimental::InterceptionHookPoints;

// A caller's id is kept only if it is safe to log and echo as a header value.
bool AcceptableRequestId(grpc::string_ref id) {
  if (id.empty() || id.size() > 128) return false;
  for (char c : id) {
    if (c < 0x21 || c > 0x7E) return false;
  }
  return true;
}

std::string NewRequestId() {
  unsigned char bytes[12];
  size_t filled = 0;
  while (filled < sizeof(bytes)) {
    const ssize_t n = getrandom(bytes + filled, sizeof(bytes) - filled, 0);
    if (n <= 0) break;  // Ids need to be unique, not secret: a short read still makes a usable id.
    filled += static_cast<size_t>(n);
  }
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(bytes), sizeof(bytes)));
}

class CallObserver final : public grpc::experimental::Interceptor {
 public:
  CallObserver(Logger& logger, ServerMetrics* metrics, grpc::experimental::ServerRpcInfo* info)
      : logger_(logger),
        metrics_(metrics),
        info_(info),
        method_(info->method() != nullptr ? info->method() : ""),
        start_(std::chrono::steady_clock::now()) {
    if (metrics_ != nullptr) metrics_->RpcStarted();
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_INITIAL_METADATA)) {
      AdoptRequestId(methods->GetRecvInitialMetadata());
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->emplace(kRequestIdHeader, request_id_);
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      Finished(methods->GetSendStatus());
    }
    methods->Proceed();
  }

 private:
  void AdoptRequestId(std::multimap<grpc::string_ref, grpc::string_ref>* metadata) {
    auto it = metadata->find(kRequestIdHeader);
    if (it != metadata->end() && AcceptableRequestId(it->second)) {
      request_id_.assign(it->second.data(), it->second.size());
      return;
    }
    if (it != metadata->end()) metadata->erase(it);
    request_id_ = NewRequestId();
    // Handlers read the id from the client metadata; the strings live in this interceptor,
    // which outlives the handler.
    metadata->emplace(grpc::string_ref(kRequestIdHeader), grpc::string_ref(request_id_));
  }

  void Finished(const grpc::Status& status) {
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const char* code = StatusCodeName(status.error_code());
    if (metrics_ != nullptr) metrics_->RpcFinished(method_, code, seconds);
    const bool is_probe = absl::StartsWith(method_, "/grpc.health.v1.Health/") ||
                          absl::StartsWith(method_, "/grpc.reflection.");
    const bool is_server_fault = status.error_code() == grpc::StatusCode::INTERNAL ||
                                 status.error_code() == grpc::StatusCode::UNKNOWN;
    const LogLevel level = is_probe          ? LogLevel::kDebug
                           : is_server_fault ? LogLevel::kError
                                             : LogLevel::kInfo;
    if (!logger_.Enabled(level)) return;
    const std::string peer = info_->server_context()->peer();
    const double duration_ms = seconds * 1000.0;
    if (status.ok()) {
      logger_.Log(level, "rpc finished",
                  {{"method", method_},
                   {"code", code},
                   {"duration_ms", duration_ms},
                   {"peer", peer},
                   {"request_id", request_id_}});
    } else {
      logger_.Log(level, "rpc finished",
                  {{"method", method_},
                   {"code", code},
                   {"duration_ms", duration_ms},
                   {"peer", peer},
                   {"request_id", request_id_},
                   {"error", status.error_message()}});
    }
  }

  Logger& logger_;
  ServerMetrics* metrics_;
  grpc::experimental::ServerRpcInfo* info_;
  const std::string method_;
  const std::chrono::steady_clock::time_point start_;
  std::string request_id_;
};

}  // namespace

grpc::experimental::Interceptor* CallObserverFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  return new CallObserver(logger_, metrics_, info);
}

std::string RequestIdOf(const grpc::ServerContextBase& context) {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find(kRequestIdHeader);
  if (it == metadata.end()) return "";
  return std::string(it->second.data(), it->second.size());
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
