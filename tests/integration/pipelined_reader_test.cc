// PipelinedReader against the real memcached nodes of scripts/backing-services (values, CAS,
// concurrency, restarts) and against a scripted TCP server in this file for what a real
// memcached will not do on demand: refuse, stall, answer garbage, hang up.
#include "server/memcached/pipelined_reader.h"

#include <arpa/inet.h>
#include <libmemcached/memcached.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/common/notification.h"
#include "server/config/config.h"
#include "tests/support/test_env.h"

namespace sessionledger::testing {
namespace {

using std::string_literals::operator""s;

// CI runs this under ASan on two cores: time bounds get this much slack above what they check.
constexpr absl::Duration kMargin = absl::Milliseconds(1500);

// A run-unique key prefix: memcached keeps what earlier runs wrote.
std::string Prefix(absl::string_view what) {
  return absl::StrCat("plr:", getpid(), ":", absl::ToUnixMicros(absl::Now()), ":", what, ":");
}

absl::Time Deadline(absl::Duration d = absl::Seconds(10)) { return absl::Now() + d; }

// ---------------------------------------------------------------------------------------------
// The real nodes, written and read through libmemcached for reference.

using MemcachedPtr = std::unique_ptr<memcached_st, decltype(&memcached_free)>;

std::vector<MemcachedNode> RealNodes() {
  absl::StatusOr<MemcachedUrl> url = ParseMemcachedUrl(RequiredEnv("MEMCACHED_URL"));
  EXPECT_TRUE(url.ok()) << url.status();
  return url.ok() ? url->nodes : std::vector<MemcachedNode>{};
}

// A libmemcached handle on `node` alone (so every key lands there), with CAS.
MemcachedPtr Libmemcached(const MemcachedNode& node) {
  MemcachedPtr mc(memcached_create(nullptr), &memcached_free);
  EXPECT_EQ(memcached_server_add(mc.get(), node.host.c_str(), node.port), MEMCACHED_SUCCESS);
  EXPECT_EQ(memcached_behavior_set(mc.get(), MEMCACHED_BEHAVIOR_SUPPORT_CAS, 1), MEMCACHED_SUCCESS);
  return mc;
}

bool Set(memcached_st* mc, const std::string& key, const std::string& value) {
  const memcached_return_t rc =
      memcached_set(mc, key.data(), key.size(), value.data(), value.size(), 600, 0);
  EXPECT_EQ(rc, MEMCACHED_SUCCESS) << memcached_strerror(mc, rc);
  return rc == MEMCACHED_SUCCESS;
}

// What libmemcached's mget reports for `keys`: values and CAS uniques of the hits.
MemcachedHits Mget(memcached_st* mc, const std::vector<std::string>& keys) {
  std::vector<const char*> ptrs;
  std::vector<size_t> lens;
  for (const std::string& k : keys) {
    ptrs.push_back(k.data());
    lens.push_back(k.size());
  }
  MemcachedHits hits;
  memcached_return_t rc = memcached_mget(mc, ptrs.data(), lens.data(), keys.size());
  EXPECT_EQ(rc, MEMCACHED_SUCCESS) << memcached_strerror(mc, rc);
  // On the stack, as memcached_session_store.cc does: with libmemcached 1.1.4 a result from
  // memcached_result_create(mc, nullptr) is freed twice by memcached_result_free after a fetch.
  memcached_result_st storage;
  memcached_result_st* result = memcached_result_create(mc, &storage);
  if (result == nullptr) {
    ADD_FAILURE() << "memcached_result_create failed";
    return hits;
  }
  while (memcached_fetch_result(mc, result, &rc) != nullptr) {
    MemcachedItem& item =
        hits[std::string(memcached_result_key_value(result), memcached_result_key_length(result))];
    item.value.assign(memcached_result_value(result), memcached_result_length(result));
    item.cas = memcached_result_cas(result);
  }
  memcached_result_free(result);
  EXPECT_TRUE(rc == MEMCACHED_END || rc == MEMCACHED_NOTFOUND) << memcached_strerror(mc, rc);
  return hits;
}

std::unique_ptr<PipelinedReader> StartReader(
    std::vector<MemcachedNode> nodes, absl::Duration io_timeout = absl::Seconds(5),
    absl::Duration retry_after_failure = absl::Seconds(1)) {
  PipelinedReaderOptions options;
  options.nodes = std::move(nodes);
  options.io_timeout = io_timeout;
  options.retry_after_failure = retry_after_failure;
  absl::StatusOr<std::unique_ptr<PipelinedReader>> reader = PipelinedReader::Start(options);
  EXPECT_TRUE(reader.ok()) << reader.status();
  return reader.ok() ? std::move(*reader) : nullptr;
}

// Hits compared field by field; values are compared without printing them (some are 500 KB).
::testing::AssertionResult SameHits(const MemcachedHits& got, const MemcachedHits& want) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << got.size() << " hits, want " << want.size();
  }
  for (const auto& [key, item] : want) {
    auto it = got.find(key);
    if (it == got.end()) return ::testing::AssertionFailure() << "no hit for " << key;
    if (it->second.value != item.value) {
      return ::testing::AssertionFailure()
             << key << ": value of " << it->second.value.size() << " bytes differs (want "
             << item.value.size() << " bytes)";
    }
    if (it->second.cas != item.cas) {
      return ::testing::AssertionFailure()
             << key << ": cas " << it->second.cas << ", want " << item.cas;
    }
  }
  return ::testing::AssertionSuccess();
}

class PipelinedReaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    nodes_ = RealNodes();
    ASSERT_EQ(nodes_.size(), 2u);
    for (const MemcachedNode& n : nodes_) mc_.push_back(Libmemcached(n));
    reader_ = StartReader(nodes_);
    ASSERT_NE(reader_, nullptr);
  }

  std::vector<MemcachedNode> nodes_;
  std::vector<MemcachedPtr> mc_;
  std::unique_ptr<PipelinedReader> reader_;
};

TEST_F(PipelinedReaderTest, HitsMissesAndCasAreWhatLibmemcachedReports) {
  const std::string p = Prefix("basic");
  const std::vector<std::string> keys = {p + "a", p + "b", p + "missing", p + "c"};
  ASSERT_TRUE(Set(mc_[0].get(), p + "a", "alpha"));
  ASSERT_TRUE(Set(mc_[0].get(), p + "b", ""));  // An empty value is a hit, not a miss.
  ASSERT_TRUE(Set(mc_[0].get(), p + "c", "gamma"));
  ASSERT_TRUE(Set(mc_[1].get(), p + "c", "gamma on the other node"));

  for (int node : {0, 1}) {
    SCOPED_TRACE(absl::StrCat("node ", node));
    const MemcachedHits want = Mget(mc_[node].get(), keys);
    ASSERT_EQ(want.size(), node == 0 ? 3u : 1u);
    absl::StatusOr<MemcachedHits> got = reader_->Get(node, keys, Deadline());
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(SameHits(*got, want));
    EXPECT_EQ(got->count(p + "missing"), 0u);
  }

  // A rewrite changes the CAS unique; the reader reports the new one, not a remembered one.
  const uint64_t old_cas = Mget(mc_[0].get(), {p + "a"})[p + "a"].cas;
  ASSERT_TRUE(Set(mc_[0].get(), p + "a", "alpha 2"));
  const MemcachedHits want = Mget(mc_[0].get(), {p + "a"});
  ASSERT_NE(want.at(p + "a").cas, old_cas);
  absl::StatusOr<MemcachedHits> got = reader_->Get(0, {p + "a"}, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(SameHits(*got, want));
}

TEST_F(PipelinedReaderTest, BinaryValuesRoundTripExactly) {
  const std::string p = Prefix("binary");
  std::string every_byte;
  for (int b = 0; b < 256; ++b) every_byte.push_back(static_cast<char>(b));
  const std::map<std::string, std::string> values = {
      {p + "crlf", "\r\n"s},
      {p + "end", "END\r\n"s},
      {p + "fake-answer", "x\r\nEND\r\nVALUE other 0 1 9\r\ny\r\nEND\r\n"s},
      {p + "nul", "\0\0a\0\r\n\0"s},
      {p + "every-byte", every_byte + every_byte},
      {p + "trailing-cr", "abc\r"s},
  };
  std::vector<std::string> keys;
  for (const auto& [k, v] : values) {
    ASSERT_TRUE(Set(mc_[1].get(), k, v));
    keys.push_back(k);
  }
  absl::StatusOr<MemcachedHits> got = reader_->Get(1, keys, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), values.size());
  for (const auto& [k, v] : values) {
    ASSERT_EQ(got->count(k), 1u) << k;
    EXPECT_EQ(got->at(k).value, v) << k;
  }
  EXPECT_TRUE(SameHits(*got, Mget(mc_[1].get(), keys)));
}

