// The server process as operators run it: real memcached and PostgreSQL from
// scripts/backing-services, configuration by environment, signals, exit codes and logs.
#include "tests/support/server_process.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "gtest/gtest.h"
#include "server/postgres/migrations.h"
#include "sessionledger/v1/session.grpc.pb.h"
#include "sessionledger/v1/transaction.grpc.pb.h"
#include "tests/support/silent_peer.h"
#include "tests/support/test_env.h"

namespace sessionledger::testing {
namespace {

using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;
using ::testing::HasSubstr;

constexpr char kSession[] = "sessionledger.v1.SessionService";
constexpr char kTransaction[] = "sessionledger.v1.TransactionService";

absl::StatusOr<HealthCheckResponse::ServingStatus> CheckHealth(
    const std::shared_ptr<grpc::Channel>& channel, const std::string& service) {
  auto stub = Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  HealthCheckRequest request;
  request.set_service(service);
  HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
  }
  return response.status();
}

// Polls until `service` reports `want` (health probes run every HEALTH_CHECK_INTERVAL_MS).
bool EventuallyHealth(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                      HealthCheckResponse::ServingStatus want,
                      absl::Duration timeout = absl::Seconds(10)) {
  return PollUntil(
      absl::Now() + timeout,
      [&] {
        auto status = CheckHealth(channel, service);
        return status.ok() && *status == want;
      },
      absl::Milliseconds(50));
}

// DATABASE_URL with another database name.
std::string DatabaseUrlFor(const std::string& database) {
  const std::string url = RequiredEnv("DATABASE_URL");
  const size_t query = url.find('?');
  const size_t slash = url.rfind('/', query);
  return absl::StrCat(url.substr(0, slash + 1), database,
                      query == std::string::npos ? "" : url.substr(query));
}

void RecreateDatabase(const std::string& database) {
  auto result = RunCommand({"psql", RequiredEnv("DATABASE_URL"), "-v", "ON_ERROR_STOP=1", "-qc",
                            absl::StrCat("DROP DATABASE IF EXISTS ", database, " WITH (FORCE)"),
                            "-qc", absl::StrCat("CREATE DATABASE ", database)});
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->exit_code, 0) << result->output;
}

// What psql prints for `sql` on `url` (unaligned, tuples only); a failure fails the test.
std::string Psql(const std::string& url, const std::string& sql) {
  auto result = RunCommand({"psql", url, "-v", "ON_ERROR_STOP=1", "-Atc", sql});
  EXPECT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result.ok() ? result->exit_code : -1, 0) << (result.ok() ? result->output : "");
  return result.ok() ? result->output : std::string();
}

// A new database `database`, migrated by this release.
void RecreateMigratedDatabase(const std::string& database) {
  RecreateDatabase(database);
  auto migrated =
      RunCommand({SL_SERVER_BINARY, "migrate"}, {{"DATABASE_URL", DatabaseUrlFor(database)}});
  ASSERT_TRUE(migrated.ok()) << migrated.status();
  ASSERT_EQ(migrated->exit_code, 0) << migrated->output;
}

// Opens a EUR account for the session's user.
grpc::Status OpenEuroAccount(sessionledger::v1::TransactionService::Stub& ledger,
                             const std::string& token, sessionledger::v1::Account* account) {
  grpc::ClientContext context;
  context.AddMetadata("authorization", "Bearer " + token);
  sessionledger::v1::OpenAccountRequest request;
  request.set_currency("EUR");
  return ledger.OpenAccount(&context, request, account);
}

// With `serve_metrics`, /metrics is served on the server's metrics_port().
std::unique_ptr<ServerProcess> StartServer(
    std::map<std::string, std::optional<std::string>> extra_env = {}, bool serve_metrics = false) {
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  options.env["HEALTH_CHECK_INTERVAL_MS"] = "100";
  for (auto& [k, v] : extra_env) options.env[k] = v;
  options.serve_metrics = serve_metrics;
  auto server = ServerProcess::Start(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

TEST(ServerProcessTest, HealthIsServingForEveryServiceWithRealBackends) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto channel = server->NewChannel();
  EXPECT_TRUE(EventuallyHealth(channel, "", HealthCheckResponse::SERVING));
  EXPECT_TRUE(EventuallyHealth(channel, kSession, HealthCheckResponse::SERVING));
  EXPECT_TRUE(EventuallyHealth(channel, kTransaction, HealthCheckResponse::SERVING));
  auto unknown = CheckHealth(channel, "no.such.Service");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
}

// What `top -H` and `perf` show of the process: each thread of ours under its role's name.
TEST(ServerProcessTest, ThreadsAreNamedForTheirRole) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  ASSERT_TRUE(EventuallyHealth(server->NewChannel(), "", HealthCheckResponse::SERVING));
  const std::vector<std::string> expected = {"sl-async-cq", "sl-memcached-io", "sl-memcache-dns",
                                             "sl-blocking", "sl-health-probe", "sl-signals"};
  // Some threads start after the server answers, and each names itself once it first runs.
  const std::filesystem::path tasks = absl::StrCat("/proc/", server->pid(), "/task");
  std::set<std::string> names;
  PollUntil(absl::Now() + absl::Seconds(10), [&] {
    names.clear();
    for (const auto& task : std::filesystem::directory_iterator(tasks)) {
      std::ifstream comm(task.path() / "comm");
      std::string name;
      std::getline(comm, name);
      names.insert(name);
    }
    return std::all_of(expected.begin(), expected.end(),
                       [&](const std::string& n) { return names.count(n) > 0; });
  });
  for (const std::string& name : expected) {
    EXPECT_TRUE(names.count(name)) << name << " missing among " << absl::StrJoin(names, ", ");
  }
}

TEST(ServerProcessTest, StoppedMemcachedNodeTurnsSessionHealthNotServingUntilItReturns) {
  auto plain = StartServer();  // Two nodes, no replicas: a node down loses sessions.
  auto replicated = StartServer({{"MEMCACHED_URL", RequiredEnv("MEMCACHED_URL_REPLICATED")}});
  ASSERT_NE(plain, nullptr);
  ASSERT_NE(replicated, nullptr);
  auto plain_channel = plain->NewChannel();
  auto replicated_channel = replicated->NewChannel();
  ASSERT_TRUE(EventuallyHealth(plain_channel, kSession, HealthCheckResponse::SERVING));

  BackingServices({"stop-memcached", "2"});
  const bool went_down =
      EventuallyHealth(plain_channel, kSession, HealthCheckResponse::NOT_SERVING);
  // The probe sets the two services one after the other; a single read could fall between.
  const bool transaction_went_down = EventuallyHealth(
      plain_channel, kTransaction, HealthCheckResponse::NOT_SERVING, absl::Seconds(2));
  const auto overall_status = CheckHealth(plain_channel, "");
  // The replicated server probes on its own schedule (every 100 ms): it must answer SERVING
  // across several of its probes, not at one read that may come before its first since the stop.
  int replicated_reads = 0;
  absl::StatusOr<HealthCheckResponse::ServingStatus> replicated_status =
      absl::UnknownError("not read");
  for (const absl::Time until = absl::Now() + absl::Milliseconds(500); absl::Now() < until;) {
    replicated_status = CheckHealth(replicated_channel, kSession);
    ++replicated_reads;
    if (replicated_status.value_or(HealthCheckResponse::UNKNOWN) != HealthCheckResponse::SERVING) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  BackingServices({"start-memcached", "2"});

  EXPECT_TRUE(went_down);
  EXPECT_TRUE(transaction_went_down);
  EXPECT_EQ(overall_status.value_or(HealthCheckResponse::UNKNOWN), HealthCheckResponse::SERVING)
      << "the process itself still accepts work";
  EXPECT_EQ(replicated_status.value_or(HealthCheckResponse::UNKNOWN), HealthCheckResponse::SERVING)
      << "with replicas=1 every session survives one node (read " << replicated_reads << ")";
  EXPECT_TRUE(EventuallyHealth(plain_channel, kSession, HealthCheckResponse::SERVING))
      << "recovers without a restart";
}

TEST(ServerProcessTest, ReflectionListsEveryServiceAndDescribesHealth) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(server->NewChannel());
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  auto stream = stub->ServerReflectionInfo(&context);

  grpc::reflection::v1alpha::ServerReflectionRequest list;
  list.set_list_services("");
  ASSERT_TRUE(stream->Write(list));
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  ASSERT_TRUE(stream->Read(&response));
  std::vector<std::string> names;
  for (const auto& service : response.list_services_response().service()) {
    names.push_back(service.name());
  }
  EXPECT_THAT(names,
              ::testing::IsSupersetOf({std::string(kSession), std::string(kTransaction),
                                       std::string("grpc.health.v1.Health"),
                                       std::string("grpc.reflection.v1alpha.ServerReflection")}));

  // What `grpcurl ... grpc.health.v1.Health/Check` needs: the health service's descriptor.
  grpc::reflection::v1alpha::ServerReflectionRequest describe;
  describe.set_file_containing_symbol("grpc.health.v1.Health");
  ASSERT_TRUE(stream->Write(describe));
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_FALSE(response.has_error_response()) << response.error_response().error_message();
  EXPECT_GT(response.file_descriptor_response().file_descriptor_proto_size(), 0);

  describe.set_file_containing_symbol("sessionledger.v1.TransactionService");
  ASSERT_TRUE(stream->Write(describe));
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_FALSE(response.has_error_response()) << response.error_response().error_message();
  stream->WritesDone();
}

