#include "server/rpc/call_observer.h"

#include <grpcpp/server_context.h>

#include <chrono>
#include <string>

#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

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
  // Ids need to be unique, not secret: a per-thread generator (seeded from the OS once) saves a
  // getrandom system call on every call.
  thread_local absl::BitGen generator;
  const uint64_t high = absl::Uniform<uint64_t>(generator);
  const uint32_t low = absl::Uniform<uint32_t>(generator);
  return absl::StrCat(absl::Hex(high, absl::kZeroPad16), absl::Hex(low, absl::kZeroPad8));
}

class CallObserver final : public grpc::experimental::Interceptor {
 public:
  CallObserver(Logger& logger, ServerMetrics* metrics, grpc::experimental::ServerRpcInfo* info)
      : logger_(logger),
        metrics_(metrics),
        info_(info),
        method_(info->method() != nullptr ? info->method() : ""),
        start_(std::chrono::steady_clock::now()) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_INITIAL_METADATA)) {
      // A call is counted in flight once it has arrived, not when its interceptor is made:
      // gRPC also makes interceptors for the calls the server had asked for when it shuts down,
      // calls that never come and never finish (they read as 52 phantom calls in a drain).
      Started();
      AdoptRequestId(methods->GetRecvInitialMetadata());
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->emplace(kRequestIdHeader, request_id_);
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      Finished(status);
      // ToGrpcStatus's words for the log only (a backing service's): they stay here. Nothing in
      // this server sends rich error details, so none are lost.
      if (!status.error_details().empty()) {
        methods->ModifySendStatus(grpc::Status(
            status.error_code(), absl::StrCat(status.error_message(), " (request id ", request_id_,
                                              " has the cause in the server log)")));
      }
    }
    methods->Proceed();
  }

 private:
  void AdoptRequestId(const std::multimap<grpc::string_ref, grpc::string_ref>* metadata) {
    auto it = metadata->find(kRequestIdHeader);
    if (it != metadata->end() && AcceptableRequestId(it->second)) {
      request_id_.assign(it->second.data(), it->second.size());
      return;
    }
    request_id_ = NewRequestId();
  }

  void Started() {
    if (started_) return;
    started_ = true;
    if (metrics_ != nullptr) metrics_->RpcStarted();
  }

  void Finished(const grpc::Status& status) {
    Started();  // Keeps the gauge balanced should a status ever come without a request.
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const std::string code = StatusCodeName(status.error_code());
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
                   {"error", status.error_details().empty() ? status.error_message()
                                                            : status.error_details()}});
    }
  }

  Logger& logger_;
  ServerMetrics* metrics_;
  grpc::experimental::ServerRpcInfo* info_;
  const std::string method_;
  const std::chrono::steady_clock::time_point start_;
  std::string request_id_;
  bool started_ = false;
};

}  // namespace

grpc::experimental::Interceptor* CallObserverFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  return new CallObserver(logger_, metrics_, info);
}

std::string StatusCodeName(grpc::StatusCode code) {
  // gRPC and Abseil share the canonical code space and its names.
  std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? "UNKNOWN" : name;
}

}  // namespace sessionledger
