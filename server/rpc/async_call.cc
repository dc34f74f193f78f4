#include "server/rpc/async_call.h"

#include "absl/time/clock.h"
#include "server/common/clock.h"
#include "server/common/tsan_handoff.h"

namespace sessionledger {
namespace {

// A tag a queue returned, as the AsyncCall that gave it (AsyncCall::Tag).
AsyncCall* Received(void* tag) {
  MarkReceived(tag);
  return static_cast<AsyncCall*>(tag);
}

// Polls `done` until it says yes or `timeout` passes; whether it said yes. Only at shutdown, so
// a poll: the calls' own path stays free of locks and signals.
template <typename Done>
bool WaitUntil(absl::Duration timeout, Done done) {
  const SteadyTime give_up = SteadyNow() + ToSteadyDuration(timeout);
  while (!done()) {
    if (SteadyNow() >= give_up) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

}  // namespace

AsyncCallQueues::AsyncCallQueues(std::unique_ptr<grpc::ServerCompletionQueue> arrivals,
                                 absl::Duration sweep)
    : arrivals_(std::move(arrivals)), sweep_(sweep) {}

void AsyncCallQueues::Run() {
  void* tag = nullptr;
  bool ok = false;
  for (;;) {
    const grpc::CompletionQueue::NextStatus got =
        arrivals_->AsyncNext(&tag, &ok, absl::ToChronoTime(absl::Now() + sweep_));
    if (got == grpc::CompletionQueue::SHUTDOWN) break;
    if (got == grpc::CompletionQueue::GOT_EVENT) Received(tag)->Proceed(ok);
    TakeAnswers(/*everything=*/got == grpc::CompletionQueue::TIMEOUT);
  }
  answers_.Shutdown();
  while (answers_.Next(&tag, &ok)) {
    AnswerTaken();
    Received(tag)->Proceed(ok);
  }
}

bool AsyncCallQueues::WaitForCallsToEnd(absl::Duration timeout) const {
  return WaitUntil(timeout,
                   [this] { return calls_answering_.load(std::memory_order_acquire) == 0; });
}

bool AsyncCallQueues::WaitForCallsAndArrivals(absl::Duration timeout) const {
  // Requested first: once the server is down, it reaches zero only after every arrival has
  // counted itself as answering, and nothing raises either count afterwards. Read the other way
  // round, an arrival could begin answering between the two reads and be missed.
  return WaitUntil(timeout, [this] {
    return calls_requested_.load(std::memory_order_acquire) == 0 &&
           calls_answering_.load(std::memory_order_acquire) == 0;
  });
}

void AsyncCallQueues::WaitForEveryCallAndArrival(absl::Duration promised,
                                                 absl::FunctionRef<void()> overdue) const {
  if (WaitForCallsAndArrivals(promised)) return;
  overdue();
  // A wait without limit, in finite steps: steady time points must stay finite.
  while (!WaitForCallsAndArrivals(kLongestSteadyWait)) {
  }
}

void AsyncCallQueues::TakeAnswers(bool everything) {
  void* tag = nullptr;
  bool ok = false;
  // A zero deadline only takes what is there. gRPC's events of its own on these calls are
  // consumed inside AsyncNext and never returned, so they are not counted.
  while (everything || expected_answers_.load(std::memory_order_acquire) > 0) {
    if (answers_.AsyncNext(&tag, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC)) !=
        grpc::CompletionQueue::GOT_EVENT) {
      return;
    }
    AnswerTaken();
    Received(tag)->Proceed(ok);
  }
}

void AsyncCallQueues::AnswerTaken() {
  // Never below zero: a sweep may take a completion nobody announced, and counting it would
  // make the next announced answer wait for a sweep instead of the next arrival.
  int64_t expected = expected_answers_.load(std::memory_order_relaxed);
  while (expected > 0 && !expected_answers_.compare_exchange_weak(expected, expected - 1,
                                                                  std::memory_order_relaxed)) {
  }
}

}  // namespace sessionledger
