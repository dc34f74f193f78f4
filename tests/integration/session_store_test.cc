// MemcachedSessionStore directly against the real memcached nodes: TTL limits and placement.
#include <poll.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/common/clock.h"
#include "server/common/notification.h"
#include "server/common/thread_name.h"
#include "server/config/config.h"
#include "server/domain/caller_message.h"
#include "server/memcached/memcached_pool.h"
#include "server/memcached/memcached_session_store.h"
#include "tests/integration/session_test_support.h"
#include "tests/support/silent_peer.h"
#include "tests/support/step_per_read_clock.h"

namespace sessionledger::testing {
namespace {

using ::testing::ElementsAre;

class SessionStoreTest : public ::testing::Test {
 protected:
  void TearDown() override {
    // The store and the pool go first (the pipeline fails whatever still waits): a call
    // answered again then, or too late for the 20 ms its own check waits, shows up here.
    store_.reset();
    pool_.reset();
    for (size_t i = 0; i < answer_counts_.size(); ++i) {
      EXPECT_EQ(answer_counts_[i]->load(), 1)
          << "asynchronous call #" << i << " must answer exactly once";
    }
  }

  void Open(const std::string& url_env, bool pipeline = true, const Clock* wall_clock = nullptr) {
    absl::StatusOr<MemcachedUrl> url = ParseMemcachedUrl(RequiredEnv(url_env));
    ASSERT_TRUE(url.ok()) << url.status();
    MemcachedPoolOptions options;
    options.url = *url;
    options.size = 2;
    options.pipeline = pipeline;
    options.wall_clock = wall_clock;
    absl::StatusOr<std::unique_ptr<MemcachedPool>> pool = MemcachedPool::Create(options);
    ASSERT_TRUE(pool.ok()) << pool.status();
    pool_ = std::move(*pool);
    store_ = std::make_unique<MemcachedSessionStore>(*pool_, url->replicas, &executor_);
  }

  // Two copies (replicas = 1) on `nodes`.
  void OpenNodes(std::vector<MemcachedNode> nodes, bool pipeline,
                 absl::Duration io_timeout = MemcachedPoolOptions().io_timeout) {
    MemcachedPoolOptions options;
    options.url.nodes = std::move(nodes);
    options.url.replicas = 1;
    options.size = 2;
    options.pipeline = pipeline;
    options.io_timeout = io_timeout;
    absl::StatusOr<std::unique_ptr<MemcachedPool>> pool = MemcachedPool::Create(options);
    ASSERT_TRUE(pool.ok()) << pool.status();
    pool_ = std::move(*pool);
    store_ = std::make_unique<MemcachedSessionStore>(*pool_, 1, &executor_);
  }

  // A count of the answers to one asynchronous call; TearDown checks it is 1. It outlives the
  // caller's frame, which only the first answer may touch.
  std::shared_ptr<std::atomic<int>> NewAnswerCount() {
    answer_counts_.push_back(std::make_shared<std::atomic<int>>(0));
    return answer_counts_.back();
  }

  // LookupAsync, waited for.
  absl::StatusOr<SessionLookup> LookupAsync(const SessionKey& key) {
    Notification answered;
    absl::StatusOr<SessionLookup> result = absl::InternalError("never answered");
    std::shared_ptr<std::atomic<int>> answers = NewAnswerCount();
    store_->LookupAsync(key, Deadline(), [&, answers](absl::StatusOr<SessionLookup> got) {
      if (answers->fetch_add(1) > 0) return;
      result = std::move(got);
      answered.Notify();
    });
    answered.WaitForNotification();
    // A second answer would run after Notify; give it a moment to show up (TearDown looks
    // again).
    absl::SleepFor(absl::Milliseconds(20));
    EXPECT_EQ(answers->load(), 1);
    return result;
  }

  static SessionKey Key(const std::string& name) {
    const std::string hex = absl::StrCat(absl::ToUnixMicros(absl::Now()), name);
    return SessionKey{absl::StrCat("test", hex), absl::StrCat("tag", hex)};
  }
  static absl::Time Deadline() { return absl::Now() + absl::Seconds(5); }

  BlockingExecutor executor_{2};
  std::unique_ptr<MemcachedPool> pool_;
  std::unique_ptr<MemcachedSessionStore> store_;
  std::vector<std::shared_ptr<std::atomic<int>>> answer_counts_;
};

// A loopback port nothing listens on (bound, then released).
int UnusedPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

// A node nothing listens on.
MemcachedNode DeadNode() { return MemcachedNode{"127.0.0.1", static_cast<uint16_t>(UnusedPort())}; }

// A node that takes connections (the kernel completes them) and requests, and never answers.
MemcachedNode SilentNode(const SilentPeer& peer) {
  return MemcachedNode{"127.0.0.1", static_cast<uint16_t>(peer.port())};
}

storage::v1::StoredSession Session(const std::string& id, int64_t version) {
  storage::v1::StoredSession s;
  s.set_session_id(id);
  s.set_version(version);
  s.set_expires_at_unix_micros(absl::ToUnixMicros(absl::Now() + absl::Minutes(5)));
  return s;
}

// Test name suffix of a path parameter (true: the pipeline; false: pooled libmemcached handles).
std::string PathName(const ::testing::TestParamInfo<bool>& p) {
  return p.param ? "Pipelined" : "Pooled";
}

// Both read paths (pipeline, pooled libmemcached handles) must agree with Lookup.
class LookupAsyncTest : public SessionStoreTest, public ::testing::WithParamInterface<bool> {};

TEST_P(LookupAsyncTest, AnswersWhatLookupAnswers) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  const SessionKey key = Key("async");
  absl::StatusOr<SessionLookup> missing = LookupAsync(key);
  ASSERT_TRUE(missing.ok()) << missing.status();
  EXPECT_FALSE(missing->record.has_value());

  ASSERT_TRUE(store_->Add(key, Session("a", 1), absl::Seconds(60), Deadline()).ok());
  ASSERT_EQ(store_->AdvanceGeneration(key.user_tag, 0, absl::Seconds(60), Deadline())->raised_to,
            1u);
  absl::StatusOr<SessionLookup> sync = store_->Lookup(key, Deadline());
  absl::StatusOr<SessionLookup> async = LookupAsync(key);
  ASSERT_TRUE(sync.ok() && async.ok());
  ASSERT_TRUE(sync->record.has_value() && async->record.has_value());
  EXPECT_EQ(async->record->session.SerializeAsString(), sync->record->session.SerializeAsString());
  EXPECT_EQ(async->record->cas.copy, sync->record->cas.copy);
  EXPECT_EQ(async->record->cas.cas, sync->record->cas.cas);
  EXPECT_EQ(async->user_generation, 1u);

  // Its CAS token is the one writers meet on: it wins once, then loses.
  ASSERT_TRUE(
      store_
          ->CompareAndSwap(key, async->record->cas, Session("a", 2), absl::Seconds(60), Deadline())
          .ok());
  EXPECT_TRUE(absl::IsAborted(store_->CompareAndSwap(key, async->record->cas, Session("a", 3),
                                                     absl::Seconds(60), Deadline())));
}

// A node that lost the session (restarted empty) or kept an older version: the asynchronous
// read must not answer from what it saw, but repair the copy like Lookup does.
TEST_P(LookupAsyncTest, RepairsACopyThatLostOrMissedAWrite) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  for (int node : {1, 2}) {
    SCOPED_TRACE(absl::StrCat("node ", node));
    const SessionKey key = Key(absl::StrCat("repair", node));
    const std::string skey = MemcachedSessionStore::SessionKeyName(key.token_hash);
    ASSERT_TRUE(store_->Add(key, Session("r", 1), absl::Seconds(60), Deadline()).ok());
    absl::StatusOr<SessionLookup> first = store_->Lookup(key, Deadline());
    ASSERT_TRUE(first.ok() && first->record.has_value());
    ASSERT_TRUE(store_
                    ->CompareAndSwap(key, first->record->cas, Session("r", 2), absl::Seconds(60),
                                     Deadline())
                    .ok());
    // The node keeps version 1: it missed the update.
    ASSERT_TRUE(MemcachedSetRaw(node, skey, Session("r", 1).SerializeAsString(), 60));
    absl::StatusOr<SessionLookup> got = LookupAsync(key);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_TRUE(got->record.has_value());
    EXPECT_EQ(got->record->session.version(), 2);
    storage::v1::StoredSession repaired;
    ASSERT_TRUE(repaired.ParseFromString(MemcachedGetValue(node, skey).value_or("")));
    EXPECT_EQ(repaired.version(), 2);

    // The node lost it altogether.
    ASSERT_TRUE(MemcachedSetRaw(node, skey, "", -1));  // Expired at once: gone.
    ASSERT_FALSE(MemcachedHas(node, skey));
    got = LookupAsync(key);
    ASSERT_TRUE(got.ok() && got->record.has_value());
    EXPECT_EQ(got->record->session.version(), 2);
    EXPECT_TRUE(MemcachedHas(node, skey));
  }
}

// A revocation that one copy lacks still counts, and is written back.
TEST_P(LookupAsyncTest, SeesARevocationOnlyOneCopyHolds) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  for (int node : {1, 2}) {
    SCOPED_TRACE(absl::StrCat("node ", node));
    const SessionKey key = Key(absl::StrCat("revoked", node));
    const std::string gkey = MemcachedSessionStore::GenerationKeyName(key.user_tag);
    ASSERT_TRUE(store_->Add(key, Session("g", 1), absl::Seconds(60), Deadline()).ok());
    ASSERT_EQ(store_->AdvanceGeneration(key.user_tag, 0, absl::Seconds(60), Deadline())->raised_to,
              1u);
    ASSERT_TRUE(MemcachedSetRaw(node, gkey, "", -1));  // Expired at once: gone.
    ASSERT_FALSE(MemcachedHas(node, gkey));
    absl::StatusOr<SessionLookup> got = LookupAsync(key);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->user_generation, 1u);
    EXPECT_EQ(MemcachedGetValue(node, gkey), "1");
  }
}

TEST_P(LookupAsyncTest, NoNodeAnsweringIsUnavailable) {
  OpenNodes({DeadNode(), DeadNode()}, GetParam());
  const absl::Time start = absl::Now();
  absl::StatusOr<SessionLookup> got = LookupAsync(Key("down"));
  EXPECT_TRUE(absl::IsUnavailable(got.status())) << got.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  EXPECT_GE(pool_->node_failures(), 1);
}

