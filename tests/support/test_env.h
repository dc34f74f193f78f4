#ifndef SESSIONLEDGER_TESTS_SUPPORT_TEST_ENV_H_
#define SESSIONLEDGER_TESTS_SUPPORT_TEST_ENV_H_

#include <sys/types.h>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace sessionledger::testing {

// The value of an environment variable that scripts/test exports (MEMCACHED_URL,
// DATABASE_URL, ...). A missing one fails the calling test with a hint: integration tests never
// skip silently.
std::string RequiredEnv(const std::string& name);

// This process's environment with `overrides` applied; std::nullopt unsets a variable.
std::map<std::string, std::string> EnvironmentWith(
    const std::map<std::string, std::optional<std::string>>& overrides);

// A started child whose stdout and stderr go to `output_fd` (the read end of a pipe, owned by
// the caller) and whose stdin is /dev/null.
struct ChildProcess {
  pid_t pid = -1;
  int output_fd = -1;
};
// Starts argv[0] (searched in PATH) with exactly `env`.
absl::StatusOr<ChildProcess> SpawnWithOutputPipe(const std::vector<std::string>& argv,
                                                 const std::map<std::string, std::string>& env);

struct CommandResult {
  int exit_code = -1;  // -1: killed by a signal or timed out.
  std::string output;  // stdout and stderr together.
};

// Runs argv[0] (searched in PATH) with the current environment plus `env` overrides, waits at
// most `timeout`, and returns its exit code and output.
absl::StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv,
                                         const std::map<std::string, std::string>& env = {},
                                         absl::Duration timeout = absl::Seconds(60));

// Runs scripts/backing-services with `args` (e.g. {"stop-memcached", "2"}); fails the test when
// it does not exit 0.
void BackingServices(const std::vector<std::string>& args);

// A TCP port on 127.0.0.1 that was free a moment ago.
int FreeTcpPort();

// A free TCP port on 127.0.0.1 below the kernel's ephemeral range, for a server that a test
// restarts on the same port (as a pod behind a stable address). A port from FreeTcpPort() can
// be handed to any outgoing connection as its local port while the server is down, and the
// restart then fails; the kernel never hands out a port from below its range.
int RestartableTcpPort();

// A TCP socket listening on 127.0.0.1 (a free port) that never accepts: a peer that takes
// connections and never says a word. Up to `backlog` + 1 connects complete into its accept
// queue; once Fill() has taken every place, the kernel drops further SYNs, so a connect hangs
// as to a host behind a firewall. Take a backlog of at least 1: with 0, Linux completes even the
// first connect only when it sends SYN cookies (net.ipv4.tcp_syncookies).
class SilentListener {
 public:
  explicit SilentListener(int backlog);
  ~SilentListener();
  SilentListener(const SilentListener&) = delete;
  SilentListener& operator=(const SilentListener&) = delete;

  // 0 when it could not listen (the test has failed).
  int port() const { return port_; }
  // Connects until the accept queue is full (connections this object keeps open); a connect
  // that does not complete within 5 s fails the test.
  void Fill();

 private:
  int fd_ = -1;
  int port_ = 0;
  int backlog_ = 0;
  std::vector<int> fillers_;
};

// Asks `done` every `every` until it says yes or `give_up` has passed; whether it said yes. A
// test expecting something to happen waits for it this way rather than sleeping a fixed time
// and looking once, which a loaded machine can lose.
bool PollUntil(absl::Time give_up, const std::function<bool()>& done,
               absl::Duration every = absl::Milliseconds(20));

// The pid of memcached node `node` (1 or 2) that scripts/backing-services runs, from its pid
// file; 0 when there is none.
pid_t MemcachedPid(int node);

// Whether no thread of process `pid` can run any more: each is stopped (SIGSTOP) or gone. kill()
// returns before a stop takes effect, and until every thread has stopped the process can still
// act (answer a request, read a reply), so a test that stops a process waits for this.
bool EveryThreadStopped(pid_t pid);

// Memcached nodes stopped with SIGSTOP for the object's lifetime, like stalled servers: the
// kernel still accepts connections, but nothing is answered. kill() returns before the stop
// takes effect, and until every thread of the process has stopped a request can still be
// answered, so the constructor waits for that (failing the test if it does not come). Continued
// on destruction, so that a failed assertion does not leave them stopped for later tests.
class FrozenMemcached {
 public:
  explicit FrozenMemcached(std::vector<int> nodes = {1, 2});
  ~FrozenMemcached();
  FrozenMemcached(const FrozenMemcached&) = delete;
  FrozenMemcached& operator=(const FrozenMemcached&) = delete;

 private:
  std::vector<pid_t> pids_;
};

// GET http://127.0.0.1:<port><path> (http://[::1]:<port><path> `over_ipv6`) with HTTP/1.0;
// returns status line, headers and body as received. UNAVAILABLE when nothing answers.
absl::StatusOr<std::string> HttpGet(int port, const std::string& path, bool over_ipv6 = false);

// Whether the server whose /metrics is on `metrics_port` holds exactly `calls` RPCs, from their
// arrival to their answer (sessionledger_rpc_in_flight). For a test that needs a call to have
// reached the server before it acts, instead of sleeping and hoping it has.
bool RpcsInFlight(int metrics_port, int calls);

}  // namespace sessionledger::testing

#endif  // SESSIONLEDGER_TESTS_SUPPORT_TEST_ENV_H_
