#include "server/rpc/session_handlers.h"

#include <grpcpp/support/proto_buffer_reader.h>

#include <optional>
#include <string>
#include <vector>

#include "server/rpc/async_call.h"
#include "server/rpc/call_deadline.h"
#include "server/rpc/invalid_utf8.h"
#include "server/rpc/proto_time.h"
#include "server/rpc/protobuf_log.h"
#include "server/rpc/request_parse_errors.h"
#include "server/rpc/status_mapping.h"

namespace sessionledger {
namespace {

constexpr char kGetSession[] = "/sessionledger.v1.SessionService/GetSession";
constexpr char kCreateSession[] = "/sessionledger.v1.SessionService/CreateSession";
constexpr char kUpdateSession[] = "/sessionledger.v1.SessionService/UpdateSession";

grpc::Status Respond(absl::StatusOr<SessionView> view, v1::Session* response) {
  if (!view.ok()) return ToGrpcStatus(view.status());
  ToApiSession(std::move(view->stored), response);
  response->set_token(std::move(view->token));
  return grpc::Status::OK;
}

// Parses `received` into `request` as gRPC's own Deserialize does, except that the bytes are
// kept until the parse has succeeded: when it fails, they are read again to name the field
// that is not valid UTF-8 (FindInvalidUtf8Field), with its index or map key, which protobuf's
// log line could not give. Clears `received` either way, as Deserialize does.
grpc::Status ParseRequest(const char* method, grpc::ByteBuffer& received,
                          google::protobuf::Message& request) {
  bool parsed;
  {
    grpc::ProtoBufferReader reader(&received);
    parsed = reader.status().ok() && request.ParseFromZeroCopyStream(&reader);
  }
  // The bytes name the field more exactly than protobuf's complaint: drop the memo, so that
  // it cannot outlive this call on this thread.
  (void)TakeUtf8ParseComplaint();
  if (parsed) {
    received.Clear();
    return grpc::Status::OK;
  }
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (received.Dump(&slices).ok()) {
    for (const grpc::Slice& slice : slices) {
      bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    }
  }
  received.Clear();
  const std::optional<InvalidUtf8Field> field =
      FindInvalidUtf8Field(*request.GetDescriptor(), bytes);
  return field.has_value() ? InvalidUtf8Request(*field) : UnparsableRequest(method);
}

// The service's answer as the asynchronous method's.
SessionService::ViewCallback Answer(v1::Session* response, SessionHandlers::Done done) {
  return [response, done = std::move(done)](absl::StatusOr<SessionView> view) mutable {
    std::move(done)(Respond(std::move(view), response));
  };
}

}  // namespace

absl::Time SessionHandlers::Deadline(const grpc::ServerContextBase& context) const {
  return AnswerBy(context, default_timeout_);
}

namespace {

// The fields ToApiSession copies and moves alike.
void SetScalars(const storage::v1::StoredSession& stored, v1::Session* out) {
  SetTimestampFromUnixMicros(stored.created_at_unix_micros(), out->mutable_created_at());
  SetTimestampFromUnixMicros(stored.expires_at_unix_micros(), out->mutable_expires_at());
  SetTimestampFromUnixMicros(stored.absolute_expires_at_unix_micros(),
                             out->mutable_absolute_expires_at());
  out->set_ttl_seconds(stored.ttl_seconds());
  out->set_version(stored.version());
}

}  // namespace

void ToApiSession(const storage::v1::StoredSession& stored, v1::Session* out) {
  out->set_session_id(stored.session_id());
  out->set_user_id(stored.user_id());
  SetScalars(stored, out);
  *out->mutable_attributes() = stored.attributes();
}

void ToApiSession(storage::v1::StoredSession&& stored, v1::Session* out) {
  out->set_session_id(std::move(*stored.mutable_session_id()));
  out->set_user_id(std::move(*stored.mutable_user_id()));
  SetScalars(stored, out);
  // With both messages off arenas (as here) this swaps the maps' tables instead of copying
  // every attribute.
  out->mutable_attributes()->swap(*stored.mutable_attributes());
}

// One call of an asynchronous method: requested from the completion queue with `request`,
// parsed here, answered with `answer`, deleted once its answer is sent (or the server shuts
// down).
template <typename Request, typename Response>
class SessionHandlers::UnaryCall final : public AsyncCall {
 public:
  using RequestMethod = void (SessionHandlers::*)(
      grpc::ServerContext*, grpc::ByteBuffer*, grpc::ServerAsyncResponseWriter<grpc::ByteBuffer>*,
      grpc::CompletionQueue*, grpc::ServerCompletionQueue*, void*);
  using AnswerMethod = void (SessionHandlers::*)(const Request&, absl::Time, Response*, Done);

