#ifndef SESSIONLEDGER_TESTS_SUPPORT_SERVER_PROCESS_H_
#define SESSIONLEDGER_TESTS_SUPPORT_SERVER_PROCESS_H_

#include <grpcpp/channel.h>
#include <sys/types.h>

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace sessionledger::testing {

// A real sessionledger-server child process, as operators run it: configured by environment
// only, stdout/stderr captured for assertions. The destructor kills it if still running.
class ServerProcess {
 public:
  struct Options {
    // Applied on top of this process's environment; std::nullopt unsets the variable. PORT
    // defaults to a free port and METRICS_PORT to 0 unless set here.
    std::map<std::string, std::optional<std::string>> env;
    // Serve /metrics on a free port that Start chooses (metrics_port()); leave METRICS_PORT out
    // of `env` then. A port a test chooses itself can be taken before the server binds it, and
    // the server then refuses to start; one chosen here is chosen again.
    bool serve_metrics = false;
    std::vector<std::string> args;
    // Runs the server under this command (say {"unshare", "--pid", "--fork"}): pid() and
    // Signal() then reach the wrapper, which the test must see through itself.
    std::vector<std::string> wrapper;
    // Wait until the process answers health checks (Start fails otherwise).
    bool wait_until_serving = true;
    absl::Duration startup_timeout = absl::Seconds(30);
  };

  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(Options options);
  ~ServerProcess();

  int port() const { return port_; }
  // The /metrics port (Options::serve_metrics or METRICS_PORT), 0 when metrics are off.
  int metrics_port() const { return metrics_port_; }
  std::string target() const;
  std::shared_ptr<grpc::Channel> NewChannel() const;
  pid_t pid() const { return pid_; }

  void Signal(int signal_number);
  // The exit code (or 128 + signal), or std::nullopt when still running after `timeout`. Once it
  // returns a code, Output() holds everything the process wrote.
  std::optional<int> WaitForExit(absl::Duration timeout);
  // Everything written to stdout and stderr so far.
  std::string Output() const;
  // Whether `text` appears in the output within `timeout`. A line the child has written can reach
  // Output() a little later, so a test expecting one waits here rather than reading once.
  bool WaitForOutput(absl::string_view text, absl::Duration timeout) const;
  // Stops reading the child's output until ResumeOutput, as a log shipper that stalled: once
  // its stdout pipe is full, every write to it blocks. (A read already under way still ends.)
  // While paused, WaitForExit does not wait for the rest of the output.
  void PauseOutput();
  void ResumeOutput();

 private:
  ServerProcess() = default;
  static absl::StatusOr<std::unique_ptr<ServerProcess>> StartOnce(const Options& options);
  void ReadOutput(int fd);

  pid_t pid_ = -1;
  int port_ = 0;
  int metrics_port_ = 0;
  std::optional<int> exit_code_;
  mutable std::mutex output_mutex_;
  mutable std::condition_variable output_changed_;
  bool output_at_eof_ = false;
  bool output_paused_ = false;
  std::string output_;
  std::thread reader_;
};

// The environment a server needs for the backing services that scripts/test started.
std::map<std::string, std::optional<std::string>> BackingServiceEnv();

}  // namespace sessionledger::testing

#endif  // SESSIONLEDGER_TESTS_SUPPORT_SERVER_PROCESS_H_
