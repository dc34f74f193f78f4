// MemcachedPipeline against the real memcached nodes of scripts/backing-services: values, CAS,
// concurrency, restarts and outages, and a slow name lookup in front of a real node. What a real
// memcached will not do on demand (refuse, stall, answer garbage, hang up) is driven by a
// scripted server in the unit test tests/service/memcached_pipeline_failure_test.cc.
#include "server/memcached/memcached_pipeline.h"

#include <arpa/inet.h>
#include <libmemcached/memcached.h>
#include <netinet/in.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
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
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/common/notification.h"
#include "server/common/thread_name.h"
#include "server/config/config.h"
#include "tests/support/memcached_pipeline_test_support.h"
#include "tests/support/test_env.h"

namespace sessionledger::testing {
namespace {

using std::string_literals::operator""s;

// A run-unique key prefix: memcached keeps what earlier runs wrote.
std::string Prefix(absl::string_view what) {
  return absl::StrCat("plr:", getpid(), ":", absl::ToUnixMicros(absl::Now()), ":", what, ":");
}

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

AsyncAnswer<MemcachedStored> AwaitStore(MemcachedPipeline& pipeline, int node, MemcachedWrite op,
                                        const std::string& key, absl::string_view value,
                                        uint64_t cas = 0) {
  Pending<MemcachedStored> pending;
  pipeline.StoreAsync(node, op, key, value, 0, cas, Deadline(absl::Seconds(20)),
                      pending.Callback());
  return pending.Wait();
}

AsyncAnswer<MemcachedHits> AwaitGet(MemcachedPipeline& pipeline, int node,
                                    const std::vector<std::string>& keys) {
  Pending<MemcachedHits> pending;
  pipeline.GetAsync(node, keys, Deadline(absl::Seconds(20)), pending.Callback());
  return pending.Wait();
}

class MemcachedPipelineTest : public ::testing::Test {
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
  std::unique_ptr<MemcachedPipeline> reader_;
};

TEST_F(MemcachedPipelineTest, HitsMissesAndCasAreWhatLibmemcachedReports) {
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

TEST_F(MemcachedPipelineTest, BinaryValuesRoundTripExactly) {
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

TEST_F(MemcachedPipelineTest, LargeValueRoundTripsAlsoAmongConcurrentReads) {
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

TEST_F(MemcachedPipelineTest, ManyThreadsGetExactlyTheKeysTheyAskedFor) {
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

  const int64_t batched_before = reader_->batched_requests();
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
  // Every read went out on a connection; never more batches than reads. (That requests queued
  // together share a batch is checked by BatchMetricsCountStores.)
  const int64_t reads = reader_->batched_requests() - batched_before;
  const int64_t batches = reader_->batches() - batches_before;
  EXPECT_EQ(reads, kThreads * kReadsPerThread);
  EXPECT_GE(batches, 1);
  EXPECT_LE(batches, reads);
  std::cout << "[ info ] " << reads << " reads in " << batches << " batches\n";
}

TEST_F(MemcachedPipelineTest, ManyOutstandingAsyncReadsEachAnsweredOnceOnTheIoThread) {
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
  std::set<std::string> callback_thread_names;
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
                        callback_thread_names.insert(ThisThreadName());
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
    EXPECT_EQ(callback_thread_names, std::set<std::string>{"sl-memcached-io"});
  }
  reader_.reset();  // Joins the I/O thread: no answer can come later than this.
  for (int r = 0; r < kReads; ++r) {
    ASSERT_EQ(answers[r].load(), 1) << "read " << r;
    ASSERT_TRUE(right[r].load()) << "read " << r;
  }
}

TEST_F(MemcachedPipelineTest, InvalidRequestsFailWithInvalidArgumentAndHarmNothing) {
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
  // The key written at the start is still there (a flush that got through would leave both this
  // read and libmemcached's empty, and equal).
  EXPECT_TRUE(HitIs(reader_->Get(0, {p + "ok", longest}, Deadline()), p + "ok", "fine"));
}

TEST_F(MemcachedPipelineTest, NodeIndexFindsConfiguredNodesOnly) {
  EXPECT_EQ(reader_->NodeIndex(nodes_[0].host, nodes_[0].port), 0);
  EXPECT_EQ(reader_->NodeIndex(nodes_[1].host, nodes_[1].port), 1);
  EXPECT_EQ(reader_->NodeIndex(nodes_[0].host, 1), -1);
  EXPECT_EQ(reader_->NodeIndex("192.0.2.1", nodes_[0].port), -1);
}

TEST_F(MemcachedPipelineTest, PassedDeadlineFailsAtOnce) {
  const absl::Time start = absl::Now();
  absl::StatusOr<MemcachedHits> got = reader_->Get(0, {"k"}, start - absl::Seconds(1));
  EXPECT_TRUE(absl::IsUnavailable(got.status())) << got.status();
  // What this guards against is a wait for the node or the 5 s I/O timeout.
  EXPECT_LT(absl::Now() - start, kMargin);
}

// ---------------------------------------------------------------------------------------------
// Storage commands on the real nodes, checked through libmemcached as well as the pipeline.

TEST_F(MemcachedPipelineTest, AddStoresOnlyAMissingKey) {
  const std::string p = Prefix("add");
  const std::string key = p + "k";
  EXPECT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kAdd, key, "first", 600, 0, Deadline()),
                      MemcachedStored::kStored));
  const MemcachedHits want = Mget(mc_[0].get(), {key});
  ASSERT_EQ(want.size(), 1u);
  EXPECT_EQ(want.at(key).value, "first");
  absl::StatusOr<MemcachedHits> got = reader_->Get(0, {key}, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(SameHits(*got, want));
  EXPECT_TRUE(Mget(mc_[1].get(), {key}).empty()) << "written to the node not asked";

  // The key exists now: refused, and neither the value nor its CAS changed.
  EXPECT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kAdd, key, "second", 600, 0, Deadline()),
                      MemcachedStored::kNotStored));
  EXPECT_TRUE(SameHits(Mget(mc_[0].get(), {key}), want));

  // Also when another client wrote it.
  const std::string theirs = p + "theirs";
  ASSERT_TRUE(Set(mc_[1].get(), theirs, "theirs"));
  EXPECT_TRUE(IsReply(reader_->Store(1, MemcachedWrite::kAdd, theirs, "mine", 600, 0, Deadline()),
                      MemcachedStored::kNotStored));
  EXPECT_EQ(Mget(mc_[1].get(), {theirs})[theirs].value, "theirs");
}