// SIGTERM (orchestrators) and SIGINT (Ctrl-C) both drain: watchers hear NOT_SERVING, their
// streams end, and the process exits 0 without waiting out the grace period. (That new calls are
// refused while a drain waits for calls in flight is checked with a call held in flight, below:
// SigtermLetsAnInFlightSlowCallFinishAndRefusesNewOnes.)
class StopSignalTest : public ::testing::TestWithParam<int> {};

TEST_P(StopSignalTest, EndsWatchStreamsAndExitsZeroWithoutWaitingOutTheGrace) {
  const int stop_signal = GetParam();
  auto server = StartServer({{"SHUTDOWN_GRACE_SECONDS", "10"}, {"SHUTDOWN_NOTICE_MS", "0"}});
  ASSERT_NE(server, nullptr);
  auto channel = server->NewChannel();
  auto stub = Health::NewStub(channel);
  grpc::ClientContext watch_context;
  HealthCheckRequest request;
  auto watch = stub->Watch(&watch_context, request);
  HealthCheckResponse update;
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), HealthCheckResponse::SERVING);

  const absl::Time signalled = absl::Now();
  server->Signal(stop_signal);
  ASSERT_TRUE(watch->Read(&update)) << "a watcher hears NOT_SERVING before the stream ends";
  EXPECT_EQ(update.status(), HealthCheckResponse::NOT_SERVING);
  EXPECT_FALSE(watch->Read(&update));
  EXPECT_TRUE(watch->Finish().ok());

  const std::optional<int> exit_code = server->WaitForExit(absl::Seconds(15));
  ASSERT_TRUE(exit_code.has_value()) << "still running after the signal";
  EXPECT_EQ(*exit_code, 0) << server->Output();
  EXPECT_LT(absl::Now() - signalled, absl::Seconds(8))
      << "with nothing in flight the drain does not wait for the whole grace period";
  EXPECT_THAT(server->Output(), HasSubstr(absl::StrCat(R"("msg":"shutting down","signal":")",
                                                       strsignal(stop_signal), R"(")")));
  EXPECT_THAT(server->Output(), HasSubstr("\"msg\":\"stopped\""));
}

INSTANTIATE_TEST_SUITE_P(Signals, StopSignalTest, ::testing::Values(SIGTERM, SIGINT),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return std::string(sigabbrev_np(info.param));
                         });

// Threads of `pid` now (/proc/PID/task).
int ThreadCount(pid_t pid) {
  const std::filesystem::path tasks = absl::StrCat("/proc/", pid, "/task");
  return static_cast<int>(std::distance(std::filesystem::directory_iterator(tasks),
                                        std::filesystem::directory_iterator()));
}

// True while `signal` is pending for process `pid` (sent, not yet taken by a thread):
// /proc/PID/status lists the pending sets as hex masks, ShdPnd for the process, SigPnd for its
// main thread.
bool SignalPending(pid_t pid, int signal) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (!absl::StartsWith(line, "ShdPnd:") && !absl::StartsWith(line, "SigPnd:")) continue;
    uint64_t mask = 0;
    if (absl::SimpleHexAtoi(absl::StripAsciiWhitespace(line.substr(line.find(':') + 1)), &mask) &&
        (mask & (uint64_t{1} << (signal - 1))) != 0) {
      return true;
    }
  }
  return false;
}

// Context switches of every thread of `pid` so far: how often its threads woke up.
int64_t ContextSwitches(pid_t pid) {
  int64_t total = 0;
  const std::filesystem::path tasks = absl::StrCat("/proc/", pid, "/task");
  for (const auto& task : std::filesystem::directory_iterator(tasks)) {
    std::ifstream status(task.path() / "status");
    std::string line;
    while (std::getline(status, line)) {
      if (!absl::StrContains(line, "ctxt_switches:")) continue;
      int64_t n = 0;
      if (absl::SimpleAtoi(absl::StripAsciiWhitespace(line.substr(line.find(':') + 1)), &n)) {
        total += n;
      }
    }
  }
  return total;
}

// Client-side health checking opens one Watch per subchannel per client, and any peer can open
// thousands: an open Watch must cost neither a server thread nor a periodic wake-up. (It held a
// thread each, woken every second: 200 streams added 200 threads.)
TEST(ServerProcessTest, OpenWatchStreamsHoldNoServerThreadAndDoNotWakeIt) {
  constexpr int kStreams = 200;
  // One connection carries them all, as a client's would; health probes rarely, so that they
  // do not count as wake-ups.
  auto server =
      StartServer({{"GRPC_MAX_CONCURRENT_STREAMS", "1000"}, {"HEALTH_CHECK_INTERVAL_MS", "60000"}},
                  /*serve_metrics=*/true);
  ASSERT_NE(server, nullptr);
  auto stub = Health::NewStub(server->NewChannel());
  struct Stream {
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReader<HealthCheckResponse>> reader;
  };
  std::vector<std::unique_ptr<Stream>> streams;
  auto open = [&](const std::string& service) {
    auto& stream = streams.emplace_back(std::make_unique<Stream>());
    HealthCheckRequest request;
    request.set_service(service);
    stream->reader = stub->Watch(&stream->context, request);
    HealthCheckResponse first;
    return stream->reader->Read(&first);
  };
  // The first stream, so that what it takes once (a connection, gRPC's pollers) is counted in
  // the baseline.
  ASSERT_TRUE(open(""));
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(5),
                        [&] { return RpcsInFlight(server->metrics_port(), 1); }));
  absl::SleepFor(absl::Milliseconds(500));  // Threads started for the first call settle.
  const int threads_before = ThreadCount(server->pid());

  for (int i = 1; i < kStreams; ++i) {
    // Unknown names too: they wait like the others.
    ASSERT_TRUE(open(i % 2 == 0 ? std::string(kSession) : absl::StrCat("no.such.Service", i)))
        << "stream " << i;
  }
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(5),
                        [&] { return RpcsInFlight(server->metrics_port(), kStreams); }));
  const int threads_open = ThreadCount(server->pid());
  const int64_t switches_before = ContextSwitches(server->pid());
  absl::SleepFor(absl::Seconds(2));
  const int64_t switches_idle = ContextSwitches(server->pid()) - switches_before;

  for (auto& stream : streams) stream->context.TryCancel();
  for (auto& stream : streams)
    EXPECT_EQ(stream->reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  const bool all_ended = PollUntil(absl::Now() + absl::Seconds(5),
                                   [&] { return RpcsInFlight(server->metrics_port(), 0); });

  EXPECT_LT(threads_open - threads_before, 20)
      << threads_before << " threads with one stream open, " << threads_open << " with "
      << kStreams;
  // Each wake of a thread is at least one switch; the streams themselves need none. What is
  // left is gRPC's own timers and the completion-queue thread's sweep (10/s).
  EXPECT_LT(switches_idle, kStreams)
      << switches_idle << " context switches in 2 s with " << kStreams << " idle streams";
  EXPECT_TRUE(all_ended) << "cancelled streams still counted in flight";
  server->Signal(SIGTERM);
  const std::optional<int> exit_code = server->WaitForExit(absl::Seconds(15));
  ASSERT_TRUE(exit_code.has_value());
  EXPECT_EQ(*exit_code, 0) << server->Output();
}

