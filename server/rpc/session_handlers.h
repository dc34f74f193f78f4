#ifndef SESSIONLEDGER_SERVER_RPC_SESSION_HANDLERS_H_
#define SESSIONLEDGER_SERVER_RPC_SESSION_HANDLERS_H_

#include <memory>

#include "absl/time/time.h"
#include "server/session/session_service.h"
#include "sessionledger/v1/session.grpc.pb.h"

namespace sessionledger {

// sessionledger.v1.SessionService: translates between protobuf and SessionService, bounds every
// call by the caller's deadline (or `default_timeout` when it set none), and maps errors through
// ToGrpcStatus. Stateless apart from its references; thread-safe.
class SessionHandlers final : public sessionledger::v1::SessionService::Service {
 public:
  SessionHandlers(std::shared_ptr<SessionService> sessions, absl::Duration default_timeout)
      : sessions_(std::move(sessions)), default_timeout_(default_timeout) {}

  grpc::Status CreateSession(grpc::ServerContext* context, const v1::CreateSessionRequest* request,
                             v1::Session* response) override;
  grpc::Status GetSession(grpc::ServerContext* context, const v1::GetSessionRequest* request,
                          v1::Session* response) override;
  grpc::Status UpdateSession(grpc::ServerContext* context, const v1::UpdateSessionRequest* request,
                             v1::Session* response) override;
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
  absl::Time Deadline(const grpc::ServerContext& context) const;

  std::shared_ptr<SessionService> sessions_;
  const absl::Duration default_timeout_;
};

// Stored form -> API form (without the token).
void ToApiSession(const storage::v1::StoredSession& stored, v1::Session* out);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_SESSION_HANDLERS_H_