TEST_F(MemcachedPipelineTest, SetOverwritesAndValuesRoundTripByteExactly) {
  const std::string p = Prefix("set");
  std::string every_byte;
  for (int b = 0; b < 256; ++b) every_byte.push_back(static_cast<char>(b));
  std::mt19937 random(20240602);
  // Odd-sized, so that it is cut nowhere round.
  std::string large(100 * 1024 + 3, '\0');
  for (char& c : large) c = static_cast<char>(random());
  for (const std::string& reply : {"\r\nSTORED\r\n"s, "\r\nEND\r\n"s, "\r\nNOT_FOUND\r\n"s}) {
    large.replace(static_cast<size_t>(random() % (large.size() - reply.size())), reply.size(),
                  reply);
  }
  const std::map<std::string, std::string> values = {
      {p + "plain", "new value"},
      {p + "empty", ""},
      {p + "crlf", "\r\n"s},
      {p + "nul", "\0\0a\0\r\n\0"s},
      {p + "every-byte", every_byte + every_byte},
      {p + "replies", "STORED\r\nEXISTS\r\nEND\r\n"s},
      // With a wrong length memcached would read the rest as a command of its own.
      {p + "injection", absl::StrCat("x\r\nset ", p, "injected 0 0 1\r\ny")},
      {p + "large", large},
  };
  std::vector<std::string> keys;
  for (const auto& [key, value] : values) {
    SCOPED_TRACE(key);
    ASSERT_TRUE(Set(mc_[1].get(), key, "old value"));
    EXPECT_TRUE(IsReply(reader_->Store(1, MemcachedWrite::kSet, key, value, 600, 0, Deadline()),
                        MemcachedStored::kStored));
    keys.push_back(key);
  }
  keys.push_back(p + "injected");
  const MemcachedHits want = Mget(mc_[1].get(), keys);
  EXPECT_EQ(want.size(), values.size()) << "a value was cut, or ran into a command";
  for (const auto& [key, value] : values) {
    ASSERT_EQ(want.count(key), 1u) << key;
    EXPECT_TRUE(want.at(key).value == value)
        << key << ": libmemcached reads " << want.at(key).value.size() << " bytes, want "
        << value.size();
  }
  absl::StatusOr<MemcachedHits> got = reader_->Get(1, keys, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(SameHits(*got, want));

  // A set stores over whatever is there; its CAS argument is ignored.
  EXPECT_TRUE(
      IsReply(reader_->Store(1, MemcachedWrite::kSet, p + "plain", "newer", 600, 12345, Deadline()),
              MemcachedStored::kStored));
  EXPECT_TRUE(HitIs(reader_->Get(1, {p + "plain"}, Deadline()), p + "plain", "newer"));

  // Many large writes at once: more than a socket buffer to send, written in pieces.
  constexpr int kLarge = 40;
  std::vector<Pending<MemcachedStored>> pending(kLarge);
  std::vector<std::string> large_keys;
  auto large_value = [&large](int i) {
    std::string v = large;
    v.replace(0, 8, absl::StrCat(absl::Dec(i, absl::kZeroPad8)));
    return v;
  };
  for (int i = 0; i < kLarge; ++i) {
    large_keys.push_back(absl::StrCat(p, "large:", i));
    reader_->StoreAsync(1, MemcachedWrite::kSet, large_keys.back(), large_value(i), 600, 0,
                        Deadline(absl::Seconds(20)), pending[i].Callback());
  }
  for (int i = 0; i < kLarge; ++i) {
    EXPECT_TRUE(IsReply(pending[i].Wait().result, MemcachedStored::kStored)) << "write " << i;
  }
  // A memcached whose memory went to smaller items (a long-lived development instance) keeps
  // only the newest few of these 100 KB values: every one it kept must be intact, and the last
  // one written is always among them.
  const MemcachedHits large_want = Mget(mc_[1].get(), large_keys);
  ASSERT_EQ(large_want.count(large_keys.back()), 1u);
  for (int i = 0; i < kLarge; ++i) {
    auto it = large_want.find(large_keys[i]);
    if (it == large_want.end()) continue;
    EXPECT_TRUE(it->second.value == large_value(i))
        << "write " << i << ": " << it->second.value.size() << " bytes, differs";
  }
}

TEST_F(MemcachedPipelineTest, CasStoresOnlyOverTheValueItRead) {
  const std::string p = Prefix("cas");
  const std::string key = p + "k";
  ASSERT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kSet, key, "v1", 600, 0, Deadline()),
                      MemcachedStored::kStored));
  absl::StatusOr<MemcachedHits> read = reader_->Get(0, {key}, Deadline());
  ASSERT_TRUE(HitIs(read, key, "v1"));
  const uint64_t cas1 = read->at(key).cas;
  EXPECT_EQ(cas1, Mget(mc_[0].get(), {key})[key].cas);

  EXPECT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kCas, key, "v2", 600, cas1, Deadline()),
                      MemcachedStored::kStored));
  read = reader_->Get(0, {key}, Deadline());
  ASSERT_TRUE(HitIs(read, key, "v2"));
  const uint64_t cas2 = read->at(key).cas;
  EXPECT_NE(cas2, cas1);
  EXPECT_TRUE(SameHits(Mget(mc_[0].get(), {key}), *read));

  // The same CAS again is stale now: refused, and nothing changed.
  EXPECT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kCas, key, "v3", 600, cas1, Deadline()),
                      MemcachedStored::kExists));
  EXPECT_TRUE(SameHits(Mget(mc_[0].get(), {key}), *read));

  // Another client wrote in between.
  ASSERT_TRUE(Set(mc_[0].get(), key, "theirs"));
  EXPECT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kCas, key, "mine", 600, cas2, Deadline()),
                      MemcachedStored::kExists));
  const MemcachedHits theirs = Mget(mc_[0].get(), {key});
  EXPECT_EQ(theirs.at(key).value, "theirs");
  // Over the CAS that client reports, the write goes through.
  EXPECT_TRUE(IsReply(
      reader_->Store(0, MemcachedWrite::kCas, key, "mine", 600, theirs.at(key).cas, Deadline()),
      MemcachedStored::kStored));
  EXPECT_EQ(Mget(mc_[0].get(), {key})[key].value, "mine");

  // Nothing to compare with: not found, and not created.
  EXPECT_TRUE(
      IsReply(reader_->Store(0, MemcachedWrite::kCas, p + "missing", "v", 600, cas2, Deadline()),
              MemcachedStored::kNotFound));
  EXPECT_TRUE(Mget(mc_[0].get(), {p + "missing"}).empty());
}

