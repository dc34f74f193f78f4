#include "server/session/session_service.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <future>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "server/common/blocking_executor.h"
#include "server/common/status_macros.h"
#include "server/domain/caller_message.h"
#include "server/session/token.h"
#include "tests/unit/fake_session_store.h"

namespace sessionledger {
namespace {

using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

constexpr absl::Duration kTtl = absl::Seconds(60);
constexpr absl::Duration kLifetime = absl::Seconds(300);

int64_t Micros(absl::Time t) { return absl::ToUnixMicros(t); }

class SessionServiceTest : public ::testing::Test {
 protected:
  SessionServiceTest() {
    store_ = std::make_shared<testing::FakeSessionStore>(clock_);
    SessionServiceOptions options;
    options.default_ttl = kTtl;
    options.max_lifetime = kLifetime;
    // Called from several threads when concurrent updates back off.
    options.sleep = [this](absl::Duration d) {
      std::lock_guard<std::mutex> lock(slept_mutex_);
      slept_ += d;
    };
    service_ = std::make_shared<SessionService>(store_, clock_, options);
  }

  absl::Time Deadline() const { return absl::Now() + absl::Seconds(10); }

  // The service again, with at most `limit` live sessions per user.
  void LimitSessionsPerUser(int limit) {
    SessionServiceOptions options = service_->options();
    options.limits.max_live_sessions_per_user = limit;
    service_ = std::make_shared<SessionService>(store_, clock_, options);
  }

  // A limit of 3 and two live sessions of `user`, whose index holds a third entry (a deleted
  // session's): the next create of `user` counts its sessions against the limit first.
  void OneBelowALimitOfThree(const std::string& user) {
    LimitSessionsPerUser(3);
    MustCreate(user);
    MustCreate(user);
    ASSERT_TRUE(service_->Delete(MustCreate(user).token, Deadline()).ok());
  }

  SessionView MustCreate(const std::string& user, int64_t ttl = 0, AttributeMap attrs = {}) {
    absl::StatusOr<SessionView> v = service_->Create(user, ttl, attrs, Deadline());
    EXPECT_TRUE(v.ok()) << v.status();
    return v.ok() ? *v : SessionView{};
  }

  absl::StatusOr<SessionView> Get(const std::string& token, bool touch = false) {
    return service_->Get(token, touch, Deadline());
  }

  absl::StatusOr<SessionView> Update(const std::string& token, AttributeMap set,
                                     std::vector<std::string> remove = {}, int64_t expected = 0) {
    KeyList r(remove.begin(), remove.end());
    return service_->Update(token, set, r, expected, Deadline());
  }

  FakeClock clock_;
  std::shared_ptr<testing::FakeSessionStore> store_;
  std::shared_ptr<SessionService> service_;
  std::mutex slept_mutex_;
  absl::Duration slept_;
};

TEST_F(SessionServiceTest, CreateReturnsTokenVersionOneAndLifetimes) {
  const absl::Time now = clock_.Now();
  AttributeMap attrs;
  attrs["role"] = "admin";
  SessionView v = MustCreate("alice", 0, attrs);
  EXPECT_EQ(v.token.size(), kTokenLength);
  EXPECT_FALSE(v.stored.session_id().empty());
  EXPECT_EQ(v.stored.user_id(), "alice");
  EXPECT_EQ(v.stored.version(), 1);
  EXPECT_EQ(v.stored.ttl_seconds(), 60);
  EXPECT_EQ(v.stored.created_at_unix_micros(), Micros(now));
  EXPECT_EQ(v.stored.expires_at_unix_micros(), Micros(now + kTtl));
  EXPECT_EQ(v.stored.absolute_expires_at_unix_micros(), Micros(now + kLifetime));
  EXPECT_EQ(v.stored.attributes().at("role"), "admin");
  // Stored under the hash of the token, for the remaining idle lifetime.
  const std::string hash = KeyForToken(v.token)->token_hash;
  EXPECT_TRUE(store_->HasRaw(hash));
  EXPECT_EQ(store_->TtlOf(hash), kTtl);
}

// The server that last slid the expiry may have a clock ahead of this one (skew between
// replicas, or a step back): an update or a rotation never moves expires_at back.
TEST_F(SessionServiceTest, UpdateAndRotateNeverMoveTheExpiryBack) {
  SessionView v = MustCreate("alice");
  clock_.Advance(absl::Seconds(20));
  absl::StatusOr<SessionView> touched = Get(v.token, /*touch=*/true);
  ASSERT_TRUE(touched.ok()) << touched.status();
  const int64_t touched_expiry = touched->stored.expires_at_unix_micros();
  clock_.Advance(absl::Seconds(-5));
  AttributeMap set;
  set["k"] = "v";
  absl::StatusOr<SessionView> u = Update(v.token, set);
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->stored.expires_at_unix_micros(), touched_expiry);
  absl::StatusOr<SessionView> r = service_->Rotate(v.token, Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->stored.expires_at_unix_micros(), touched_expiry);
}

// A listing prunes an index entry whose session is still missing 30 s after it was written, so
// the add that follows the entry must be over well before: by 15 s after it, whatever the
// call's own deadline (an add after the prune would leave a live session out of the index).
TEST_F(SessionServiceTest, TheAddAfterAnIndexEntryEndsWithinHalfTheGraceOfListings) {
  // Deadlines are read against the wall clock (a rotation also measures how much of one is
  // left), so the sessions' clock starts there, as in the server.
  clock_.Set(absl::Now());
  const absl::Time indexed_at = clock_.Now();
  const absl::Time far_deadline = indexed_at + absl::Minutes(5);
  absl::StatusOr<SessionView> v = service_->Create("alice", 0, {}, far_deadline);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(store_->last_add_deadline(), indexed_at + absl::Seconds(15));
  absl::StatusOr<SessionView> r = service_->Rotate(v->token, far_deadline);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(store_->last_add_deadline(), indexed_at + absl::Seconds(15));
  // A nearer deadline stays.
  ASSERT_TRUE(service_->Create("bob", 0, {}, indexed_at + absl::Seconds(3)).ok());
  EXPECT_EQ(store_->last_add_deadline(), indexed_at + absl::Seconds(3));
}

TEST_F(SessionServiceTest, CreateRejectsBadInput) {
  const auto create = [&](const std::string& user, int64_t ttl, const AttributeMap& attrs) {
    return service_->Create(user, ttl, attrs, Deadline()).status();
  };
  EXPECT_THAT(std::string(create("", 0, {}).message()), HasSubstr("user_id"));
  EXPECT_TRUE(absl::IsInvalidArgument(create("", 0, {})));
  EXPECT_TRUE(absl::IsInvalidArgument(create(std::string(129, 'u'), 0, {})));
  EXPECT_TRUE(absl::IsInvalidArgument(create("bad\tuser", 0, {})));
  EXPECT_TRUE(absl::IsInvalidArgument(create("alice", -1, {})));
  EXPECT_TRUE(absl::IsInvalidArgument(create("alice", 301, {})));
  EXPECT_THAT(std::string(create("alice", 301, {}).message()), HasSubstr("ttl_seconds"));
  EXPECT_TRUE(create("alice", 300, {}).ok());
  AttributeMap empty_key;
  empty_key[""] = "v";
  EXPECT_TRUE(absl::IsInvalidArgument(create("alice", 0, empty_key)));
  AttributeMap big;
  big["k"] = std::string(64 * 1024 - 1, 'v');  // Exactly 64 KiB with the key.
  EXPECT_TRUE(create("alice", 0, big).ok());
  big["k"].push_back('v');
  absl::Status too_big = create("alice", 0, big);
  EXPECT_TRUE(absl::IsInvalidArgument(too_big));
  EXPECT_THAT(std::string(too_big.message()), HasSubstr("attributes"));
}

TEST_F(SessionServiceTest, GetErrors) {
  EXPECT_TRUE(absl::IsInvalidArgument(Get("").status()));
  EXPECT_TRUE(absl::IsNotFound(Get("garbage").status()));
  EXPECT_TRUE(absl::IsNotFound(Get(*NewToken("alice")).status()));
}

TEST_F(SessionServiceTest, GetWithoutTouchKeepsExpiryAndTouchSlidesIt) {
  SessionView v = MustCreate("alice");
  clock_.Advance(absl::Seconds(40));
  absl::StatusOr<SessionView> read = Get(v.token);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(read->token.empty());
  EXPECT_EQ(read->stored.expires_at_unix_micros(), v.stored.expires_at_unix_micros());
  absl::StatusOr<SessionView> touched = Get(v.token, /*touch=*/true);
  ASSERT_TRUE(touched.ok());
  EXPECT_EQ(touched->stored.expires_at_unix_micros(), Micros(clock_.Now() + kTtl));
  EXPECT_EQ(touched->stored.version(), 1);
  EXPECT_EQ(store_->TtlOf(KeyForToken(v.token)->token_hash), kTtl);
  // 40 s after the touch the untouched expiry would have passed; the slid one has not.
  clock_.Advance(absl::Seconds(40));
  EXPECT_TRUE(Get(v.token).ok());
}

TEST_F(SessionServiceTest, ExpiredSessionIsNotFoundEvenIfTheItemLingers) {
  SessionView v = MustCreate("alice", 2);
  clock_.Advance(absl::Seconds(2));
  EXPECT_TRUE(absl::IsNotFound(Get(v.token).status()));
  EXPECT_TRUE(absl::IsNotFound(Get(v.token, true).status()));
}

TEST_F(SessionServiceTest, TouchNeverPassesTheAbsoluteLifetime) {
  SessionView v = MustCreate("alice", 200);
  const int64_t absolute = v.stored.absolute_expires_at_unix_micros();
  clock_.Advance(absl::Seconds(150));
  absl::StatusOr<SessionView> touched = Get(v.token, true);
  ASSERT_TRUE(touched.ok());
  EXPECT_EQ(touched->stored.expires_at_unix_micros(), absolute);
  EXPECT_EQ(store_->TtlOf(KeyForToken(v.token)->token_hash), absl::Seconds(150));
  clock_.Advance(absl::Seconds(149));
  ASSERT_TRUE(Get(v.token, true).ok());
  clock_.Advance(absl::Seconds(1));
  EXPECT_TRUE(absl::IsNotFound(Get(v.token, true).status()));
}

TEST_F(SessionServiceTest, UpdateSetsRemovesBumpsVersionAndSlides) {
  AttributeMap attrs;
  attrs["a"] = "1";
  attrs["b"] = "2";
  SessionView v = MustCreate("alice", 0, attrs);
  clock_.Advance(absl::Seconds(30));
  AttributeMap set;
  set["c"] = "3";
  set["a"] = "one";
  absl::StatusOr<SessionView> u = Update(v.token, set, {"b", "missing"});
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->stored.version(), 2);
  EXPECT_EQ(u->stored.expires_at_unix_micros(), Micros(clock_.Now() + kTtl));
  EXPECT_EQ(u->stored.attributes().size(), 2u);
  EXPECT_EQ(u->stored.attributes().at("a"), "one");
  EXPECT_EQ(u->stored.attributes().at("c"), "3");
  EXPECT_EQ(Get(v.token)->stored.version(), 2);
}

TEST_F(SessionServiceTest, UpdateWithExpectedVersion) {
  SessionView v = MustCreate("alice");
  AttributeMap set;
  set["k"] = "v";
  absl::Status stale = Update(v.token, set, {}, 2).status();
  EXPECT_TRUE(absl::IsAborted(stale)) << stale;
  EXPECT_THAT(std::string(stale.message()), HasSubstr("expected_version"));
  ASSERT_TRUE(Update(v.token, set, {}, 1).ok());
  EXPECT_TRUE(absl::IsAborted(Update(v.token, set, {}, 1).status()));
  EXPECT_EQ(Update(v.token, set, {}, 2)->stored.version(), 3);
}

TEST_F(SessionServiceTest, UpdateValidationComesFirst) {
  AttributeMap set;
  set["k"] = "v";
  const std::string unknown = *NewToken("alice");
  EXPECT_TRUE(absl::IsInvalidArgument(Update("", set).status()));
  absl::Status both = Update(unknown, set, {"k"}).status();
  EXPECT_TRUE(absl::IsInvalidArgument(both)) << both;
  EXPECT_THAT(std::string(both.message()), HasSubstr("remove"));
  EXPECT_TRUE(absl::IsInvalidArgument(Update(unknown, set, {}, -1).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(Update(unknown, set, {""}).status()));
  AttributeMap bad_key;
  bad_key["a\x01"] = "v";
  EXPECT_TRUE(absl::IsInvalidArgument(Update(unknown, bad_key).status()));
  EXPECT_TRUE(absl::IsNotFound(Update(unknown, set).status()));
}

TEST_F(SessionServiceTest, UpdateRejectsAttributesGrowingPastTheLimit) {
  AttributeMap attrs;
  attrs["a"] = std::string(40 * 1024, 'x');
  SessionView v = MustCreate("alice", 0, attrs);
  AttributeMap set;
  set["b"] = std::string(30 * 1024, 'y');
  EXPECT_TRUE(absl::IsInvalidArgument(Update(v.token, set).status()));
  // Removing the big one in the same call makes room.
  EXPECT_TRUE(Update(v.token, set, {"a"}).ok());
}

TEST_F(SessionServiceTest, UnconditionalUpdateRetriesCasConflictsWithBackoff) {
  SessionView v = MustCreate("alice");
  store_->FailNextCas(3);
  AttributeMap set;
  set["k"] = "v";
  absl::StatusOr<SessionView> u = Update(v.token, set);
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(store_->cas_calls(), 4);
  EXPECT_GT(slept_, absl::ZeroDuration());
  EXPECT_LE(slept_, absl::Milliseconds(3 * 20));
  EXPECT_EQ(u->stored.version(), 2);
}

TEST_F(SessionServiceTest, ConditionalUpdateRereadsAfterAConflictThatKeptTheVersion) {
  SessionView v = MustCreate("alice");
  store_->FailNextCas(1);  // E.g. a concurrent touch: CAS value changed, version did not.
  AttributeMap set;
  set["k"] = "v";
  EXPECT_EQ(Update(v.token, set, {}, 1)->stored.version(), 2);
}

TEST_F(SessionServiceTest, RetriesAreBounded) {
  SessionView v = MustCreate("alice");
  store_->FailNextCas(1'000'000);
  AttributeMap set;
  set["k"] = "v";
  // Retryable, naming the field; not ABORTED, which means a stale expected_version.
  const absl::Status status = Update(v.token, set).status();
  EXPECT_TRUE(absl::IsUnavailable(status)) << status;
  EXPECT_THAT(std::string(status.message()),
              HasSubstr(absl::StrCat("token: the session changed concurrently at each of ",
                                     service_->options().max_cas_attempts, " tries")));
  EXPECT_EQ(store_->cas_calls(), service_->options().max_cas_attempts);
}

TEST_F(SessionServiceTest, RotateRetriesAreBoundedToo) {
  SessionView v = MustCreate("alice");
  store_->FailNextCas(1'000'000);
  const absl::Status status = service_->Rotate(v.token, Deadline()).status();
  EXPECT_TRUE(absl::IsUnavailable(status)) << status;
  EXPECT_EQ(store_->cas_calls(), service_->options().max_cas_attempts);
  // Each losing try removed the session it had made: the old one is still the only one.
  store_->FailNextCas(0);
  EXPECT_TRUE(Get(v.token).ok());
  absl::StatusOr<std::vector<storage::v1::StoredSession>> listed =
      service_->List("alice", Deadline());
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].session_id(), v.stored.session_id());
}

TEST_F(SessionServiceTest, ConcurrentUnconditionalUpdatesAllSurvive) {
  SessionView v = MustCreate("alice");
  // A pause between reading the session and writing it makes the first updates overlap (and
  // conflict) even when each thread would otherwise finish within its time slice.
  store_->PauseNextCas(16, absl::Microseconds(500));
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        AttributeMap set;
        set[absl::StrCat("t", t, "-", i)] = "x";
        const absl::StatusOr<SessionView> updated = Update(v.token, set);
        EXPECT_TRUE(updated.ok()) << updated.status();
      }
    });
  }
  for (auto& t : threads) t.join();
  absl::StatusOr<SessionView> final_view = Get(v.token);
  ASSERT_TRUE(final_view.ok());
  EXPECT_EQ(final_view->stored.attributes().size(), 400u);
  EXPECT_EQ(final_view->stored.version(), 401);
  EXPECT_GT(store_->cas_calls(), 400) << "no update lost a race: the retry went untested";
}