  UnaryCall(SessionHandlers& handlers, AsyncCallQueues& queues, const char* method,
            RequestMethod request, AnswerMethod answer)
      : handlers_(handlers),
        queues_(queues),
        method_(method),
        request_method_(request),
        answer_(answer),
        responder_(&context_) {
    queues_.CallRequested();
    (handlers_.*request_method_)(&context_, &received_, &responder_, queues_.answers(),
                                 queues_.arrivals(), Tag());
  }

  ~UnaryCall() override {
    if (answering_) queues_.CallEnded();
  }

  void Proceed(bool ok) override {
    if (!ok || answering_) {
      // Shutting down before a call arrived, or the answer has gone out (or was cancelled).
      if (!answering_) queues_.CallArrived();
      delete this;
      return;
    }
    answering_ = true;
    queues_.CallBegan();
    new UnaryCall(handlers_, queues_, method_, request_method_, answer_);  // The next caller.
    // Arrived only now, with this call answering and the next one requested: the wait for
    // calls and arrivals must never see both counts at zero in between.
    queues_.CallArrived();
    if (grpc::Status parsed = ParseRequest(method_, received_, request_); !parsed.ok()) {
      Finish(std::move(parsed));
      return;
    }
    (handlers_.*answer_)(request_, handlers_.Deadline(context_), &response_,
                         [this](grpc::Status status) { Finish(std::move(status)); });
  }

 private:
  void Finish(grpc::Status status) {
    queues_.ExpectAnswer();
    if (!status.ok()) {
      responder_.FinishWithError(status, Tag());
      return;
    }
    grpc::ByteBuffer sent;
    bool own_buffer = false;
    const grpc::Status serialized =
        grpc::SerializationTraits<Response>::Serialize(response_, &sent, &own_buffer);
    if (!serialized.ok()) {
      responder_.FinishWithError(serialized, Tag());
      return;
    }
    responder_.Finish(sent, grpc::Status::OK, Tag());
  }

  SessionHandlers& handlers_;
  AsyncCallQueues& queues_;
  const char* const method_;
  const RequestMethod request_method_;
  const AnswerMethod answer_;
  grpc::ServerContext context_;
  grpc::ByteBuffer received_;
  Request request_;
  Response response_;
  grpc::ServerAsyncResponseWriter<grpc::ByteBuffer> responder_;
  bool answering_ = false;
};

std::vector<std::string> SessionHandlers::SelfParsingMethods() {
  return {kGetSession, kCreateSession, kUpdateSession};
}

void SessionHandlers::Accept(AsyncCallQueues& queues, int accepting) {
  for (int i = 0; i < accepting; ++i) {
    new UnaryCall<v1::GetSessionRequest, v1::Session>(*this, queues, kGetSession,
                                                      &SessionHandlers::RequestGetSession,
                                                      &SessionHandlers::AnswerGetSession);
    new UnaryCall<v1::CreateSessionRequest, v1::Session>(*this, queues, kCreateSession,
                                                         &SessionHandlers::RequestCreateSession,
                                                         &SessionHandlers::AnswerCreateSession);
    new UnaryCall<v1::UpdateSessionRequest, v1::Session>(*this, queues, kUpdateSession,
                                                         &SessionHandlers::RequestUpdateSession,
                                                         &SessionHandlers::AnswerUpdateSession);
  }
}

void SessionHandlers::AnswerCreateSession(const v1::CreateSessionRequest& request,
                                          absl::Time deadline, v1::Session* response, Done done) {
  sessions_->CreateAsync(request.user_id(), request.ttl_seconds(), request.attributes(), deadline,
                         Answer(response, std::move(done)));
}

void SessionHandlers::AnswerGetSession(const v1::GetSessionRequest& request, absl::Time deadline,
                                       v1::Session* response, Done done) {
  sessions_->GetAsync(request.token(), request.touch(), deadline,
                      Answer(response, std::move(done)));
}

void SessionHandlers::AnswerUpdateSession(const v1::UpdateSessionRequest& request,
                                          absl::Time deadline, v1::Session* response, Done done) {
  sessions_->UpdateAsync(request.token(), request.set(), request.remove(),
                         request.expected_version(), deadline, Answer(response, std::move(done)));
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
  // Moved, not copied: a listing can hold thousands of sessions of up to 64 KiB each.
  for (auto& s : *sessions) ToApiSession(std::move(s), response->add_sessions());
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
