#include "server/app/server_app.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/common/clock.h"
#include "server/common/host_resolver.h"
#include "server/common/status_macros.h"
#include "server/common/thread_name.h"
#include "server/ledger/late_bound_authenticator.h"
#include "server/memcached/memcached_session_store.h"
#include "server/postgres/migrations.h"
#include "server/postgres/pg_connect_target.h"
#include "server/postgres/pg_ledger_store.h"
#include "server/rpc/async_call.h"
#include "server/rpc/call_observer.h"
#include "server/rpc/request_parse_errors.h"
#include "server/rpc/session_handlers.h"
#include "server/rpc/transaction_handlers.h"
#include "server/session/session_service.h"
#include "server/session/token.h"

namespace sessionledger {
namespace {

int ToMillisArg(absl::Duration d) {
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(d), INT32_MAX));
}

// Waits for PostgreSQL (it may still be starting next to us), checks the schema version and
// that transactions run at the isolation level the ledger relies on.
absl::Status CheckSchemaAtStartup(const Config& config, Logger& logger, absl::Duration timeout) {
  const SteadyTime give_up = SteadyNow() + ToSteadyDuration(timeout);
  // One resolver for every attempt: with DNS down, later attempts wait on the lookup already
  // running instead of each starting another.
  const PgConnectTarget target(config.database_url);
  HostResolver resolver(nullptr, "sl-pg-dns");
  absl::Status last;
  do {
    absl::StatusOr<PgConnection> conn =
        PgConnection::Connect(target, resolver, absl::Now() + absl::Seconds(3));
    if (conn.ok()) {
      SL_RETURN_IF_ERROR(CheckSchemaCurrent(*conn, absl::Now() + absl::Seconds(5)));
      return CheckTransactionIsolation(*conn, absl::Now() + absl::Seconds(5));
    }
    last = conn.status();
    logger.Warn("waiting for postgres", {{"error", last.message()}});
    absl::SleepFor(absl::Milliseconds(500));
  } while (SteadyNow() < give_up);
  return absl::UnavailableError(absl::StrCat("DATABASE_URL: cannot connect: ", last.message()));
}