TEST(ServerProcessTest, SigtermLetsAnInFlightSlowCallFinishAndRefusesNewOnes) {
  auto server = StartServer({{"SHUTDOWN_GRACE_SECONDS", "10"}, {"SHUTDOWN_NOTICE_MS", "500"}},
                            /*serve_metrics=*/true);
  ASSERT_NE(server, nullptr);
  auto channel = server->NewChannel();

  // Memcached frozen: the kernel still accepts connections, but no reply comes until SIGCONT,
  // so CreateSession stays in flight (its I/O timeout is 2 s).
  std::optional<FrozenMemcached> frozen(std::in_place);
  grpc::Status slow_status;
  sessionledger::v1::Session created;
  const absl::Time call_began = absl::Now();
  std::thread slow_call([&] {
    auto stub = sessionledger::v1::SessionService::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    sessionledger::v1::CreateSessionRequest request;
    request.set_user_id("drain-test-user");
    slow_status = stub->CreateSession(&context, request, &created);
  });
  // The call has reached the server (and waits on the frozen memcached) before the signal.
  const bool call_in_flight = PollUntil(absl::Now() + absl::Seconds(5),
                                        [&] { return RpcsInFlight(server->metrics_port(), 1); });
  server->Signal(SIGTERM);
  // During the notice period health says NOT_SERVING, and says it: calls are still answered.
  // Polled rather than read once, as the signal takes a moment to arrive on a busy machine.
  const bool not_serving_during_notice =
      EventuallyHealth(channel, "", HealthCheckResponse::NOT_SERVING, absl::Milliseconds(900));
  // After it, a new connection is refused. Memcached is thawed before the in-flight call's 2 s
  // I/O timeout would fail it, so the wait for the refusal ends 1.7 s after the call began.
  absl::StatusCode after_notice = absl::StatusCode::kOk;
  PollUntil(call_began + absl::Milliseconds(1700), [&] {
    after_notice = CheckHealth(server->NewChannel(), "").status().code();
    return after_notice == absl::StatusCode::kUnavailable;
  });
  frozen.reset();
  slow_call.join();
  EXPECT_TRUE(call_in_flight) << "the call never reached the server";

  EXPECT_TRUE(not_serving_during_notice);
  EXPECT_EQ(after_notice, absl::StatusCode::kUnavailable);
  EXPECT_TRUE(slow_status.ok()) << slow_status.error_code() << ": " << slow_status.error_message();
  EXPECT_FALSE(created.token().empty()) << "the in-flight call got its full answer";
  const std::optional<int> exit_code = server->WaitForExit(absl::Seconds(15));
  ASSERT_TRUE(exit_code.has_value());
  EXPECT_EQ(*exit_code, 0) << server->Output();
}

// Start-up waits up to 15 s for PostgreSQL. A stop signal meanwhile (an orchestrator scaling
// down, an operator's Ctrl-C) must end the process at once, not after that wait, and certainly
// not by serving once PostgreSQL comes back.
TEST(ServerProcessTest, SigtermDuringStartUpExitsAtOnce) {
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  options.env["DATABASE_URL"] =
      absl::StrCat("postgres://nobody@127.0.0.1:", FreeTcpPort(), "/none?sslmode=disable");
  options.wait_until_serving = false;
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(options);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->WaitForOutput("waiting for postgres", absl::Seconds(10)))
      << (*server)->Output();
  const absl::Time signalled = absl::Now();
  (*server)->Signal(SIGTERM);
  const std::optional<int> exit_code = (*server)->WaitForExit(absl::Seconds(20));
  ASSERT_TRUE(exit_code.has_value());
  EXPECT_LT(absl::Now() - signalled, absl::Seconds(3)) << "it waited out the start-up";
  EXPECT_EQ(*exit_code, 0) << (*server)->Output();
  EXPECT_THAT((*server)->Output(), HasSubstr("\"msg\":\"stopped before serving\""));
}

// Before it listens the server probes the backing services once, which takes up to half a second
// per node that does not answer, one node after the other. A stop signal then is a stop before
// serving: the process ends at once, having never listened, rather than listening, serving and
// draining afterwards.
TEST(ServerProcessTest, SigtermDuringTheFirstProbeExitsWithoutListening) {
  // Four silent nodes: the signal has two seconds to land in the probe, however slow the machine.
  SilentPeer memcached;
  SilentPeer others[3];
  ASSERT_NE(memcached.port(), 0);
  std::string url = absl::StrCat("memcached://", memcached.target());
  for (const SilentPeer& other : others) {
    ASSERT_NE(other.port(), 0);
    absl::StrAppend(&url, ",", other.target());
  }
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  options.env["MEMCACHED_URL"] = url;
  options.wait_until_serving = false;
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(options);
  ASSERT_TRUE(server.ok()) << server.status();
  // The probe's connection; its answer is half a second away.
  ASSERT_TRUE(memcached.AwaitConnection(absl::Seconds(20))) << (*server)->Output();
  (*server)->Signal(SIGTERM);
  const std::optional<int> exit_code = (*server)->WaitForExit(absl::Seconds(20));
  ASSERT_TRUE(exit_code.has_value());
  EXPECT_EQ(*exit_code, 0) << (*server)->Output();
  EXPECT_THAT((*server)->Output(), HasSubstr("\"msg\":\"stopped before serving\""));
  EXPECT_THAT((*server)->Output(), ::testing::Not(HasSubstr("\"msg\":\"listening\"")));
}

// A Memcached host name whose lookup never answers (a name server that drops every packet) must
// hold up neither the start-up, which probes the backing services before it listens, nor the
// exit, which waits for the probe in progress. The health probe used to hand libmemcached the
// name, whose getaddrinfo no timeout covers: the server never listened. glibc reads the file
// HOSTALIASES names before it asks a name server about a name without a dot; opening a FIFO
// that nobody writes to blocks, so that lookup never answers.
TEST(ServerProcessTest, AMemcachedNameThatNeverResolvesHoldsUpNeitherStartNorExit) {
  const std::string aliases = absl::StrCat(::testing::TempDir(), "/sl-hostaliases-fifo-", getpid());
  unlink(aliases.c_str());
  ASSERT_EQ(mkfifo(aliases.c_str(), 0600), 0) << std::strerror(errno);
  const absl::Cleanup remove_fifo = [&aliases] { unlink(aliases.c_str()); };
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  options.env["HOSTALIASES"] = aliases;
  // One copy on each node: with the named one unreachable, every session is still served.
  options.env["MEMCACHED_URL"] =
      absl::StrCat("memcached://127.0.0.1:", RequiredEnv("SL_MEMCACHED_PORT_1"),
                   ",sl-name-never-answers:", RequiredEnv("SL_MEMCACHED_PORT_2"), "?replicas=1");
  options.env["HEALTH_CHECK_INTERVAL_MS"] = "100";
  options.env["SHUTDOWN_NOTICE_MS"] = "0";
  options.env["SHUTDOWN_GRACE_SECONDS"] = "1";
  options.startup_timeout = absl::Seconds(15);
  const absl::Time starting = absl::Now();
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(options);
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_LT(absl::Now() - starting, absl::Seconds(10)) << "start-up waited on the lookup";
  EXPECT_TRUE(EventuallyHealth((*server)->NewChannel(), kSession, HealthCheckResponse::SERVING));
  // Probe rounds are running (every 100 ms), each finding the lookup still stuck.
  absl::SleepFor(absl::Milliseconds(300));

  const absl::Time signalled = absl::Now();
  (*server)->Signal(SIGTERM);
  const std::optional<int> exit_code = (*server)->WaitForExit(absl::Seconds(20));
  ASSERT_TRUE(exit_code.has_value()) << "still running after SIGTERM";
  EXPECT_LT(absl::Now() - signalled, absl::Seconds(5)) << "the exit waited on the lookup";
  EXPECT_EQ(*exit_code, 0) << (*server)->Output();
}

