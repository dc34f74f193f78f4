#include "server/rpc/health.h"

#include <grpcpp/alarm.h>

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/common/thread_name.h"

namespace sessionledger {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

namespace {

// The answer to a name the board does not know. The name is the client's text, up to a whole
// request long; echoed into the grpc-message trailer, a long one made the client refuse the
// trailer (past its metadata limit) instead of reading NOT_FOUND. So only a short printable one
// is named.
std::string UnknownServiceMessage(absl::string_view name) {
  constexpr size_t kMaxShownName = 128;
  const bool shown = name.size() <= kMaxShownName &&
                     std::all_of(name.begin(), name.end(),
                                 [](char c) { return c >= 0x20 && c <= 0x7E && c != '\''; });
  return shown ? absl::StrCat("service: unknown service name '", name, "'")
               : "service: unknown service name";
}

}  // namespace

HealthBoard::HealthBoard() {
  // NOT_SERVING until the first probe says otherwise.
  statuses_[""] = HealthCheckResponse::SERVING;
  statuses_[kSessionServiceName] = HealthCheckResponse::NOT_SERVING;
  statuses_[kTransactionServiceName] = HealthCheckResponse::NOT_SERVING;
}

void HealthBoard::Set(const std::string& service, bool serving) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (shutting_down_) return;
  const ServingStatus next =
      serving ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
  ServingStatus& current = statuses_[service];
  if (current == next) return;
  current = next;
  // Only this service's watchers: one of an unknown name is never woken by the others'.
  auto watching = watchers_.find(service);
  if (watching == watchers_.end()) return;
  for (Watcher* watcher : watching->second) watcher->Changed();
}

std::optional<HealthBoard::ServingStatus> HealthBoard::Get(const std::string& service) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = statuses_.find(service);
  if (it == statuses_.end()) return std::nullopt;
  return it->second;
}

void HealthBoard::Shutdown() {
  std::lock_guard<std::mutex> lock(mutex_);
  // ServerApp shuts the board down again when it is destroyed, possibly after the completion
  // queue that watchers' alarms go to has shut down; a second round of wake-ups must not happen.
  if (shutting_down_) return;
  shutting_down_ = true;
  for (auto& [name, status] : statuses_) status = HealthCheckResponse::NOT_SERVING;
  for (auto& [name, watchers] : watchers_) {
    for (Watcher* watcher : watchers) watcher->Changed();
  }
}

bool HealthBoard::shutting_down() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return shutting_down_;
}

void HealthBoard::EndWatches() {
  Shutdown();
  std::lock_guard<std::mutex> lock(mutex_);
  if (watches_ending_) return;  // As for Shutdown: one round of wake-ups only.
  watches_ending_ = true;
  for (auto& [name, watchers] : watchers_) {
    for (Watcher* watcher : watchers) watcher->Changed();
  }
}

bool HealthBoard::watches_ending() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return watches_ending_;
}

void HealthBoard::AddWatcher(const std::string& service, Watcher* watcher) {
  std::lock_guard<std::mutex> lock(mutex_);
  watchers_[service].insert(watcher);
}

void HealthBoard::RemoveWatcher(const std::string& service, Watcher* watcher) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto watching = watchers_.find(service);
  if (watching == watchers_.end()) return;
  watching->second.erase(watcher);
  // Names are the callers' choice: an entry per name ever watched would grow without bound.
  if (watching->second.empty()) watchers_.erase(watching);
}

size_t HealthBoard::watchers() const {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t count = 0;
  for (const auto& [name, watchers] : watchers_) count += watchers.size();
  return count;
}

grpc::Status HealthService::Check(grpc::ServerContext*, const HealthCheckRequest* request,
                                  HealthCheckResponse* response) {
  std::optional<HealthBoard::ServingStatus> status = board_.Get(request->service());
  if (!status.has_value()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, UnknownServiceMessage(request->service()));
  }
  response->set_status(*status);
  return grpc::Status::OK;
}

