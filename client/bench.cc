#include "client/bench.h"

#include <grpcpp/client_context.h>
#include <grpcpp/completion_queue.h>
#include <grpcpp/support/async_unary_call.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <queue>
#include <thread>
#include <vector>

#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/channel.h"
#include "client/commands.h"
#include "client/latency_histogram.h"
#include "client/output_format.h"
#include "client/process_cpu.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "sessionledger/v1/session.grpc.pb.h"
#include "sessionledger/v1/transaction.grpc.pb.h"

namespace sessionledger::client {
namespace {

using grpc::health::v1::Health;
using std::chrono::steady_clock;
using v1::SessionService;
using v1::TransactionService;

constexpr size_t kStatusCodes = 17;
// Every session the generator creates, prepared or measured, asks for the server's default
// idle timeout (SESSION_TTL_SECONDS). An explicit TTL is refused (INVALID_ARGUMENT) by a
// server whose SESSION_MAX_LIFETIME_SECONDS is below it, and the server refuses to start with
// a default above its maximum, so the default is the one TTL every server accepts. Its 1800 s
// outlive any usual run (a shorter one is the operator's choice). Measured sessions stay as
// long; Memcached evicts the oldest when full, and scripts/bench flushes it between rows.
constexpr int64_t kServerDefaultTtl = 0;
// Enough for any run: a transfer moves one minor unit.
constexpr int64_t kInitialDeposit = int64_t{1} << 40;

std::chrono::system_clock::time_point DeadlineFrom(absl::Duration d) {
  return std::chrono::system_clock::now() + absl::ToChronoNanoseconds(d);
}

// The code is the one the CLI exits with when preparing the run fails.
absl::Status FromGrpc(const grpc::Status& s, const std::string& what) {
  return absl::Status(static_cast<absl::StatusCode>(ExitCodeForStatus(s)),
                      absl::StrCat(what, ": ", StatusCodeName(s.error_code()), ": ",
                                   EscapeForTerminal(s.error_message())));
}

// The CPU time of this process and of each --cpu-of entry at one moment; a reading that failed
// holds why.
struct CpuSample {
  absl::StatusOr<absl::Duration> client;
  std::vector<absl::StatusOr<std::vector<ProcessCpu>>> entries;
};

CpuSample SampleCpu(const std::vector<CpuOf>& cpu_of) {
  CpuSample sample{SelfCpuTime(), {}};
  for (const CpuOf& entry : cpu_of) sample.entries.push_back(ReadProcessesCpu(entry.pids));
  return sample;
}

absl::StatusOr<absl::Duration> Difference(absl::Duration start, absl::Duration end) {
  return end - start;
}
absl::StatusOr<absl::Duration> Difference(const std::vector<ProcessCpu>& start,
                                          const std::vector<ProcessCpu>& end) {
  return CpuUsedBetween(start, end);
}

template <typename Reading>
absl::StatusOr<absl::Duration> CpuUsed(const absl::StatusOr<Reading>& start,
                                       const absl::StatusOr<Reading>& end) {
  for (const auto& [reading, when] : {std::pair{&start, "start"}, std::pair{&end, "end"}}) {
    if (!reading->ok()) {
      return absl::Status(
          reading->status().code(),
          absl::StrCat(reading->status().message(), " at the ", when, " of the measured phase"));
    }
  }
  return Difference(*start, *end);
}

CpuPerCall PerCall(const std::string& name, const absl::StatusOr<absl::Duration>& used,
                   uint64_t calls) {
  CpuPerCall result{name, std::nullopt, ""};
  if (!used.ok()) {
    result.unavailable = std::string(used.status().message());
  } else if (calls == 0) {
    result.unavailable = "no calls were measured";
  } else {
    result.us_per_call = absl::ToDoubleMicroseconds(*used) / static_cast<double>(calls);
  }
  return result;
}

class LoadGenerator {
 public:
  LoadGenerator(const BenchOptions& options, const std::string& target,
                const ChannelOptions& base_channel_options, absl::Duration call_deadline)
      : options_(options), call_deadline_(call_deadline) {
    absl::BitGen gen;
    run_id_ = absl::StrFormat("%08x", absl::Uniform<uint32_t>(gen));
    // More connections than slots would leave the extra ones idle while the report counted
    // them, so there are never more connections than slots.
    const int connections =
        std::min(options.concurrency, options.connections > 0 ? options.connections : 4);
    for (int i = 0; i < connections; ++i) {
      ChannelOptions channel_options = base_channel_options;
      channel_options.enable_retries = false;
      channel_options.connection_index = i + 1;
      auto channel = MakeChannel(target, channel_options);
      health_.push_back(Health::NewStub(channel));
      sessions_.push_back(SessionService::NewStub(channel));
      ledger_.push_back(TransactionService::NewStub(channel));
    }
    const int shards = std::min(options.concurrency, kMaxLatencyShards);
    for (int i = 0; i < shards; ++i) latency_shards_.push_back(std::make_unique<LatencyShard>());
    for (int i = 0; i < options.concurrency; ++i) {
      auto slot = std::make_unique<Slot>();
      slot->index = i;
      slot->connection = static_cast<size_t>(i) % health_.size();
      slot->latency_shard = latency_shards_[static_cast<size_t>(i % shards)].get();
      slots_.push_back(std::move(slot));
    }
  }

