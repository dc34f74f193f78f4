#include "tests/support/test_env.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

extern char** environ;

namespace sessionledger::testing {

std::string RequiredEnv(const std::string& name) {
  const char* value = std::getenv(name.c_str());
  if (value == nullptr || *value == '\0') {
    ADD_FAILURE() << name
                  << " is not set: run the suite through ./scripts/test, which starts memcached "
                     "and PostgreSQL and exports their URLs";
    return "";
  }
  return value;
}

std::map<std::string, std::string> EnvironmentWith(
    const std::map<std::string, std::optional<std::string>>& overrides) {
  std::map<std::string, std::string> merged;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string entry(*e);
    const size_t eq = entry.find('=');
    if (eq != std::string::npos) merged[entry.substr(0, eq)] = entry.substr(eq + 1);
  }
  for (const auto& [k, v] : overrides) {
    if (v.has_value()) {
      merged[k] = *v;
    } else {
      merged.erase(k);
    }
  }
  return merged;
}

absl::StatusOr<ChildProcess> SpawnWithOutputPipe(const std::vector<std::string>& argv,
                                                 const std::map<std::string, std::string>& env) {
  std::vector<std::string> env_strings;
  for (const auto& [k, v] : env) env_strings.push_back(absl::StrCat(k, "=", v));
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = argv;
  std::vector<char*> argp;
  for (auto& a : args) argp.push_back(a.data());
  argp.push_back(nullptr);

  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) != 0) return absl::InternalError("pipe failed");
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    dup2(pipe_fds[1], 1);
    dup2(pipe_fds[1], 2);
    const int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, 0);
    execvpe(argp[0], argp.data(), envp.data());
    _exit(127);
  }
  close(pipe_fds[1]);
  return ChildProcess{pid, pipe_fds[0]};
}

absl::StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv,
                                         const std::map<std::string, std::string>& env,
                                         absl::Duration timeout) {
  std::map<std::string, std::optional<std::string>> overrides(env.begin(), env.end());
  absl::StatusOr<ChildProcess> child = SpawnWithOutputPipe(argv, EnvironmentWith(overrides));
  if (!child.ok()) return child.status();
  const pid_t pid = child->pid;
  const int output_fd = child->output_fd;
  CommandResult result;
  const absl::Time deadline = absl::Now() + timeout;
  char buffer[4096];
  bool timed_out = false;
  for (;;) {
    const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left_ms <= 0) {
      timed_out = true;
      break;
    }
    pollfd pfd{output_fd, POLLIN, 0};
    const int n = poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left_ms, 1000)));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) continue;
    const ssize_t got = read(output_fd, buffer, sizeof(buffer));
    if (got <= 0) break;
    result.output.append(buffer, static_cast<size_t>(got));
  }
  close(output_fd);
  if (timed_out) kill(pid, SIGKILL);
  int wstatus = 0;
  waitpid(pid, &wstatus, 0);
  result.exit_code = (!timed_out && WIFEXITED(wstatus)) ? WEXITSTATUS(wstatus) : -1;
  return result;
}

void BackingServices(const std::vector<std::string>& args) {
  const char* script = std::getenv("SL_BACKING_SERVICES");
  std::vector<std::string> argv = {
      script != nullptr ? script : absl::StrCat(SL_SOURCE_DIR, "/scripts/backing-services")};
  argv.insert(argv.end(), args.begin(), args.end());
  absl::StatusOr<CommandResult> result = RunCommand(argv, {}, absl::Seconds(120));
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->exit_code, 0) << "backing-services " << absl::StrJoin(args, " ") << ":\n"
                                  << result->output;
}

absl::StatusOr<std::string> HttpGet(int port, const std::string& path, bool over_ipv6) {
  const int fd = socket(over_ipv6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::UnavailableError("no socket of that family");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  sockaddr_in6 addr6{};
  addr6.sin6_family = AF_INET6;
  addr6.sin6_addr = in6addr_loopback;
  addr6.sin6_port = htons(static_cast<uint16_t>(port));
  const int connected = over_ipv6 ? connect(fd, reinterpret_cast<sockaddr*>(&addr6), sizeof(addr6))
                                  : connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  const std::string host = over_ipv6 ? "[::1]" : "127.0.0.1";
  if (connected != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("nothing listens on ", host, ":", port));
  }
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ", host, "\r\n\r\n");
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return absl::UnavailableError("short write");
  }
  std::string response;
  char buffer[4096];
  ssize_t n;
  while ((n = read(fd, buffer, sizeof(buffer))) > 0) response.append(buffer, n);
  close(fd);
  return response;
}

bool RpcsInFlight(int metrics_port, int calls) {
  const absl::StatusOr<std::string> metrics = HttpGet(metrics_port, "/metrics");
  return metrics.ok() &&
         absl::StrContains(*metrics, absl::StrCat("\nsessionledger_rpc_in_flight ", calls, "\n"));
}