TEST_F(MemcachedPipelineTest, ExptimeIsSecondsUpToThirtyDaysThenAUnixTime) {
  constexpr int64_t kThirtyDays = 2592000;
  const std::string p = Prefix("exptime");
  ASSERT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kSet, p + "set", "v", 1, 0, Deadline()),
                      MemcachedStored::kStored));
  ASSERT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kAdd, p + "add", "v", 1, 0, Deadline()),
                      MemcachedStored::kStored));
  ASSERT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kSet, p + "cas", "v", 0, 0, Deadline()),
                      MemcachedStored::kStored));
  absl::StatusOr<MemcachedHits> read = reader_->Get(0, {p + "cas"}, Deadline());
  ASSERT_TRUE(HitIs(read, p + "cas", "v"));
  ASSERT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kCas, p + "cas", "w", 1,
                                     read->at(p + "cas").cas, Deadline()),
                      MemcachedStored::kStored));
  ASSERT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kSet, p + "never", "v", 0, 0, Deadline()),
                      MemcachedStored::kStored));
  // The longest relative time: a second more and memcached would read a Unix time in 1970.
  ASSERT_TRUE(IsReply(
      reader_->Store(0, MemcachedWrite::kSet, p + "30-days", "v", kThirtyDays, 0, Deadline()),
      MemcachedStored::kStored));
  // Longer ones are given as Unix times.
  const int64_t in_31_days = absl::ToUnixSeconds(absl::Now()) + kThirtyDays + 24 * 3600;
  ASSERT_TRUE(IsReply(
      reader_->Store(0, MemcachedWrite::kSet, p + "31-days", "v", in_31_days, 0, Deadline()),
      MemcachedStored::kStored));

  // memcached's clock ticks once a second: an item given 1 s lives at most 2 s.
  absl::SleepFor(absl::Milliseconds(2500));
  const std::vector<std::string> keys = {p + "set",   p + "add",     p + "cas",
                                         p + "never", p + "30-days", p + "31-days"};
  absl::StatusOr<MemcachedHits> got = reader_->Get(0, keys, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  const MemcachedHits want = Mget(mc_[0].get(), keys);
  EXPECT_TRUE(SameHits(*got, want));
  EXPECT_EQ(got->size(), 3u);
  EXPECT_EQ(got->count(p + "never"), 1u);
  EXPECT_EQ(got->count(p + "30-days"), 1u);
  EXPECT_EQ(got->count(p + "31-days"), 1u);
  // Gone means gone: it can be added again.
  EXPECT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kAdd, p + "add", "again", 0, 0, Deadline()),
                      MemcachedStored::kStored));
}

