// MemcachedPipeline against a scripted TCP server on 127.0.0.1 (FakeMemcached, in this file),
// for what a real memcached will not do on demand: refuse, stall, answer garbage or slowly,
// hang up. No backing services: the real nodes are in tests/integration/memcached_pipeline_test.cc.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/common/clock.h"
#include "server/common/notification.h"
#include "server/config/config.h"
#include "server/domain/caller_message.h"
#include "server/domain/session_store.h"
#include "server/memcached/memcached_pipeline.h"
#include "server/memcached/memcached_pool.h"
#include "tests/support/memcached_pipeline_test_support.h"
#include "tests/support/test_env.h"

namespace sessionledger::testing {
namespace {

using std::string_literals::operator""s;

// ---------------------------------------------------------------------------------------------
// A scripted server on 127.0.0.1, for failures a real memcached does not produce on demand.

// How the server treats one connection: `reply` answers each request line (nullopt: say
// nothing), and the server hangs up after its first reply when `hang_up` is set.
struct Script {
  std::function<std::optional<std::string>(const std::string& line)> reply;
  bool hang_up = false;
};

// Reads and never answers (a stalled memcached).
Script Silent() {
  return {[](const std::string&) { return std::nullopt; }};
}
// Answers every request with `text`, whatever it asked.
Script Say(std::string text) {
  return {[text](const std::string&) { return text; }};
}
// Answers "gets k1 k2 ..." like a memcached holding "value of <key>" with CAS 7 for every key.
Script Serve() {
  return {[](const std::string& line) {
    std::string out;
    std::vector<std::string> words = absl::StrSplit(line, ' ', absl::SkipEmpty());
    for (size_t i = 1; i < words.size(); ++i) {
      const std::string v = "value of " + words[i];
      absl::StrAppend(&out, "VALUE ", words[i], " 0 ", v.size(), " 7\r\n", v, "\r\n");
    }
    return out + "END\r\n";
  }};
}
bool IsStorageCommand(const std::string& line) {
  return absl::StartsWith(line, "add ") || absl::StartsWith(line, "set ") ||
         absl::StartsWith(line, "cas ");
}
// Answers every storage command with `text`, and nothing else (its data line included: the
// values sent to these servers hold no "\r\n").
Script SayToStores(std::string text) {
  return {[text](const std::string& line) -> std::optional<std::string> {
    if (!IsStorageCommand(line)) return std::nullopt;
    return text;
  }};
}
// Answers "gets" as Serve() does and storage commands by their verb, each with a reply of its
// own (set: STORED, add: NOT_STORED, cas: EXISTS), so that a reply handed to the wrong request
// shows. Says nothing to data lines.
Script ServeStores() {
  Script gets = Serve();
  return {[gets](const std::string& line) -> std::optional<std::string> {
    if (absl::StartsWith(line, "gets ")) return gets.reply(line);
    if (absl::StartsWith(line, "set ")) return "STORED\r\n"s;
    if (absl::StartsWith(line, "add ")) return "NOT_STORED\r\n"s;
    if (absl::StartsWith(line, "cas ")) return "EXISTS\r\n"s;
    return std::nullopt;
  }};
}

class FakeMemcached {
 public:
  // Connection number i (counting from 0) follows scripts[min(i, size - 1)]. Port 0: any free.
  explicit FakeMemcached(std::vector<Script> scripts, int port = 0) : scripts_(std::move(scripts)) {
    listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const int one = 1;
    setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    socklen_t len = sizeof addr;
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        listen(listen_fd_, 64) != 0 ||
        getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ADD_FAILURE() << "cannot listen on 127.0.0.1:" << port << ": " << std::strerror(errno);
      return;
    }
    port_ = ntohs(addr.sin_port);
    acceptor_ = std::thread([this] { Accept(); });
  }

  ~FakeMemcached() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      for (const auto& c : connections_) shutdown(c->fd, SHUT_RDWR);
    }
    shutdown(listen_fd_, SHUT_RDWR);  // Wakes accept().
    if (acceptor_.joinable()) acceptor_.join();
    std::vector<std::unique_ptr<Connection>> connections;
    {
      std::lock_guard<std::mutex> lock(mu_);
      connections.swap(connections_);
    }
    for (const auto& c : connections) {
      c->thread.join();
      close(c->fd);
    }
    close(listen_fd_);
  }

  MemcachedNode node() const { return MemcachedNode{"127.0.0.1", static_cast<uint16_t>(port_)}; }
  int accepted() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int>(connections_.size());
  }
  // Waits until `n` request lines have arrived, over all connections.
  bool AwaitLines(int n, absl::Duration timeout = absl::Seconds(30)) {
    std::unique_lock<std::mutex> lock(mu_);
    return lines_changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                                   [this, n] { return lines_ >= n; });
  }

 private:
  struct Connection {
    int fd;
    std::thread thread;
  };

  void Accept() {
    for (;;) {
      const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) return;
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) {
        close(fd);
        return;
      }
      const Script& script = scripts_[std::min(connections_.size(), scripts_.size() - 1)];
      auto c = std::make_unique<Connection>();
      c->fd = fd;
      c->thread = std::thread([this, fd, script] { Serve(fd, script); });
      connections_.push_back(std::move(c));
    }
  }

  void Serve(int fd, Script script) {
    std::string in;
    char buffer[4096];
    for (;;) {
      const ssize_t got = recv(fd, buffer, sizeof buffer, 0);
      if (got <= 0) return;
      in.append(buffer, static_cast<size_t>(got));
      size_t eol;
      while ((eol = in.find("\r\n")) != std::string::npos) {
        const std::string line = in.substr(0, eol);
        in.erase(0, eol + 2);
        {
          std::lock_guard<std::mutex> lock(mu_);
          ++lines_;
          lines_changed_.notify_all();
        }
        std::optional<std::string> reply = script.reply(line);
        if (!reply.has_value()) continue;
        if (send(fd, reply->data(), reply->size(), MSG_NOSIGNAL) < 0) return;
        if (script.hang_up) {
          shutdown(fd, SHUT_RDWR);  // Closed in the destructor, so the number is not reused.
          return;
        }
      }
    }
  }

  const std::vector<Script> scripts_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::thread acceptor_;
  std::mutex mu_;
  std::condition_variable lines_changed_;                 // Notified whenever lines_ grows.
  bool stopping_ = false;                                 // Guarded by mu_.
  int lines_ = 0;                                         // Guarded by mu_.
  std::vector<std::unique_ptr<Connection>> connections_;  // Guarded by mu_.
};

struct Timed {
  absl::StatusOr<MemcachedHits> result;
  absl::Duration took;
};
Timed TimedGet(MemcachedPipeline& reader, const std::vector<std::string>& keys,
               absl::Time deadline) {
  const absl::Time start = absl::Now();
  absl::StatusOr<MemcachedHits> result = reader.Get(0, keys, deadline);
  return {std::move(result), absl::Now() - start};
}

// Shutdown does not wait for a name lookup stuck on an unreachable name server: getaddrinfo
// cannot be interrupted, and a process that waited for it could outlast its grace period.
TEST(MemcachedPipelineFailureTest, DestructionDoesNotWaitForAHungNameLookup) {
  MemcachedPipelineOptions options;
  options.nodes = {MemcachedNode{"hung-dns.test", 11211}};
  auto lookup_may_finish = std::make_shared<Notification>();
  auto lookup_started = std::make_shared<Notification>();
  options.resolve = [=](const MemcachedNode&) -> absl::StatusOr<std::vector<MemcachedAddress>> {
    lookup_started->Notify();
    lookup_may_finish->WaitForNotificationWithTimeout(absl::Seconds(30));
    return absl::UnavailableError("name server unreachable");
  };
  absl::StatusOr<std::unique_ptr<MemcachedPipeline>> reader = MemcachedPipeline::Start(options);
  ASSERT_TRUE(reader.ok()) << reader.status();
  Pending<MemcachedHits> waiting;
  (*reader)->GetAsync(0, {"k"}, Deadline(absl::Seconds(20)), waiting.Callback());
  ASSERT_TRUE(lookup_started->WaitForNotificationWithTimeout(absl::Seconds(10)));
  const absl::Time start = absl::Now();
  reader->reset();
  EXPECT_LT(absl::Now() - start, kMargin) << "destruction waited for the lookup";  // Its 30 s.
  const AsyncAnswer<MemcachedHits> answer = waiting.Wait(absl::Seconds(1));
  EXPECT_TRUE(absl::IsUnavailable(answer.result.status())) << answer.result.status();
  lookup_may_finish->Notify();  // The resolver thread ends on its own.
}

