#include "server/rpc/async_call.h"

#include <grpcpp/alarm.h>
#include <grpcpp/server_builder.h>

#include <atomic>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/common/clock.h"
#include "server/common/notification.h"

namespace sessionledger {
namespace {

// Stands in for a call: notes each completion handed to it and the thread it ran on.
class RecordingCall final : public AsyncCall {
 public:
  void Proceed(bool ok) override {
    ok_ = ok;
    thread_ = std::this_thread::get_id();
    done_.Notify();
  }
  bool HasRun() const { return done_.HasBeenNotified(); }
  bool WaitFor(absl::Duration timeout) const {
    return done_.WaitForNotificationWithTimeout(timeout);
  }
  bool ok() const { return ok_; }
  std::thread::id thread() const { return thread_; }

 private:
  Notification done_;
  bool ok_ = false;
  std::thread::id thread_;
};

// A started server (no ports: nothing can call it) with AsyncCallQueues served on a thread,
// so the tests drive both queues with alarms.
class AsyncCallQueuesTest : public ::testing::Test {
 protected:
  void Start(absl::Duration sweep) {
    grpc::ServerBuilder builder;
    queues_ = std::make_unique<AsyncCallQueues>(builder.AddCompletionQueue(), sweep);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    serving_ = std::thread([this] { queues_->Run(); });
  }

  // Stops the server, then the queues; true once Run has returned.
  void Stop() {
    if (!serving_.joinable()) return;
    server_->Shutdown();
    server_->Wait();
    queues_->Shutdown();
    serving_.join();
  }

  void TearDown() override { Stop(); }

  // A call that outlives the queues, so that a failed test still drains cleanly.
  RecordingCall& NewCall() { return calls_.emplace_back(); }

  // Completes `call` on `queue` now, as a finished operation of a call would. An alarm already
  // past is posted to the queue inside Set(); one due "now" would go through gRPC's timer
  // thread and could land after whatever the test does next.
  void CompleteNow(grpc::CompletionQueue* queue, RecordingCall& call) {
    alarms_.push_back(std::make_unique<grpc::Alarm>());
    alarms_.back()->Set(queue, gpr_inf_past(GPR_CLOCK_MONOTONIC), call.Tag());
  }

  // A call's answer, announced and completed now, as UnaryCall's Finish does.
  RecordingCall& CompleteAnswer() {
    RecordingCall& answer = NewCall();
    queues_->ExpectAnswer();
    CompleteNow(queues_->answers(), answer);
    return answer;
  }

