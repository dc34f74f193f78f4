// sessionledger-server's entry point: reads the environment once, then migrates the schema,
// checks a local server's health (`healthcheck`, for container health checks), or serves until
// SIGTERM/SIGINT. Serving is ServerApp's; what stays here is the process's own part: the stop
// signals and the drain they start.
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/support/channel_arguments.h>
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "server/app/server_app.h"
#include "server/common/notification.h"
#include "server/common/openssl_lifetime.h"
#include "server/common/status_macros.h"
#include "server/common/thread_name.h"
#include "server/config/config.h"
#include "server/postgres/migrations.h"
#include "server/rpc/grpc_log.h"
#include "server/rpc/protobuf_log.h"

namespace sessionledger {
namespace {

int Fail(const absl::Status& status) {
  // One line on stderr, before anything listens: operators see it in `kubectl logs` / compose.
  std::fprintf(stderr, "sessionledger-server: %s\n", std::string(status.message()).c_str());
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

// In a container `migrate` is PID 1, and the kernel drops every signal PID 1 has no handler
// for: a Job deleted, or `docker compose down`, while it waited for another migrate's lock would
// wait out the whole termination grace period and be killed. Each migration is one transaction,
// so ending at once rolls back the one under way, as a lost connection does.
void StopMigrateOnSignal(int signal_number) {
  static constexpr char kStopped[] =
      "sessionledger-server: migrate stopped by a signal; a migration under way is rolled back\n";
  (void)!write(STDERR_FILENO, kStopped, sizeof(kStopped) - 1);
  _exit(128 + signal_number);
}

int Migrate() {
  struct sigaction stop = {};
  stop.sa_handler = StopMigrateOnSignal;
  sigemptyset(&stop.sa_mask);
  sigaction(SIGTERM, &stop, nullptr);
  sigaction(SIGINT, &stop, nullptr);
  absl::StatusOr<Config> config = LoadMigrateConfig(ProcessEnvironment());
  if (!config.ok()) return Fail(config.status());
  Logger logger(config->log_level);
  const absl::Time deadline = absl::Now() + absl::Minutes(5);
  absl::StatusOr<PgConnection> conn = PgConnection::Connect(config->database_url, deadline);
  if (!conn.ok()) return Fail(conn.status());
  absl::StatusOr<int> version = ApplyMigrations(*conn, logger, deadline);
  if (!version.ok()) return Fail(version.status());
  logger.Info("schema is up to date", {{"version", *version}});
  return 0;
}

// The health check speaks whatever the server's port speaks (same TLS_* variables). It asks
// its own process, so it does not verify the server's certificate (there may be no CA file in
// the container); under mutual TLS it presents the server's own certificate, which therefore
// must also be valid as a client certificate of TLS_CLIENT_CA_FILE (see SECURITY.md).
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> HealthCheckCredentials() {
  const EnvLookup env = ProcessEnvironment();
  SL_ASSIGN_OR_RETURN(TlsConfig tls, LoadTlsFiles(env("TLS_CERT_FILE"), env("TLS_KEY_FILE"),
                                                  env("TLS_CLIENT_CA_FILE")));
  if (!tls.enabled()) return grpc::InsecureChannelCredentials();
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_verify_server_certs(false);
  options.set_check_call_host(false);
  options.set_certificate_verifier(std::make_shared<grpc::experimental::NoOpCertificateVerifier>());
  if (tls.require_client_cert()) {
    options.set_certificate_provider(
        std::make_shared<grpc::experimental::StaticDataCertificateProvider>(
            std::vector<grpc::experimental::IdentityKeyCertPair>{
                {tls.private_key_pem, tls.cert_chain_pem}}));
    options.watch_identity_key_cert_pairs();
  }
  return grpc::experimental::TlsCredentials(options);
}

// For container health checks (the image has no shell or grpc_health_probe): asks the local
// server's health service for "" and exits 0 only when it is SERVING. The server is reached on
// PORT at 127.0.0.1, or at LISTEN_ADDRESS when that is neither a wildcard nor localhost.
int HealthCheck() {
  const absl::StatusOr<uint16_t> port = ListenPort(ProcessEnvironment());
  if (!port.ok()) return Fail(port.status());
  const absl::StatusOr<std::string> address = ListenAddress(ProcessEnvironment());
  if (!address.ok()) return Fail(address.status());
  const std::string target = LocalTarget(*address, *port);
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials = HealthCheckCredentials();
  if (!credentials.ok()) return Fail(credentials.status());
  // The server is this container's own loopback: never through an HTTP CONNECT proxy. gRPC takes
  // one from http_proxy, https_proxy or grpc_proxy, and Docker injects those into every
  // container from ~/.docker/config.json; the check would then ask the proxy and fail.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_ENABLE_HTTP_PROXY, 0);
  auto stub =
      grpc::health::v1::Health::NewStub(grpc::CreateCustomChannel(target, *credentials, args));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  grpc::health::v1::HealthCheckRequest request;
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) {
    std::fprintf(stderr, "sessionledger-server healthcheck: %s: %s\n", target.c_str(),
                 status.error_message().c_str());
    return 1;
  }
  const bool serving = response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
  std::printf("%s\n", serving ? "SERVING" : "NOT_SERVING");
  return serving ? 0 : 1;
}

// Waits for SIGTERM/SIGINT on a thread of its own. What a signal does depends on how far the
// process got. Before it listens there is nothing to drain, so it exits at once: start-up can
// wait up to 15 s for PostgreSQL, and an orchestrator or an operator stopping it must not wait
// that out (and then find it serving). Once it serves, the first signal starts the graceful
// shutdown; a second one ends the process at once, for an operator who will not wait out the
// grace period.
//
// The waiting thread never writes a log line itself: stdout may be a pipe whose reader has
// stalled, where a write blocks, and the thread must stay free to start the drain and to take
// the second signal.
class StopSignals {
 public:
  // `signals` must be blocked in every thread already.
  StopSignals(const sigset_t& signals, Logger& logger) : signals_(signals), logger_(logger) {
    waiter_ = std::thread([this] { WaitForSignals(); });
  }
  ~StopSignals() { Finish(); }