// A refusal is cheap to retry and ends the moment memcached is back, so it fails the read at once
// but does not make the next reads fail for retry_after_failure.
TEST(MemcachedPipelineFailureTest, RefusedConnectionFailsFastAndTheNextReadTriesAgain) {
  const int port = FreeTcpPort();
  ASSERT_GT(port, 0);
  std::unique_ptr<MemcachedPipeline> reader =
      StartReader({MemcachedNode{"127.0.0.1", static_cast<uint16_t>(port)}}, absl::Seconds(5),
                  absl::Seconds(60));
  ASSERT_NE(reader, nullptr);

  for (int i = 0; i < 3; ++i) {
    Timed refused = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8)));
    EXPECT_TRUE(absl::IsUnavailable(refused.result.status())) << refused.result.status();
    EXPECT_LT(refused.took, kMargin) << "a refused connect must not wait for a timeout";
  }

  // Something listens now: the very next read connects (a 60 s back-off would fail it).
  FakeMemcached server({Serve()}, port);
  ASSERT_EQ(server.node().port, port);
  Timed got = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8)));
  ASSERT_TRUE(got.result.ok()) << got.result.status();
  EXPECT_EQ(got.result->at("k").value, "value of k");
  EXPECT_EQ(got.result->at("k").cas, 7u);
  EXPECT_EQ(server.accepted(), 1);
}

// 127.0.0.1:`port` as a resolver answers it.
MemcachedAddress LoopbackAddress(int port) {
  MemcachedAddress address;
  auto* in = reinterpret_cast<sockaddr_in*>(&address.address);
  in->sin_family = AF_INET;
  in->sin_port = htons(static_cast<uint16_t>(port));
  in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.length = sizeof(sockaddr_in);
  return address;
}

// A port on 127.0.0.1 where connects are refused for as long as this object lives: bound, so
// that no other test (ctest runs them side by side) can listen there, but not listening.
class RefusingPort {
 public:
  // Port 0: any free one. A port a server is to take over later should come from
  // RestartableTcpPort(), which no outgoing connection can be handed meanwhile.
  explicit RefusingPort(int port = 0) : fd_(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    socklen_t len = sizeof addr;
    if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ADD_FAILURE() << "cannot bind a port on 127.0.0.1: " << std::strerror(errno);
      return;
    }
    port_ = ntohs(addr.sin_port);
  }
  ~RefusingPort() {
    if (fd_ >= 0) close(fd_);
  }
  RefusingPort(const RefusingPort&) = delete;
  RefusingPort& operator=(const RefusingPort&) = delete;
  int port() const { return port_; }

 private:
  int fd_;
  int port_ = 0;
};

// A pipeline on one node named "memcached.test", looked up by `resolve`.
std::unique_ptr<MemcachedPipeline> StartResolvingReader(
    std::function<absl::StatusOr<std::vector<MemcachedAddress>>(const MemcachedNode&)> resolve,
    absl::Duration io_timeout, absl::Duration retry_after_failure,
    absl::Duration connect_timeout = absl::Milliseconds(500)) {
  MemcachedPipelineOptions options;
  options.nodes = {MemcachedNode{"memcached.test", 11211}};
  options.resolve = std::move(resolve);
  options.connect_timeout = connect_timeout;
  options.io_timeout = io_timeout;
  options.retry_after_failure = retry_after_failure;
  return StartPipeline(options);
}

// A name may lead to an address where nothing listens ("localhost" to ::1 first, while memcached
// listens on 127.0.0.1 only): the pipeline goes on to the next one, and the read does not fail.
TEST(MemcachedPipelineFailureTest, ANameWhoseFirstAddressRefusesIsReachedAtTheNext) {
  const RefusingPort refusing_port;
  const int refusing = refusing_port.port();
  ASSERT_GT(refusing, 0);
  FakeMemcached server({Serve()});
  const int listening = server.node().port;
  std::unique_ptr<MemcachedPipeline> reader = StartResolvingReader(
      [=](const MemcachedNode&) -> absl::StatusOr<std::vector<MemcachedAddress>> {
        return std::vector<MemcachedAddress>{LoopbackAddress(refusing), LoopbackAddress(listening)};
      },
      absl::Seconds(5), absl::Seconds(60));
  ASSERT_NE(reader, nullptr);
  for (int i = 0; i < 3; ++i) {
    Timed got = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8)));
    ASSERT_TRUE(got.result.ok()) << got.result.status();
    EXPECT_EQ(got.result->at("k").value, "value of k");
  }
  EXPECT_EQ(server.accepted(), 1) << "one connection, kept";
}

// A node whose every address refuses may have moved (a pod restarted with a new IP): its name
// is looked up again (at most once per retry_after_failure), and the reads reach it there.
TEST(MemcachedPipelineFailureTest, ANodeThatMovedIsLookedUpAgainAfterItsAddressRefuses) {
  const RefusingPort refusing_port;
  const int old_port = refusing_port.port();
  ASSERT_GT(old_port, 0);
  FakeMemcached server({Serve()});
  const int new_port = server.node().port;
  auto lookups = std::make_shared<std::atomic<int>>(0);
  std::unique_ptr<MemcachedPipeline> reader = StartResolvingReader(
      [=](const MemcachedNode&) -> absl::StatusOr<std::vector<MemcachedAddress>> {
        return std::vector<MemcachedAddress>{
            LoopbackAddress(lookups->fetch_add(1) == 0 ? old_port : new_port)};
      },
      absl::Seconds(5), absl::Milliseconds(100));
  ASSERT_NE(reader, nullptr);
  bool reached = false;
  for (int i = 0; i < 40 && !reached; ++i) {
    reached = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8))).result.ok();
    if (!reached) absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_TRUE(reached) << "still at the old address after " << lookups->load() << " lookups";
  EXPECT_EQ(lookups->load(), 2);
}

// An address this host cannot connect to at all (no socket of its family: ::1 with IPv6 off)
// gives way to the next one, as a refused one does.
MemcachedAddress AddressOfNoFamily() {
  MemcachedAddress address;
  address.address.ss_family = AF_MAX;  // socket() says EAFNOSUPPORT
  address.length = sizeof(sockaddr_in);
  return address;
}

TEST(MemcachedPipelineFailureTest, AnAddressWithoutASocketGivesWayToTheNext) {
  FakeMemcached server({Serve()});
  const int listening = server.node().port;
  std::unique_ptr<MemcachedPipeline> reader = StartResolvingReader(
      [=](const MemcachedNode&) -> absl::StatusOr<std::vector<MemcachedAddress>> {
        return std::vector<MemcachedAddress>{AddressOfNoFamily(), LoopbackAddress(listening)};
      },
      absl::Seconds(5), absl::Seconds(60));
  ASSERT_NE(reader, nullptr);
  Timed got = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8)));
  ASSERT_TRUE(got.result.ok()) << got.result.status();
  EXPECT_EQ(server.accepted(), 1);
}

// Whether the node backs off once every address failed depends on the whole round, not on the
// last address: a refusal (memcached restarting) next to an address that cannot work here is
// retried at once, while a round that waited out a connect timeout makes reads fail at once
// for a while rather than each waiting for it again.
TEST(MemcachedPipelineFailureTest, ARoundOfRefusalsIsRetriedAtOnceAndOneThatTimedOutBacksOff) {
  {
    auto refusing = std::make_unique<RefusingPort>(RestartableTcpPort());
    const int port = refusing->port();
    ASSERT_GT(port, 0);
    std::unique_ptr<MemcachedPipeline> reader = StartResolvingReader(
        [=](const MemcachedNode&) -> absl::StatusOr<std::vector<MemcachedAddress>> {
          return std::vector<MemcachedAddress>{LoopbackAddress(port), AddressOfNoFamily()};
        },
        absl::Seconds(5), absl::Seconds(60));
    ASSERT_NE(reader, nullptr);
    EXPECT_FALSE(TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8))).result.ok());
    refusing.reset();
    FakeMemcached server({Serve()}, port);
    ASSERT_EQ(server.node().port, port);
    Timed got = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8)));
    EXPECT_TRUE(got.result.ok()) << got.result.status() << " (backed off after a refusal)";
  }
  {
    SilentListener full(/*backlog=*/1);
    ASSERT_NE(full.port(), 0);
    full.Fill();
    const RefusingPort refusing;
    const absl::Duration connect_timeout = absl::Milliseconds(500);
    std::unique_ptr<MemcachedPipeline> reader = StartResolvingReader(
        [hanging = full.port(), refused = refusing.port()](
            const MemcachedNode&) -> absl::StatusOr<std::vector<MemcachedAddress>> {
          return std::vector<MemcachedAddress>{LoopbackAddress(hanging), LoopbackAddress(refused)};
        },
        absl::Seconds(5), absl::Seconds(60), connect_timeout);
    ASSERT_NE(reader, nullptr);
    Timed first = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8)));
    EXPECT_FALSE(first.result.ok());
    EXPECT_GE(first.took, connect_timeout - absl::Milliseconds(50));
    Timed second = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8)));
    EXPECT_FALSE(second.result.ok());
    EXPECT_LT(second.took, absl::Milliseconds(250)) << "waited for the connect timeout again";
  }
}