INSTANTIATE_TEST_SUITE_P(ReadPaths, LookupAsyncTest, ::testing::Values(true, false), PathName);

// A loopback proxy in front of one memcached node, for libmemcached's binary protocol. While
// armed, it runs `between` once on a connection that sends a request to read (a get) right
// after an add: after the add was answered and before the read reaches the node, while the
// client waits. That puts another writer exactly between a read repair's add and its read-back.
class RepairInterposer {
 public:
  RepairInterposer(int node_port, std::function<void()> between)
      : node_port_(node_port), between_(std::move(between)) {
    listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        listen(listen_fd_, 16) != 0 ||
        getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ADD_FAILURE() << "cannot listen on loopback";
      return;
    }
    port_ = ntohs(addr.sin_port);
    acceptor_ = std::thread([this] { Accept(); });
  }
  RepairInterposer(const RepairInterposer&) = delete;
  RepairInterposer& operator=(const RepairInterposer&) = delete;
  ~RepairInterposer() {
    shutdown(listen_fd_, SHUT_RDWR);
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      for (int fd : fds_) shutdown(fd, SHUT_RDWR);
    }
    if (acceptor_.joinable()) acceptor_.join();
    for (std::thread& t : forwarders_) t.join();
    for (int fd : fds_) close(fd);
    close(listen_fd_);
  }

  MemcachedNode node() const { return MemcachedNode{"127.0.0.1", port_}; }
  void Arm(bool armed) { armed_.store(armed); }
  int runs() const { return runs_.load(); }

 private:
  static constexpr uint8_t kAdd = 0x02, kAddQ = 0x12;
  static bool IsRead(uint8_t opcode) {
    return opcode == 0x00 || opcode == 0x09 || opcode == 0x0c || opcode == 0x0d;  // get(k)(q)
  }

  void Accept() {
    for (;;) {
      const int client = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (client < 0) return;
      const int upstream = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_port = htons(static_cast<uint16_t>(node_port_));
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      std::lock_guard<std::mutex> lock(mu_);
      fds_.push_back(client);
      fds_.push_back(upstream);
      if (stopping_ || connect(upstream, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
        shutdown(client, SHUT_RDWR);
        continue;
      }
      forwarders_.emplace_back([this, client, upstream] { Forward(client, upstream); });
    }
  }

  static bool SendAll(int fd, const char* data, size_t n) {
    while (n > 0) {
      const ssize_t sent = send(fd, data, n, MSG_NOSIGNAL);
      if (sent <= 0) return false;
      data += sent;
      n -= static_cast<size_t>(sent);
    }
    return true;
  }

  // Replies pass through as they come; requests go one whole frame at a time.
  void Forward(int client, int upstream) {
    std::string pending;
    bool after_add = false;
    char buf[16384];
    pollfd fds[2] = {{client, POLLIN, 0}, {upstream, POLLIN, 0}};
    for (;;) {
      if (poll(fds, 2, -1) < 0) return;
      if (fds[1].revents != 0) {
        const ssize_t got = recv(upstream, buf, sizeof buf, 0);
        if (got <= 0 || !SendAll(client, buf, static_cast<size_t>(got))) return;
      }
      if (fds[0].revents == 0) continue;
      const ssize_t got = recv(client, buf, sizeof buf, 0);
      if (got <= 0) return;
      pending.append(buf, static_cast<size_t>(got));
      // Header: magic, opcode, ..., total body length at bytes 8-11 (big-endian).
      while (pending.size() >= 24) {
        const auto byte = [&](size_t i) { return static_cast<uint8_t>(pending[i]); };
        const size_t frame = 24 + ((size_t{byte(8)} << 24) | (size_t{byte(9)} << 16) |
                                   (size_t{byte(10)} << 8) | size_t{byte(11)});
        if (pending.size() < frame) break;
        const uint8_t opcode = byte(1);
        if (after_add && IsRead(opcode) && armed_.exchange(false)) {
          between_();
          runs_.fetch_add(1);
        }
        after_add = armed_.load() && (opcode == kAdd || opcode == kAddQ);
        if (!SendAll(upstream, pending.data(), frame)) return;
        pending.erase(0, frame);
      }
    }
  }

  const int node_port_;
  const std::function<void()> between_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> armed_{false};
  std::atomic<int> runs_{0};
  std::thread acceptor_;
  std::mutex mu_;
  bool stopping_ = false;  // Guarded by mu_, as are the two below.
  std::vector<int> fds_;   // Every socket, closed at the end.
  std::vector<std::thread> forwarders_;
};

// A read repair writes a copy back and then reads it again for its CAS value. If another writer
// changed that copy in between, the CAS value belongs to the other write: handed out with our
// older session, it would let our compare-and-swap (on the primary), or the write that follows
// it on the other copies, overwrite that write.
TEST_F(SessionStoreTest, ACasValueIsNeverTakenFromAnotherWritersRepairedCopy) {
  // The other writer's session, set on whichever node the repair read back from.
  const std::string tag = absl::StrCat("tag-cas-repair-", absl::ToUnixMicros(absl::Now()));
  std::string skey;
  const std::string theirs = [] {
    storage::v1::StoredSession s = Session("cas-repair", 2);
    (*s.mutable_attributes())["writer"] = "theirs";
    return s.SerializeAsString();
  }();
  int written_on = 0;
  const auto other_writer = [&](int node) {
    return [&, node] {
      written_on = node;
      ASSERT_TRUE(MemcachedSetRaw(node, skey, theirs, 60));
    };
  };
  RepairInterposer node1(MemcachedPort(1), other_writer(1));
  RepairInterposer node2(MemcachedPort(2), other_writer(2));
  // Either node may hold the primary copy of `tag`'s keys: lose each copy in turn.
  int primaries_lost = 0;
  for (int lost : {1, 2}) {
    SCOPED_TRACE(absl::StrCat("copy lost on node ", lost));
    OpenNodes({node1.node(), node2.node()}, /*pipeline=*/false);  // New connections each time.
    const SessionKey key{absl::StrCat("test-cas-repair-", lost, "-", tag), tag};
    skey = MemcachedSessionStore::SessionKeyName(key.token_hash);
    ASSERT_TRUE(store_->Add(key, Session("cas-repair", 1), absl::Seconds(60), Deadline()).ok());
    ASSERT_TRUE(MemcachedSetRaw(lost, skey, "", -1));  // Expired at once: gone.
    const int runs_before = node1.runs() + node2.runs();
    node1.Arm(true);
    node2.Arm(true);
    absl::StatusOr<SessionLookup> got = store_->Lookup(key, Deadline());
    node1.Arm(false);
    node2.Arm(false);
    ASSERT_TRUE(got.ok() && got->record.has_value()) << got.status();
    ASSERT_EQ(node1.runs() + node2.runs(), runs_before + 1) << "the repair was not read back";
    ASSERT_EQ(written_on, lost);
    storage::v1::StoredSession ours = got->record->session;
    ASSERT_EQ(ours.version(), 1);
    ours.set_version(2);
    (*ours.mutable_attributes())["writer"] = "ours";
    const absl::Status cas =
        store_->CompareAndSwap(key, got->record->cas, ours, absl::Seconds(60), Deadline());
    // The primary's CAS value is the token's: none is current, so the swap fails at once. A
    // second copy's is only what the swap's write there goes by, so the swap itself succeeds.
    if (got->record->cas.copy < 0) {
      primaries_lost += 1;
      EXPECT_TRUE(absl::IsAborted(cas)) << cas;
    } else {
      EXPECT_TRUE(cas.ok()) << cas;
    }
    EXPECT_EQ(MemcachedGetValue(lost, skey), theirs) << "the other writer's session was lost";
  }
  EXPECT_EQ(primaries_lost, 1) << "exactly one of the two copies is the primary";
}

// The asynchronous writes on both paths (parameter: true for the pipeline, false for pooled
// handles on the executor).
class AsyncStoreTest : public SessionStoreTest, public ::testing::WithParamInterface<bool> {
 protected:
  // Runs `start` with a callback and waits for its one answer; notes where it ran.
  template <typename Result, typename Start>
  Result Await(Start start) {
    Notification answered;
    std::optional<Result> result;
    std::shared_ptr<std::atomic<int>> answers = NewAnswerCount();
    const std::thread::id caller = std::this_thread::get_id();
    start([&, answers](Result got) {
      if (answers->fetch_add(1) > 0) return;
      result = std::move(got);
      answered_on_ = ThisThreadName();
      answered_at_once_ = std::this_thread::get_id() == caller;
      answered.Notify();
    });
    answered.WaitForNotification();
    // Room for a second answer to show up (TearDown looks again).
    absl::SleepFor(absl::Milliseconds(20));
    EXPECT_EQ(answers->load(), 1);
    return *std::move(result);
  }

  // The last answer came from the store's own thread: the pipeline's I/O thread, or without a
  // pipeline the executor (never the I/O thread). `or_at_once` also accepts an answer given on
  // the calling thread before the call returned (a request refused before any I/O).
  void ExpectAnsweredOnTheStoreThread(bool or_at_once = false) const {
    if (or_at_once && answered_at_once_) return;
    EXPECT_FALSE(answered_at_once_);
    EXPECT_EQ(answered_on_, GetParam() ? "sl-memcached-io" : "sl-blocking");
  }

  std::string answered_on_;
  bool answered_at_once_ = false;
};

// CreateSession's asynchronous steps on both paths must store exactly what their blocking forms
// store.
class CreateStepsAsyncTest : public AsyncStoreTest {
 protected:
  absl::StatusOr<UserState> ReadUserStateAsync(const std::string& tag) {
    return Await<absl::StatusOr<UserState>>([&](SessionStore::UserStateCallback done) {
      store_->ReadUserStateAsync(tag, absl::Seconds(60), Deadline(), std::move(done));
    });
  }
  absl::Status WriteIndexAsync(const std::string& tag, const std::optional<CasToken>& cas,
                               const storage::v1::UserSessionIndex& index) {
    return Await<absl::Status>([&](SessionStore::StatusCallback done) {
      store_->WriteIndexAsync(tag, cas, index, absl::Seconds(60), Deadline(), std::move(done));
    });
  }
  absl::Status AddAsync(const SessionKey& key, const storage::v1::StoredSession& session) {
    return Await<absl::Status>([&](SessionStore::StatusCallback done) {
      store_->AddAsync(key, session, absl::Seconds(60), Deadline(), std::move(done));
    });
  }
};