  int connections() const { return static_cast<int>(health_.size()); }

  // Synchronous set-up calls; the first failure aborts the run.
  absl::Status Prepare() {
    for (auto& slot : slots_) {
      absl::Status s = PrepareSlot(*slot);
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }

  BenchResult Run(std::ostream& progress) {
    const bool counted = options_.requests > 0;
    const bool paced = options_.rate > 0;
    // An unpaced timed run measures from when every slot has its first call out, even with
    // --warmup 0: starting 20,000 slots takes seconds, which would otherwise stretch the
    // measured window past --duration. A paced run only queues its slots here (the schedule
    // starts their calls), and a counted run counts every call, so both measure from the start.
    const bool warm_first = !counted && (options_.warmup > absl::ZeroDuration() || !paced);
    phase_.store(warm_first ? kWarmup : kMeasure);
    active_ = static_cast<int>(slots_.size());
    const steady_clock::time_point run_start = steady_clock::now();
    steady_clock::time_point measure_start = run_start;
    CpuSample cpu_start = SampleCpu(options_.cpu_of);
    if (paced) {
      // Stagger the slots' schedules evenly over one interval. The option parser bounds the
      // rate from below, so the interval fits in int64 nanoseconds; each slot's offset is
      // computed in double, as interval_ * index could overflow.
      interval_ = std::chrono::nanoseconds(
          static_cast<int64_t>(1e9 * static_cast<double>(options_.concurrency) / options_.rate));
      for (auto& slot : slots_) {
        slot->next_start = run_start + std::chrono::nanoseconds(static_cast<int64_t>(
                                           1e9 * static_cast<double>(slot->index) / options_.rate));
      }
      pacer_ = std::thread([this] { RunPacer(); });
      completer_ = std::thread([this] { RunCompleter(); });
    }
    for (auto& slot : slots_) {
      if (!ClaimIteration()) {
        FinishSlot();
        continue;
      }
      StartIteration(*slot);
    }
    if (warm_first) {
      if (options_.warmup > absl::ZeroDuration()) Wait(options_.warmup, "warm-up", progress);
      phase_.store(kMeasure);
      measure_start = steady_clock::now();
      cpu_start = SampleCpu(options_.cpu_of);
    }
    if (counted) {
      Wait(absl::InfiniteDuration(), "measure", progress);
    } else {
      Wait(options_.duration, "measure", progress);
    }
    phase_.store(kStop);
    const steady_clock::time_point measure_end = steady_clock::now();
    // At once: a call that ends from now on is in no other figure either.
    const Unfinished unfinished = UnfinishedAt(measure_end);
    const CpuSample cpu_end = SampleCpu(options_.cpu_of);
    // The calls still out no longer count, and waiting for them would hold the report back
    // until each one ended by itself: up to --deadline against a server that stopped answering.
    CancelCalls();
    if (pacer_.joinable()) {
      // Slots waiting for their turn would otherwise keep the run going until they were due,
      // which at a low rate is long after the measured phase (or never).
      {
        std::lock_guard<std::mutex> lock(pacer_mutex_);
        pacer_drain_ = true;
      }
      pacer_wake_.notify_all();
    }
    // Every call out was cancelled, none starts from now on, and the pacer finishes every
    // waiting slot, so every slot comes back.
    {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [this] { return active_ == 0; });
    }
    if (pacer_.joinable()) {
      {
        std::lock_guard<std::mutex> lock(pacer_mutex_);
        pacer_stop_ = true;
      }
      pacer_wake_.notify_all();
      pacer_.join();
      // Every slot has finished, so no call is left in flight on the queue.
      paced_calls_.Shutdown();
      completer_.join();
    }
    if (options_.progress) progress << "\n";
    BenchResult result = Collect(std::chrono::duration<double>(measure_end - measure_start).count(),
                                 cpu_start, cpu_end);
    result.unfinished = unfinished.calls;
    result.oldest_unfinished_ms =
        std::chrono::duration<double, std::milli>(unfinished.oldest).count();
    return result;
  }