// Connects that time out one address after another may take longer than io_timeout in all. A
// request that gave up meanwhile is not sent once a connect works (its caller was told it
// failed), and the ones still waiting are sent and answered, not dropped as "answering too
// slowly" for the time they waited.
TEST(MemcachedPipelineFailureTest, RequestsThatWaitedForSeveralConnectsAreSentWhenOneWorks) {
  SilentListener first(/*backlog=*/1);
  SilentListener second(/*backlog=*/1);
  ASSERT_NE(first.port(), 0);
  ASSERT_NE(second.port(), 0);
  first.Fill();
  second.Fill();
  FakeMemcached server({Serve()});
  std::unique_ptr<MemcachedPipeline> reader = StartResolvingReader(
      [a = first.port(), b = second.port(), c = server.node().port](
          const MemcachedNode&) -> absl::StatusOr<std::vector<MemcachedAddress>> {
        return std::vector<MemcachedAddress>{LoopbackAddress(a), LoopbackAddress(b),
                                             LoopbackAddress(c)};
      },
      /*io_timeout=*/absl::Seconds(3), absl::Seconds(60), /*connect_timeout=*/absl::Seconds(2));
  ASSERT_NE(reader, nullptr);
  // The first read gives up at its io_timeout (3 s), while the second address is connecting.
  Pending<MemcachedHits> first_read;
  reader->GetAsync(0, {"k"}, Deadline(absl::Seconds(20)), first_read.Callback());
  EXPECT_FALSE(first_read.Wait(absl::Seconds(10)).result.ok());
  // The next one waits for the third address, which connects at about 4 s, and is answered.
  Timed next = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(20)));
  ASSERT_TRUE(next.result.ok()) << next.result.status();
  EXPECT_EQ(server.accepted(), 1);
  EXPECT_FALSE(server.AwaitLines(2, absl::Milliseconds(300))) << "the read that gave up was sent";
}

// A name that moves while a connect to its old address hangs: the connect goes to the new
// address when the lookup says so, rather than after the old one timed out.
TEST(MemcachedPipelineFailureTest, ALookupThatMovesTheNodeRedirectsAConnectUnderWay) {
  SilentListener hanging(/*backlog=*/1);
  ASSERT_NE(hanging.port(), 0);
  hanging.Fill();
  FakeMemcached server({Serve()});
  auto lookups = std::make_shared<std::atomic<int>>(0);
  auto refresh_may_answer = std::make_shared<Notification>();
  const absl::Duration connect_timeout = absl::Seconds(3);
  std::unique_ptr<MemcachedPipeline> reader = StartResolvingReader(
      [lookups, refresh_may_answer, old_port = hanging.port(), new_port = server.node().port](
          const MemcachedNode&) -> absl::StatusOr<std::vector<MemcachedAddress>> {
        if (lookups->fetch_add(1) == 0) {
          return std::vector<MemcachedAddress>{LoopbackAddress(old_port)};
        }
        refresh_may_answer->WaitForNotificationWithTimeout(absl::Seconds(30));
        return std::vector<MemcachedAddress>{LoopbackAddress(new_port)};
      },
      /*io_timeout=*/absl::Seconds(10), /*retry_after_failure=*/absl::Milliseconds(50),
      connect_timeout);
  ASSERT_NE(reader, nullptr);
  // Times out at the old address, backs off for 50 ms and asks for the name again; that lookup
  // answers only when the test says so.
  EXPECT_FALSE(TimedGet(*reader, {"k"}, Deadline(absl::Seconds(20))).result.ok());
  absl::SleepFor(absl::Milliseconds(100));
  // Connects to the old address again, and is redirected when the lookup answers.
  Pending<MemcachedHits> moved;
  const absl::Time asked = absl::Now();
  reader->GetAsync(0, {"k"}, Deadline(absl::Seconds(20)), moved.Callback());
  absl::SleepFor(absl::Milliseconds(300));
  refresh_may_answer->Notify();
  const AsyncAnswer<MemcachedHits> answer = moved.Wait(absl::Seconds(15));
  ASSERT_TRUE(answer.result.ok()) << answer.result.status();
  EXPECT_LT(answer.at - asked, connect_timeout) << "waited for the old address";
  EXPECT_EQ(lookups->load(), 2);
}

// While every address refuses (memcached down for a while), the name is looked up again at most
// once per retry_after_failure, in the background: not once per read.
TEST(MemcachedPipelineFailureTest, RefusalsLookTheNameUpAgainAtMostOncePerRetryPeriod) {
  const RefusingPort refusing;
  const int port = refusing.port();
  ASSERT_GT(port, 0);
  auto lookups = std::make_shared<std::atomic<int>>(0);
  std::unique_ptr<MemcachedPipeline> reader = StartResolvingReader(
      [=](const MemcachedNode&) -> absl::StatusOr<std::vector<MemcachedAddress>> {
        lookups->fetch_add(1);
        return std::vector<MemcachedAddress>{LoopbackAddress(port)};
      },
      absl::Seconds(5), absl::Milliseconds(100));
  ASSERT_NE(reader, nullptr);
  int reads = 0;
  const absl::Time start = absl::Now();
  while (absl::Now() - start < absl::Milliseconds(500)) {
    EXPECT_FALSE(TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8))).result.ok());
    ++reads;
  }
  EXPECT_GT(reads, 20);
  EXPECT_GE(lookups->load(), 2) << "never looked up again";
  EXPECT_LE(lookups->load(), 7) << "looked up again " << lookups->load() << " times in " << reads
                                << " reads";
}

// A memcached restart while the name server is down: the lookup that the refusals asked for
// fails, and the node is tried at the address it had, so the reads come back with memcached.
TEST(MemcachedPipelineFailureTest, ANodeRestartedWhileItsNameServerIsDownIsReachedWhereItWas) {
  auto refusing = std::make_unique<RefusingPort>(RestartableTcpPort());
  const int port = refusing->port();
  ASSERT_GT(port, 0);
  auto lookups = std::make_shared<std::atomic<int>>(0);
  std::unique_ptr<MemcachedPipeline> reader = StartResolvingReader(
      [=](const MemcachedNode&) -> absl::StatusOr<std::vector<MemcachedAddress>> {
        if (lookups->fetch_add(1) > 0) return absl::UnavailableError("name server down");
        return std::vector<MemcachedAddress>{LoopbackAddress(port)};
      },
      absl::Seconds(5), absl::Milliseconds(100));
  ASSERT_NE(reader, nullptr);
  // Refused until the name is looked up again, and that lookup fails.
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(5), [&] {
    EXPECT_FALSE(TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8))).result.ok());
    return lookups->load() >= 2;
  }));
  refusing.reset();
  FakeMemcached server({Serve()}, port);
  ASSERT_EQ(server.node().port, port);
  bool reached = false;
  for (int i = 0; i < 40 && !reached; ++i) {
    reached = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8))).result.ok();
    if (!reached) absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_TRUE(reached) << "not reached after " << lookups->load() << " lookups";
}

