#ifndef SESSIONLEDGER_SERVER_RPC_REQUEST_PARSE_ERRORS_H_
#define SESSIONLEDGER_SERVER_RPC_REQUEST_PARSE_ERRORS_H_

#include <grpcpp/support/server_interceptor.h>

#include <string>
#include <vector>

#include "server/rpc/invalid_utf8.h"

namespace sessionledger {

// Server interceptor, one per call, that turns gRPC's answer to a request it could not parse
// into INVALID_ARGUMENT naming the request. gRPC answers such a request itself, before any
// handler runs, with INTERNAL and an empty message: for proto3 a string field that is not valid
// UTF-8 (a user_id or an idempotency key from a client that does not check) is a parse error,
// and so are truncated or garbled bytes. INTERNAL would say "our fault, retrying will not help
// you find out why"; the contract says bad input is INVALID_ARGUMENT with a message naming it.
// When the parse failed on a string that is not valid UTF-8, the answer names the field
// ("idempotency_key: not valid UTF-8"), which only protobuf's log line tells on this path: it
// needs a ProtobufLogToLogger alive (server/rpc/protobuf_log.h); without one, or for other
// garbled bytes, the answer names the request (UnparsableRequest).
// A call that ended before its request arrived (cancelled, or its deadline passed) looks the
// same to gRPC; it is logged and counted as CANCELLED or DEADLINE_EXCEEDED instead.
// The factory is thread-safe and keeps no state between calls.
// The answer to a request of `method` (full name, "/package.Service/Method") that cannot be
// parsed; also used by handlers that parse their requests themselves.
grpc::Status UnparsableRequest(const std::string& method);
// The answer to a request that cannot be parsed because `field` is not valid UTF-8.
grpc::Status InvalidUtf8Request(const InvalidUtf8Field& field);

// Methods in `self_parsing` (full names) get no interceptor: their handlers take the request's
// bytes and answer an unparsable one with UnparsableRequest themselves, so gRPC never fails to
// parse for them, and an interceptor there would only cost every call its hooks.
class RequestParseErrorsFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit RequestParseErrorsFactory(std::vector<std::string> self_parsing = {})
      : self_parsing_(std::move(self_parsing)) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;

 private:
  const std::vector<std::string> self_parsing_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_REQUEST_PARSE_ERRORS_H_