TEST_F(SessionServiceTest, RotateIssuesNewTokenAndKillsTheOldOne) {
  AttributeMap attrs;
  attrs["a"] = "1";
  SessionView v = MustCreate("alice", 100, attrs);
  AttributeMap set;
  set["b"] = "2";
  ASSERT_TRUE(Update(v.token, set).ok());
  clock_.Advance(absl::Seconds(50));
  absl::StatusOr<SessionView> r = service_->Rotate(v.token, Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_NE(r->token, v.token);
  EXPECT_EQ(r->token.size(), kTokenLength);
  EXPECT_NE(r->stored.session_id(), v.stored.session_id());
  EXPECT_EQ(r->stored.user_id(), "alice");
  EXPECT_EQ(r->stored.version(), 1);
  EXPECT_EQ(r->stored.ttl_seconds(), 100);
  EXPECT_EQ(r->stored.created_at_unix_micros(), v.stored.created_at_unix_micros());
  EXPECT_EQ(r->stored.absolute_expires_at_unix_micros(),
            v.stored.absolute_expires_at_unix_micros());
  EXPECT_EQ(r->stored.expires_at_unix_micros(), Micros(clock_.Now() + absl::Seconds(100)));
  EXPECT_EQ(r->stored.attributes().size(), 2u);
  EXPECT_TRUE(absl::IsNotFound(Get(v.token).status()));
  EXPECT_TRUE(Get(r->token).ok());
  EXPECT_TRUE(absl::IsNotFound(service_->Rotate(v.token, Deadline()).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(service_->Rotate("", Deadline()).status()));
}

TEST_F(SessionServiceTest, DeleteIsIdempotent) {
  SessionView v = MustCreate("alice");
  EXPECT_TRUE(service_->Delete(v.token, Deadline()).ok());
  EXPECT_TRUE(absl::IsNotFound(Get(v.token).status()));
  EXPECT_TRUE(service_->Delete(v.token, Deadline()).ok());
  EXPECT_TRUE(service_->Delete("not-a-token", Deadline()).ok());
  EXPECT_TRUE(absl::IsInvalidArgument(service_->Delete("", Deadline())));
  // A deleted session cannot be updated or rotated either.
  AttributeMap set;
  set["k"] = "v";
  EXPECT_TRUE(absl::IsNotFound(Update(v.token, set).status()));
  EXPECT_TRUE(absl::IsNotFound(service_->Rotate(v.token, Deadline()).status()));
}

// A touch or update that read a session just before it ended can still land on one copy after
// the tombstone, having slid the expiry by a whole ttl_seconds. The tombstone must outlast that
// (plus a minute of clock skew between servers), though never the absolute lifetime: were it
// kept only for what was left of the idle lifetime, that copy would bring the session back.
TEST_F(SessionServiceTest, TombstonesOutlastATouchThatRacedTheEnd) {
  SessionView deleted = MustCreate("alice", 100);
  SessionView rotated = MustCreate("alice", 100);
  SessionView near_the_end = MustCreate("alice", 300);
  clock_.Advance(absl::Seconds(50));  // 50 s of idle lifetime left, 250 s of absolute.
  ASSERT_TRUE(service_->Delete(deleted.token, Deadline()).ok());
  EXPECT_EQ(store_->TtlOf(KeyForToken(deleted.token)->token_hash), absl::Seconds(160));
  ASSERT_TRUE(service_->Rotate(rotated.token, Deadline()).ok());
  EXPECT_EQ(store_->TtlOf(KeyForToken(rotated.token)->token_hash), absl::Seconds(160));
  clock_.Advance(absl::Seconds(200));  // 50 s of either lifetime left.
  ASSERT_TRUE(service_->Delete(near_the_end.token, Deadline()).ok());
  EXPECT_EQ(store_->TtlOf(KeyForToken(near_the_end.token)->token_hash), absl::Seconds(50));
}

std::vector<std::string> Ids(const std::vector<storage::v1::StoredSession>& sessions) {
  std::vector<std::string> ids;
  for (const auto& s : sessions) ids.push_back(s.session_id());
  return ids;
}

TEST_F(SessionServiceTest, ListShowsLiveSessionsOfThatUserOnly) {
  SessionView a1 = MustCreate("alice");
  SessionView a2 = MustCreate("alice", 5);
  SessionView a3 = MustCreate("alice");
  MustCreate("bob");
  ASSERT_TRUE(service_->Delete(a3.token, Deadline()).ok());
  absl::StatusOr<std::vector<storage::v1::StoredSession>> listed =
      service_->List("alice", Deadline());
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_THAT(Ids(*listed), UnorderedElementsAre(a1.stored.session_id(), a2.stored.session_id()));
  // a2 idles out. (An index entry younger than 30 s whose session is missing is kept: its
  // CreateSession may still be between indexing and storing.)
  clock_.Advance(absl::Seconds(31));
  listed = service_->List("alice", Deadline());
  ASSERT_TRUE(listed.ok());
  EXPECT_THAT(Ids(*listed), UnorderedElementsAre(a1.stored.session_id()));
  // Dead entries were pruned from the index.
  EXPECT_EQ(store_->IndexSize(UserTag("alice")), 1u);
  EXPECT_TRUE(absl::IsInvalidArgument(service_->List("", Deadline()).status()));
  EXPECT_TRUE(service_->List("nobody", Deadline())->empty());
}

// One small ListUserSessions request must not build an answer of any size in the server's
// memory (4096 sessions of 64 KiB were 256 MiB, and eight such listings 2 GB of RSS).
TEST_F(SessionServiceTest, AListingStopsAtItsByteLimitButRevocationDoesNot) {
  SessionServiceOptions options;
  options.limits.max_listing_bytes = 100 * 1024;
  SessionService limited(store_, clock_, options);
  AttributeMap big;
  big["blob"] = std::string(40 * 1024, 'x');
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(limited.Create("alice", 0, big, Deadline()).ok());
  absl::StatusOr<std::vector<storage::v1::StoredSession>> listed =
      limited.List("alice", Deadline());
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->size(), 2u);
  ASSERT_TRUE(limited.Create("alice", 0, big, Deadline()).ok());
  listed = limited.List("alice", Deadline());
  EXPECT_TRUE(absl::IsResourceExhausted(listed.status())) << listed.status();
  EXPECT_THAT(listed.status().message(), HasSubstr("user_id: "));
  EXPECT_THAT(listed.status().message(), HasSubstr("102400 bytes"));
  // Listings together have a budget too; one alone can pass it, which shows it is checked,
  // and the budget is given back when a listing ends.
  SessionServiceOptions shared = options;
  shared.limits.max_listing_bytes_in_flight = 60 * 1024;
  SessionService busy(store_, clock_, shared);
  ASSERT_TRUE(busy.Create("bob", 0, big, Deadline()).ok());
  listed = busy.List("bob", Deadline());
  ASSERT_TRUE(listed.ok()) << listed.status();
  absl::StatusOr<SessionView> second = busy.Create("bob", 0, big, Deadline());
  ASSERT_TRUE(second.ok()) << second.status();
  listed = busy.List("bob", Deadline());
  EXPECT_TRUE(absl::IsUnavailable(listed.status())) << listed.status();
  EXPECT_THAT(listed.status().message(), HasSubstr("user_id: this server is assembling"));
  // Had either listing kept its share, this one would not fit.
  ASSERT_TRUE(busy.Delete(second->token, Deadline()).ok());
  listed = busy.List("bob", Deadline());
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->size(), 1u);
  // Revocation reads the same sessions without their attributes, and ends all three.
  absl::StatusOr<int64_t> revoked = limited.Revoke("alice", Deadline());
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_EQ(*revoked, 3);
}

TEST_F(SessionServiceTest, IndexStaysBoundedForAUserWhoNeverLists) {
  // Sessions that end (deleted, idled out) leave index entries behind; once the index passes its
  // prune threshold, the next CreateSession drops them, and entries past their absolute lifetime
  // go on every write, so the index tracks live sessions, not the user's history.
  std::vector<std::string> tokens;
  for (int i = 0; i < 256; ++i) tokens.push_back(MustCreate("chatty").token);
  EXPECT_EQ(store_->IndexSize(UserTag("chatty")), 256u);
  for (int i = 1; i < 256; ++i) ASSERT_TRUE(service_->Delete(tokens[i], Deadline()).ok());
  clock_.Advance(absl::Seconds(31));  // Past the grace for entries of in-flight creates.
  MustCreate("chatty");
  EXPECT_EQ(store_->IndexSize(UserTag("chatty")), 2u);
  clock_.Advance(kLifetime);  // Every session reached its absolute lifetime.
  MustCreate("chatty");
  EXPECT_EQ(store_->IndexSize(UserTag("chatty")), 1u);
}

// A user's live sessions are bounded, so that the user's index (one Memcached item) never
// outgrows Memcached's item limit. Ended sessions make room again; a rotation replaces one.
TEST_F(SessionServiceTest, LiveSessionsPerUserAreBounded) {
  LimitSessionsPerUser(3);
  std::vector<SessionView> held;
  for (int i = 0; i < 3; ++i) held.push_back(MustCreate("greedy"));
  absl::StatusOr<SessionView> fourth = service_->Create("greedy", 0, {}, Deadline());
  ASSERT_EQ(fourth.status().code(), absl::StatusCode::kResourceExhausted) << fourth.status();
  EXPECT_THAT(std::string(fourth.status().message()), HasSubstr("user_id"));
  EXPECT_TRUE(service_->Create("modest", 0, {}, Deadline()).ok()) << "other users are not held";

  absl::StatusOr<SessionView> rotated = service_->Rotate(held[0].token, Deadline());
  EXPECT_TRUE(rotated.ok()) << rotated.status();

  ASSERT_TRUE(service_->Delete(held[1].token, Deadline()).ok());
  clock_.Advance(absl::Seconds(31));  // Past the grace for entries of in-flight creates.
  EXPECT_TRUE(service_->Create("greedy", 0, {}, Deadline()).ok());
}

// The limit counts a create whose entry is indexed and whose session is not stored yet: two
// creates at once at one below the limit must not both pass. (The count read the stored
// sessions only, so the second passed.) UNAVAILABLE rather than RESOURCE_EXHAUSTED, as the
// create under way may yet fail.
TEST_F(SessionServiceTest, ACreateWhoseSessionIsNotStoredYetCountsAgainstTheLimit) {
  OneBelowALimitOfThree("busy");
  const int items = store_->SessionCount();
  absl::StatusOr<SessionView> second = absl::UnknownError("not run");
  // The second create runs while the first one's session is indexed but not yet added.
  store_->BeforeNextAdd([&] { second = service_->Create("busy", 0, {}, Deadline()); });
  absl::StatusOr<SessionView> first = service_->Create("busy", 0, {}, Deadline());
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(absl::IsUnavailable(second.status())) << second.status();
  EXPECT_THAT(CallerMessage(second.status()).value_or(""),
              HasSubstr("holds 2 live sessions and 1 more are being created"));
  EXPECT_EQ(store_->SessionCount(), items + 1) << "the second create stored a session";
  // Once it is stored, the limit is plain.
  EXPECT_EQ(service_->Create("busy", 0, {}, Deadline()).status().code(),
            absl::StatusCode::kResourceExhausted);
}

// And a create indexed while the count read the sessions, which the count did not see,
// whatever the time on its entry: its writer's clock may run behind ours (here by 2 s), or its
// write may have taken long to land.
TEST_F(SessionServiceTest, ACreateIndexedWhileTheLimitIsCountedCountsToo) {
  for (const absl::Duration writer_clock : {absl::ZeroDuration(), -absl::Seconds(2)}) {
    SCOPED_TRACE(
        absl::StrCat("the other writer's clock is off by ", absl::FormatDuration(writer_clock)));
    const std::string user = absl::StrCat("busy", absl::ToInt64Seconds(writer_clock));
    OneBelowALimitOfThree(user);
    absl::StatusOr<SessionView> meanwhile = absl::UnknownError("not run");
    store_->BeforeNextReadSessions([&] {
      clock_.Advance(writer_clock);
      meanwhile = service_->Create(user, 0, {}, Deadline());
      clock_.Advance(-writer_clock);
    });
    absl::StatusOr<SessionView> counted = service_->Create(user, 0, {}, Deadline());
    ASSERT_TRUE(meanwhile.ok()) << meanwhile.status();
    EXPECT_TRUE(absl::IsUnavailable(counted.status())) << counted.status();
    EXPECT_THAT(CallerMessage(counted.status()).value_or(""),
                HasSubstr("holds 2 live sessions and 1 more are being created"));
  }
}

// An entry is stamped when it is written, after its create's own count: a count that took a
// while (here 1.5 s, more than kAddUnderWay) must not make the entry look old to the next one.
TEST_F(SessionServiceTest, ASlowCountDoesNotAgeTheEntryItWrites) {
  OneBelowALimitOfThree("busy");
  store_->BeforeNextReadSessions([&] { clock_.Advance(absl::Milliseconds(1500)); });
  absl::StatusOr<SessionView> second = absl::UnknownError("not run");
  store_->BeforeNextAdd([&] { second = service_->Create("busy", 0, {}, Deadline()); });
  absl::StatusOr<SessionView> first = service_->Create("busy", 0, {}, Deadline());
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(absl::IsUnavailable(second.status())) << second.status();
}

// Nor hand out a session that expired during it: a 1 s session whose count took 1.5 s is good
// for 1 s from when it is indexed, not from before the count.
TEST_F(SessionServiceTest, ASlowCountDoesNotHandOutAnExpiredSession) {
  OneBelowALimitOfThree("busy");
  store_->BeforeNextReadSessions([&] { clock_.Advance(absl::Milliseconds(1500)); });
  absl::StatusOr<SessionView> created = service_->Create("busy", /*ttl_seconds=*/1, {}, Deadline());
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_GT(created->stored.expires_at_unix_micros(), Micros(clock_.Now()));
  EXPECT_TRUE(Get(created->token).ok()) << Get(created->token).status();
}

// And a count whose read of the sessions took long (here 1.5 s, more than kAddUnderWay) weighs
// the entries against when it read: a create indexed just before, whose session the read
// missed, was still under way then, and may land since.
TEST_F(SessionServiceTest, ASlowReadStillCountsTheCreateItMissed) {
  OneBelowALimitOfThree("busy");
  absl::StatusOr<SessionView> second = absl::UnknownError("not run");
  store_->BeforeNextAdd([&] {
    store_->AfterNextReadSessions([&] { clock_.Advance(absl::Milliseconds(1500)); });
    second = service_->Create("busy", 0, {}, Deadline());
  });
  absl::StatusOr<SessionView> first = service_->Create("busy", 0, {}, Deadline());
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(absl::IsUnavailable(second.status())) << second.status();
}

// A rotation slides the new session's idle expiry as of when its entry is written too: at the
// limit it counts the user's sessions first, and a count of 1.5 s left a 2 s session 0.5 s.
TEST_F(SessionServiceTest, ASlowCountDoesNotShortenARotatedSession) {
  LimitSessionsPerUser(3);
  const SessionView old = MustCreate("rotating", /*ttl=*/2);
  MustCreate("rotating");
  MustCreate("rotating");
  store_->AfterNextReadSessions([&] { clock_.Advance(absl::Milliseconds(1500)); });
  const absl::Time before_count = clock_.Now();
  absl::StatusOr<SessionView> rotated = service_->Rotate(old.token, Deadline());
  ASSERT_TRUE(rotated.ok()) << rotated.status();
  ASSERT_GT(clock_.Now(), before_count) << "the rotation did not count";
  EXPECT_EQ(rotated->stored.expires_at_unix_micros(), Micros(clock_.Now() + absl::Seconds(2)));
}

// The old token's tombstone is timed from when it is written, not from when the rotation began:
// a count at the limit comes between them, and a tombstone stamped before a 90 s count stopped
// being copied to the copies that lacked it 90 s early, while a touch that raced the end could
// keep such a copy live until the full 100 s + the skew margin after it.
TEST_F(SessionServiceTest, ASlowCountDoesNotShortenTheOldTokensTombstone) {
  LimitSessionsPerUser(3);
  const SessionView old = MustCreate("rotating", /*ttl=*/100);
  MustCreate("rotating");
  MustCreate("rotating");
  store_->AfterNextReadSessions([&] { clock_.Advance(absl::Seconds(90)); });
  ASSERT_TRUE(service_->Rotate(old.token, Deadline()).ok());
  const SessionKey old_key = *KeyForToken(old.token);
  absl::StatusOr<SessionLookup> ended = store_->Lookup(old_key, Deadline());
  ASSERT_TRUE(ended.ok()) << ended.status();
  ASSERT_TRUE(ended->record.has_value() && ended->record->session.deleted());
  EXPECT_EQ(ended->record->session.expires_at_unix_micros(),
            Micros(clock_.Now() + absl::Seconds(160)));
  EXPECT_EQ(store_->TtlOf(old_key.token_hash), absl::Seconds(160));
}

// Entries without a stored session count as creates under way for kAddUnderWay (1 s) only:
// sessions that expired and are gone (1 s sessions, 1.5 s later) leave room.
TEST_F(SessionServiceTest, ExpiredSessionsMissingFromTheStoreLeaveRoomUnderTheLimit) {
  LimitSessionsPerUser(3);
  MustCreate("churn", /*ttl=*/1);
  MustCreate("churn", /*ttl=*/1);
  MustCreate("churn", /*ttl=*/1);
  clock_.Advance(absl::Milliseconds(1500));  // Gone from the store, their entries still indexed.
  for (int i = 0; i < 3; ++i) MustCreate("churn");
  EXPECT_EQ(service_->Create("churn", 0, {}, Deadline()).status().code(),
            absl::StatusCode::kResourceExhausted);
}

// A login that lands between a revocation's new generation and its count is not revoked, so it
// is neither counted nor ended: it stays readable and listed.
TEST_F(SessionServiceTest, ALoginDuringARevocationIsNotCountedAndStaysLive) {
  MustCreate("alice");
  MustCreate("alice");
  std::optional<SessionView> during;
  store_->AfterNextAdvance([&] { during = MustCreate("alice"); });
  absl::StatusOr<int64_t> revoked = service_->Revoke("alice", Deadline());
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_EQ(*revoked, 2);
  ASSERT_TRUE(during.has_value());
  EXPECT_TRUE(Get(during->token).ok());
  absl::StatusOr<std::vector<storage::v1::StoredSession>> listed =
      service_->List("alice", Deadline());
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_THAT(Ids(*listed), UnorderedElementsAre(during->stored.session_id()));
}

// Revocation is a security action: it must not depend on counting the sessions it ends.
TEST_F(SessionServiceTest, RevokeEndsTheSessionsEvenWhenCountingThemFails) {
  SessionView a1 = MustCreate("alice");
  SessionView a2 = MustCreate("alice");
  store_->FailNextReadSessions(absl::DeadlineExceededError("fake store: too slow"));
  const absl::Status failed = service_->Revoke("alice", Deadline()).status();
  EXPECT_TRUE(absl::IsDeadlineExceeded(failed)) << failed;
  EXPECT_THAT(std::string(failed.message()), HasSubstr("every session was revoked"));
  EXPECT_TRUE(absl::IsNotFound(Get(a1.token).status()));
  EXPECT_TRUE(absl::IsNotFound(Get(a2.token).status()));
  SessionView a3 = MustCreate("alice");
  EXPECT_TRUE(Get(a3.token).ok());
  EXPECT_EQ(*service_->Revoke("alice", Deadline()), 1);
}