storage::v1::UserSessionIndex IndexOf(std::initializer_list<const char*> ids) {
  storage::v1::UserSessionIndex index;
  for (const char* id : ids) {
    auto* entry = index.add_entries();
    entry->set_session_id(id);
    entry->set_absolute_expires_at_unix_micros(absl::ToUnixMicros(absl::Now() + absl::Minutes(5)));
  }
  return index;
}

// The session node `node` holds under `key`, read directly; nullopt when it holds none.
std::optional<storage::v1::StoredSession> SessionOn(int node, const SessionKey& key) {
  const std::optional<std::string> raw =
      MemcachedGetValue(node, MemcachedSessionStore::SessionKeyName(key.token_hash));
  storage::v1::StoredSession session;
  if (!raw.has_value() || !session.ParseFromString(*raw)) return std::nullopt;
  return session;
}

// What a deletion leaves on a copy it reached.
std::string TombstoneValue() {
  storage::v1::StoredSession tombstone = Session("ended", 9);
  tombstone.set_deleted(true);
  return tombstone.SerializeAsString();
}

// Runs `attempt(user, node, on_second_copy)` for users 0, 1, ... on each node in turn, until each
// node has held some user's second copy (the attempt says when it found that: which node holds
// a user's first copy depends on the user's key). Fails the test if that never happened.
void UntilEachNodeHeldASecondCopy(
    absl::FunctionRef<void(int user, int node, bool& on_second_copy)> attempt) {
  bool seen[2] = {false, false};
  for (int user = 0; user < 32 && !(seen[0] && seen[1]); ++user) {
    for (int node : {1, 2}) {
      SCOPED_TRACE(absl::StrCat("user ", user, ", node ", node));
      bool on_second_copy = false;
      attempt(user, node, on_second_copy);
      if (::testing::Test::HasFatalFailure()) return;
      if (on_second_copy) seen[node - 1] = true;
    }
  }
  EXPECT_TRUE(seen[0] && seen[1]) << "some node never held a second copy";
}

// A write reaches the other copies after the first, and may land late, behind other requests
// on its connection: it must not overwrite what a copy took since the read. A plain set there
// put a deleted session back over the tombstone on that copy, and the session lived again once
// the node holding the other tombstone restarted empty. Here the tombstone reaches `node` first;
// where that node holds the first copy, the write is refused there and writes nothing.
TEST_P(CreateStepsAsyncTest, AnAddLeavesWhatAnotherCopyTookSinceAlone) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  UntilEachNodeHeldASecondCopy([&](int user, int node, bool& on_second_copy) {
    const SessionKey key = Key(absl::StrCat("lateadd", user, "n", node));
    const std::string skey = MemcachedSessionStore::SessionKeyName(key.token_hash);
    ASSERT_TRUE(MemcachedSetRaw(node, skey, TombstoneValue(), 60));  // A deletion, first.
    const absl::Status added = AddAsync(key, Session("s", 1));
    on_second_copy = added.ok();
    if (!added.ok()) {
      EXPECT_TRUE(absl::IsAlreadyExists(added)) << added;
    }
    const std::optional<storage::v1::StoredSession> held = SessionOn(node, key);
    ASSERT_TRUE(held.has_value());
    EXPECT_TRUE(held->deleted()) << "the add overwrote the tombstone";
  });
}

// The session ids an index copy on `node` lists, sorted; empty when it holds none.
std::vector<std::string> IndexIdsOn(int node, const std::string& ikey) {
  storage::v1::UserSessionIndex held;
  std::vector<std::string> ids;
  if (!held.ParseFromString(MemcachedGetValue(node, ikey).value_or(""))) return ids;
  for (const auto& entry : held.entries()) ids.push_back(entry.session_id());
  std::sort(ids.begin(), ids.end());
  return ids;
}

// An index write that finds another writer's index on the other copy since its read keeps that
// writer's entries there and adds its own. Left alone, that copy lacked ours: two creates of one
// user at once, and the copy the first reached late missed the second's session, for good once
// the first copy was lost (then listing and revocation missed a live session).
TEST_P(CreateStepsAsyncTest, AnIndexWriteAddsItsEntriesToWhatAnotherCopyTookSince) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  UntilEachNodeHeldASecondCopy([&](int user, int node, bool& on_second_copy) {
    const SessionKey key = Key(absl::StrCat("lateindex", user, "n", node));
    const std::string ikey = MemcachedSessionStore::IndexKeyName(key.user_tag);
    ASSERT_TRUE(WriteIndexAsync(key.user_tag, std::nullopt, IndexOf({"s1"})).ok());
    absl::StatusOr<UserState> read = ReadUserStateAsync(key.user_tag);
    ASSERT_TRUE(read.ok() && read->index.cas.has_value()) << read.status();
    // Another writer's index reached `node` since the read.
    ASSERT_TRUE(MemcachedSetRaw(node, ikey, IndexOf({"s1", "theirs"}).SerializeAsString(), 60));
    const absl::Status written =
        WriteIndexAsync(key.user_tag, read->index.cas, IndexOf({"s1", "ours"}));
    on_second_copy = written.ok();
    if (!written.ok()) {
      // `node` holds the first copy, where every writer's compare-and-swap meets: ours lost.
      EXPECT_TRUE(absl::IsAborted(written)) << written;
      EXPECT_THAT(IndexIdsOn(node, ikey), ElementsAre("s1", "theirs"));
      return;
    }
    EXPECT_THAT(IndexIdsOn(node, ikey), ElementsAre("ours", "s1", "theirs"))
        << "the write dropped the other writer's entries or left out its own";
    EXPECT_THAT(IndexIdsOn(node == 1 ? 2 : 1, ikey), ElementsAre("ours", "s1"));
  });
}

// The first copy came back empty, and the other holds an index of sessions that have all
// expired (or an emptied one, kept for a second). It lists nothing live, so it reads as no
// index, and the next write creates one: it was read with a CAS token of no copy, and every
// write of the index was ABORTED (CreateSession failing) until that stale copy expired.
TEST_P(CreateStepsAsyncTest, AnIndexOfExpiredSessionsOnlyOnTheOtherCopyReadsAsNone) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  storage::v1::UserSessionIndex expired = IndexOf({"gone"});
  expired.mutable_entries(0)->set_absolute_expires_at_unix_micros(
      absl::ToUnixMicros(absl::Now() - absl::Minutes(1)));
  // Users until the stale index sat on each node's second copy (on a first copy it is read
  // as any index is), for both kinds of stale index.
  bool other_copy_seen[2][2] = {{false, false}, {false, false}};
  const auto all_seen = [&] {
    return other_copy_seen[0][0] && other_copy_seen[0][1] && other_copy_seen[1][0] &&
           other_copy_seen[1][1];
  };
  for (int i = 0; i < 32 && !all_seen(); ++i) {
    for (int node : {1, 2}) {
      for (const storage::v1::UserSessionIndex& stale :
           {expired, storage::v1::UserSessionIndex()}) {
        SCOPED_TRACE(absl::StrCat("index of ", stale.entries_size(), " on node ", node));
        const SessionKey key = Key(absl::StrCat("expiredindex", i, node, stale.entries_size()));
        const std::string ikey = MemcachedSessionStore::IndexKeyName(key.user_tag);
        ASSERT_TRUE(MemcachedSetRaw(node, ikey, stale.SerializeAsString(), 60));
        absl::StatusOr<UserState> read = ReadUserStateAsync(key.user_tag);
        ASSERT_TRUE(read.ok()) << read.status();
        // Read as no index at all only when the stale one is on the second copy.
        if (!read->index.cas.has_value()) other_copy_seen[stale.entries_size()][node - 1] = true;
        const absl::Status written =
            WriteIndexAsync(key.user_tag, read->index.cas, IndexOf({"s1"}));
        EXPECT_TRUE(written.ok()) << written;
      }
    }
  }
  EXPECT_TRUE(all_seen());
}

TEST_P(CreateStepsAsyncTest, WritesWhatTheBlockingFormsWriteOnEveryCopy) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  const SessionKey key = Key("create");
  const std::string ikey = MemcachedSessionStore::IndexKeyName(key.user_tag);
  const std::string skey = MemcachedSessionStore::SessionKeyName(key.token_hash);

  absl::StatusOr<UserState> fresh = ReadUserStateAsync(key.user_tag);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->generation, 0u);
  EXPECT_FALSE(fresh->index.cas.has_value());

  // A new index is added once; a second writer that also saw none loses.
  ASSERT_TRUE(WriteIndexAsync(key.user_tag, std::nullopt, IndexOf({"s1"})).ok());
  EXPECT_TRUE(absl::IsAborted(WriteIndexAsync(key.user_tag, std::nullopt, IndexOf({"x"}))));
  for (int node : {1, 2}) {
    storage::v1::UserSessionIndex held;
    ASSERT_TRUE(held.ParseFromString(MemcachedGetValue(node, ikey).value_or("")));
    ASSERT_EQ(held.entries_size(), 1) << "node " << node;
    EXPECT_EQ(held.entries(0).session_id(), "s1");
  }

  // The next read hands out the CAS token writers meet on: it wins once, then loses.
  absl::StatusOr<UserState> read = ReadUserStateAsync(key.user_tag);
  absl::StatusOr<UserState> sync =
      store_->ReadUserState(key.user_tag, absl::Seconds(60), Deadline());
  ASSERT_TRUE(read.ok() && sync.ok());
  ASSERT_TRUE(read->index.cas.has_value() && sync->index.cas.has_value());
  EXPECT_EQ(read->index.cas->copy, sync->index.cas->copy);
  EXPECT_EQ(read->index.cas->cas, sync->index.cas->cas);
  EXPECT_EQ(read->index.index.SerializeAsString(), sync->index.index.SerializeAsString());
  ASSERT_TRUE(WriteIndexAsync(key.user_tag, read->index.cas, IndexOf({"s1", "s2"})).ok());
  EXPECT_TRUE(absl::IsAborted(WriteIndexAsync(key.user_tag, read->index.cas, IndexOf({"y"}))));
  EXPECT_TRUE(absl::IsAborted(
      WriteIndexAsync(key.user_tag, CasToken{read->index.cas->cas, 7}, IndexOf({"y"}))));
  for (int node : {1, 2}) {
    storage::v1::UserSessionIndex held;
    ASSERT_TRUE(held.ParseFromString(MemcachedGetValue(node, ikey).value_or("")));
    EXPECT_EQ(held.entries_size(), 2) << "node " << node;
  }

  // The session: added on every copy, and only once.
  ASSERT_TRUE(AddAsync(key, Session("s2", 1)).ok());
  const absl::Status again = AddAsync(key, Session("other", 1));
  EXPECT_TRUE(absl::IsAlreadyExists(again)) << again;
  for (int node : {1, 2}) {
    storage::v1::StoredSession held;
    ASSERT_TRUE(held.ParseFromString(MemcachedGetValue(node, skey).value_or("")));
    EXPECT_EQ(held.session_id(), "s2") << "node " << node;
  }
  absl::StatusOr<SessionLookup> found = store_->Lookup(key, Deadline());
  ASSERT_TRUE(found.ok() && found->record.has_value());
  EXPECT_EQ(found->record->session.session_id(), "s2");
}

