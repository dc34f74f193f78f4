#include "server/session/session_service.h"

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
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
    options.sleep = [this](absl::Duration d) { slept_ += d; };
    service_ = std::make_shared<SessionService>(store_, clock_, options);
  }

  absl::Time Deadline() const { return absl::Now() + absl::Seconds(10); }

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
  EXPECT_TRUE(absl::IsAborted(Update(v.token, set).status()));
  EXPECT_EQ(store_->cas_calls(), service_->options().max_cas_attempts);
}

TEST_F(SessionServiceTest, ConcurrentUnconditionalUpdatesAllSurvive) {
  SessionView v = MustCreate("alice");
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        AttributeMap set;
        set[absl::StrCat("t", t, "-", i)] = "x";
        EXPECT_TRUE(Update(v.token, set).ok());
      }
    });
  }
  for (auto& t : threads) t.join();
  absl::StatusOr<SessionView> final_view = Get(v.token);
  ASSERT_TRUE(final_view.ok());
  EXPECT_EQ(final_view->stored.attributes().size(), 400u);
  EXPECT_EQ(final_view->stored.version(), 401);
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

TEST_F(SessionServiceTest, IndexStaysBoundedForAUserWhoNeverLists) {
  // Sessions that end (deleted, idled out) leave index entries behind; once the index passes its
  // prune threshold, the next CreateSession drops them, and entries past their absolute lifetime
  // go on every write, so the index tracks live sessions, not the user's history.
  std::vector<std::string> tokens;
  for (int i = 0; i < 300; ++i) tokens.push_back(MustCreate("chatty").token);
  EXPECT_EQ(store_->IndexSize(UserTag("chatty")), 300u);
  for (int i = 1; i < 300; ++i) ASSERT_TRUE(service_->Delete(tokens[i], Deadline()).ok());
  clock_.Advance(absl::Seconds(31));  // Past the grace for entries of in-flight creates.
  MustCreate("chatty");
  EXPECT_EQ(store_->IndexSize(UserTag("chatty")), 2u);
  clock_.Advance(kLifetime);  // Every session reached its absolute lifetime.
  MustCreate("chatty");
  EXPECT_EQ(store_->IndexSize(UserTag("chatty")), 1u);
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

TEST_F(SessionServiceTest, RevocationHoldsEvenIfTheSessionValueSurvives) {
  SessionView a = MustCreate("alice");
  const std::string hash = KeyForToken(a.token)->token_hash;
  // Revoke with a store that cannot delete (simulated by re-adding the value afterwards):
  // the generation alone must end it.
  absl::StatusOr<SessionView> before = Get(a.token);
  ASSERT_TRUE(service_->Revoke("alice", Deadline()).ok());
  ASSERT_TRUE(
      store_->Add(*KeyForToken(a.token), before->stored, absl::Seconds(60), Deadline()).ok());
  EXPECT_TRUE(store_->HasRaw(hash));
  EXPECT_TRUE(absl::IsNotFound(Get(a.token).status()));
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

}  // namespace
}  // namespace sessionledger