TEST_F(SessionServiceTest, RevokeEndsEveryLiveSessionAndLaterOnesWork) {
  SessionView a1 = MustCreate("alice");
  SessionView a2 = MustCreate("alice");
  SessionView b = MustCreate("bob");
  absl::StatusOr<int64_t> revoked = service_->Revoke("alice", Deadline());
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_EQ(*revoked, 2);
  EXPECT_TRUE(absl::IsNotFound(Get(a1.token).status()));
  EXPECT_TRUE(absl::IsNotFound(Get(a2.token).status()));
  EXPECT_TRUE(Get(b.token).ok());
  SessionView a3 = MustCreate("alice");
  EXPECT_TRUE(Get(a3.token).ok());
  EXPECT_THAT(Ids(*service_->List("alice", Deadline())),
              UnorderedElementsAre(a3.stored.session_id()));
  EXPECT_EQ(*service_->Revoke("alice", Deadline()), 1);
  EXPECT_EQ(*service_->Revoke("alice", Deadline()), 0);
  EXPECT_TRUE(absl::IsInvalidArgument(service_->Revoke("", Deadline()).status()));
}

// Listing, revoking and pruning read every session of a user, and a user may hold thousands of
// sessions of up to 64 KiB: they are read a batch at a time, not in one reply of hundreds of
// MiB, and what is decided per batch (dead entries dropped) adds up to the same answer.
TEST_F(SessionServiceTest, EverySessionOfAUserIsReadInBoundedBatches) {
  AttributeMap attrs;
  attrs["role"] = "robot";
  std::vector<SessionView> created;
  for (int i = 0; i < 150; ++i) created.push_back(MustCreate("service-account", 0, attrs));
  std::vector<std::string> live_ids;
  for (size_t i = 0; i < created.size(); ++i) {
    if (i % 7 == 0) {  // Dead entries in every batch, the first and the last of one included.
      ASSERT_TRUE(service_->Delete(created[i].token, Deadline()).ok());
    } else {
      live_ids.push_back(created[i].stored.session_id());
    }
  }
  clock_.Advance(absl::Seconds(31));  // Past the grace for entries of in-flight creates.

  absl::StatusOr<std::vector<storage::v1::StoredSession>> listed =
      service_->List("service-account", Deadline());
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_THAT(Ids(*listed), ::testing::UnorderedElementsAreArray(live_ids));
  ASSERT_FALSE(listed->empty());
  EXPECT_EQ(listed->front().attributes().at("role"), "robot") << "a listing shows attributes";
  EXPECT_EQ(store_->IndexSize(UserTag("service-account")), live_ids.size()) << "pruned";
  // With every live session listed, that means at least three reads.
  EXPECT_LE(store_->largest_read_sessions(), 64u);

  absl::StatusOr<int64_t> revoked = service_->Revoke("service-account", Deadline());
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_EQ(*revoked, static_cast<int64_t>(live_ids.size()));
  EXPECT_LE(store_->largest_read_sessions(), 64u);
  EXPECT_TRUE(absl::IsNotFound(Get(created[1].token).status()));
}

// A rotation whose ending compare-and-swap was applied but whose answer was lost (a timeout):
// the old token is already dead, so removing the new session would leave the caller with
// neither. It reads back that the old one ended in its favour and answers with the new token.
TEST_F(SessionServiceTest, RotateWhoseEndingAnswerWasLostKeepsTheNewSession) {
  SessionView v = MustCreate("alice");
  store_->LoseNextCasAnswer(absl::UnavailableError("memcached: timed out"));
  absl::StatusOr<SessionView> r = service_->Rotate(v.token, Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(Get(r->token).ok());
  EXPECT_TRUE(absl::IsNotFound(Get(v.token).status()));
}

// One whose ending write failed, when the copy it went to no longer answers: whether it was
// applied is unknown, so the new session is kept (never handed out, it expires) rather than
// removed, which would leave the caller with neither token if the write had landed.
TEST_F(SessionServiceTest, RotateWhoseEndingWriteIsUnknownKeepsTheNewSession) {
  SessionView v = MustCreate("alice");
  store_->FailNextCas(1, absl::UnavailableError("memcached: timed out"));
  store_->AnswerFromCopyAfterNextCas(1);
  EXPECT_TRUE(absl::IsUnavailable(service_->Rotate(v.token, Deadline()).status()));
  EXPECT_TRUE(Get(v.token).ok());
  absl::StatusOr<std::vector<storage::v1::StoredSession>> listed =
      service_->List("alice", Deadline());
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->size(), 2u) << "the new session was removed";
}

// ListUserSessions between a rotation's index write and its add must not drop the new session's
// entry for good: the entry keeps the old session's absolute expiry, so it looks old.
TEST_F(SessionServiceTest, ListingDuringARotationKeepsTheNewSessionIndexed) {
  SessionView v = MustCreate("alice");
  for (int i = 0; i < 3; ++i) {  // Kept alive, and older than any grace for a fresh one.
    clock_.Advance(kTtl / 2);
    ASSERT_TRUE(Get(v.token, /*touch=*/true).ok());
  }
  absl::StatusOr<SessionView> r = service_->Rotate(v.token, Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  const SessionKey key = *KeyForToken(r->token);
  // As if the add had not landed yet when ListUserSessions read the index.
  ASSERT_TRUE(store_->Remove(key, Deadline()).ok());
  absl::StatusOr<std::vector<storage::v1::StoredSession>> during =
      service_->List("alice", Deadline());
  ASSERT_TRUE(during.ok()) << during.status();
  EXPECT_TRUE(during->empty());
  ASSERT_TRUE(store_->Add(key, r->stored, kTtl, Deadline()).ok());
  absl::StatusOr<std::vector<storage::v1::StoredSession>> after =
      service_->List("alice", Deadline());
  ASSERT_TRUE(after.ok()) << after.status();
  ASSERT_EQ(after->size(), 1u) << "the rotated session's index entry was pruned";
  EXPECT_EQ((*after)[0].session_id(), r->stored.session_id());
  // Past the grace, an entry whose session never came is pruned.
  ASSERT_TRUE(store_->Remove(key, Deadline()).ok());
  clock_.Advance(absl::Seconds(31));
  ASSERT_TRUE(service_->List("alice", Deadline()).ok());
  ASSERT_TRUE(store_->Add(key, r->stored, kTtl, Deadline()).ok());
  after = service_->List("alice", Deadline());
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_TRUE(after->empty());
}

// Ending the old token is the one step of a rotation that cannot be undone. Started with too
// little of the deadline left, it would likely be cut off after some copies only, and the
// caller would hold neither token. The index write, of the same shape, tells how long that may
// take: with less of the deadline left than twice what it took (the add and the end are still
// to come), the rotation stops before it adds its new session.
// Server A's clock runs 30 s ahead of B's. A session that A's listing finds expired may still
// be touched through B, whose clock says it is live, and then lives on: its index entry must
// survive A's listing, or the live session would be missing from B's listings and revocations.
TEST_F(SessionServiceTest, AListingOnAServerWhoseClockRunsAheadKeepsTheEntryOfASessionStillLive) {
  FakeClock ahead(clock_.Now() + absl::Seconds(30));
  SessionServiceOptions options;
  options.default_ttl = kTtl;
  options.max_lifetime = kLifetime;
  SessionService server_a(store_, ahead, options);
  const SessionView v = MustCreate("alice", /*ttl=*/60);
  clock_.Advance(absl::Seconds(40));
  ahead.Advance(absl::Seconds(40));
  absl::StatusOr<std::vector<storage::v1::StoredSession>> on_a = server_a.List("alice", Deadline());
  ASSERT_TRUE(on_a.ok()) << on_a.status();
  EXPECT_TRUE(on_a->empty()) << "expired by A's clock, so not listed there";
  ASSERT_TRUE(Get(v.token, /*touch=*/true).ok()) << "live by B's clock";
  absl::StatusOr<std::vector<storage::v1::StoredSession>> on_b =
      service_->List("alice", Deadline());
  ASSERT_TRUE(on_b.ok()) << on_b.status();
  ASSERT_EQ(on_b->size(), 1u) << "A's listing dropped the live session from the index";
  EXPECT_EQ((*on_b)[0].session_id(), v.stored.session_id());
  // Once the margin has passed by A's clock too, the entry goes, as any ended session's.
  clock_.Advance(absl::Minutes(3));
  ahead.Advance(absl::Minutes(3));
  ASSERT_TRUE(server_a.List("alice", Deadline()).ok());
  EXPECT_EQ(store_->IndexSize(UserTag("alice")), 0u);
}

TEST_F(SessionServiceTest, RotateWithTooLittleOfItsDeadlineLeftChangesNothing) {
  SessionView v = MustCreate("alice");
  const int adds = store_->adds();
  store_->PauseNextIndexWrite(absl::Milliseconds(300));
  const absl::Status late =
      service_->Rotate(v.token, absl::Now() + absl::Milliseconds(500)).status();
  EXPECT_TRUE(absl::IsUnavailable(late)) << late;
  EXPECT_THAT(late.message(), HasSubstr("nothing was changed"));
  EXPECT_EQ(store_->adds(), adds) << "the new session was added before the refusal";
  EXPECT_TRUE(Get(v.token).ok()) << "the old token ended";
  EXPECT_EQ(store_->SessionCount(), 1) << "the new session was kept";
  absl::StatusOr<std::vector<storage::v1::StoredSession>> listed =
      service_->List("alice", Deadline());
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].session_id(), v.stored.session_id());

  // With most of the deadline left after the same steps, it goes ahead.
  store_->PauseNextIndexWrite(absl::Milliseconds(100));
  absl::StatusOr<SessionView> r = service_->Rotate(v.token, absl::Now() + absl::Seconds(10));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(absl::IsNotFound(Get(v.token).status()));
}

// The check weighs the index write, not a pruning before it: at the per-user limit every
// rotation prunes, reading all of the user's sessions, and a rotation is always allowed there.
// Counting that read as the write's time refused every rotation of a user with many sessions.
TEST_F(SessionServiceTest, RotateAtTheLimitIsNotRefusedForThePruningBeforeItsIndexWrite) {
  LimitSessionsPerUser(4);
  std::vector<SessionView> held;
  for (int i = 0; i < 4; ++i) held.push_back(MustCreate("service-account"));
  store_->PauseNextReadSessions(absl::Milliseconds(400));
  absl::StatusOr<SessionView> rotated =
      service_->Rotate(held[0].token, absl::Now() + absl::Seconds(1));
  ASSERT_TRUE(rotated.ok()) << rotated.status();
  EXPECT_TRUE(absl::IsNotFound(Get(held[0].token).status()));
  EXPECT_TRUE(Get(rotated->token).ok());
}

// Behind that check, a backstop: an add much slower than the index write leaves too little of
// the deadline too, and the new session, never handed out, is removed again. That removal has
// even less time; when the deadline cuts it off, the new session stays (listed until it
// expires), and the answer must not say that nothing was changed.
TEST_F(SessionServiceTest, RotateWhoseAddLeftTooLittleOfItsDeadlineSaysWhatItLeftBehind) {
  SessionView v = MustCreate("alice");
  // 400 ms of the deadline left after the add, less than it took, and ample for the removal.
  store_->PauseNextAdd(absl::Milliseconds(600));
  const absl::Status removed = service_->Rotate(v.token, absl::Now() + absl::Seconds(1)).status();
  EXPECT_TRUE(absl::IsUnavailable(removed)) << removed;
  EXPECT_THAT(removed.message(), HasSubstr("nothing was changed"));
  EXPECT_TRUE(Get(v.token).ok()) << "the old token ended";
  EXPECT_EQ(store_->SessionCount(), 1) << "the new session was kept";

  // 300 ms left after the add, and the removal takes 400 ms: the deadline cuts it off.
  store_->PauseNextAdd(absl::Milliseconds(700));
  store_->PauseNextRemove(absl::Milliseconds(400));
  const absl::Status kept = service_->Rotate(v.token, absl::Now() + absl::Seconds(1)).status();
  EXPECT_TRUE(absl::IsUnavailable(kept)) << kept;
  EXPECT_THAT(kept.message(), ::testing::Not(HasSubstr("nothing was changed")));
  EXPECT_THAT(kept.message(), HasSubstr("the old token still works"));
  EXPECT_THAT(kept.message(), HasSubstr("never handed out may be listed until it expires"));
  EXPECT_TRUE(Get(v.token).ok()) << "the old token ended";
  EXPECT_EQ(store_->SessionCount(), 2) << "the removal was not cut off";
  absl::StatusOr<std::vector<storage::v1::StoredSession>> listed =
      service_->List("alice", Deadline());
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->size(), 2u) << "the session left behind is not listed";
}

// A rotation that lost to a concurrent write of the old session removes its new one again; when
// a copy of that one did not answer the removal, it is listed until it expires, and the caller is
// told so rather than that nothing was changed.
TEST_F(SessionServiceTest, ARotationWhoseNewSessionWasNotRemovedEverywhereSaysSo) {
  SessionView v = MustCreate("alice");
  store_->FailNextCas(1);
  store_->PartlyFailNextRemove(absl::UnavailableError("memcached: 1 of 2 copies took the delete"));
  const absl::Status status = service_->Rotate(v.token, Deadline()).status();
  EXPECT_TRUE(absl::IsUnavailable(status)) << status;
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("it did not change the old token, and a session that was never handed "
                        "out may be listed until it expires; retry"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("1 of 2 copies took the delete"));
  EXPECT_TRUE(Get(v.token).ok());
  EXPECT_EQ(store_->cas_calls(), 1) << "no second try after a failed removal";
}

// The copy the compare-and-swap went to still holds the old session as it was read, so the
// end did not land: the new session, never handed out, is removed again, and the user's
// listing shows the old session alone.
TEST_F(SessionServiceTest, RotateWhoseEndingWriteFailedKeepsTheOldSession) {
  SessionView v = MustCreate("alice");
  store_->FailNextCas(1, absl::UnavailableError("memcached: timed out"));
  EXPECT_TRUE(absl::IsUnavailable(service_->Rotate(v.token, Deadline()).status()));
  EXPECT_TRUE(Get(v.token).ok());
  EXPECT_EQ(store_->SessionCount(), 1) << "the new session, never handed out, was kept";
  absl::StatusOr<std::vector<storage::v1::StoredSession>> listed =
      service_->List("alice", Deadline());
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].session_id(), v.stored.session_id());

  absl::StatusOr<SessionView> r = service_->Rotate(v.token, Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(Get(r->token).ok());
  listed = service_->List("alice", Deadline());
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].session_id(), r->stored.session_id());
}

// An end (deletion, rotation, revocation) that reached some copies only must not answer OK: a
// node that restarted empty could otherwise bring the session back from a copy that missed it.
// The caller is told to retry, and the retry writes the end to every copy again.
TEST_F(SessionServiceTest, ADeletionThatReachedSomeCopiesIsUnavailableAndItsRetryWritesAgain) {
  SessionView v = MustCreate("alice");
  store_->PartlyFailNextPuts(2, absl::UnavailableError("memcached: 1 of 2 copies took the write"));
  const absl::Status first = service_->Delete(v.token, Deadline());
  EXPECT_TRUE(absl::IsUnavailable(first)) << first;
  EXPECT_THAT(first.message(), HasSubstr("token: ended on some copies only"));
  EXPECT_THAT(first.message(), HasSubstr("1 of 2 copies"));
  EXPECT_TRUE(absl::IsNotFound(Get(v.token).status())) << "the end holds where it landed";
  // The retry finds the tombstone but writes it again, to every copy.
  const int puts = store_->puts();
  EXPECT_TRUE(absl::IsUnavailable(service_->Delete(v.token, Deadline())));
  EXPECT_EQ(store_->puts(), puts + 1);
  EXPECT_TRUE(service_->Delete(v.token, Deadline()).ok());
  EXPECT_EQ(store_->puts(), puts + 2);
}

// A rotation whose end of the old token reached some copies only does not hand out its new
// token, and does not put the old one back either: a DeleteSession may have ended it meanwhile.
TEST_F(SessionServiceTest, ARotationThatReachedSomeCopiesEndsTheOldTokenAndGivesNoNewOne) {
  SessionView v = MustCreate("alice");
  store_->PartlyFailNextPuts(1, absl::UnavailableError("memcached: 1 of 2 copies took the write"));
  const absl::StatusOr<SessionView> failed = service_->Rotate(v.token, Deadline());
  ASSERT_TRUE(absl::IsUnavailable(failed.status())) << failed.status();
  EXPECT_THAT(failed.status().message(), HasSubstr("token: the rotation could not reach every"));
  EXPECT_THAT(failed.status().message(), HasSubstr("create a new session"));
  EXPECT_TRUE(absl::IsNotFound(Get(v.token).status()));
  EXPECT_EQ(store_->SessionCount(), 1) << "the new session, never handed out, is removed";
}

// A rotation whose compare-and-swap ended the old token on every copy is done: writing the end
// again could only fail (say, its deadline just passed) and then take the new token away too,
// leaving the caller with neither.
TEST_F(SessionServiceTest, ARotationThatEndedTheOldTokenEverywhereSucceeds) {
  SessionView v = MustCreate("alice");
  store_->FailNextPuts(1, absl::UnavailableError("memcached: deadline passed"));
  const absl::StatusOr<SessionView> rotated = service_->Rotate(v.token, Deadline());
  ASSERT_TRUE(rotated.ok()) << rotated.status();
  EXPECT_TRUE(Get(rotated->token).ok());
  EXPECT_TRUE(absl::IsNotFound(Get(v.token).status()));
}

