#ifndef SESSIONLEDGER_TESTS_CHAOS_CHAOS_CLIENT_H_
#define SESSIONLEDGER_TESTS_CHAOS_CHAOS_CLIENT_H_

// A client as a careful application would write it against a replicated sessionledger: one
// channel with client-side round_robin over every replica (health-checked, so a draining
// replica stops getting calls as soon as it reports NOT_SERVING), and an explicit retry loop
// for retryable codes that counts every call, retry and failure.
//
// Retry rules (the chaos tests hold the server to them):
// - UNAVAILABLE is retried for every method, with backoff, until the call's budget is spent.
// - A per-attempt deadline that expires (DEADLINE_EXCEEDED while the budget is not spent) is
//   retried too: the attempt may have hit a replica that died without closing its socket.
// - ABORTED is retried for Transfer/Deposit (the ledger gives it after its own serialization
//   retries) and for UpdateSession (compare-and-swap contention).
// - Deposit and Transfer keep the SAME idempotency key on every attempt, so a retry of a call
//   that committed but lost its reply returns the original transaction and moves no money.
// - CreateSession is not idempotent: when its reply is lost, the retry creates a second
//   session. That is harmless (the first one is never handed out and expires by its TTL), so
//   we retry it, and only sessions whose token the client received are tracked and checked.
// - UpdateSession with expected_version = 0 sets absolute values, so applying it twice leaves
//   the same attributes (the version just moves by two).
//
// Thread safety: every method may be called from many threads at once.

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "sessionledger/v1/session.grpc.pb.h"
#include "sessionledger/v1/transaction.grpc.pb.h"

namespace sessionledger::testing {

namespace pb = ::sessionledger::v1;

struct CallCounters {
  std::atomic<int64_t> calls{0};     // Logical calls (each counted once, however many attempts).
  std::atomic<int64_t> attempts{0};  // RPC attempts sent by the retry loop.
  std::atomic<int64_t> retries{0};   // attempts - calls, kept separately for the printout.
  std::atomic<int64_t> retried_calls{0};  // Calls that needed more than one attempt.
  std::atomic<int64_t> failures{0};       // Calls that did not succeed within their budget.
  std::atomic<int64_t> unavailable{0};    // Attempts that ended UNAVAILABLE.
  std::atomic<int64_t> attempt_timeouts{0};
  std::atomic<int64_t> aborted{0};
};

class ChaosClient {
 public:
  struct Options {
    // The whole logical call, retries included: well above any outage the tests cause
    // (a PostgreSQL restart takes 1-3 s), well below the test's own timeout.
    absl::Duration budget = absl::Seconds(25);
    absl::Duration attempt_timeout = absl::Seconds(5);
    absl::Duration initial_backoff = absl::Milliseconds(50);
    absl::Duration max_backoff = absl::Milliseconds(800);
    // Client-side health checking of every address (see the constructor).
    bool health_check = true;
  };