// The first SIGTERM drains for up to the grace period; a second one is the operator saying
// "now": the process must end at once, not swallow it.
TEST(ServerProcessTest, ASecondSigtermEndsTheDrainAtOnce) {
  auto server = StartServer({{"SHUTDOWN_GRACE_SECONDS", "30"}, {"SHUTDOWN_NOTICE_MS", "0"}},
                            /*serve_metrics=*/true);
  ASSERT_NE(server, nullptr);
  // A call held in flight (memcached frozen) keeps the drain going.
  std::optional<FrozenMemcached> frozen(std::in_place);
  auto channel = server->NewChannel();
  grpc::Status slow_status;
  std::thread slow_call([&] {
    auto stub = sessionledger::v1::SessionService::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(20)));
    sessionledger::v1::CreateSessionRequest request;
    request.set_user_id("second-signal-user");
    sessionledger::v1::Session created;
    slow_status = stub->CreateSession(&context, request, &created);
  });
  // The call has reached the server (and waits on the frozen memcached) before the signal.
  const bool call_in_flight = PollUntil(absl::Now() + absl::Seconds(5),
                                        [&] { return RpcsInFlight(server->metrics_port(), 1); });
  server->Signal(SIGTERM);
  const bool draining = server->WaitForOutput("\"msg\":\"shutting down\"", absl::Seconds(5));
  const absl::Time again = absl::Now();
  server->Signal(SIGTERM);
  const std::optional<int> exit_code = server->WaitForExit(absl::Seconds(20));
  frozen.reset();
  slow_call.join();
  EXPECT_TRUE(call_in_flight) << "the call never reached the server";
  EXPECT_TRUE(draining) << server->Output();
  ASSERT_TRUE(exit_code.has_value());
  EXPECT_LT(absl::Now() - again, absl::Seconds(3)) << "the second signal was swallowed";
  EXPECT_EQ(*exit_code, 1) << server->Output();
  EXPECT_THAT(server->Output(), HasSubstr("second stop signal"));
  EXPECT_FALSE(slow_status.ok()) << "the call in flight was cut off";
}

// A log reader that stalls (a shipper that stopped reading) fills the server's stdout pipe, and
// every write to it then blocks. The stop signals must still work: the first starts the drain,
// and a second ends the process at once. The signal thread used to write "shutting down" itself,
// holding the lock a second signal needs; stuck in that write, it never took the second signal.
TEST(ServerProcessTest, ASecondSigtermEndsTheProcessWhileStdoutIsStalled) {
  auto server = StartServer(
      {{"LOG_LEVEL", "debug"}, {"SHUTDOWN_GRACE_SECONDS", "30"}, {"SHUTDOWN_NOTICE_MS", "0"}});
  ASSERT_NE(server, nullptr);
  server->PauseOutput();
  // A health check logs its line (at debug) before it answers: once the pipe (64 KiB, ~300
  // lines) is full, a check gets no answer, which shows that writes to stdout now block.
  // Connected first, and 3 s a check: only the check that stdout blocks waits that long, and a
  // slow server under sanitizers is not taken for a full pipe.
  std::shared_ptr<grpc::Channel> channel = server->NewChannel();
  ASSERT_TRUE(channel->WaitForConnected(absl::ToChronoTime(absl::Now() + absl::Seconds(10))));
  auto stub = Health::NewStub(channel);
  bool stdout_full = false;
  for (int i = 0; i < 5000 && !stdout_full; ++i) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(3)));
    HealthCheckResponse response;
    stdout_full = stub->Check(&context, HealthCheckRequest(), &response).error_code() ==
                  grpc::StatusCode::DEADLINE_EXCEEDED;
  }
  ASSERT_TRUE(stdout_full) << "every health check was answered: stdout never filled up";

  server->Signal(SIGTERM);
  // Standard signals do not queue: a second one sent before the first was taken would be lost.
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(10), [&] {
    return !SignalPending(server->pid(), SIGTERM);
  })) << "the first signal was never taken";
  const absl::Time again = absl::Now();
  server->Signal(SIGTERM);
  const std::optional<int> exit_code = server->WaitForExit(absl::Seconds(10));
  server->ResumeOutput();
  ASSERT_TRUE(exit_code.has_value()) << "the second signal was not taken";
  EXPECT_LT(absl::Now() - again, absl::Seconds(3));
  EXPECT_EQ(*exit_code, 1);
}

// GetSession runs on the asynchronous API, its read on the Memcached reader's thread: a call in
// flight when SIGTERM arrives must still get its answer, and the process must then exit cleanly
// (its completion queue is shut down only after the server has finished every call).
TEST(ServerProcessTest, SigtermLetsAnInFlightGetSessionFinish) {
  auto server = StartServer({{"SHUTDOWN_GRACE_SECONDS", "10"}, {"SHUTDOWN_NOTICE_MS", "500"}},
                            /*serve_metrics=*/true);
  ASSERT_NE(server, nullptr);
  auto channel = server->NewChannel();
  auto stub = sessionledger::v1::SessionService::NewStub(channel);
  sessionledger::v1::Session created;
  {
    grpc::ClientContext context;
    sessionledger::v1::CreateSessionRequest request;
    request.set_user_id("drain-get-user");
    ASSERT_TRUE(stub->CreateSession(&context, request, &created).ok());
  }
  std::optional<FrozenMemcached> frozen(std::in_place);
  grpc::Status read_status;
  sessionledger::v1::Session read;
  const absl::Time call_began = absl::Now();
  std::thread in_flight([&] {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    sessionledger::v1::GetSessionRequest request;
    request.set_token(created.token());
    read_status = stub->GetSession(&context, request, &read);
  });
  // The call has reached the server (and waits on the frozen memcached) before the signal.
  const bool call_in_flight = PollUntil(absl::Now() + absl::Seconds(5),
                                        [&] { return RpcsInFlight(server->metrics_port(), 1); });
  server->Signal(SIGTERM);
  // Memcached is thawed only once the server refuses new connections, so that the call really
  // was in flight across the shutdown and not answered during the notice period; a signal
  // handled late would otherwise let the test pass without that. The thaw must still come
  // before the reader's 2 s I/O timeout fails the call: the wait ends 1.7 s after it began.
  absl::StatusCode after_notice = absl::StatusCode::kOk;
  PollUntil(call_began + absl::Milliseconds(1700), [&] {
    after_notice = CheckHealth(server->NewChannel(), "").status().code();
    return after_notice == absl::StatusCode::kUnavailable;
  });
  frozen.reset();
  in_flight.join();
  EXPECT_TRUE(call_in_flight) << "the call never reached the server";

  EXPECT_EQ(after_notice, absl::StatusCode::kUnavailable) << "not shut down while in flight";
  EXPECT_TRUE(read_status.ok()) << read_status.error_code() << ": " << read_status.error_message();
  EXPECT_EQ(read.session_id(), created.session_id()) << "the in-flight call got its full answer";
  const std::optional<int> exit_code = server->WaitForExit(absl::Seconds(15));
  ASSERT_TRUE(exit_code.has_value());
  EXPECT_EQ(*exit_code, 0) << server->Output();
}