// With a copy that does not answer, an end could not reach every copy: a rotation does not
// start, and a deletion that finds nothing cannot tell the silent copy holds nothing.
TEST_F(SessionServiceTest, EndsWithASilentCopyChangeNothingAndAskForARetry) {
  SessionView v = MustCreate("alice");
  store_->set_some_copies_silent(true);
  const absl::StatusOr<SessionView> rotated = service_->Rotate(v.token, Deadline());
  ASSERT_TRUE(absl::IsUnavailable(rotated.status())) << rotated.status();
  EXPECT_THAT(rotated.status().message(), HasSubstr("nothing was changed"));
  EXPECT_TRUE(Get(v.token).ok());
  EXPECT_EQ(store_->SessionCount(), 1);
  // A token whose session none of the answering copies holds.
  store_->set_some_copies_silent(false);
  const std::string elsewhere = MustCreate("bob").token;
  ASSERT_TRUE(store_->Remove(*KeyForToken(elsewhere), Deadline()).ok());
  EXPECT_TRUE(service_->Delete(elsewhere, Deadline()).ok()) << "every copy answered: gone";
  store_->set_some_copies_silent(true);
  const absl::Status unsure = service_->Delete(elsewhere, Deadline());
  EXPECT_TRUE(absl::IsUnavailable(unsure)) << unsure;
  EXPECT_THAT(unsure.message(), HasSubstr("token: a copy of the session did not answer"));
  // An outage is not relabelled as an end that landed somewhere.
  store_->set_some_copies_silent(false);
  store_->set_unavailable(true);
  const absl::Status down = service_->Delete(v.token, Deadline());
  EXPECT_TRUE(absl::IsUnavailable(down)) << down;
  EXPECT_THAT(down.message(), ::testing::Not(HasSubstr("ended on some copies")));
}

TEST_F(SessionServiceTest, ARevocationThatReachedSomeCopiesIsUnavailableButHolds) {
  SessionView v = MustCreate("alice");
  store_->PartlyFailNextAdvance(absl::UnavailableError("memcached: 1 of 2 copies took it"));
  const absl::StatusOr<int64_t> first = service_->Revoke("alice", Deadline());
  ASSERT_TRUE(absl::IsUnavailable(first.status())) << first.status();
  EXPECT_THAT(first.status().message(), HasSubstr("user_id: ended on some copies only"));
  EXPECT_TRUE(absl::IsNotFound(Get(v.token).status()));
  EXPECT_TRUE(service_->Revoke("alice", Deadline()).ok());
}

TEST_F(SessionServiceTest, RevocationHoldsEvenIfTheSessionValueSurvives) {
  SessionView a = MustCreate("alice");
  const std::string hash = KeyForToken(a.token)->token_hash;
  // Revoke with a store that lost the tombstone (simulated by putting the value back
  // afterwards): the generation alone must end it.
  absl::StatusOr<SessionView> before = Get(a.token);
  ASSERT_TRUE(service_->Revoke("alice", Deadline()).ok());
  ASSERT_TRUE(
      store_->Put(*KeyForToken(a.token), before->stored, absl::Seconds(60), Deadline()).ok());
  EXPECT_TRUE(store_->HasRaw(hash));
  EXPECT_TRUE(absl::IsNotFound(Get(a.token).status()));
}

// memcached may evict the small generation item while the user's sessions live on. The next
// revocation must not hand out a generation that sessions already carry (one above "none" is
// the first revocation's generation again), or it would leave them live.
TEST_F(SessionServiceTest, ARevocationAfterTheGenerationWasEvictedEndsEverySession) {
  MustCreate("alice");
  ASSERT_EQ(*service_->Revoke("alice", Deadline()), 1);
  SessionView after_first = MustCreate("alice");
  store_->ForgetGeneration(UserTag("alice"));
  clock_.Advance(absl::Seconds(1));
  EXPECT_EQ(*service_->Revoke("alice", Deadline()), 1);
  EXPECT_TRUE(absl::IsNotFound(Get(after_first.token).status()));
  EXPECT_TRUE(Get(MustCreate("alice").token).ok());
}

// Two revocations of one user that overlap count each session once: the later one counts from
// the generation the earlier one set, not from what it read before either advanced.
TEST_F(SessionServiceTest, OverlappingRevocationsCountEachSessionOnce) {
  MustCreate("alice");
  MustCreate("alice");
  // Tombstones lost on their way leave the sessions for the second count to find: only the
  // generations tell which revocation ended them.
  store_->set_ends_lost(true);
  absl::StatusOr<int64_t> overtaking = absl::UnknownError("not run");
  store_->BeforeNextAdvance([&] { overtaking = service_->Revoke("alice", Deadline()); });
  absl::StatusOr<int64_t> overtaken = service_->Revoke("alice", Deadline());
  ASSERT_TRUE(overtaking.ok()) << overtaking.status();
  ASSERT_TRUE(overtaken.ok()) << overtaken.status();
  EXPECT_EQ(*overtaking, 2);
  EXPECT_EQ(*overtaken, 0);
}

// The generation alone does not keep a revoked session ended: memcached may evict it while the
// sessions live on. A revocation that could not give every session its tombstone asks for a
// retry, and the retry ends them, even after another call pruned the user's index meanwhile.
TEST_F(SessionServiceTest, ARevocationThatCouldNotEndEverySessionIsFinishedByItsRetry) {
  const std::string first = MustCreate("alice").token;
  const std::string second = MustCreate("alice").token;
  store_->FailNextPuts(1, absl::UnavailableError("memcached: no answer"));
  const absl::StatusOr<int64_t> failed = service_->Revoke("alice", Deadline());
  ASSERT_TRUE(absl::IsUnavailable(failed.status())) << failed.status();
  EXPECT_THAT(failed.status().message(),
              HasSubstr("user_id: every session was revoked, but 1 could not be ended"));
  EXPECT_TRUE(absl::IsNotFound(Get(first).status())) << "the generation holds meanwhile";
  EXPECT_TRUE(absl::IsNotFound(Get(second).status()));
  ASSERT_TRUE(service_->List("alice", Deadline()).ok());  // prunes the index
  const absl::StatusOr<int64_t> retried = service_->Revoke("alice", Deadline());
  ASSERT_TRUE(retried.ok()) << retried.status();
  EXPECT_EQ(*retried, 0) << "the first revocation counted them";
  store_->ForgetGeneration(UserTag("alice"));
  EXPECT_TRUE(absl::IsNotFound(Get(first).status()));
  EXPECT_TRUE(absl::IsNotFound(Get(second).status()));
}

// The same when reading the sessions failed, so that no session got its tombstone.
TEST_F(SessionServiceTest, ARevocationThatCouldNotReadTheSessionsIsFinishedByItsRetry) {
  const std::string token = MustCreate("alice").token;
  store_->FailNextReadSessions(absl::UnavailableError("memcached: no answer"));
  const absl::StatusOr<int64_t> failed = service_->Revoke("alice", Deadline());
  ASSERT_TRUE(absl::IsUnavailable(failed.status())) << failed.status();
  EXPECT_THAT(failed.status().message(), HasSubstr("retry to finish"));
  EXPECT_TRUE(absl::IsNotFound(Get(token).status()));
  ASSERT_TRUE(service_->Revoke("alice", Deadline()).ok());
  store_->ForgetGeneration(UserTag("alice"));
  EXPECT_TRUE(absl::IsNotFound(Get(token).status()));
}

// A revocation that failed and is never retried: the next listing (or a create's pruning) that
// meets its sessions writes their tombstones, and drops their entries once they are in. Neither
// an eviction of the generation nor an index that keeps every such entry until it expires.
TEST_F(SessionServiceTest, AListingEndsRevokedSessionsThatHaveNoTombstoneYet) {
  const std::string token = MustCreate("alice").token;
  store_->FailNextReadSessions(absl::UnavailableError("memcached: no answer"));
  ASSERT_TRUE(absl::IsUnavailable(service_->Revoke("alice", Deadline()).status()));
  const auto indexed = [&] {
    absl::StatusOr<IndexRecord> index = store_->ReadIndex(UserTag("alice"), Deadline());
    return index.ok() ? index->index.entries_size() : -1;
  };
  store_->FailNextPuts(1, absl::UnavailableError("memcached: no answer"));
  absl::StatusOr<std::vector<storage::v1::StoredSession>> listed =
      service_->List("alice", Deadline());
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_TRUE(listed->empty());
  EXPECT_EQ(indexed(), 1) << "kept until its tombstone is in";
  ASSERT_TRUE(service_->List("alice", Deadline()).ok());
  EXPECT_EQ(indexed(), 0);
  store_->ForgetGeneration(UserTag("alice"));
  EXPECT_TRUE(absl::IsNotFound(Get(token).status()));
}

// The tombstones a listing writes are a round trip each, so one call writes at most 64 of them,
// and none more after one failed (a copy is down); the next call goes on.
TEST_F(SessionServiceTest, AListingWritesAFewTombstonesPerCallAndStopsAtAFailure) {
  for (int i = 0; i < 70; ++i) MustCreate("alice");
  store_->FailNextReadSessions(absl::UnavailableError("memcached: no answer"));
  ASSERT_TRUE(absl::IsUnavailable(service_->Revoke("alice", Deadline()).status()));
  const auto indexed = [&] {
    absl::StatusOr<IndexRecord> index = store_->ReadIndex(UserTag("alice"), Deadline());
    return index.ok() ? index->index.entries_size() : -1;
  };
  ASSERT_EQ(indexed(), 70);
  store_->FailNextPuts(1, absl::UnavailableError("memcached: no answer"));
  const int puts = store_->puts();
  ASSERT_TRUE(service_->List("alice", Deadline()).ok());
  EXPECT_EQ(store_->puts(), puts) << "none after the first failed";
  EXPECT_EQ(indexed(), 70);
  ASSERT_TRUE(service_->List("alice", Deadline()).ok());
  EXPECT_EQ(store_->puts(), puts + 64);
  EXPECT_EQ(indexed(), 6);
  ASSERT_TRUE(service_->List("alice", Deadline()).ok());
  EXPECT_EQ(indexed(), 0);
}

TEST_F(SessionServiceTest, StoreOutageIsUnavailableEverywhere) {
  SessionView v = MustCreate("alice");
  store_->set_unavailable(true);
  AttributeMap set;
  set["k"] = "v";
  EXPECT_TRUE(absl::IsUnavailable(service_->Create("alice", 0, {}, Deadline()).status()));
  EXPECT_TRUE(absl::IsUnavailable(Get(v.token).status()));
  EXPECT_TRUE(absl::IsUnavailable(Update(v.token, set).status()));
  EXPECT_TRUE(absl::IsUnavailable(service_->Rotate(v.token, Deadline()).status()));
  EXPECT_TRUE(absl::IsUnavailable(service_->Delete(v.token, Deadline())));
  EXPECT_TRUE(absl::IsUnavailable(service_->List("alice", Deadline()).status()));
  EXPECT_TRUE(absl::IsUnavailable(service_->Revoke("alice", Deadline()).status()));
  store_->set_unavailable(false);
  EXPECT_TRUE(Get(v.token).ok());
}

TEST_F(SessionServiceTest, AuthenticatorResolvesUserWithoutTouching) {
  SessionTokenAuthenticator auth(service_);
  SessionView v = MustCreate("alice");
  clock_.Advance(absl::Seconds(30));
  absl::StatusOr<std::string> user = auth.UserIdForToken(v.token, Deadline());
  ASSERT_TRUE(user.ok()) << user.status();
  EXPECT_EQ(*user, "alice");
  EXPECT_EQ(store_->peeks(), 1);  // The read-only path, no repair work.
  EXPECT_EQ(Get(v.token)->stored.expires_at_unix_micros(), v.stored.expires_at_unix_micros());
  EXPECT_TRUE(absl::IsUnauthenticated(auth.UserIdForToken("", Deadline()).status()));
  EXPECT_TRUE(absl::IsUnauthenticated(auth.UserIdForToken("junk", Deadline()).status()));
  EXPECT_TRUE(absl::IsUnauthenticated(auth.UserIdForToken(*NewToken("x"), Deadline()).status()));
  clock_.Advance(absl::Seconds(30));
  EXPECT_TRUE(absl::IsUnauthenticated(auth.UserIdForToken(v.token, Deadline()).status()));
  SessionView w = MustCreate("alice");
  store_->set_unavailable(true);
  EXPECT_TRUE(absl::IsUnavailable(auth.UserIdForToken(w.token, Deadline()).status()));
  // A store fault of another kind is still the store's, not the token's: a client told
  // UNAUTHENTICATED would give up a good session.
  store_->set_failure(absl::InternalError("memcached: unexpected reply"));
  EXPECT_TRUE(absl::IsUnavailable(auth.UserIdForToken(w.token, Deadline()).status()));
}

TEST_F(SessionServiceTest, ATokenNamingAnotherUsersTagIsRejected) {
  // A value stored under one key but carrying another user's identity is never served.
  SessionView v = MustCreate("alice");
  SessionKey key = *KeyForToken(v.token);
  absl::StatusOr<SessionView> stored = Get(v.token);
  storage::v1::StoredSession forged = stored->stored;
  forged.set_user_id("mallory");
  ASSERT_TRUE(store_->Put(key, forged, absl::Seconds(60), Deadline()).ok());
  EXPECT_TRUE(absl::IsNotFound(Get(v.token).status()));
}

// A stored session's idle timeout comes from Memcached like the rest of it: a corrupt or forged
// one of any size is touched without overflowing (UBSan in the sanitized run), and, as the
// session's own expiry is its own, without harm beyond the session it names.
TEST_F(SessionServiceTest, AnEnormousStoredIdleTimeoutIsTouchedWithoutOverflow) {
  SessionView v = MustCreate("alice");
  SessionKey key = *KeyForToken(v.token);
  storage::v1::StoredSession forged = v.stored;
  forged.set_ttl_seconds(std::numeric_limits<int64_t>::max());
  ASSERT_TRUE(store_->Put(key, forged, absl::Seconds(60), Deadline()).ok());
  clock_.Advance(absl::Seconds(5));
  absl::StatusOr<SessionView> touched = Get(v.token, /*touch=*/true);
  ASSERT_TRUE(touched.ok()) << touched.status();
  EXPECT_EQ(touched->stored.expires_at_unix_micros(), forged.absolute_expires_at_unix_micros());
}

// ---------------------------------------------------------------------------------------------
// CreateAsync, GetAsync and UpdateAsync

// Store calls a test can observe and answer; the asynchronous steps of CreateSession,
// GetSession and UpdateSession are told apart from the blocking calls of the retry paths.
enum class Op {
  kReadUserStateAsync,
  kWriteIndexAsync,
  kAddAsync,
  kLookupAsync,
  kCompareAndSwapAsync,
  kReadUserState,
  kLookup,
  kCompareAndSwap,
  kReadGeneration,
  kReadIndex,
  kWriteIndex,
  kAdd,
  kReadSessions,
  kOther,
};

// A SessionStore that delegates to a FakeSessionStore, records every call and the thread it ran
// on, and lets a test answer any call itself. The asynchronous forms answer on the calling
// thread, or, given an `io` executor, on its thread after copying their arguments (like a store
// with non-blocking I/O answering from its event loop). Thread-safe; set the injection before
// the calls it is meant for.
class RecordingStore final : public SessionStore {
 public:
  // Runs before every call, outside any lock (it may call the service). A non-OK status is the
  // call's answer; OK lets the call through to the fake.
  using Inject = std::function<absl::Status(Op)>;

  RecordingStore(std::shared_ptr<testing::FakeSessionStore> fake, BlockingExecutor* io)
      : fake_(std::move(fake)), io_(io) {}

  void set_inject(Inject inject) {
    std::lock_guard<std::mutex> l(mu_);
    inject_ = std::make_shared<Inject>(std::move(inject));
  }
  // Injects `action`'s answer into the first call of `op` only; the result says whether that
  // call came.
  std::shared_ptr<const std::atomic<bool>> InjectOnce(Op op, std::function<absl::Status()> action) {
    auto fired = std::make_shared<std::atomic<bool>>(false);
    set_inject([op, action = std::move(action), fired](Op called) {
      if (called != op || fired->exchange(true)) return absl::OkStatus();
      return action();
    });
    return fired;
  }
  int Count(Op op) const {
    std::lock_guard<std::mutex> l(mu_);
    return static_cast<int>(
        std::count_if(calls_.begin(), calls_.end(), [op](const Call& c) { return c.op == op; }));
  }
  int total() const {
    std::lock_guard<std::mutex> l(mu_);
    return static_cast<int>(calls_.size());
  }
  std::set<std::thread::id> Threads(Op op) const {
    std::lock_guard<std::mutex> l(mu_);
    std::set<std::thread::id> threads;
    for (const Call& c : calls_) {
      if (c.op == op) threads.insert(c.thread);
    }
    return threads;
  }

