#include "server/rpc/request_parse_errors.h"

#include <algorithm>
#include <string>

namespace sessionledger {
namespace {

using grpc::experimental::InterceptionHookPoints;

class RequestParseErrors final : public grpc::experimental::Interceptor {
 public:
  explicit RequestParseErrors(grpc::experimental::ServerRpcInfo* info)
      : method_(info->method() != nullptr ? info->method() : ""),
        unary_(info->type() == grpc::experimental::ServerRpcInfo::Type::UNARY) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    // A unary request that gRPC failed to deserialize reaches this hook as a null message. (On a
    // stream a null message only means the client finished sending: streams are left alone.)
    if (unary_ && methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE) &&
        methods->GetRecvMessage() == nullptr) {
      unparsable_ = true;
    }
    if (unparsable_ &&
        methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS) &&
        methods->GetSendStatus().error_code() == grpc::StatusCode::INTERNAL) {
      methods->ModifySendStatus(UnparsableRequest(method_));
    }
    methods->Proceed();
  }

 private:
  const std::string method_;
  const bool unary_;
  bool unparsable_ = false;
};

}  // namespace

grpc::Status UnparsableRequest(const std::string& method) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                      "request: cannot be parsed as the request message of " + method +
                          " (string fields must be valid UTF-8)");
}

grpc::experimental::Interceptor* RequestParseErrorsFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  const char* method = info->method();
  if (method != nullptr &&
      std::find(self_parsing_.begin(), self_parsing_.end(), method) != self_parsing_.end()) {
    return nullptr;  // gRPC then runs no hooks of ours for this call.
  }
  return new RequestParseErrors(info);
}

}  // namespace sessionledger
