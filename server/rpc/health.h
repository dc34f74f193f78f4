#ifndef SESSIONLEDGER_SERVER_RPC_HEALTH_H_
#define SESSIONLEDGER_SERVER_RPC_HEALTH_H_

#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "absl/time/time.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "server/common/logger.h"

namespace sessionledger {

inline constexpr char kSessionServiceName[] = "sessionledger.v1.SessionService";
inline constexpr char kTransactionServiceName[] = "sessionledger.v1.TransactionService";

// The serving status of each health-checked service name. Thread-safe. Once Shutdown() is
// called every service reads NOT_SERVING for good, and Watch streams end.
class HealthBoard {
 public:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  HealthBoard();
  void Set(const std::string& service, bool serving);
  // NOT_FOUND (std::nullopt) for a name the board does not know.
  std::optional<ServingStatus> Get(const std::string& service) const;
  void Shutdown();
  bool shutting_down() const;
  // Blocks until `service`'s status (SERVICE_UNKNOWN while the board does not know it) differs
  // from `last`, shutdown begins, or `timeout` passes (on the steady clock).
  std::optional<ServingStatus> WaitForChange(const std::string& service, ServingStatus last,
                                             absl::Duration timeout) const;

 private:
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  std::map<std::string, ServingStatus> statuses_;
  bool shutting_down_ = false;
};

// grpc.health.v1.Health served from our own compiled health.proto, so that reflection can
// describe it and grpcurl can call it (the built-in service has no descriptor).
class HealthService final : public grpc::health::v1::Health::Service {
 public:
  explicit HealthService(const HealthBoard& board) : board_(board) {}
  grpc::Status Check(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::health::v1::HealthCheckResponse* response) override;
  grpc::Status Watch(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::ServerWriter<grpc::health::v1::HealthCheckResponse>* writer) override;

 private:
  const HealthBoard& board_;
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
  };
  HealthMonitor(HealthBoard& board, Probes probes, absl::Duration interval, Logger& logger);
  ~HealthMonitor();  // Stops the thread.
  HealthMonitor(const HealthMonitor&) = delete;
  HealthMonitor& operator=(const HealthMonitor&) = delete;

  // Runs one round of probes now, on the calling thread (start-up uses this so the first health
  // answer is already real).
  void ProbeOnce();

 private:
  void Run();

  HealthBoard& board_;
  Probes probes_;
  const absl::Duration interval_;
  Logger& logger_;
  std::mutex mutex_;
  std::condition_variable stop_cv_;
  bool stop_ = false;
  bool last_memcached_ok_ = true;
  bool last_postgres_ok_ = true;
  std::thread thread_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_HEALTH_H_