  void ReadUserStateAsync(absl::string_view user_tag, absl::Duration keep_generation_for,
                          absl::Time deadline, UserStateCallback done) override {
    Answer([this, tag = std::string(user_tag), keep_generation_for, deadline,
            done = std::move(done)]() mutable {
      if (absl::Status s = Record(Op::kReadUserStateAsync); !s.ok()) {
        std::move(done)(s);
        return;
      }
      std::move(done)(fake_->ReadUserState(tag, keep_generation_for, deadline));
    });
  }
  void WriteIndexAsync(absl::string_view user_tag, const std::optional<CasToken>& cas,
                       const storage::v1::UserSessionIndex& index, absl::Duration ttl,
                       absl::Time deadline, StatusCallback done) override {
    Answer([this, tag = std::string(user_tag), cas, index, ttl, deadline,
            done = std::move(done)]() mutable {
      if (absl::Status s = Record(Op::kWriteIndexAsync); !s.ok()) {
        std::move(done)(s);
        return;
      }
      std::move(done)(fake_->WriteIndex(tag, cas, index, ttl, deadline));
    });
  }
  void AddAsync(const SessionKey& key, const storage::v1::StoredSession& session,
                absl::Duration ttl, absl::Time deadline, StatusCallback done) override {
    Answer([this, key, session, ttl, deadline, done = std::move(done)]() mutable {
      if (absl::Status s = Record(Op::kAddAsync); !s.ok()) {
        std::move(done)(s);
        return;
      }
      std::move(done)(fake_->Add(key, session, ttl, deadline));
    });
  }
  void LookupAsync(const SessionKey& key, absl::Time deadline, LookupCallback done) override {
    Answer([this, key, deadline, done = std::move(done)]() mutable {
      if (absl::Status s = Record(Op::kLookupAsync); !s.ok()) {
        std::move(done)(s);
        return;
      }
      std::move(done)(fake_->Lookup(key, deadline));
    });
  }
  void CompareAndSwapAsync(const SessionKey& key, const CasToken& cas,
                           const storage::v1::StoredSession& session, absl::Duration ttl,
                           absl::Time deadline, StatusCallback done) override {
    Answer([this, key, cas, session, ttl, deadline, done = std::move(done)]() mutable {
      if (absl::Status s = Record(Op::kCompareAndSwapAsync); !s.ok()) {
        std::move(done)(s);
        return;
      }
      std::move(done)(fake_->CompareAndSwap(key, cas, session, ttl, deadline));
    });
  }

  absl::StatusOr<SessionLookup> Lookup(const SessionKey& key, absl::Time deadline) override {
    SL_RETURN_IF_ERROR(Record(Op::kLookup));
    return fake_->Lookup(key, deadline);
  }
  absl::StatusOr<SessionLookup> Peek(const SessionKey& key, absl::Time deadline) override {
    SL_RETURN_IF_ERROR(Record(Op::kOther));
    return fake_->Peek(key, deadline);
  }
  absl::Status Add(const SessionKey& key, const storage::v1::StoredSession& session,
                   absl::Duration ttl, absl::Time deadline) override {
    SL_RETURN_IF_ERROR(Record(Op::kAdd));
    return fake_->Add(key, session, ttl, deadline);
  }
  absl::Status CompareAndSwap(const SessionKey& key, const CasToken& cas,
                              const storage::v1::StoredSession& session, absl::Duration ttl,
                              absl::Time deadline) override {
    SL_RETURN_IF_ERROR(Record(Op::kCompareAndSwap));
    return fake_->CompareAndSwap(key, cas, session, ttl, deadline);
  }
  absl::Status CompareAndSwapEveryCopy(const SessionKey& key, const CasToken& cas,
                                       const storage::v1::StoredSession& session,
                                       absl::Duration ttl, absl::Time deadline) override {
    SL_RETURN_IF_ERROR(Record(Op::kCompareAndSwap));
    return fake_->CompareAndSwapEveryCopy(key, cas, session, ttl, deadline);
  }
  absl::Status Put(const SessionKey& key, const storage::v1::StoredSession& session,
                   absl::Duration ttl, absl::Time deadline) override {
    SL_RETURN_IF_ERROR(Record(Op::kOther));
    return fake_->Put(key, session, ttl, deadline);
  }
  absl::Status Remove(const SessionKey& key, absl::Time deadline) override {
    SL_RETURN_IF_ERROR(Record(Op::kOther));
    return fake_->Remove(key, deadline);
  }
  absl::StatusOr<uint64_t> ReadGeneration(absl::string_view user_tag, absl::Duration keep_for,
                                          absl::Time deadline) override {
    SL_RETURN_IF_ERROR(Record(Op::kReadGeneration));
    return fake_->ReadGeneration(user_tag, keep_for, deadline);
  }
  absl::StatusOr<GenerationAdvance> AdvanceGeneration(absl::string_view user_tag, uint64_t at_least,
                                                      absl::Duration keep_for,
                                                      absl::Time deadline) override {
    SL_RETURN_IF_ERROR(Record(Op::kOther));
    return fake_->AdvanceGeneration(user_tag, at_least, keep_for, deadline);
  }
  absl::StatusOr<IndexRecord> ReadIndex(absl::string_view user_tag, absl::Time deadline) override {
    SL_RETURN_IF_ERROR(Record(Op::kReadIndex));
    return fake_->ReadIndex(user_tag, deadline);
  }
  absl::Status WriteIndex(absl::string_view user_tag, const std::optional<CasToken>& cas,
                          const storage::v1::UserSessionIndex& index, absl::Duration ttl,
                          absl::Time deadline) override {
    SL_RETURN_IF_ERROR(Record(Op::kWriteIndex));
    return fake_->WriteIndex(user_tag, cas, index, ttl, deadline);
  }
  absl::StatusOr<UserState> ReadUserState(absl::string_view user_tag,
                                          absl::Duration keep_generation_for,
                                          absl::Time deadline) override {
    SL_RETURN_IF_ERROR(Record(Op::kReadUserState));
    return fake_->ReadUserState(user_tag, keep_generation_for, deadline);
  }
  absl::StatusOr<std::vector<std::optional<storage::v1::StoredSession>>> ReadSessions(
      absl::string_view user_tag, const std::vector<std::string>& token_hashes,
      absl::Time deadline) override {
    SL_RETURN_IF_ERROR(Record(Op::kReadSessions));
    return fake_->ReadSessions(user_tag, token_hashes, deadline);
  }

 private:
  struct Call {
    Op op;
    std::thread::id thread;
  };

  absl::Status Record(Op op) {
    std::shared_ptr<Inject> inject;
    {
      std::lock_guard<std::mutex> l(mu_);
      calls_.push_back({op, std::this_thread::get_id()});
      inject = inject_;
    }
    return inject != nullptr && *inject ? (*inject)(op) : absl::OkStatus();
  }
  void Answer(absl::AnyInvocable<void() &&> work) {
    if (io_ == nullptr) {
      std::move(work)();
    } else {
      io_->Run(std::move(work));
    }
  }

  const std::shared_ptr<testing::FakeSessionStore> fake_;
  BlockingExecutor* const io_;
  mutable std::mutex mu_;
  std::vector<Call> calls_;         // Guarded by mu_.
  std::shared_ptr<Inject> inject_;  // Guarded by mu_.
};

// The answers of one asynchronous call, for a test to wait on. Thread-safe.
class AsyncAnswer {
 public:
  SessionService::ViewCallback Callback() {
    return [this](absl::StatusOr<SessionView> view) {
      std::lock_guard<std::mutex> l(mu_);
      if (++calls_ == 1) {
        view_ = std::move(view);
        thread_ = std::this_thread::get_id();
      }
      answered_.notify_all();
    };
  }
  // The first answer; DEADLINE_EXCEEDED when none came (the call lost its callback).
  absl::StatusOr<SessionView> Wait() {
    std::unique_lock<std::mutex> l(mu_);
    if (!answered_.wait_for(l, std::chrono::seconds(10), [this] { return calls_ > 0; })) {
      return absl::DeadlineExceededError("test: the call did not answer within 10 s");
    }
    return view_;
  }
  int calls() const {
    std::lock_guard<std::mutex> l(mu_);
    return calls_;
  }
  std::thread::id thread() const {
    std::lock_guard<std::mutex> l(mu_);
    return thread_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable answered_;
  int calls_ = 0;
  absl::StatusOr<SessionView> view_ = absl::UnknownError("test: no answer");
  std::thread::id thread_;
};

std::thread::id ThreadOf(BlockingExecutor& executor) {
  std::promise<std::thread::id> id;
  std::future<std::thread::id> got = id.get_future();
  executor.Run([&id] { id.set_value(std::this_thread::get_id()); });
  return got.get();
}

struct AsyncMode {
  bool executor;   // SessionServiceOptions::blocking is a BlockingExecutor (else null).
  bool io_thread;  // The store answers the asynchronous calls on its own thread.
};

void PrintTo(const AsyncMode& mode, std::ostream* os) {
  *os << (mode.executor ? "blocking executor" : "no blocking executor") << ", store answers on "
      << (mode.io_thread ? "its I/O thread" : "the calling thread");
}

constexpr AsyncMode kAsyncModes[] = {{false, false}, {true, false}, {false, true}, {true, true}};

std::string AsyncModeName(const ::testing::TestParamInfo<AsyncMode>& info) {
  return std::string(info.param.executor ? "Executor" : "Inline") +
         (info.param.io_thread ? "IoThread" : "CallerThread");
}

// The asynchronous calls of a SessionService over a RecordingStore, in every combination of
// where the store answers and where the blocking path runs. Every test must see each of its
// calls answered exactly once.
class AsyncServiceTest : public ::testing::TestWithParam<AsyncMode> {
 protected:
  AsyncServiceTest() {
    fake_ = std::make_shared<testing::FakeSessionStore>(clock_);
    if (GetParam().io_thread) {
      io_ = std::make_unique<BlockingExecutor>(1);
      io_thread_ = ThreadOf(*io_);
    }
    store_ = std::make_shared<RecordingStore>(fake_, io_.get());
    options_.default_ttl = kTtl;
    options_.max_lifetime = kLifetime;
    // Runs on several threads at once, so it keeps no state.
    options_.sleep = [](absl::Duration) {};
    Restart(1);
  }

  void TearDown() override {
    // Runs what is still queued (the service outlives it), then joins.
    io_.reset();
    blocking_.reset();
    std::lock_guard<std::mutex> l(answers_mu_);
    for (size_t i = 0; i < answers_.size(); ++i) {
      EXPECT_EQ(answers_[i]->calls(), 1)
          << "asynchronous call #" << i << " must answer exactly once";
    }
  }

  // A new service with `options_` and, in executor mode, a blocking executor of `threads`.
  void Restart(int threads) {
    blocking_.reset();
    if (GetParam().executor) {
      blocking_ = std::make_unique<BlockingExecutor>(threads);
      blocking_thread_ = threads == 1 ? ThreadOf(*blocking_) : std::thread::id();
    }
    SessionServiceOptions options = options_;
    options.blocking = blocking_.get();
    service_ = std::make_shared<SessionService>(store_, clock_, options);
  }

  absl::Time Deadline() const { return absl::Now() + absl::Seconds(10); }

  // A fresh answer for one asynchronous call; TearDown checks it was answered exactly once.
  AsyncAnswer& NewAnswer() {
    std::lock_guard<std::mutex> l(answers_mu_);
    answers_.push_back(std::make_unique<AsyncAnswer>());
    return *answers_.back();
  }

  SessionView MustCreate(const std::string& user, int64_t ttl = 0, const AttributeMap& attrs = {}) {
    absl::StatusOr<SessionView> v = service_->Create(user, ttl, attrs, Deadline());
    EXPECT_TRUE(v.ok()) << v.status();
    return v.ok() ? *v : SessionView{};
  }
  std::vector<std::string> ListedIds(const std::string& user) {
    absl::StatusOr<std::vector<storage::v1::StoredSession>> listed =
        service_->List(user, Deadline());
    EXPECT_TRUE(listed.ok()) << listed.status();
    return listed.ok() ? Ids(*listed) : std::vector<std::string>{};
  }

  // Where the store's answers run, and where the blocking path must run.
  std::thread::id StoreThread() const {
    return GetParam().io_thread ? io_thread_ : std::this_thread::get_id();
  }
  std::thread::id FinisherThread() const {
    return GetParam().executor ? blocking_thread_ : StoreThread();
  }

  FakeClock clock_;
  std::shared_ptr<testing::FakeSessionStore> fake_;
  std::unique_ptr<BlockingExecutor> io_;
  std::thread::id io_thread_;
  std::shared_ptr<RecordingStore> store_;
  SessionServiceOptions options_;
  std::unique_ptr<BlockingExecutor> blocking_;
  std::thread::id blocking_thread_;
  std::shared_ptr<SessionService> service_;
  std::mutex answers_mu_;
  std::vector<std::unique_ptr<AsyncAnswer>> answers_;  // Guarded by answers_mu_.
};

class CreateAsyncTest : public AsyncServiceTest {
 protected:
  AsyncAnswer& Start(const std::string& user, int64_t ttl = 0, const AttributeMap& attrs = {}) {
    AsyncAnswer& answer = NewAnswer();
    service_->CreateAsync(user, ttl, attrs, Deadline(), answer.Callback());
    return answer;
  }
  absl::StatusOr<SessionView> CreateAsync(const std::string& user, int64_t ttl = 0,
                                          const AttributeMap& attrs = {}) {
    return Start(user, ttl, attrs).Wait();
  }
};

INSTANTIATE_TEST_SUITE_P(Modes, CreateAsyncTest, ::testing::ValuesIn(kAsyncModes), AsyncModeName);

TEST_P(CreateAsyncTest, TheAddEndsWithinHalfTheGraceOfListings) {
  const absl::Time indexed_at = clock_.Now();
  AsyncAnswer& answer = NewAnswer();
  service_->CreateAsync("alice", 0, {}, indexed_at + absl::Minutes(5), answer.Callback());
  ASSERT_TRUE(answer.Wait().ok());
  EXPECT_EQ(fake_->last_add_deadline(), indexed_at + absl::Seconds(15));
}

TEST_P(CreateAsyncTest, AnswersWhatCreateWouldAndTheSessionIsReadableAndListed) {
  const absl::Time now = clock_.Now();
  AttributeMap attrs;
  attrs["role"] = "admin";
  attrs["lang"] = "de";
  AsyncAnswer& answer = Start("alice", 0, attrs);
  absl::StatusOr<SessionView> v = answer.Wait();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(answer.thread(), StoreThread());
  // The common case is asynchronous throughout: no blocking store call, no executor.
  EXPECT_EQ(store_->Count(Op::kReadUserStateAsync), 1);
  EXPECT_EQ(store_->Count(Op::kWriteIndexAsync), 1);
  EXPECT_EQ(store_->Count(Op::kAddAsync), 1);
  EXPECT_EQ(store_->total(), 3);

  EXPECT_EQ(v->token.size(), kTokenLength);
  const SessionKey key = *KeyForToken(v->token);
  EXPECT_EQ(key.user_tag, UserTag("alice"));
  const storage::v1::StoredSession& s = v->stored;
  EXPECT_EQ(s.token_hash(), key.token_hash);
  EXPECT_FALSE(s.session_id().empty());
  EXPECT_EQ(s.user_id(), "alice");
  EXPECT_EQ(s.version(), 1);
  EXPECT_EQ(s.ttl_seconds(), 60);
  EXPECT_EQ(s.created_at_unix_micros(), Micros(now));
  EXPECT_EQ(s.expires_at_unix_micros(), Micros(now + kTtl));
  EXPECT_EQ(s.absolute_expires_at_unix_micros(), Micros(now + kLifetime));
  EXPECT_EQ(s.user_generation(), 0u);
  EXPECT_FALSE(s.deleted());
  ASSERT_EQ(s.attributes().size(), 2u);
  EXPECT_EQ(s.attributes().at("role"), "admin");
  EXPECT_EQ(s.attributes().at("lang"), "de");
  EXPECT_EQ(fake_->TtlOf(key.token_hash), kTtl);

  // Field for field what Create stores, but for the token's own parts.
  absl::StatusOr<SessionView> c = service_->Create("alice", 0, attrs, Deadline());
  ASSERT_TRUE(c.ok()) << c.status();
  storage::v1::StoredSession a = s;
  storage::v1::StoredSession b = c->stored;
  for (storage::v1::StoredSession* m : {&a, &b}) {
    m->clear_session_id();
    m->clear_token_hash();
  }
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(a, b))
      << a.DebugString() << "\nvs Create's\n"
      << b.DebugString();

  absl::StatusOr<SessionView> read = service_->Get(v->token, false, Deadline());
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->stored.session_id(), s.session_id());
  EXPECT_EQ(read->stored.version(), 1);
  EXPECT_THAT(ListedIds("alice"), UnorderedElementsAre(s.session_id(), c->stored.session_id()));
  absl::StatusOr<IndexRecord> index = fake_->ReadIndex(UserTag("alice"), Deadline());
  ASSERT_TRUE(index.ok());
  ASSERT_EQ(index->index.entries_size(), 2);
  EXPECT_EQ(index->index.entries(0).token_hash(), key.token_hash);
  EXPECT_EQ(index->index.entries(0).session_id(), s.session_id());
  EXPECT_EQ(index->index.entries(0).absolute_expires_at_unix_micros(), Micros(now + kLifetime));
}

TEST_P(CreateAsyncTest, ExplicitTtlIsKept) {
  const absl::Time now = clock_.Now();
  absl::StatusOr<SessionView> v = CreateAsync("alice", 100);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->stored.ttl_seconds(), 100);
  EXPECT_EQ(v->stored.expires_at_unix_micros(), Micros(now + absl::Seconds(100)));
  EXPECT_EQ(fake_->TtlOf(KeyForToken(v->token)->token_hash), absl::Seconds(100));
  clock_.Advance(absl::Seconds(99));
  EXPECT_TRUE(service_->Get(v->token, false, Deadline()).ok());
  clock_.Advance(absl::Seconds(1));
  EXPECT_TRUE(absl::IsNotFound(service_->Get(v->token, false, Deadline()).status()));
}

// Attributes the contract refuses, each on its own.
struct BadAttributes {
  AttributeMap empty_key;
  AttributeMap control_key;
  AttributeMap too_big;  // One byte above the 64 KiB total, key included.
};
BadAttributes MakeBadAttributes() {
  BadAttributes bad;
  bad.empty_key[""] = "v";
  bad.control_key["a\x01"] = "v";
  bad.too_big["k"] = std::string(64 * 1024, 'v');
  return bad;
}