// A slow name lookup is not the node answering slowly: the node must not be dropped (and made to
// fail every read for retry_after_failure, then looked up again just as slowly) because a
// request that waited for the lookup is still unanswered io_timeout after it was asked.
TEST(MemcachedPipelineFailureTest, ASlowNameLookupDoesNotGetAHealthyNodeDropped) {
  const absl::Duration io_timeout = absl::Seconds(2);
  // Answers the first read 1 s after reading it, the others at once.
  auto reads = std::make_shared<std::atomic<int>>(0);
  Script slow_first = Serve();
  slow_first.reply = [serve = slow_first.reply, reads](const std::string& line) {
    if (reads->fetch_add(1) == 0) absl::SleepFor(absl::Seconds(1));
    return serve(line);
  };
  FakeMemcached server({slow_first});
  const int port = server.node().port;
  auto lookups = std::make_shared<std::atomic<int>>(0);
  std::unique_ptr<MemcachedPipeline> reader = StartResolvingReader(
      [=](const MemcachedNode&) -> absl::StatusOr<std::vector<MemcachedAddress>> {
        lookups->fetch_add(1);
        absl::SleepFor(absl::Milliseconds(1500));
        return std::vector<MemcachedAddress>{LoopbackAddress(port)};
      },
      io_timeout, absl::Seconds(60));
  ASSERT_NE(reader, nullptr);
  // The first read is sent after the 1.5 s lookup and answered 1 s later: past its own
  // io_timeout (2 s from when it was asked), so it fails by itself, as its caller asked no
  // longer; but only 1 s after it was sent, so the node is not "answering too slowly".
  Timed first = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(10)));
  EXPECT_TRUE(absl::IsUnavailable(first.result.status())) << first.result.status();
  // The node is still there for the next read, on the same connection.
  Timed next = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(10)));
  ASSERT_TRUE(next.result.ok()) << next.result.status();
  EXPECT_EQ(next.result->at("k").value, "value of k");
  EXPECT_EQ(lookups->load(), 1);
  EXPECT_EQ(server.accepted(), 1);
}

// An address whose connect times out (a stale IP, a path a firewall drops) is not tried
// forever: the name's next address is, as libmemcached does.
TEST(MemcachedPipelineFailureTest, AnAddressWhoseConnectTimesOutGivesWayToTheNext) {
  SilentListener full(/*backlog=*/1);
  ASSERT_NE(full.port(), 0);
  full.Fill();
  FakeMemcached server({Serve()});
  const int listening = server.node().port;
  const absl::Duration connect_timeout = absl::Milliseconds(300);
  std::unique_ptr<MemcachedPipeline> reader = StartResolvingReader(
      [=, hanging =
              full.port()](const MemcachedNode&) -> absl::StatusOr<std::vector<MemcachedAddress>> {
        return std::vector<MemcachedAddress>{LoopbackAddress(hanging), LoopbackAddress(listening)};
      },
      absl::Seconds(5), absl::Seconds(60), connect_timeout);
  ASSERT_NE(reader, nullptr);
  Timed got = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8)));
  ASSERT_TRUE(got.result.ok()) << got.result.status();
  EXPECT_EQ(got.result->at("k").value, "value of k");
  EXPECT_GE(got.took, connect_timeout - absl::Milliseconds(50)) << "the first address";
  EXPECT_EQ(server.accepted(), 1);
}

TEST(MemcachedPipelineFailureTest, StalledNodeFailsAtIoTimeoutAndIsSkippedThenRetried) {
  FakeMemcached server({Silent(), Serve()});
  const absl::Duration io_timeout = absl::Seconds(1);
  const absl::Duration retry = absl::Seconds(3);
  std::unique_ptr<MemcachedPipeline> reader = StartReader({server.node()}, io_timeout, retry);
  ASSERT_NE(reader, nullptr);

  const absl::Time first = absl::Now();
  Timed stalled = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(5)));
  EXPECT_TRUE(absl::IsUnavailable(stalled.result.status())) << stalled.result.status();
  EXPECT_GE(stalled.took, io_timeout - absl::Milliseconds(50));
  EXPECT_LE(stalled.took, io_timeout + kMargin);
  EXPECT_TRUE(server.AwaitLines(1));  // It did reach the node.

  // The stalled node is dropped and marked failed: reads fail at once, without a connection.
  Timed skipped = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(5)));
  EXPECT_TRUE(absl::IsUnavailable(skipped.result.status())) << skipped.result.status();
  EXPECT_LT(skipped.took, absl::Milliseconds(500));
  EXPECT_EQ(server.accepted(), 1);

  absl::StatusOr<MemcachedHits> got = absl::UnavailableError("not tried");
  absl::Time succeeded;
  while (absl::Now() < first + io_timeout + retry + absl::Seconds(5)) {
    got = reader->Get(0, {"k"}, Deadline(absl::Seconds(2)));
    succeeded = absl::Now();
    if (got.ok()) break;
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->at("k").value, "value of k");
  EXPECT_GE(succeeded - first, io_timeout + retry - absl::Milliseconds(50));
  EXPECT_EQ(server.accepted(), 2);
}

// A connect that never completes (the peer's accept queue is full, so the kernel drops its
// SYNs: a host that is down behind a firewall looks the same) fails the read at connect_timeout
// and marks the node failed, as a stall does: the reads after it fail at once for
// retry_after_failure instead of each waiting out a connect of its own.
TEST(MemcachedPipelineFailureTest, ConnectTimeoutFailsTheReadAndMarksTheNodeFailed) {
  SilentListener peer(/*backlog=*/1);
  ASSERT_NE(peer.port(), 0);
  peer.Fill();

  MemcachedPipelineOptions options;
  options.nodes = {MemcachedNode{"127.0.0.1", static_cast<uint16_t>(peer.port())}};
  options.connect_timeout = absl::Seconds(1);
  options.io_timeout = absl::Seconds(5);
  options.retry_after_failure = absl::Seconds(60);
  absl::StatusOr<std::unique_ptr<MemcachedPipeline>> reader = MemcachedPipeline::Start(options);
  ASSERT_TRUE(reader.ok()) << reader.status();

  Timed timed_out = TimedGet(**reader, {"k"}, Deadline(absl::Seconds(8)));
  EXPECT_TRUE(absl::IsUnavailable(timed_out.result.status())) << timed_out.result.status();
  EXPECT_TRUE(absl::StrContains(timed_out.result.status().message(), "connect timed out"))
      << timed_out.result.status();
  EXPECT_GE(timed_out.took, options.connect_timeout - absl::Milliseconds(50));
  EXPECT_LE(timed_out.took, options.connect_timeout + kMargin);

  for (int i = 0; i < 2; ++i) {
    Timed skipped = TimedGet(**reader, {"k"}, Deadline(absl::Seconds(8)));
    EXPECT_TRUE(absl::IsUnavailable(skipped.result.status())) << skipped.result.status();
    EXPECT_LT(skipped.took, absl::Milliseconds(500)) << "read " << i << " waited for a connect";
  }
}

TEST(MemcachedPipelineFailureTest, DeadlineShorterThanIoTimeoutIsKept) {
  FakeMemcached server({Silent()});
  const absl::Duration io_timeout = absl::Seconds(4);
  std::unique_ptr<MemcachedPipeline> reader = StartReader({server.node()}, io_timeout);
  ASSERT_NE(reader, nullptr);
  // wait + kMargin < io_timeout: what ends these reads is their deadline, not the stall.
  const absl::Duration wait = absl::Milliseconds(400);
  Timed stalled = TimedGet(*reader, {"k"}, Deadline(wait));
  EXPECT_TRUE(absl::IsUnavailable(stalled.result.status())) << stalled.result.status();
  EXPECT_GE(stalled.took, wait - absl::Milliseconds(50));
  EXPECT_LE(stalled.took, wait + kMargin);

  // The same, without a blocked caller: the I/O thread answers at the deadline.
  struct Answer {
    Notification done;
    absl::StatusOr<MemcachedHits> result;
    absl::Duration took;
  };
  auto answer = std::make_shared<Answer>();
  const absl::Time start = absl::Now();
  reader->GetAsync(0, {"k"}, Deadline(wait), [answer, start](absl::StatusOr<MemcachedHits> r) {
    answer->result = std::move(r);
    answer->took = absl::Now() - start;
    answer->done.Notify();
  });
  ASSERT_TRUE(answer->done.WaitForNotificationWithTimeout(io_timeout + kMargin));
  EXPECT_TRUE(absl::IsUnavailable(answer->result.status())) << answer->result.status();
  EXPECT_GE(answer->took, wait - absl::Milliseconds(50));
  EXPECT_LE(answer->took, wait + kMargin);
}