TEST(ServerProcessTest, LogsAreOneJsonObjectPerLineWithPerCallFields) {
  // Trust authentication ignores the password, so the URL still works with one in it.
  const std::string with_password =
      absl::StrReplaceAll(RequiredEnv("DATABASE_URL"),
                          {{"postgres://sessionledger@", "postgres://sessionledger:Pa55w0rd-x@"}});
  ASSERT_NE(with_password, RequiredEnv("DATABASE_URL"));
  auto server = StartServer({{"LOG_LEVEL", "debug"}, {"DATABASE_URL", with_password}});
  ASSERT_NE(server, nullptr);
  ASSERT_TRUE(CheckHealth(server->NewChannel(), "").ok());
  server->Signal(SIGTERM);
  ASSERT_TRUE(server->WaitForExit(absl::Seconds(15)).has_value());
  const std::string output = server->Output();
  std::vector<std::string> lines = absl::StrSplit(output, '\n', absl::SkipEmpty());
  ASSERT_FALSE(lines.empty());
  bool saw_call = false;
  for (const std::string& line : lines) {
    EXPECT_TRUE(absl::StartsWith(line, "{\"ts\":\"") && absl::EndsWith(line, "}")) << line;
    EXPECT_THAT(line, HasSubstr("\"level\":\""));
    if (absl::StrContains(line, "\"method\":\"/grpc.health.v1.Health/Check\"")) {
      saw_call = true;
      EXPECT_THAT(line, HasSubstr("\"code\":\"OK\""));
      EXPECT_THAT(line, HasSubstr("\"duration_ms\":"));
      EXPECT_THAT(line, HasSubstr("\"peer\":\"ipv"));
    }
  }
  EXPECT_TRUE(saw_call) << output;
  EXPECT_THAT(output, ::testing::Not(HasSubstr("Pa55w0rd-x")))
      << "the database URL is logged redacted only";
  EXPECT_THAT(output, HasSubstr("postgres://sessionledger:****@"));
}

struct RefusalCase {
  std::string name;
  std::map<std::string, std::optional<std::string>> env;
  int exit_code;
  std::string message;
};

TEST(ServerProcessTest, RefusesToStartOnBadConfigurationWithOneLineNamingTheVariable) {
  const RefusalCase cases[] = {
      {"malformed DATABASE_URL", {{"DATABASE_URL", "mysql://127.0.0.1/db"}}, 2, "DATABASE_URL: "},
      {"bad sslmode",
       {{"DATABASE_URL", DatabaseUrlFor("x") + "&sslmode=sometimes"}},
       2,
       "DATABASE_URL: "},
      {"missing MEMCACHED_URL", {{"MEMCACHED_URL", std::nullopt}}, 2, "MEMCACHED_URL: required"},
      {"bad PORT", {{"PORT", "http"}}, 2, "PORT: "},
      {"LISTEN_ADDRESS with a port",
       {{"LISTEN_ADDRESS", "127.0.0.1:50051"}},
       2,
       "LISTEN_ADDRESS: "},
      {"empty LISTEN_ADDRESS", {{"LISTEN_ADDRESS", ""}}, 2, "LISTEN_ADDRESS: "},
      {"ttl above lifetime",
       {{"SESSION_TTL_SECONDS", "100"}, {"SESSION_MAX_LIFETIME_SECONDS", "10"}},
       2,
       "SESSION_TTL_SECONDS: "},
      {"malformed MALLOC_ARENA_MAX", {{"MALLOC_ARENA_MAX", "two"}}, 2, "MALLOC_ARENA_MAX: "},
      {"zero MALLOC_ARENA_MAX", {{"MALLOC_ARENA_MAX", "0"}}, 2, "MALLOC_ARENA_MAX: "},
  };
  for (const RefusalCase& c : cases) {
    SCOPED_TRACE(c.name);
    ServerProcess::Options options;
    options.env = BackingServiceEnv();
    for (const auto& [k, v] : c.env) options.env[k] = v;
    options.wait_until_serving = false;
    auto server = ServerProcess::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    const std::optional<int> exit_code = (*server)->WaitForExit(absl::Seconds(10));
    ASSERT_TRUE(exit_code.has_value()) << "did not refuse: " << (*server)->Output();
    EXPECT_EQ(*exit_code, c.exit_code);
    const std::string output = (*server)->Output();
    EXPECT_THAT(output, HasSubstr("sessionledger-server: " + c.message));
    EXPECT_EQ(std::count(output.begin(), output.end(), '\n'), 1) << output;
  }
}

// Two servers must never share a port: the second would take some of the first one's new
// connections, and calls would land on either.
TEST(ServerProcessTest, RefusesAPortAnotherServerListensOn) {
  auto first = StartServer();
  ASSERT_NE(first, nullptr);
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  options.env["PORT"] = std::to_string(first->port());
  options.wait_until_serving = false;
  auto second = ServerProcess::Start(options);
  ASSERT_TRUE(second.ok()) << second.status();
  const std::optional<int> exit_code = (*second)->WaitForExit(absl::Seconds(15));
  ASSERT_TRUE(exit_code.has_value()) << "started on a taken port: " << (*second)->Output();
  EXPECT_NE(*exit_code, 0);
  EXPECT_THAT((*second)->Output(), HasSubstr("PORT: cannot listen on port"));
}

// The TCP sockets process `pid` listens on, as "tcp ADDRESS:PORT" or "tcp6 ADDRESS:PORT": the
// LISTEN lines of /proc/net/tcp and /proc/net/tcp6 whose inode is one of the process's sockets,
// as "TABLE ADDRESS:PORT": ADDRESS as the kernel writes it there (see ProcNetIpv4), a v4-mapped
// IPv6 one as the IPv4 address in table tcp; PORT in decimal.
std::vector<std::string> ListeningSockets(pid_t pid) {
  std::set<std::string> inodes;
  std::error_code error;
  for (const auto& entry :
       std::filesystem::directory_iterator(absl::StrCat("/proc/", pid, "/fd"), error)) {
    std::error_code link_error;
    const std::string target = std::filesystem::read_symlink(entry.path(), link_error).string();
    absl::string_view inode = target;
    if (!link_error && absl::ConsumePrefix(&inode, "socket:[") &&
        absl::ConsumeSuffix(&inode, "]")) {
      inodes.insert(std::string(inode));
    }
  }
  EXPECT_FALSE(error) << "cannot list /proc/" << pid << "/fd: " << error.message();
  std::vector<std::string> listening;
  for (const char* table : {"tcp", "tcp6"}) {
    std::ifstream in(absl::StrCat("/proc/net/", table));
    std::string line;
    std::getline(in, line);  // The header.
    while (std::getline(in, line)) {
      // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
      const std::vector<std::string> fields = absl::StrSplit(line, ' ', absl::SkipEmpty());
      constexpr char kListen[] = "0A";
      if (fields.size() < 10 || fields[3] != kListen || inodes.count(fields[9]) == 0) continue;
      const size_t colon = fields[1].find(':');
      int port = 0;
      if (colon == std::string::npos ||
          !absl::SimpleHexAtoi(absl::string_view(fields[1]).substr(colon + 1), &port)) {
        ADD_FAILURE() << "unexpected /proc/net/" << table << " line: " << line;
        continue;
      }
      // gRPC may bind an IPv4 address on an IPv6 socket, as ::ffff:a.b.c.d (v4-mapped): the
      // same address, listed as IPv4.
      absl::string_view address = absl::string_view(fields[1]).substr(0, colon);
      constexpr absl::string_view kV4MappedPrefix = "0000000000000000FFFF0000";
      if (absl::string_view(table) == "tcp6" && absl::ConsumePrefix(&address, kV4MappedPrefix)) {
        listening.push_back(absl::StrCat("tcp ", address, ":", port));
      } else {
        listening.push_back(absl::StrCat(table, " ", address, ":", port));
      }
    }
  }
  return listening;
}

