// RunRpcCommand's exit code against a real gRPC server in this process (in-process channel)
// whose Health/Check answers with a status code the test picks. gRPC 1.51 hands a client any
// number a peer (or a proxy) sends as grpc-status, and a shell keeps an exit code's low 8 bits:
// 256 would read as success and 270 as UNAVAILABLE, which scripts retry. The codes here stay
// within what grpc::StatusCode can hold (-32..31, as DO_NOT_USE is -1): a Status holding 256 is
// itself undefined behaviour, which the sanitizer build stops at, in gRPC's inline accessors.
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/channel_arguments.h>

#include <atomic>
#include <memory>
#include <sstream>

#include "client/cli_options.h"
#include "client/commands.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"

namespace sessionledger::client {
namespace {

using ::testing::HasSubstr;

// Answers every Check with the status code set last (0: SERVING). Thread-safe.
class ScriptedHealth final : public grpc::health::v1::Health::Service {
 public:
  grpc::Status Check(grpc::ServerContext* /*context*/,
                     const grpc::health::v1::HealthCheckRequest* /*request*/,
                     grpc::health::v1::HealthCheckResponse* response) override {
    const int code = code_.load();
    if (code == 0) {
      response->set_status(grpc::health::v1::HealthCheckResponse::SERVING);
      return grpc::Status::OK;
    }
    return grpc::Status(static_cast<grpc::StatusCode>(code), "odd");
  }
  void set_code(int code) { code_.store(code); }

 private:
  std::atomic<int> code_{0};
};

class CliExitCodeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    builder.RegisterService(&health_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    channel_ = server_->InProcessChannel(grpc::ChannelArguments());
  }
  void TearDown() override { server_->Shutdown(); }

  // `sessionledger-cli health` over the in-process channel, the server answering with `code`;
  // returns the exit code and keeps stdout and stderr in out_ and err_.
  int Health(int code) {
    health_.set_code(code);
    CliOptions options;
    options.command = Command::kHealth;
    out_.str("");
    err_.str("");
    return RunRpcCommand(options, channel_, out_, err_);
  }

  ScriptedHealth health_;  // outlives server_
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::ostringstream out_;
  std::ostringstream err_;
};

TEST_F(CliExitCodeTest, CodesOutsideGrpcsRangeExitUnknown) {
  for (int code : {17, 20, 31}) {
    EXPECT_EQ(Health(code), 2) << code;
    EXPECT_THAT(err_.str(), HasSubstr("error: UNKNOWN: odd")) << code;
    EXPECT_EQ(out_.str(), "") << code;
  }
}

TEST_F(CliExitCodeTest, CodesInGrpcsRangeAreTheExitCode) {
  EXPECT_EQ(Health(0), 0) << err_.str();
  EXPECT_EQ(out_.str(), "SERVING\n");
  EXPECT_EQ(err_.str(), "");

  EXPECT_EQ(Health(14), 14);
  EXPECT_THAT(err_.str(), HasSubstr("error: UNAVAILABLE: odd"));
  EXPECT_EQ(Health(16), 16);
  EXPECT_THAT(err_.str(), HasSubstr("error: UNAUTHENTICATED: odd"));
}

}  // namespace
}  // namespace sessionledger::client