// One Watch stream on gRPC's asynchronous API: requested on the arrivals queue and bound to it,
// so that every event of the call runs on the serving thread, one at a time, and needs no lock.
// The one exception is Changed(), run by whichever thread changes the board: it only sets an
// alarm that fires at once on the same queue, which brings the call back to the serving thread
// to look at the board. Between changes nothing of the stream runs.
//
// The call deletes itself once nothing of it is outstanding any more: its Finish has completed,
// the done notification has come (it always does once the call has arrived), it has left the
// board, and no alarm is in flight. Each kind of operation completes with its own tag
// (Operation), since AsyncCallQueues hands a completion to the AsyncCall that is its tag.
class HealthService::WatchCall final : public HealthBoard::Watcher {
 public:
  WatchCall(HealthService& service, AsyncCallQueues& queues)
      : service_(service), queues_(queues), writer_(&context_) {
    // Before the request, as gRPC requires: the notification then comes for every call that
    // arrives, cancelled or not, and for none that does not.
    context_.AsyncNotifyWhenDone(done_op_.Tag());
    queues_.CallRequested();
    service_.RequestWatch(&context_, &request_, &writer_, queues_.arrivals(), queues_.arrivals(),
                          arrived_op_.Tag());
  }

  WatchCall(const WatchCall&) = delete;
  WatchCall& operator=(const WatchCall&) = delete;

  void Changed() override {
    // One alarm in flight carries every change made before it fires (the call reads the board
    // then); and an alarm must not be set again before its completion has come back.
    if (alarm_set_.exchange(true, std::memory_order_acq_rel)) return;
    // A deadline already past completes the alarm inside Set, without gRPC's timer thread.
    alarm_.Set(queues_.arrivals(), gpr_inf_past(GPR_CLOCK_MONOTONIC), alarm_op_.Tag());
  }

 private:
  enum class Event { kArrived, kWritten, kAlarm, kDone, kFinished };

  class Operation final : public AsyncCall {
   public:
    Operation(WatchCall& call, Event event) : call_(call), event_(event) {}
    // May delete the call, and so this operation: nothing may follow.
    void Proceed(bool ok) override { call_.OnEvent(event_, ok); }

   private:
    WatchCall& call_;
    const Event event_;
  };

  ~WatchCall() {
    if (arrived_ok_) queues_.CallEnded();
  }

  void OnEvent(Event event, bool ok) {
    switch (event) {
      case Event::kArrived:
        if (!ok) {
          // The server is shutting down before a call came: no other event will come.
          queues_.CallArrived();
          delete this;
          return;
        }
        arrived_ok_ = true;
        queues_.CallBegan();
        new WatchCall(service_, queues_);  // The next caller.
        queues_.CallArrived();             // Only now: see UnaryCall::Proceed.
        service_.board_.AddWatcher(request_.service(), this);
        break;
      case Event::kWritten:
        writing_ = false;
        if (!ok) client_gone_ = true;
        break;
      case Event::kAlarm:
        // Before reading the board: a change after this sets a new alarm.
        alarm_set_.store(false, std::memory_order_release);
        break;
      case Event::kDone:
        done_notified_ = true;
        if (context_.IsCancelled()) client_gone_ = true;
        break;
      case Event::kFinished:
        finished_ = true;
        break;
    }
    SendWhatIsDue();
    if (finished_ && done_notified_ && !alarm_set_.load(std::memory_order_acquire)) {
      // Left the board when it began finishing: no alarm can be set any more.
      delete this;
    }
  }

  // Writes the service's status if it differs from the last one sent, or ends the stream. One
  // write at a time: changes during a write are read here once it has completed, and only the
  // latest is sent.
  void SendWhatIsDue() {
    if (writing_ || finishing_) return;
    if (client_gone_) {
      // Nobody reads it, but the interceptors see the call end (the log line, the in-flight
      // gauge), as for every other call.
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"), std::nullopt);
      return;
    }
    if (service_.board_.watches_ending()) {
      // A stream that outlived shutdown would hold the drain for the whole grace period; it ends
      // with NOT_SERVING sent, and the client's next Watch meets a server that takes no calls
      // (see HealthBoard::Shutdown).
      std::optional<HealthBoard::ServingStatus> last;
      if (last_sent_ != HealthCheckResponse::NOT_SERVING) last = HealthCheckResponse::NOT_SERVING;
      Finish(grpc::Status::OK, last);
      return;
    }
    const HealthBoard::ServingStatus now =
        service_.board_.Get(request_.service()).value_or(HealthCheckResponse::SERVICE_UNKNOWN);
    if (last_sent_ == now) return;
    last_sent_ = now;
    response_.set_status(now);
    writing_ = true;
    writer_.Write(response_, written_op_.Tag());
  }

