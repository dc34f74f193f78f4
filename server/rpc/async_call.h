#ifndef SESSIONLEDGER_SERVER_RPC_ASYNC_CALL_H_
#define SESSIONLEDGER_SERVER_RPC_ASYNC_CALL_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>

#include "absl/functional/function_ref.h"
#include "absl/time/time.h"
#include "server/common/tsan_handoff.h"

namespace sessionledger {

// A call served on gRPC's asynchronous API: its address is the tag of every operation it
// starts on a completion queue, and the queue's thread hands each completion back to it.
class AsyncCall {
 public:
  virtual ~AsyncCall() = default;
  // One operation of this call completed (`ok` false: the server is shutting down or the call
  // was cancelled). The call may delete itself.
  virtual void Proceed(bool ok) = 0;

  // The tag for an operation this call starts: itself, marked as handed over, since gRPC gives
  // it back on the serving thread (AsyncCallQueues::Run marks it received).
  void* Tag() {
    MarkHandedOver(this);
    return this;
  }
};

// The completion queues of the asynchronous methods, served by one thread (Run).
//
// Calls are requested on `arrivals()`, a server queue, and bound to `answers()`, where their
// Finish completes. The answers are sent from the store's I/O thread; if the serving thread
// slept on the queue they complete on, it would be woken once more per call only to delete
// the call. Nobody sleeps on `answers()`: the serving thread takes what has completed there
// each time it wakes for an arrival anyway, and at least every `sweep`, so that an idle
// server still frees its last calls (and gRPC's own events on them) within that time.
class AsyncCallQueues {
 public:
  explicit AsyncCallQueues(std::unique_ptr<grpc::ServerCompletionQueue> arrivals,
                           absl::Duration sweep = absl::Milliseconds(100));
  AsyncCallQueues(const AsyncCallQueues&) = delete;
  AsyncCallQueues& operator=(const AsyncCallQueues&) = delete;

  grpc::ServerCompletionQueue* arrivals() { return arrivals_.get(); }
  grpc::CompletionQueue* answers() { return &answers_; }

  // Call before starting an operation whose AsyncCall tag completes on answers(): it makes
  // the serving thread look there as soon as it next wakes.
  void ExpectAnswer() { expected_answers_.fetch_add(1, std::memory_order_release); }

  // Hands every completion of both queues to its AsyncCall until Shutdown, then drains them.
  // Run it on exactly one thread.
  void Run();

  // A call was requested on arrivals() (before the request: its arrival, ok or not, will
  // come back), or its arrival was taken.
  void CallRequested() { calls_requested_.fetch_add(1, std::memory_order_relaxed); }
  void CallArrived() { calls_requested_.fetch_sub(1, std::memory_order_release); }
  // A call began answering (it will start its answer on answers()), or ended (deleted).
  void CallBegan() { calls_answering_.fetch_add(1, std::memory_order_relaxed); }
  void CallEnded() { calls_answering_.fetch_sub(1, std::memory_order_release); }
  // Waits until every call that began has ended, or for `timeout` (then false).
  bool WaitForCallsToEnd(absl::Duration timeout) const;
  // After the server has shut down, before Shutdown: WaitForCallsToEnd, and also until every
  // requested call's arrival has been taken. gRPC's shutdown ends with the connections, not
  // with these calls: one whose client cancelled it may still wait on a store, and an arrival
  // may still wait on arrivals() (a call matched just before its connection closed). An answer,
  // or the request for the next call that an arrival makes, started on a queue already shut
  // down aborts the process in gRPC. (While the server runs, calls are always requested; once
  // it has shut down, every outstanding request comes back at once, ok false.)
  bool WaitForCallsAndArrivals(absl::Duration timeout) const;
  // WaitForCallsAndArrivals for `promised`, the longest the calls may take; if some are still
  // there then, calls `overdue` once (to say so) and waits on without limit, since shutting the
  // queues down under them would abort or crash the process when they answer late. Whoever
  // stops the process can still end it meanwhile (a second stop signal, the orchestrator's
  // kill). Returns once every call and arrival has ended.
  void WaitForEveryCallAndArrival(absl::Duration promised, absl::FunctionRef<void()> overdue) const;
  // Once the server has finished every call (no operation will start on either queue any
  // more): makes Run drain both queues and return.
  void Shutdown() { arrivals_->Shutdown(); }

 private:
  // Takes what has completed on answers_: while answers are expected, or (`everything`) until
  // the queue is empty.
  void TakeAnswers(bool everything);
  // One completion was taken from answers_: one answer fewer expected.
  void AnswerTaken();

  const std::unique_ptr<grpc::ServerCompletionQueue> arrivals_;
  grpc::CompletionQueue answers_;
  const absl::Duration sweep_;
  // Answers started and not yet taken from answers_.
  std::atomic<int64_t> expected_answers_{0};
  // Calls between CallBegan and CallEnded.
  std::atomic<int64_t> calls_answering_{0};
  // Calls between CallRequested and CallArrived.
  std::atomic<int64_t> calls_requested_{0};
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_ASYNC_CALL_H_