  std::unique_ptr<AsyncCallQueues> queues_;
  std::unique_ptr<grpc::Server> server_;
  std::thread serving_;
  // Destroyed after the queues are drained.
  std::deque<RecordingCall> calls_;
  std::vector<std::unique_ptr<grpc::Alarm>> alarms_;
};

TEST_F(AsyncCallQueuesTest, AnArrivalIsHandedToItsCallOnTheServingThread) {
  Start(absl::Hours(1));
  RecordingCall& arrival = NewCall();
  CompleteNow(queues_->arrivals(), arrival);
  ASSERT_TRUE(arrival.WaitFor(absl::Seconds(5)));
  EXPECT_TRUE(arrival.ok());
  EXPECT_EQ(arrival.thread(), serving_.get_id());
}

// The point of the second queue: an answer does not wake the serving thread. It is taken
// with the next arrival, which wakes the thread anyway.
TEST_F(AsyncCallQueuesTest, AnAnswerWaitsForTheNextArrivalInsteadOfWakingTheThread) {
  Start(absl::Hours(1));
  RecordingCall& answer = CompleteAnswer();
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_FALSE(answer.HasRun()) << "the serving thread was woken for an answer";

  RecordingCall& arrival = NewCall();
  CompleteNow(queues_->arrivals(), arrival);
  ASSERT_TRUE(arrival.WaitFor(absl::Seconds(5)));
  ASSERT_TRUE(answer.WaitFor(absl::Seconds(5)));
  EXPECT_TRUE(answer.ok());
  EXPECT_EQ(answer.thread(), serving_.get_id());
}

TEST_F(AsyncCallQueuesTest, EveryAnswerExpectedIsTakenWithTheNextArrival) {
  Start(absl::Hours(1));
  constexpr int kAnswers = 20;
  std::vector<RecordingCall*> answers;
  for (int i = 0; i < kAnswers; ++i) answers.push_back(&CompleteAnswer());
  RecordingCall& arrival = NewCall();
  CompleteNow(queues_->arrivals(), arrival);
  ASSERT_TRUE(arrival.WaitFor(absl::Seconds(5)));
  for (int i = 0; i < kAnswers; ++i) {
    EXPECT_TRUE(answers[i]->WaitFor(absl::Seconds(5))) << "answer " << i;
  }
}

// An idle server must still free its last calls.
TEST_F(AsyncCallQueuesTest, AnIdleServerTakesItsAnswersWithinTheSweep) {
  Start(absl::Milliseconds(50));
  absl::SleepFor(absl::Milliseconds(120));  // Mid-wait, not just after a sweep began.
  const absl::Time completed = absl::Now();
  RecordingCall& answer = CompleteAnswer();
  ASSERT_TRUE(answer.WaitFor(absl::Seconds(5))) << "an answer with no arrival after it is kept";
  EXPECT_LT(absl::Now() - completed, absl::Milliseconds(1000));
  EXPECT_EQ(answer.thread(), serving_.get_id());
}

// Completions nobody announced (gRPC's own, which AsyncNext consumes itself) still go with
// the sweep, while the count of expected answers stays right for the ones that follow.
TEST_F(AsyncCallQueuesTest, TheSweepAlsoTakesCompletionsThatWereNotExpected) {
  Start(absl::Seconds(1));
  RecordingCall& unannounced = NewCall();
  CompleteNow(queues_->answers(), unannounced);
  ASSERT_TRUE(unannounced.WaitFor(absl::Seconds(5)));
  // A sweep just ran and the next is a second away: an announced answer must go with the next
  // arrival, as if the unannounced completion had never been.
  RecordingCall& answer = CompleteAnswer();
  RecordingCall& arrival = NewCall();
  CompleteNow(queues_->arrivals(), arrival);
  ASSERT_TRUE(arrival.WaitFor(absl::Seconds(5)));
  EXPECT_TRUE(answer.WaitFor(absl::Milliseconds(500)))
      << "the answer waited for the sweep: the unannounced completion was counted";
}

// A call matched just before its connection closed waits on arrivals() after gRPC's shutdown
// has returned; taken after the queues shut down, the request its arrival makes for the next
// call would abort the process. So the wait for calls also waits for every requested arrival.
TEST_F(AsyncCallQueuesTest, TheWaitForCallsAlsoWaitsForEveryRequestedArrival) {
  Start(absl::Hours(1));
  EXPECT_TRUE(queues_->WaitForCallsAndArrivals(absl::Milliseconds(50)));
  queues_->CallRequested();
  EXPECT_FALSE(queues_->WaitForCallsAndArrivals(absl::Milliseconds(50)));
  queues_->CallArrived();
  EXPECT_TRUE(queues_->WaitForCallsAndArrivals(absl::Milliseconds(50)));
}

// A call still answering after the time it was promised (a store that broke its promise to
// answer by the deadline): the wait says so once, then waits on for it rather than return and
// let the queues shut down under it, and returns once it has ended.
TEST_F(AsyncCallQueuesTest, AWaitPastItsPromiseSaysSoOnceAndWaitsForTheLastCall) {
  Start(absl::Hours(1));
  constexpr absl::Duration kPromised = absl::Milliseconds(50);
  queues_->CallBegan();
  std::atomic<int> overdue_calls{0};
  SteadyTime told_at;  // Written before `told` is notified.
  Notification told;
  Notification returned;
  const SteadyTime began = SteadyNow();  // On the clock the wait keeps its time by.
  std::thread waiting([&] {
    queues_->WaitForEveryCallAndArrival(kPromised, [&] {
      told_at = SteadyNow();
      overdue_calls.fetch_add(1);
      told.Notify();
    });
    returned.Notify();
  });
  // No ASSERT until the thread has been joined: the call ends whatever happened before.
  const bool was_told = told.WaitForNotificationWithTimeout(absl::Seconds(10));
  EXPECT_TRUE(was_told) << "the wait outlived its promise without saying so";
  if (was_told) {
    EXPECT_GE(absl::FromChrono(told_at - began), kPromised) << "said overdue before its time";
  }
  EXPECT_FALSE(returned.WaitForNotificationWithTimeout(absl::Milliseconds(300)))
      << "the wait returned with a call still answering";
  queues_->CallEnded();
  EXPECT_TRUE(returned.WaitForNotificationWithTimeout(absl::Seconds(5)))
      << "the wait went on after the last call ended";
  waiting.join();  // A wait that never returns stays here until ctest's timeout.
  EXPECT_EQ(overdue_calls.load(), 1);
}

TEST_F(AsyncCallQueuesTest, AWaitWithNothingPendingReturnsAtOnceAndNeverSaysOverdue) {
  Start(absl::Hours(1));
  int overdue_calls = 0;
  const absl::Time began = absl::Now();
  queues_->WaitForEveryCallAndArrival(absl::Seconds(30), [&overdue_calls] { ++overdue_calls; });
  EXPECT_LT(absl::Now() - began, absl::Seconds(5)) << "the wait waited with nothing to wait for";
  EXPECT_EQ(overdue_calls, 0);
}

TEST_F(AsyncCallQueuesTest, ShutdownHandsOverWhatIsLeftAndReturns) {
  Start(absl::Hours(1));
  RecordingCall& answer = CompleteAnswer();
  absl::SleepFor(absl::Milliseconds(50));
  ASSERT_FALSE(answer.HasRun());
  Stop();
  EXPECT_TRUE(answer.HasRun()) << "Run returned with an answer left on its queue";
  EXPECT_TRUE(answer.ok());
}

}  // namespace
}  // namespace sessionledger