// An IPv4 address as /proc/net/tcp writes it: the hex of its 32 bits as they lie in memory.
std::string ProcNetIpv4(uint32_t network_order) {
  char hex[9];
  std::snprintf(hex, sizeof hex, "%08X", network_order);
  return hex;
}

// SECURITY.md: the gRPC port must only be reachable by its callers. With LISTEN_ADDRESS=127.0.0.1
// (what scripts/run and scripts/cluster set) the server's listening sockets, the gRPC port's and
// /metrics', are bound to 127.0.0.1 alone: no other interface can reach them, which the kernel's
// socket tables show without one. Unset, they are the wildcard, as before.
TEST(ServerProcessTest, ListensOnlyOnLoopbackWhenListenAddressIsLoopback) {
  auto server = StartServer({{"LISTEN_ADDRESS", "127.0.0.1"}}, /*serve_metrics=*/true);
  ASSERT_NE(server, nullptr);
  const std::string loopback = ProcNetIpv4(htonl(INADDR_LOOPBACK));
  EXPECT_THAT(
      ListeningSockets(server->pid()),
      ::testing::UnorderedElementsAre(absl::StrCat("tcp ", loopback, ":", server->port()),
                                      absl::StrCat("tcp ", loopback, ":", server->metrics_port())));
  const absl::StatusOr<std::string> metrics = HttpGet(server->metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_THAT(*metrics, HasSubstr("sessionledger_rpc_in_flight"));
  // `healthcheck` reaches a server that listens on LISTEN_ADDRESS.
  auto check =
      RunCommand({SL_SERVER_BINARY, "healthcheck"},
                 {{"PORT", absl::StrCat(server->port())}, {"LISTEN_ADDRESS", "127.0.0.1"}});
  ASSERT_TRUE(check.ok()) << check.status();
  EXPECT_EQ(check->exit_code, 0) << check->output;

  // Unset: [::] (IPv4 too, IPV6_V6ONLY off), or 0.0.0.0 where the kernel has no IPv6, as before
  // LISTEN_ADDRESS. This also shows that ListeningSockets sees a wildcard when there is one.
  auto everywhere = StartServer({{"LISTEN_ADDRESS", std::nullopt}}, /*serve_metrics=*/true);
  ASSERT_NE(everywhere, nullptr);
  const std::vector<std::string> wildcard = ListeningSockets(everywhere->pid());
  for (const int port : {everywhere->port(), everywhere->metrics_port()}) {
    EXPECT_THAT(wildcard,
                ::testing::AnyOf(
                    ::testing::Contains(absl::StrCat("tcp6 ", std::string(32, '0'), ":", port)),
                    ::testing::Contains(absl::StrCat("tcp ", std::string(8, '0'), ":", port))))
        << "port " << port;
  }
}

// At their largest allowed values, a user id and an idempotency key must still fit the
// PostgreSQL index they share: a Deposit succeeds instead of failing with INTERNAL.
TEST(ServerProcessTest, LargestAllowedUserIdAndIdempotencyKeyFitTheLedger) {
  auto server = StartServer({{"MAX_USER_ID_BYTES", "1024"}, {"MAX_IDEMPOTENCY_KEY_BYTES", "1024"}});
  ASSERT_NE(server, nullptr);
  // Random, so that PostgreSQL cannot compress them below the limit.
  std::mt19937_64 bits{std::random_device{}()};
  const auto random_text = [&bits](size_t n) {
    static constexpr char kAlphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    std::uniform_int_distribution<size_t> pick(0, sizeof kAlphabet - 2);
    std::string text(n, ' ');
    for (char& c : text) c = kAlphabet[pick(bits)];
    return text;
  };
  auto channel = server->NewChannel();
  auto sessions = sessionledger::v1::SessionService::NewStub(channel);
  sessionledger::v1::Session session;
  {
    grpc::ClientContext context;
    sessionledger::v1::CreateSessionRequest request;
    request.set_user_id(random_text(1024));
    const grpc::Status status = sessions->CreateSession(&context, request, &session);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  auto ledger = sessionledger::v1::TransactionService::NewStub(channel);
  sessionledger::v1::Account account;
  {
    const grpc::Status status = OpenEuroAccount(*ledger, session.token(), &account);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  grpc::ClientContext context;
  context.AddMetadata("authorization", "Bearer " + session.token());
  sessionledger::v1::DepositRequest request;
  request.set_account_id(account.account_id());
  request.set_amount_minor(1);
  request.set_idempotency_key(random_text(1024));
  sessionledger::v1::Transaction transaction;
  const grpc::Status status = ledger->Deposit(&context, request, &transaction);
  EXPECT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
}

// A call timeout longer than the drain means a call can keep the process past its grace; the
// operator hears of it at start-up, and not otherwise.
TEST(ServerProcessTest, WarnsWhenACallCanOutliveTheShutdownGrace) {
  auto warned = StartServer({{"SHUTDOWN_GRACE_SECONDS", "2"}, {"DEFAULT_CALL_TIMEOUT_MS", "5000"}});
  ASSERT_NE(warned, nullptr);
  auto quiet = StartServer({{"SHUTDOWN_GRACE_SECONDS", "5"}, {"DEFAULT_CALL_TIMEOUT_MS", "5000"}});
  ASSERT_NE(quiet, nullptr);
  EXPECT_TRUE(warned->WaitForOutput("a call may outlive the shutdown grace", absl::Seconds(10)))
      << warned->Output();
  EXPECT_THAT(warned->Output(), HasSubstr("\"shutdown_grace_ms\":2000"));
  // The warning comes before the "listening" line, so once that is in, silence means none.
  ASSERT_TRUE(quiet->WaitForOutput("\"msg\":\"listening\"", absl::Seconds(10))) << quiet->Output();
  EXPECT_THAT(quiet->Output(), ::testing::Not(HasSubstr("outlive the shutdown grace")));
}

TEST(ServerProcessTest, ConfiguredInputLimitsApplyBeforeAnyBackingService) {
  auto server = StartServer({{"MAX_USER_ID_BYTES", "8"},
                             {"MAX_ATTRIBUTE_KEY_BYTES", "3"},
                             {"MAX_SESSION_ATTRIBUTES_BYTES", "10"},
                             {"MAX_IDEMPOTENCY_KEY_BYTES", "4"}});
  ASSERT_NE(server, nullptr);
  auto channel = server->NewChannel();
  auto sessions = sessionledger::v1::SessionService::NewStub(channel);
  const auto create = [&](const std::string& user, std::map<std::string, std::string> attrs,
                          sessionledger::v1::Session* out) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    sessionledger::v1::CreateSessionRequest request;
    request.set_user_id(user);
    for (const auto& [k, v] : attrs) (*request.mutable_attributes())[k] = v;
    return sessions->CreateSession(&context, request, out);
  };
  // What is within the limits is accepted, with the backing services answering. A fresh 8-byte
  // user per run: idempotency keys are scoped per user, and "abcd" must be unused.
  const std::string user =
      absl::StrCat(absl::Hex(absl::ToUnixNanos(absl::Now()) & 0xffffffff, absl::kZeroPad8));
  sessionledger::v1::Session session;
  ASSERT_TRUE(create(user, {{"abc", "1234567"}}, &session).ok());
  auto ledger = sessionledger::v1::TransactionService::NewStub(channel);
  sessionledger::v1::Account account;
  ASSERT_TRUE(OpenEuroAccount(*ledger, session.token(), &account).ok());
  const auto deposit = [&](const std::string& key) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    context.AddMetadata("authorization", "Bearer " + session.token());
    sessionledger::v1::DepositRequest request;
    request.set_account_id(account.account_id());
    request.set_amount_minor(1);
    request.set_idempotency_key(key);
    sessionledger::v1::Transaction transaction;
    return ledger->Deposit(&context, request, &transaction);
  };
  EXPECT_TRUE(deposit("abcd").ok());

  // With memcached frozen, a call that waited for any store round trip would end UNAVAILABLE
  // (after the 2 s I/O timeout) or past its deadline; INVALID_ARGUMENT can only come from a
  // check made before. A deposit reaches PostgreSQL only after its token was looked up in
  // memcached, so its idempotency key is covered as well.
  const FrozenMemcached frozen;
  const absl::Time frozen_at = absl::Now();
  sessionledger::v1::Session refused;
  grpc::Status status = create("123456789", {}, &refused);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("user_id"));
  status = create("u", {{"long", "v"}}, &refused);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  status = create("u", {{"k", "0123456789"}}, &refused);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  status = deposit("abcde");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("idempotency_key"));
  // A check made after a wait on memcached that ignored its failure would still say
  // INVALID_ARGUMENT, but only once the I/O timeout had passed.
  EXPECT_LT(absl::Now() - frozen_at, absl::Seconds(2)) << "a call waited for memcached";
}