// What makes the read write (a generation to keep alive, an index copy to repair) still
// happens: it goes to the blocking form.
TEST_P(CreateStepsAsyncTest, RevokedUserAndLostIndexCopyAreReadLikeTheBlockingForm) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  for (int node : {1, 2}) {
    SCOPED_TRACE(absl::StrCat("node ", node));
    const std::string tag = Key(absl::StrCat("state", node)).user_tag;
    const std::string gkey = MemcachedSessionStore::GenerationKeyName(tag);
    const std::string ikey = MemcachedSessionStore::IndexKeyName(tag);
    ASSERT_TRUE(
        store_->WriteIndex(tag, std::nullopt, IndexOf({"s1"}), absl::Minutes(5), Deadline()).ok());
    ASSERT_TRUE(MemcachedSetRaw(node, ikey, "", -1));  // This copy lost the index.
    ASSERT_FALSE(MemcachedHas(node, ikey));

    absl::StatusOr<UserState> read = ReadUserStateAsync(tag);
    ASSERT_TRUE(read.ok()) << read.status();
    EXPECT_EQ(read->generation, 0u);
    ASSERT_EQ(read->index.index.entries_size(), 1);
    // A lost primary copy was repaired and its CAS token handed out (a lost secondary is left
    // to the next write): the blocking form, reading now, agrees on both.
    absl::StatusOr<UserState> sync = store_->ReadUserState(tag, absl::Seconds(60), Deadline());
    ASSERT_TRUE(sync.ok() && sync->index.cas.has_value() && read->index.cas.has_value());
    EXPECT_EQ(read->index.cas->copy, sync->index.cas->copy);
    EXPECT_EQ(read->index.cas->cas, sync->index.cas->cas);
    EXPECT_TRUE(WriteIndexAsync(tag, read->index.cas, IndexOf({"s1", "s2"})).ok());

    // Revoked: the generation is read and kept for the 60 s asked, not the 1 s it was written
    // with (memcached would drop that within 1 + 2 s: MemcachedExptime).
    ASSERT_EQ(store_->AdvanceGeneration(tag, 0, absl::Seconds(1), Deadline())->raised_to, 1u);
    read = ReadUserStateAsync(tag);
    ASSERT_TRUE(read.ok()) << read.status();
    EXPECT_EQ(read->generation, 1u);
    EXPECT_EQ(read->index.index.entries_size(), 2);
    if (node == 1) {  // Once is enough for the wait.
      absl::SleepFor(absl::Milliseconds(3500));
      EXPECT_EQ(MemcachedGetValue(1, gkey), "1");
      EXPECT_EQ(MemcachedGetValue(2, gkey), "1");
    }
  }
}

// A node skipped while it stalled comes back with the index as it was before the stall, while
// the other copy got the sessions indexed meanwhile. Whichever copy is the stale one, every read
// form must hand out all the entries, and a write built on what it read keeps them on both.
TEST_P(CreateStepsAsyncTest, IndexEntriesThatOneCopyMissedAreStillRead) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  for (int stale : {1, 2}) {
    SCOPED_TRACE(absl::StrCat("node ", stale, " missed a write"));
    const std::string tag = Key(absl::StrCat("merge", stale)).user_tag;
    const std::string ikey = MemcachedSessionStore::IndexKeyName(tag);
    ASSERT_TRUE(store_
                    ->WriteIndex(tag, std::nullopt, IndexOf({"before", "during"}), absl::Minutes(5),
                                 Deadline())
                    .ok());
    ASSERT_TRUE(MemcachedSetRaw(stale, ikey, IndexOf({"before"}).SerializeAsString(), 300));

    auto ids = [](const storage::v1::UserSessionIndex& index) {
      std::vector<std::string> out;
      for (const auto& e : index.entries()) out.push_back(e.session_id());
      return out;
    };
    const absl::StatusOr<IndexRecord> index = store_->ReadIndex(tag, Deadline());
    ASSERT_TRUE(index.ok()) << index.status();
    EXPECT_THAT(ids(index->index), ::testing::UnorderedElementsAre("before", "during"));
    absl::StatusOr<UserState> sync = store_->ReadUserState(tag, absl::Seconds(60), Deadline());
    ASSERT_TRUE(sync.ok()) << sync.status();
    EXPECT_THAT(ids(sync->index.index), ::testing::UnorderedElementsAre("before", "during"));
    absl::StatusOr<UserState> read = ReadUserStateAsync(tag);
    ASSERT_TRUE(read.ok()) << read.status();
    EXPECT_THAT(ids(read->index.index), ::testing::UnorderedElementsAre("before", "during"));

    storage::v1::UserSessionIndex next = read->index.index;
    *next.add_entries() = IndexOf({"after"}).entries(0);
    ASSERT_TRUE(WriteIndexAsync(tag, read->index.cas, next).ok());
    for (int node : {1, 2}) {
      storage::v1::UserSessionIndex held;
      ASSERT_TRUE(held.ParseFromString(MemcachedGetValue(node, ikey).value_or("")));
      EXPECT_THAT(ids(held), ::testing::UnorderedElementsAre("before", "during", "after"))
          << "node " << node;
    }
  }
}

// With the first node of the list down, every write still lands: on the copy that answers.
TEST_P(CreateStepsAsyncTest, WritesFallOverToTheCopyThatAnswers) {
  absl::StatusOr<MemcachedUrl> url = ParseMemcachedUrl(RequiredEnv("MEMCACHED_URL"));
  ASSERT_TRUE(url.ok()) << url.status();
  OpenNodes({DeadNode(), url->nodes.front()}, GetParam());
  // Users until both placements were seen: the primary copy on the dead node (the writes fall
  // over) and on the live one.
  bool primary_seen[2] = {false, false};
  for (int i = 0; i < 32 && !(primary_seen[0] && primary_seen[1]); ++i) {
    SCOPED_TRACE(absl::StrCat("user ", i));
    const SessionKey key = Key(absl::StrCat("failover", i));
    const int primary = pool_->NodeForGroupKey(key.user_tag);
    ASSERT_TRUE(primary == 0 || primary == 1) << primary;
    primary_seen[primary] = true;
    absl::StatusOr<UserState> state = ReadUserStateAsync(key.user_tag);
    ASSERT_TRUE(state.ok()) << state.status();
    const absl::Status indexed = WriteIndexAsync(key.user_tag, state->index.cas, IndexOf({"f"}));
    ASSERT_TRUE(indexed.ok()) << indexed;
    const absl::Status added = AddAsync(key, Session("f", 1));
    ASSERT_TRUE(added.ok()) << added;
    absl::StatusOr<SessionLookup> found = store_->Lookup(key, Deadline());
    ASSERT_TRUE(found.ok() && found->record.has_value());
    absl::StatusOr<IndexRecord> index = store_->ReadIndex(key.user_tag, Deadline());
    ASSERT_TRUE(index.ok() && index->index.entries_size() == 1);
  }
  EXPECT_TRUE(primary_seen[0] && primary_seen[1]);
  EXPECT_GE(pool_->node_failures(), 1);
}

TEST_P(CreateStepsAsyncTest, NoNodeAnsweringIsUnavailable) {
  OpenNodes({DeadNode(), DeadNode()}, GetParam());
  const SessionKey key = Key("down");
  const absl::Time start = absl::Now();
  EXPECT_TRUE(absl::IsUnavailable(ReadUserStateAsync(key.user_tag).status()));
  EXPECT_TRUE(absl::IsUnavailable(WriteIndexAsync(key.user_tag, std::nullopt, IndexOf({"d"}))));
  EXPECT_TRUE(absl::IsUnavailable(AddAsync(key, Session("d", 1))));
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
}

TEST_P(CreateStepsAsyncTest, TtlAboveThirtyDaysIsInvalid) {
  Open("MEMCACHED_URL", GetParam());
  const SessionKey key = Key("ttl");
  const absl::Status indexed = Await<absl::Status>([&](SessionStore::StatusCallback done) {
    store_->WriteIndexAsync(key.user_tag, std::nullopt, IndexOf({"t"}),
                            kMaxStoreTtl + absl::Seconds(1), Deadline(), std::move(done));
  });
  EXPECT_TRUE(absl::IsInvalidArgument(indexed)) << indexed;
  const absl::Status added = Await<absl::Status>([&](SessionStore::StatusCallback done) {
    store_->AddAsync(key, Session("t", 1), kMaxStoreTtl + absl::Seconds(1), Deadline(),
                     std::move(done));
  });
  EXPECT_TRUE(absl::IsInvalidArgument(added)) << added;
  const absl::Status read =
      Await<absl::StatusOr<UserState>>([&](SessionStore::UserStateCallback done) {
        store_->ReadUserStateAsync(key.user_tag, kMaxStoreTtl + absl::Seconds(1), Deadline(),
                                   std::move(done));
      }).status();
  EXPECT_TRUE(absl::IsInvalidArgument(read)) << read;
  EXPECT_FALSE(MemcachedHas(1, MemcachedSessionStore::SessionKeyName(key.token_hash)) ||
               MemcachedHas(2, MemcachedSessionStore::SessionKeyName(key.token_hash)));
}

INSTANTIATE_TEST_SUITE_P(WritePaths, CreateStepsAsyncTest, ::testing::Values(true, false),
                         PathName);