TEST_F(PipelinedReaderTest, LargeValueRoundTripsAlsoAmongConcurrentReads) {
  const std::string p = Prefix("large");
  std::mt19937 random(20240601);
  std::string large(500 * 1024, '\0');
  for (char& c : large) c = static_cast<char>(random());
  // Make sure the value holds what would end an answer if it were parsed as text.
  large.replace(1000, 7, "\r\nEND\r\n");
  ASSERT_TRUE(Set(mc_[0].get(), p + "large", large));
  ASSERT_TRUE(Set(mc_[0].get(), p + "small", "small"));
  const MemcachedHits want = Mget(mc_[0].get(), {p + "large", p + "small"});
  ASSERT_EQ(want.size(), 2u);

  absl::StatusOr<MemcachedHits> got = reader_->Get(0, {p + "large", p + "small"}, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(SameHits(*got, want));

  // Several large answers pipelined on one connection, interleaved with small ones: each must
  // be cut at its own length.
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 10; ++i) {
        const bool big = (t + i) % 2 == 0;
        const std::vector<std::string> keys = {big ? p + "large" : p + "small"};
        absl::StatusOr<MemcachedHits> r = reader_->Get(0, keys, Deadline(absl::Seconds(20)));
        if (!r.ok() || r->size() != 1 || !SameHits(*r, {{keys[0], want.at(keys[0])}})) {
          mismatches.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST_F(PipelinedReaderTest, ManyThreadsGetExactlyTheKeysTheyAskedFor) {
  constexpr int kThreads = 32;
  constexpr int kReadsPerThread = 500;
  constexpr int kOwnKeys = 8;
  constexpr int kSharedKeys = 5;
  const std::string p = Prefix("threads");
  auto own = [&](int t, int i) { return absl::StrCat(p, "t", t, ":", i); };
  auto shared = [&](int i) { return absl::StrCat(p, "shared:", i); };
  // Values name their node and key, so a hit from the wrong node or for the wrong key shows.
  auto value = [](int node, const std::string& key) { return absl::StrCat(node, "=", key); };

  std::vector<MemcachedHits> expected(2);  // Per node: every seeded key with its CAS.
  for (int node : {0, 1}) {
    std::vector<std::string> seeded;
    for (int t = 0; t < kThreads; ++t) {
      for (int i = 0; i < kOwnKeys; ++i) seeded.push_back(own(t, i));
    }
    for (int i = 0; i < kSharedKeys; ++i) seeded.push_back(shared(i));
    for (const std::string& k : seeded) ASSERT_TRUE(Set(mc_[node].get(), k, value(node, k)));
    expected[node] = Mget(mc_[node].get(), seeded);
    ASSERT_EQ(expected[node].size(), seeded.size());
  }

  const int64_t batched_before = reader_->batched_reads();
  const int64_t batches_before = reader_->batches();
  std::mutex mu;
  int failures = 0;
  std::string first_failure;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kReadsPerThread; ++i) {
        const int node = (t + i) % 2;
        const std::string mine = own(t, i % kOwnKeys);
        const std::string common = shared((t * 7 + i) % kSharedKeys);
        const std::string missing = absl::StrCat(p, "missing:", t, ":", i);
        // The order varies, so answers cannot be matched by position in the request.
        std::vector<std::string> keys = {mine, missing, common};
        std::rotate(keys.begin(), keys.begin() + i % 3, keys.end());
        absl::StatusOr<MemcachedHits> got = reader_->Get(node, keys, Deadline(absl::Seconds(30)));
        std::string problem;
        if (!got.ok()) {
          problem = got.status().ToString();
        } else {
          const MemcachedHits want = {{mine, expected[node].at(mine)},
                                      {common, expected[node].at(common)}};
          ::testing::AssertionResult same = SameHits(*got, want);
          if (!same) problem = same.message();
        }
        if (!problem.empty()) {
          std::lock_guard<std::mutex> lock(mu);
          if (failures++ == 0) {
            first_failure = absl::StrCat("thread ", t, " read ", i, " node ", node, ": ", problem);
          }
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures, 0) << first_failure;
  // Every read went out on a connection, some in shared batches; never more batches than reads.
  const int64_t reads = reader_->batched_reads() - batched_before;
  const int64_t batches = reader_->batches() - batches_before;
  EXPECT_EQ(reads, kThreads * kReadsPerThread);
  EXPECT_GE(batches, 1);
  EXPECT_LE(batches, reads);
  std::cout << "[ info ] " << reads << " reads in " << batches << " batches\n";
}

TEST_F(PipelinedReaderTest, ManyOutstandingAsyncReadsEachAnsweredOnceOnTheIoThread) {
  constexpr int kReads = 4000;
  constexpr int kKeys = 50;
  const std::string p = Prefix("async");
  auto key = [&](int i) { return absl::StrCat(p, i); };
  std::vector<MemcachedHits> expected(2);
  for (int node : {0, 1}) {
    std::vector<std::string> seeded;
    for (int i = 0; i < kKeys; ++i) {
      seeded.push_back(key(i));
      ASSERT_TRUE(Set(mc_[node].get(), key(i), absl::StrCat(node, ":", i)));
    }
    expected[node] = Mget(mc_[node].get(), seeded);
    ASSERT_EQ(expected[node].size(), static_cast<size_t>(kKeys));
  }

  std::vector<std::atomic<int>> answers(kReads);
  std::vector<std::atomic<bool>> right(kReads);
  std::mutex mu;
  std::condition_variable answered_changed;
  int answered = 0;  // Guarded by mu, as is callback_threads.
  std::set<std::thread::id> callback_threads;
  // Whatever fails below, no callback may outlive what it writes to.
  absl::Cleanup stop_reader = [this] { reader_.reset(); };
  for (int r = 0; r < kReads; ++r) {
    const int node = r % 2;
    const std::vector<std::string> keys = {key(r % kKeys), key((r + 1) % kKeys),
                                           absl::StrCat(p, "missing:", r)};
    reader_->GetAsync(node, keys, Deadline(absl::Seconds(30)),
                      [&, r, node, keys](absl::StatusOr<MemcachedHits> got) {
                        answers[r].fetch_add(1);
                        right[r] =
                            got.ok() && SameHits(*got, {{keys[0], expected[node].at(keys[0])},
                                                        {keys[1], expected[node].at(keys[1])}});
                        std::lock_guard<std::mutex> lock(mu);
                        ++answered;
                        callback_threads.insert(std::this_thread::get_id());
                        answered_changed.notify_all();
                      });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(answered_changed.wait_for(lock, absl::ToChronoNanoseconds(absl::Seconds(60)),
                                          [&] { return answered >= kReads; }))
        << answered << " of " << kReads << " answered";
    // Successful reads are answered by the reader's one I/O thread, never the caller's.
    EXPECT_EQ(callback_threads.size(), 1u);
    EXPECT_EQ(callback_threads.count(std::this_thread::get_id()), 0u);
  }
  reader_.reset();  // Joins the I/O thread: no answer can come later than this.
  for (int r = 0; r < kReads; ++r) {
    ASSERT_EQ(answers[r].load(), 1) << "read " << r;
    ASSERT_TRUE(right[r].load()) << "read " << r;
  }
}

TEST_F(PipelinedReaderTest, InvalidRequestsFailWithInvalidArgumentAndHarmNothing) {
  const std::string p = Prefix("invalid");
  ASSERT_TRUE(Set(mc_[0].get(), p + "ok", "fine"));
  const std::string longest(250, 'k');
  const std::vector<std::string> bad_keys = {
      "",
      "with space",
      "tab\there",
      "new\nline",
      // Would inject a second command if it reached the wire.
      p + "ok\r\nflush_all",
      "nul\0byte"s,
      "del\x7f",
      std::string(251, 'k'),
  };
  for (const std::string& bad : bad_keys) {
    SCOPED_TRACE(absl::StrCat("key of ", bad.size(), " bytes: ", absl::CEscape(bad)));
    absl::StatusOr<MemcachedHits> got = reader_->Get(0, {p + "ok", bad}, Deadline());
    EXPECT_TRUE(absl::IsInvalidArgument(got.status())) << got.status();
    struct Answers {
      std::atomic<int> calls{0};
      std::atomic<absl::StatusCode> code{absl::StatusCode::kOk};
    };
    auto answers = std::make_shared<Answers>();
    reader_->GetAsync(0, {bad}, Deadline(), [answers](absl::StatusOr<MemcachedHits> r) {
      answers->code = r.status().code();
      answers->calls.fetch_add(1);
    });
    // A request that fails validation is answered at once, on the calling thread.
    EXPECT_EQ(answers->calls.load(), 1);
    EXPECT_EQ(answers->code.load(), absl::StatusCode::kInvalidArgument);
  }
  for (int node : {-1, 2, 1000}) {
    absl::StatusOr<MemcachedHits> got = reader_->Get(node, {p + "ok"}, Deadline());
    EXPECT_TRUE(absl::IsInvalidArgument(got.status())) << "node " << node << ": " << got.status();
  }

  // Still working, and nothing was flushed or mixed into the connection.
  absl::StatusOr<MemcachedHits> empty = reader_->Get(0, {}, Deadline());
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->empty());
  absl::StatusOr<MemcachedHits> got = reader_->Get(0, {p + "ok", longest}, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(SameHits(*got, Mget(mc_[0].get(), {p + "ok"})));
}

TEST_F(PipelinedReaderTest, NodeIndexFindsConfiguredNodesOnly) {
  EXPECT_EQ(reader_->NodeIndex(nodes_[0].host, nodes_[0].port), 0);
  EXPECT_EQ(reader_->NodeIndex(nodes_[1].host, nodes_[1].port), 1);
  EXPECT_EQ(reader_->NodeIndex(nodes_[0].host, 1), -1);
  EXPECT_EQ(reader_->NodeIndex("192.0.2.1", nodes_[0].port), -1);
}

TEST_F(PipelinedReaderTest, PassedDeadlineFailsAtOnce) {
  const absl::Time start = absl::Now();
  absl::StatusOr<MemcachedHits> got = reader_->Get(0, {"k"}, start - absl::Seconds(1));
  EXPECT_TRUE(absl::IsUnavailable(got.status())) << got.status();
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(200));
}

// ---------------------------------------------------------------------------------------------
// Node restarts and outages (the real nodes; these tests stop them and always bring them back).

class PipelinedReaderOutageTest : public PipelinedReaderTest {
 protected:
  void TearDown() override {
    BackingServices({"start-memcached", "1"});
    BackingServices({"start-memcached", "2"});
  }

  // Node 2 of scripts/backing-services, as an index into nodes_.
  int SecondNode() {
    int port = 0;
    EXPECT_TRUE(absl::SimpleAtoi(RequiredEnv("SL_MEMCACHED_PORT_2"), &port));
    return reader_->NodeIndex("127.0.0.1", static_cast<uint16_t>(port));
  }

  // Reads `keys` from `node` until a read succeeds or `patience` passes.
  absl::StatusOr<MemcachedHits> GetWhenBack(int node, const std::vector<std::string>& keys,
                                            absl::Duration patience) {
    const absl::Time give_up = absl::Now() + patience;
    absl::StatusOr<MemcachedHits> got = absl::UnavailableError("not tried");
    while (absl::Now() < give_up) {
      got = reader_->Get(node, keys, Deadline(absl::Seconds(2)));
      if (got.ok()) break;
      absl::SleepFor(absl::Milliseconds(50));
    }
    return got;
  }
};

TEST_F(PipelinedReaderOutageTest, ReadsRecoverAfterARestartWithTheSameReader) {
  const int node = SecondNode();
  ASSERT_GE(node, 0);
  const std::string p = Prefix("restart");
  ASSERT_TRUE(Set(mc_[node].get(), p + "before", "v"));
  absl::StatusOr<MemcachedHits> got = reader_->Get(node, {p + "before"}, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();  // The connection is open now.
  ASSERT_EQ(got->size(), 1u);

  BackingServices({"restart-memcached", "2"});
  got = GetWhenBack(node, {p + "before"}, absl::Seconds(5));
  ASSERT_TRUE(got.ok()) << "no read succeeded within 5 s of the restart: " << got.status();
  // Read from the new, empty memcached.
  EXPECT_TRUE(got->empty());

  MemcachedPtr fresh = Libmemcached(nodes_[node]);
  ASSERT_TRUE(Set(fresh.get(), p + "after", "after the restart"));
  got = reader_->Get(node, {p + "before", p + "after"}, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(SameHits(*got, Mget(fresh.get(), {p + "after"})));
}

TEST_F(PipelinedReaderOutageTest, AStoppedNodeFailsFastAndTheOtherKeepsAnswering) {
  const int node = SecondNode();
  ASSERT_GE(node, 0);
  const int other = 1 - node;
  const std::string p = Prefix("stopped");
  ASSERT_TRUE(Set(mc_[other].get(), p + "k", "other"));
  ASSERT_TRUE(reader_->Get(node, {p + "k"}, Deadline()).ok());

  BackingServices({"stop-memcached", "2"});
  // The first read may meet the old connection's end; from then on the node refuses.
  for (int i = 0; i < 3; ++i) {
    const absl::Time start = absl::Now();
    absl::StatusOr<MemcachedHits> got = reader_->Get(node, {p + "k"}, Deadline());
    EXPECT_TRUE(absl::IsUnavailable(got.status())) << got.status();
    EXPECT_LT(absl::Now() - start, kMargin) << "a refused connection must not wait for a timeout";
  }
  absl::StatusOr<MemcachedHits> got = reader_->Get(other, {p + "k"}, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->size(), 1u);

  BackingServices({"start-memcached", "2"});
  // Refusals do not back off, and no stale connection is left: the first read succeeds.
  got = reader_->Get(node, {p + "k"}, Deadline());
  EXPECT_TRUE(got.ok()) << got.status();
}

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
Timed TimedGet(PipelinedReader& reader, const std::vector<std::string>& keys, absl::Time deadline) {
  const absl::Time start = absl::Now();
  absl::StatusOr<MemcachedHits> result = reader.Get(0, keys, deadline);
  return {std::move(result), absl::Now() - start};
}

// A refusal is cheap to retry and ends the moment memcached is back, so it fails the read at once
// but does not make the next reads fail for retry_after_failure.
TEST(PipelinedReaderFailureTest, RefusedConnectionFailsFastAndTheNextReadTriesAgain) {
  const int port = FreeTcpPort();
  ASSERT_GT(port, 0);
  std::unique_ptr<PipelinedReader> reader =
      StartReader({MemcachedNode{"127.0.0.1", static_cast<uint16_t>(port)}}, absl::Seconds(5),
                  absl::Seconds(60));
  ASSERT_NE(reader, nullptr);

  for (int i = 0; i < 3; ++i) {
    Timed refused = TimedGet(*reader, {"k"}, Deadline(absl::Seconds(8)));
    EXPECT_TRUE(absl::IsUnavailable(refused.result.status())) << refused.result.status();
    EXPECT_LT(refused.took, absl::Seconds(1)) << "a refused connect must not wait for a timeout";
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

TEST(PipelinedReaderFailureTest, StalledNodeFailsAtIoTimeoutAndIsSkippedThenRetried) {
  FakeMemcached server({Silent(), Serve()});
  const absl::Duration io_timeout = absl::Seconds(1);
  const absl::Duration retry = absl::Seconds(3);
  std::unique_ptr<PipelinedReader> reader = StartReader({server.node()}, io_timeout, retry);
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

TEST(PipelinedReaderFailureTest, DeadlineShorterThanIoTimeoutIsKept) {
  FakeMemcached server({Silent()});
  const absl::Duration io_timeout = absl::Seconds(4);
  std::unique_ptr<PipelinedReader> reader = StartReader({server.node()}, io_timeout);
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

// Answers that are not memcached's, or not for what was asked, drop the connection and fail the
// read; the next read opens a new connection (the node is not marked failed).
struct Surprise {
  std::string name;
  std::string answer;  // To "gets k".
};
void PrintTo(const Surprise& s, std::ostream* os) { *os << s.name; }

class PipelinedReaderProtocolTest : public ::testing::TestWithParam<Surprise> {};

TEST_P(PipelinedReaderProtocolTest, SurpriseFailsTheReadAndTheNextReadReconnects) {
  FakeMemcached server({Say(GetParam().answer), Serve()});
  const absl::Duration io_timeout = absl::Seconds(5);
  // A long retry period: if the surprise marked the node failed, the next read would fail.
  std::unique_ptr<PipelinedReader> reader =
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
    Answers, PipelinedReaderProtocolTest,
    ::testing::Values(
        Surprise{"Greeting", "HELLO\r\n"}, Surprise{"Error", "ERROR\r\n"},
        Surprise{"ServerError", "SERVER_ERROR out of memory\r\n"},
        // Another caller's key: must never be handed to this one.
        Surprise{"KeyNotAsked", "VALUE someone-else 0 1 1\r\nx\r\nEND\r\n"},
        // More bytes than announced; cut at the announced length the rest would read as "END".
        Surprise{"LongerThanAnnounced", "VALUE k 0 1 1\r\naxxEND\r\n"},
        Surprise{"LengthNotANumber", "VALUE k 0 x 1\r\nx\r\nEND\r\n"},
        // No CAS: a "get" answer, not a "gets" one.
        Surprise{"NoCas", "VALUE k 0 1\r\nx\r\nEND\r\n"},
        // A header line far longer than memcached ever sends, with no end.
        Surprise{"EndlessLine", std::string(4096, 'V')}),
    [](const ::testing::TestParamInfo<Surprise>& info) { return info.param.name; });

TEST(PipelinedReaderFailureTest, ServerHangUpReconnectsWithoutMarkingTheNodeFailed) {
  Script once = Say("END\r\n");
  once.hang_up = true;
  FakeMemcached server({once, Serve()});
  std::unique_ptr<PipelinedReader> reader =
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

TEST(PipelinedReaderFailureTest, DestructionAnswersEveryOutstandingReadOnceWithUnavailable) {
  FakeMemcached server({Silent()});
  std::unique_ptr<PipelinedReader> reader = StartReader({server.node()}, absl::Seconds(60));
  ASSERT_NE(reader, nullptr);
  constexpr int kReads = 300;
  std::vector<std::atomic<int>> answers(kReads);
  std::vector<std::atomic<int>> codes(kReads);
  for (int r = 0; r < kReads; ++r) {
    reader->GetAsync(0, {absl::StrCat("k", r)}, Deadline(absl::Seconds(120)),
                     [&answers, &codes, r](absl::StatusOr<MemcachedHits> got) {
                       codes[r] = static_cast<int>(got.status().code());
                       answers[r].fetch_add(1);
                     });
  }
  // Every read is on the wire, waiting for the stalled node.
  ASSERT_TRUE(server.AwaitLines(kReads));
  for (int r = 0; r < kReads; ++r) ASSERT_EQ(answers[r].load(), 0) << "read " << r;

  const absl::Time start = absl::Now();
  reader.reset();
  EXPECT_LT(absl::Now() - start, kMargin) << "destruction must not wait for the stalled node";
  for (int r = 0; r < kReads; ++r) {
    ASSERT_EQ(answers[r].load(), 1) << "read " << r;
    ASSERT_EQ(codes[r].load(), static_cast<int>(absl::StatusCode::kUnavailable)) << "read " << r;
  }
}

// A caller that reacts to UNAVAILABLE by reading again (another node, say) does so from its
// callback. The callback of a read refused before it is queued (its node is marked failed) runs
// on the calling thread; the new read from inside it must not deadlock on the reader's own lock.
// Run in a child process with an alarm, so that a deadlock fails this test instead of hanging
// the suite.
TEST(PipelinedReaderDeathTest, CallbackOfAFailFastReadMayStartAnotherRead) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        alarm(10);
        {
          FakeMemcached stalled({Silent()});
          std::unique_ptr<PipelinedReader> reader =
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

}  // namespace
}  // namespace sessionledger::testing
