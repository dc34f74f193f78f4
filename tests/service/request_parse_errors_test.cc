// RequestParseErrors on gRPC's synchronous server: a request gRPC cannot parse is
// INVALID_ARGUMENT, naming the field when it is a string that is not valid UTF-8. The services
// are the generated bases (every method UNIMPLEMENTED): the parse happens before any handler,
// so only the interceptor and the protobuf log handler are under test.
//
// The field name reaches the interceptor only through a thread_local memo that protobuf's log
// handler leaves on the thread that parsed, so these tests also show that gRPC 1.51 runs the
// POST_RECV_MESSAGE hook on the thread that deserialized the request: with many threads parsing
// at once, every answer names its own request's field.
#include "server/rpc/request_parse_errors.h"

#include <grpcpp/grpcpp.h>
#include <stdio.h>

#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/rpc/protobuf_log.h"
#include "sessionledger/v1/session.grpc.pb.h"
#include "sessionledger/v1/transaction.grpc.pb.h"
#include "tests/support/raw_call.h"

namespace sessionledger {
namespace {

std::string Len(int field, const std::string& bytes) {
  return absl::StrCat(std::string(1, static_cast<char>(field << 3 | 2)),
                      std::string(1, static_cast<char>(bytes.size())), bytes);
}

constexpr char kBad[] = "\xc3\x28";
constexpr char kDeposit[] = "/sessionledger.v1.TransactionService/Deposit";
constexpr char kTransfer[] = "/sessionledger.v1.TransactionService/Transfer";
constexpr char kRotate[] = "/sessionledger.v1.SessionService/RotateSession";

class RequestParseErrorsTest : public ::testing::Test {
 protected:
  RequestParseErrorsTest() : log_file_(tmpfile()), logger_(LogLevel::kDebug, fileno(log_file_)) {}
  ~RequestParseErrorsTest() override { fclose(log_file_); }

  void SetUp() override {
    grpc::ServerBuilder builder;
    builder.RegisterService(&sessions_);
    builder.RegisterService(&ledger_);
    // As the app has it: several threads take calls, so parses run on many threads at once.
    builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MIN_POLLERS, 4);
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
        interceptors;
    interceptors.push_back(std::make_unique<RequestParseErrorsFactory>());
    builder.experimental().SetInterceptorCreators(std::move(interceptors));
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    channel_ = server_->InProcessChannel(grpc::ChannelArguments());
  }
  void TearDown() override { server_->Shutdown(); }

  grpc::Status RawCall(const std::string& method, const std::string& body) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    return testing::RawCall(channel_, context, method, body);
  }

  FILE* const log_file_;
  Logger logger_;
  const ProtobufLogToLogger redirect_{logger_};
  v1::SessionService::Service sessions_;
  v1::TransactionService::Service ledger_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
};

TEST_F(RequestParseErrorsTest, NamesTheFieldThatIsNotUtf8) {
  grpc::Status status = RawCall(kDeposit, absl::StrCat(Len(1, "acc"), Len(3, kBad)));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(), "idempotency_key: not valid UTF-8");

  status = RawCall(kTransfer, absl::StrCat(Len(1, kBad), Len(2, "to")));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(), "from_account_id: not valid UTF-8");

  status = RawCall(kRotate, Len(1, kBad));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(), "token: not valid UTF-8");
}

TEST_F(RequestParseErrorsTest, OtherGarbageKeepsTheGenericMessage) {
  const grpc::Status status = RawCall(kDeposit, std::string("\x0a\x7f", 2));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(),
            absl::StrCat("request: cannot be parsed as the request message of ", kDeposit,
                         " (string fields must be valid UTF-8)"));
  // A good request reaches the (unimplemented) handler.
  EXPECT_EQ(RawCall(kDeposit, Len(3, "key")).error_code(), grpc::StatusCode::UNIMPLEMENTED);
}

TEST_F(RequestParseErrorsTest, NoMemoLeaksBetweenCalls) {
  // A bad request, then garbage of the same type, likely on the same thread: the second must
  // not be answered with the first one's field.
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(RawCall(kDeposit, Len(3, kBad)).error_message(), "idempotency_key: not valid UTF-8");
    EXPECT_NE(RawCall(kDeposit, std::string("\x0a\x7f", 2)).error_message(),
              "idempotency_key: not valid UTF-8");
  }
}

TEST_F(RequestParseErrorsTest, ConcurrentParsesEachNameTheirOwnField) {
  struct Case {
    const char* method;
    std::string body;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {kDeposit, absl::StrCat(Len(1, "acc"), Len(3, kBad)), "idempotency_key: not valid UTF-8"},
      {kDeposit, absl::StrCat(Len(1, kBad), Len(3, "k")), "account_id: not valid UTF-8"},
      {kTransfer, absl::StrCat(Len(1, "a"), Len(2, kBad)), "to_account_id: not valid UTF-8"},
      {kRotate, Len(1, kBad), "token: not valid UTF-8"},
      {kDeposit, std::string("\x0a\x7f", 2),
       absl::StrCat("request: cannot be parsed as the request message of ", kDeposit,
                    " (string fields must be valid UTF-8)")},
  };
  std::vector<std::thread> clients;
  std::mutex mutex;
  int wrong = 0;
  for (int t = 0; t < 8; ++t) {
    clients.emplace_back([&, t] {
      for (int i = 0; i < 100; ++i) {
        const Case& c = cases[(t + i) % cases.size()];
        const grpc::Status status = RawCall(c.method, c.body);
        if (status.error_code() != grpc::StatusCode::INVALID_ARGUMENT ||
            status.error_message() != c.expected) {
          std::lock_guard<std::mutex> lock(mutex);
          ++wrong;
          ADD_FAILURE() << c.method << ": " << status.error_message() << " instead of "
                        << c.expected;
        }
      }
    });
  }
  for (std::thread& client : clients) client.join();
  EXPECT_EQ(wrong, 0);
}

}  // namespace
}  // namespace sessionledger