// Starts a server that must refuse to serve: it exits non-zero within 20 s, and its output
// says `why`.
void ExpectRefusesToStart(ServerProcess::Options options, absl::string_view why) {
  options.wait_until_serving = false;
  auto refused = ServerProcess::Start(options);
  ASSERT_TRUE(refused.ok()) << refused.status();
  const std::optional<int> exit_code = (*refused)->WaitForExit(absl::Seconds(20));
  ASSERT_TRUE(exit_code.has_value()) << "still running";
  EXPECT_NE(*exit_code, 0);
  EXPECT_THAT((*refused)->Output(), HasSubstr(why));
}

TEST(ServerProcessTest, RefusesToServeASchemaThatIsBehindAndMigrateFixesIt) {
  const std::string database = "sl_schema_behind_test";
  RecreateDatabase(database);
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  options.env["DATABASE_URL"] = DatabaseUrlFor(database);
  ExpectRefusesToStart(options, "run `sessionledger-server migrate`");

  auto migrated =
      RunCommand({SL_SERVER_BINARY, "migrate"}, {{"DATABASE_URL", DatabaseUrlFor(database)}});
  ASSERT_TRUE(migrated.ok());
  ASSERT_EQ(migrated->exit_code, 0) << migrated->output;
  options.wait_until_serving = true;
  auto serving = ServerProcess::Start(options);
  EXPECT_TRUE(serving.ok()) << serving.status();
}

// A database set to a stricter default isolation would make every transfer that waits for a
// busy account fail; the server says so at start-up instead, and starts once it is reset.
TEST(ServerProcessTest, RefusesADatabaseWhoseTransactionsAreNotReadCommitted) {
  const std::string database = "sl_isolation_test";
  RecreateMigratedDatabase(database);
  Psql(RequiredEnv("DATABASE_URL"),
       absl::StrCat("ALTER DATABASE ", database,
                    " SET default_transaction_isolation = 'serializable'"));
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  options.env["DATABASE_URL"] = DatabaseUrlFor(database);
  ExpectRefusesToStart(options, "default_transaction_isolation is 'serializable'");

  Psql(RequiredEnv("DATABASE_URL"),
       absl::StrCat("ALTER DATABASE ", database, " RESET default_transaction_isolation"));
  options.wait_until_serving = true;
  auto serving = ServerProcess::Start(options);
  EXPECT_TRUE(serving.ok()) << serving.status();
}

// A schema that a newer release migrated: this release still starts on it (and its `migrate`
// is a no-op) while every migration it does not know says it works with binaries this old, so
// that a rollback, or an old pod started in mid-rollout, keeps running; it refuses otherwise.
TEST(ServerProcessTest, RunsOnANewerSchemaOnlyWhenItsMigrationsSayItMay) {
  const std::string database = "sl_schema_ahead_test";
  RecreateMigratedDatabase(database);
  const std::string url = DatabaseUrlFor(database);
  const int latest = LatestSchemaVersion();
  const auto record_future_migration = [&](int version, int works_with_binaries_from) {
    auto recorded = RunCommand(
        {"psql", url, "-v", "ON_ERROR_STOP=1", "-qc",
         absl::StrCat("INSERT INTO schema_migrations (version, name, works_with_binaries_from) "
                      "VALUES (",
                      version, ", 'future', ", works_with_binaries_from, ")")});
    ASSERT_TRUE(recorded.ok());
    ASSERT_EQ(recorded->exit_code, 0) << recorded->output;
  };
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  options.env["DATABASE_URL"] = url;

  // An additive migration of the next release.
  record_future_migration(latest + 1, latest);
  {
    auto serving = ServerProcess::Start(options);
    EXPECT_TRUE(serving.ok()) << serving.status();
  }
  auto again = RunCommand({SL_SERVER_BINARY, "migrate"}, {{"DATABASE_URL", url}});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->exit_code, 0) << again->output;

  // One after it that older code cannot work with.
  record_future_migration(latest + 2, latest + 2);
  ExpectRefusesToStart(options, "not compatible with it: deploy a newer binary");
  auto refused_migrate = RunCommand({SL_SERVER_BINARY, "migrate"}, {{"DATABASE_URL", url}});
  ASSERT_TRUE(refused_migrate.ok());
  // An exit of its own (RunCommand answers -1 for a crash or a hang), saying why, and the newer
  // schema left as it was.
  EXPECT_EQ(refused_migrate->exit_code, 1) << refused_migrate->output;
  EXPECT_THAT(refused_migrate->output, HasSubstr("not compatible with it: deploy a newer binary"));
  EXPECT_EQ(Psql(url, "SELECT max(version), count(*) FROM schema_migrations"),
            absl::StrCat(latest + 2, "|", latest + 2, "\n"));
}

// A schema the previous release migrated has no compatibility column; a migrate with nothing
// to apply leaves it so (adding it needs the table's owner, which that migrate may not be), and
// the server runs on it.
TEST(ServerProcessTest, AMigrateWithNothingToApplyChangesNothing) {
  const std::string database = "sl_schema_previous_release_test";
  RecreateMigratedDatabase(database);
  const std::string url = DatabaseUrlFor(database);
  const auto psql = [&](const std::string& sql) { return Psql(url, sql); };
  const std::string has_column =
      "SELECT count(*) FROM information_schema.columns WHERE table_name = 'schema_migrations' "
      "AND column_name = 'works_with_binaries_from'";
  psql("ALTER TABLE schema_migrations DROP COLUMN works_with_binaries_from");
  ASSERT_EQ(psql(has_column), "0\n");
  auto again = RunCommand({SL_SERVER_BINARY, "migrate"}, {{"DATABASE_URL", url}});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->exit_code, 0) << again->output;
  EXPECT_EQ(psql(has_column), "0\n");
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  options.env["DATABASE_URL"] = url;
  auto serving = ServerProcess::Start(options);
  EXPECT_TRUE(serving.ok()) << serving.status();
}