 private:
  enum Phase { kWarmup, kMeasure, kStop };
  static constexpr steady_clock::rep kNotInFlight = std::numeric_limits<steady_clock::rep>::min();

  // Latencies are kept per shard of slots rather than per slot: a histogram takes ~22 KiB,
  // which at the largest --concurrency would be gigabytes. Up to 64 slots each have a shard
  // of their own; beyond that, slots sharing a shard take turns for its lock.
  static constexpr int kMaxLatencyShards = 64;
  struct LatencyShard {
    std::mutex mutex;
    LatencyHistogram latencies;  // guarded by mutex
  };

  // One closed-loop client: exactly one call in flight, so its fields are only touched by
  // that call's completion (gRPC orders callbacks, and a queue's events, after the call that
  // raised them) and, once every slot has finished, by Run(). The exceptions are `context` and
  // `stopped`, which Run() also reaches while calls are out (CancelCalls) and so are guarded by
  // `call_mutex`.
  struct Slot {
    int index = 0;
    size_t connection = 0;
    uint64_t sequence = 0;
    std::string token;  // a prepared session's token (also the bearer token for transfers)
    std::string from_account;
    std::string to_account;
    bool reading_back = false;  // create-get-session: the Get half of an iteration
    // --rate: when this slot's next iteration is due.
    steady_clock::time_point next_start;

    std::mutex call_mutex;
    // The context of the slot's current (or last) call. Replaced only under call_mutex, so that
    // CancelCalls never cancels one that is being destroyed; read without it by the thread
    // starting the call, the only one that replaces it.
    std::unique_ptr<grpc::ClientContext> context;
    bool stopped = false;  // no call may start any more; guarded by call_mutex
    steady_clock::time_point started;
    grpc::health::v1::HealthCheckRequest health_request;
    grpc::health::v1::HealthCheckResponse health_response;
    v1::CreateSessionRequest create_request;
    v1::GetSessionRequest get_request;
    v1::UpdateSessionRequest update_request;
    v1::TransferRequest transfer_request;
    v1::Session session_response;
    v1::Transaction transaction_response;
    // --rate: the call in flight, as the completion queue API holds it, and its status.
    // Declared after `context`, so that they are destroyed before it (see StartCall).
    std::unique_ptr<grpc::ClientAsyncResponseReader<grpc::health::v1::HealthCheckResponse>>
        health_reader;
    std::unique_ptr<grpc::ClientAsyncResponseReader<v1::Session>> session_reader;
    std::unique_ptr<grpc::ClientAsyncResponseReader<v1::Transaction>> transaction_reader;
    grpc::Status status;

    LatencyShard* latency_shard = nullptr;
    std::array<uint64_t, kStatusCodes> codes{};
    std::atomic<uint64_t> completed{0};  // read by the progress line
    std::atomic<uint64_t> failed{0};
    // When the call in flight started (steady_clock ticks), or kNotInFlight; read by Run() at
    // the end of the measured phase while the call may still be out.
    std::atomic<steady_clock::rep> in_flight_since{kNotInFlight};
  };

  std::unique_ptr<grpc::ClientContext> NewContext(const Slot& slot, bool authenticated) const {
    auto context = std::make_unique<grpc::ClientContext>();
    context->set_deadline(DeadlineFrom(call_deadline_));
    if (authenticated) context->AddMetadata("authorization", absl::StrCat("Bearer ", slot.token));
    return context;
  }