// A read in flight when the wall clock steps, on a node that never answers; a second read,
// submitted after the step with a deadline on the stepped clock, wakes the I/O thread.
// Answers the first read and how long after its submission it was answered.
struct SteppedRead {
  AsyncAnswer<MemcachedHits> answer;
  absl::Duration took;
};
SteppedRead ReadAcrossAWallClockStep(absl::Duration step, absl::Duration io_timeout) {
  FakeMemcached server({Silent()});
  SteppingClock wall;
  std::unique_ptr<MemcachedPipeline> reader =
      StartReader({server.node()}, io_timeout, absl::Seconds(60), &wall);
  if (reader == nullptr) return {};
  Pending<MemcachedHits> first;
  const absl::Time start = absl::Now();
  reader->GetAsync(0, {"k"}, wall.Now() + absl::Seconds(30), first.Callback());
  EXPECT_TRUE(server.AwaitLines(1));
  wall.Step(step);
  Pending<MemcachedHits> second;
  reader->GetAsync(0, {"k2"}, wall.Now() + absl::Seconds(30), second.Callback());
  SteppedRead read{first.Wait(io_timeout + kMargin), absl::InfiniteDuration()};
  const bool answered = read.answer.thread != std::thread::id();
  if (answered) read.took = read.answer.at - start;
  return read;
}

// The stall timeout runs on the steady clock: a step back does not put it off by the step (it
// used to, and with it every read on the node, for as long as the step).
TEST(MemcachedPipelineFailureTest, AWallClockStepBackDoesNotStretchTheStallTimeout) {
  const absl::Duration io_timeout = absl::Seconds(1);
  SteppedRead read = ReadAcrossAWallClockStep(-absl::Hours(1), io_timeout);
  EXPECT_TRUE(absl::IsUnavailable(read.answer.result.status())) << read.answer.result.status();
  EXPECT_LE(read.took, io_timeout + kMargin);
}

// Nor does a step forward end it early: it used to fail every read in flight at once and take
// the node out for retry_after_failure, as if it had stalled.
TEST(MemcachedPipelineFailureTest, AWallClockStepForwardFailsNoReadEarly) {
  const absl::Duration io_timeout = absl::Seconds(1);
  SteppedRead read = ReadAcrossAWallClockStep(absl::Hours(1), io_timeout);
  EXPECT_TRUE(absl::IsUnavailable(read.answer.result.status())) << read.answer.result.status();
  EXPECT_GE(read.took, io_timeout - absl::Milliseconds(50));
}

// Answers that are not memcached's, or not for what was asked, drop the connection and fail the
// read; the next read opens a new connection (the node is not marked failed).
struct Surprise {
  std::string name;
  std::string answer;  // To "gets k".
};
void PrintTo(const Surprise& s, std::ostream* os) { *os << s.name; }

class MemcachedPipelineProtocolTest : public ::testing::TestWithParam<Surprise> {};

TEST_P(MemcachedPipelineProtocolTest, SurpriseFailsTheReadAndTheNextReadReconnects) {
  FakeMemcached server({Say(GetParam().answer), Serve()});
  const absl::Duration io_timeout = absl::Seconds(5);
  // A long retry period: if the surprise marked the node failed, the next read would fail.
  std::unique_ptr<MemcachedPipeline> reader =
      StartReader({server.node()}, io_timeout, absl::Seconds(60));
  ASSERT_NE(reader, nullptr);

  Timed bad = TimedGet(*reader, {"k"}, Deadline());
  EXPECT_TRUE(absl::IsUnavailable(bad.result.status())) << bad.result.status();
  EXPECT_LT(bad.took, io_timeout / 2) << "a bad answer must end the read, not a timeout";

  Timed good = TimedGet(*reader, {"k", "k2"}, Deadline());
  ASSERT_TRUE(good.result.ok()) << good.result.status();
  EXPECT_EQ(good.result->size(), 2u);
  EXPECT_EQ(good.result->at("k").value, "value of k");
  EXPECT_EQ(good.result->at("k2").value, "value of k2");
  EXPECT_EQ(server.accepted(), 2);
}

INSTANTIATE_TEST_SUITE_P(
    Answers, MemcachedPipelineProtocolTest,
    ::testing::Values(
        Surprise{"Greeting", "HELLO\r\n"}, Surprise{"Error", "ERROR\r\n"},
        Surprise{"ServerError", "SERVER_ERROR out of memory\r\n"},
        // Another caller's key: must never be handed to this one.
        Surprise{"KeyNotAsked", "VALUE someone-else 0 1 1\r\nx\r\nEND\r\n"},
        // The command's own word, and an empty key, are not keys that were asked for either.
        Surprise{"CommandWordAsKey", "VALUE gets 0 1 1\r\nx\r\nEND\r\n"},
        Surprise{"EmptyKey", "VALUE  0 1 1\r\nx\r\nEND\r\n"},
        Surprise{"SixFields", "VALUE k 0 1 1 9\r\nx\r\nEND\r\n"},
        // More bytes than announced; cut at the announced length the rest would read as "END".
        Surprise{"LongerThanAnnounced", "VALUE k 0 1 1\r\naxxEND\r\n"},
        Surprise{"LengthNotANumber", "VALUE k 0 x 1\r\nx\r\nEND\r\n"},
        // No CAS: a "get" answer, not a "gets" one.
        Surprise{"NoCas", "VALUE k 0 1\r\nx\r\nEND\r\n"},
        // Longer than any value the server writes (16 MiB): refused at the header, before the
        // node's buffer grows towards it, not when the I/O timeout ends the wait for the bytes.
        Surprise{"LengthPastAnyValueWritten", "VALUE k 0 16777217 1\r\n"},
        // A header line far longer than memcached ever sends, with no end.
        Surprise{"EndlessLine", std::string(4096, 'V')}),
    [](const ::testing::TestParamInfo<Surprise>& info) { return info.param.name; });

TEST(MemcachedPipelineFailureTest, ServerHangUpReconnectsWithoutMarkingTheNodeFailed) {
  Script once = Say("END\r\n");
  once.hang_up = true;
  FakeMemcached server({once, Serve()});
  std::unique_ptr<MemcachedPipeline> reader =
      StartReader({server.node()}, absl::Seconds(5), absl::Seconds(60));
  ASSERT_NE(reader, nullptr);

  absl::StatusOr<MemcachedHits> got = reader->Get(0, {"k"}, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->empty());

  // A read racing the hang-up may fail; within the 60 s retry period one must succeed, which
  // it could not if the hang-up had marked the node failed.
  const absl::Time give_up = absl::Now() + absl::Seconds(5);
  do {
    got = reader->Get(0, {"k"}, Deadline());
    if (got.ok()) break;
    absl::SleepFor(absl::Milliseconds(20));
  } while (absl::Now() < give_up);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->at("k").value, "value of k");
  EXPECT_EQ(server.accepted(), 2);
}

// A caller that reacts to UNAVAILABLE by reading again (another node, say) does so from its
// callback. The callback of a read refused before it is queued (its node is marked failed) runs
// on the calling thread; the new read from inside it must not deadlock on the reader's own lock.
// Run in a child process with an alarm, so that a deadlock fails this test instead of hanging
// the suite.
TEST(MemcachedPipelineDeathTest, CallbackOfAFailFastReadMayStartAnotherRead) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        alarm(10);
        {
          FakeMemcached stalled({Silent()});
          std::unique_ptr<MemcachedPipeline> reader =
              StartReader({stalled.node()}, absl::Milliseconds(300), absl::Seconds(60));
          // The stall marks the node failed, just after it answers the reads on the node. Once it
          // is marked, reads are refused before they are queued: their callback has run by the
          // time GetAsync returns.
          if (reader == nullptr || reader->Get(0, {"k"}, Deadline()).ok()) _exit(2);
          bool marked = false;
          for (int i = 0; i < 100 && !marked; ++i) {
            auto answered = std::make_shared<Notification>();
            reader->GetAsync(0, {"k"}, Deadline(),
                             [answered](absl::StatusOr<MemcachedHits>) { answered->Notify(); });
            marked = answered->HasBeenNotified();
            answered->WaitForNotification();
          }
          if (!marked) _exit(2);
          Notification second_answered;
          reader->GetAsync(0, {"k"}, Deadline(), [&](absl::StatusOr<MemcachedHits> first) {
            if (first.ok()) _exit(3);
            reader->GetAsync(0, {"k"}, Deadline(),
                             [&](absl::StatusOr<MemcachedHits>) { second_answered.Notify(); });
          });
          if (!second_answered.WaitForNotificationWithTimeout(absl::Seconds(5))) _exit(4);
          // Join every thread (the reader's here, the fake server's at the end of this scope)
          // before exiting: ThreadSanitizer fails an exit that leaves a finished thread unjoined.
          reader.reset();
        }
        _exit(0);
      },
      ::testing::ExitedWithCode(0), "");
}