TEST_P(CreateAsyncTest, RejectsBadInputLikeCreateWithoutTouchingTheStore) {
  struct Case {
    std::string user;
    int64_t ttl;
    AttributeMap attrs;
    std::string field;
  };
  const BadAttributes bad = MakeBadAttributes();
  const std::vector<Case> cases = {
      {"", 0, {}, "user_id"},
      {std::string(129, 'u'), 0, {}, "user_id"},
      {"bad\tuser", 0, {}, "user_id"},
      {"bad\x7fuser", 0, {}, "user_id"},
      {"bad\xffuser", 0, {}, "user_id"},
      {"alice", -1, {}, "ttl_seconds"},
      {"alice", std::numeric_limits<int64_t>::min(), {}, "ttl_seconds"},
      {"alice", 301, {}, "ttl_seconds"},
      {"alice", 0, bad.empty_key, "attributes"},
      {"alice", 0, bad.control_key, "attributes"},
      {"alice", 0, bad.too_big, "attributes"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    SCOPED_TRACE(absl::StrCat("case ", i, " (", c.field, ")"));
    const absl::Status got = CreateAsync(c.user, c.ttl, c.attrs).status();
    EXPECT_TRUE(absl::IsInvalidArgument(got)) << got;
    EXPECT_THAT(std::string(got.message()), HasSubstr(c.field));
    EXPECT_EQ(got, service_->Create(c.user, c.ttl, c.attrs, Deadline()).status());
  }
  EXPECT_EQ(store_->total(), 0);

  // The limits themselves are fine.
  AttributeMap largest;
  largest["k"] = std::string(64 * 1024 - 1, 'v');
  absl::StatusOr<SessionView> v = CreateAsync(std::string(128, 'u'), 300, largest);
  EXPECT_TRUE(v.ok()) << v.status();
}

TEST_P(CreateAsyncTest, SessionOfARevokedUserIsLiveUntilTheNextRevoke) {
  const std::string tag = UserTag("alice");
  SessionView old = MustCreate("alice");
  ASSERT_EQ(*service_->Revoke("alice", Deadline()), 1);
  uint64_t earlier_generation = 0;
  for (int revocation = 1; revocation <= 2; ++revocation) {
    SCOPED_TRACE(absl::StrCat("after revocation ", revocation));
    absl::StatusOr<SessionView> v = CreateAsync("alice");
    ASSERT_TRUE(v.ok()) << v.status();
    const uint64_t generation = *fake_->ReadGeneration(tag, absl::Hours(1), Deadline());
    EXPECT_GT(generation, earlier_generation);
    earlier_generation = generation;
    EXPECT_EQ(v->stored.user_generation(), generation);
    EXPECT_TRUE(service_->Get(v->token, false, Deadline()).ok());
    EXPECT_THAT(ListedIds("alice"), UnorderedElementsAre(v->stored.session_id()));
    EXPECT_TRUE(absl::IsNotFound(service_->Get(old.token, false, Deadline()).status()));

    absl::StatusOr<int64_t> revoked = service_->Revoke("alice", Deadline());
    ASSERT_TRUE(revoked.ok()) << revoked.status();
    EXPECT_EQ(*revoked, 1);
    EXPECT_TRUE(absl::IsNotFound(service_->Get(v->token, false, Deadline()).status()));
    EXPECT_TRUE(ListedIds("alice").empty());
    old = *v;
  }
}

TEST_P(CreateAsyncTest, IndexConflictFinishesOnTheBlockingPathAndKeepsEverySession) {
  // Another Create of the same user indexes its session between our read of the index and our
  // write, so the compare-and-swap really conflicts: first on creating the user's index, then
  // on replacing an existing one.
  for (const bool existing_index : {false, true}) {
    const std::string user = existing_index ? "bob" : "alice";
    SCOPED_TRACE(user);
    std::vector<std::string> expected;
    if (existing_index) expected.push_back(MustCreate(user).stored.session_id());
    auto other = std::make_shared<std::optional<SessionView>>();
    store_->InjectOnce(Op::kWriteIndexAsync, [this, user, other] {
      absl::StatusOr<SessionView> c = service_->Create(user, 0, {}, Deadline());
      EXPECT_TRUE(c.ok()) << c.status();
      if (c.ok()) *other = *c;
      return absl::OkStatus();
    });
    const int async_writes = store_->Count(Op::kWriteIndexAsync);
    const int async_adds = store_->Count(Op::kAddAsync);
    const int adds = store_->Count(Op::kAdd);
    AsyncAnswer& answer = Start(user);
    absl::StatusOr<SessionView> v = answer.Wait();
    store_->set_inject(nullptr);
    ASSERT_TRUE(v.ok()) << v.status();
    ASSERT_TRUE(other->has_value());
    expected.push_back((*other)->stored.session_id());
    expected.push_back(v->stored.session_id());
    EXPECT_EQ(store_->Count(Op::kWriteIndexAsync), async_writes + 1);
    // The session was added with the first index write; the blocking path only indexed it
    // again, on the executor when there is one.
    EXPECT_EQ(store_->Count(Op::kAddAsync), async_adds + 1);
    EXPECT_EQ(store_->Count(Op::kAdd), adds + 1);  // The other Create's.
    EXPECT_EQ(answer.thread(), FinisherThread());
    EXPECT_EQ(store_->Threads(Op::kWriteIndex).count(FinisherThread()), 1u);
    if (GetParam().executor) {
      EXPECT_NE(FinisherThread(), std::this_thread::get_id());
      EXPECT_NE(FinisherThread(), StoreThread());
    }

    EXPECT_EQ(fake_->IndexSize(UserTag(user)), expected.size());
    const std::vector<std::string> listed = ListedIds(user);
    EXPECT_EQ(std::set<std::string>(listed.begin(), listed.end()),
              std::set<std::string>(expected.begin(), expected.end()));
    EXPECT_EQ(listed.size(), expected.size());
    EXPECT_TRUE(service_->Get(v->token, false, Deadline()).ok());
    EXPECT_TRUE(service_->Get((*other)->token, false, Deadline()).ok());
  }
}

TEST_P(CreateAsyncTest, AbortedIndexWriteRereadsTheIndex) {
  SessionView first = MustCreate("alice");
  store_->InjectOnce(Op::kWriteIndexAsync,
                     [] { return absl::AbortedError("injected: index changed"); });
  const int reads = store_->Count(Op::kReadIndex);
  AsyncAnswer& answer = Start("alice");
  absl::StatusOr<SessionView> v = answer.Wait();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(answer.thread(), FinisherThread());
  EXPECT_EQ(store_->Count(Op::kReadIndex), reads + 1);
  EXPECT_EQ(store_->Threads(Op::kWriteIndex).count(FinisherThread()), 1u);
  EXPECT_EQ(fake_->IndexSize(UserTag("alice")), 2u);
  EXPECT_THAT(ListedIds("alice"),
              UnorderedElementsAre(first.stored.session_id(), v->stored.session_id()));
}

// A lost race that took longer to index than the session's TTL (here 1.5 s for a 1 s session)
// must not hand out the session, stored before the race and expired since: the caller is told
// to retry.
TEST_P(CreateAsyncTest, ASessionThatExpiredWhileItsIndexWasRetriedIsNotHandedOut) {
  auto aborted = std::make_shared<std::atomic<bool>>(false);
  auto advanced = std::make_shared<std::atomic<bool>>(false);
  store_->set_inject([this, aborted, advanced](Op op) {
    if (op == Op::kWriteIndexAsync && !aborted->exchange(true)) {
      return absl::AbortedError("injected: index changed");
    }
    if (op == Op::kReadIndex && !advanced->exchange(true)) {
      clock_.Advance(absl::Milliseconds(1500));
    }
    return absl::OkStatus();
  });
  const absl::StatusOr<SessionView> v = CreateAsync("alice", /*ttl=*/1);
  store_->set_inject(nullptr);
  ASSERT_TRUE(advanced->load()) << "the retry never read the index";
  ASSERT_FALSE(v.ok()) << "handed out, though expired "
                       << (absl::ToUnixMicros(clock_.Now()) - v->stored.expires_at_unix_micros())
                       << " us before";
  EXPECT_TRUE(absl::IsUnavailable(v.status())) << v.status();
  EXPECT_THAT(CallerMessage(v.status()).value_or(""),
              HasSubstr("the session expired while the user's session index was busy; retry"));
}

// The asynchronous index write is the first of max_cas_attempts tries, as for the blocking
// form: with 5 allowed, 1 + 4 writes; with 1, a lost race gives up at once.
TEST_P(CreateAsyncTest, IndexThatKeepsConflictingIsUnavailableLikeCreate) {
  for (const int attempts : {5, 1}) {
    SCOPED_TRACE(absl::StrCat(attempts, " tries allowed"));
    options_.max_cas_attempts = attempts;
    Restart(1);
    store_->set_inject([](Op op) {
      if (op == Op::kWriteIndexAsync || op == Op::kWriteIndex) {
        return absl::AbortedError("injected: index changed");
      }
      return absl::OkStatus();
    });
    const std::string user = absl::StrCat("alice-", attempts);
    const int async_writes = store_->Count(Op::kWriteIndexAsync);
    const int writes = store_->Count(Op::kWriteIndex);
    const int adds = store_->Count(Op::kAdd);
    const int async_adds = store_->Count(Op::kAddAsync);
    const absl::Status got = CreateAsync(user).status();
    EXPECT_TRUE(absl::IsUnavailable(got)) << got;
    EXPECT_EQ(store_->Count(Op::kWriteIndexAsync), async_writes + 1);
    EXPECT_EQ(store_->Count(Op::kWriteIndex), writes + attempts - 1);
    // Written with the first index write, but never handed out: nobody holds its token.
    EXPECT_EQ(store_->Count(Op::kAddAsync), async_adds + 1);
    EXPECT_EQ(store_->Count(Op::kAdd), adds);
    EXPECT_TRUE(ListedIds(user).empty());
    EXPECT_EQ(got, service_->Create(user, 0, {}, Deadline()).status());
    EXPECT_EQ(store_->Count(Op::kWriteIndex), writes + attempts - 1 + attempts);
    EXPECT_THAT(CallerMessage(got).value_or(""), ::testing::StartsWith("user_id: "));
    store_->set_inject(nullptr);
  }
}

// The store's words for an item too large name the session's attributes; when the item was the
// user's session index, which grows with the user's sessions, the caller reads of the user.
TEST_P(CreateAsyncTest, AnIndexTooLargeForAnItemNamesTheUser) {
  const absl::Status too_large =
      ForCallers(absl::StatusCode::kInvalidArgument, kSessionTooLargeForAnItem,
                 absl::UnavailableError("memcached 10.0.0.9:11211: SERVER_ERROR object too large"));
  store_->set_inject([&too_large](Op op) {
    return op == Op::kWriteIndexAsync || op == Op::kWriteIndex ? too_large : absl::OkStatus();
  });
  for (const absl::Status& got :
       {CreateAsync("alice").status(), service_->Create("alice", 0, {}, Deadline()).status()}) {
    EXPECT_EQ(got.code(), absl::StatusCode::kResourceExhausted) << got;
    EXPECT_THAT(CallerMessage(got).value_or(""), ::testing::StartsWith("user_id: "));
    EXPECT_THAT(std::string(got.message()), HasSubstr("10.0.0.9")) << "the cause, for the log";
  }
  // The session itself too large keeps the store's words.
  store_->set_inject(
      [&too_large](Op op) { return op == Op::kAddAsync ? too_large : absl::OkStatus(); });
  const absl::Status added = CreateAsync("bob").status();
  EXPECT_EQ(added.code(), absl::StatusCode::kInvalidArgument) << added;
  EXPECT_EQ(CallerMessage(added).value_or(""), kSessionTooLargeForAnItem);
}

TEST_P(CreateAsyncTest, StoreFailuresOfEachStepReachDone) {
  struct Case {
    Op op;
    absl::Status injected;
  };
  const std::vector<Case> cases = {
      {Op::kReadUserStateAsync, absl::UnavailableError("injected: down")},
      {Op::kWriteIndexAsync, absl::UnavailableError("injected: down")},
      {Op::kAddAsync, absl::UnavailableError("injected: down")},
      {Op::kAddAsync, absl::AlreadyExistsError("injected: exists")},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(absl::StrCat("op ", static_cast<int>(c.op), ": ", c.injected.ToString()));
    const int writes = store_->Count(Op::kWriteIndexAsync);
    store_->set_inject([&c](Op op) { return op == c.op ? c.injected : absl::OkStatus(); });
    AsyncAnswer& answer = Start("alice");
    const absl::Status got = answer.Wait().status();
    EXPECT_EQ(got.code(), c.injected.code()) << got;
    EXPECT_EQ(answer.thread(), StoreThread());
    // Nothing is written after a failed read.
    if (c.op == Op::kReadUserStateAsync) {
      EXPECT_EQ(store_->Count(Op::kWriteIndexAsync), writes);
    }
    // Create answers the same failure of its blocking step with the same code.
    const Op blocking = c.op == Op::kReadUserStateAsync ? Op::kReadUserState
                        : c.op == Op::kWriteIndexAsync  ? Op::kWriteIndex
                                                        : Op::kAdd;
    store_->set_inject(
        [&c, blocking](Op op) { return op == blocking ? c.injected : absl::OkStatus(); });
    EXPECT_EQ(service_->Create("alice", 0, {}, Deadline()).status().code(), c.injected.code());
    store_->set_inject(nullptr);
  }
  // No session was stored (entries of failed adds stay in the index until pruned).
  EXPECT_TRUE(ListedIds("alice").empty());

  fake_->set_unavailable(true);
  const absl::Status down = CreateAsync("alice").status();
  EXPECT_TRUE(absl::IsUnavailable(down)) << down;
  fake_->set_unavailable(false);
  EXPECT_TRUE(CreateAsync("alice").ok());
}

TEST_P(CreateAsyncTest, StoreFailuresOnTheBlockingPathReachDone) {
  // (The session itself was added with the first index write: the blocking path only indexes.)
  for (Op failing : {Op::kReadIndex, Op::kWriteIndex}) {
    SCOPED_TRACE(absl::StrCat("op ", static_cast<int>(failing)));
    store_->set_inject([failing](Op op) {
      if (op == Op::kWriteIndexAsync) return absl::AbortedError("injected: index changed");
      if (op == failing) return absl::UnavailableError("injected: down");
      return absl::OkStatus();
    });
    AsyncAnswer& answer = Start("alice");
    const absl::Status got = answer.Wait().status();
    EXPECT_TRUE(absl::IsUnavailable(got)) << got;
    EXPECT_EQ(answer.thread(), FinisherThread());
  }
}

TEST_P(CreateAsyncTest, ConcurrentCreatesOfOneUserAreAllIndexed) {
  // Real (short) backoff sleeps spread the retries of the blocking path.
  options_.sleep = nullptr;
  options_.backoff_base = absl::Microseconds(50);
  options_.backoff_max = absl::Milliseconds(2);
  Restart(4);
  // A pause between reading the index and writing it makes the creates overlap (and conflict)
  // even when the store answers on the callers' threads.
  store_->set_inject([](Op op) {
    if (op == Op::kWriteIndexAsync) std::this_thread::sleep_for(std::chrono::microseconds(100));
    return absl::OkStatus();
  });
  constexpr int kThreads = 4;
  constexpr int kPerThread = 25;
  std::vector<AsyncAnswer*> answers(kThreads * kPerThread);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) answers[t * kPerThread + i] = &Start("alice");
    });
  }
  for (std::thread& t : threads) t.join();
  std::set<std::string> created;
  for (AsyncAnswer* answer : answers) {
    absl::StatusOr<SessionView> v = answer->Wait();
    ASSERT_TRUE(v.ok()) << v.status();
    created.insert(v->stored.session_id());
  }
  ASSERT_EQ(created.size(), answers.size());
  const std::vector<std::string> listed = ListedIds("alice");
  EXPECT_EQ(std::set<std::string>(listed.begin(), listed.end()), created);
  EXPECT_EQ(listed.size(), created.size());
  EXPECT_EQ(fake_->IndexSize(UserTag("alice")), created.size());
  // (With these overlaps, some always lose a race; otherwise the blocking path went untested.)
  EXPECT_GT(store_->Count(Op::kWriteIndex), 0);
}

TEST_P(CreateAsyncTest, IndexAtThePruneThresholdGoesThroughThePrunePath) {
  for (int i = 0; i < 256; ++i) MustCreate("chatty");
  ASSERT_EQ(fake_->IndexSize(UserTag("chatty")), 256u);
  const int session_reads = store_->Count(Op::kReadSessions);
  AsyncAnswer& answer = Start("chatty");
  absl::StatusOr<SessionView> v = answer.Wait();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(answer.thread(), FinisherThread());
  // Pruning read them, 64 at a time.
  EXPECT_EQ(store_->Count(Op::kReadSessions), session_reads + 4);
  EXPECT_EQ(store_->Count(Op::kWriteIndexAsync), 0);
  EXPECT_EQ(fake_->IndexSize(UserTag("chatty")), 257u);
  EXPECT_TRUE(service_->Get(v->token, false, Deadline()).ok());
  const std::vector<std::string> listed = ListedIds("chatty");
  EXPECT_EQ(listed.size(), 257u);
  EXPECT_EQ(std::count(listed.begin(), listed.end(), v->stored.session_id()), 1);
}

// A user who keeps hundreds of sessions live (a service account, say) must not make every
// create read them all: after a pruning that kept K entries, the next waits for K more.
TEST_P(CreateAsyncTest, PruningIsAmortizedOverTheCreatesAfterIt) {
  for (int i = 0; i < 256; ++i) MustCreate("service");
  const int session_reads = store_->Count(Op::kReadSessions);
  // A pruning reads the sessions 64 at a time (kSessionsPerRead): 256 in 4 reads, 512 in 8.
  for (int i = 0; i < 255; ++i) ASSERT_TRUE(CreateAsync("service").ok());
  EXPECT_EQ(store_->Count(Op::kReadSessions), session_reads + 4) << "one pruning, at 256";
  ASSERT_TRUE(CreateAsync("service").ok());
  EXPECT_EQ(fake_->IndexSize(UserTag("service")), 512u);  // Twice the 256 the pruning kept.
  EXPECT_EQ(store_->Count(Op::kReadSessions), session_reads + 4);
  ASSERT_TRUE(CreateAsync("service").ok());
  EXPECT_EQ(store_->Count(Op::kReadSessions), session_reads + 4 + 8) << "the next pruning, at 512";
  EXPECT_EQ(ListedIds("service").size(), 513u);
}

