#include "server/rpc/call_deadline.h"

#include "gtest/gtest.h"

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

}  // namespace
}  // namespace sessionledger