// ---------------------------------------------------------------------------------------------
// Storage commands against the scripted server.

struct TimedStore {
  absl::StatusOr<MemcachedStored> result;
  absl::Duration took;
};
TimedStore TimedSet(MemcachedPipeline& pipeline, absl::Time deadline) {
  const absl::Time start = absl::Now();
  absl::StatusOr<MemcachedStored> result =
      pipeline.Store(0, MemcachedWrite::kSet, "k", "v", 0, 0, deadline);
  return {std::move(result), absl::Now() - start};
}

// A reply that is not a storage reply (or not this one) to a store: the store fails, and the
// connection is dropped, not the node marked failed. Surprise::answer answers "set k" here.
class MemcachedPipelineStoreProtocolTest : public ::testing::TestWithParam<Surprise> {};

TEST_P(MemcachedPipelineStoreProtocolTest, SurpriseFailsTheStoreAndTheNextStoreReconnects) {
  FakeMemcached server({SayToStores(GetParam().answer), ServeStores()});
  const absl::Duration io_timeout = absl::Seconds(5);
  // A long retry period: if the surprise marked the node failed, the next store would fail.
  std::unique_ptr<MemcachedPipeline> pipeline =
      StartReader({server.node()}, io_timeout, absl::Seconds(60));
  ASSERT_NE(pipeline, nullptr);

  TimedStore bad = TimedSet(*pipeline, Deadline());
  EXPECT_TRUE(absl::IsUnavailable(bad.result.status()))
      << (bad.result.ok() ? StoredName(*bad.result) : bad.result.status().ToString());
  EXPECT_LT(bad.took, io_timeout / 2) << "a bad reply must end the store, not a timeout";

  EXPECT_TRUE(IsReply(TimedSet(*pipeline, Deadline()).result, MemcachedStored::kStored));
  EXPECT_TRUE(IsReply(pipeline->Store(0, MemcachedWrite::kAdd, "k", "v", 0, 0, Deadline()),
                      MemcachedStored::kNotStored));
  EXPECT_EQ(server.accepted(), 2);
}

INSTANTIATE_TEST_SUITE_P(
    Replies, MemcachedPipelineStoreProtocolTest,
    ::testing::Values(
        Surprise{"Error", "ERROR\r\n"}, Surprise{"ClientError", "CLIENT_ERROR bad data chunk\r\n"},
        // What a get is answered.
        Surprise{"Value", "VALUE k 0 1 1\r\nx\r\nEND\r\n"}, Surprise{"End", "END\r\n"},
        // Replies of other commands.
        Surprise{"Deleted", "DELETED\r\n"}, Surprise{"Touched", "TOUCHED\r\n"},
        // Near misses.
        Surprise{"TrailingSpace", "STORED \r\n"}, Surprise{"LowerCase", "stored\r\n"},
        Surprise{"EmptyLine", "\r\n"}, Surprise{"EndlessLine", std::string(4096, 'S')}),
    [](const ::testing::TestParamInfo<Surprise>& info) { return info.param.name; });

// A store and a get behind it, both on the wire before the peer answers: `store_reply` for the
// store, then a good answer for the get. Then one more set, on the same connection when it was
// kept, on a new one otherwise.
struct StoreThenGet {
  absl::StatusOr<MemcachedStored> stored;
  absl::StatusOr<MemcachedHits> got;
  bool next_set_stored = false;
  int connections = 0;
};
StoreThenGet AnswerStoreThenGet(const std::string& store_reply) {
  auto replied = std::make_shared<std::atomic<bool>>(false);
  Script reply{[store_reply, replied](const std::string& line) -> std::optional<std::string> {
    if (absl::StartsWith(line, "gets ")) {
      replied->store(true);
      return store_reply + "VALUE k 0 10 7\r\nvalue of k\r\nEND\r\n";
    }
    // Sets after that (on a connection kept) are stored.
    if (replied->load() && absl::StartsWith(line, "set ")) return "STORED\r\n"s;
    return std::nullopt;
  }};
  FakeMemcached server({reply, ServeStores()});
  std::unique_ptr<MemcachedPipeline> pipeline =
      StartReader({server.node()}, absl::Seconds(5), absl::Seconds(60));
  StoreThenGet out;
  if (pipeline == nullptr) {
    ADD_FAILURE() << "no pipeline";
    return out;
  }
  Pending<MemcachedStored> store;
  Pending<MemcachedHits> get;
  pipeline->StoreAsync(0, MemcachedWrite::kSet, "k", "v", 0, 0, Deadline(), store.Callback());
  pipeline->GetAsync(0, {"k"}, Deadline(), get.Callback());
  out.stored = store.Wait().result;
  out.got = get.Wait().result;
  out.next_set_stored = IsReply(TimedSet(*pipeline, Deadline()).result, MemcachedStored::kStored);
  out.connections = server.accepted();
  return out;
}

// Once one reply is wrong the stream cannot be trusted: what follows it, well-formed or not, is
// nobody's answer.
TEST(MemcachedPipelineFailureTest, BadStoreReplyFailsEveryRequestInFlightOnTheConnection) {
  const StoreThenGet answers = AnswerStoreThenGet("ERROR\r\n");
  EXPECT_TRUE(absl::IsUnavailable(answers.stored.status()))
      << (answers.stored.ok() ? StoredName(*answers.stored) : answers.stored.status().ToString());
  EXPECT_TRUE(absl::IsUnavailable(answers.got.status())) << answers.got.status();
  EXPECT_TRUE(answers.next_set_stored);
  EXPECT_EQ(answers.connections, 2);
}

TEST(MemcachedPipelineFailureTest, StoreWithoutReplyFailsByItsDeadlineOrTheIoTimeout) {
  FakeMemcached server({Silent()});
  {
    const absl::Duration io_timeout = absl::Seconds(4);
    std::unique_ptr<MemcachedPipeline> pipeline = StartReader({server.node()}, io_timeout);
    ASSERT_NE(pipeline, nullptr);
    // wait + kMargin < io_timeout: what ends these stores is their deadline.
    const absl::Duration wait = absl::Milliseconds(400);
    TimedStore stalled = TimedSet(*pipeline, Deadline(wait));
    EXPECT_TRUE(absl::IsUnavailable(stalled.result.status()))
        << (stalled.result.ok() ? StoredName(*stalled.result) : stalled.result.status().ToString());
    EXPECT_GE(stalled.took, wait - absl::Milliseconds(50));
    EXPECT_LE(stalled.took, wait + kMargin);

    // Without a blocked caller: the I/O thread answers at the deadline.
    Pending<MemcachedStored> pending;
    const absl::Time start = absl::Now();
    pipeline->StoreAsync(0, MemcachedWrite::kCas, "k", "v", 0, 7, Deadline(wait),
                         pending.Callback());
    const AsyncAnswer<MemcachedStored> answer = pending.Wait(io_timeout + kMargin);
    EXPECT_TRUE(absl::IsUnavailable(answer.result.status()))
        << (answer.result.ok() ? StoredName(*answer.result) : answer.result.status().ToString());
    EXPECT_GE(answer.at - start, wait - absl::Milliseconds(50));
    EXPECT_LE(answer.at - start, wait + kMargin);
  }
  {
    // A deadline far off: the stall ends the store at io_timeout.
    const absl::Duration io_timeout = absl::Milliseconds(700);
    std::unique_ptr<MemcachedPipeline> pipeline = StartReader({server.node()}, io_timeout);
    ASSERT_NE(pipeline, nullptr);
    TimedStore stalled = TimedSet(*pipeline, Deadline(absl::Seconds(10)));
    EXPECT_TRUE(absl::IsUnavailable(stalled.result.status()))
        << (stalled.result.ok() ? StoredName(*stalled.result) : stalled.result.status().ToString());
    EXPECT_GE(stalled.took, io_timeout - absl::Milliseconds(50));
    EXPECT_LE(stalled.took, io_timeout + kMargin);
  }
  // They did reach the node: three stores of two lines each.
  EXPECT_TRUE(server.AwaitLines(6, absl::Seconds(1)));
}