// The per-user limit still holds exactly: an index that reaches it is pruned whatever the last
// pruning kept, and a user at the limit gets no more.
TEST_P(CreateAsyncTest, AmortizedPruningStillStopsAtTheLimit) {
  options_.limits.max_live_sessions_per_user = 300;
  Restart(1);
  for (int i = 0; i < 300; ++i) ASSERT_TRUE(CreateAsync("service").ok()) << i;
  const absl::StatusOr<SessionView> over = CreateAsync("service");
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
  EXPECT_EQ(ListedIds("service").size(), 300u);
}

TEST_P(CreateAsyncTest, PrunePathDropsDeadEntries) {
  std::vector<SessionView> sessions;
  for (int i = 0; i < 256; ++i) sessions.push_back(MustCreate("chatty"));
  for (int i = 1; i < 256; ++i) ASSERT_TRUE(service_->Delete(sessions[i].token, Deadline()).ok());
  clock_.Advance(absl::Seconds(31));  // Past the grace for entries of in-flight creates.
  absl::StatusOr<SessionView> v = CreateAsync("chatty");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(fake_->IndexSize(UserTag("chatty")), 2u);
  EXPECT_THAT(ListedIds("chatty"),
              UnorderedElementsAre(sessions[0].stored.session_id(), v->stored.session_id()));
}

// ---------------------------------------------------------------------------------------------
// GetAsync and UpdateAsync

::testing::AssertionResult SameSession(const storage::v1::StoredSession& got,
                                       const storage::v1::StoredSession& want) {
  if (google::protobuf::util::MessageDifferencer::Equals(got, want)) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << got.DebugString() << "\nwanted\n" << want.DebugString();
}

// What two sessions created alike at the same moment still differ in.
storage::v1::StoredSession WithoutIdentity(storage::v1::StoredSession s) {
  s.clear_session_id();
  s.clear_token_hash();
  return s;
}

struct UpdateRequest {
  AttributeMap set;
  std::vector<std::string> remove;
  int64_t expected_version = 0;
};

// GetAsync and UpdateAsync (both through ChangeAsync), compared with Get and Update.
class ChangeAsyncTest : public AsyncServiceTest {
 protected:
  AsyncAnswer& StartGet(const std::string& token, bool touch) {
    AsyncAnswer& answer = NewAnswer();
    service_->GetAsync(token, touch, Deadline(), answer.Callback());
    return answer;
  }
  AsyncAnswer& StartUpdate(const std::string& token, const UpdateRequest& r) {
    AsyncAnswer& answer = NewAnswer();
    const KeyList remove(r.remove.begin(), r.remove.end());
    service_->UpdateAsync(token, r.set, remove, r.expected_version, Deadline(), answer.Callback());
    return answer;
  }
  // A touch, or the update `r`, of `token`.
  AsyncAnswer& StartChange(const std::string& token, bool update, const UpdateRequest& r) {
    return update ? StartUpdate(token, r) : StartGet(token, /*touch=*/true);
  }
  absl::StatusOr<SessionView> GetAsync(const std::string& token, bool touch) {
    return StartGet(token, touch).Wait();
  }
  absl::StatusOr<SessionView> UpdateAsync(const std::string& token, const UpdateRequest& r) {
    return StartUpdate(token, r).Wait();
  }

  // The blocking forms, whose answers the asynchronous ones must match.
  absl::StatusOr<SessionView> Get(const std::string& token, bool touch) {
    return service_->Get(token, touch, Deadline());
  }
  absl::StatusOr<SessionView> Update(const std::string& token, const UpdateRequest& r) {
    const KeyList remove(r.remove.begin(), r.remove.end());
    return service_->Update(token, r.set, remove, r.expected_version, Deadline());
  }
  absl::Status BlockingChange(const std::string& token, bool update, const UpdateRequest& r) {
    return (update ? Update(token, r) : Get(token, /*touch=*/true)).status();
  }

  // What the store holds for a token that has a value (read past the RecordingStore, so it
  // counts no call), and for how long.
  SessionRecord Stored(const std::string& token) {
    absl::StatusOr<SessionLookup> lookup = fake_->Lookup(*KeyForToken(token), Deadline());
    EXPECT_TRUE(lookup.ok() && lookup->record.has_value()) << "nothing stored for the token";
    return lookup.ok() && lookup->record.has_value() ? *lookup->record : SessionRecord{};
  }
  absl::Duration StoredTtl(const std::string& token) {
    return fake_->TtlOf(KeyForToken(token)->token_hash);
  }
  // Session writes through either form of compare-and-swap.
  int Writes() const {
    return store_->Count(Op::kCompareAndSwapAsync) + store_->Count(Op::kCompareAndSwap);
  }
  // The call took one asynchronous read and one asynchronous write, and nothing blocking.
  void ExpectOneAsyncReadAndWriteOnly() const {
    EXPECT_EQ(store_->Count(Op::kLookupAsync), 1);
    EXPECT_EQ(store_->Count(Op::kCompareAndSwapAsync), 1);
    EXPECT_EQ(store_->Count(Op::kLookup), 0);
    EXPECT_EQ(store_->Count(Op::kCompareAndSwap), 0);
  }
};

INSTANTIATE_TEST_SUITE_P(Modes, ChangeAsyncTest, ::testing::ValuesIn(kAsyncModes), AsyncModeName);

TEST_P(ChangeAsyncTest, GetWithoutTouchAnswersWhatGetDoesAndWritesNothing) {
  AttributeMap attrs;
  attrs["role"] = "admin";
  const SessionView v = MustCreate("alice", 0, attrs);
  clock_.Advance(absl::Seconds(40));
  const SessionRecord before = Stored(v.token);
  const int calls = store_->total();
  AsyncAnswer& answer = StartGet(v.token, /*touch=*/false);
  absl::StatusOr<SessionView> got = answer.Wait();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(answer.thread(), StoreThread());
  // One asynchronous read; no write, nothing blocking.
  EXPECT_EQ(store_->Count(Op::kLookupAsync), 1);
  EXPECT_EQ(store_->total(), calls + 1);
  EXPECT_TRUE(got->token.empty());
  EXPECT_TRUE(SameSession(got->stored, v.stored));
  const absl::StatusOr<SessionView> blocking = Get(v.token, false);
  ASSERT_TRUE(blocking.ok()) << blocking.status();
  EXPECT_TRUE(SameSession(got->stored, blocking->stored));
  EXPECT_EQ(Writes(), 0);
  EXPECT_EQ(Stored(v.token).cas.cas, before.cas.cas);
  // The expiry did not slide: 20 s later the session has idled out.
  clock_.Advance(absl::Seconds(20));
  EXPECT_TRUE(absl::IsNotFound(GetAsync(v.token, false).status()));
}

TEST_P(ChangeAsyncTest, TouchSlidesTheExpiryLikeGetAndStoresIt) {
  // Twins created at the same moment: one touched by GetAsync, the other by Get.
  const SessionView mine = MustCreate("alice");
  const SessionView twin = MustCreate("alice");
  clock_.Advance(absl::Seconds(40));
  AsyncAnswer& answer = StartGet(mine.token, /*touch=*/true);
  absl::StatusOr<SessionView> got = answer.Wait();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(answer.thread(), StoreThread());
  ExpectOneAsyncReadAndWriteOnly();

  storage::v1::StoredSession expected = mine.stored;
  expected.set_expires_at_unix_micros(Micros(clock_.Now() + kTtl));  // A touch is no update.
  EXPECT_TRUE(SameSession(got->stored, expected));
  EXPECT_TRUE(SameSession(Stored(mine.token).session, expected));
  EXPECT_EQ(StoredTtl(mine.token), kTtl);
  const absl::StatusOr<SessionView> blocking = Get(twin.token, true);
  ASSERT_TRUE(blocking.ok()) << blocking.status();
  EXPECT_TRUE(SameSession(WithoutIdentity(got->stored), WithoutIdentity(blocking->stored)));
  EXPECT_EQ(StoredTtl(mine.token), StoredTtl(twin.token));
  // 40 s after the touch the untouched expiry would have passed; the slid one has not.
  clock_.Advance(absl::Seconds(40));
  EXPECT_TRUE(GetAsync(mine.token, false).ok());
}

TEST_P(ChangeAsyncTest, TouchThatSlidesNothingWritesNothing) {
  const SessionView v = MustCreate("alice");  // Expires now + ttl: a touch now changes nothing.
  const SessionRecord before = Stored(v.token);
  AsyncAnswer& answer = StartGet(v.token, /*touch=*/true);
  absl::StatusOr<SessionView> got = answer.Wait();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(answer.thread(), StoreThread());
  EXPECT_TRUE(SameSession(got->stored, v.stored));
  EXPECT_EQ(Writes(), 0);
  EXPECT_EQ(Stored(v.token).cas.cas, before.cas.cas);

  // Near the absolute lifetime the first touch slides up to it, and later ones change nothing.
  const SessionView capped = MustCreate("bob", 200);
  const int64_t absolute = capped.stored.absolute_expires_at_unix_micros();
  clock_.Advance(absl::Seconds(150));
  got = GetAsync(capped.token, true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->stored.expires_at_unix_micros(), absolute);
  EXPECT_EQ(StoredTtl(capped.token), absl::Seconds(150));
  EXPECT_EQ(Writes(), 1);
  clock_.Advance(absl::Seconds(10));
  got = GetAsync(capped.token, true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->stored.expires_at_unix_micros(), absolute);
  EXPECT_EQ(Writes(), 1);
  clock_.Advance(absl::Seconds(140));
  EXPECT_TRUE(absl::IsNotFound(GetAsync(capped.token, true).status()));
  EXPECT_EQ(Writes(), 1);
}

// Parallel touches of one session would otherwise each write, and collide: a touch that would
// slide the expiry by less than a second writes nothing, so a loser's re-read ends the call.
TEST_P(ChangeAsyncTest, TouchesWithinASecondOfTheLastSlideWriteNothing) {
  const SessionView v = MustCreate("alice");
  clock_.Advance(absl::Seconds(40));
  absl::StatusOr<SessionView> got = GetAsync(v.token, true);
  ASSERT_TRUE(got.ok()) << got.status();
  const int64_t slid = Micros(clock_.Now() + kTtl);
  EXPECT_EQ(got->stored.expires_at_unix_micros(), slid);
  EXPECT_EQ(Writes(), 1);

  clock_.Advance(absl::Milliseconds(999));
  got = GetAsync(v.token, true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->stored.expires_at_unix_micros(), slid);
  got = Get(v.token, true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->stored.expires_at_unix_micros(), slid);
  EXPECT_EQ(Writes(), 1);

  clock_.Advance(absl::Milliseconds(1));
  got = GetAsync(v.token, true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->stored.expires_at_unix_micros(), Micros(clock_.Now() + kTtl));
  EXPECT_EQ(Writes(), 2);
}

// A one-second session lives on while touched more often than once a second: a touch slides it
// once half its idle timeout has passed (a whole second to gain comes only after it expired).
TEST_P(ChangeAsyncTest, AOneSecondSessionLivesOnWhileTouched) {
  const SessionView v = MustCreate("alice", 1);
  for (int touch = 1; touch <= 4; ++touch) {
    SCOPED_TRACE(absl::StrCat("touch ", touch));
    clock_.Advance(absl::Milliseconds(600));
    absl::StatusOr<SessionView> got = touch % 2 == 0 ? GetAsync(v.token, true) : Get(v.token, true);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->stored.expires_at_unix_micros(), Micros(clock_.Now() + absl::Seconds(1)));
  }
  EXPECT_EQ(Writes(), 4);
  // Within half a second of the last slide, nothing to write.
  clock_.Advance(absl::Milliseconds(400));
  ASSERT_TRUE(GetAsync(v.token, true).ok());
  EXPECT_EQ(Writes(), 4);
}

TEST_P(ChangeAsyncTest, UpdateAnswersWhatUpdateWouldAndStoresIt) {
  AttributeMap attrs;
  attrs["a"] = "1";
  attrs["b"] = "2";
  // Twins created at the same moment: one updated by UpdateAsync, the other by Update.
  const SessionView mine = MustCreate("alice", 0, attrs);
  const SessionView twin = MustCreate("alice", 0, attrs);
  clock_.Advance(absl::Seconds(30));
  UpdateRequest r;
  r.set["c"] = "3";
  r.set["a"] = "one";
  r.remove = {"b", "missing"};
  AsyncAnswer& answer = StartUpdate(mine.token, r);
  absl::StatusOr<SessionView> got = answer.Wait();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(answer.thread(), StoreThread());
  ExpectOneAsyncReadAndWriteOnly();

  EXPECT_TRUE(got->token.empty());
  storage::v1::StoredSession expected = mine.stored;
  expected.set_version(2);
  expected.set_expires_at_unix_micros(Micros(clock_.Now() + kTtl));
  expected.mutable_attributes()->clear();
  (*expected.mutable_attributes())["a"] = "one";
  (*expected.mutable_attributes())["c"] = "3";
  EXPECT_TRUE(SameSession(got->stored, expected));
  EXPECT_TRUE(SameSession(Stored(mine.token).session, expected));
  EXPECT_EQ(StoredTtl(mine.token), kTtl);
  const absl::StatusOr<SessionView> blocking = Update(twin.token, r);
  ASSERT_TRUE(blocking.ok()) << blocking.status();
  EXPECT_TRUE(SameSession(WithoutIdentity(got->stored), WithoutIdentity(blocking->stored)));
  EXPECT_EQ(StoredTtl(mine.token), StoredTtl(twin.token));
  got = GetAsync(mine.token, false);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(SameSession(got->stored, expected));
}

TEST_P(ChangeAsyncTest, ConditionalUpdateChecksTheStoredVersion) {
  const SessionView v = MustCreate("alice");
  UpdateRequest r;
  r.set["k"] = "v";
  r.expected_version = 1;
  absl::StatusOr<SessionView> got = UpdateAsync(v.token, r);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->stored.version(), 2);

  // Behind and ahead of the stored version 2.
  for (const int64_t stale : {1, 3}) {
    SCOPED_TRACE(absl::StrCat("expected_version ", stale));
    r.expected_version = stale;
    const SessionRecord before = Stored(v.token);
    const int writes = Writes();
    AsyncAnswer& answer = StartUpdate(v.token, r);
    const absl::Status status = answer.Wait().status();
    EXPECT_TRUE(absl::IsAborted(status)) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr("expected_version"));
    EXPECT_EQ(answer.thread(), StoreThread());
    EXPECT_EQ(Writes(), writes);
    EXPECT_EQ(Stored(v.token).cas.cas, before.cas.cas);
    EXPECT_EQ(status, Update(v.token, r).status());
  }
  r.expected_version = 2;
  got = UpdateAsync(v.token, r);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->stored.version(), 3);
  EXPECT_TRUE(SameSession(Stored(v.token).session, got->stored));
}