  // The server is about to listen: from now on a signal must let calls finish.
  void Listening() {
    std::lock_guard<std::mutex> lock(mutex_);
    phase_ = Phase::kListening;
  }

  // From now on a signal shuts `app` down gracefully; when one came while it started
  // listening, that begins now.
  void Serving(ServerApp* app, absl::Duration notice, absl::Duration grace) {
    std::lock_guard<std::mutex> lock(mutex_);
    app_ = app;
    notice_ = notice;
    grace_ = grace;
    if (phase_ == Phase::kStopping) {
      StartShutdownLocked(stop_signal_name_);
    } else {
      phase_ = Phase::kServing;
    }
  }

  // Once the app has stopped, before it is destroyed: ends the shutdown's threads, writes
  // `last_words`, and ends the waiting thread. Until the last words are written a second signal
  // still ends the process: the announcement, or they, may be stuck behind a stalled log reader.
  void Finish(const std::function<void()>& last_words = [] {}) {
    if (!waiter_.joinable()) return;
    for (bool joined = false; !joined;) {
      std::thread shutdown;
      std::thread announcement;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        shutdown = std::move(shutdown_);
        announcement = std::move(announcement_);
        joined = !shutdown.joinable() && !announcement.joinable();
        // No shutdown starts from here on (it would leave a thread unjoined): a signal now is a
        // second one.
        if (joined) phase_ = Phase::kStopping;
      }
      if (shutdown.joinable()) shutdown.join();
      if (announcement.joinable()) announcement.join();
    }
    last_words();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      phase_ = Phase::kFinished;
    }
    pthread_kill(waiter_.native_handle(), SIGTERM);  // Blocked: only sigwait takes it.
    waiter_.join();
  }

 private:
  enum class Phase { kStartingUp, kListening, kServing, kStopping, kFinished };

  // How long an exit waits for its log line.
  static constexpr absl::Duration kExitLineWait = absl::Milliseconds(250);

  void WaitForSignals() {
    NameThisThread("sl-signals");
    for (;;) {
      int signal_number = 0;
      sigwait(&signals_, &signal_number);
      std::string signal_name = strsignal(signal_number);
      std::lock_guard<std::mutex> lock(mutex_);
      switch (phase_) {
        case Phase::kFinished:
          return;
        case Phase::kStartingUp:
          LogThenExit(0, LogLevel::kInfo, "stopped before serving", signal_name);
        case Phase::kListening:
          phase_ = Phase::kStopping;  // Serving() starts the shutdown.
          stop_signal_name_ = std::move(signal_name);
          break;
        case Phase::kServing:
          StartShutdownLocked(std::move(signal_name));
          break;
        case Phase::kStopping:
          LogThenExit(1, LogLevel::kWarn,
                      "second stop signal: exiting without waiting for calls in flight",
                      signal_name);
      }
    }
  }

  // Starts the drain, then says so from a thread of its own (joined by Finish), so that a
  // stalled log reader holds up neither the drain nor the next signal.
  void StartShutdownLocked(std::string signal_name) {
    phase_ = Phase::kStopping;
    shutdown_ = std::thread([app = app_, notice = notice_, grace = grace_] {
      NameThisThread("sl-shutdown");
      app->Shutdown(notice, grace);
    });
    announcement_ =
        std::thread([this, signal_name = std::move(signal_name), notice = notice_, grace = grace_] {
          logger_.Info("shutting down", {{"signal", signal_name},
                                         {"notice_ms", absl::ToInt64Milliseconds(notice)},
                                         {"grace_seconds", absl::ToInt64Seconds(grace)}});
        });
  }