  // `targets`: host:port entries, all IPv4 literals (e.g. 127.0.0.1:26051).
  ChaosClient(const std::vector<std::string>& targets, Options options) : options_(options) {
    grpc::ChannelArguments args;
    // healthCheckConfig makes round_robin watch grpc.health.v1 on each replica and skip the
    // ones not SERVING: a replica that starts draining leaves the rotation before it GOAWAYs.
    // Not through a proxy: there the Watch stream lands on one replica behind it, whose drain
    // would take the proxy's only address out of the rotation.
    args.SetServiceConfigJSON(options.health_check ? R"json({
      "loadBalancingConfig": [{"round_robin": {}}],
      "healthCheckConfig": {"serviceName": ""}
    })json"
                                                   : R"json({
      "loadBalancingConfig": [{"round_robin": {}}]
    })json");
    // Restarted replicas come back within a second or two; gRPC's default reconnect backoff
    // (up to 120 s) would leave them out of the rotation for the rest of the test.
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    channel_ = grpc::CreateCustomChannel(absl::StrCat("ipv4:", absl::StrJoin(targets, ",")),
                                         grpc::InsecureChannelCredentials(), args);
    sessions_ = pb::SessionService::NewStub(channel_);
    ledger_ = pb::TransactionService::NewStub(channel_);
  }

  CallCounters& counters() { return counters_; }
  std::vector<std::string> FailureSamples() {
    std::lock_guard<std::mutex> lock(mu_);
    return failure_samples_;
  }

  grpc::Status CreateSession(const std::string& user_id, pb::Session* out) {
    pb::CreateSessionRequest request;
    request.set_user_id(user_id);
    return Call("CreateSession", "", false,
                [&](grpc::ClientContext* c) { return sessions_->CreateSession(c, request, out); });
  }
  grpc::Status GetSession(const std::string& token, bool touch, pb::Session* out) {
    pb::GetSessionRequest request;
    request.set_token(token);
    request.set_touch(touch);
    return Call("GetSession", "", false,
                [&](grpc::ClientContext* c) { return sessions_->GetSession(c, request, out); });
  }
  grpc::Status UpdateSession(const std::string& token, const std::string& key,
                             const std::string& value, pb::Session* out) {
    pb::UpdateSessionRequest request;
    request.set_token(token);
    (*request.mutable_set())[key] = value;
    return Call("UpdateSession", "", true,
                [&](grpc::ClientContext* c) { return sessions_->UpdateSession(c, request, out); });
  }
  grpc::Status OpenAccount(const std::string& token, pb::Account* out) {
    pb::OpenAccountRequest request;
    request.set_currency("EUR");
    return Call("OpenAccount", token, false,
                [&](grpc::ClientContext* c) { return ledger_->OpenAccount(c, request, out); });
  }
  grpc::Status GetAccount(const std::string& token, const std::string& id, pb::Account* out) {
    pb::GetAccountRequest request;
    request.set_account_id(id);
    return Call("GetAccount", token, false,
                [&](grpc::ClientContext* c) { return ledger_->GetAccount(c, request, out); });
  }
  grpc::Status Deposit(const std::string& token, const std::string& id, int64_t amount,
                       const std::string& key, pb::Transaction* out) {
    pb::DepositRequest request;
    request.set_account_id(id);
    request.set_amount_minor(amount);
    request.set_idempotency_key(key);
    return Call("Deposit", token, true,
                [&](grpc::ClientContext* c) { return ledger_->Deposit(c, request, out); });
  }
  // `attempts` (optional) receives how many attempts the call took.
  grpc::Status Transfer(const std::string& token, const std::string& from, const std::string& to,
                        int64_t amount, const std::string& key, pb::Transaction* out,
                        int* attempts = nullptr) {
    pb::TransferRequest request;
    request.set_from_account_id(from);
    request.set_to_account_id(to);
    request.set_amount_minor(amount);
    request.set_idempotency_key(key);
    return Call(
        "Transfer", token, true,
        [&](grpc::ClientContext* c) { return ledger_->Transfer(c, request, out); }, attempts);
  }
  grpc::Status ListTransactions(const std::string& token, const std::string& id,
                                const std::string& page_token, pb::ListTransactionsResponse* out) {
    pb::ListTransactionsRequest request;
    request.set_account_id(id);
    request.set_page_size(1000);
    request.set_page_token(page_token);
    return Call("ListTransactions", token, false,
                [&](grpc::ClientContext* c) { return ledger_->ListTransactions(c, request, out); });
  }

 private:
  grpc::Status Call(const char* method, const std::string& token, bool retry_aborted,
                    const std::function<grpc::Status(grpc::ClientContext*)>& attempt,
                    int* attempts_out = nullptr) {
    counters_.calls++;
    const absl::Time give_up = absl::Now() + options_.budget;
    absl::Duration backoff = options_.initial_backoff;
    thread_local std::mt19937_64 random(std::random_device{}());
    int attempts = 0;
    grpc::Status status;
    for (;;) {
      ++attempts;
      counters_.attempts++;
      grpc::ClientContext context;
      if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
      const absl::Time attempt_deadline = std::min(give_up, absl::Now() + options_.attempt_timeout);
      context.set_deadline(absl::ToChronoTime(attempt_deadline));
      status = attempt(&context);
      const grpc::StatusCode code = status.error_code();
      bool retryable = false;
      if (code == grpc::StatusCode::UNAVAILABLE) {
        counters_.unavailable++;
        retryable = true;
      } else if (code == grpc::StatusCode::DEADLINE_EXCEEDED) {
        counters_.attempt_timeouts++;
        retryable = true;
      } else if (code == grpc::StatusCode::ABORTED && retry_aborted) {
        counters_.aborted++;
        retryable = true;
      }
      if (!retryable || absl::Now() + backoff >= give_up) break;
      // Full jitter keeps the workers from retrying in lockstep against a restarting replica.
      std::uniform_int_distribution<int64_t> jitter(0, absl::ToInt64Microseconds(backoff));
      absl::SleepFor(absl::Microseconds(jitter(random)));
      backoff = std::min(backoff * 2, options_.max_backoff);
      counters_.retries++;
    }
    if (attempts > 1) counters_.retried_calls++;
    if (attempts_out != nullptr) *attempts_out = attempts;
    if (!status.ok()) {
      counters_.failures++;
      std::lock_guard<std::mutex> lock(mu_);
      if (failure_samples_.size() < 20) {
        failure_samples_.push_back(absl::StrCat(method, " after ", attempts, " attempts: code ",
                                                status.error_code(), " ", status.error_message()));
      }
    }
    return status;
  }

  Options options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<pb::SessionService::Stub> sessions_;
  std::unique_ptr<pb::TransactionService::Stub> ledger_;
  CallCounters counters_;
  std::mutex mu_;
  std::vector<std::string> failure_samples_;
};

}  // namespace sessionledger::testing

#endif  // SESSIONLEDGER_TESTS_CHAOS_CHAOS_CLIENT_H_
