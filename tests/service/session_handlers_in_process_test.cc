// SessionHandlers over a real gRPC server in this process (in-process channel), with the fake
// session store: what the handlers hand the session service, on the asynchronous API
// (CreateSession) and the synchronous one (DeleteSession).
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>

#include <memory>
#include <thread>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/common/clock.h"
#include "server/rpc/session_handlers.h"
#include "tests/unit/fake_session_store.h"

namespace sessionledger {
namespace {

// Far longer than the 5 s the calls here wait, so that which of the two reached the store shows.
constexpr absl::Duration kDefaultCallTimeout = absl::Seconds(60);

class SessionHandlersTest : public ::testing::Test {
 protected:
  SessionHandlersTest()
      : store_(std::make_shared<testing::FakeSessionStore>(clock_)),
        handlers_(std::make_shared<SessionService>(store_, clock_, SessionServiceOptions{}),
                  kDefaultCallTimeout) {
    grpc::ServerBuilder builder;
    builder.RegisterService(&handlers_);
    queues_ = std::make_unique<AsyncCallQueues>(builder.AddCompletionQueue());
    server_ = builder.BuildAndStart();
    handlers_.Accept(*queues_, 1);
    serving_ = std::thread([this] { queues_->Run(); });
    stub_ = v1::SessionService::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
  }
  ~SessionHandlersTest() override {
    // As ServerApp::Wait: the server, then every call and arrival, then the queues.
    server_->Shutdown();
    server_->Wait();
    EXPECT_TRUE(queues_->WaitForCallsAndArrivals(absl::Seconds(5)));
    queues_->Shutdown();
    serving_.join();
  }

  // A context whose deadline is 5 s away; `callers` is set to it.
  std::unique_ptr<grpc::ClientContext> Context(absl::Time* callers) {
    auto context = std::make_unique<grpc::ClientContext>();
    *callers = absl::Now() + absl::Seconds(5);
    context->set_deadline(absl::ToChronoTime(*callers));
    return context;
  }

  SystemClock clock_;  // The service compares deadlines with its clock.
  std::shared_ptr<testing::FakeSessionStore> store_;
  SessionHandlers handlers_;
  std::unique_ptr<AsyncCallQueues> queues_;
  std::unique_ptr<grpc::Server> server_;
  std::thread serving_;
  std::unique_ptr<v1::SessionService::Stub> stub_;
};

// Both kinds of handler hand the service the caller's deadline (less a margin for the answer),
// so that a stalled Memcached ends in the server's UNAVAILABLE before the caller gives up on its
// own, not only DEFAULT_CALL_TIMEOUT_MS later.
TEST_F(SessionHandlersTest, HandlersHandTheServiceTheCallersDeadline) {
  absl::Time callers;
  v1::CreateSessionRequest create;
  create.set_user_id("alice");
  v1::Session session;
  const grpc::Status created = stub_->CreateSession(Context(&callers).get(), create, &session);
  ASSERT_TRUE(created.ok()) << created.error_message();
  EXPECT_LT(store_->last_add_deadline(), callers);
  EXPECT_GT(store_->last_add_deadline(), callers - absl::Seconds(1));

  v1::DeleteSessionRequest remove;
  remove.set_token(session.token());
  v1::DeleteSessionResponse removed;
  const grpc::Status deleted = stub_->DeleteSession(Context(&callers).get(), remove, &removed);
  ASSERT_TRUE(deleted.ok()) << deleted.error_message();
  EXPECT_LT(store_->last_lookup_deadline(), callers);
  EXPECT_GT(store_->last_lookup_deadline(), callers - absl::Seconds(1));
}

}  // namespace
}  // namespace sessionledger