// Plaintext unless TLS is configured; with a client CA, mutual TLS: a client without a
// certificate signed by that CA fails the handshake and never reaches a handler.
std::shared_ptr<grpc::ServerCredentials> ServerCredentials(const TlsConfig& tls) {
  if (!tls.enabled()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions options(
      tls.require_client_cert() ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  options.pem_root_certs = tls.client_ca_pem;
  options.pem_key_cert_pairs.push_back({tls.private_key_pem, tls.cert_chain_pem});
  return grpc::SslServerCredentials(options);
}

// Host names for the Memcached health probe, looked up on `resolver`'s threads, each waited for
// until `give_up` at most (see ProbeMemcachedNodes for why). HostResolver's lookup is the one
// libmemcached would make (getaddrinfo, TCP, any family), and it keeps a lookup stuck on a
// silent name server from piling up: later probes wait on the same one.
MemcachedProbeLookup BoundedLookup(std::shared_ptr<HostResolver> resolver) {
  return [resolver = std::move(resolver)](const std::vector<std::string>& hosts,
                                          SteadyTime give_up) {
    HostResolver::Pending pending = resolver->Start(hosts);
    std::vector<absl::StatusOr<std::vector<std::string>>> found;
    for (size_t i = 0; i < hosts.size(); ++i) {
      std::optional<absl::StatusOr<std::vector<std::string>>> answer = pending.Await(i, give_up);
      if (answer.has_value()) {
        found.push_back(*std::move(answer));
      } else {
        found.push_back(absl::DeadlineExceededError("memcached: host lookup did not answer"));
      }
    }
    return found;
  };
}

}  // namespace

absl::StatusOr<std::unique_ptr<ServerApp>> ServerApp::Create(const Config& config, Logger& logger,
                                                             absl::Duration startup_timeout) {
  SL_RETURN_IF_ERROR(CheckSchemaAtStartup(config, logger, startup_timeout));
  std::unique_ptr<ServerApp> app(new ServerApp(config, logger));

  MemcachedPoolOptions memcached_options;
  memcached_options.url = config.memcached;
  memcached_options.size = config.memcached_pool_size;
  memcached_options.pipeline = config.memcached_pipeline;
  SL_ASSIGN_OR_RETURN(app->memcached_pool_, MemcachedPool::Create(memcached_options));
  // As many threads as pooled Memcached connections: blocking work needs one of those anyway.
  app->blocking_ = std::make_unique<BlockingExecutor>(config.memcached_pool_size);

  PgPoolOptions pg_options;
  pg_options.conninfo = config.database_url;
  pg_options.size = config.database_pool_size;
  pg_options.resolver = app->pg_resolver_;
  app->pg_pool_ = std::make_unique<PgPool>(pg_options);

  // --- Session layer wiring (SessionService) ---
  {
    SessionServiceOptions session_options;
    session_options.default_ttl = config.session_ttl;
    session_options.max_lifetime = config.session_max_lifetime;
    session_options.limits.max_user_id_bytes = static_cast<size_t>(config.max_user_id_bytes);
    session_options.limits.max_attribute_key_bytes =
        static_cast<size_t>(config.max_attribute_key_bytes);
    session_options.limits.max_attributes_bytes =
        static_cast<size_t>(config.max_session_attributes_bytes);
    session_options.blocking = app->blocking_.get();
    auto session_store = std::make_shared<MemcachedSessionStore>(
        *app->memcached_pool_, config.memcached.replicas, app->blocking_.get());
    auto sessions = std::make_shared<SessionService>(std::move(session_store), app->clock_,
                                                     std::move(session_options));
    app->authenticator_ = std::make_unique<SessionTokenAuthenticator>(sessions);
    auto handlers =
        std::make_unique<SessionHandlers>(std::move(sessions), config.default_call_timeout);
    app->session_handlers_ = handlers.get();
    app->services_.push_back(std::move(handlers));
  }
  // --- Ledger layer wiring (TransactionService) ---
  // The authenticator is read at call time through the slot, so the order of the two wiring
  // blocks does not matter; an empty slot makes TransactionService answer UNAVAILABLE.
  auto ledger_store = std::make_unique<PgLedgerStore>(*app->pg_pool_);
  app->ledger_store_ = ledger_store.get();
  app->services_.push_back(std::make_unique<TransactionHandlers>(
      std::move(ledger_store), std::make_unique<LateBoundAuthenticator>(app->authenticator_),
      config.default_call_timeout,
      LedgerLimits{static_cast<size_t>(config.max_idempotency_key_bytes)}));

  auto health = std::make_unique<HealthService>(app->health_board_);
  app->health_service_ = health.get();
  app->services_.push_back(std::move(health));
  return app;
}

ServerApp::~ServerApp() {
  if (server_ != nullptr) {
    Shutdown(absl::ZeroDuration(), absl::ZeroDuration());
    Wait();
  }
}

absl::Status ServerApp::Start(const std::function<void()>& about_to_listen) {
  // OpenSSL initialises itself (provider loading, ~2 MiB of code paged in) on its first digest.
  // Paying that now keeps it out of the first call's latency, and the idle RSS is then the
  // serving RSS rather than a figure that jumps with the first session.
  if (absl::Status sha256 = CheckSha256(); !sha256.ok()) return sha256;
  // Probe the backing services once before listening, so the first health answer is real, then
  // keep probing in the background.
  const MemcachedUrl memcached_url = config_.memcached;
  auto database = std::make_shared<const PgConnectTarget>(config_.database_url);
  HealthMonitor::Probes probes;
  probes.memcached_ok = [memcached_url, lookup = BoundedLookup(std::make_shared<HostResolver>(
                                            nullptr, "sl-probe-dns"))] {
    const MemcachedReachability r =
        ProbeMemcachedNodes(memcached_url, absl::Milliseconds(500), lookup);
    // Every session has replicas + 1 copies on distinct nodes: with at most `replicas` nodes
    // down, every session can still be served.
    return r.total - r.reachable <= memcached_url.replicas;
  };
  probes.postgres_ok = [database, resolver = pg_resolver_] {
    const absl::Time deadline = absl::Now() + absl::Seconds(1);
    absl::StatusOr<PgConnection> conn = PgConnection::Connect(*database, *resolver, deadline);
    return conn.ok() && conn->ExecSimple("SELECT 1", deadline).ok();
  };
  health_monitor_ = std::make_unique<HealthMonitor>(health_board_, std::move(probes),
                                                    config_.health_check_interval, logger_);
  health_monitor_->ProbeOnce();

  if (config_.default_call_timeout > config_.shutdown_grace) {
    // gRPC cancels what is still in flight when the grace ends, but a handler waiting on
    // PostgreSQL or Memcached runs on until its own deadline, and the process exits only then:
    // past the grace, an orchestrator's kill may cut it short.
    logger_.Warn(
        "a call may outlive the shutdown grace",
        {{"default_call_timeout_ms", absl::ToInt64Milliseconds(config_.default_call_timeout)},
         {"shutdown_grace_ms", absl::ToInt64Milliseconds(config_.shutdown_grace)}});
  }
  if (absl::Status s = StartMetrics(); !s.ok()) return s;

  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(absl::StrCat(config_.listen_address, ":", config_.port),
                           ServerCredentials(config_.tls), &port_);
  // gRPC sets SO_REUSEPORT by default, so a second server on a port already taken would start
  // without complaint and silently take half of the first one's new connections (another build,
  // another database). Without it the second one fails to start, naming PORT.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  // A larger request fails with RESOURCE_EXHAUSTED before any handler (or backing service) sees
  // it.
  builder.SetMaxReceiveMessageSize(static_cast<int>(config_.grpc_max_recv_bytes));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, config_.grpc_max_concurrent_streams);
  // Long-lived HTTP/2 connections are closed now and then so that load spreads over replicas
  // added later; the grace lets in-flight calls finish first.
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS,
                             ToMillisArg(config_.grpc_max_connection_age));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                             ToMillisArg(config_.shutdown_grace + absl::Seconds(5)));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 30'000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10'000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10'000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // The synchronous handlers (the ledger, the other session methods, Health/Check) block on
  // PostgreSQL/Memcached round trips. With gRPC's default of 1-2 threads waiting for new calls,
  // each call first has to wake or create a poller. Keeping 8 waiting once served 30-40% more
  // GetSession calls per second, when GetSession was synchronous. Measured again after it
  // moved to the asynchronous API (3 alternating runs each, 2 cores): with gRPC's defaults
  // Transfer at 32 in flight cost 172-184 instead of 149-159 us of server CPU per call, while
  // Health ran 1-10% faster (it does no I/O).
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MIN_POLLERS, 8);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, 16);
  for (const auto& service : services_) builder.RegisterService(service.get());
  async_queues_ = std::make_unique<AsyncCallQueues>(builder.AddCompletionQueue());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  // First, so that the call observer logs and counts the corrected code.
  interceptors.push_back(
      std::make_unique<RequestParseErrorsFactory>(SessionHandlers::SelfParsingMethods()));
  interceptors.push_back(std::make_unique<CallObserverFactory>(logger_, &metrics_));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  if (about_to_listen) about_to_listen();
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    server_.reset();
    async_queues_->Shutdown();
    async_queues_->Run();
    return absl::UnavailableError(absl::StrCat(
        "PORT: cannot listen on port ", config_.port, " of LISTEN_ADDRESS ", config_.listen_address,
        " (in use, not permitted, or not an address of this machine)"));
  }
  // Calls waiting to be matched cost a few hundred bytes each; 16 keep a burst from waiting
  // for the queue's thread to ask for the next one.
  session_handlers_->Accept(*async_queues_, 16);
  // Watch streams open once per subchannel, so rarely, but in bursts when clients start
  // together; a few requested keep the burst from waiting on the queue's thread for each.
  health_service_->Accept(*async_queues_, 4);
  // One thread: each completion is short (hand the call to the store, or delete a finished
  // call) and the answers are sent from the store's I/O thread. Measured against 2 and 4
  // threads (16 in flight, 2 cores): the same throughput or better, 10-20 us less CPU per call.
  async_thread_ = std::thread([queues = async_queues_.get()] {
    NameThisThread("sl-async-cq");
    queues->Run();
  });
  logger_.Info("listening", {{"address", config_.listen_address},
                             {"port", port_},
                             {"metrics_port", metrics_port()},
                             {"memcached_nodes", static_cast<int>(config_.memcached.nodes.size())},
                             {"memcached_replicas", config_.memcached.replicas},
                             {"tls", config_.tls.require_client_cert() ? "mutual"
                                     : config_.tls.enabled()           ? "on"
                                                                       : "off"},
                             {"database", RedactDatabaseUrl(config_.database_url)}});
  return absl::OkStatus();
}

