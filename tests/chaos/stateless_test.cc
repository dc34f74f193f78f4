// The server keeps no state of its own: its memory does not grow with the number of sessions
// it has served (they live in Memcached), and it runs on a read-only filesystem (it writes no
// files: logs go to stdout, everything else to Memcached and PostgreSQL).
#include <fcntl.h>
#include <grpcpp/create_channel.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "sessionledger/v1/session.grpc.pb.h"
#include "sessionledger/v1/transaction.grpc.pb.h"
#include "tests/support/server_process.h"
#include "tests/support/test_env.h"

extern char** environ;

namespace sessionledger::testing {
namespace {

namespace pb = ::sessionledger::v1;

std::shared_ptr<grpc::Channel> ChannelTo(int port, int index) {
  grpc::ChannelArguments args;
  // One connection per channel, so the client threads spread over several HTTP/2 connections
  // like independent callers would.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt("sessionledger.test_channel_index", index);
  return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                   grpc::InsecureChannelCredentials(), args);
}

// VmRSS of `pid` in KiB, or -1.
int64_t RssKib(pid_t pid) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (!absl::StartsWith(line, "VmRSS:")) continue;
    std::vector<std::string> parts = absl::StrSplit(line, ' ', absl::SkipEmpty());
    int64_t kib = -1;
    if (parts.size() >= 2 && absl::SimpleAtoi(parts[1], &kib)) return kib;
  }
  return -1;
}

// Creates `total` sessions and reads each back, from `threads` threads (each with its own
// channel). Returns how many calls failed.
int64_t CreateAndRead(int port, int64_t total, int threads, const std::string& prefix) {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> failed{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      auto stub = pb::SessionService::NewStub(ChannelTo(port, t));
      for (int64_t i = next++; i < total; i = next++) {
        pb::CreateSessionRequest create;
        create.set_user_id(absl::StrCat(prefix, "-", i % 1000));
        // Short-lived: these only exercise the server; Memcached drops them soon after.
        create.set_ttl_seconds(120);
        (*create.mutable_attributes())["n"] = absl::StrCat(i);
        pb::Session session;
        grpc::ClientContext c1;
        c1.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
        if (!stub->CreateSession(&c1, create, &session).ok()) {
          failed++;
          continue;
        }
        pb::GetSessionRequest get;
        get.set_token(session.token());
        pb::Session got;
        grpc::ClientContext c2;
        c2.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
        if (!stub->GetSession(&c2, get, &got).ok() || got.attributes().at("n") != absl::StrCat(i)) {
          failed++;
        }
      }
    });
  }
  for (std::thread& w : workers) w.join();
  return failed;
}

#if defined(__SANITIZE_ADDRESS__)
// ASan's own bookkeeping grows with the calls served even when the server's memory does not:
// +15% over the five rounds with an 8 MiB quarantine, where the same test without ASan stays
// within 1% (both measured on this test). A leak of ~200 bytes a call, which ASan's redzones
// make ~300, would still show as +35% or more.
constexpr int64_t kAllowedGrowthPercent = 30;
#else
constexpr int64_t kAllowedGrowthPercent = 10;
#endif