// UpdateSession's (and a touch's) asynchronous write on both paths: compare-and-swap on the copy
// the token names, then on the others where they hold what was read, answering what the
// blocking form answers.
class CompareAndSwapAsyncTest : public AsyncStoreTest {
 protected:
  absl::Status CompareAndSwapAsync(const SessionKey& key, const CasToken& cas,
                                   const storage::v1::StoredSession& session,
                                   absl::Duration ttl = absl::Seconds(60)) {
    return Await<absl::Status>([&](SessionStore::StatusCallback done) {
      store_->CompareAndSwapAsync(key, cas, session, ttl, Deadline(), std::move(done));
    });
  }
  // The CAS token a read of `key` hands out (nullopt when it finds no session).
  std::optional<CasToken> ReadToken(const SessionKey& key) {
    absl::StatusOr<SessionLookup> read = LookupAsync(key);
    if (!read.ok() || !read->record.has_value()) return std::nullopt;
    return read->record->cas;
  }
  std::optional<CasToken> AddAndRead(const SessionKey& key,
                                     const storage::v1::StoredSession& session) {
    const absl::Status added = store_->Add(key, session, absl::Seconds(60), Deadline());
    EXPECT_TRUE(added.ok()) << added;
    return ReadToken(key);
  }
};

// The seconds node `node` keeps the session under `key` for.
std::optional<int64_t> TtlOn(int node, const SessionKey& key) {
  return MemcachedTtl(node, MemcachedSessionStore::SessionKeyName(key.token_hash));
}

// Each of `nodes` holds session `id` at `version` under `key`.
void ExpectCopiesHold(const SessionKey& key, const std::string& id, int64_t version,
                      std::initializer_list<int> nodes = {1, 2}) {
  for (int node : nodes) {
    const std::optional<storage::v1::StoredSession> held = SessionOn(node, key);
    ASSERT_TRUE(held.has_value()) << "node " << node;
    EXPECT_EQ(held->session_id(), id) << "node " << node;
    EXPECT_EQ(held->version(), version) << "node " << node;
  }
}

// The token a read hands out replaces the session on every copy, kept as the blocking form keeps
// it: the TTL asked (+2 s for memcached's coarse clock, MemcachedExptime), up to the 30-day limit.
TEST_P(CompareAndSwapAsyncTest, WritesEveryCopyWithTheTtlOfTheBlockingForm) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  const SessionKey key = Key("swap");
  const SessionKey twin = Key("swaptwin");
  std::optional<CasToken> cas = AddAndRead(key, Session("s", 1));
  const std::optional<CasToken> twin_cas = AddAndRead(twin, Session("s", 1));
  ASSERT_TRUE(cas.has_value() && twin_cas.has_value());

  const absl::Status swapped = CompareAndSwapAsync(key, *cas, Session("s", 2), absl::Minutes(10));
  ASSERT_TRUE(swapped.ok()) << swapped;
  ExpectAnsweredOnTheStoreThread();
  ASSERT_TRUE(
      store_->CompareAndSwap(twin, *twin_cas, Session("s", 2), absl::Minutes(10), Deadline()).ok());
  ExpectCopiesHold(key, "s", 2);
  for (int node : {1, 2}) {
    SCOPED_TRACE(absl::StrCat("node ", node));
    const std::optional<int64_t> async_ttl = TtlOn(node, key);
    const std::optional<int64_t> blocking_ttl = TtlOn(node, twin);
    ASSERT_TRUE(async_ttl.has_value() && blocking_ttl.has_value());
    // memcached's clock may step by two seconds between the writes or the reads.
    EXPECT_GE(*async_ttl, 598);
    EXPECT_LE(*async_ttl, 602);
    EXPECT_NEAR(*async_ttl, *blocking_ttl, 2);
  }

  // The longest TTL a store takes is above 30 days, the longest memcached reads as relative:
  // kept that long on every copy (written as a Unix time), not cut to 30 days nor taken for a
  // Unix time in 1970 (gone at once).
  cas = ReadToken(key);
  ASSERT_TRUE(cas.has_value());
  const absl::Status longest = CompareAndSwapAsync(key, *cas, Session("s", 3), kMaxStoreTtl);
  ASSERT_TRUE(longest.ok()) << longest;
  ExpectAnsweredOnTheStoreThread();
  ExpectCopiesHold(key, "s", 3);
  for (int node : {1, 2}) {
    const std::optional<int64_t> ttl = TtlOn(node, key);
    ASSERT_TRUE(ttl.has_value()) << "node " << node;
    EXPECT_GE(*ttl, absl::ToInt64Seconds(kMaxStoreTtl)) << "node " << node;
    EXPECT_LE(*ttl, absl::ToInt64Seconds(kMaxStoreTtl) + 6) << "node " << node;
  }
}

// A writer whose read is outdated loses, and every copy keeps the winner's session.
TEST_P(CompareAndSwapAsyncTest, StaleTokenIsAbortedAndTheWinnerStays) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  const SessionKey key = Key("stale");
  std::optional<CasToken> cas = AddAndRead(key, Session("s", 1));
  ASSERT_TRUE(cas.has_value());
  // Another writer read the same value and got there first.
  ASSERT_TRUE(
      store_->CompareAndSwap(key, *cas, Session("theirs", 2), absl::Seconds(60), Deadline()).ok());
  const absl::Status lost = CompareAndSwapAsync(key, *cas, Session("ours", 2));
  EXPECT_TRUE(absl::IsAborted(lost)) << lost;
  ExpectAnsweredOnTheStoreThread();
  ExpectCopiesHold(key, "theirs", 2);

  // Two asynchronous writers with one token: the first wins, the second loses.
  cas = ReadToken(key);
  ASSERT_TRUE(cas.has_value());
  const absl::Status first = CompareAndSwapAsync(key, *cas, Session("first", 3));
  EXPECT_TRUE(first.ok()) << first;
  const absl::Status second = CompareAndSwapAsync(key, *cas, Session("second", 3));
  EXPECT_TRUE(absl::IsAborted(second)) << second;
  ExpectAnsweredOnTheStoreThread();
  ExpectCopiesHold(key, "first", 3);
}

// As AnAddLeavesWhatAnotherCopyTookSinceAlone, for an update or a touch: a deletion that reached
// the other copy after the read keeps its tombstone there, and the session stays ended even once
// the first copy is lost.
TEST_P(CompareAndSwapAsyncTest, WritesToTheOtherCopiesLeaveWhatTheyTookSinceAlone) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  UntilEachNodeHeldASecondCopy([&](int user, int node, bool& on_second_copy) {
    const SessionKey key = Key(absl::StrCat("lateswap", user, "n", node));
    const std::string skey = MemcachedSessionStore::SessionKeyName(key.token_hash);
    const std::optional<CasToken> cas = AddAndRead(key, Session("s", 1));
    ASSERT_TRUE(cas.has_value());
    ASSERT_TRUE(MemcachedSetRaw(node, skey, TombstoneValue(), 60));  // A deletion, since.
    const absl::Status swapped = CompareAndSwapAsync(key, *cas, Session("s", 2));
    on_second_copy = swapped.ok();
    if (!swapped.ok()) {
      EXPECT_TRUE(absl::IsAborted(swapped)) << swapped;
      return;
    }
    const std::optional<storage::v1::StoredSession> held = SessionOn(node, key);
    ASSERT_TRUE(held.has_value());
    EXPECT_TRUE(held->deleted()) << "the write overwrote the tombstone";
    // The node that took the write restarts empty.
    MemcachedText(MemcachedPort(node == 1 ? 2 : 1), "delete " + skey + "\r\nget " + skey);
    const absl::StatusOr<SessionLookup> after = store_->Peek(key, Deadline());
    ASSERT_TRUE(after.ok()) << after.status();
    EXPECT_TRUE(!after->record.has_value() || after->record->session.deleted())
        << "the deleted session came back";
  });
}

// A write that finds a later state of the session on the other copy than its read saw there (a
// writer before it, whose write to that copy landed late) still lands there when it wins over
// it (a higher version), and bytes that do not parse are replaced. Left as they were, that
// copy stayed a write behind, and lost the acknowledged update if the first copy was lost.
TEST_P(CompareAndSwapAsyncTest, WritesToTheOtherCopiesReplaceAnOlderStateTheyTookSince) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  for (const bool garbage : {false, true}) {
    UntilEachNodeHeldASecondCopy([&](int user, int node, bool& on_second_copy) {
      SCOPED_TRACE(garbage ? "bytes that do not parse" : "an older version");
      const SessionKey key = Key(absl::StrCat("lateolder", garbage, user, "n", node));
      const std::string skey = MemcachedSessionStore::SessionKeyName(key.token_hash);
      const std::optional<CasToken> cas = AddAndRead(key, Session("s", 1));
      ASSERT_TRUE(cas.has_value());
      ASSERT_TRUE(MemcachedSetRaw(
          node, skey, garbage ? std::string("not a session") : Session("s", 2).SerializeAsString(),
          60));
      const absl::Status swapped = CompareAndSwapAsync(key, *cas, Session("s", 3));
      on_second_copy = swapped.ok();
      if (!swapped.ok()) {
        EXPECT_TRUE(absl::IsAborted(swapped)) << swapped;
        return;
      }
      ExpectCopiesHold(key, "s", 3);
    });
  }
}

// ... but a later version than ours there stays.
TEST_P(CompareAndSwapAsyncTest, WritesToTheOtherCopiesLeaveALaterVersionTheyTookSince) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  UntilEachNodeHeldASecondCopy([&](int user, int node, bool& on_second_copy) {
    const SessionKey key = Key(absl::StrCat("latenewer", user, "n", node));
    const std::string skey = MemcachedSessionStore::SessionKeyName(key.token_hash);
    const std::optional<CasToken> cas = AddAndRead(key, Session("s", 1));
    ASSERT_TRUE(cas.has_value());
    ASSERT_TRUE(MemcachedSetRaw(node, skey, Session("s", 5).SerializeAsString(), 60));
    const absl::Status swapped = CompareAndSwapAsync(key, *cas, Session("s", 2));
    on_second_copy = swapped.ok();
    ExpectCopiesHold(key, "s", 5, {node});
  });
}