pid_t MemcachedPid(int node) {
  const std::string state = RequiredEnv("SL_STATE_DIR");
  for (const std::string& dir : {state + "/run", state + "/runtime/run"}) {
    std::ifstream in(absl::StrCat(dir, "/memcached-", node, ".pid"));
    pid_t pid = 0;
    if (in >> pid && pid > 0) return pid;
  }
  return 0;
}

bool EveryThreadStopped(pid_t pid) {
  std::error_code error;
  std::filesystem::directory_iterator tasks(absl::StrCat("/proc/", pid, "/task"), error);
  if (error) return false;
  for (const std::filesystem::directory_entry& task : tasks) {
    std::ifstream stat(task.path() / "stat");
    std::stringstream text;
    text << stat.rdbuf();
    // "tid (comm) S ...": the state follows the last ')', as comm may hold one.
    const std::string line = text.str();
    const size_t close = line.rfind(')');
    if (close == std::string::npos || close + 2 >= line.size()) continue;  // Thread just ended.
    const char state = line[close + 2];
    if (state != 'T' && state != 't' && state != 'Z' && state != 'X') return false;
  }
  return true;
}

FrozenMemcached::FrozenMemcached(std::vector<int> nodes) {
  for (int node : nodes) {
    const pid_t pid = MemcachedPid(node);
    if (pid <= 0) {
      ADD_FAILURE() << "no pid file for memcached node " << node;
      continue;
    }
    if (kill(pid, SIGSTOP) != 0) {
      ADD_FAILURE() << "SIGSTOP to memcached node " << node << " (pid " << pid
                    << "): " << std::strerror(errno);
      continue;
    }
    pids_.push_back(pid);
  }
  for (pid_t pid : pids_) {
    EXPECT_TRUE(PollUntil(
        absl::Now() + absl::Seconds(10), [pid] { return EveryThreadStopped(pid); },
        absl::Milliseconds(1)))
        << "memcached (pid " << pid << ") still has a running thread after SIGSTOP";
  }
}

FrozenMemcached::~FrozenMemcached() {
  for (pid_t pid : pids_) kill(pid, SIGCONT);
}

bool PollUntil(absl::Time give_up, const std::function<bool()>& done, absl::Duration every) {
  for (;;) {
    if (done()) return true;
    if (absl::Now() >= give_up) return false;
    absl::SleepFor(every);
  }
}

namespace {

// Binds 127.0.0.1:`port` (0: any) and lets go again; the port bound, or 0 when none was.
int BindAndRelease(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  socklen_t len = sizeof(addr);
  int bound = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    bound = ntohs(addr.sin_port);
  }
  close(fd);
  return bound;
}

// The lowest port the kernel hands to outgoing connections (Linux's default when unreadable).
int EphemeralRangeStart() {
  std::ifstream range("/proc/sys/net/ipv4/ip_local_port_range");
  int low = 0;
  if (range >> low && low > 0) return low;
  return 32768;
}

}  // namespace

int FreeTcpPort() { return BindAndRelease(0); }

int RestartableTcpPort() {
  // Above the well-known and the usual registered service ports (memcached's 11211, the
  // backing services' 2xxxx are still caught by the bind).
  constexpr int kLowest = 10000;
  const int end = EphemeralRangeStart();
  if (end <= kLowest + 100) return FreeTcpPort();
  std::random_device random;
  std::uniform_int_distribution<int> pick(kLowest, end - 1);
  for (int attempt = 0; attempt < 100; ++attempt) {
    if (const int port = BindAndRelease(pick(random)); port != 0) return port;
  }
  return FreeTcpPort();
}

SilentListener::SilentListener(int backlog) : backlog_(backlog) {
  fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      listen(fd_, backlog) != 0 ||
      getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ADD_FAILURE() << "cannot listen on 127.0.0.1: " << std::strerror(errno);
    return;
  }
  port_ = ntohs(addr.sin_port);
}

SilentListener::~SilentListener() {
  for (int fd : fillers_) close(fd);
  if (fd_ >= 0) close(fd_);
}

void SilentListener::Fill() {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port_));
  while (port_ != 0 && static_cast<int>(fillers_.size()) <= backlog_) {
    // Non-blocking, so that a kernel that drops a filler's SYN too fails the test in seconds
    // instead of hanging it for the minutes of TCP's SYN retries.
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
      ADD_FAILURE() << "cannot make a socket: " << std::strerror(errno);
      return;
    }
    fillers_.push_back(fd);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) continue;
    if (errno != EINPROGRESS) {
      ADD_FAILURE() << "cannot connect to 127.0.0.1:" << port_ << ": " << std::strerror(errno);
      return;
    }
    pollfd writable{fd, POLLOUT, 0};
    int error = 0;
    socklen_t error_len = sizeof error;
    if (poll(&writable, 1, /*timeout_ms=*/5000) != 1 ||
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &error_len) != 0 || error != 0) {
      ADD_FAILURE() << "connect " << fillers_.size() << " to 127.0.0.1:" << port_
                    << " did not complete: " << (error != 0 ? std::strerror(error) : "timed out");
      return;
    }
  }
}

}  // namespace sessionledger::testing