  absl::Status PrepareSlot(Slot& slot) {
    const BenchRpc rpc = options_.rpc;
    if (rpc != BenchRpc::kGetSession && rpc != BenchRpc::kUpdateSession &&
        rpc != BenchRpc::kTransfer) {
      return absl::OkStatus();
    }
    SessionService::Stub& sessions = *sessions_[slot.connection];
    v1::CreateSessionRequest create;
    create.set_user_id(absl::StrCat("bench-", run_id_, "-", slot.index));
    create.set_ttl_seconds(kServerDefaultTtl);
    (*create.mutable_attributes())["bench"] = run_id_;
    v1::Session session;
    grpc::Status s = sessions.CreateSession(NewContext(slot, false).get(), create, &session);
    if (!s.ok()) return FromGrpc(s, "preparing a session (CreateSession)");
    slot.token = session.token();
    if (rpc != BenchRpc::kTransfer) return absl::OkStatus();

    TransactionService::Stub& ledger = *ledger_[slot.connection];
    v1::OpenAccountRequest open;
    open.set_currency("EUR");
    v1::Account from;
    v1::Account to;
    s = ledger.OpenAccount(NewContext(slot, true).get(), open, &from);
    if (s.ok()) s = ledger.OpenAccount(NewContext(slot, true).get(), open, &to);
    if (!s.ok()) return FromGrpc(s, "preparing accounts (OpenAccount)");
    v1::DepositRequest deposit;
    deposit.set_account_id(from.account_id());
    deposit.set_amount_minor(kInitialDeposit);
    deposit.set_idempotency_key(absl::StrCat("bench-", run_id_, "-", slot.index, "-fund"));
    v1::Transaction funded;
    s = ledger.Deposit(NewContext(slot, true).get(), deposit, &funded);
    if (!s.ok()) return FromGrpc(s, "funding an account (Deposit)");
    slot.from_account = from.account_id();
    slot.to_account = to.account_id();
    return absl::OkStatus();
  }

  // In --requests mode, takes one iteration from the shared budget.
  bool ClaimIteration() {
    if (options_.requests <= 0) return true;
    return issued_.fetch_add(1, std::memory_order_relaxed) < options_.requests;
  }

  void StartIteration(Slot& slot) {
    ++slot.sequence;
    slot.reading_back = false;
    if (options_.rate <= 0) {
      StartCall(slot, steady_clock::now());
      return;
    }
    const steady_clock::time_point due = slot.next_start;
    const PacedCall plan = PlanPacedCall(slot.sequence == 1, due, steady_clock::now(), interval_);
    slot.next_start = plan.next_due;
    if (!plan.wait) {
      StartCall(slot, plan.timed_from);
      return;
    }
    bool earliest = false;
    {
      std::lock_guard<std::mutex> lock(pacer_mutex_);
      pending_.push(Pending{due, &slot});
      earliest = pending_.top().slot == &slot;
    }
    // The pacer sleeps until its earliest call is due; only a call due even earlier needs to
    // wake it. Waking it for every call cost the client two context switches per call, and
    // at half of the server's peak that was CPU the server's tail latency competed for.
    if (earliest) pacer_wake_.notify_one();
  }

  // --rate: one thread starts the calls that are due. gRPC's own timers fire up to a
  // millisecond late, which would halve the rate at a few thousand calls per second; a
  // condition-variable wait on the monotonic clock wakes within tens of microseconds.
  // Once Run() says to drain, every waiting slot finishes at once, without waiting for its
  // due time; slots that a late completion queues after that are finished as they come.
  void RunPacer() {
    std::unique_lock<std::mutex> lock(pacer_mutex_);
    while (!pacer_stop_) {
      if (pending_.empty()) {
        pacer_wake_.wait(lock);
        continue;
      }
      const Pending next = pending_.top();
      if (!pacer_drain_ && steady_clock::now() < next.due) {
        pacer_wake_.wait_until(lock, next.due);
        continue;
      }
      pending_.pop();
      lock.unlock();
      // Draining implies kStop: Run() stores the phase before it sets pacer_drain_.
      if (phase_.load(std::memory_order_acquire) == kStop) {
        FinishSlot();
      } else {
        // From when it really started: the pacer's own lateness is the client's, not the
        // server's. The slot's schedule stays fixed, so the lateness does not accumulate.
        StartCall(*next.slot, steady_clock::now());
      }
      lock.lock();
    }
  }

  // Cancels every slot's call in flight and keeps any slot from starting another. A call
  // whose context is in place but not yet started is cancelled as it starts (ClientContext
  // allows TryCancel at any stage of the call).
  void CancelCalls() {
    for (auto& slot : slots_) {
      std::lock_guard<std::mutex> lock(slot->call_mutex);
      slot->stopped = true;
      // OnDone, if gRPC ran it in this thread, takes no call_mutex once the phase is kStop.
      if (slot->context != nullptr) slot->context->TryCancel();
    }
  }

  // Gives the slot a fresh context for its next call, unless CancelCalls has stopped it.
  bool RenewContext(Slot& slot) {
    std::unique_ptr<grpc::ClientContext> fresh =
        NewContext(slot, options_.rpc == BenchRpc::kTransfer);
    std::unique_ptr<grpc::ClientContext> finished;  // destroyed after the lock is released
    std::lock_guard<std::mutex> lock(slot.call_mutex);
    if (slot.stopped) return false;
    finished = std::move(slot.context);
    slot.context = std::move(fresh);
    return true;
  }