// A node that still answers, but slower than it is asked (swapping, starved of CPU), sends
// bytes often enough that it never looks silent. Its backlog must not grow without bound behind
// requests already given up: once its oldest request has waited io_timeout, it is dropped and
// skipped for a while, like a silent node.
TEST(MemcachedPipelineFailureTest, ANodeThatAnswersSlowerThanItIsAskedIsDropped) {
  Script slow{[](const std::string& line) -> std::optional<std::string> {
    absl::SleepFor(absl::Milliseconds(300));
    return Serve().reply(line);
  }};
  FakeMemcached server({slow});
  const absl::Duration io_timeout = absl::Seconds(1);
  std::unique_ptr<MemcachedPipeline> pipeline = StartReader({server.node()}, io_timeout);
  ASSERT_NE(pipeline, nullptr);
  // A read every 100 ms, each given up after 200 ms: three times what the node can answer.
  constexpr int kReads = 30;
  std::vector<std::string> errors(kReads);
  std::vector<Notification> answered(kReads);
  for (int i = 0; i < kReads; ++i) {
    pipeline->GetAsync(0, {absl::StrCat("k", i)}, Deadline(absl::Milliseconds(200)),
                       [&errors, &answered, i](absl::StatusOr<MemcachedHits> got) {
                         errors[i] = got.ok() ? "" : std::string(got.status().message());
                         answered[i].Notify();
                       });
    absl::SleepFor(absl::Milliseconds(100));
  }
  for (auto& a : answered) ASSERT_TRUE(a.WaitForNotificationWithTimeout(kMargin * 4));
  const int dropped = static_cast<int>(std::count_if(errors.begin(), errors.end(), [](auto& e) {
    return absl::StrContains(e, "answering too slowly");
  }));
  EXPECT_GT(dropped, 0) << "the slow node was never dropped; its backlog kept growing";
}

// A store given up at its deadline still gets its reply later, on the same connection; that
// reply must be skipped, not handed to the store sent after it.
TEST(MemcachedPipelineFailureTest, LateReplyOfAStoreGivenUpIsNotHandedToTheNextStore) {
  auto first = std::make_shared<std::atomic<bool>>(true);
  Script slow_first{[first](const std::string& line) -> std::optional<std::string> {
    if (!IsStorageCommand(line)) return std::nullopt;
    if (first->exchange(false)) {
      absl::SleepFor(absl::Milliseconds(600));
      return "NOT_STORED\r\n"s;
    }
    return "STORED\r\n"s;
  }};
  FakeMemcached server({slow_first});
  std::unique_ptr<MemcachedPipeline> pipeline = StartReader({server.node()}, absl::Seconds(5));
  ASSERT_NE(pipeline, nullptr);

  TimedStore given_up = TimedSet(*pipeline, Deadline(absl::Milliseconds(200)));
  EXPECT_TRUE(absl::IsUnavailable(given_up.result.status()))
      << (given_up.result.ok() ? StoredName(*given_up.result)
                               : given_up.result.status().ToString());
  EXPECT_LT(given_up.took, absl::Milliseconds(200) + kMargin);
  // Sent while the first reply is still due: its answer is the second reply.
  EXPECT_TRUE(IsReply(TimedSet(*pipeline, Deadline()).result, MemcachedStored::kStored));
  EXPECT_TRUE(IsReply(TimedSet(*pipeline, Deadline()).result, MemcachedStored::kStored));
  EXPECT_EQ(server.accepted(), 1) << "a late reply is no reason to drop the connection";
}

// A store whose time ran out while the I/O thread was held up elsewhere (here a callback that
// blocks, as a starved CPU would) is failed and not sent: a write its caller was told had failed
// must not land later. It used to be written first and failed by the timer check after.
TEST(MemcachedPipelineFailureTest, AStoreWhoseTimeRanOutBeforeItsTurnIsNotSent) {
  FakeMemcached reads({Serve()});
  FakeMemcached writes({ServeStores()});
  std::unique_ptr<MemcachedPipeline> pipeline =
      StartReader({reads.node(), writes.node()}, absl::Seconds(5));
  ASSERT_NE(pipeline, nullptr);
  // The connection to the second node is open and idle: "set k 0 0 1" and its data line.
  ASSERT_TRUE(IsReply(pipeline->Store(1, MemcachedWrite::kSet, "k", "v", 0, 0, Deadline()),
                      MemcachedStored::kStored));
  ASSERT_TRUE(writes.AwaitLines(2));
  auto holding = std::make_shared<Notification>();
  pipeline->GetAsync(0, {"k"}, Deadline(), [holding](absl::StatusOr<MemcachedHits>) {
    holding->Notify();
    absl::SleepFor(absl::Milliseconds(600));
  });
  ASSERT_TRUE(holding->WaitForNotificationWithTimeout(absl::Seconds(10)));
  Pending<MemcachedStored> late;
  pipeline->StoreAsync(1, MemcachedWrite::kSet, "late", "v", 0, 0,
                       Deadline(absl::Milliseconds(200)), late.Callback());
  const AsyncAnswer<MemcachedStored> answer = late.Wait(absl::Seconds(5));
  EXPECT_TRUE(absl::IsUnavailable(answer.result.status())) << answer.result.status();
  EXPECT_FALSE(writes.AwaitLines(3, absl::Milliseconds(500)))
      << "the store was sent after its time had run out";
}

// A node whose answer came in while another node's callback held the I/O thread answered in
// time: it must not be taken for a stalled one (dropped, its read failed, the node marked
// failed) because the clock moved on during the callback, before its answer could be read.
TEST(MemcachedPipelineFailureTest, AnAnswerThatCameDuringASlowCallbackIsNotAStall) {
  const auto after = [](absl::Duration delay) {
    Script serve = Serve();
    return Script{[serve, delay](const std::string& line) {
      absl::SleepFor(delay);
      return serve.reply(line);
    }};
  };
  FakeMemcached first({after(absl::Milliseconds(100))});
  FakeMemcached second({after(absl::Milliseconds(300))});
  const absl::Duration io_timeout = absl::Seconds(1);
  std::unique_ptr<MemcachedPipeline> pipeline =
      StartReader({first.node(), second.node()}, io_timeout);
  ASSERT_NE(pipeline, nullptr);
  pipeline->GetAsync(0, {"k"}, Deadline(), [](absl::StatusOr<MemcachedHits>) {
    absl::SleepFor(absl::Milliseconds(1500));  // Past io_timeout, with the second's answer in.
  });
  Pending<MemcachedHits> read;
  pipeline->GetAsync(1, {"k"}, Deadline(), read.Callback());
  const AsyncAnswer<MemcachedHits> answer = read.Wait(absl::Seconds(10));
  ASSERT_TRUE(answer.result.ok()) << answer.result.status();
  EXPECT_EQ(answer.result->at("k").value, "value of k");
}

// memcached reads an exptime into a 32-bit int: a Unix time past 2038-01-19, though within the
// coming year, would wrap to a past one, and the item, answered STORED, be gone at once.
TEST(MemcachedPipelineFailureTest, AUnixExptimePastWhatMemcachedCanReadIsRefused) {
  FakeMemcached server({ServeStores()});
  SteppingClock wall;  // Some months before 2038-01-19.
  wall.Step(absl::FromUnixSeconds(int64_t{std::numeric_limits<int32_t>::max()}) -
            absl::Hours(24 * 100) - absl::Now());
  std::unique_ptr<MemcachedPipeline> pipeline =
      StartReader({server.node()}, absl::Seconds(5), absl::Seconds(1), &wall);
  ASSERT_NE(pipeline, nullptr);
  const int64_t last = std::numeric_limits<int32_t>::max();
  // Deadlines are read on the pipeline's wall clock.
  const absl::StatusOr<MemcachedStored> past = pipeline->Store(
      0, MemcachedWrite::kSet, "k", "v", last + 3600, 0, wall.Now() + absl::Seconds(10));
  EXPECT_EQ(past.status().code(), absl::StatusCode::kInvalidArgument) << past.status();
  EXPECT_TRUE(IsReply(pipeline->Store(0, MemcachedWrite::kSet, "k", "v", last - 3600, 0,
                                      wall.Now() + absl::Seconds(10)),
                      MemcachedStored::kStored));
}