absl::Status ServerApp::StartMetrics() {
  if (config_.metrics_port == 0) return absl::OkStatus();
  MemcachedPool* memcached = memcached_pool_.get();
  PgPool* postgres = pg_pool_.get();
  metrics_.AddSampled({"sessionledger_pool_size",
                       "Configured connections per pool",
                       false,
                       {{"pool", "memcached"}},
                       [memcached] { return double(memcached->options().size); }});
  metrics_.AddSampled({"sessionledger_pool_size",
                       "Configured connections per pool",
                       false,
                       {{"pool", "postgres"}},
                       [postgres] { return double(postgres->size()); }});
  metrics_.AddSampled({"sessionledger_pool_in_use",
                       "Connections lent to calls right now",
                       false,
                       {{"pool", "memcached"}},
                       [memcached] { return double(memcached->leased()); }});
  metrics_.AddSampled(
      {"sessionledger_pool_in_use",
       "Connections lent to calls right now",
       false,
       {{"pool", "postgres"}},
       [postgres] { return double(postgres->open_connections() - postgres->idle_connections()); }});
  metrics_.AddSampled({"sessionledger_pool_open",
                       "Connections open (idle and in use)",
                       false,
                       {{"pool", "postgres"}},
                       [postgres] { return double(postgres->open_connections()); }});
  metrics_.AddSampled({"sessionledger_pool_waits_total",
                       "Acquires that found every connection busy and had to wait",
                       true,
                       {{"pool", "postgres"}},
                       [postgres] { return double(postgres->total_waits()); }});
  metrics_.AddSampled({"sessionledger_pool_exhausted_total",
                       "Acquires that found no connection free before their deadline",
                       true,
                       {{"pool", "memcached"}},
                       [memcached] { return double(memcached->exhausted()); }});
  metrics_.AddSampled({"sessionledger_memcached_node_failures_total",
                       "Memcached operations whose node did not answer in time (a replica may "
                       "still have served the call)",
                       true,
                       {},
                       [memcached] { return double(memcached->node_failures()); }});
  if (const MemcachedPipeline* pipeline = memcached->pipeline(); pipeline != nullptr) {
    metrics_.AddSampled({"sessionledger_memcached_pipeline_batches_total",
                         "Writes of pipelined Memcached requests to a node (each carries every "
                         "request that arrived meanwhile)",
                         true,
                         {},
                         [pipeline] { return double(pipeline->batches()); }});
    metrics_.AddSampled({"sessionledger_memcached_pipelined_requests_total",
                         "Pipelined Memcached requests sent (divided by pipeline_batches_total: "
                         "the mean batch size)",
                         true,
                         {},
                         [pipeline] { return double(pipeline->batched_requests()); }});
  }
  const PgLedgerStore* ledger = ledger_store_;
  metrics_.AddSampled({"sessionledger_postgres_retries_total",
                       "Ledger statements re-run after a serialization failure, deadlock or lost "
                       "connection",
                       true,
                       {},
                       [ledger] { return double(ledger->retries()); }});
  metrics_.AddSampled({"sessionledger_postgres_batches_total",
                       "Committed ledger transactions that carried more than one Deposit/Transfer",
                       true,
                       {},
                       [ledger] { return double(ledger->batches()); }});
  metrics_.AddSampled({"sessionledger_postgres_batched_movements_total",
                       "Deposits/Transfers committed in batches (divided by batches_total: the "
                       "mean batch size)",
                       true,
                       {},
                       [ledger] { return double(ledger->batched_movements()); }});
  metrics_.AddSampled({"sessionledger_postgres_batch_fallbacks_total",
                       "Batches that failed as a whole, so each of their movements ran again alone",
                       true,
                       {},
                       [ledger] { return double(ledger->batch_fallbacks()); }});
  metrics_.AddSampled({"sessionledger_postgres_batch_queue",
                       "Deposits/Transfers waiting to join a batch now",
                       false,
                       {},
                       [ledger] { return double(ledger->queued_movements()); }});
  SL_ASSIGN_OR_RETURN(metrics_http_, MetricsHttpServer::Start(config_.listen_address,
                                                              config_.metrics_port, metrics_));
  return absl::OkStatus();
}

