// sessionledger-cli: a command-line client for every sessionledger RPC, and a load generator.
// Everything lives in the sl_client library; main only hands it argv, the environment and the
// standard streams.
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "client/commands.h"
#include "server/common/openssl_lifetime.h"

int main(int argc, char** argv) {
  // Debian's Abseil keeps absl::Mutex deadlock detection on, and gRPC locks absl mutexes on
  // every call: perf showed its cycle graph (GraphCycles) at about 3% of the load
  // generator's CPU. A process-wide setting, so it belongs here and nowhere else.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  // Before the first channel touches OpenSSL: gRPC's threads may still be in it while exit
  // handlers run.
  if (absl::Status kept = sessionledger::KeepOpenSslUntilProcessExit(); !kept.ok()) {
    std::cerr << "sessionledger-cli: " << kept.message() << "\n";
    return static_cast<int>(kept.code());
  }
  std::vector<std::string> args(argv + 1, argv + argc);
  auto env = [](const std::string& name) -> std::optional<std::string> {
    const char* value = std::getenv(name.c_str());
    if (value == nullptr) return std::nullopt;
    return std::string(value);
  };
  return sessionledger::client::RunCli(args, env, std::cout, std::cerr);
}
