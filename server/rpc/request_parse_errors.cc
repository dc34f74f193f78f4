#include "server/rpc/request_parse_errors.h"

#include <google/protobuf/descriptor.h>
#include <grpcpp/server_context.h>

#include <algorithm>
#include <optional>
#include <string>

#include "absl/time/clock.h"
#include "server/rpc/call_deadline.h"
#include "server/rpc/protobuf_log.h"

namespace sessionledger {
namespace {

// The field of `method`'s request that `complaint` (protobuf's full field name) names.
std::optional<InvalidUtf8Field> ComplainedField(const std::string& method,
                                                const std::string& complaint) {
  // "/pkg.Service/Method" -> "pkg.Service.Method", the name the descriptor pool knows.
  if (method.size() < 2 || method[0] != '/') return std::nullopt;
  std::string name = method.substr(1);
  const size_t slash = name.find('/');
  if (slash == std::string::npos) return std::nullopt;
  name[slash] = '.';
  const google::protobuf::MethodDescriptor* descriptor =
      google::protobuf::DescriptorPool::generated_pool()->FindMethodByName(name);
  if (descriptor == nullptr) return std::nullopt;
  return InvalidUtf8FieldFromFullName(*descriptor->input_type(), complaint);
}

using grpc::experimental::InterceptionHookPoints;

class RequestParseErrors final : public grpc::experimental::Interceptor {
 public:
  explicit RequestParseErrors(grpc::experimental::ServerRpcInfo* info)
      : info_(info),
        method_(info->method() != nullptr ? info->method() : ""),
        unary_(info->type() == grpc::experimental::ServerRpcInfo::Type::UNARY) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    // A unary request that gRPC failed to deserialize reaches this hook as a null message. (On a
    // stream a null message only means the client finished sending: streams are left alone.)
    if (unary_ && methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE)) {
      // gRPC parsed the request on this thread just before this hook, so a complaint protobuf
      // logged on it about invalid UTF-8 is about this request if it is about this request's
      // type. Taken either way, so that no memo outlives the call that left it.
      const std::optional<std::string> complaint = TakeUtf8ParseComplaint();
      if (methods->GetRecvMessage() == nullptr) {
        no_request_ = true;
        if (complaint.has_value()) invalid_utf8_ = ComplainedField(method_, *complaint);
      }
    }
    if (no_request_ &&
        methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS) &&
        methods->GetSendStatus().error_code() == grpc::StatusCode::INTERNAL) {
      // A call that ended before its request arrived (the caller cancelled, or its deadline
      // passed while the request waited) has no request either. Nobody receives this status,
      // but the access log and the metrics do: counting it as INVALID_ARGUMENT would show a
      // burst of bad input where there was an overload. (Only the synchronous API's calls get
      // here, for which IsCancelled is safe.)
      const std::optional<grpc::Status> ended =
          EndedBeforeItsRequest(*info_->server_context(), methods->GetSendStatus());
      methods->ModifySendStatus(ended.has_value()           ? *ended
                                : invalid_utf8_.has_value() ? InvalidUtf8Request(*invalid_utf8_)
                                                            : UnparsableRequest(method_));
    }
    methods->Proceed();
  }

 private:
  // The status of a call that ended before its request arrived, if it did; `answered` is
  // gRPC's own. gRPC 1.51 answers a request it got no bytes of with "Couldn't initialize byte
  // buffer reader" (older releases: "No payload"), and one that does not parse with the
  // message's InitializationErrorString, empty for proto3. IsCancelled alone does not tell:
  // the cancellation (the caller's, or its deadline's, whichever reached the server first) is
  // not always visible yet when the handler answers.
  static std::optional<grpc::Status> EndedBeforeItsRequest(const grpc::ServerContextBase& context,
                                                           const grpc::Status& answered) {
    if (CallerDeadline(context.raw_deadline()) <= absl::Now()) {
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          "request: the deadline passed before the request arrived");
    }
    const std::string& said = answered.error_message();
    if (said == "Couldn't initialize byte buffer reader" || said == "No payload" ||
        context.IsCancelled()) {
      return grpc::Status(grpc::StatusCode::CANCELLED,
                          "request: the call ended before the request arrived");
    }
    return std::nullopt;
  }

  grpc::experimental::ServerRpcInfo* const info_;
  const std::string method_;
  const bool unary_;
  bool no_request_ = false;
  std::optional<InvalidUtf8Field> invalid_utf8_;  // Why the request could not be parsed.
};

}  // namespace

grpc::Status UnparsableRequest(const std::string& method) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                      "request: cannot be parsed as the request message of " + method +
                          " (string fields must be valid UTF-8)");
}

grpc::Status InvalidUtf8Request(const InvalidUtf8Field& field) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, InvalidUtf8Message(field));
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
