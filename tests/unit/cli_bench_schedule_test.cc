#include <chrono>

#include "client/bench.h"
#include "gtest/gtest.h"

namespace sessionledger::client {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

const Clock::time_point kStart{};
constexpr milliseconds kInterval{20};

// A call not due yet goes to the pacer, which times it from when it really starts it.
TEST(PlanPacedCallTest, ACallNotDueYetWaitsAndKeepsTheSchedule) {
  const PacedCall plan = PlanPacedCall(false, kStart + milliseconds(5), kStart, kInterval);
  EXPECT_TRUE(plan.wait);
  EXPECT_EQ(plan.next_due, kStart + milliseconds(25));
}

// Late because the previous call was slow: the wait is the server's, so it counts (no
// coordinated omission), and the schedule stays fixed.
TEST(PlanPacedCallTest, ALateCallAfterASlowOneCountsFromWhenItWasDue) {
  const PacedCall plan = PlanPacedCall(false, kStart, kStart + milliseconds(300), kInterval);
  EXPECT_FALSE(plan.wait);
  EXPECT_EQ(plan.timed_from, kStart);
  EXPECT_EQ(plan.next_due, kStart + kInterval);
}

// Late because the client took long to start its slots: neither this call nor the ones after
// it may carry that lateness.
TEST(PlanPacedCallTest, ALateFirstCallCountsFromNowAndStartsTheScheduleOver) {
  const Clock::time_point now = kStart + milliseconds(300);
  const PacedCall first = PlanPacedCall(true, kStart, now, kInterval);
  EXPECT_FALSE(first.wait);
  EXPECT_EQ(first.timed_from, now);
  EXPECT_EQ(first.next_due, now + kInterval);
  // Its next call, reached in time, waits for its turn on the new schedule instead of
  // starting at once, late by 300 ms.
  const PacedCall second = PlanPacedCall(false, first.next_due, now + milliseconds(1), kInterval);
  EXPECT_TRUE(second.wait);
  EXPECT_EQ(second.next_due, now + 2 * kInterval);
}

}  // namespace
}  // namespace sessionledger::client