// Migration 3 needs an exclusive lock on transactions for a moment. Behind a long transaction
// it would queue every ledger call of the serving pods behind itself, so it gives up after its
// lock_timeout instead, changes nothing, and applies when run again once the lock is free.
TEST(ServerProcessTest, AMigrationBehindALongTransactionGivesUpAndAppliesLater) {
  const std::string database = "sl_migrate_lock_timeout_test";
  RecreateMigratedDatabase(database);
  const std::string url = DatabaseUrlFor(database);
  const auto psql = [&](const std::string& sql) { return Psql(url, sql); };
  const std::string column_default =
      "SELECT column_default FROM information_schema.columns "
      "WHERE table_name = 'transactions' AND column_name = 'created_at'";
  // Back to the schema before migration 3.
  psql(
      "ALTER TABLE transactions ALTER COLUMN created_at SET DEFAULT now(); "
      "DELETE FROM schema_migrations WHERE version >= 3");
  ASSERT_EQ(psql(column_default), "now()\n");

  // A reader that keeps its lock for longer than the migrate below is given.
  constexpr absl::string_view kHolder = "sl_lock_holder";
  absl::StatusOr<CommandResult> holder_result = absl::UnknownError("not run");
  std::thread holder([&] {
    holder_result = RunCommand(
        {"psql", url, "-qc",
         "BEGIN; LOCK TABLE transactions IN ACCESS SHARE MODE; SELECT pg_sleep(60); COMMIT"},
        {{"PGAPPNAME", std::string(kHolder)}}, absl::Seconds(90));
  });
  const auto end_holder = [&] {
    psql(
        absl::StrCat("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name = '",
                     kHolder, "'"));
    holder.join();
  };
  const bool lock_held = PollUntil(
      absl::Now() + absl::Seconds(10),
      [&] {
        return psql(absl::StrCat("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a "
                                 "USING (pid) WHERE a.application_name = '",
                                 kHolder,
                                 "' AND l.relation = 'transactions'::regclass "
                                 "AND l.granted")) == "1\n";
      },
      absl::Milliseconds(20));
  if (!lock_held) end_holder();
  ASSERT_TRUE(lock_held);

  const absl::Time started = absl::Now();
  auto refused =
      RunCommand({SL_SERVER_BINARY, "migrate"}, {{"DATABASE_URL", url}}, absl::Seconds(20));
  const absl::Duration took = absl::Now() - started;
  const bool holder_still_waiting =
      psql(absl::StrCat("SELECT count(*) FROM pg_stat_activity WHERE application_name = '", kHolder,
                        "'")) == "1\n";
  end_holder();
  ASSERT_TRUE(refused.ok()) << refused.status();
  EXPECT_NE(refused->exit_code, 0) << refused->output;
  EXPECT_THAT(refused->output, HasSubstr("lock timeout"));
  EXPECT_LT(took, absl::Seconds(10)) << "waited for the lock instead of giving up";
  EXPECT_TRUE(holder_still_waiting) << "the lock was released before migrate gave up";
  EXPECT_EQ(psql("SELECT max(version) FROM schema_migrations"), "2\n");
  EXPECT_EQ(psql(column_default), "now()\n") << "half-applied";

  auto applied = RunCommand({SL_SERVER_BINARY, "migrate"}, {{"DATABASE_URL", url}});
  ASSERT_TRUE(applied.ok()) << applied.status();
  EXPECT_EQ(applied->exit_code, 0) << applied->output;
  EXPECT_EQ(psql("SELECT max(version) FROM schema_migrations"),
            absl::StrCat(LatestSchemaVersion(), "\n"));
  EXPECT_EQ(psql(column_default), "clock_timestamp()\n");
}

// In a container `migrate` is PID 1, and the kernel drops any signal PID 1 has no handler for
// (also one from outside its PID namespace, as the container runtime's). A migrate waiting for
// another's lock then outlived `docker compose down` or a deleted Job until it was killed.
TEST(ServerProcessTest, MigrateAsPidOneEndsOnSigterm) {
  const std::string database = "sl_migrate_pid_one_test";
  RecreateMigratedDatabase(database);
  const std::string url = DatabaseUrlFor(database);
  // Another migrate holds the migration lock (the key is migrations.cc's kMigrationLockKey).
  constexpr absl::string_view kHolder = "sl_migration_lock_holder";
  absl::StatusOr<CommandResult> holder_result = absl::UnknownError("not run");
  std::thread holder([&] {
    holder_result =
        RunCommand({"psql", url, "-qc", "SELECT pg_advisory_lock(7216100341122029), pg_sleep(60)"},
                   {{"PGAPPNAME", std::string(kHolder)}}, absl::Seconds(90));
  });
  const absl::Cleanup end_holder = [&] {
    Psql(url, absl::StrCat("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE application_name = '",
                           kHolder, "'"));
    holder.join();
  };
  const auto waiting_for_the_lock = [&](absl::string_view who) {
    return Psql(url,
                absl::StrCat("SELECT count(*) FROM pg_stat_activity WHERE application_name ", who,
                             " AND wait_event_type = 'Lock' AND query LIKE "
                             "'%pg_advisory_lock%'")) == "1\n";
  };
  ASSERT_TRUE(PollUntil(
      absl::Now() + absl::Seconds(10),
      [&] {
        return Psql(url, absl::StrCat("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a "
                                      "USING (pid) WHERE a.application_name = '",
                                      kHolder, "' AND l.locktype = 'advisory' AND l.granted")) ==
               "1\n";
      },
      absl::Milliseconds(20)));

  ServerProcess::Options options;
  options.wrapper = {"unshare", "--pid", "--fork"};
  options.args = {"migrate"};
  options.env = {{"DATABASE_URL", url}};
  options.wait_until_serving = false;
  absl::StatusOr<std::unique_ptr<ServerProcess>> wrapper = ServerProcess::Start(options);
  ASSERT_TRUE(wrapper.ok()) << wrapper.status();
  const bool waiting = PollUntil(
      absl::Now() + absl::Seconds(20),
      [&] {
        return (*wrapper)->WaitForExit(absl::ZeroDuration()).has_value() ||
               waiting_for_the_lock(absl::StrCat("<> '", kHolder, "'"));
      },
      absl::Milliseconds(20));
  if (const std::optional<int> early = (*wrapper)->WaitForExit(absl::ZeroDuration())) {
    if ((*wrapper)->Output().find("unshare failed") != std::string::npos) {
      GTEST_SKIP() << "no PID namespaces here: " << (*wrapper)->Output();
    }
    FAIL() << "migrate exited " << *early
           << " before it waited for the lock: " << (*wrapper)->Output();
  }
  ASSERT_TRUE(waiting) << (*wrapper)->Output();
  // The server is the wrapper's one child, PID 1 in its namespace.
  const pid_t pid = (*wrapper)->pid();
  std::string children;
  std::getline(std::ifstream(absl::StrCat("/proc/", pid, "/task/", pid, "/children")), children);
  pid_t migrate = 0;
  ASSERT_TRUE(absl::SimpleAtoi(absl::StripAsciiWhitespace(children), &migrate)) << children;
  ASSERT_EQ(kill(migrate, SIGTERM), 0) << std::strerror(errno);
  const std::optional<int> exit_code = (*wrapper)->WaitForExit(absl::Seconds(5));
  // SIGKILL reaches it whatever it handles; the wrapper's output ends only once it has gone.
  if (!exit_code.has_value()) kill(migrate, SIGKILL);
  ASSERT_TRUE(exit_code.has_value()) << "migrate ignored SIGTERM as PID 1";
  EXPECT_NE(*exit_code, 0);
  EXPECT_THAT((*wrapper)->Output(), HasSubstr("migrate stopped by a signal"));
}

TEST(ServerProcessTest, ConcurrentMigrationsAreSafeAndIdempotent) {
  const std::string database = "sl_concurrent_migrate_test";
  RecreateDatabase(database);
  std::vector<std::thread> runners;
  std::vector<absl::StatusOr<CommandResult>> results(4, absl::UnknownError("not run"));
  for (int i = 0; i < 4; ++i) {
    runners.emplace_back([&, i] {
      results[i] =
          RunCommand({SL_SERVER_BINARY, "migrate"}, {{"DATABASE_URL", DatabaseUrlFor(database)}});
    });
  }
  for (auto& r : runners) r.join();
  for (const auto& result : results) {
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->exit_code, 0) << result->output;
  }
  auto again =
      RunCommand({SL_SERVER_BINARY, "migrate"}, {{"DATABASE_URL", DatabaseUrlFor(database)}});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->exit_code, 0) << again->output;

  auto count = RunCommand({"psql", DatabaseUrlFor(database), "-Atc",
                           "SELECT count(*), max(version) FROM schema_migrations"});
  ASSERT_TRUE(count.ok());
  EXPECT_EQ(count->output, absl::StrCat(LatestSchemaVersion(), "|", LatestSchemaVersion(), "\n"))
      << "each migration recorded exactly once";
}

}  // namespace
}  // namespace sessionledger::testing
