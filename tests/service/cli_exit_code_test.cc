// RunRpcCommand's exit code against a real gRPC server in this process (in-process channel)
// whose Health/Check answers with a status code the test picks. gRPC 1.51 hands a client any
// number a peer (or a proxy) sends as grpc-status, and a shell keeps an exit code's low 8 bits:
// 256 would read as success and 270 as UNAVAILABLE, which scripts retry. The codes here stay
// within what grpc::StatusCode can hold (-32..31, as DO_NOT_USE is -1): a Status holding 256 is
// itself undefined behaviour, which the sanitizer build stops at, in gRPC's inline accessors.
// The same scripted server, also on a loopback port, answers what the CLI must not trust: an
// error message with terminal escapes, a history that repeats its page token, and NOT_SERVING
// to `bench`, which makes channels of its own.
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/channel_arguments.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cli_options.h"
#include "client/commands.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "sessionledger/v1/transaction.grpc.pb.h"

namespace sessionledger::client {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// Answers every Check with the status code set last (0: OK, with the serving status set last)
// and the message set last. Thread-safe.
class ScriptedHealth final : public grpc::health::v1::Health::Service {
 public:
  grpc::Status Check(grpc::ServerContext* /*context*/,
                     const grpc::health::v1::HealthCheckRequest* /*request*/,
                     grpc::health::v1::HealthCheckResponse* response) override {
    const int code = code_.load();
    if (code == 0) {
      response->set_status(serving_.load() ? grpc::health::v1::HealthCheckResponse::SERVING
                                           : grpc::health::v1::HealthCheckResponse::NOT_SERVING);
      return grpc::Status::OK;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    return grpc::Status(static_cast<grpc::StatusCode>(code), message_);
  }
  void set_code(int code) { code_.store(code); }
  void set_serving(bool serving) { serving_.store(serving); }
  void set_message(std::string message) {
    std::lock_guard<std::mutex> lock(mutex_);
    message_ = std::move(message);
  }

 private:
  std::atomic<int> code_{0};
  std::atomic<bool> serving_{true};
  std::mutex mutex_;
  std::string message_ = "odd";
};

// A ledger whose every page of history says there is a next page, always the same one.
class RepeatingPagesLedger final : public v1::TransactionService::Service {
 public:
  grpc::Status ListTransactions(grpc::ServerContext* /*context*/,
                                const v1::ListTransactionsRequest* /*request*/,
                                v1::ListTransactionsResponse* response) override {
    ++pages_;
    response->add_transactions()->set_transaction_id("t");
    response->set_next_page_token("same-again");
    return grpc::Status::OK;
  }
  int pages() const { return pages_.load(); }

 private:
  std::atomic<int> pages_{0};
};

class CliExitCodeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    builder.RegisterService(&health_);
    builder.RegisterService(&ledger_);
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
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

  // The whole command line `args`, against this server over loopback TCP (the load generator
  // makes channels of its own); keeps stdout and stderr in out_ and err_.
  int Cli(std::vector<std::string> args) {
    args.insert(args.begin(), {"--target", absl::StrCat("127.0.0.1:", port_)});
    out_.str("");
    err_.str("");
    return RunCli(
        args, [](const std::string&) -> std::optional<std::string> { return std::nullopt; }, out_,
        err_);
  }

  ScriptedHealth health_;        // outlives server_
  RepeatingPagesLedger ledger_;  // outlives server_
  int port_ = 0;
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

// What a server (or a proxy in front of it) says goes to a terminal: it cannot clear the
// screen or move the cursor.
TEST_F(CliExitCodeTest, AnErrorMessageReachesTheTerminalEscaped) {
  health_.set_message("bad\x1b[2Jthing\nfake prompt");
  EXPECT_EQ(Health(14), 14);
  EXPECT_THAT(err_.str(), HasSubstr("error: UNAVAILABLE: bad\\x1b[2Jthing\\nfake prompt\n"));
  EXPECT_THAT(err_.str(), Not(HasSubstr("\x1b")));
}

// And so does a usage error, which quotes what the caller gave: a key pasted from elsewhere.
TEST_F(CliExitCodeTest, AUsageErrorReachesTheTerminalEscaped) {
  EXPECT_EQ(Cli({"session", "create", "u", "--attr", "\x1b[2J=a", "--attr", "\x1b[2J=b"}), 3);
  EXPECT_THAT(err_.str(), HasSubstr("--attr: key '\\x1b[2J' is given twice"));
  EXPECT_THAT(err_.str(), Not(HasSubstr("\x1b")));
}

TEST_F(CliExitCodeTest, HistoryAllStopsWhenTheServerRepeatsAPageToken) {
  EXPECT_EQ(Cli({"--token", "t", "history", "acc-1", "--all"}), 13) << err_.str();
  EXPECT_THAT(err_.str(), HasSubstr("repeated a next_page_token"));
  EXPECT_EQ(ledger_.pages(), 2) << "one page with the token, one that handed it out again";
  EXPECT_EQ(out_.str(), "");
  // The token it started from counts as handed out.
  EXPECT_EQ(Cli({"--token", "t", "history", "acc-1", "--all", "--page-token", "same-again"}), 13)
      << err_.str();
  EXPECT_EQ(ledger_.pages(), 3);
}

// A draining server answers its health checks NOT_SERVING: bench counts those as errors (and
// none as a latency sample), as `health` exits with them.
TEST_F(CliExitCodeTest, BenchCountsNotServingAsAnError) {
  health_.set_serving(false);
  EXPECT_EQ(Cli({"--json", "bench", "--rpc", "health", "--concurrency", "2", "--requests", "20",
                 "--no-progress"}),
            0)
      << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("\"errors\":{\"UNAVAILABLE\":")) << out_.str();
  EXPECT_THAT(out_.str(), HasSubstr("\"calls\":0")) << out_.str();

  health_.set_serving(true);
  EXPECT_EQ(Cli({"--json", "bench", "--rpc", "health", "--concurrency", "2", "--requests", "20",
                 "--no-progress"}),
            0)
      << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("\"errors\":{}")) << out_.str();
}

}  // namespace
}  // namespace sessionledger::client