TEST(StatelessTest, RssStaysFlatAcross100000Sessions) {
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  options.env["LOG_LEVEL"] = "warn";
  // Under AddressSanitizer (scripts/test --sanitize) freed memory waits in a quarantine of
  // 256 MiB by default, which the warm-up does not fill: RSS then climbs round after round
  // until it is full, and the check measured ASan rather than the server (seen in CI: +12%).
  // A small quarantine is full before the warm-up ends. Ignored by builds without ASan.
  const char* asan_options = std::getenv("ASAN_OPTIONS");
  options.env["ASAN_OPTIONS"] = absl::StrCat(
      asan_options != nullptr ? asan_options : "",
      asan_options != nullptr && *asan_options != '\0' ? ":" : "", "quarantine_size_mb=8");
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(options);
  ASSERT_TRUE(server.ok()) << server.status();
  const pid_t pid = (*server)->pid();
  const int port = (*server)->port();
  constexpr int kThreads = 16;
  const std::string prefix = absl::StrCat("rss-", absl::ToUnixMillis(absl::Now()));

  // Warm-up with the same concurrency: gRPC's thread pool, malloc arenas and both connection
  // pools reach their working size here, so what follows measures growth per session only.
  const absl::Time start = absl::Now();
  ASSERT_EQ(CreateAndRead(port, 20'000, kThreads, prefix + "-warm"), 0);
  const int64_t rss_warm = RssKib(pid);
  ASSERT_GT(rss_warm, 0);

  // Five rounds of 20,000, each with fresh connections (as callers come and go), so the
  // printout shows a trend: a leak grows round after round, a working set does not.
  int64_t rss_max = rss_warm;
  int64_t failed = 0;
  std::vector<int64_t> rounds;
  // SL_STATELESS_ROUNDS runs more rounds by hand, to tell a slow leak from allocator noise.
  const char* rounds_env = std::getenv("SL_STATELESS_ROUNDS");
  const int round_count =
      rounds_env != nullptr && std::atoi(rounds_env) > 0 ? std::atoi(rounds_env) : 5;
  for (int round = 0; round < round_count; ++round) {
    failed += CreateAndRead(port, 20'000, kThreads, absl::StrCat(prefix, "-", round));
    rounds.push_back(RssKib(pid));
    rss_max = std::max(rss_max, rounds.back());
  }
  const int64_t rss_after = rounds.back();
  std::cout << "[stateless] " << 20'000 * round_count << " sessions created and read in "
            << absl::FormatDuration(absl::Now() - start) << " (incl. 20000 warm-up), " << kThreads
            << " client threads; VmRSS KiB after warm-up " << rss_warm
            << ", after each 20000: " << absl::StrJoin(rounds, " ") << " (max "
            << (100.0 * (rss_max - rss_warm) / rss_warm) << "% over warm-up); failed calls "
            << failed << std::endl;
  EXPECT_EQ(failed, 0);
  EXPECT_LE(rss_max, rss_warm + rss_warm * kAllowedGrowthPercent / 100)
      << "server memory grew with the sessions served";
  EXPECT_LE(rss_after, rss_warm + rss_warm * kAllowedGrowthPercent / 100);
}

// Runs the server in a private mount namespace in which every mount point is remounted
// read-only, with its working directory in a directory that is writable outside. Before
// exec'ing the server, the wrapper proves that writes fail there (the control: without it a
// broken remount would let this test pass while testing nothing).
constexpr char kReadOnlyWrapper[] = R"sh(
set -u
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r m; do
  m=$(printf '%b' "$m")  # mountinfo escapes spaces as \040.
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
for d in "$PWD" / /tmp /var/tmp /dev/shm "${HOME:-/root}"; do
  if ( : >"$d/.sessionledger-ro-probe" ) 2>/dev/null; then
    echo "ro-check: FAILED, $d is writable"
    exit 99
  fi
done
echo "ro-check: ok, no writable directory"
exec "$1"
)sh";

class ReadOnlyServer {
 public:
  ~ReadOnlyServer() {
    if (pid_ > 0 && !exit_code_.has_value()) {
      kill(pid_, SIGKILL);
      Wait(absl::Seconds(10));
    }
    if (reader_.joinable()) reader_.join();
  }

  // Starts the wrapper in `cwd` with `env` added to this process's environment.
  bool Start(const std::string& cwd, const std::map<std::string, std::string>& env) {
    std::vector<std::string> env_strings;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string entry(*e);
      const std::string name = entry.substr(0, entry.find('='));
      if (env.count(name) == 0) env_strings.push_back(entry);
    }
    for (const auto& [k, v] : env) env_strings.push_back(absl::StrCat(k, "=", v));
    std::vector<char*> envp;
    for (auto& s : env_strings) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::vector<std::string> args = {"unshare",        "--mount",      "--propagation",
                                     "private",        "/bin/sh",      "-c",
                                     kReadOnlyWrapper, "sl-read-only", SL_SERVER_BINARY};
    std::vector<char*> argp;
    for (auto& a : args) argp.push_back(a.data());
    argp.push_back(nullptr);
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return false;
    pid_ = fork();
    if (pid_ < 0) return false;
    if (pid_ == 0) {
      dup2(fds[1], 1);
      dup2(fds[1], 2);
      if (chdir(cwd.c_str()) != 0) _exit(126);
      execvpe(argp[0], argp.data(), envp.data());
      _exit(127);
    }
    close(fds[1]);
    reader_ = std::thread([this, fd = fds[0]] {
      char buffer[4096];
      ssize_t got;
      while ((got = read(fd, buffer, sizeof(buffer))) > 0) {
        std::lock_guard<std::mutex> lock(mu_);
        output_.append(buffer, static_cast<size_t>(got));
      }
      close(fd);
    });
    return true;
  }

  std::optional<int> Wait(absl::Duration timeout) {
    if (exit_code_.has_value()) return exit_code_;
    const absl::Time give_up = absl::Now() + timeout;
    do {
      int wstatus = 0;
      if (waitpid(pid_, &wstatus, WNOHANG) == pid_) {
        exit_code_ = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : 128 + WTERMSIG(wstatus);
        return exit_code_;
      }
      absl::SleepFor(absl::Milliseconds(20));
    } while (absl::Now() < give_up);
    return std::nullopt;
  }

  std::string Output() {
    std::lock_guard<std::mutex> lock(mu_);
    return output_;
  }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  std::optional<int> exit_code_;
  std::thread reader_;
  std::mutex mu_;
  std::string output_;
};

bool Serving(int port) {
  auto stub = grpc::health::v1::Health::NewStub(ChannelTo(port, 0));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Milliseconds(500)));
  grpc::health::v1::HealthCheckRequest request;
  grpc::health::v1::HealthCheckResponse response;
  return stub->Check(&context, request, &response).ok() &&
         response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