void ServerApp::Shutdown(absl::Duration notice, absl::Duration grace) {
  health_board_.Shutdown();
  absl::SleepFor(notice);
  health_board_.EndWatches();
  if (server_ != nullptr) server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
}

void ServerApp::Wait() {
  if (server_ != nullptr) server_->Wait();
  if (async_thread_.joinable()) {
    // gRPC's shutdown ends with the connections. An asynchronous call whose client cancelled it
    // meanwhile may still wait on Memcached or the blocking threads; it ends by its deadline
    // (the store answers every request by then), and must, before the queues shut down. (Watch
    // streams ended at the notice's end, EndWatches, or were cancelled with the connections.)
    const absl::Duration longest_call = config_.default_call_timeout + absl::Seconds(5);
    // Past that, a store broke its promise to answer by the deadline. Going on would free the
    // queues and the app that its late answer still touches (a crash); waiting keeps the process
    // to what it was told: a second stop signal, or the orchestrator's kill, ends it at once.
    async_queues_->WaitForEveryCallAndArrival(longest_call, [this, longest_call] {
      logger_.Log(LogLevel::kError,
                  "asynchronous calls still unanswered at shutdown; waiting for them (a second "
                  "stop signal exits at once)",
                  {{"waited_ms", absl::ToInt64Milliseconds(longest_call)}});
    });
    async_queues_->Shutdown();
    async_thread_.join();
  }
  health_monitor_.reset();
}

}  // namespace sessionledger
