#include "server/rpc/call_deadline.h"

#include "gtest/gtest.h"
#include "server/rpc/status_mapping.h"

namespace sessionledger {
namespace {

const absl::Time kNow = absl::FromUnixSeconds(1'800'000'000);

TEST(AnswerByTest, LeavesATenthOfTheCallersBudgetForTheReply) {
  EXPECT_EQ(AnswerBy(kNow, kNow + absl::Milliseconds(1500), absl::Seconds(5)),
            kNow + absl::Milliseconds(1350));
}

TEST(AnswerByTest, MarginIsAtLeastFiftyMilliseconds) {
  EXPECT_EQ(AnswerBy(kNow, kNow + absl::Milliseconds(300), absl::Seconds(5)),
            kNow + absl::Milliseconds(250));
}

TEST(AnswerByTest, MarginIsAtMostHalfAShortBudget) {
  EXPECT_EQ(AnswerBy(kNow, kNow + absl::Milliseconds(40), absl::Seconds(5)),
            kNow + absl::Milliseconds(20));
}

TEST(AnswerByTest, MarginIsAtMostHalfASecond) {
  EXPECT_EQ(AnswerBy(kNow, kNow + absl::Seconds(60), absl::Seconds(120)),
            kNow + absl::Seconds(60) - absl::Milliseconds(500));
}

TEST(AnswerByTest, NoCallerDeadlineUsesTheDefaultTimeout) {
  EXPECT_EQ(AnswerBy(kNow, absl::InfiniteFuture(), absl::Seconds(5)),
            kNow + absl::Milliseconds(4500));
}

TEST(AnswerByTest, ADefaultTimeoutShorterThanTheCallersWins) {
  EXPECT_EQ(AnswerBy(kNow, kNow + absl::Seconds(30), absl::Seconds(2)),
            kNow + absl::Milliseconds(1800));
}

TEST(AnswerByTest, ADeadlineInThePastStaysInThePast) {
  EXPECT_LE(AnswerBy(kNow, kNow - absl::Seconds(1), absl::Seconds(5)), kNow);
}

// The server answers before the caller's deadline (AnswerBy), so a backing service that ran
// out of that time is the server's failure to say so, and retryable: UNAVAILABLE, as the
// contract says, never DEADLINE_EXCEEDED (which clients do not retry).
TEST(ToGrpcStatusTest, ADeadlinePassedOnTheWayToABackingServiceIsUnavailable) {
  const grpc::Status s = ToGrpcStatus(absl::DeadlineExceededError("postgres: timed out"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(s.error_message(), "postgres: timed out");
}

TEST(ToGrpcStatusTest, OtherCodesKeepTheirCodeAndMessage) {
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  for (const absl::Status& in :
       {absl::InvalidArgumentError("user_id: required"), absl::NotFoundError("token: unknown"),
        absl::UnavailableError("memcached: down"), absl::AbortedError("version: stale"),
        absl::PermissionDeniedError("account_id: not yours")}) {
    const grpc::Status out = ToGrpcStatus(in);
    EXPECT_EQ(static_cast<int>(out.error_code()), static_cast<int>(in.code())) << in;
    EXPECT_EQ(out.error_message(), std::string(in.message())) << in;
  }
}

}  // namespace
}  // namespace sessionledger
