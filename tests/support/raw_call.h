#ifndef SESSIONLEDGER_TESTS_SUPPORT_RAW_CALL_H_
#define SESSIONLEDGER_TESTS_SUPPORT_RAW_CALL_H_

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>

#include <memory>
#include <string>

namespace sessionledger::testing {

// Sends `body` as the request of the unary `method` ("/package.Service/Method") over `channel`
// as it is, bypassing the generated (well-behaved) serializer, the way a client of another
// language or an attacker could; waits for the answer. With `response`, an OK answer's bytes
// are put there. `context` carries the caller's deadline and metadata.
grpc::Status RawCall(const std::shared_ptr<grpc::Channel>& channel, grpc::ClientContext& context,
                     const std::string& method, const std::string& body,
                     std::string* response = nullptr);

}  // namespace sessionledger::testing

#endif  // SESSIONLEDGER_TESTS_SUPPORT_RAW_CALL_H_