// A copy whose bytes do not parse (corrupt, or another program's) is rewritten by a read, as a
// copy that lost the session is: an add there was refused, and every later write skipped it.
TEST_P(CompareAndSwapAsyncTest, AReadRepairsACopyThatDoesNotParse) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  for (int node : {1, 2}) {
    SCOPED_TRACE(absl::StrCat("node ", node));
    const SessionKey key = Key(absl::StrCat("unparsable", node));
    const std::string skey = MemcachedSessionStore::SessionKeyName(key.token_hash);
    ASSERT_TRUE(store_->Add(key, Session("s", 1), absl::Seconds(60), Deadline()).ok());
    ASSERT_TRUE(MemcachedSetRaw(node, skey, "not a session", 60));
    const std::optional<CasToken> cas = ReadToken(key);
    ASSERT_TRUE(cas.has_value());
    ExpectCopiesHold(key, "s", 1);
    const absl::Status swapped = CompareAndSwapAsync(key, *cas, Session("s", 2));
    ASSERT_TRUE(swapped.ok()) << swapped;
    ExpectCopiesHold(key, "s", 2);
  }
}

// A copy that a read repaired (its node came back empty) takes the next write too: the token
// carries its new CAS value. Left out, it stayed one write behind, and every read went to the
// blocking path to repair it again.
TEST_P(CompareAndSwapAsyncTest, ACopyARepairWroteTakesTheNextWrite) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  // Sixteen users: the emptied node holds the second copy of some of them (2^-16 that none).
  for (int i = 0; i < 8; ++i) {
    for (int node : {1, 2}) {
      SCOPED_TRACE(absl::StrCat("user ", i, ", node ", node, " emptied"));
      const SessionKey key = Key(absl::StrCat("repairedswap", i, "n", node));
      const std::string skey = MemcachedSessionStore::SessionKeyName(key.token_hash);
      ASSERT_TRUE(store_->Add(key, Session("s", 1), absl::Seconds(60), Deadline()).ok());
      ASSERT_TRUE(MemcachedSetRaw(node, skey, "", -1));  // Expired at once: gone.
      const std::optional<CasToken> cas = ReadToken(key);
      ASSERT_TRUE(cas.has_value());
      ASSERT_TRUE(SessionOn(node, key).has_value()) << "the read did not repair the copy";
      const absl::Status swapped = CompareAndSwapAsync(key, *cas, Session("s", 2));
      ASSERT_TRUE(swapped.ok()) << swapped;
      ExpectCopiesHold(key, "s", 2);
    }
  }
}

// A token that names no copy, or whose key was deleted since the read, writes nothing.
TEST_P(CompareAndSwapAsyncTest, TokenOfNoCopyOrOfAVanishedKeyIsAborted) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  const SessionKey key = Key("vanished");
  const std::optional<CasToken> cas = AddAndRead(key, Session("s", 1));
  ASSERT_TRUE(cas.has_value());
  // Two copies: 0 and 1. An index wrapped around onto a real copy would meet its CAS value.
  for (int copy : {-1, 2, 2 + cas->copy, 7}) {
    SCOPED_TRACE(absl::StrCat("copy ", copy));
    const absl::Status swapped =
        CompareAndSwapAsync(key, CasToken{cas->cas, copy}, Session("s", 2));
    EXPECT_TRUE(absl::IsAborted(swapped)) << swapped;
    ExpectAnsweredOnTheStoreThread(/*or_at_once=*/true);
  }
  ExpectCopiesHold(key, "s", 1);

  ASSERT_TRUE(store_->Remove(key, Deadline()).ok());
  const absl::Status swapped = CompareAndSwapAsync(key, *cas, Session("s", 2));
  EXPECT_TRUE(absl::IsAborted(swapped)) << swapped;
  ExpectAnsweredOnTheStoreThread();
  const std::string skey = MemcachedSessionStore::SessionKeyName(key.token_hash);
  EXPECT_FALSE(MemcachedHas(1, skey) || MemcachedHas(2, skey));
}

// With one node down, a token from the copy that answered still wins there; one naming the copy
// on the dead node gets UNAVAILABLE (no falling over: the other copy's CAS value differs).
TEST_P(CompareAndSwapAsyncTest, CopyOnADeadNodeIsUnavailableAndTheLiveCopyStillSwaps) {
  OpenNodes({DeadNode(), MemcachedNode{"127.0.0.1", static_cast<uint16_t>(MemcachedPort(1))}},
            GetParam());
  // Users until both placements were seen: the first copy down, and the second.
  bool dead_seen[2] = {false, false};
  for (int i = 0; i < 32 && !(dead_seen[0] && dead_seen[1]); ++i) {
    SCOPED_TRACE(absl::StrCat("user ", i));
    const SessionKey key = Key(absl::StrCat("deadnode", i));
    const std::optional<CasToken> cas = AddAndRead(key, Session("d", 1));
    ASSERT_TRUE(cas.has_value());
    const int dead = 1 - cas->copy;  // The read was answered by the live copy.
    dead_seen[dead] = true;

    const int64_t failures = pool_->node_failures();
    const absl::Time start = absl::Now();
    const absl::Status down = CompareAndSwapAsync(key, CasToken{cas->cas, dead}, Session("d", 2));
    EXPECT_TRUE(absl::IsUnavailable(down)) << down;
    EXPECT_LT(absl::Now() - start, absl::Seconds(3));
    EXPECT_GT(pool_->node_failures(), failures);
    ExpectAnsweredOnTheStoreThread();
    ExpectCopiesHold(key, "d", 1, {1});

    const absl::Status swapped = CompareAndSwapAsync(key, *cas, Session("d", 3));
    EXPECT_TRUE(swapped.ok()) << swapped;
    ExpectAnsweredOnTheStoreThread();
    ExpectCopiesHold(key, "d", 3, {1});
  }
  EXPECT_TRUE(dead_seen[0] && dead_seen[1]);
}

// A rotation's end of the old token: a compare-and-swap on the copy read, then a set on every
// other copy, OK only once every copy took it.
TEST_F(CompareAndSwapAsyncTest, AnEndByCompareAndSwapIsWrittenToEveryCopy) {
  Open("MEMCACHED_URL_REPLICATED", /*pipeline=*/false);
  const SessionKey key = Key("endswap");
  const std::optional<CasToken> cas = AddAndRead(key, Session("e", 1));
  ASSERT_TRUE(cas.has_value());
  const absl::Status stale = store_->CompareAndSwapEveryCopy(
      key, CasToken{cas->cas + 1, cas->copy}, Session("e", 2), absl::Seconds(60), Deadline());
  EXPECT_TRUE(absl::IsAborted(stale)) << stale;
  ExpectCopiesHold(key, "e", 1);
  const absl::Status ended =
      store_->CompareAndSwapEveryCopy(key, *cas, Session("e", 3), absl::Seconds(60), Deadline());
  EXPECT_TRUE(ended.ok()) << ended;
  ExpectCopiesHold(key, "e", 3);
}

// With the other copy on a dead node, the end holds on the copy read and says it is partial, so
// that the rotation gives out no new token.
TEST_F(CompareAndSwapAsyncTest, AnEndByCompareAndSwapThatMissedACopyIsAPartialWrite) {
  OpenNodes({DeadNode(), MemcachedNode{"127.0.0.1", static_cast<uint16_t>(MemcachedPort(1))}},
            /*pipeline=*/false);
  const SessionKey key = Key("endswapdead");
  const std::optional<CasToken> cas = AddAndRead(key, Session("p", 1));
  ASSERT_TRUE(cas.has_value());
  const absl::Status ended =
      store_->CompareAndSwapEveryCopy(key, *cas, Session("p", 2), absl::Seconds(60), Deadline());
  EXPECT_TRUE(absl::IsUnavailable(ended)) << ended;
  EXPECT_TRUE(ended.GetPayload(kPartialWritePayload).has_value()) << ended;
  ExpectCopiesHold(key, "p", 2, {1});
}

// The answer waits for the writes to the other copies (or their timeout), so that the caller's
// next write cannot overtake them on a copy: with the second copy on a node that stopped
// answering after the read, a swap on the live copy still succeeds, but only once that write
// has timed out.
TEST_P(CompareAndSwapAsyncTest, AnswerWaitsForTheOtherCopiesWrites) {
  SilentPeer silent;
  ASSERT_NE(silent.port(), 0);
  constexpr absl::Duration kIoTimeout = absl::Milliseconds(300);
  OpenNodes(
      {MemcachedNode{"127.0.0.1", static_cast<uint16_t>(MemcachedPort(1))}, SilentNode(silent)},
      GetParam(), kIoTimeout);
  const SessionKey key = Key("slowcopy");
  // Stored on the live copy (the silent one times out), and read from it.
  std::optional<CasToken> cas = AddAndRead(key, Session("s", 1));
  ASSERT_TRUE(cas.has_value());
  // As if the silent copy had answered the read, holding nothing: it is written (an add). A
  // copy that did not answer is not written at all, and would not make the answer wait.
  ASSERT_EQ(cas->copies.size(), 2u);
  cas->copies[static_cast<size_t>(1 - cas->copy)] = CopyCas{true, 0};
  // The timeouts above marked the silent node failed; past that, requests go to it again
  // (libmemcached counts the retry time in whole seconds of the wall clock, hence + 1 s).
  absl::SleepFor(MemcachedPoolOptions().retry_after_failure + absl::Milliseconds(1100));

  const absl::Time start = absl::Now();
  const absl::Status swapped = CompareAndSwapAsync(key, *cas, Session("s", 2));
  const absl::Duration took = absl::Now() - start;
  EXPECT_TRUE(swapped.ok()) << swapped;  // The other copies are best effort.
  EXPECT_GE(took, kIoTimeout - absl::Milliseconds(50));
  ExpectCopiesHold(key, "s", 2, {1});
}

// Refused at once, before any I/O, and nothing is written: the token still wins afterwards.
TEST_P(CompareAndSwapAsyncTest, TtlAboveThirtyDaysIsInvalidAndWritesNothing) {
  Open("MEMCACHED_URL_REPLICATED", GetParam());
  const SessionKey key = Key("ttl");
  const std::optional<CasToken> cas = AddAndRead(key, Session("s", 1));
  ASSERT_TRUE(cas.has_value());
  const absl::Status refused =
      CompareAndSwapAsync(key, *cas, Session("s", 2), kMaxStoreTtl + absl::Seconds(1));
  EXPECT_TRUE(absl::IsInvalidArgument(refused)) << refused;
  EXPECT_TRUE(answered_at_once_);
  ExpectCopiesHold(key, "s", 1);
  const absl::Status swapped = CompareAndSwapAsync(key, *cas, Session("s", 2));
  EXPECT_TRUE(swapped.ok()) << swapped;
}