TEST_F(MemcachedPipelineTest, InvalidStoresFailWithInvalidArgumentAndSendNothing) {
  const std::string p = Prefix("invalid-store");
  const std::string key = p + "kept";
  ASSERT_TRUE(Set(mc_[0].get(), key, "kept"));
  const MemcachedHits want = Mget(mc_[0].get(), {key});
  ASSERT_EQ(want.size(), 1u);
  // The right CAS: a cas that slipped through would change the value.
  const uint64_t cas = want.at(key).cas;
  const int64_t batches_before = reader_->batches();
  const int64_t requests_before = reader_->batched_requests();

  // Both calls answer `code`; the asynchronous one at once, on the calling thread.
  auto expect_refused = [&](MemcachedWrite op, const std::string& k, int64_t exptime,
                            absl::Time deadline, absl::StatusCode code) {
    absl::StatusOr<MemcachedStored> got =
        reader_->Store(0, op, k, "changed", exptime, cas, deadline);
    EXPECT_EQ(got.status().code(), code) << got.status();
    Pending<MemcachedStored> pending;
    reader_->StoreAsync(0, op, k, "changed", exptime, cas, deadline, pending.Callback());
    const AsyncAnswer<MemcachedStored> answer = pending.Wait(absl::ZeroDuration());
    EXPECT_EQ(answer.result.status().code(), code) << answer.result.status();
    EXPECT_EQ(answer.thread, std::this_thread::get_id());
  };
  const std::vector<MemcachedWrite> ops = {MemcachedWrite::kAdd, MemcachedWrite::kSet,
                                           MemcachedWrite::kCas};
  // Above 30 days an exptime is a Unix time, which must lie in the coming year: 2592001 is a
  // relative time a second too long, read as a date in 1970.
  const int64_t now = absl::ToUnixSeconds(absl::Now());
  for (int64_t exptime : {int64_t{-1}, int64_t{-2592000}, int64_t{2592001}, int64_t{1700000000},
                          now - 10, now + 367 * 24 * 3600, std::numeric_limits<int64_t>::max(),
                          std::numeric_limits<int64_t>::min()}) {
    for (MemcachedWrite op : ops) {
      SCOPED_TRACE(absl::StrCat("op ", static_cast<int>(op), ", exptime ", exptime));
      expect_refused(op, key, exptime, Deadline(), absl::StatusCode::kInvalidArgument);
    }
  }
  const std::vector<std::string> bad_keys = {
      "",
      "with space",
      "tab\there",
      "new\nline",
      // Would inject a command of its own if it reached the wire.
      key + "\r\nflush_all",
      "nul\0byte"s,
      "del\x7f",
      std::string(251, 'k'),
  };
  for (const std::string& bad : bad_keys) {
    for (MemcachedWrite op : ops) {
      SCOPED_TRACE(absl::StrCat("op ", static_cast<int>(op), ", key of ", bad.size(),
                                " bytes: ", absl::CEscape(bad)));
      expect_refused(op, bad, 0, Deadline(), absl::StatusCode::kInvalidArgument);
    }
  }
  // A node that is not configured, and a deadline already passed.
  for (int node : {-1, 2}) {
    absl::StatusOr<MemcachedStored> got =
        reader_->Store(node, MemcachedWrite::kSet, key, "changed", 0, 0, Deadline());
    EXPECT_TRUE(absl::IsInvalidArgument(got.status())) << "node " << node << ": " << got.status();
  }
  const absl::Time start = absl::Now();
  expect_refused(MemcachedWrite::kSet, key, 0, start - absl::Seconds(1),
                 absl::StatusCode::kUnavailable);
  EXPECT_LT(absl::Now() - start, kMargin);  // Not the 5 s I/O timeout.

  EXPECT_EQ(reader_->batches(), batches_before);
  EXPECT_EQ(reader_->batched_requests(), requests_before);
  // Nothing reached the node: the value is as it was, and nothing was flushed.
  EXPECT_TRUE(SameHits(Mget(mc_[0].get(), {key}), want));

  // The longest key is fine.
  const std::string longest = p + std::string(250 - p.size(), 'k');
  EXPECT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kSet, longest, "v", 600, 0, Deadline()),
                      MemcachedStored::kStored));
  EXPECT_TRUE(HitIs(reader_->Get(0, {longest}, Deadline()), longest, "v"));
}