  // `started` is when the call began or, under --rate, when it was due. A slot that the end of
  // the run stopped starts nothing and finishes instead.
  void StartCall(Slot& slot, steady_clock::time_point started) {
    slot.started = started;
    // When it really starts: a paced call behind schedule is timed from when it was due, but
    // its age as an unfinished call is how long the server has had it.
    slot.in_flight_since.store(steady_clock::now().time_since_epoch().count(),
                               std::memory_order_relaxed);
    // A queued call's reader lives in its call's arena, which the context's destruction frees:
    // the reader goes first.
    slot.health_reader.reset();
    slot.session_reader.reset();
    slot.transaction_reader.reset();
    if (!RenewContext(slot)) {
      FinishSlot();
      return;
    }
    switch (options_.rpc) {
      case BenchRpc::kHealth:
        Issue(slot, *health_[slot.connection], &Health::Stub::async::Check,
              &Health::Stub::PrepareAsyncCheck, slot.health_request, &slot.health_response,
              slot.health_reader);
        return;
      case BenchRpc::kCreateGetSession:
        if (slot.reading_back) {
          slot.get_request.set_token(slot.session_response.token());
          IssueGetSession(slot);
          return;
        }
        [[fallthrough]];
      case BenchRpc::kCreateSession:
        // A new user per call, as logins of many users look; one user with a huge session
        // list would measure that user's index instead.
        slot.create_request.set_user_id(
            absl::StrCat("bench-", run_id_, "-", slot.index, "-", slot.sequence));
        slot.create_request.set_ttl_seconds(kServerDefaultTtl);
        Issue(slot, *sessions_[slot.connection], &SessionService::Stub::async::CreateSession,
              &SessionService::Stub::PrepareAsyncCreateSession, slot.create_request,
              &slot.session_response, slot.session_reader);
        return;
      case BenchRpc::kGetSession:
        slot.get_request.set_token(slot.token);
        slot.get_request.set_touch(options_.touch);
        IssueGetSession(slot);
        return;
      case BenchRpc::kUpdateSession:
        slot.update_request.set_token(slot.token);
        (*slot.update_request.mutable_set())["n"] = absl::StrCat(slot.sequence);
        Issue(slot, *sessions_[slot.connection], &SessionService::Stub::async::UpdateSession,
              &SessionService::Stub::PrepareAsyncUpdateSession, slot.update_request,
              &slot.session_response, slot.session_reader);
        return;
      case BenchRpc::kTransfer:
        slot.transfer_request.set_from_account_id(slot.from_account);
        slot.transfer_request.set_to_account_id(slot.to_account);
        slot.transfer_request.set_amount_minor(1);
        slot.transfer_request.set_idempotency_key(
            absl::StrCat("bench-", run_id_, "-", slot.index, "-", slot.sequence));
        Issue(slot, *ledger_[slot.connection], &TransactionService::Stub::async::Transfer,
              &TransactionService::Stub::PrepareAsyncTransfer, slot.transfer_request,
              &slot.transaction_response, slot.transaction_reader);
        return;
    }
  }

  void IssueGetSession(Slot& slot) {
    Issue(slot, *sessions_[slot.connection], &SessionService::Stub::async::GetSession,
          &SessionService::Stub::PrepareAsyncGetSession, slot.get_request, &slot.session_response,
          slot.session_reader);
  }

  // Starts the slot's call to one unary method of `stub`: closed-loop through gRPC's callback
  // API (`callback_form`), under --rate through the completion queue that RunCompleter() drains
  // (`queued_form`).
  template <typename Stub, typename Request, typename Response>
  void Issue(Slot& slot, Stub& stub,
             void (Stub::async::*callback_form)(grpc::ClientContext*, const Request*, Response*,
                                                std::function<void(grpc::Status)>),
             std::unique_ptr<grpc::ClientAsyncResponseReader<Response>> (Stub::*queued_form)(
                 grpc::ClientContext*, const Request&, grpc::CompletionQueue*),
             const Request& request, Response* response,
             std::unique_ptr<grpc::ClientAsyncResponseReader<Response>>& reader) {
    if (options_.rate <= 0) {
      (stub.async()->*callback_form)(slot.context.get(), &request, response,
                                     [this, &slot](grpc::Status status) { OnDone(slot, status); });
      return;
    }
    reader = (stub.*queued_form)(slot.context.get(), request, &paced_calls_);
    reader->StartCall();
    reader->Finish(response, &slot.status, &slot);
  }

