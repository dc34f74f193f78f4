#include "server/rpc/call_deadline.h"

#include "gtest/gtest.h"
#include "server/domain/caller_message.h"
#include "server/rpc/status_mapping.h"

namespace sessionledger {
namespace {

const absl::Time kNow = absl::FromUnixSeconds(1'800'000'000);

gpr_timespec RealtimeIn(absl::Duration d) {
  return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                      gpr_time_from_seconds(absl::ToInt64Seconds(d), GPR_TIMESPAN));
}

// Go's and Java's clients send a deadline ~292 years away for "none" (grpc-timeout 2562047H),
// and the protocol allows 99999999H. ServerContext::deadline() wraps such a time into the past
// (std::chrono nanoseconds end in 2262), and every such call failed at once.
TEST(CallerDeadlineTest, AFarDeadlineStaysInTheFuture) {
  const absl::Time now = absl::Now();
  for (const absl::Duration far : {absl::Hours(2562047), absl::Hours(99999999)}) {
    SCOPED_TRACE(absl::FormatDuration(far));
    const absl::Time deadline = CallerDeadline(RealtimeIn(far));
    EXPECT_GT(deadline, now + absl::Hours(24 * 365 * 200));
    EXPECT_EQ(AnswerBy(now, deadline, absl::Seconds(5)),
              now + absl::Seconds(5) - absl::Milliseconds(500));
  }
}

TEST(CallerDeadlineTest, NoDeadlineIsTheInfiniteFutureAndAMonotonicOneIsOnTheWallClock) {
  EXPECT_EQ(CallerDeadline(gpr_inf_future(GPR_CLOCK_MONOTONIC)), absl::InfiniteFuture());
  EXPECT_EQ(CallerDeadline(gpr_inf_future(GPR_CLOCK_REALTIME)), absl::InfiniteFuture());
  const gpr_timespec in_five_seconds =
      gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_seconds(5, GPR_TIMESPAN));
  const absl::Duration left = CallerDeadline(in_five_seconds) - absl::Now();
  EXPECT_GT(left, absl::Seconds(4));
  EXPECT_LE(left, absl::Seconds(5) + absl::Milliseconds(100));  // Clocks read apart.
}

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
  EXPECT_EQ(s.error_message(), kBackingServiceFailed);
  EXPECT_EQ(s.error_details(), "postgres: timed out");
}

// The domain writes these for the caller, who needs them to act (which field, what to send).
TEST(ToGrpcStatusTest, CodesOfTheCallersOwnMistakesKeepTheirCodeAndMessage) {
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  for (const absl::Status& in :
       {absl::InvalidArgumentError("user_id: required"), absl::NotFoundError("token: unknown"),
        absl::AbortedError("version: stale"), absl::PermissionDeniedError("account_id: not yours"),
        absl::FailedPreconditionError("amount: more than the balance"),
        absl::ResourceExhaustedError("user_id: too many bytes"),
        absl::UnauthenticatedError("authorization: missing")}) {
    const grpc::Status out = ToGrpcStatus(in);
    EXPECT_EQ(static_cast<int>(out.error_code()), static_cast<int>(in.code())) << in;
    EXPECT_EQ(out.error_message(), std::string(in.message())) << in;
    EXPECT_EQ(out.error_details(), "") << in;
  }
}

// A backing service's words name hosts, the database user, tables: callers get a generic
// message, and the words travel in error_details to the call's log line (CallObserver).
TEST(ToGrpcStatusTest, FailuresOfTheServerKeepTheBackingServicesWordsFromCallers) {
  const std::string words =
      R"(postgres: connection to server at "db.internal" (10.0.0.7), port 5432 failed: FATAL:  )"
      R"(password authentication failed for user "ledger")";
  for (const absl::StatusCode code : {absl::StatusCode::kUnavailable, absl::StatusCode::kInternal,
                                      absl::StatusCode::kUnknown, absl::StatusCode::kDataLoss}) {
    const grpc::Status out = ToGrpcStatus(absl::Status(code, words));
    EXPECT_EQ(static_cast<int>(out.error_code()), static_cast<int>(code));
    EXPECT_EQ(out.error_message(),
              code == absl::StatusCode::kUnavailable ? kBackingServiceFailed : kInternalFailure)
        << code;
    EXPECT_EQ(out.error_details(), words) << code;
  }
}

TEST(ToGrpcStatusTest, WordsWrittenForCallersReachThemAndTheCauseStaysInTheDetails) {
  const absl::Status cause = absl::UnavailableError("memcached 10.0.0.9:11211: connect timed out");
  const grpc::Status relabelled = ToGrpcStatus(
      ForCallers(absl::StatusCode::kUnavailable, "token: ended on some copies only; retry", cause));
  EXPECT_EQ(relabelled.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(relabelled.error_message(), "token: ended on some copies only; retry");
  EXPECT_EQ(relabelled.error_details(),
            "token: ended on some copies only; retry (memcached 10.0.0.9:11211: connect timed "
            "out)");

  const grpc::Status other_code = ToGrpcStatus(
      ForCallers(absl::StatusCode::kInvalidArgument, "attributes: too large for the store", cause));
  EXPECT_EQ(other_code.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(other_code.error_message(), "attributes: too large for the store");
  EXPECT_EQ(other_code.error_details(),
            "attributes: too large for the store (memcached 10.0.0.9:11211: connect timed out)");

  const grpc::Status own =
      ToGrpcStatus(ForCallers(absl::StatusCode::kUnavailable, "user_id: too busy; retry"));
  EXPECT_EQ(own.error_message(), "user_id: too busy; retry");
  EXPECT_EQ(own.error_details(), "") << "nothing to keep from the caller";
}

}  // namespace
}  // namespace sessionledger
