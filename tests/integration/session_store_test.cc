// MemcachedSessionStore directly against the real memcached nodes: TTL limits and placement.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/config/config.h"
#include "server/memcached/memcached_pool.h"
#include "server/memcached/memcached_session_store.h"
#include "tests/integration/session_test_support.h"

namespace sessionledger::testing {
namespace {

class SessionStoreTest : public ::testing::Test {
 protected:
  void Open(const std::string& url_env) {
    absl::StatusOr<MemcachedUrl> url = ParseMemcachedUrl(RequiredEnv(url_env));
    ASSERT_TRUE(url.ok()) << url.status();
    MemcachedPoolOptions options;
    options.url = *url;
    options.size = 2;
    absl::StatusOr<std::unique_ptr<MemcachedPool>> pool = MemcachedPool::Create(options);
    ASSERT_TRUE(pool.ok()) << pool.status();
    pool_ = std::move(*pool);
    store_ = std::make_unique<MemcachedSessionStore>(*pool_, url->replicas);
  }

  static SessionKey Key(const std::string& name) {
    const std::string hex = absl::StrCat(absl::ToUnixMicros(absl::Now()), name);
    return SessionKey{absl::StrCat("test", hex), absl::StrCat("tag", hex)};
  }
  static absl::Time Deadline() { return absl::Now() + absl::Seconds(5); }

  std::unique_ptr<MemcachedPool> pool_;
  std::unique_ptr<MemcachedSessionStore> store_;
};

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
  EXPECT_EQ(*store_->AdvanceGeneration(tag, absl::Seconds(60), Deadline()), 1u);
  EXPECT_EQ(*store_->AdvanceGeneration(tag, absl::Seconds(60), Deadline()), 2u);
  // A copy that fell behind (here: forced to 0 on node 1) is raised again, never lowered.
  ASSERT_TRUE(MemcachedSetRaw(1, MemcachedSessionStore::GenerationKeyName(tag), "0", 60));
  EXPECT_EQ(*store_->ReadGeneration(tag, absl::Seconds(60), Deadline()), 2u);
  EXPECT_EQ(MemcachedGetValue(1, MemcachedSessionStore::GenerationKeyName(tag)), "2");
  EXPECT_EQ(*store_->AdvanceGeneration(tag, absl::Seconds(60), Deadline()), 3u);
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

// CreateSession's first step: the generation and the index in one multi-get, and for a user
// who was never revoked no write at all (generation 0 is the absence of the key).
TEST_F(SessionStoreTest, UserStateReadsBothKeysAndKeepsOnlyARealGenerationAlive) {
  Open("MEMCACHED_URL");
  const std::string tag = Key("state").user_tag;
  std::map<std::string, int64_t> before = CommandCounts();
  absl::StatusOr<UserState> fresh = store_->ReadUserState(tag, absl::Seconds(60), Deadline());
  std::map<std::string, int64_t> after = CommandCounts();
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->generation, 0u);
  EXPECT_FALSE(fresh->index.cas.has_value());
  EXPECT_EQ(Delta(before, after, "cmd_get"), 2);  // Two keys, read together.
  EXPECT_EQ(Delta(before, after, "cmd_set"), 0);
  EXPECT_EQ(Delta(before, after, "cmd_touch"), 0);
  EXPECT_FALSE(MemcachedHas(1, MemcachedSessionStore::GenerationKeyName(tag)) ||
               MemcachedHas(2, MemcachedSessionStore::GenerationKeyName(tag)));

  // The CAS token it returns creates the index; the next read sees it and the generation.
  storage::v1::UserSessionIndex index;
  index.add_entries()->set_session_id("s1");
  ASSERT_TRUE(store_->WriteIndex(tag, fresh->index.cas, index, absl::Seconds(60), Deadline()).ok());
  ASSERT_EQ(*store_->AdvanceGeneration(tag, absl::Seconds(60), Deadline()), 1u);
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