// Replies are matched to requests by order alone. Every thread works its own key on the same
// node and connection, so their requests interleave on the wire; each reply differs with the
// request (STORED, NOT_STORED, EXISTS, NOT_FOUND, values of varied length), so one handed to the
// wrong caller shows.
TEST_F(MemcachedPipelineTest, InterleavedStoresAndGetsFromManyThreadsEachGetTheirOwnReply) {
  constexpr int kThreads = 8;
  constexpr int kOps = 200;
  constexpr int kBurstEvery = 25;
  constexpr int kBurst = 10;
  constexpr int kNode = 0;
  const std::string p = Prefix("interleaved");

  std::mutex mu;
  int failures = 0;  // Guarded by mu, as are first_failure and callback_threads.
  std::string first_failure;
  std::set<std::thread::id> callback_threads;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const std::string key = absl::StrCat(p, "t", t);
      std::set<std::thread::id> seen;
      auto fail = [&](int i, absl::string_view step, absl::string_view problem) {
        std::lock_guard<std::mutex> lock(mu);
        if (failures++ == 0) {
          first_failure = absl::StrCat("thread ", t, " op ", i, " ", step, ": ", problem);
        }
      };
      for (int i = 0; i < kOps; ++i) {
        const std::string value =
            absl::StrCat(t, ":", i, ":", std::string(static_cast<size_t>((t * 31 + i) % 64), 'v'));
        const AsyncAnswer<MemcachedStored> set =
            AwaitStore(*reader_, kNode, MemcachedWrite::kSet, key, value);
        seen.insert(set.thread);
        if (auto r = IsReply(set.result, MemcachedStored::kStored); !r) {
          fail(i, "set", r.message());
          continue;
        }
        // Issued after the set's callback: must see the set.
        const AsyncAnswer<MemcachedHits> get = AwaitGet(*reader_, kNode, {key});
        seen.insert(get.thread);
        if (auto r = HitIs(get.result, key, value); !r) {
          fail(i, "get after set", r.message());
          continue;
        }
        const uint64_t cas = get.result->at(key).cas;
        std::string now_value = value;
        MemcachedStored want = MemcachedStored::kStored;
        AsyncAnswer<MemcachedStored> write;
        switch (i % 4) {
          case 0:
            want = MemcachedStored::kNotStored;
            write = AwaitStore(*reader_, kNode, MemcachedWrite::kAdd, key, "added");
            break;
          case 1:
            want = MemcachedStored::kExists;
            write = AwaitStore(*reader_, kNode, MemcachedWrite::kCas, key, "stale", cas + 1);
            break;
          case 2:
            want = MemcachedStored::kNotFound;
            write = AwaitStore(*reader_, kNode, MemcachedWrite::kCas,
                               absl::StrCat(key, ":missing:", i), "v", cas);
            break;
          default:
            now_value = value + ":cas";
            write = AwaitStore(*reader_, kNode, MemcachedWrite::kCas, key, now_value, cas);
            break;
        }
        seen.insert(write.thread);
        if (auto r = IsReply(write.result, want); !r) fail(i, "write", r.message());
        const AsyncAnswer<MemcachedHits> check = AwaitGet(*reader_, kNode, {key});
        seen.insert(check.thread);
        if (auto r = HitIs(check.result, key, now_value); !r)
          fail(i, "get after write", r.message());

        if (i % kBurstEvery != kBurstEvery - 1) continue;
        // Writes back to back without waiting, and a read right behind them: memcached applies
        // one connection's requests in order, so the read sees the last write, and the writes'
        // callbacks have all run, in order, by the time the read's runs.
        struct Burst {
          std::mutex mu;
          std::vector<int> order;  // Guarded by mu, as is wrong.
          int wrong = 0;
        };
        auto burst = std::make_shared<Burst>();
        for (int j = 0; j < kBurst; ++j) {
          reader_->StoreAsync(kNode, MemcachedWrite::kSet, key, absl::StrCat(value, ":burst:", j),
                              0, 0, Deadline(absl::Seconds(20)),
                              [burst, j](absl::StatusOr<MemcachedStored> r) {
                                std::lock_guard<std::mutex> lock(burst->mu);
                                burst->order.push_back(j);
                                if (!IsReply(r, MemcachedStored::kStored)) ++burst->wrong;
                              });
        }
        const AsyncAnswer<MemcachedHits> last = AwaitGet(*reader_, kNode, {key});
        if (auto r = HitIs(last.result, key, absl::StrCat(value, ":burst:", kBurst - 1)); !r) {
          fail(i, "get behind a burst", r.message());
        }
        std::lock_guard<std::mutex> lock(burst->mu);
        std::vector<int> in_order(kBurst);
        for (int j = 0; j < kBurst; ++j) in_order[j] = j;
        if (burst->order != in_order || burst->wrong != 0) {
          fail(i, "burst",
               absl::StrCat("callbacks in order ", absl::StrJoin(burst->order, ","), ", ",
                            burst->wrong, " not STORED"));
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      callback_threads.insert(seen.begin(), seen.end());
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures, 0) << first_failure;
  // Every callback ran on the pipeline's one I/O thread.
  EXPECT_EQ(callback_threads.size(), 1u);
  EXPECT_EQ(callback_threads.count(std::this_thread::get_id()), 0u);
}

TEST_F(MemcachedPipelineTest, BatchMetricsCountStores) {
  const std::string p = Prefix("metrics");
  int64_t batches = reader_->batches();
  int64_t requests = reader_->batched_requests();
  // One at a time, every store is a batch of its own.
  constexpr int kSequential = 10;
  for (int i = 0; i < kSequential; ++i) {
    ASSERT_TRUE(IsReply(
        reader_->Store(i % 2, MemcachedWrite::kSet, absl::StrCat(p, i), "v", 600, 0, Deadline()),
        MemcachedStored::kStored));
  }
  EXPECT_EQ(reader_->batches() - batches, kSequential);
  EXPECT_EQ(reader_->batched_requests() - requests, kSequential);

  // Many at once, mixed with reads: each is counted once, in at most as many batches.
  constexpr int kStores = 300;
  constexpr int kGets = 100;
  batches = reader_->batches();
  requests = reader_->batched_requests();
  std::vector<Pending<MemcachedStored>> stores(kStores);
  std::vector<Pending<MemcachedHits>> gets(kGets);
  for (int i = 0; i < kStores; ++i) {
    reader_->StoreAsync(0, MemcachedWrite::kSet, absl::StrCat(p, "many:", i), "v", 600, 0,
                        Deadline(absl::Seconds(20)), stores[i].Callback());
    if (i % 3 == 0) {
      reader_->GetAsync(0, {absl::StrCat(p, "many:", i)}, Deadline(absl::Seconds(20)),
                        gets[i / 3].Callback());
    }
  }
  for (auto& s : stores) ASSERT_TRUE(IsReply(s.Wait().result, MemcachedStored::kStored));
  for (auto& g : gets) ASSERT_TRUE(g.Wait().result.ok());
  const int64_t sent = reader_->batched_requests() - requests;
  const int64_t sent_batches = reader_->batches() - batches;
  EXPECT_EQ(sent, kStores + kGets);
  EXPECT_GE(sent_batches, 1);
  // Queued back to back from one thread, faster than one request's round trip: some share one.
  EXPECT_LT(sent_batches, sent) << "every request went out in a batch of its own";
  std::cout << "[ info ] " << sent << " stores and reads in " << sent_batches << " batches\n";
}

// memcached's default item size limit is 1 MiB; a larger value is refused (memcached answers
// SERVER_ERROR): INVALID_ARGUMENT, as libmemcached's E2BIG, and the node keeps working.
TEST_F(MemcachedPipelineTest, ValueAboveTheItemSizeLimitIsNotStoredAndTheNodeKeepsWorking) {
  const std::string p = Prefix("too-large");
  const std::string huge(2 * 1024 * 1024, 'x');
  absl::StatusOr<MemcachedStored> got =
      reader_->Store(0, MemcachedWrite::kSet, p + "huge", huge, 600, 0, Deadline());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << got.status();
  EXPECT_TRUE(Mget(mc_[0].get(), {p + "huge"}).empty());

  EXPECT_TRUE(IsReply(reader_->Store(0, MemcachedWrite::kSet, p + "small", "v", 600, 0, Deadline()),
                      MemcachedStored::kStored));
  EXPECT_TRUE(HitIs(reader_->Get(0, {p + "small"}, Deadline()), p + "small", "v"));
}

// ---------------------------------------------------------------------------------------------
// Node restarts and outages (the real nodes; these tests stop them and always bring them back).

class MemcachedPipelineOutageTest : public MemcachedPipelineTest {
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

TEST_F(MemcachedPipelineOutageTest, ReadsRecoverAfterARestartWithTheSameReader) {
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

TEST_F(MemcachedPipelineOutageTest, AStoppedNodeFailsFastAndTheOtherKeepsAnswering) {
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
// Name lookups, with the real nodes behind an injected resolver.

// A slow name server holds up only the requests of the node being looked up, and those no
// longer than their deadlines. The lookup used to run on the thread that submitted the request:
// the one that takes every call's arrival, or the I/O thread itself (a write to the next copy),
// so one slow lookup stalled every request of the process.
TEST(MemcachedPipelineNameLookupTest, ASlowNameLookupHoldsUpNoCallerAndNoOtherNode) {
  const std::vector<MemcachedNode> real = RealNodes();
  ASSERT_EQ(real.size(), 2u);
  MemcachedPipelineOptions options;
  options.nodes = {real[0], MemcachedNode{"slow-dns.test", real[1].port}};
  auto lookup_may_finish = std::make_shared<Notification>();
  auto slow_lookups = std::make_shared<std::atomic<int>>(0);
  const std::string slow_target = real[1].host;
  options.resolve =
      [=](const MemcachedNode& node) -> absl::StatusOr<std::vector<MemcachedAddress>> {
    std::string host = node.host;
    if (host == "slow-dns.test") {
      slow_lookups->fetch_add(1);
      lookup_may_finish->WaitForNotificationWithTimeout(absl::Seconds(10));
      host = slow_target;
    }
    MemcachedAddress address;
    auto* in = reinterpret_cast<sockaddr_in*>(&address.address);
    in->sin_family = AF_INET;
    in->sin_port = htons(node.port);
    if (inet_pton(AF_INET, host.c_str(), &in->sin_addr) != 1) {
      return absl::UnavailableError("not an IPv4 address: " + host);
    }
    address.length = sizeof(sockaddr_in);
    return std::vector<MemcachedAddress>{address};
  };
  absl::StatusOr<std::unique_ptr<MemcachedPipeline>> reader = MemcachedPipeline::Start(options);
  ASSERT_TRUE(reader.ok()) << reader.status();
  const std::string p = Prefix("slow-dns");
  ASSERT_TRUE(Set(Libmemcached(real[0]).get(), p + "k", "fast"));
  ASSERT_TRUE(Set(Libmemcached(real[1]).get(), p + "k", "slow"));

  const absl::Time start = absl::Now();
  Pending<MemcachedHits> slow;
  (*reader)->GetAsync(1, {p + "k"}, absl::Now() + absl::Milliseconds(300), slow.Callback());
  // A caller held up by the lookup would wait for its 10 s.
  EXPECT_LT(absl::Now() - start, kMargin) << "the caller waited for the lookup";
  // Meanwhile the other node answers.
  EXPECT_TRUE(HitIs((*reader)->Get(0, {p + "k"}, Deadline()), p + "k", "fast"));
  const AsyncAnswer<MemcachedHits> late = slow.Wait();
  EXPECT_TRUE(absl::IsUnavailable(late.result.status())) << late.result.status();
  EXPECT_LT(late.at - start, absl::Milliseconds(300) + kMargin) << "the read outlived its deadline";

  // Once the name resolves, the node is used; it was looked up once.
  lookup_may_finish->Notify();
  EXPECT_TRUE(HitIs((*reader)->Get(1, {p + "k"}, Deadline()), p + "k", "slow"));
  EXPECT_EQ(slow_lookups->load(), 1);
}

}  // namespace
}  // namespace sessionledger::testing