  // Ends the process with `exit_code`, after `message` when it can be written within
  // kExitLineWait: the line is written from a thread of its own, as a stalled log reader would
  // block the write, and an exit must not wait for the reader.
  [[noreturn]] void LogThenExit(int exit_code, LogLevel level, absl::string_view message,
                                const std::string& signal_name) {
    Notification written;
    // Detached, as _Exit ends it wherever it is; what it uses lives until then, since this
    // frame is never left and the logger outlives the waiting thread (Finish joins it).
    std::thread([this, &written, level, message, &signal_name] {
      logger_.Log(level, message, {{"signal", signal_name}});
      written.Notify();
    }).detach();
    written.WaitForNotificationWithTimeout(kExitLineWait);
    std::_Exit(exit_code);
  }

  const sigset_t signals_;
  Logger& logger_;
  std::mutex mutex_;
  Phase phase_ = Phase::kStartingUp;
  // The signal that came while the server started listening, for Serving() to announce.
  std::string stop_signal_name_;
  ServerApp* app_ = nullptr;
  absl::Duration notice_;
  absl::Duration grace_;
  std::thread shutdown_;
  // Writes the "shutting down" line.
  std::thread announcement_;
  std::thread waiter_;
};

int Serve() {
  // Block the stop signals in every thread (gRPC's included) before any is created; one thread
  // waits for them with sigwait.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  // A log reader that goes away (a pipe to a shipper that restarts) must not end the server:
  // the logger drops lines it cannot write.
  signal(SIGPIPE, SIG_IGN);
  absl::StatusOr<Config> config = LoadConfig(ProcessEnvironment());
  if (!config.ok()) return Fail(config.status());
  // glibc gives every thread that allocates under contention its own malloc arena, up to 8 per
  // core; with gRPC's poller threads that was 14 arenas of ~200 KiB each after the first seconds
  // of load, most of the step from idle to serving RSS. Two arenas measured no throughput loss
  // on 2 cores. MALLOC_ARENA_MAX in the environment (validated by LoadConfig) still wins: it is
  // the value set here. Before any thread exists, so that none has an arena of its own yet.
  mallopt(M_ARENA_MAX, config->malloc_arena_max);
  Logger logger(config->log_level);
  // Before any request is parsed and until the app is gone: protobuf's lines become JSON lines,
  // and the synchronous methods can name a field that is not valid UTF-8 (see the header).
  const ProtobufLogToLogger protobuf_log(logger);
  // Likewise gRPC core's lines (a failed TLS handshake, say): JSON on stdout, not text on stderr.
  const GrpcLogToLogger grpc_log(logger);
  StopSignals stop(stop_signals, logger);

  absl::StatusOr<std::unique_ptr<ServerApp>> app = ServerApp::Create(*config, logger);
  if (!app.ok()) return Fail(app.status());
  // Until the port opens, a stop signal ends the process at once: nothing has been served. The
  // first probe of the backing services, before that, may take seconds.
  if (absl::Status started = (*app)->Start([&stop] { stop.Listening(); }); !started.ok()) {
    return Fail(started);
  }
  stop.Serving(app->get(), config->shutdown_notice, config->shutdown_grace);
  (*app)->Wait();
  stop.Finish([&logger] { logger.Info("stopped"); });
  return 0;
}

}  // namespace
}  // namespace sessionledger

int main(int argc, char** argv) {
  // Debian's Abseil is built with mutex deadlock detection on, which profiling showed costing a
  // few percent of every call (gRPC takes absl mutexes on its hot path).
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  const std::string command = argc > 1 ? argv[1] : "";
  if (command == "--help" || command == "-h" || command == "help") {
    std::fputs(sessionledger::ConfigHelpText().c_str(), stdout);
    return 0;
  }
  if (argc > 2 ||
      (argc == 2 && command != "migrate" && command != "serve" && command != "healthcheck")) {
    std::fprintf(stderr, "sessionledger-server: unknown arguments; see --help\n");
    return 2;
  }
  // Before anything touches OpenSSL: gRPC's threads may still be in it while exit handlers run.
  if (absl::Status kept = sessionledger::KeepOpenSslUntilProcessExit(); !kept.ok()) {
    return sessionledger::Fail(kept);
  }
  if (command == "migrate") return sessionledger::Migrate();
  if (command == "healthcheck") return sessionledger::HealthCheck();
  return sessionledger::Serve();
}
