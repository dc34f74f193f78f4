// sessionledger-server: thin entry point. Reads the environment once, then either migrates the
// schema or serves until SIGTERM/SIGINT.
#include <signal.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include "absl/time/clock.h"
#include "server/app/server_app.h"
#include "server/config/config.h"
#include "server/postgres/migrations.h"

namespace sessionledger {
namespace {

int Fail(const absl::Status& status) {
  // One line on stderr, before anything listens: operators see it in `kubectl logs` / compose.
  std::fprintf(stderr, "sessionledger-server: %s\n", std::string(status.message()).c_str());
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

int Migrate() {
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

int Serve() {
  // Block the stop signals in every thread (gRPC's included) before any is created; one thread
  // below waits for them with sigwait.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  absl::StatusOr<Config> config = LoadConfig(ProcessEnvironment());
  if (!config.ok()) return Fail(config.status());
  Logger logger(config->log_level);

  absl::StatusOr<std::unique_ptr<ServerApp>> app = ServerApp::Create(*config, logger);
  if (!app.ok()) return Fail(app.status());
  if (absl::Status started = (*app)->Start(); !started.ok()) return Fail(started);

  std::thread signal_waiter([&] {
    int signal_number = 0;
    sigwait(&stop_signals, &signal_number);
    logger.Info("shutting down", {{"signal", strsignal(signal_number)},
                                  {"grace_seconds", absl::ToInt64Seconds(config->shutdown_grace)}});
    (*app)->Shutdown(config->shutdown_grace);
  });
  (*app)->Wait();
  signal_waiter.join();
  logger.Info("stopped");
  return 0;
}

}  // namespace
}  // namespace sessionledger

int main(int argc, char** argv) {
  const std::string command = argc > 1 ? argv[1] : "";
  if (command == "--help" || command == "-h" || command == "help") {
    std::fputs(sessionledger::ConfigHelpText().c_str(), stdout);
    return 0;
  }
  if (argc > 2 || (argc == 2 && command != "migrate" && command != "serve")) {
    std::fprintf(stderr, "sessionledger-server: unknown arguments; see --help\n");
    return 2;
  }
  if (command == "migrate") return sessionledger::Migrate();
  return sessionledger::Serve();
}