TEST_P(ChangeAsyncTest, BadInputIsRejectedLikeUpdateWithoutTouchingTheStore) {
  const SessionView v = MustCreate("alice");
  const int calls = store_->total();
  struct Case {
    UpdateRequest request;
    std::string field;
  };
  AttributeMap kv;
  kv["k"] = "v";
  const BadAttributes bad = MakeBadAttributes();
  AttributeMap long_key;
  long_key[std::string(129, 'k')] = "v";
  const std::vector<Case> cases = {
      {{kv, {}, -1}, "expected_version"},
      {{kv, {}, std::numeric_limits<int64_t>::min()}, "expected_version"},
      {{kv, {"k"}, 0}, "remove"},
      {{kv, {""}, 0}, "remove"},
      {{kv, {"a\x01"}, 0}, "remove"},
      {{bad.empty_key, {}, 0}, "set"},
      {{bad.control_key, {}, 0}, "set"},
      {{long_key, {}, 0}, "set"},
      {{bad.too_big, {}, 0}, "set"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    SCOPED_TRACE(absl::StrCat("case ", i, " (", c.field, ")"));
    const absl::Status got = UpdateAsync(v.token, c.request).status();
    EXPECT_TRUE(absl::IsInvalidArgument(got)) << got;
    EXPECT_THAT(std::string(got.message()), HasSubstr(c.field));
    EXPECT_EQ(got, Update(v.token, c.request).status());
  }
  // No token at all; the request checks come before the token's.
  const absl::Status no_token = UpdateAsync("", {kv, {}, 0}).status();
  EXPECT_TRUE(absl::IsInvalidArgument(no_token)) << no_token;
  EXPECT_THAT(std::string(no_token.message()), HasSubstr("token"));
  EXPECT_EQ(no_token, Update("", {kv, {}, 0}).status());
  const absl::Status bad_both = UpdateAsync("garbage", {kv, {}, -1}).status();
  EXPECT_TRUE(absl::IsInvalidArgument(bad_both)) << bad_both;
  EXPECT_EQ(bad_both, Update("garbage", {kv, {}, -1}).status());
  for (const bool touch : {false, true}) {
    SCOPED_TRACE(touch ? "touch" : "no touch");
    const absl::Status got = GetAsync("", touch).status();
    EXPECT_TRUE(absl::IsInvalidArgument(got)) << got;
    EXPECT_EQ(got, Get("", touch).status());
  }
  // A malformed token names no session (NOT_FOUND, as Get and Update answer): no store call.
  for (const std::string& token : {std::string("garbage"), std::string(kTokenLength, '!')}) {
    SCOPED_TRACE(token);
    for (const bool touch : {false, true}) {
      const absl::Status got = GetAsync(token, touch).status();
      EXPECT_TRUE(absl::IsNotFound(got)) << got;
      EXPECT_EQ(got, Get(token, touch).status());
    }
    const absl::Status got = UpdateAsync(token, {kv, {}, 0}).status();
    EXPECT_TRUE(absl::IsNotFound(got)) << got;
    EXPECT_EQ(got, Update(token, {kv, {}, 0}).status());
  }
  EXPECT_EQ(store_->total(), calls);
  EXPECT_TRUE(SameSession(Stored(v.token).session, v.stored));
}

TEST_P(ChangeAsyncTest, AttributesTooLargeOnlyAfterMergingAreRejectedAndNothingIsWritten) {
  AttributeMap attrs;
  attrs["a"] = std::string(40 * 1024, 'x');
  const SessionView v = MustCreate("alice", 0, attrs);
  const SessionRecord before = Stored(v.token);
  UpdateRequest r;
  r.set["b"] = std::string(30 * 1024, 'y');  // Fine alone, too much with "a".
  AsyncAnswer& answer = StartUpdate(v.token, r);
  const absl::Status status = answer.Wait().status();
  EXPECT_TRUE(absl::IsInvalidArgument(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("set"));
  EXPECT_EQ(answer.thread(), StoreThread());
  EXPECT_EQ(store_->Count(Op::kLookupAsync), 1);
  EXPECT_EQ(Writes(), 0);
  EXPECT_EQ(Stored(v.token).cas.cas, before.cas.cas);
  EXPECT_EQ(status, Update(v.token, r).status());
  // Removing the big one in the same call makes room.
  r.remove = {"a"};
  absl::StatusOr<SessionView> got = UpdateAsync(v.token, r);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->stored.attributes().size(), 1u);
  EXPECT_EQ(got->stored.version(), 2);
}

TEST_P(ChangeAsyncTest, SessionThatIsNotLiveIsNotFoundAndNothingIsWritten) {
  // Values that are still stored, but dead: idled out (the item outlives expires_at, as when
  // Memcached rounds its TTL up), deleted (a tombstone), revoked (the value survived, or came
  // back over, Revoke's tombstone).
  const SessionView idle = MustCreate("alice", 2);
  ASSERT_TRUE(fake_->Put(*KeyForToken(idle.token), idle.stored, kTtl, Deadline()).ok());
  const SessionView deleted = MustCreate("alice");
  ASSERT_TRUE(service_->Delete(deleted.token, Deadline()).ok());
  const SessionView revoked = MustCreate("bob");
  ASSERT_TRUE(service_->Revoke("bob", Deadline()).ok());
  ASSERT_TRUE(fake_->Put(*KeyForToken(revoked.token), revoked.stored, kTtl, Deadline()).ok());
  clock_.Advance(absl::Seconds(2));
  const std::vector<std::string> stored = {idle.token, deleted.token, revoked.token};
  std::vector<uint64_t> cas;
  for (const std::string& token : stored) cas.push_back(Stored(token).cas.cas);

  UpdateRequest r;
  r.set["k"] = "v";
  std::vector<std::string> tokens = stored;
  tokens.push_back(*NewToken("alice"));  // Never issued.
  for (size_t i = 0; i < tokens.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("token ", i));
    for (int call = 0; call < 3; ++call) {
      const bool update = call == 2;
      const bool touch = call == 1;
      AsyncAnswer& answer = update ? StartUpdate(tokens[i], r) : StartGet(tokens[i], touch);
      const absl::Status status = answer.Wait().status();
      EXPECT_TRUE(absl::IsNotFound(status)) << status;
      EXPECT_EQ(answer.thread(), StoreThread());
      EXPECT_EQ(status, update ? Update(tokens[i], r).status() : Get(tokens[i], touch).status());
    }
  }
  EXPECT_EQ(Writes(), 0);
  for (size_t i = 0; i < stored.size(); ++i) EXPECT_EQ(Stored(stored[i]).cas.cas, cas[i]);
}

// A store that refuses the grown session as larger than one item names the session's
// attributes; an update has no such field, its request's is `set`, so the message names that.
TEST_P(ChangeAsyncTest, AnUpdateTooLargeForAnItemNamesSet) {
  const auto too_large = [] {
    return ForCallers(absl::StatusCode::kInvalidArgument, kSessionTooLargeForAnItem,
                      absl::InvalidArgumentError("injected: object too large for cache"));
  };
  UpdateRequest r;
  r.set["avatar"] = std::string(1000, 'x');
  const auto expect_names_set = [](const absl::Status& got) {
    ASSERT_EQ(got.code(), absl::StatusCode::kInvalidArgument) << got;
    EXPECT_THAT(CallerMessage(got).value_or(""), ::testing::StartsWith("set: ")) << got;
  };
  {
    SCOPED_TRACE("UpdateAsync, refused by its asynchronous write");
    const SessionView v = MustCreate("alice");
    store_->InjectOnce(Op::kCompareAndSwapAsync, too_large);
    expect_names_set(UpdateAsync(v.token, r).status());
  }
  {
    SCOPED_TRACE("UpdateAsync, refused on the blocking path after a lost race");
    const SessionView v = MustCreate("alice");
    store_->set_inject([too_large](Op op) {
      if (op == Op::kCompareAndSwapAsync) return absl::AbortedError("injected: lost a race");
      if (op == Op::kCompareAndSwap) return too_large();
      return absl::OkStatus();
    });
    expect_names_set(UpdateAsync(v.token, r).status());
  }
  {
    SCOPED_TRACE("Update");
    const SessionView v = MustCreate("alice");
    store_->InjectOnce(Op::kCompareAndSwap, too_large);
    expect_names_set(Update(v.token, r).status());
  }
  store_->set_inject(nullptr);
}

TEST_P(ChangeAsyncTest, LostRaceFinishesOnTheBlockingPath) {
  for (const bool update : {false, true}) {
    SCOPED_TRACE(update ? "UpdateAsync" : "GetAsync with touch");
    const SessionView v = MustCreate("alice");
    clock_.Advance(absl::Seconds(10));
    store_->InjectOnce(Op::kCompareAndSwapAsync,
                       [] { return absl::AbortedError("injected: lost a race"); });
    const int async_writes = store_->Count(Op::kCompareAndSwapAsync);
    const int lookups = store_->Count(Op::kLookup);
    const int writes = store_->Count(Op::kCompareAndSwap);
    UpdateRequest r;
    r.set["k"] = "v";
    AsyncAnswer& answer = StartChange(v.token, update, r);
    absl::StatusOr<SessionView> got = answer.Wait();
    store_->set_inject(nullptr);
    ASSERT_TRUE(got.ok()) << got.status();
    // One asynchronous try, then the blocking form: read again, write once, on the executor
    // when there is one.
    EXPECT_EQ(store_->Count(Op::kCompareAndSwapAsync), async_writes + 1);
    EXPECT_EQ(store_->Count(Op::kLookup), lookups + 1);
    EXPECT_EQ(store_->Count(Op::kCompareAndSwap), writes + 1);
    EXPECT_EQ(answer.thread(), FinisherThread());
    EXPECT_EQ(store_->Threads(Op::kLookup), std::set<std::thread::id>{FinisherThread()});
    EXPECT_EQ(store_->Threads(Op::kCompareAndSwap), std::set<std::thread::id>{FinisherThread()});
    if (GetParam().executor) {
      EXPECT_NE(FinisherThread(), std::this_thread::get_id());
      EXPECT_NE(FinisherThread(), StoreThread());
    }

    storage::v1::StoredSession expected = v.stored;
    expected.set_expires_at_unix_micros(Micros(clock_.Now() + kTtl));
    if (update) {
      expected.set_version(2);
      (*expected.mutable_attributes())["k"] = "v";
    }
    EXPECT_TRUE(SameSession(got->stored, expected));
    EXPECT_TRUE(SameSession(Stored(v.token).session, expected));
    EXPECT_EQ(StoredTtl(v.token), kTtl);
  }
}

TEST_P(ChangeAsyncTest, ConcurrentUpdateBetweenReadAndWriteIsKeptByTheRetry) {
  for (const bool update : {false, true}) {
    SCOPED_TRACE(update ? "UpdateAsync" : "GetAsync with touch");
    const SessionView v = MustCreate("alice");
    clock_.Advance(absl::Seconds(10));
    // Another writer updates the session between our read and our write, so the
    // compare-and-swap really conflicts.
    const auto fired = store_->InjectOnce(Op::kCompareAndSwapAsync, [this, token = v.token] {
      UpdateRequest other;
      other.set["other"] = "x";
      const absl::Status updated = Update(token, other).status();
      EXPECT_TRUE(updated.ok()) << updated;
      return absl::OkStatus();
    });
    UpdateRequest mine;
    mine.set["mine"] = "y";
    AsyncAnswer& answer = StartChange(v.token, update, mine);
    absl::StatusOr<SessionView> got = answer.Wait();
    store_->set_inject(nullptr);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(fired->load());
    EXPECT_EQ(answer.thread(), FinisherThread());
    // Both changes: the other writer's and, for an update, ours on top.
    storage::v1::StoredSession expected = v.stored;
    expected.set_expires_at_unix_micros(Micros(clock_.Now() + kTtl));
    expected.set_version(update ? 3 : 2);
    (*expected.mutable_attributes())["other"] = "x";
    if (update) (*expected.mutable_attributes())["mine"] = "y";
    EXPECT_TRUE(SameSession(got->stored, expected));
    EXPECT_TRUE(SameSession(Stored(v.token).session, expected));
  }
}

TEST_P(ChangeAsyncTest, ConditionalUpdateThatLostARaceIsDecidedByTheReread) {
  const SessionView v = MustCreate("alice");
  clock_.Advance(absl::Seconds(10));
  // The first conflict is a concurrent touch, which leaves the version alone: the re-read still
  // finds version 1 and the update succeeds. The second is a concurrent update: the re-read
  // finds version 3 where we expected 2.
  auto conflicts = std::make_shared<std::atomic<int>>(0);
  store_->set_inject([this, token = v.token, conflicts](Op op) {
    if (op == Op::kCompareAndSwapAsync) {
      const int n = conflicts->fetch_add(1);
      UpdateRequest other;
      other.set["other"] = "x";
      const absl::Status written =
          (n == 0 ? Get(token, /*touch=*/true) : Update(token, other)).status();
      EXPECT_TRUE(written.ok()) << written;
    }
    return absl::OkStatus();
  });
  UpdateRequest r;
  r.set["k"] = "v";
  r.expected_version = 1;
  AsyncAnswer& first = StartUpdate(v.token, r);
  absl::StatusOr<SessionView> got = first.Wait();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(first.thread(), FinisherThread());
  EXPECT_EQ(got->stored.version(), 2);
  EXPECT_TRUE(SameSession(Stored(v.token).session, got->stored));

  clock_.Advance(absl::Seconds(10));
  r.set["k"] = "w";
  r.expected_version = 2;
  AsyncAnswer& second = StartUpdate(v.token, r);
  const absl::Status status = second.Wait().status();
  store_->set_inject(nullptr);
  EXPECT_TRUE(absl::IsAborted(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("expected_version"));
  EXPECT_EQ(second.thread(), FinisherThread());
  EXPECT_EQ(conflicts->load(), 2);
  const storage::v1::StoredSession stored = Stored(v.token).session;
  EXPECT_EQ(stored.version(), 3);
  EXPECT_EQ(stored.attributes().at("k"), "v");
  EXPECT_EQ(stored.attributes().at("other"), "x");
}

// The asynchronous try is the first of max_cas_attempts, and the blocking form makes the
// others: with a single try allowed, a lost race answers without a blocking one.
TEST_P(ChangeAsyncTest, ConflictsThatNeverEndAreUnavailableLikeTheBlockingForm) {
  for (const int attempts : {5, 1}) {
    SCOPED_TRACE(absl::StrCat(attempts, " tries"));
    options_.max_cas_attempts = attempts;
    Restart(1);
    const SessionView v = MustCreate("alice");
    clock_.Advance(absl::Seconds(10));
    store_->set_inject([](Op op) {
      if (op == Op::kCompareAndSwapAsync || op == Op::kCompareAndSwap) {
        return absl::AbortedError("injected: lost a race");
      }
      return absl::OkStatus();
    });
    UpdateRequest r;
    r.set["k"] = "v";
    for (const bool update : {false, true}) {
      SCOPED_TRACE(update ? "UpdateAsync" : "GetAsync with touch");
      const int writes = store_->Count(Op::kCompareAndSwap);
      AsyncAnswer& answer = StartChange(v.token, update, r);
      const absl::Status status = answer.Wait().status();
      EXPECT_TRUE(absl::IsUnavailable(status)) << status;
      EXPECT_THAT(status.message(), HasSubstr(absl::StrCat("at each of ", attempts, " tries")));
      EXPECT_EQ(answer.thread(), FinisherThread());
      EXPECT_EQ(store_->Count(Op::kCompareAndSwap), writes + attempts - 1);
      EXPECT_EQ(status, BlockingChange(v.token, update, r));
    }
    store_->set_inject(nullptr);
    EXPECT_TRUE(SameSession(Stored(v.token).session, v.stored));
  }
}

TEST_P(ChangeAsyncTest, StoreFailuresReachDoneWithoutRetries) {
  struct Case {
    Op failing;
    bool lost_race;  // The asynchronous compare-and-swap conflicts first.
  };
  const std::vector<Case> cases = {
      {Op::kLookupAsync, false},
      {Op::kCompareAndSwapAsync, false},
      {Op::kLookup, true},
      {Op::kCompareAndSwap, true},
  };
  const SessionView v = MustCreate("alice");
  UpdateRequest r;
  r.set["k"] = "v";
  for (const Case& c : cases) {
    for (const bool update : {false, true}) {
      SCOPED_TRACE(absl::StrCat("op ", static_cast<int>(c.failing),
                                update ? ", UpdateAsync" : ", GetAsync with touch"));
      clock_.Advance(absl::Seconds(1));  // So that a touch has something to write.
      const SessionRecord before = Stored(v.token);
      const int async_writes = store_->Count(Op::kCompareAndSwapAsync);
      const int lookups = store_->Count(Op::kLookup);
      const int writes = store_->Count(Op::kCompareAndSwap);
      store_->set_inject([c](Op op) {
        if (op == c.failing) return absl::UnavailableError("injected: down");
        if (c.lost_race && op == Op::kCompareAndSwapAsync) {
          return absl::AbortedError("injected: lost a race");
        }
        return absl::OkStatus();
      });
      AsyncAnswer& answer = StartChange(v.token, update, r);
      const absl::Status status = answer.Wait().status();
      store_->set_inject(nullptr);
      EXPECT_TRUE(absl::IsUnavailable(status)) << status;
      EXPECT_EQ(answer.thread(), c.lost_race ? FinisherThread() : StoreThread());
      EXPECT_EQ(store_->Count(Op::kCompareAndSwapAsync),
                async_writes + (c.failing == Op::kLookupAsync ? 0 : 1));
      EXPECT_EQ(store_->Count(Op::kLookup), lookups + (c.lost_race ? 1 : 0));
      EXPECT_EQ(store_->Count(Op::kCompareAndSwap),
                writes + (c.failing == Op::kCompareAndSwap ? 1 : 0));
      EXPECT_EQ(Stored(v.token).cas.cas, before.cas.cas);
    }
  }
  fake_->set_unavailable(true);
  EXPECT_TRUE(absl::IsUnavailable(GetAsync(v.token, false).status()));
  EXPECT_TRUE(absl::IsUnavailable(UpdateAsync(v.token, r).status()));
  fake_->set_unavailable(false);
  EXPECT_TRUE(UpdateAsync(v.token, r).ok());
}

TEST_P(ChangeAsyncTest, ConcurrentUpdatesOfOneSessionAllSurvive) {
  // Enough attempts that no update gives up; real (short) backoff sleeps spread the retries.
  options_.max_cas_attempts = 1000;
  options_.sleep = nullptr;
  options_.backoff_base = absl::Microseconds(50);
  options_.backoff_max = absl::Milliseconds(2);
  Restart(4);
  // A pause between reading the session and writing it makes the updates overlap (and
  // conflict) even when the store answers on the callers' threads.
  store_->set_inject([](Op op) {
    if (op == Op::kCompareAndSwapAsync) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    return absl::OkStatus();
  });
  const SessionView v = MustCreate("alice");
  constexpr int kThreads = 5;
  constexpr int kPerThread = 10;
  std::vector<AsyncAnswer*> answers(kThreads * kPerThread);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        UpdateRequest r;
        r.set[absl::StrCat("k", t * kPerThread + i)] = "x";
        answers[t * kPerThread + i] = &StartUpdate(v.token, r);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  // Every update was written once, on top of all those before it.
  std::set<int64_t> versions;
  for (size_t i = 0; i < answers.size(); ++i) {
    absl::StatusOr<SessionView> got = answers[i]->Wait();
    ASSERT_TRUE(got.ok()) << "update " << i << ": " << got.status();
    EXPECT_EQ(got->stored.attributes().count(absl::StrCat("k", i)), 1u) << "update " << i;
    versions.insert(got->stored.version());
  }
  const int64_t n = static_cast<int64_t>(answers.size());
  EXPECT_EQ(versions.size(), answers.size());
  EXPECT_EQ(*versions.begin(), 2);
  EXPECT_EQ(*versions.rbegin(), 1 + n);
  store_->set_inject(nullptr);
  // (With these overlaps, some always lose a race; otherwise the retry went untested.)
  EXPECT_GT(store_->Count(Op::kLookup), 0);
  absl::StatusOr<SessionView> final_view = GetAsync(v.token, false);
  ASSERT_TRUE(final_view.ok()) << final_view.status();
  EXPECT_EQ(final_view->stored.version(), 1 + n);
  EXPECT_EQ(final_view->stored.attributes().size(), answers.size());
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(final_view->stored.attributes().count(absl::StrCat("k", i)), 1u) << i;
  }
}

}  // namespace
}  // namespace sessionledger