TEST(StatelessTest, ServesSessionsAndTransfersWithARootFilesystemThatIsReadOnly) {
  // Writable from out here: only the namespace's remount makes it read-only for the server.
  char dir_template[] = "/tmp/sessionledger-ro-XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  const std::string cwd = dir_template;
  // A free port is only free until someone takes it: the server binds it after its wrapper
  // has remounted everything and it has connected its pools, and any process on the machine
  // binding port 0 meanwhile can be given the same port. The server then refuses to start
  // naming PORT, and the port is chosen again.
  std::unique_ptr<ReadOnlyServer> started;
  int port = 0;
  bool serving = false;
  for (int attempt = 1; attempt <= 3 && !serving; ++attempt) {
    port = FreeTcpPort();
    started = std::make_unique<ReadOnlyServer>();
    ASSERT_TRUE(started->Start(cwd, {{"PORT", absl::StrCat(port)},
                                     {"METRICS_PORT", "0"},
                                     {"MEMCACHED_URL", RequiredEnv("MEMCACHED_URL")},
                                     {"DATABASE_URL", RequiredEnv("DATABASE_URL")}}));
    const absl::Time give_up = absl::Now() + absl::Seconds(30);
    while (!serving && absl::Now() < give_up && !started->Wait(absl::ZeroDuration()).has_value()) {
      serving = Serving(port);
      if (!serving) absl::SleepFor(absl::Milliseconds(100));
    }
    // Its last line can reach our reader after the exit.
    const bool port_taken =
        !serving && started->Wait(absl::ZeroDuration()).has_value() &&
        PollUntil(absl::Now() + absl::Seconds(5), [&] {
          return absl::StrContains(started->Output(), "sessionledger-server: PORT: cannot listen");
        });
    if (!port_taken) break;
  }
  ReadOnlyServer& server = *started;
  ASSERT_TRUE(serving) << server.Output();
  // The wrapper's line can reach our reader after the server already answers.
  PollUntil(absl::Now() + absl::Seconds(10),
            [&] { return absl::StrContains(server.Output(), "ro-check:"); });
  ASSERT_TRUE(absl::StrContains(server.Output(), "ro-check: ok")) << server.Output();

  auto channel = ChannelTo(port, 1);
  auto sessions = pb::SessionService::NewStub(channel);
  auto ledger = pb::TransactionService::NewStub(channel);
  auto context = [](const std::string& token) {
    auto c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    if (!token.empty()) c->AddMetadata("authorization", "Bearer " + token);
    return c;
  };
  const std::string user = absl::StrCat("ro-", absl::ToUnixMillis(absl::Now()));
  pb::CreateSessionRequest create;
  create.set_user_id(user);
  pb::Session session;
  ASSERT_TRUE(sessions->CreateSession(context("").get(), create, &session).ok());
  pb::UpdateSessionRequest update;
  update.set_token(session.token());
  (*update.mutable_set())["k"] = "v";
  pb::Session updated;
  ASSERT_TRUE(sessions->UpdateSession(context("").get(), update, &updated).ok());
  EXPECT_EQ(updated.version(), 2);
  pb::GetSessionRequest get;
  get.set_token(session.token());
  pb::Session got;
  ASSERT_TRUE(sessions->GetSession(context("").get(), get, &got).ok());
  EXPECT_EQ(got.attributes().at("k"), "v");

  const std::string token = session.token();
  pb::OpenAccountRequest open;
  open.set_currency("EUR");
  pb::Account a, b;
  ASSERT_TRUE(ledger->OpenAccount(context(token).get(), open, &a).ok());
  ASSERT_TRUE(ledger->OpenAccount(context(token).get(), open, &b).ok());
  pb::DepositRequest deposit;
  deposit.set_account_id(a.account_id());
  deposit.set_amount_minor(1000);
  deposit.set_idempotency_key(user + "-d");
  pb::Transaction t;
  ASSERT_TRUE(ledger->Deposit(context(token).get(), deposit, &t).ok());
  pb::TransferRequest transfer;
  transfer.set_from_account_id(a.account_id());
  transfer.set_to_account_id(b.account_id());
  transfer.set_amount_minor(250);
  transfer.set_idempotency_key(user + "-t");
  ASSERT_TRUE(ledger->Transfer(context(token).get(), transfer, &t).ok());
  pb::GetAccountRequest get_account;
  get_account.set_account_id(b.account_id());
  pb::Account got_b;
  ASSERT_TRUE(ledger->GetAccount(context(token).get(), get_account, &got_b).ok());
  EXPECT_EQ(got_b.balance_minor(), 250);

  // The drain needs no files either.
  kill(server.pid(), SIGTERM);
  EXPECT_EQ(server.Wait(absl::Seconds(30)), 0) << server.Output();
  // Clean-up only: "ro-check: ok" already showed that the server could not write here.
  rmdir(cwd.c_str());
}

}  // namespace
}  // namespace sessionledger::testing
