#include "tests/support/server_process.h"

#include <fcntl.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/support/test_env.h"

namespace sessionledger::testing {

std::map<std::string, std::optional<std::string>> BackingServiceEnv() {
  return {{"MEMCACHED_URL", RequiredEnv("MEMCACHED_URL")},
          {"DATABASE_URL", RequiredEnv("DATABASE_URL")}};
}

namespace {

bool PortAcceptsConnections(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const bool connected = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return connected;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(Options options) {
  // A free port is only free until someone takes it: between FreeTcpPort() and the server's
  // bind, another test's connection or listener can get it. The server then refuses to start,
  // naming PORT or METRICS_PORT; a port chosen here is chosen again.
  const bool port_chosen_here = options.env.count("PORT") == 0;
  for (int attempt = 1;; ++attempt) {
    absl::StatusOr<std::unique_ptr<ServerProcess>> process = StartOnce(options);
    if (process.ok() || attempt == 3) return process;
    const absl::string_view why = process.status().message();
    // "METRICS_PORT: cannot listen" ends in "PORT: cannot listen" too.
    const bool metrics_port_taken = absl::StrContains(why, "METRICS_PORT: cannot listen");
    const bool port_taken = !metrics_port_taken && absl::StrContains(why, "PORT: cannot listen");
    if (!(port_taken && port_chosen_here) && !(metrics_port_taken && options.serve_metrics)) {
      return process;
    }
  }
}

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::StartOnce(const Options& options) {
  std::unique_ptr<ServerProcess> process(new ServerProcess());
  std::map<std::string, std::optional<std::string>> overrides = {{"METRICS_PORT", "0"}};
  for (const auto& [k, v] : options.env) overrides[k] = v;
  // Ports chosen here have not been bound yet, so the kernel may offer the same one twice; the
  // server would then refuse two listeners on one port.
  const auto free_port_but = [&overrides](const char* other) {
    std::string port;
    do {
      port = absl::StrCat(FreeTcpPort());
    } while (overrides.count(other) != 0 && overrides.at(other) == port);
    return port;
  };
  if (options.env.count("PORT") == 0) overrides["PORT"] = free_port_but("METRICS_PORT");
  if (options.serve_metrics) overrides["METRICS_PORT"] = free_port_but("PORT");
  const std::map<std::string, std::string> env = EnvironmentWith(overrides);
  if (auto it = env.find("PORT"); it != env.end()) {
    process->port_ = std::atoi(it->second.c_str());
  }
  if (auto it = env.find("METRICS_PORT"); it != env.end()) {
    process->metrics_port_ = std::atoi(it->second.c_str());
  }
  std::vector<std::string> args = options.wrapper;
  args.push_back(SL_SERVER_BINARY);
  args.insert(args.end(), options.args.begin(), options.args.end());
  absl::StatusOr<ChildProcess> child = SpawnWithOutputPipe(args, env);
  if (!child.ok()) return child.status();
  const pid_t pid = child->pid;
  process->pid_ = pid;
  const int read_fd = child->output_fd;
  process->reader_ = std::thread([p = process.get(), read_fd] { p->ReadOutput(read_fd); });

  if (!options.wait_until_serving) return process;
  // Wait for the port with plain TCP first: a gRPC channel that connects too early sits in
  // reconnect backoff for seconds after the server is up.
  const absl::Time give_up = absl::Now() + options.startup_timeout;
  while (!PortAcceptsConnections(process->port_) && absl::Now() < give_up) {
    if (auto code = process->WaitForExit(absl::ZeroDuration()); code.has_value()) {
      return absl::FailedPreconditionError(
          absl::StrCat("server exited with ", *code, " during start-up:\n", process->Output()));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  auto channel = process->NewChannel();
  auto stub = grpc::health::v1::Health::NewStub(channel);
  while (absl::Now() < give_up) {
    if (auto code = process->WaitForExit(absl::ZeroDuration()); code.has_value()) {
      return absl::FailedPreconditionError(
          absl::StrCat("server exited with ", *code, " during start-up:\n", process->Output()));
    }
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Milliseconds(500)));
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    grpc::Status check = stub->Check(&context, request, &response);
    if (check.ok() && response.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
      return process;
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
  return absl::DeadlineExceededError(
      absl::StrCat("server did not serve within the start-up timeout:\n", process->Output()));
}

ServerProcess::~ServerProcess() {
  // The reader must reach the end of the output to be joined.
  ResumeOutput();
  if (pid_ > 0 && !exit_code_.has_value()) {
    kill(pid_, SIGKILL);
    WaitForExit(absl::Seconds(10));
  }
  if (reader_.joinable()) reader_.join();
}

std::string ServerProcess::target() const { return absl::StrCat("127.0.0.1:", port_); }

std::shared_ptr<grpc::Channel> ServerProcess::NewChannel() const {
  grpc::ChannelArguments args;
  // A fresh connection per channel, so tests that restart servers never share a subchannel.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  // Tests restart servers: reconnect within a second, not after gRPC's default backoff of up to
  // 120 s.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return grpc::CreateCustomChannel(target(), grpc::InsecureChannelCredentials(), args);
}

void ServerProcess::Signal(int signal_number) {
  if (pid_ > 0 && !exit_code_.has_value()) kill(pid_, signal_number);
}

std::optional<int> ServerProcess::WaitForExit(absl::Duration timeout) {
  if (exit_code_.has_value()) return exit_code_;
  const absl::Time give_up = absl::Now() + timeout;
  for (;;) {
    int wstatus = 0;
    const pid_t done = waitpid(pid_, &wstatus, WNOHANG);
    if (done == pid_) {
      exit_code_ = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : 128 + WTERMSIG(wstatus);
      // The child is gone but the reader may not have drained the pipe yet: without this wait a
      // test could read the output before the child's last lines reach it. Bounded, because a
      // grandchild could hold the pipe open.
      std::unique_lock<std::mutex> lock(output_mutex_);
      output_changed_.wait_for(lock, std::chrono::seconds(10),
                               [this] { return output_at_eof_ || output_paused_; });
      return exit_code_;
    }
    if (absl::Now() >= give_up) return std::nullopt;
    absl::SleepFor(absl::Milliseconds(20));
  }
}

std::string ServerProcess::Output() const {
  std::lock_guard<std::mutex> lock(output_mutex_);
  return output_;
}

bool ServerProcess::WaitForOutput(absl::string_view text, absl::Duration timeout) const {
  std::unique_lock<std::mutex> lock(output_mutex_);
  return output_changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] {
    return output_at_eof_ || absl::StrContains(output_, text);
  }) && absl::StrContains(output_, text);
}

void ServerProcess::PauseOutput() {
  std::lock_guard<std::mutex> lock(output_mutex_);
  output_paused_ = true;
}

void ServerProcess::ResumeOutput() {
  {
    std::lock_guard<std::mutex> lock(output_mutex_);
    output_paused_ = false;
  }
  output_changed_.notify_all();
}

void ServerProcess::ReadOutput(int fd) {
  char buffer[4096];
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(output_mutex_);
      output_changed_.wait(lock, [this] { return !output_paused_; });
    }
    const ssize_t got = read(fd, buffer, sizeof(buffer));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    {
      std::lock_guard<std::mutex> lock(output_mutex_);
      output_.append(buffer, static_cast<size_t>(got));
    }
    output_changed_.notify_all();
  }
  close(fd);
  {
    std::lock_guard<std::mutex> lock(output_mutex_);
    output_at_eof_ = true;
  }
  output_changed_.notify_all();
}

}  // namespace sessionledger::testing
