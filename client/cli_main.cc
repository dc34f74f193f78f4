// sessionledger-cli: a command-line client for every sessionledger RPC, and a load generator.
// Everything lives in the sl_client library; main only hands it argv, the environment and the
// standard streams, and checks that what went to stdout was written.
#include <grpcpp/support/status_code_enum.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "client/commands.h"
#include "server/common/openssl_lifetime.h"

namespace {

// The exit code when stdout cannot take the output (a full disk, say). The call may have taken
// effect, a session created or money moved, while its answer (a session token) is gone: that is
// DATA_LOSS. Not UNAVAILABLE, which scripts retry, repeating a call that did its work.
constexpr int kCannotWriteOutput = static_cast<int>(grpc::StatusCode::DATA_LOSS);

}  // namespace

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
  const int code = sessionledger::client::RunCli(args, env, std::cout, std::cerr);
  // std::cout goes through C stdio's buffer, and a write that fails (ENOSPC) mostly shows only
  // when that is flushed, after RunCli returned; the exit handlers' flush would ignore it. errno
  // is cleared first so that only this flush names a cause: after an earlier failed write the
  // stream is bad already and flush() writes nothing.
  errno = 0;
  std::cout.flush();
  if (!std::cout) {
    const int error = errno;
    std::cerr << "sessionledger-cli: cannot write output";
    if (error != 0) std::cerr << ": " << std::strerror(error);
    std::cerr << "\n";
    // A command that failed wrote nothing to stdout, and its own code says more.
    return code != 0 ? code : kCannotWriteOutput;
  }
  return code;
}
