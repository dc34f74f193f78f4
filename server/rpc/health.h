#ifndef SESSIONLEDGER_SERVER_RPC_HEALTH_H_
#define SESSIONLEDGER_SERVER_RPC_HEALTH_H_

#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "absl/time/time.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "server/common/logger.h"
#include "server/rpc/async_call.h"

namespace sessionledger {

inline constexpr char kSessionServiceName[] = "sessionledger.v1.SessionService";
inline constexpr char kTransactionServiceName[] = "sessionledger.v1.TransactionService";

// The serving status of each health-checked service name. Thread-safe. Once Shutdown() is
// called every service reads NOT_SERVING for good (Watch streams say so and stay open); once
// EndWatches() is, Watch streams end.
class HealthBoard {
 public:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  // Told when a service's status may have changed, so that a Watch stream need not poll.
  class Watcher {
   public:
    // Called with the board's lock held, on the thread that changed the board: it must only
    // arrange for the watcher to look again later (never call the board, never block).
    virtual void Changed() = 0;

   protected:
    ~Watcher() = default;
  };

  HealthBoard();
  void Set(const std::string& service, bool serving);
  // NOT_FOUND (std::nullopt) for a name the board does not know.
  std::optional<ServingStatus> Get(const std::string& service) const;
  // The first call makes every service NOT_SERVING for good and tells every watcher; later
  // calls do nothing. The start of the shutdown notice: Watch streams send NOT_SERVING but stay
  // open, since gRPC's client-side health checking opens a new Watch at once, without backoff,
  // when one that had sent a message ends, and while the server still takes calls the new one
  // would come to this server again, round and round on the thread of the asynchronous calls.
  void Shutdown();
  bool shutting_down() const;
  // Shutdown, and every Watch stream ends (OK, NOT_SERVING sent): called just before the
  // server stops taking calls, so that a client's next Watch goes elsewhere and open streams
  // do not hold the drain for the grace period.
  void EndWatches();
  bool watches_ending() const;
  // From AddWatcher until RemoveWatcher returns, `watcher` is told of every change of
  // `service`'s status and of Shutdown (read the status after adding, so that no change falls
  // in between). Once RemoveWatcher has returned, Changed is not running and will not be called.
  void AddWatcher(const std::string& service, Watcher* watcher);
  void RemoveWatcher(const std::string& service, Watcher* watcher);
  // Watchers added and not removed (for tests: that ended streams let go of the board).
  size_t watchers() const;

 private:
  mutable std::mutex mutex_;
  std::map<std::string, ServingStatus> statuses_;
  std::map<std::string, std::set<Watcher*>> watchers_;
  bool shutting_down_ = false;
  bool watches_ending_ = false;
};

// grpc.health.v1.Health served from our own compiled health.proto, so that reflection can
// describe it and grpcurl can call it (the built-in service has no descriptor).
//
// Check is synchronous (no I/O: it reads the board). Watch is served on gRPC's asynchronous API
// (Accept): an open stream holds no thread and wakes nothing until its service's status changes
// (HealthBoard::Watcher, through an alarm on the completion queue), since gRPC's client-side
// health checking keeps one open per subchannel per client, and any peer can open thousands.
// Not the callback API, for the reason SessionHandlers gives.
class HealthService final
    : public grpc::health::v1::Health::WithAsyncMethod_Watch<grpc::health::v1::Health::Service> {
 public:
  explicit HealthService(HealthBoard& board) : board_(board) {}
  grpc::Status Check(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::health::v1::HealthCheckResponse* response) override;

  // Serves Watch from `queues` (whose arrivals queue belongs to the server this service is
  // registered on, after it started), keeping `accepting` calls requested at any time. Every
  // event of a Watch call completes on queues.arrivals(), so all of a call runs on the thread
  // that runs queues.Run(). Each stream counts as a call of `queues` (CallBegan) until it has
  // ended, which it does promptly once the board shuts down or its client goes.
  void Accept(AsyncCallQueues& queues, int accepting);

 private:
  class WatchCall;

  HealthBoard& board_;
};

// Probes the backing services on its own thread every `interval` and writes the results to the
// board, so that health checks never wait on Memcached or PostgreSQL.
//   SessionService     SERVING while enough Memcached nodes answer (at most `replicas` down);
//   TransactionService SERVING while PostgreSQL and Memcached both answer.
class HealthMonitor {
 public:
  struct Probes {
    // OK when Memcached can serve sessions; a cheap check with its own bounded timeout.
    std::function<bool()> memcached_ok;
    // OK when PostgreSQL answers a trivial query; a cheap check with its own bounded timeout.
    std::function<bool()> postgres_ok;
    // Bounded means every step, host-name lookups included: start-up waits for a round
    // (ProbeOnce) and the destructor for the round in progress, so a probe that can hang holds
    // up both.
  };
  HealthMonitor(HealthBoard& board, Probes probes, absl::Duration interval, Logger& logger);
  // Stops the thread, once the round of probes in progress (if any) has ended.
  ~HealthMonitor();
  HealthMonitor(const HealthMonitor&) = delete;
  HealthMonitor& operator=(const HealthMonitor&) = delete;

  // Runs one round of probes now, on the calling thread (start-up uses this so the first health
  // answer is already real). Rounds run one at a time: one that comes due on the monitor's
  // thread meanwhile waits for this one to end.
  void ProbeOnce();

 private:
  void Run();

  HealthBoard& board_;
  Probes probes_;
  const absl::Duration interval_;
  Logger& logger_;
  // Held for a whole round of probes. Two rounds at once (start-up's on the main thread, the
  // first on the monitor's when a slow probe outlasts the interval) would let the one that
  // started first, with the older view, write the board last.
  std::mutex round_mutex_;
  std::mutex mutex_;
  std::condition_variable stop_cv_;
  bool stop_ = false;
  bool last_memcached_ok_ = true;
  bool last_postgres_ok_ = true;
  std::thread thread_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_HEALTH_H_