  // --rate: finishes the paced calls. gRPC's callback API hands each completion from the
  // thread that read it to one of its two callback threads, which at an even pace of a few
  // thousand calls a second cost ~2 context switches and ~38 us of CPU per call; the one
  // thread waiting on this queue is also the one that reads the answers, so it wakes once.
  void RunCompleter() {
    void* tag = nullptr;
    bool ok = false;
    while (paced_calls_.Next(&tag, &ok)) {
      Slot& slot = *static_cast<Slot*>(tag);
      OnDone(slot, slot.status);
    }
  }

  // Runs on a gRPC callback thread (under --rate, on the completer). Issuing the next call from
  // here is what makes the loop closed: a slot never has more than one call outstanding.
  void OnDone(Slot& slot, const grpc::Status& call_status) {
    slot.in_flight_since.store(kNotInFlight, std::memory_order_relaxed);
    const auto elapsed = steady_clock::now() - slot.started;
    // A NOT_SERVING answer is a failed health check, as `sessionledger-cli health` exits with
    // it; counted a success, a draining server would set the floor of every ratio.
    const grpc::Status status =
        call_status.ok() && options_.rpc == BenchRpc::kHealth &&
                slot.health_response.status() != grpc::health::v1::HealthCheckResponse::SERVING
            ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "not serving")
            : call_status;
    const Phase phase = static_cast<Phase>(phase_.load(std::memory_order_acquire));
    if (phase == kMeasure) {
      const size_t code = static_cast<size_t>(status.error_code());
      ++slot.codes[code < kStatusCodes ? code : 2];
      if (status.ok()) {
        std::lock_guard<std::mutex> lock(slot.latency_shard->mutex);
        slot.latency_shard->latencies.Record(static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed).count()));
      }
    }
    slot.completed.fetch_add(1, std::memory_order_relaxed);
    // After the measured phase a failure is most likely CancelCalls' CANCELLED: no error.
    if (!status.ok() && phase != kStop) slot.failed.fetch_add(1, std::memory_order_relaxed);
    if (phase != kStop) {
      if (options_.rpc == BenchRpc::kCreateGetSession && !slot.reading_back && status.ok()) {
        slot.reading_back = true;
        StartCall(slot, steady_clock::now());
        return;
      }
      if (ClaimIteration()) {
        StartIteration(slot);
        return;
      }
    }
    FinishSlot();
  }

  void FinishSlot() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (--active_ == 0) done_.notify_all();
  }

  uint64_t Completed(uint64_t* failed) const {
    uint64_t total = 0;
    *failed = 0;
    for (const auto& slot : slots_) {
      total += slot->completed.load(std::memory_order_relaxed);
      *failed += slot->failed.load(std::memory_order_relaxed);
    }
    return total;
  }

  // Waits `length` (or until every slot is done), printing a progress line once a second.
  void Wait(absl::Duration length, const char* phase_name, std::ostream& progress) {
    const steady_clock::time_point start = steady_clock::now();
    const auto end = length == absl::InfiniteDuration() ? steady_clock::time_point::max()
                                                        : start + absl::ToChronoNanoseconds(length);
    uint64_t failed = 0;
    uint64_t last = Completed(&failed);
    steady_clock::time_point last_time = start;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      const auto tick = std::min(end, steady_clock::now() + std::chrono::seconds(1));
      if (done_.wait_until(lock, tick, [this] { return active_ == 0; })) return;
      const steady_clock::time_point now = steady_clock::now();
      if (options_.progress) {
        const uint64_t completed = Completed(&failed);
        const double rate = static_cast<double>(completed - last) /
                            std::max(1e-9, std::chrono::duration<double>(now - last_time).count());
        progress << absl::StrFormat("\r%s %s %5.1fs  %10.0f calls/s  %llu calls  %llu errors   ",
                                    BenchRpcName(options_.rpc), phase_name,
                                    std::chrono::duration<double>(now - start).count(), rate,
                                    static_cast<unsigned long long>(completed),
                                    static_cast<unsigned long long>(failed))
                 << std::flush;
        last = completed;
        last_time = now;
      }
      if (now >= end) return;
    }
  }

  // The calls out at `end`, which CancelCalls is about to end: no other figure counts them.
  struct Unfinished {
    uint64_t calls = 0;
    steady_clock::duration oldest{};
  };
  Unfinished UnfinishedAt(steady_clock::time_point end) const {
    Unfinished unfinished;
    for (const auto& slot : slots_) {
      const steady_clock::rep since = slot->in_flight_since.load(std::memory_order_relaxed);
      if (since == kNotInFlight) continue;
      ++unfinished.calls;
      unfinished.oldest = std::max(unfinished.oldest,
                                   end - steady_clock::time_point(steady_clock::duration(since)));
    }
    return unfinished;
  }

  BenchResult Collect(double seconds, const CpuSample& cpu_start, const CpuSample& cpu_end) const {
    LatencyHistogram latencies;
    std::array<uint64_t, kStatusCodes> codes{};
    for (const auto& shard : latency_shards_) {
      std::lock_guard<std::mutex> lock(shard->mutex);
      latencies.Merge(shard->latencies);
    }
    for (const auto& slot : slots_) {
      for (size_t i = 0; i < kStatusCodes; ++i) codes[i] += slot->codes[i];
    }
    BenchResult r;
    r.rpc = BenchRpcName(options_.rpc);
    r.concurrency = options_.concurrency;
    r.connections = connections();
    r.seconds = seconds;
    r.ok_calls = latencies.count();
    r.throughput = seconds > 0 ? static_cast<double>(r.ok_calls) / seconds : 0;
    auto ms = [&](double q) { return static_cast<double>(latencies.ValueAtQuantile(q)) / 1e6; };
    r.p50_ms = ms(0.50);
    r.p90_ms = ms(0.90);
    r.p99_ms = ms(0.99);
    r.p999_ms = ms(0.999);
    r.max_ms = static_cast<double>(latencies.max()) / 1e6;
    for (size_t i = 1; i < kStatusCodes; ++i) {
      if (codes[i] > 0) r.errors[StatusCodeName(static_cast<grpc::StatusCode>(i))] = codes[i];
    }
    uint64_t calls = 0;
    for (const uint64_t count : codes) calls += count;
    r.cpu.push_back(PerCall("client", CpuUsed(cpu_start.client, cpu_end.client), calls));
    for (size_t i = 0; i < options_.cpu_of.size(); ++i) {
      r.cpu.push_back(PerCall(options_.cpu_of[i].name,
                              CpuUsed(cpu_start.entries[i], cpu_end.entries[i]), calls));
    }
    return r;
  }

  const BenchOptions options_;
  const absl::Duration call_deadline_;
  std::string run_id_;
  std::vector<std::unique_ptr<Health::Stub>> health_;
  std::vector<std::unique_ptr<SessionService::Stub>> sessions_;
  std::vector<std::unique_ptr<TransactionService::Stub>> ledger_;
  std::vector<std::unique_ptr<LatencyShard>> latency_shards_;
  std::vector<std::unique_ptr<Slot>> slots_;

  // --rate: time between one slot's iterations, and the slots waiting for their turn.
  struct Pending {
    steady_clock::time_point due;
    Slot* slot;
    bool operator>(const Pending& other) const { return due > other.due; }
  };
  std::chrono::nanoseconds interval_{0};
  std::mutex pacer_mutex_;
  std::condition_variable pacer_wake_;
  std::priority_queue<Pending, std::vector<Pending>, std::greater<Pending>> pending_;
  bool pacer_drain_ = false;  // the measured phase is over; guarded by pacer_mutex_
  bool pacer_stop_ = false;   // guarded by pacer_mutex_
  std::thread pacer_;
  grpc::CompletionQueue paced_calls_;  // --rate: where the calls' completions go
  std::thread completer_;              // --rate: RunCompleter()
  std::atomic<int> phase_{kWarmup};
  std::atomic<int64_t> issued_{0};
  std::mutex mutex_;
  std::condition_variable done_;
  int active_ = 0;  // slots still looping; guarded by mutex_
};

}  // namespace

