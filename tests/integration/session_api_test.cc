// SessionService end to end: real server processes over the real memcached nodes of
// scripts/backing-services (two nodes, no replicas unless a test says otherwise).
#include <openssl/sha.h>

#include <set>
#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "sessionledger/storage/v1/stored_session.pb.h"
#include "tests/integration/session_test_support.h"

namespace sessionledger::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

std::string Sha256Hex(const std::string& data) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), digest);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), sizeof(digest)));
}

std::string UniqueUser(const std::string& base) {
  return absl::StrCat(base, "-", absl::ToUnixMicros(absl::Now()));
}

int64_t Seconds(const google::protobuf::Timestamp& t) { return t.seconds(); }

// Sleeps until `t`, a time taken from the server's own stamps: the margins of the expiry tests
// below are then not eaten by how long the calls before took on a busy machine.
void SleepUntil(absl::Time t) {
  const absl::Duration left = t - absl::Now();
  if (left > absl::ZeroDuration()) absl::SleepFor(left);
}

class SessionApiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = StartSessionServer().release(); }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    client_ = std::make_unique<SessionClient>(*server_);
  }

  static ServerProcess* server_;
  std::unique_ptr<SessionClient> client_;
};
ServerProcess* SessionApiTest::server_ = nullptr;

TEST_F(SessionApiTest, CreateGetUpdateRotateDelete) {
  const std::string user = UniqueUser("alice");
  v1::Session created = client_->MustCreate(user, 0, {{"role", "admin"}});
  EXPECT_EQ(created.token().size(), 64u);
  EXPECT_FALSE(created.session_id().empty());
  EXPECT_EQ(created.user_id(), user);
  EXPECT_EQ(created.version(), 1);
  EXPECT_EQ(created.ttl_seconds(), 1800);  // SESSION_TTL_SECONDS default.
  EXPECT_EQ(Seconds(created.absolute_expires_at()) - Seconds(created.created_at()), 86400);
  EXPECT_EQ(Seconds(created.expires_at()) - Seconds(created.created_at()), 1800);
  EXPECT_EQ(created.attributes().at("role"), "admin");

  v1::Session got;
  ASSERT_TRUE(client_->Get(created.token(), false, &got).ok());
  EXPECT_TRUE(got.token().empty());
  EXPECT_EQ(got.session_id(), created.session_id());
  EXPECT_EQ(got.attributes().at("role"), "admin");

  v1::Session updated;
  ASSERT_TRUE(client_->Update(created.token(), {{"theme", "dark"}}, {"role"}, 0, &updated).ok());
  EXPECT_EQ(updated.version(), 2);
  EXPECT_TRUE(updated.token().empty());
  EXPECT_EQ(updated.attributes().size(), 1u);
  EXPECT_EQ(updated.attributes().at("theme"), "dark");

  v1::Session rotated;
  ASSERT_TRUE(client_->Rotate(created.token(), &rotated).ok());
  EXPECT_NE(rotated.token(), created.token());
  EXPECT_EQ(rotated.token().size(), 64u);
  EXPECT_NE(rotated.session_id(), created.session_id());
  EXPECT_EQ(rotated.version(), 1);
  EXPECT_EQ(rotated.user_id(), user);
  EXPECT_EQ(rotated.ttl_seconds(), created.ttl_seconds());
  EXPECT_EQ(ToTime(rotated.created_at()), ToTime(created.created_at()));
  EXPECT_EQ(ToTime(rotated.absolute_expires_at()), ToTime(created.absolute_expires_at()));
  EXPECT_EQ(rotated.attributes().at("theme"), "dark");
  EXPECT_EQ(client_->GetCode(created.token()), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(client_->GetCode(rotated.token()), grpc::StatusCode::OK);

  ASSERT_TRUE(client_->Delete(rotated.token()).ok());
  EXPECT_EQ(client_->GetCode(rotated.token()), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(client_->Delete(rotated.token()).ok());  // Idempotent.
}

TEST_F(SessionApiTest, ErrorCodes) {
  v1::Session s;
  // CreateSession: INVALID_ARGUMENT naming the field.
  grpc::Status st = client_->Create("", 0, &s);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("user_id"));
  EXPECT_EQ(client_->Create(std::string(129, 'u'), 0, &s).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(client_->Create("a\x01", 0, &s).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  st = client_->Create("bob", 86401, &s);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("ttl_seconds"));
  EXPECT_EQ(client_->Create("bob", -5, &s).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  st = client_->Create("bob", 0, &s, {{"k", std::string(64 * 1024, 'v')}});
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("attributes"));

  // GetSession.
  EXPECT_EQ(client_->GetCode(""), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(client_->GetCode("not-a-token"), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(client_->GetCode(std::string(64, 'A')), grpc::StatusCode::NOT_FOUND);

  // UpdateSession: INVALID_ARGUMENT beats NOT_FOUND; ABORTED on a stale version.
  v1::Session live = client_->MustCreate(UniqueUser("carol"));
  EXPECT_EQ(client_->Update(std::string(64, 'A'), {{"k", "v"}}, {"k"}, 0, &s).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(client_->Update(std::string(64, 'A'), {{"k", "v"}}, {}, 0, &s).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(client_->Update("", {{"k", "v"}}, {}, 0, &s).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  st = client_->Update(live.token(), {{"k", "v"}}, {}, 7, &s);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::ABORTED);
  EXPECT_THAT(st.error_message(), HasSubstr("expected_version"));
  EXPECT_TRUE(client_->Update(live.token(), {{"k", "v"}}, {}, 1, &s).ok());

  // RotateSession / DeleteSession / List / Revoke.
  EXPECT_EQ(client_->Rotate(std::string(64, 'A'), &s).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(client_->Rotate("", &s).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(client_->Delete(std::string(64, 'A')).ok());
  EXPECT_EQ(client_->Delete("").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::ListUserSessionsResponse list;
  EXPECT_EQ(client_->List("", &list).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::RevokeUserSessionsResponse revoke;
  EXPECT_EQ(client_->Revoke(std::string(200, 'x'), &revoke).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(SessionApiTest, MemcachedHoldsHashedKeysAndProtobufValuesOnly) {
  v1::Session s = client_->MustCreate(UniqueUser("dave"), 0, {{"k", "v"}});
  const std::string key = "sl:v1:s:" + Sha256Hex(s.token());
  const int node = MemcachedHas(1, key) ? 1 : 2;
  ASSERT_TRUE(MemcachedHas(node, key)) << key;
  for (int n : {1, 2}) {
    const std::vector<std::string> keys = MemcachedKeys(n);
    // The dump is read whole: it lists the key a direct get just found.
    if (n == node) {
      EXPECT_THAT(keys, ::testing::Contains(key));
    }
    for (const std::string& k : keys) {
      EXPECT_THAT(k, ::testing::Not(HasSubstr(s.token()))) << k;
      EXPECT_TRUE(absl::StartsWith(k, "sl:v1:") || !absl::StartsWith(k, "sl:")) << k;
    }
  }
  // The value is a StoredSession protobuf, not text.
  const std::string reply = MemcachedText(MemcachedPort(node), "get " + key);
  const size_t header_end = reply.find("\r\n");
  ASSERT_NE(header_end, std::string::npos);
  std::vector<std::string> header = absl::StrSplit(reply.substr(0, header_end), ' ');
  ASSERT_EQ(header.size(), 4u);
  const std::string value = reply.substr(header_end + 2, std::stoul(header[3]));
  storage::v1::StoredSession stored;
  ASSERT_TRUE(stored.ParseFromString(value));
  EXPECT_EQ(stored.session_id(), s.session_id());
  EXPECT_EQ(stored.token_hash(), Sha256Hex(s.token()));
  EXPECT_THAT(value, ::testing::Not(HasSubstr(s.token())));
}

TEST_F(SessionApiTest, IdleExpiryAndTouchSliding) {
  // Every read that must find the session alive has 3 s or more of room to come late in.
  v1::Session s = client_->MustCreate(UniqueUser("erin"), 7);
  const std::string key = "sl:v1:s:" + Sha256Hex(s.token());
  const absl::Time created = ToTime(s.created_at());
  SleepUntil(created + absl::Milliseconds(3500));
  v1::Session touched;
  ASSERT_TRUE(client_->Get(s.token(), true, &touched).ok());
  EXPECT_GT(ToTime(touched.expires_at()), ToTime(s.expires_at()));
  EXPECT_EQ(touched.version(), 1);
  // Past the first expiry (the touch came at least 3.5 s after creation), alive thanks to it.
  SleepUntil(ToTime(touched.expires_at()) - absl::Milliseconds(3000));
  v1::Session untouched;
  ASSERT_TRUE(client_->Get(s.token(), false, &untouched).ok());
  EXPECT_EQ(ToTime(untouched.expires_at()), ToTime(touched.expires_at()));
  // A read without touch did not slide it.
  SleepUntil(ToTime(touched.expires_at()) + absl::Milliseconds(400));
  EXPECT_EQ(client_->GetCode(s.token()), grpc::StatusCode::NOT_FOUND);
  // Memcached's own TTL follows the idle lifetime: the item is gone from every node soon after.
  // The store rounds the TTL up and adds two seconds for memcached's clock, and the touch wrote
  // it at most a few milliseconds after computing expires_at: gone by expires_at + 2 s.
  absl::SleepFor(absl::Milliseconds(2800));
  EXPECT_FALSE(MemcachedHas(1, key));
  EXPECT_FALSE(MemcachedHas(2, key));
}

TEST_F(SessionApiTest, UpdateCountsAsActivity) {
  v1::Session s = client_->MustCreate(UniqueUser("frank"), 7);
  const absl::Time created = ToTime(s.created_at());
  SleepUntil(created + absl::Milliseconds(3500));
  v1::Session u;
  ASSERT_TRUE(client_->Update(s.token(), {{"k", "v"}}, {}, 0, &u).ok());
  // Past the creation's expiry; the update's is at least 10.5 s after creation, so this read
  // has 3 s of room to come late in.
  SleepUntil(created + absl::Milliseconds(7500));
  EXPECT_EQ(client_->GetCode(s.token()), grpc::StatusCode::OK);
}

TEST_F(SessionApiTest, ListAndRevokeAll) {
  const std::string user = UniqueUser("gina");
  const std::string other = UniqueUser("hank");
  v1::Session a = client_->MustCreate(user);
  v1::Session b = client_->MustCreate(user);
  v1::Session c = client_->MustCreate(user);
  v1::Session o = client_->MustCreate(other);
  ASSERT_TRUE(client_->Delete(c.token()).ok());
  v1::ListUserSessionsResponse list;
  ASSERT_TRUE(client_->List(user, &list).ok());
  std::vector<std::string> ids;
  for (const auto& s : list.sessions()) {
    ids.push_back(s.session_id());
    EXPECT_TRUE(s.token().empty());
    EXPECT_EQ(s.user_id(), user);
  }
  EXPECT_THAT(ids, UnorderedElementsAre(a.session_id(), b.session_id()));

  v1::RevokeUserSessionsResponse revoked;
  ASSERT_TRUE(client_->Revoke(user, &revoked).ok());
  EXPECT_EQ(revoked.revoked(), 2);
  EXPECT_EQ(client_->GetCode(a.token()), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(client_->GetCode(b.token()), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(client_->GetCode(o.token()), grpc::StatusCode::OK);
  v1::Session s;
  EXPECT_EQ(client_->Update(a.token(), {{"k", "v"}}, {}, 0, &s).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(client_->Rotate(b.token(), &s).error_code(), grpc::StatusCode::NOT_FOUND);

  v1::Session after = client_->MustCreate(user);
  EXPECT_EQ(client_->GetCode(after.token()), grpc::StatusCode::OK);
  list.Clear();
  ASSERT_TRUE(client_->List(user, &list).ok());
  ASSERT_EQ(list.sessions_size(), 1);
  EXPECT_EQ(list.sessions(0).session_id(), after.session_id());
}

// memcached may evict a user's generation item (a small item, in a slab class that can fill up
// on its own) while the user's sessions live on. A revocation after that still ends them all.
TEST_F(SessionApiTest, ARevocationAfterTheGenerationWasEvictedEndsEverySession) {
  const std::string user = UniqueUser("ivy");
  client_->MustCreate(user);
  v1::RevokeUserSessionsResponse revoked;
  ASSERT_TRUE(client_->Revoke(user, &revoked).ok());
  ASSERT_EQ(revoked.revoked(), 1);
  v1::Session after_first = client_->MustCreate(user);
  // The user tag is the first 16 bytes of the user id's SHA-256 (server/session/token.h).
  const std::string generation_key = "sl:v1:g:" + Sha256Hex(user).substr(0, 32);
  bool evicted = false;
  for (int node : {1, 2}) {
    // "get" after the delete ends the reply with the END that MemcachedText waits for.
    const std::string reply = MemcachedText(
        MemcachedPort(node), "delete " + generation_key + "\r\nget " + generation_key);
    evicted = evicted || absl::StartsWith(reply, "DELETED");
  }
  ASSERT_TRUE(evicted) << "no node held " << generation_key;

  revoked.Clear();
  ASSERT_TRUE(client_->Revoke(user, &revoked).ok());
  EXPECT_EQ(revoked.revoked(), 1);
  EXPECT_EQ(client_->GetCode(after_first.token()), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(client_->GetCode(client_->MustCreate(user).token()), grpc::StatusCode::OK);
}

// A user's sessions are read in batches of 64 (see SessionService::LiveSessions): listing and
// revoking a user with more than two batches, dead sessions among them, over real memcached.
TEST_F(SessionApiTest, ListAndRevokeAcrossReadBatches) {
  const std::string user = UniqueUser("robot");
  std::set<std::string> live_ids;
  std::vector<std::string> tokens;
  for (int i = 0; i < 150; ++i) {
    v1::Session s = client_->MustCreate(user, 0, {{"n", std::to_string(i)}});
    tokens.push_back(s.token());
    if (i % 7 == 0) {
      ASSERT_TRUE(client_->Delete(s.token()).ok());
    } else {
      live_ids.insert(s.session_id());
    }
  }
  v1::ListUserSessionsResponse list;
  ASSERT_TRUE(client_->List(user, &list).ok());
  std::set<std::string> listed;
  for (const auto& s : list.sessions()) {
    listed.insert(s.session_id());
    EXPECT_EQ(s.attributes().count("n"), 1u) << "a listing shows attributes";
  }
  EXPECT_EQ(listed, live_ids);

  v1::RevokeUserSessionsResponse revoked;
  ASSERT_TRUE(client_->Revoke(user, &revoked).ok());
  EXPECT_EQ(revoked.revoked(), static_cast<int64_t>(live_ids.size()));
  EXPECT_EQ(client_->GetCode(tokens.back()), grpc::StatusCode::NOT_FOUND);
}

TEST(SessionLifetimeTest, TouchCannotPassTheAbsoluteLifetime) {
  std::unique_ptr<ServerProcess> server =
      StartSessionServer({{"SESSION_MAX_LIFETIME_SECONDS", "14"}, {"SESSION_TTL_SECONDS", "7"}});
  ASSERT_NE(server, nullptr);
  SessionClient client(*server);
  v1::Session s = client.MustCreate(UniqueUser("ivan"));
  EXPECT_EQ(s.ttl_seconds(), 7);
  const absl::Time created = ToTime(s.created_at());
  EXPECT_EQ(ToTime(s.absolute_expires_at()) - created, absl::Seconds(14));
  v1::Session t;
  EXPECT_EQ(client.Create("ivan", 15, &t).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // The first touch slides the expiry and stays inside the lifetime; the second, more than 7 s
  // after creation, would slide past it and is held to it. A call can only come late, and each
  // has 3 s or more of room for that (the first must come before 7 s, the second before the
  // first's expiry at 10.5 s or later).
  SleepUntil(created + absl::Milliseconds(3500));
  grpc::Status got = client.Get(s.token(), true, &t);
  ASSERT_TRUE(got.ok()) << got.error_code() << " " << got.error_message();
  EXPECT_GT(ToTime(t.expires_at()), ToTime(s.expires_at()));
  EXPECT_LT(ToTime(t.expires_at()), ToTime(t.absolute_expires_at()));
  SleepUntil(created + absl::Milliseconds(7500));
  got = client.Get(s.token(), true, &t);
  ASSERT_TRUE(got.ok()) << got.error_code() << " " << got.error_message();
  EXPECT_EQ(ToTime(t.expires_at()), ToTime(t.absolute_expires_at()));
  EXPECT_EQ(ToTime(t.expires_at()), ToTime(s.absolute_expires_at()));
  v1::Session rotated;
  ASSERT_TRUE(client.Rotate(s.token(), &rotated).ok());
  EXPECT_EQ(ToTime(rotated.absolute_expires_at()), ToTime(s.absolute_expires_at()));
  SleepUntil(ToTime(s.absolute_expires_at()) + absl::Milliseconds(200));
  EXPECT_EQ(client.GetCode(rotated.token(), true), grpc::StatusCode::NOT_FOUND);
}

// The contract allows 30-day lifetimes, the longest TTL memcached reads as relative, and the
// store keeps items a little longer than their sessions: two spare seconds for memcached's
// clock, and a user's revocation generation a minute past the longest lifetime. The server
// takes 30 days (it used to refuse anything above 30 days less 2 minutes at start-up), and
// memcached keeps both items that long (written as Unix times: cut to 30 days, the generation
// could lapse before a revoked session and let it back in).
TEST(SessionLifetimeTest, ThirtyDayLifetimesAreKeptInFull) {
  constexpr int64_t kThirtyDays = 2592000;
  std::unique_ptr<ServerProcess> server =
      StartSessionServer({{"SESSION_MAX_LIFETIME_SECONDS", absl::StrCat(kThirtyDays)},
                          {"SESSION_TTL_SECONDS", absl::StrCat(kThirtyDays)}});
  ASSERT_NE(server, nullptr);
  SessionClient client(*server);
  const std::string user = UniqueUser("kim");
  v1::Session revoked = client.MustCreate(user);
  v1::RevokeUserSessionsResponse revoke;
  ASSERT_TRUE(client.Revoke(user, &revoke).ok());
  EXPECT_EQ(revoke.revoked(), 1);
  v1::Session s = client.MustCreate(user);
  EXPECT_EQ(s.ttl_seconds(), kThirtyDays);
  EXPECT_EQ(ToTime(s.absolute_expires_at()) - ToTime(s.created_at()), absl::Seconds(kThirtyDays));
  EXPECT_EQ(client.GetCode(s.token()), grpc::StatusCode::OK);
  EXPECT_EQ(client.GetCode(revoked.token()), grpc::StatusCode::NOT_FOUND);

  // memcached's clock may run a second or so either way of ours: bounds with that much room.
  const std::string key = "sl:v1:s:" + Sha256Hex(s.token());
  const std::optional<int64_t> session_ttl =
      MemcachedHas(1, key) ? MemcachedTtl(1, key) : MemcachedTtl(2, key);
  ASSERT_TRUE(session_ttl.has_value()) << key;
  EXPECT_GT(*session_ttl, kThirtyDays);
  EXPECT_LE(*session_ttl, kThirtyDays + 8);
  // The user tag: hex of the first 16 bytes of SHA-256(user_id).
  const std::string generation_key = "sl:v1:g:" + Sha256Hex(user).substr(0, 32);
  const std::optional<int64_t> generation_ttl = MemcachedHas(1, generation_key)
                                                    ? MemcachedTtl(1, generation_key)
                                                    : MemcachedTtl(2, generation_key);
  ASSERT_TRUE(generation_ttl.has_value()) << generation_key;
  EXPECT_GT(*generation_ttl, kThirtyDays + 60);
  EXPECT_LE(*generation_ttl, kThirtyDays + 60 + 8);
}

TEST(SessionStatelessnessTest, AnyServerServesAnySessionAndRestartsLoseNothing) {
  std::unique_ptr<ServerProcess> a = StartSessionServer();
  std::unique_ptr<ServerProcess> b = StartSessionServer();
  ASSERT_TRUE(a != nullptr && b != nullptr);
  SessionClient via_a(*a);
  SessionClient via_b(*b);
  v1::Session s = via_a.MustCreate(UniqueUser("judy"), 0, {{"from", "a"}});
  v1::Session got;
  ASSERT_TRUE(via_b.Get(s.token(), false, &got).ok());
  EXPECT_EQ(got.attributes().at("from"), "a");
  v1::Session updated;
  ASSERT_TRUE(via_b.Update(s.token(), {{"by", "b"}}, {}, 1, &updated).ok());
  EXPECT_EQ(updated.version(), 2);

  a.reset();  // SIGKILL: nothing is flushed, nothing needs to be.
  a = StartSessionServer();
  ASSERT_NE(a, nullptr);
  SessionClient via_new_a(*a);
  ASSERT_TRUE(via_new_a.Get(s.token(), false, &got).ok());
  EXPECT_EQ(got.version(), 2);
  EXPECT_EQ(got.attributes().at("by"), "b");
  ASSERT_TRUE(via_b.Delete(s.token()).ok());
  EXPECT_EQ(via_new_a.GetCode(s.token()), grpc::StatusCode::NOT_FOUND);
}

}  // namespace
}  // namespace sessionledger::testing