// Reads and stores alike: each is answered once, with UNAVAILABLE, and destruction does not
// wait for the stalled node.
TEST(MemcachedPipelineFailureTest, DestructionAnswersEveryOutstandingRequestOnceWithUnavailable) {
  FakeMemcached server({Silent()});
  std::unique_ptr<MemcachedPipeline> pipeline = StartReader({server.node()}, absl::Seconds(60));
  ASSERT_NE(pipeline, nullptr);
  constexpr int kRequests = 300;  // Two stores, then a get, and so on.
  std::vector<std::atomic<int>> answers(kRequests);
  std::vector<std::atomic<int>> codes(kRequests);
  int lines = 0;
  for (int r = 0; r < kRequests; ++r) {
    if (r % 3 == 2) {
      pipeline->GetAsync(0, {absl::StrCat("k", r)}, Deadline(absl::Seconds(120)),
                         [&answers, &codes, r](absl::StatusOr<MemcachedHits> got) {
                           codes[r] = static_cast<int>(got.status().code());
                           answers[r].fetch_add(1);
                         });
      lines += 1;
    } else {
      const MemcachedWrite op = r % 3 == 0 ? MemcachedWrite::kSet : MemcachedWrite::kCas;
      pipeline->StoreAsync(0, op, absl::StrCat("k", r), "v", 0, 7, Deadline(absl::Seconds(120)),
                           [&answers, &codes, r](absl::StatusOr<MemcachedStored> got) {
                             codes[r] = static_cast<int>(got.status().code());
                             answers[r].fetch_add(1);
                           });
      lines += 2;
    }
  }
  ASSERT_TRUE(server.AwaitLines(lines));
  for (int r = 0; r < kRequests; ++r) ASSERT_EQ(answers[r].load(), 0) << "request " << r;

  const absl::Time start = absl::Now();
  pipeline.reset();
  EXPECT_LT(absl::Now() - start, kMargin) << "destruction must not wait for the stalled node";
  for (int r = 0; r < kRequests; ++r) {
    ASSERT_EQ(answers[r].load(), 1) << "request " << r;
    ASSERT_EQ(codes[r].load(), static_cast<int>(absl::StatusCode::kUnavailable)) << "request " << r;
  }
}

// The blocking path's libmemcached says the same of a value above the item size limit: the
// caller reads the field, the log libmemcached's words.
TEST(MemcachedStatusTest, AnItemTooBigNamesTheFieldForCallers) {
  const absl::Status too_big = MemcachedStatus(MEMCACHED_E2BIG, "set");
  EXPECT_EQ(too_big.code(), absl::StatusCode::kInvalidArgument) << too_big;
  EXPECT_EQ(CallerMessage(too_big).value_or(""), kSessionTooLargeForAnItem);
  EXPECT_TRUE(absl::StrContains(too_big.message(), "memcached set")) << too_big;
  EXPECT_FALSE(CallerMessage(MemcachedStatus(MEMCACHED_TIMEOUT, "get")).has_value());
}

// A memcached that refuses this server's credentials is, to a caller, one that is down:
// UNAVAILABLE, as the contract has it for a backing service, not INTERNAL. A request libmemcached
// finds malformed is this server's own bug, and stays INTERNAL.
TEST(MemcachedStatusTest, ARefusedLoginIsUnavailableAndABadRequestInternal) {
  for (const memcached_return_t refused : {MEMCACHED_AUTH_FAILURE, MEMCACHED_AUTH_PROBLEM}) {
    EXPECT_EQ(MemcachedStatus(refused, "get").code(), absl::StatusCode::kUnavailable)
        << memcached_strerror(nullptr, refused);
  }
  EXPECT_EQ(MemcachedStatus(MEMCACHED_BAD_KEY_PROVIDED, "get").code(), absl::StatusCode::kInternal);
}

// memcached answers a storage command it cannot carry out (a value above its item size limit, no
// memory for it) with SERVER_ERROR and swallows the data: the connection stays in step, and the
// requests behind it are answered as usual.
TEST(MemcachedPipelineFailureTest, ServerErrorToAStoreFailsThatStoreOnly) {
  const StoreThenGet too_large = AnswerStoreThenGet("SERVER_ERROR object too large for cache\r\n");
  EXPECT_EQ(too_large.stored.status().code(), absl::StatusCode::kInvalidArgument)
      << too_large.stored.status();
  // The caller reads the field to blame, not the node's address.
  EXPECT_EQ(CallerMessage(too_large.stored.status()).value_or(""), kSessionTooLargeForAnItem);
  EXPECT_TRUE(absl::StrContains(too_large.stored.status().message(), "object too large"))
      << too_large.stored.status();
  EXPECT_TRUE(HitIs(too_large.got, "k", "value of k"));
  EXPECT_TRUE(too_large.next_set_stored);
  EXPECT_EQ(too_large.connections, 1);

  // Any other refusal is the node's trouble (another copy may take the write): UNAVAILABLE for
  // that store alone.
  const StoreThenGet no_memory =
      AnswerStoreThenGet("SERVER_ERROR out of memory storing object\r\n");
  EXPECT_TRUE(absl::IsUnavailable(no_memory.stored.status())) << no_memory.stored.status();
  EXPECT_TRUE(HitIs(no_memory.got, "k", "value of k"));
  EXPECT_EQ(no_memory.connections, 1);
}

// A caller that reacts to a write's reply with another request (a read after NOT_STORED, a cas
// retry after EXISTS) starts it from the callback, on the I/O thread. Returns an exit code for
// the child of the death test below: 0 when a chain of such requests, each started from the
// previous one's callback, got its own replies.
int RunChainOfRequestsFromCallbacks() {
  constexpr int kSteps = 40;
  FakeMemcached server({ServeStores()});
  std::unique_ptr<MemcachedPipeline> pipeline = StartReader({server.node()});
  if (pipeline == nullptr) return 2;
  const std::thread::id caller = std::this_thread::get_id();
  std::atomic<int> wrong{0};
  Notification finished;
  std::function<void(int)> step = [&](int i) {
    if (i == kSteps) {
      finished.Notify();
      return;
    }
    // Checks a reply and starts the next step, from the callback's thread.
    auto then = [&, i](bool right) {
      if (!right || std::this_thread::get_id() == caller) wrong.fetch_add(1);
      step(i + 1);
    };
    auto expect = [then](MemcachedStored want) {
      return [then, want](absl::StatusOr<MemcachedStored> r) { then(r.ok() && *r == want); };
    };
    switch (i % 5) {
      case 0:
        pipeline->StoreAsync(0, MemcachedWrite::kSet, "k", "v", 0, 0, Deadline(),
                             expect(MemcachedStored::kStored));
        break;
      case 1:
        pipeline->StoreAsync(0, MemcachedWrite::kAdd, "k", "v", 0, 0, Deadline(),
                             expect(MemcachedStored::kNotStored));
        break;
      case 2:
        pipeline->StoreAsync(0, MemcachedWrite::kCas, "k", "v", 0, 7, Deadline(),
                             expect(MemcachedStored::kExists));
        break;
      case 3:
        pipeline->GetAsync(0, {"k"}, Deadline(), [then](absl::StatusOr<MemcachedHits> r) {
          then(r.ok() && r->count("k") == 1 && r->at("k").value == "value of k");
        });
        break;
      default:
        // Refused before it is queued: answered at once, on the thread that asked (the I/O
        // thread, inside the previous callback).
        pipeline->StoreAsync(0, MemcachedWrite::kSet, "bad key", "v", 0, 0, Deadline(),
                             [then](absl::StatusOr<MemcachedStored> r) {
                               then(absl::IsInvalidArgument(r.status()));
                             });
        break;
    }
  };
  step(0);
  if (!finished.WaitForNotificationWithTimeout(absl::Seconds(5))) return 3;
  // Join the reader's thread (and the fake server's, on return) before the child exits:
  // ThreadSanitizer fails an exit that leaves a finished thread unjoined.
  pipeline.reset();
  return wrong.load() == 0 ? 0 : 4;
}

TEST(MemcachedPipelineDeathTest, CallbackOfAStoreMayStartAnotherStore) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        alarm(10);
        _exit(RunChainOfRequestsFromCallbacks());
      },
      ::testing::ExitedWithCode(0), "");
}

}  // namespace
}  // namespace sessionledger::testing
