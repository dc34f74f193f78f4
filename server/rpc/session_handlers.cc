#include "server/rpc/session_handlers.h"

#include "server/rpc/async_call.h"
#include "server/rpc/call_deadline.h"
#include "server/rpc/status_mapping.h"

namespace sessionledger {
namespace {

void SetTimestamp(int64_t unix_micros, google::protobuf::Timestamp* out) {
  out->set_seconds(unix_micros / 1'000'000);
  out->set_nanos(static_cast<int32_t>((unix_micros % 1'000'000) * 1000));
}

grpc::Status Respond(absl::StatusOr<SessionView> view, v1::Session* response) {
  if (!view.ok()) return ToGrpcStatus(view.status());
  ToApiSession(view->stored, response);
  response->set_token(std::move(view->token));
  return grpc::Status::OK;
}

}  // namespace

absl::Time SessionHandlers::Deadline(const grpc::ServerContextBase& context) const {
  return AnswerBy(context, default_timeout_);
}

void ToApiSession(const storage::v1::StoredSession& stored, v1::Session* out) {
  out->set_session_id(stored.session_id());
  out->set_user_id(stored.user_id());
  SetTimestamp(stored.created_at_unix_micros(), out->mutable_created_at());
  SetTimestamp(stored.expires_at_unix_micros(), out->mutable_expires_at());
  SetTimestamp(stored.absolute_expires_at_unix_micros(), out->mutable_absolute_expires_at());
  out->set_ttl_seconds(stored.ttl_seconds());
  out->set_version(stored.version());
  *out->mutable_attributes() = stored.attributes();
}

grpc::Status SessionHandlers::CreateSession(grpc::ServerContext* context,
                                            const v1::CreateSessionRequest* request,
                                            v1::Session* response) {
  return Respond(sessions_->Create(request->user_id(), request->ttl_seconds(),
                                   request->attributes(), Deadline(*context)),
                 response);
}

// One GetSession call: requested from the completion queue, answered through
// AnswerGetSession, deleted once its answer is sent (or the server shuts down).
class SessionHandlers::GetSessionCall final : public AsyncCall {
 public:
  GetSessionCall(SessionHandlers& handlers, grpc::ServerCompletionQueue* cq)
      : handlers_(handlers), cq_(cq), responder_(&context_) {
    handlers_.RequestGetSession(&context_, &request_, &responder_, cq_, cq_, this);
  }

  void Proceed(bool ok) override {
    if (!ok || answering_) {
      // Shutting down before a call arrived, or the answer has gone out (or was cancelled).
      delete this;
      return;
    }
    answering_ = true;
    new GetSessionCall(handlers_, cq_);  // The next caller.
    handlers_.AnswerGetSession(
        request_, handlers_.Deadline(context_), &response_,
        [this](grpc::Status status) { responder_.Finish(response_, status, this); });
  }

 private:
  SessionHandlers& handlers_;
  grpc::ServerCompletionQueue* const cq_;
  grpc::ServerContext context_;
  v1::GetSessionRequest request_;
  v1::Session response_;
  grpc::ServerAsyncResponseWriter<v1::Session> responder_;
  bool answering_ = false;
};

void SessionHandlers::AcceptGetSession(grpc::ServerCompletionQueue* cq, int accepting) {
  for (int i = 0; i < accepting; ++i) new GetSessionCall(*this, cq);
}

void SessionHandlers::AnswerGetSession(const v1::GetSessionRequest& request, absl::Time deadline,
                                       v1::Session* response, Done done) {
  auto answer = [response, done = std::move(done)](absl::StatusOr<SessionView> view) mutable {
    std::move(done)(Respond(std::move(view), response));
  };
  if (request.touch()) {
    // Sliding the expiry writes through a blocking client: not on a callback thread.
    blocking_.Run([this, token = request.token(), deadline, answer = std::move(answer)]() mutable {
      answer(sessions_->Get(token, /*touch=*/true, deadline));
    });
  } else {
    sessions_->ReadAsync(request.token(), deadline, std::move(answer));
  }
}

grpc::Status SessionHandlers::UpdateSession(grpc::ServerContext* context,
                                            const v1::UpdateSessionRequest* request,
                                            v1::Session* response) {
  return Respond(sessions_->Update(request->token(), request->set(), request->remove(),
                                   request->expected_version(), Deadline(*context)),
                 response);
}

grpc::Status SessionHandlers::RotateSession(grpc::ServerContext* context,
                                            const v1::RotateSessionRequest* request,
                                            v1::Session* response) {
  return Respond(sessions_->Rotate(request->token(), Deadline(*context)), response);
}

grpc::Status SessionHandlers::DeleteSession(grpc::ServerContext* context,
                                            const v1::DeleteSessionRequest* request,
                                            v1::DeleteSessionResponse* /*response*/) {
  return ToGrpcStatus(sessions_->Delete(request->token(), Deadline(*context)));
}

grpc::Status SessionHandlers::ListUserSessions(grpc::ServerContext* context,
                                               const v1::ListUserSessionsRequest* request,
                                               v1::ListUserSessionsResponse* response) {
  absl::StatusOr<std::vector<storage::v1::StoredSession>> sessions =
      sessions_->List(request->user_id(), Deadline(*context));
  if (!sessions.ok()) return ToGrpcStatus(sessions.status());
  for (const auto& s : *sessions) ToApiSession(s, response->add_sessions());
  return grpc::Status::OK;
}

grpc::Status SessionHandlers::RevokeUserSessions(grpc::ServerContext* context,
                                                 const v1::RevokeUserSessionsRequest* request,
                                                 v1::RevokeUserSessionsResponse* response) {
  absl::StatusOr<int64_t> revoked = sessions_->Revoke(request->user_id(), Deadline(*context));
  if (!revoked.ok()) return ToGrpcStatus(revoked.status());
  response->set_revoked(*revoked);
  return grpc::Status::OK;
}

}  // namespace sessionledger