INSTANTIATE_TEST_SUITE_P(WritePaths, CompareAndSwapAsyncTest, ::testing::Values(true, false),
                         PathName);

// What one handle learns of a stalled node, every handle of the pool knows, for the retry time.
// A pool of `size` libmemcached handles (no pipeline) over the nodes of `url_variable`.
absl::StatusOr<std::unique_ptr<MemcachedPool>> HandlePool(
    const char* url_variable, int size,
    absl::Duration retry_after_failure = MemcachedPoolOptions().retry_after_failure) {
  absl::StatusOr<MemcachedUrl> url = ParseMemcachedUrl(RequiredEnv(url_variable));
  if (!url.ok()) return url.status();
  MemcachedPoolOptions options;
  options.url = *url;
  options.size = size;
  options.pipeline = false;
  options.retry_after_failure = retry_after_failure;
  return MemcachedPool::Create(options);
}

TEST(MemcachedPoolTest, RemembersAStalledNodeForItsRetryTime) {
  absl::StatusOr<std::unique_ptr<MemcachedPool>> pool =
      HandlePool("MEMCACHED_URL_REPLICATED", 2, absl::Milliseconds(300));
  ASSERT_TRUE(pool.ok()) << pool.status();
  ASSERT_EQ((*pool)->node_count(), 2);
  EXPECT_FALSE((*pool)->NodeStalled(0, SteadyNow()));
  EXPECT_FALSE((*pool)->NodeStalled(1, SteadyNow()));
  // Asked about the moment it was marked and the moment its retry time ends, so that a slow
  // machine cannot move either answer. The window is kept on the steady clock, so no wall-clock
  // step can lengthen it.
  SteadyTime marked;
  {
    absl::StatusOr<MemcachedPool::Lease> lease = (*pool)->Acquire(absl::Now() + absl::Seconds(1));
    ASSERT_TRUE(lease.ok()) << lease.status();
    marked = SteadyNow();
    lease->MarkNodeStalled(1);
  }
  absl::StatusOr<MemcachedPool::Lease> other = (*pool)->Acquire(absl::Now() + absl::Seconds(1));
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_TRUE(other->NodeStalled(1, marked));
  EXPECT_FALSE(other->NodeStalled(0, marked));
  EXPECT_TRUE(other->NodeStalled(1, marked - std::chrono::milliseconds(50)))
      << "a moment read just before another handle marked the node";
  (*pool)->MarkNodeStalled(-1);  // Ignored, as is any index past the last node.
  (*pool)->MarkNodeStalled(2);
  EXPECT_FALSE((*pool)->NodeStalled(-1, marked));
  EXPECT_FALSE((*pool)->NodeStalled(0, SteadyNow())) << "an index out of range marked node 0";
  EXPECT_FALSE((*pool)->NodeStalled(1, SteadyNow() + std::chrono::milliseconds(300)))
      << "still stalled after its retry time";
}

// A caller waits for a pooled handle until its deadline, wherever in a second of the wall clock
// it starts. libmemcachedutil's own wait ended at time(NULL) + the budget's whole seconds (plus
// its nanoseconds): a 300 ms wait begun in the last 700 ms of a second gave up at once.
TEST(MemcachedPoolTest, WaitsForAFreeHandleUntilItsDeadline) {
  absl::StatusOr<std::unique_ptr<MemcachedPool>> pool = HandlePool("MEMCACHED_URL", 1);
  ASSERT_TRUE(pool.ok()) << pool.status();
  // Starts each wait 850 ms into a second of the wall clock.
  const auto late_in_a_second = [] {
    const int64_t into = absl::ToUnixMillis(absl::Now()) % 1000;
    absl::SleepFor(absl::Milliseconds((1850 - into) % 1000));
  };

  std::optional<MemcachedPool::Lease> held;
  {
    absl::StatusOr<MemcachedPool::Lease> lease = (*pool)->Acquire(absl::Now() + absl::Seconds(5));
    ASSERT_TRUE(lease.ok()) << lease.status();
    held.emplace(*std::move(lease));
  }
  late_in_a_second();
  absl::Time began = absl::Now();
  absl::StatusOr<MemcachedPool::Lease> none = (*pool)->Acquire(began + absl::Milliseconds(300));
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnavailable) << none.status();
  EXPECT_GE(absl::Now() - began, absl::Milliseconds(290)) << "gave up before its deadline";

  late_in_a_second();
  began = absl::Now();
  std::thread release([&] {
    absl::SleepFor(absl::Milliseconds(100));
    held.reset();
  });
  absl::StatusOr<MemcachedPool::Lease> next = (*pool)->Acquire(began + absl::Milliseconds(300));
  release.join();
  EXPECT_TRUE(next.ok()) << "the handle came back 100 ms into a 300 ms wait: " << next.status();
}

// The health probe hands libmemcached the addresses its lookup found, never a name (whose
// getaddrinfo no timeout covers): names are asked of the lookup, all at once and with the
// probe's bound; numeric hosts are not; a node counts when any of its addresses answers.
TEST(MemcachedProbeTest, NamesAreProbedAtTheAddressesTheirLookupGives) {
  absl::StatusOr<MemcachedUrl> url = ParseMemcachedUrl(RequiredEnv("MEMCACHED_URL"));
  ASSERT_TRUE(url.ok()) << url.status();
  const uint16_t port = url->nodes[0].port;
  MemcachedUrl named;
  // memcached listens on 127.0.0.1 only: ::1 refuses, and the next address answers.
  named.nodes = {
      {"first.test", port}, {"second.test", port}, {"gone.test", port}, {"127.0.0.1", port}};
  std::vector<std::string> asked;
  SteadyTime asked_until;
  const MemcachedProbeLookup lookup = [&](const std::vector<std::string>& hosts,
                                          SteadyTime give_up) {
    asked = hosts;
    asked_until = give_up;
    std::vector<absl::StatusOr<std::vector<std::string>>> found;
    for (const std::string& host : hosts) {
      if (host == "first.test") found.push_back(std::vector<std::string>{"127.0.0.1"});
      if (host == "second.test") found.push_back(std::vector<std::string>{"::1", "127.0.0.1"});
      if (host == "gone.test") found.push_back(absl::NotFoundError("no such name"));
    }
    return found;
  };
  const SteadyTime probing = SteadyNow();
  const MemcachedReachability r = ProbeMemcachedNodes(named, absl::Milliseconds(500), lookup);
  const SteadyTime probed = SteadyNow();
  EXPECT_EQ(r.total, 4);
  EXPECT_EQ(r.reachable, 3);
  EXPECT_EQ(asked, (std::vector<std::string>{"first.test", "second.test", "gone.test"}));
  // The lookups got the probe's timeout from when it began, no more.
  EXPECT_GT(asked_until, probing);
  EXPECT_LE(asked_until, probed + std::chrono::milliseconds(500));
}

