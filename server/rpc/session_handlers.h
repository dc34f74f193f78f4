#ifndef SESSIONLEDGER_SERVER_RPC_SESSION_HANDLERS_H_
#define SESSIONLEDGER_SERVER_RPC_SESSION_HANDLERS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "server/rpc/async_call.h"
#include "server/session/session_service.h"
#include "sessionledger/v1/session.grpc.pb.h"

namespace sessionledger {

// sessionledger.v1.SessionService: translates between protobuf and SessionService, bounds every
// call by the caller's deadline (or `default_timeout` when it set none), and maps errors through
// ToGrpcStatus. Stateless apart from its references; thread-safe.
//
// GetSession (the hot read, with or without touch), CreateSession (the login path) and
// UpdateSession are served on gRPC's asynchronous API (Accept): their store calls go out
// through the store's asynchronous methods and the answer is sent from wherever the store
// completes it, so no thread sleeps while Memcached answers (the service finishes a lost
// compare-and-swap race on its blocking executor). The other methods are synchronous.
//
// Not the callback API: in gRPC 1.51 on Linux its completions are run by "nexting" threads
// that, after a second without work, sleep 100 ms between polls, and with it registered every
// method of the server, Health included, showed 100 ms stalls at p99.9 (scripts/bench, 32 in
// flight).
//
// The asynchronous methods are registered raw (bytes in, bytes out) and parse their requests
// themselves: gRPC answers an asynchronous request it cannot parse with a bare INTERNAL that no
// interceptor sees, where the contract wants INVALID_ARGUMENT naming the request.
class SessionHandlers final
    : public v1::SessionService::WithRawMethod_GetSession<
          v1::SessionService::WithRawMethod_CreateSession<
              v1::SessionService::WithRawMethod_UpdateSession<v1::SessionService::Service>>> {
 public:
  SessionHandlers(std::shared_ptr<SessionService> sessions, absl::Duration default_timeout)
      : sessions_(std::move(sessions)), default_timeout_(default_timeout) {}

  // Serves the asynchronous methods from `queues` (whose arrivals queue belongs to the server
  // this service is registered on, after it started), keeping `accepting` calls of each
  // requested at any time. Run queues.Run() on a thread.
  void Accept(AsyncCallQueues& queues, int accepting);
  // Full names of the methods Accept serves, which parse their requests themselves.
  static std::vector<std::string> SelfParsingMethods();
  // The asynchronous methods without gRPC's machinery: fill `response`, then call `done`
  // exactly once, possibly before returning, possibly on another thread.
  using Done = absl::AnyInvocable<void(grpc::Status) &&>;
  void AnswerGetSession(const v1::GetSessionRequest& request, absl::Time deadline,
                        v1::Session* response, Done done);
  void AnswerCreateSession(const v1::CreateSessionRequest& request, absl::Time deadline,
                           v1::Session* response, Done done);
  void AnswerUpdateSession(const v1::UpdateSessionRequest& request, absl::Time deadline,
                           v1::Session* response, Done done);
  grpc::Status RotateSession(grpc::ServerContext* context, const v1::RotateSessionRequest* request,
                             v1::Session* response) override;
  grpc::Status DeleteSession(grpc::ServerContext* context, const v1::DeleteSessionRequest* request,
                             v1::DeleteSessionResponse* response) override;
  grpc::Status ListUserSessions(grpc::ServerContext* context,
                                const v1::ListUserSessionsRequest* request,
                                v1::ListUserSessionsResponse* response) override;
  grpc::Status RevokeUserSessions(grpc::ServerContext* context,
                                  const v1::RevokeUserSessionsRequest* request,
                                  v1::RevokeUserSessionsResponse* response) override;

 private:
  absl::Time Deadline(const grpc::ServerContextBase& context) const;
  template <typename Request, typename Response>
  class UnaryCall;

  std::shared_ptr<SessionService> sessions_;
  const absl::Duration default_timeout_;
};

// Stored form -> API form (without the token). The second form moves the strings and the
// attributes out of `stored`, for the hot paths that drop it afterwards.
void ToApiSession(const storage::v1::StoredSession& stored, v1::Session* out);
void ToApiSession(storage::v1::StoredSession&& stored, v1::Session* out);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_SESSION_HANDLERS_H_
