#include "server/rpc/protobuf_log.h"

#include <google/protobuf/stubs/logging.h>
#include <stdio.h>
#include <unistd.h>

#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "sessionledger/v1/session.pb.h"
#include "sessionledger/v1/transaction.pb.h"
#include "tests/support/captured_log.h"

namespace sessionledger {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

using ::sessionledger::testing::CapturedLog;

// A TransferRequest whose idempotency_key (field 4) is not UTF-8, in wire format.
std::string BadTransfer() {
  return absl::StrCat(
      "\x0a\x01"
      "a",
      "\x12\x01"
      "b",
      "\x18\x05",
      "\x22\x02"
      "\xc3\x28");
}

TEST(ProtobufLogTest, AParseOnThisThreadRecordsTheField) {
  CapturedLog log;
  const ProtobufLogToLogger redirect(log.logger());
  EXPECT_EQ(TakeUtf8ParseComplaint(), std::nullopt);

  v1::TransferRequest transfer;
  EXPECT_FALSE(transfer.ParseFromString(BadTransfer()));
  EXPECT_EQ(TakeUtf8ParseComplaint(), "sessionledger.v1.TransferRequest.idempotency_key");
  EXPECT_EQ(TakeUtf8ParseComplaint(), std::nullopt) << "taking clears the memo";

  // A map key: the field protobuf names is the map entry's.
  v1::CreateSessionRequest create;
  EXPECT_FALSE(create.ParseFromString(std::string("\x1a\x05\x0a\x01\xff\x12\x00", 7)));
  EXPECT_EQ(TakeUtf8ParseComplaint(), "sessionledger.v1.CreateSessionRequest.AttributesEntry.key");

  // The latest complaint wins.
  EXPECT_FALSE(create.ParseFromString(std::string("\x0a\x01\xff", 3)));
  EXPECT_FALSE(transfer.ParseFromString(BadTransfer()));
  EXPECT_EQ(TakeUtf8ParseComplaint(), "sessionledger.v1.TransferRequest.idempotency_key");

  // Other parse failures leave no memo.
  EXPECT_FALSE(transfer.ParseFromString(std::string("\x0a\x7f", 2)));
  EXPECT_EQ(TakeUtf8ParseComplaint(), std::nullopt);

  // The complaint went to the logger, at debug level, without the invalid bytes.
  const std::string output = log.Read();
  EXPECT_THAT(output, AllOf(HasSubstr(R"("level":"debug")"), HasSubstr(R"("source":"protobuf")"),
                            HasSubstr("'sessionledger.v1.TransferRequest.idempotency_key' "
                                      "contains invalid UTF-8 data when parsing")));
  EXPECT_THAT(output, ::testing::Not(HasSubstr("\xc3\x28")));
}

TEST(ProtobufLogTest, AnotherThreadsParseDoesNotShowOnThisThread) {
  CapturedLog log;
  const ProtobufLogToLogger redirect(log.logger());
  std::optional<std::string> on_the_other_thread;
  std::thread other([&] {
    v1::TransferRequest transfer;
    EXPECT_FALSE(transfer.ParseFromString(BadTransfer()));
    on_the_other_thread = TakeUtf8ParseComplaint();
  });
  other.join();
  EXPECT_EQ(on_the_other_thread, "sessionledger.v1.TransferRequest.idempotency_key");
  EXPECT_EQ(TakeUtf8ParseComplaint(), std::nullopt);

  // And the other way round: this thread's memo stays here while other threads parse.
  v1::DeleteSessionRequest request;
  EXPECT_FALSE(request.ParseFromString(std::string("\x0a\x01\xff", 3)));
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([] {
      v1::TransferRequest transfer;
      for (int k = 0; k < 100; ++k) EXPECT_FALSE(transfer.ParseFromString(BadTransfer()));
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(TakeUtf8ParseComplaint(), "sessionledger.v1.DeleteSessionRequest.token");
}

TEST(ProtobufLogTest, OtherLinesAreForwardedWithTheirLevel) {
  CapturedLog log;
  {
    const ProtobufLogToLogger redirect(log.logger());
    GOOGLE_LOG(WARNING) << "a warning from protobuf";
    GOOGLE_LOG(ERROR) << "an error from protobuf";
    // The same complaint while serializing is about our own message: an error, and no memo.
    v1::Session session;
    session.set_user_id(std::string("\xff", 1));
    (void)session.SerializeAsString();
    EXPECT_EQ(TakeUtf8ParseComplaint(), std::nullopt);
  }
  const std::string output = log.Read();
  EXPECT_THAT(output,
              HasSubstr(R"("level":"warn","msg":"a warning from protobuf","source":"protobuf")"));
  EXPECT_THAT(output,
              HasSubstr(R"("level":"error","msg":"an error from protobuf","source":"protobuf")"));
  EXPECT_THAT(output, HasSubstr(absl::StrCat(R"("level":"error","msg":"String field )",
                                             "'sessionledger.v1.Session.user_id' contains "
                                             "invalid UTF-8 data when serializing")));
  EXPECT_THAT(output, HasSubstr(R"("file":")"));
}

// The handler before is restored at the end, and no memo is kept without a redirect.
std::vector<std::string>* previous_handler_lines = nullptr;
void PreviousHandler(google::protobuf::LogLevel, const char*, int, const std::string& message) {
  if (previous_handler_lines != nullptr) previous_handler_lines->push_back(message);
}

TEST(ProtobufLogTest, TheEndRestoresThePreviousHandler) {
  std::vector<std::string> lines;
  previous_handler_lines = &lines;
  google::protobuf::LogHandler* const original = google::protobuf::SetLogHandler(&PreviousHandler);
  CapturedLog log;
  {
    const ProtobufLogToLogger redirect(log.logger());
    GOOGLE_LOG(WARNING) << "during";
  }
  GOOGLE_LOG(WARNING) << "after";
  v1::TransferRequest transfer;
  EXPECT_FALSE(transfer.ParseFromString(BadTransfer()));
  EXPECT_EQ(TakeUtf8ParseComplaint(), std::nullopt);
  google::protobuf::SetLogHandler(original);
  previous_handler_lines = nullptr;

  EXPECT_THAT(log.Read(), AllOf(HasSubstr("during"), ::testing::Not(HasSubstr("after"))));
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0], "after");
  EXPECT_THAT(lines[1], HasSubstr("invalid UTF-8 data when parsing"));
}

}  // namespace
}  // namespace sessionledger