PacedCall PlanPacedCall(bool first_call, steady_clock::time_point due, steady_clock::time_point now,
                        std::chrono::nanoseconds interval) {
  PacedCall plan;
  if (due > now) {
    plan.wait = true;
    plan.next_due = due + interval;
  } else if (first_call) {
    // A slot's first call has no previous call to blame: if it is late, the client was
    // (starting thousands of slots takes a while). It counts from now, and the slot's schedule
    // starts over from now, or its next calls would carry the same lateness.
    plan.timed_from = now;
    plan.next_due = now + interval;
  } else {
    // Behind schedule because the previous call was slow: it starts at once but counts from
    // when it was due, and the schedule stays, so that queueing is measured.
    plan.timed_from = due;
    plan.next_due = due + interval;
  }
  return plan;
}

absl::StatusOr<BenchResult> RunBench(const BenchOptions& options, const std::string& target,
                                     const ChannelOptions& channel_options,
                                     absl::Duration call_deadline, std::ostream& progress) {
  LoadGenerator generator(options, target, channel_options, call_deadline);
  absl::Status prepared = generator.Prepare();
  if (!prepared.ok()) return prepared;
  return generator.Run(progress);
}

std::string FormatBenchResult(const BenchResult& r) {
  std::string errors;
  for (const auto& [code, count] : r.errors) {
    absl::StrAppend(&errors, errors.empty() ? "" : ", ", code, "=", count);
  }
  std::vector<std::pair<std::string, std::string>> fields = {
      {"rpc", r.rpc},
      {"concurrency", absl::StrCat(r.concurrency, " (", r.connections, " connections)")},
      {"measured", absl::StrFormat("%.1f s", r.seconds)},
      {"ok calls", absl::StrCat(r.ok_calls)},
      {"throughput", absl::StrFormat("%.0f calls/s", r.throughput)},
      {"latency p50", absl::StrFormat("%.3f ms", r.p50_ms)},
      {"latency p90", absl::StrFormat("%.3f ms", r.p90_ms)},
      {"latency p99", absl::StrFormat("%.3f ms", r.p99_ms)},
      {"latency p99.9", absl::StrFormat("%.3f ms", r.p999_ms)},
      {"latency max", absl::StrFormat("%.3f ms", r.max_ms)},
      {"errors", errors.empty() ? "none" : errors},
      {"unfinished", r.unfinished == 0
                         ? "none"
                         : absl::StrFormat("%d calls in flight at the end, the oldest %.3f ms",
                                           r.unfinished, r.oldest_unfinished_ms)},
  };
  for (const CpuPerCall& cpu : r.cpu) {
    fields.emplace_back(absl::StrCat("cpu ", cpu.name),
                        cpu.us_per_call.has_value()
                            ? absl::StrFormat("%.1f us/call", *cpu.us_per_call)
                            : absl::StrCat("not measured: ", cpu.unavailable));
  }
  return FormatFields(fields);
}

