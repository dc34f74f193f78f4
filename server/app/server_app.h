#ifndef SESSIONLEDGER_SERVER_APP_SERVER_APP_H_
#define SESSIONLEDGER_SERVER_APP_SERVER_APP_H_

#include <grpcpp/server.h>

#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "server/common/blocking_executor.h"
#include "server/common/clock.h"
#include "server/common/host_resolver.h"
#include "server/common/logger.h"
#include "server/config/config.h"
#include "server/domain/token_authenticator.h"
#include "server/memcached/memcached_pool.h"
#include "server/metrics/server_metrics.h"
#include "server/postgres/pg_ledger_store.h"
#include "server/postgres/pg_pool.h"
#include "server/rpc/health.h"
#include "server/rpc/session_handlers.h"

namespace sessionledger {

// The whole server process minus signal handling: pools, domain services, gRPC handlers,
// health, reflection. `main` and the service tests build it the same way.
// Owns everything it creates; holds no state that a later request relies on.
class ServerApp {
 public:
  // Connects nothing eagerly except the schema check: PostgreSQL must be reachable (retried
  // until `startup_timeout`) and at the schema version this binary expects.
  static absl::StatusOr<std::unique_ptr<ServerApp>> Create(
      const Config& config, Logger& logger, absl::Duration startup_timeout = absl::Seconds(15));
  ~ServerApp();

  // Starts listening on config.port (0 = pick a free port, for tests). `about_to_listen`, when
  // set, runs once everything before the port is done (the first probe of the backing services
  // may take seconds), just before the port opens.
  absl::Status Start(const std::function<void()>& about_to_listen = nullptr);
  int port() const { return port_; }
  // 0 when METRICS_PORT is 0.
  int metrics_port() const { return metrics_http_ != nullptr ? metrics_http_->port() : 0; }

  // Health goes NOT_SERVING at once; after `notice` (calls are still served meanwhile, so
  // load balancers and health-checking clients move away without errors) the server refuses new
  // calls, tells clients with GOAWAY, and lets in-flight calls finish until `grace` has passed
  // (then cancels them). Returns once the server refuses new calls.
  void Shutdown(absl::Duration notice, absl::Duration grace);
  void Wait();

  HealthBoard& health_board() { return health_board_; }

 private:
  ServerApp(const Config& config, Logger& logger) : config_(config), logger_(logger) {}
  absl::Status StartMetrics();

  const Config config_;
  Logger& logger_;
  SystemClock clock_;
  std::unique_ptr<MemcachedPool> memcached_pool_;
  // Shared by the pool and the health probe, so that during a DNS outage they wait on the same
  // lookup rather than each start their own.
  std::shared_ptr<HostResolver> pg_resolver_ = std::make_shared<HostResolver>(nullptr, "sl-pg-dns");
  std::unique_ptr<PgPool> pg_pool_;
  // Owned by the TransactionService handlers; read for metrics only.
  const PgLedgerStore* ledger_store_ = nullptr;
  HealthBoard health_board_;
  // Built by the session layer; the ledger authenticates callers through it.
  std::unique_ptr<TokenAuthenticator> authenticator_;
  std::vector<std::unique_ptr<grpc::Service>> services_;
  SessionHandlers* session_handlers_ = nullptr;  // One of services_.
  HealthService* health_service_ = nullptr;      // One of services_.
  // After the pools and the services, so destroyed before them: the work it still holds uses
  // both, and runs before it goes. Before the queues and the server, so it outlives every call
  // that hands work to it.
  std::unique_ptr<BlockingExecutor> blocking_;
  std::unique_ptr<HealthMonitor> health_monitor_;
  ServerMetrics metrics_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  // The completion queues of the asynchronous methods (GetSession, CreateSession,
  // UpdateSession, Health/Watch) and their thread; destroyed after the server.
  std::unique_ptr<AsyncCallQueues> async_queues_;
  std::thread async_thread_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_APP_SERVER_APP_H_