  // Ends the stream, after a last message when there is one.
  void Finish(const grpc::Status& status, std::optional<HealthBoard::ServingStatus> last) {
    finishing_ = true;
    // Nothing more to send, so nothing to be woken for: leave the board now.
    service_.board_.RemoveWatcher(request_.service(), this);
    if (last.has_value()) {
      last_sent_ = *last;
      response_.set_status(*last);
      writer_.WriteAndFinish(response_, grpc::WriteOptions(), status, finished_op_.Tag());
      return;
    }
    writer_.Finish(status, finished_op_.Tag());
  }

  HealthService& service_;
  AsyncCallQueues& queues_;
  grpc::ServerContext context_;
  HealthCheckRequest request_;
  HealthCheckResponse response_;  // Sent by the write in flight; kept until it completes.
  grpc::ServerAsyncWriter<HealthCheckResponse> writer_;
  grpc::Alarm alarm_;
  // Set by Changed() when it sets the alarm, cleared on the serving thread when the alarm fires.
  std::atomic<bool> alarm_set_{false};
  Operation arrived_op_{*this, Event::kArrived};
  Operation written_op_{*this, Event::kWritten};
  Operation alarm_op_{*this, Event::kAlarm};
  Operation done_op_{*this, Event::kDone};
  Operation finished_op_{*this, Event::kFinished};
  // The rest is only touched on the serving thread.
  bool arrived_ok_ = false;
  bool writing_ = false;
  bool finishing_ = false;
  bool finished_ = false;
  bool done_notified_ = false;
  bool client_gone_ = false;
  std::optional<HealthBoard::ServingStatus> last_sent_;
};

void HealthService::Accept(AsyncCallQueues& queues, int accepting) {
  for (int i = 0; i < accepting; ++i) new WatchCall(*this, queues);
}

HealthMonitor::HealthMonitor(HealthBoard& board, Probes probes, absl::Duration interval,
                             Logger& logger)
    : board_(board), probes_(std::move(probes)), interval_(interval), logger_(logger) {
  thread_ = std::thread([this] {
    NameThisThread("sl-health-probe");
    Run();
  });
}

HealthMonitor::~HealthMonitor() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  stop_cv_.notify_all();
  thread_.join();
}

void HealthMonitor::ProbeOnce() {
  std::lock_guard<std::mutex> round(round_mutex_);
  const bool memcached_ok = probes_.memcached_ok();
  const bool postgres_ok = probes_.postgres_ok();
  board_.Set(kSessionServiceName, memcached_ok);
  board_.Set(kTransactionServiceName, memcached_ok && postgres_ok);
  std::lock_guard<std::mutex> lock(mutex_);
  if (memcached_ok != last_memcached_ok_) {
    logger_.Log(memcached_ok ? LogLevel::kInfo : LogLevel::kWarn,
                memcached_ok ? "memcached reachable again" : "memcached unreachable");
    last_memcached_ok_ = memcached_ok;
  }
  if (postgres_ok != last_postgres_ok_) {
    logger_.Log(postgres_ok ? LogLevel::kInfo : LogLevel::kWarn,
                postgres_ok ? "postgres reachable again" : "postgres unreachable");
    last_postgres_ok_ = postgres_ok;
  }
}

void HealthMonitor::Run() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    stop_cv_.wait_for(lock, absl::ToChronoMilliseconds(interval_), [this] { return stop_; });
    if (stop_) break;
    lock.unlock();
    ProbeOnce();
    lock.lock();
  }
}

}  // namespace sessionledger