TEST_F(SessionStoreTest, ThirtyDayTtlIsRelativeAndLongerIsRejected) {
  Open("MEMCACHED_URL");
  storage::v1::StoredSession s;
  s.set_session_id("thirty-days");
  s.set_version(1);
  const SessionKey key = Key("ttl");
  // Memcached reads an expiration above 30 days as a Unix time (long past), which would drop
  // the item at once: the store must refuse rather than store something that vanishes.
  EXPECT_TRUE(
      absl::IsInvalidArgument(store_->Add(key, s, kMaxStoreTtl + absl::Seconds(1), Deadline())));
  ASSERT_TRUE(store_->Add(key, s, kMaxStoreTtl, Deadline()).ok());
  absl::StatusOr<SessionLookup> got = store_->Lookup(key, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(got->record.has_value());
  EXPECT_EQ(got->record->session.session_id(), "thirty-days");
  EXPECT_TRUE(absl::IsAlreadyExists(store_->Add(key, s, absl::Seconds(5), Deadline())));
  ASSERT_TRUE(store_->Remove(key, Deadline()).ok());
}

// A value too large for memcached is the caller's to fix, not a failure of the node: nothing is
// counted against the nodes (enough of it would have them skipped as stalled), and the add is
// not sent on to the other copy, which would refuse it too.
TEST_F(SessionStoreTest, AnItemTooLargeIsTheCallersNotTheNodes) {
  absl::StatusOr<MemcachedUrl> url = ParseMemcachedUrl(RequiredEnv("MEMCACHED_URL"));
  ASSERT_TRUE(url.ok()) << url.status();
  // The other copy's node is dead: an add sent on to it would count a failure there.
  OpenNodes({url->nodes.front(), DeadNode()}, /*pipeline=*/false);
  SessionKey key = Key("toolarge");
  for (int i = 0; pool_->NodeForGroupKey(key.user_tag) != 0; ++i) {
    ASSERT_LT(i, 64) << "no user whose first copy is on the live node";
    key = Key(absl::StrCat("toolarge", i));
  }
  storage::v1::StoredSession big = Session("big", 1);
  (*big.mutable_attributes())["blob"] = std::string(size_t{2} << 20, 'x');  // memcached: 1 MiB
  const int64_t failures = pool_->node_failures();
  const absl::Status added = store_->Add(key, big, absl::Seconds(60), Deadline());
  EXPECT_EQ(added.code(), absl::StatusCode::kInvalidArgument) << added;
  EXPECT_EQ(CallerMessage(added).value_or(""), kSessionTooLargeForAnItem) << added;
  EXPECT_EQ(pool_->node_failures(), failures);
}

// A removal must reach every copy: one that kept the session would list it, and count it against
// the user's limit, until it expired.
TEST_F(SessionStoreTest, ARemovalThatMissedACopyIsAPartialWrite) {
  OpenNodes({DeadNode(), MemcachedNode{"127.0.0.1", static_cast<uint16_t>(MemcachedPort(1))}},
            /*pipeline=*/false);
  const SessionKey key = Key("removal");
  ASSERT_TRUE(store_->Add(key, Session("r", 1), absl::Seconds(30), Deadline()).ok());
  const absl::Status removed = store_->Remove(key, Deadline());
  EXPECT_TRUE(absl::IsUnavailable(removed)) << removed;
  EXPECT_THAT(std::string(removed.message()),
              ::testing::HasSubstr("1 of 2 copies took the delete"));
  EXPECT_TRUE(removed.GetPayload(kPartialWritePayload).has_value());
  EXPECT_FALSE(MemcachedGetValue(1, MemcachedSessionStore::SessionKeyName(key.token_hash)))
      << "the copy that answered deleted it";

  OpenNodes({DeadNode(), DeadNode()}, /*pipeline=*/false);
  const absl::Status none = store_->Remove(key, Deadline());
  EXPECT_TRUE(absl::IsUnavailable(none)) << none;
  EXPECT_FALSE(none.GetPayload(kPartialWritePayload).has_value());

  Open("MEMCACHED_URL_REPLICATED", /*pipeline=*/false);
  EXPECT_TRUE(store_->Remove(key, Deadline()).ok()) << "gone from every copy already";
}

// A call's deadline is read against the wall clock once, when the call starts; its round trips
// (one per copy here) are then timed on the steady clock. Reading the wall clock again before
// each would take the step for the deadline passing, and fail a call that had its whole time.
TEST_F(SessionStoreTest, AWallClockStepDuringACallDoesNotEndIt) {
  StepPerReadClock clock(absl::Hours(1));
  Open("MEMCACHED_URL_REPLICATED", /*pipeline=*/false, &clock);
  const SessionKey key = Key("clockstep");
  const absl::Status added =
      store_->Add(key, Session("stepped", 1), absl::Seconds(30), absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(added.ok()) << added;
  EXPECT_EQ(clock.reads(), 1) << "the wall clock is read once per call";
  clock.Reset();
  absl::StatusOr<SessionLookup> got = store_->Lookup(key, absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(got->record.has_value());
  EXPECT_EQ(got->record->session.session_id(), "stepped");
  EXPECT_EQ(clock.reads(), 1) << "the wall clock is read once per call";
}

TEST_F(SessionStoreTest, CompareAndSwapDetectsAConcurrentWrite) {
  Open("MEMCACHED_URL_REPLICATED");
  storage::v1::StoredSession s;
  s.set_version(1);
  const SessionKey key = Key("cas");
  ASSERT_TRUE(store_->Add(key, s, absl::Seconds(30), Deadline()).ok());
  absl::StatusOr<SessionLookup> first = store_->Lookup(key, Deadline());
  absl::StatusOr<SessionLookup> second = store_->Lookup(key, Deadline());
  ASSERT_TRUE(first.ok() && second.ok() && first->record && second->record);
  s.set_version(2);
  ASSERT_TRUE(
      store_->CompareAndSwap(key, first->record->cas, s, absl::Seconds(30), Deadline()).ok());
  s.set_version(3);
  EXPECT_TRUE(absl::IsAborted(
      store_->CompareAndSwap(key, second->record->cas, s, absl::Seconds(30), Deadline())));
  absl::StatusOr<SessionLookup> after = store_->Lookup(key, Deadline());
  ASSERT_TRUE(after.ok() && after->record);
  EXPECT_EQ(after->record->session.version(), 2);
  // Both copies took the winning write.
  const std::string name = MemcachedSessionStore::SessionKeyName(key.token_hash);
  for (int node : {1, 2}) {
    std::optional<std::string> raw = MemcachedGetValue(node, name);
    ASSERT_TRUE(raw.has_value()) << "node " << node;
    storage::v1::StoredSession copy;
    ASSERT_TRUE(copy.ParseFromString(*raw));
    EXPECT_EQ(copy.version(), 2) << "node " << node;
  }
}

TEST_F(SessionStoreTest, GenerationOnlyGrows) {
  Open("MEMCACHED_URL_REPLICATED");
  const std::string tag = Key("gen").user_tag;
  EXPECT_EQ(*store_->ReadGeneration(tag, absl::Seconds(60), Deadline()), 0u);
  EXPECT_EQ(store_->AdvanceGeneration(tag, 0, absl::Seconds(60), Deadline())->raised_to, 1u);
  EXPECT_EQ(store_->AdvanceGeneration(tag, 0, absl::Seconds(60), Deadline())->raised_to, 2u);
  // A copy that fell behind (here: forced to 0 on node 1) is raised again, never lowered.
  ASSERT_TRUE(MemcachedSetRaw(1, MemcachedSessionStore::GenerationKeyName(tag), "0", 60));
  EXPECT_EQ(*store_->ReadGeneration(tag, absl::Seconds(60), Deadline()), 2u);
  EXPECT_EQ(MemcachedGetValue(1, MemcachedSessionStore::GenerationKeyName(tag)), "2");
  EXPECT_EQ(store_->AdvanceGeneration(tag, 0, absl::Seconds(60), Deadline())->raised_to, 3u);
  // A floor above the stored value is taken as it is (SessionService passes the time), one
  // below it is not: each advance still goes one past what it found.
  absl::StatusOr<GenerationAdvance> to_floor =
      store_->AdvanceGeneration(tag, 1000, absl::Seconds(60), Deadline());
  ASSERT_TRUE(to_floor.ok()) << to_floor.status();
  EXPECT_EQ(to_floor->found, 3u);
  EXPECT_EQ(to_floor->raised_to, 1000u);
  absl::StatusOr<GenerationAdvance> past_floor =
      store_->AdvanceGeneration(tag, 5, absl::Seconds(60), Deadline());
  ASSERT_TRUE(past_floor.ok()) << past_floor.status();
  EXPECT_EQ(past_floor->found, 1000u);
  EXPECT_EQ(past_floor->raised_to, 1001u);
  for (int node : {1, 2}) {
    EXPECT_EQ(MemcachedGetValue(node, MemcachedSessionStore::GenerationKeyName(tag)), "1001")
        << "node " << node;
  }
}

// memcached's command counters, summed over both nodes (text-protocol "stats").
std::map<std::string, int64_t> CommandCounts() {
  std::map<std::string, int64_t> counts;
  for (int node : {1, 2}) {
    for (absl::string_view line :
         absl::StrSplit(MemcachedText(MemcachedPort(node), "stats"), "\r\n")) {
      std::vector<std::string> parts = absl::StrSplit(line, ' ');
      int64_t value = 0;
      if (parts.size() == 3 && parts[0] == "STAT" && absl::StartsWith(parts[1], "cmd_") &&
          absl::SimpleAtoi(parts[2], &value)) {
        counts[parts[1]] += value;
      }
    }
  }
  return counts;
}

int64_t Delta(const std::map<std::string, int64_t>& before,
              const std::map<std::string, int64_t>& after, const std::string& name) {
  auto b = before.find(name);
  auto a = after.find(name);
  return (a == after.end() ? 0 : a->second) - (b == before.end() ? 0 : b->second);
}

// CreateSession's first step: the generation and the index, each read once, and for a user
// who was never revoked no write at all (generation 0 is the absence of the key). Memcached
// counts a get per key, so its counters cannot tell one multi-get from two gets; the
// pipeline's can, for the asynchronous form.
TEST_F(SessionStoreTest, UserStateReadsBothKeysAndKeepsOnlyARealGenerationAlive) {
  Open("MEMCACHED_URL");
  const std::string tag = Key("state").user_tag;
  std::map<std::string, int64_t> before = CommandCounts();
  absl::StatusOr<UserState> fresh = store_->ReadUserState(tag, absl::Seconds(60), Deadline());
  std::map<std::string, int64_t> after = CommandCounts();
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->generation, 0u);
  EXPECT_FALSE(fresh->index.cas.has_value());
  EXPECT_EQ(Delta(before, after, "cmd_get"), 2);  // Two keys, one get each.
  EXPECT_EQ(Delta(before, after, "cmd_set"), 0);
  EXPECT_EQ(Delta(before, after, "cmd_touch"), 0);
  EXPECT_FALSE(MemcachedHas(1, MemcachedSessionStore::GenerationKeyName(tag)) ||
               MemcachedHas(2, MemcachedSessionStore::GenerationKeyName(tag)));

  // The asynchronous form sends both keys in one request to the one copy.
  MemcachedPipeline* pipeline = pool_->pipeline();
  ASSERT_NE(pipeline, nullptr);
  const int64_t requests_before = pipeline->batched_requests();
  before = CommandCounts();
  Notification answered;
  absl::StatusOr<UserState> async_fresh = absl::InternalError("never answered");
  std::shared_ptr<std::atomic<int>> answers = NewAnswerCount();
  store_->ReadUserStateAsync(Key("state-async").user_tag, absl::Seconds(60), Deadline(),
                             [&, answers](absl::StatusOr<UserState> got) {
                               if (answers->fetch_add(1) > 0) return;
                               async_fresh = std::move(got);
                               answered.Notify();
                             });
  answered.WaitForNotification();
  after = CommandCounts();
  ASSERT_TRUE(async_fresh.ok()) << async_fresh.status();
  EXPECT_EQ(async_fresh->generation, 0u);
  EXPECT_EQ(pipeline->batched_requests() - requests_before, 1);
  EXPECT_EQ(Delta(before, after, "cmd_get"), 2);
  EXPECT_EQ(Delta(before, after, "cmd_set"), 0);

  // The CAS token it returns creates the index; the next read sees it and the generation.
  storage::v1::UserSessionIndex index;
  index.add_entries()->set_session_id("s1");
  ASSERT_TRUE(store_->WriteIndex(tag, fresh->index.cas, index, absl::Seconds(60), Deadline()).ok());
  ASSERT_EQ(store_->AdvanceGeneration(tag, 0, absl::Seconds(60), Deadline())->raised_to, 1u);
  before = CommandCounts();
  absl::StatusOr<UserState> revoked = store_->ReadUserState(tag, absl::Seconds(60), Deadline());
  after = CommandCounts();
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_EQ(revoked->generation, 1u);
  ASSERT_TRUE(revoked->index.cas.has_value());
  ASSERT_EQ(revoked->index.index.entries_size(), 1);
  EXPECT_EQ(revoked->index.index.entries(0).session_id(), "s1");
  EXPECT_EQ(Delta(before, after, "cmd_get"), 2);
  EXPECT_EQ(Delta(before, after, "cmd_set"), 0);
  EXPECT_EQ(Delta(before, after, "cmd_touch"), 1);  // Outlives the sessions created now.
  // A stale CAS token loses against the index written meanwhile.
  EXPECT_TRUE(absl::IsAborted(
      store_->WriteIndex(tag, fresh->index.cas, index, absl::Seconds(60), Deadline())));
}

}  // namespace
}  // namespace sessionledger::testing