std::string BenchResultJson(const BenchResult& r) {
  std::string errors;
  for (const auto& [code, count] : r.errors) {
    // Code names are fixed upper-case identifiers, so no JSON escaping is needed.
    absl::StrAppend(&errors, errors.empty() ? "" : ",", "\"", code, "\":", count);
  }
  std::string cpu;
  for (const CpuPerCall& entry : r.cpu) {
    // Names are "client" or checked by the option parser to need no JSON escaping.
    absl::StrAppend(
        &cpu, cpu.empty() ? "" : ",", "\"", entry.name, "\":",
        entry.us_per_call.has_value() ? absl::StrFormat("%.2f", *entry.us_per_call) : "null");
  }
  return absl::StrFormat(
      "{\"rpc\":\"%s\",\"concurrency\":%d,\"connections\":%d,\"seconds\":%.3f,\"calls\":%d,"
      "\"throughput\":%.1f,\"p50_ms\":%.4f,\"p90_ms\":%.4f,\"p99_ms\":%.4f,\"p999_ms\":%.4f,"
      "\"max_ms\":%.4f,\"cpu_us_per_call\":{%s},\"errors\":{%s},\"unfinished\":%d,"
      "\"oldest_unfinished_ms\":%.4f}\n",
      r.rpc, r.concurrency, r.connections, r.seconds, r.ok_calls, r.throughput, r.p50_ms, r.p90_ms,
      r.p99_ms, r.p999_ms, r.max_ms, cpu, errors, r.unfinished, r.oldest_unfinished_ms);
}

int RunBenchCommand(const CliOptions& options, const std::string& target,
                    const ChannelOptions& channel_options, std::ostream& out, std::ostream& err) {
  absl::StatusOr<BenchResult> result =
      RunBench(options.bench, target, channel_options, options.deadline, err);
  if (!result.ok()) {
    err << "bench: " << result.status().message() << "\n";
    return static_cast<int>(result.status().code());
  }
  for (const CpuPerCall& cpu : result->cpu) {
    if (!cpu.us_per_call.has_value()) {
      err << "bench: CPU of " << cpu.name << " not measured (reported as null): " << cpu.unavailable
          << "\n";
    }
  }
  out << (options.json ? BenchResultJson(*result) : FormatBenchResult(*result));
  return 0;
}

}  // namespace sessionledger::client
