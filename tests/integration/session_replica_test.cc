// SessionService under memcached node restarts, losses, outages and stalls (real nodes from
// scripts/backing-services; these tests stop and restart them, and always bring them back).
#include <openssl/sha.h>
#include <signal.h>

#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "sessionledger/storage/v1/stored_session.pb.h"
#include "sessionledger/v1/transaction.grpc.pb.h"
#include "tests/integration/session_test_support.h"

namespace sessionledger::testing {
namespace {

using ::testing::HasSubstr;

std::string SessionKey(const std::string& token) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(token.data()), token.size(), digest);
  return "sl:v1:s:" + absl::BytesToHexString(
                          absl::string_view(reinterpret_cast<const char*>(digest), sizeof(digest)));
}

class SessionReplicaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartSessionServer({{"MEMCACHED_URL", RequiredEnv("MEMCACHED_URL_REPLICATED")}});
    ASSERT_NE(server_, nullptr);
    client_ = std::make_unique<SessionClient>(*server_);
  }
  void TearDown() override {
    // Whatever happened, leave both nodes running for the next test.
    BackingServices({"start-memcached", "1"});
    BackingServices({"start-memcached", "2"});
  }

  std::vector<v1::Session> CreateMany(const std::string& prefix, int n) {
    std::vector<v1::Session> out;
    const std::string run = absl::StrCat(absl::ToUnixMicros(absl::Now()));
    for (int i = 0; i < n; ++i) {
      out.push_back(
          client_->MustCreate(absl::StrCat(prefix, "-", run, "-", i), 0, {{"i", absl::StrCat(i)}}));
    }
    return out;
  }

  void ExpectAllReadable(const std::vector<v1::Session>& sessions) {
    for (const v1::Session& s : sessions) {
      v1::Session got;
      grpc::Status st = client_->Get(s.token(), false, &got);
      EXPECT_TRUE(st.ok()) << s.user_id() << ": " << st.error_code() << " " << st.error_message();
      EXPECT_EQ(got.session_id(), s.session_id());
    }
  }

  // Reads each session until `node` holds its copy again (read repair), within a few seconds:
  // libmemcached retries a node that failed only after its retry timeout (1 s).
  void ReadUntilRepaired(const std::vector<v1::Session>& sessions, int node) {
    for (const v1::Session& s : sessions) {
      const absl::Time give_up = absl::Now() + absl::Seconds(5);
      bool repaired = false;
      while (!repaired && absl::Now() < give_up) {
        EXPECT_EQ(client_->GetCode(s.token()), grpc::StatusCode::OK);
        repaired = MemcachedHas(node, SessionKey(s.token()));
        if (!repaired) absl::SleepFor(absl::Milliseconds(100));
      }
      EXPECT_TRUE(repaired) << "node " << node << " never got its copy of " << s.user_id();
    }
  }

  // How the ledger, which authenticates every call by its session token, answers `token`.
  grpc::StatusCode OpenAccount(const std::string& token) {
    if (ledger_ == nullptr) ledger_ = v1::TransactionService::NewStub(server_->NewChannel());
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    ctx.AddMetadata("authorization", "Bearer " + token);
    v1::OpenAccountRequest req;
    req.set_currency("EUR");
    v1::Account account;
    return ledger_->OpenAccount(&ctx, req, &account).error_code();
  }

  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<SessionClient> client_;
  std::unique_ptr<v1::TransactionService::Stub> ledger_;
};

TEST_F(SessionReplicaTest, EverySessionIsOnBothNodes) {
  std::vector<v1::Session> sessions = CreateMany("both", 10);
  for (const v1::Session& s : sessions) {
    EXPECT_TRUE(MemcachedHas(1, SessionKey(s.token())));
    EXPECT_TRUE(MemcachedHas(2, SessionKey(s.token())));
  }
}

TEST_F(SessionReplicaTest, NodeThatRestartsEmptyLosesNothingAndIsRepairedOnRead) {
  std::vector<v1::Session> sessions = CreateMany("flap", 20);
  BackingServices({"restart-memcached", "1"});
  // A direct get of each key (a key dump that came back empty would prove nothing).
  for (const v1::Session& s : sessions) {
    ASSERT_FALSE(MemcachedHas(1, SessionKey(s.token()))) << "the restarted node came back full";
  }
  ExpectAllReadable(sessions);
  ReadUntilRepaired(sessions, 1);
  // Updates after the flap reach both copies again.
  v1::Session out;
  ASSERT_TRUE(client_->Update(sessions[0].token(), {{"after", "flap"}}, {}, 0, &out).ok());
  EXPECT_EQ(out.version(), 2);
  for (const int node : {1, 2}) {
    const std::optional<std::string> copy =
        MemcachedGetValue(node, SessionKey(sessions[0].token()));
    storage::v1::StoredSession stored;
    ASSERT_TRUE(copy.has_value() && stored.ParseFromString(*copy)) << "node " << node;
    EXPECT_EQ(stored.version(), 2) << "node " << node;
    EXPECT_EQ(stored.attributes().at("after"), "flap") << "node " << node;
  }
}

TEST_F(SessionReplicaTest, StoppingEitherNodeLosesNoSession) {
  std::vector<v1::Session> sessions = CreateMany("loss", 20);
  BackingServices({"stop-memcached", "1"});
  ExpectAllReadable(sessions);
  // Writes keep working on the surviving copy.
  v1::Session out;
  ASSERT_TRUE(client_->Update(sessions[0].token(), {{"during", "outage"}}, {}, 0, &out).ok());
  sessions.push_back(client_->MustCreate("created-during-outage"));
  // An end cannot reach the stopped copy: it holds on the other, but is not confirmed.
  EXPECT_EQ(client_->Delete(sessions[1].token()).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(client_->GetCode(sessions[1].token()), grpc::StatusCode::NOT_FOUND);

  BackingServices({"start-memcached", "1"});  // Comes back empty.
  std::vector<v1::Session> live = sessions;
  live.erase(live.begin() + 1);
  ReadUntilRepaired(live, 1);
  // The retry the UNAVAILABLE asked for puts the end on node 1 too.
  ASSERT_TRUE(client_->Delete(sessions[1].token()).ok());
  EXPECT_TRUE(MemcachedHas(1, SessionKey(sessions[1].token())));

  BackingServices({"stop-memcached", "2"});
  ExpectAllReadable(live);
  v1::Session got;
  ASSERT_TRUE(client_->Get(sessions[0].token(), false, &got).ok());
  EXPECT_EQ(got.attributes().at("during"), "outage");
  EXPECT_EQ(client_->GetCode(sessions[1].token()), grpc::StatusCode::NOT_FOUND);
}

TEST_F(SessionReplicaTest, RevocationHoldsWhenANodeLosesTheGenerationButCopiesLinger) {
  const std::string user = absl::StrCat("revoked-", absl::ToUnixMicros(absl::Now()));
  v1::Session s = client_->MustCreate(user);
  const std::string key = SessionKey(s.token());
  const std::optional<std::string> value = MemcachedGetValue(1, key);
  ASSERT_TRUE(value.has_value());
  v1::RevokeUserSessionsResponse revoked;
  ASSERT_TRUE(client_->Revoke(user, &revoked).ok());
  EXPECT_EQ(revoked.revoked(), 1);
  // Node 1 restarts and so forgets the user's generation; then stale copies of the session
  // reappear on both nodes (say, a delete that never reached them). Only the generation that
  // node 2 still holds can keep the session dead, so reads must consult it.
  BackingServices({"restart-memcached", "1"});
  ASSERT_TRUE(MemcachedSetRaw(1, key, *value, 60));
  ASSERT_TRUE(MemcachedSetRaw(2, key, *value, 60));
  // The user tag: hex of the first 16 bytes of SHA-256(user_id).
  const std::string generation_key = "sl:v1:g:" + SessionKey(user).substr(8, 32);
  EXPECT_FALSE(MemcachedHas(1, generation_key));
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(client_->GetCode(s.token()), grpc::StatusCode::NOT_FOUND);
    absl::SleepFor(absl::Milliseconds(150));  // Past libmemcached's 1 s retry of node 1.
  }
  // ... and the read repaired the generation on node 1.
  EXPECT_TRUE(MemcachedHas(1, generation_key));
  v1::Session fresh = client_->MustCreate(user);
  EXPECT_EQ(client_->GetCode(fresh.token()), grpc::StatusCode::OK);
}

// The ledger authenticates every call through the session layer's read-only path; it must fall
// through a copy that restarted empty and must honour revocation.
TEST_F(SessionReplicaTest, LedgerAuthenticationFallsThroughAnEmptyNodeAndHonoursRevocation) {
  // Sixteen users: each user's first copy is on node 1 or node 2, so (but for 1 in 65,536) some
  // have theirs on the node that restarts below.
  std::vector<v1::Session> sessions = CreateMany("auth", 16);
  BackingServices({"restart-memcached", "1"});
  absl::SleepFor(absl::Milliseconds(1200));  // Past libmemcached's retry timeout for node 1.
  for (const v1::Session& s : sessions) {
    EXPECT_EQ(OpenAccount(s.token()), grpc::StatusCode::OK) << s.session_id();
  }
  for (const v1::Session& s : sessions) {
    v1::RevokeUserSessionsResponse revoked;
    ASSERT_TRUE(client_->Revoke(s.user_id(), &revoked).ok());
    EXPECT_EQ(revoked.revoked(), 1);
    EXPECT_EQ(OpenAccount(s.token()), grpc::StatusCode::UNAUTHENTICATED) << s.session_id();
  }
}

// A copy that missed a deletion, a rotation or a second revocation (a node skipped for a
// second after it stalled) must not keep authorising ledger calls: authentication weighs every
// copy, whichever node holds the user's first copy.
TEST_F(SessionReplicaTest, LedgerAuthenticationHonoursEndsThatOneCopyMissed) {
  // Each `ended` session's key holds its end (a tombstone, or a live value under a raised
  // generation); one node at a time gets back the state from before the end.
  const auto expect_ended_on_both = [&](const std::string& token, const std::string& key,
                                        const std::string& before, const std::string& after) {
    for (int node : {1, 2}) {
      ASSERT_TRUE(MemcachedSetRaw(node, key, before, 60));
      EXPECT_EQ(OpenAccount(token), grpc::StatusCode::UNAUTHENTICATED)
          << "node " << node << " alone missed the end of " << key;
      ASSERT_TRUE(MemcachedSetRaw(node, key, after, 60));
    }
  };
  // Four users each: each user's first copy is on node 1 or node 2.
  for (const v1::Session& s : CreateMany("missed-delete", 4)) {
    const std::string key = SessionKey(s.token());
    ASSERT_EQ(OpenAccount(s.token()), grpc::StatusCode::OK);
    const std::optional<std::string> live = MemcachedGetValue(1, key);
    ASSERT_TRUE(live.has_value());
    ASSERT_TRUE(client_->Delete(s.token()).ok());
    const std::optional<std::string> tombstone = MemcachedGetValue(1, key);
    ASSERT_TRUE(tombstone.has_value()) << "DeleteSession leaves a tombstone under replicas";
    expect_ended_on_both(s.token(), key, *live, *tombstone);
  }
  for (const v1::Session& s : CreateMany("missed-rotate", 4)) {
    const std::string key = SessionKey(s.token());
    const std::optional<std::string> live = MemcachedGetValue(1, key);
    ASSERT_TRUE(live.has_value());
    v1::Session rotated;
    ASSERT_TRUE(client_->Rotate(s.token(), &rotated).ok());
    const std::optional<std::string> tombstone = MemcachedGetValue(1, key);
    ASSERT_TRUE(tombstone.has_value());
    expect_ended_on_both(s.token(), key, *live, *tombstone);
    EXPECT_EQ(OpenAccount(rotated.token()), grpc::StatusCode::OK);
  }
  // A second revocation that one copy missed: that copy still holds the first generation.
  for (const v1::Session& first : CreateMany("missed-revoke", 4)) {
    v1::RevokeUserSessionsResponse revoked;
    ASSERT_TRUE(client_->Revoke(first.user_id(), &revoked).ok());
    const std::string generation_key = "sl:v1:g:" + SessionKey(first.user_id()).substr(8, 32);
    const std::optional<std::string> first_generation = MemcachedGetValue(1, generation_key);
    ASSERT_TRUE(first_generation.has_value());
    const v1::Session s = client_->MustCreate(first.user_id());
    const std::string key = SessionKey(s.token());
    const std::optional<std::string> live = MemcachedGetValue(1, key);
    ASSERT_TRUE(live.has_value());
    ASSERT_EQ(OpenAccount(s.token()), grpc::StatusCode::OK);
    ASSERT_TRUE(client_->Revoke(first.user_id(), &revoked).ok());
    const std::optional<std::string> second_generation = MemcachedGetValue(1, generation_key);
    ASSERT_TRUE(second_generation.has_value());
    ASSERT_NE(*second_generation, *first_generation);
    // The session's copies linger (a removal that did not reach them), and one node at a time
    // holds the older generation.
    ASSERT_TRUE(MemcachedSetRaw(1, key, *live, 60));
    ASSERT_TRUE(MemcachedSetRaw(2, key, *live, 60));
    expect_ended_on_both(s.token(), generation_key, *first_generation, *second_generation);
  }
}

// ListUserSessions weighs every copy too: a copy that missed a deletion or an update must not
// list the session as live, or with its old attributes.
TEST_F(SessionReplicaTest, ListingHonoursWritesThatOneCopyMissed) {
  for (const v1::Session& s : CreateMany("list-missed", 4)) {
    const std::string key = SessionKey(s.token());
    const std::optional<std::string> first = MemcachedGetValue(1, key);
    ASSERT_TRUE(first.has_value());
    v1::Session updated;
    ASSERT_TRUE(client_->Update(s.token(), {{"i", "updated"}}, {}, 0, &updated).ok());
    const std::optional<std::string> second = MemcachedGetValue(1, key);
    ASSERT_TRUE(second.has_value());
    for (int node : {1, 2}) {
      ASSERT_TRUE(MemcachedSetRaw(node, key, *first, 60));
      v1::ListUserSessionsResponse listed;
      ASSERT_TRUE(client_->List(s.user_id(), &listed).ok());
      ASSERT_EQ(listed.sessions_size(), 1) << "node " << node;
      EXPECT_EQ(listed.sessions(0).attributes().at("i"), "updated") << "node " << node;
      ASSERT_TRUE(MemcachedSetRaw(node, key, *second, 60));
    }
    ASSERT_TRUE(client_->Delete(s.token()).ok());
    // A listing drops a deleted session from the index, so each node gets a session of its own
    // (the same user: the same first copy).
    for (int node : {1, 2}) {
      const v1::Session doomed = client_->MustCreate(s.user_id());
      const std::string doomed_key = SessionKey(doomed.token());
      const std::optional<std::string> live = MemcachedGetValue(1, doomed_key);
      ASSERT_TRUE(live.has_value());
      ASSERT_TRUE(client_->Delete(doomed.token()).ok());
      ASSERT_TRUE(MemcachedSetRaw(node, doomed_key, *live, 60));
      v1::ListUserSessionsResponse listed;
      ASSERT_TRUE(client_->List(s.user_id(), &listed).ok());
      EXPECT_EQ(listed.sessions_size(), 0) << "node " << node << " alone missed the deletion";
    }
  }
}

// One copy holds a live session with a later expiry, the other the tombstone of a
// DeleteSession: a touch's write to the other copies that landed after the tombstone (a plain
// set until 2026-12-03; now conditional, see session_store_test), or a deletion whose write to
// that copy failed. Reads must put the tombstone back on that copy for as long as the tombstone
// lasts, not only until the expiry it recorded from before the touch: a restart of the node
// that holds the tombstone would otherwise bring the deleted session back.
TEST_F(SessionReplicaTest, ATouchThatOvertookADeletionOnOneCopyStaysEnded) {
  struct Case {
    v1::Session session;
    int stale_node;
  };
  std::vector<Case> cases;
  const std::string run = absl::StrCat(absl::ToUnixMicros(absl::Now()));
  // Four users, whose first copies fall on either node; each node in turn holds the stale copy.
  for (int i = 0; i < 4; ++i) {
    for (int node : {1, 2}) {
      cases.push_back(
          {client_->MustCreate(absl::StrCat("touch-overtook-", run, "-", i), /*ttl=*/1), node});
    }
  }
  absl::Time old_expiry = absl::InfinitePast();
  for (const Case& c : cases) {
    const std::string key = SessionKey(c.session.token());
    const std::optional<std::string> live = MemcachedGetValue(1, key);
    ASSERT_TRUE(live.has_value());
    ASSERT_TRUE(client_->Delete(c.session.token()).ok());
    storage::v1::StoredSession touched;
    ASSERT_TRUE(touched.ParseFromString(*live));
    touched.set_expires_at_unix_micros(touched.expires_at_unix_micros() + 30'000'000);
    ASSERT_TRUE(MemcachedSetRaw(c.stale_node, key, touched.SerializeAsString(), 60));
    old_expiry = std::max(old_expiry, ToTime(c.session.expires_at()));
  }
  absl::SleepFor(old_expiry - absl::Now() + absl::Milliseconds(100));
  for (const Case& c : cases) {
    const std::string key = SessionKey(c.session.token());
    EXPECT_EQ(client_->GetCode(c.session.token()), grpc::StatusCode::NOT_FOUND);
    const std::optional<std::string> repaired = MemcachedGetValue(c.stale_node, key);
    storage::v1::StoredSession copy;
    ASSERT_TRUE(repaired.has_value() && copy.ParseFromString(*repaired));
    EXPECT_TRUE(copy.deleted()) << "node " << c.stale_node << " kept the touched copy";
    // The node that held the tombstone restarts empty.
    const int other = c.stale_node == 1 ? 2 : 1;
    MemcachedText(MemcachedPort(other), "delete " + key + "\r\nget " + key);
    EXPECT_EQ(client_->GetCode(c.session.token()), grpc::StatusCode::NOT_FOUND)
        << "the deleted session came back from node " << c.stale_node;
  }
}

// A touch slides expires_at without a new version. A copy that missed it (a node skipped for a
// second) must not hand back the earlier expiry, whichever node holds the first copy, and a read
// gives it the later one.
TEST_F(SessionReplicaTest, TouchThatOneCopyMissedIsKeptAndRepaired) {
  const std::vector<v1::Session> sessions = CreateMany("missed-touch", 4);
  // A touch writes only when it slides the expiry by a second or more.
  absl::SleepFor(absl::Milliseconds(1100));
  for (const v1::Session& s : sessions) {
    const std::string key = SessionKey(s.token());
    const std::optional<std::string> before = MemcachedGetValue(1, key);
    ASSERT_TRUE(before.has_value());
    v1::Session touched;
    ASSERT_TRUE(client_->Get(s.token(), true, &touched).ok());
    ASSERT_GT(ToTime(touched.expires_at()), ToTime(s.expires_at()));
    const std::optional<std::string> after = MemcachedGetValue(1, key);
    ASSERT_TRUE(after.has_value());
    ASSERT_EQ(MemcachedGetValue(2, key), after);
    for (int node : {1, 2}) {
      ASSERT_TRUE(MemcachedSetRaw(node, key, *before, 60));
      v1::Session got;
      ASSERT_TRUE(client_->Get(s.token(), false, &got).ok());
      EXPECT_EQ(ToTime(got.expires_at()), ToTime(touched.expires_at()))
          << "node " << node << " alone missed the touch";
      EXPECT_EQ(MemcachedGetValue(node, key), after) << "node " << node << " was not repaired";
    }
  }
}

TEST(SessionOutageTest, MemcachedDownIsUnavailableWithinTheDeadlineAndRecovers) {
  std::unique_ptr<ServerProcess> server = StartSessionServer();
  ASSERT_NE(server, nullptr);
  SessionClient client(*server);
  v1::Session s = client.MustCreate("outage-user");
  BackingServices({"stop-memcached", "1"});
  BackingServices({"stop-memcached", "2"});
  client.set_timeout(absl::Seconds(2));
  // Stopped nodes refuse connections: the server says so at once rather than retrying them
  // until the deadline (which would answer UNAVAILABLE too, at ~1.8 s).
  absl::Time start = absl::Now();
  v1::Session out;
  grpc::Status st = client.Get(s.token(), false, &out);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1)) << "GetSession waited on refused nodes";
  start = absl::Now();
  EXPECT_EQ(client.Create("outage-user", 0, &out).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_LT(absl::Now() - start, absl::Seconds(1)) << "CreateSession waited on refused nodes";

  BackingServices({"start-memcached", "1"});
  BackingServices({"start-memcached", "2"});
  // The same process serves again once memcached is back (no restart).
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  grpc::Status created;
  do {
    absl::SleepFor(absl::Milliseconds(200));
    created = client.Create("outage-user", 0, &out);
  } while (!created.ok() && absl::Now() < give_up);
  ASSERT_TRUE(created.ok()) << created.error_message();
  EXPECT_EQ(client.GetCode(out.token()), grpc::StatusCode::OK);
}

// A node that stalls (accepts connections, never answers) is what replicas are for: every
// session method must still work on the other copy within the server's default call timeout
// (5 s). The blocking methods make several round trips to each copy one after the other; before
// the pool shared what it learnt of a stalled node, each of them waited out the 2 s I/O timeout
// again, and ListUserSessions, RotateSession and RevokeUserSessions ran out of time.
TEST_F(SessionReplicaTest, StallingEitherNodeLeavesEveryMethodWorking) {
  for (int node : {1, 2}) {
    SCOPED_TRACE(absl::StrCat("node ", node, " stalled"));
    const std::string user = absl::StrCat("stall-", node, "-", absl::ToUnixMicros(absl::Now()));
    // After the previous round's thaw the server keeps off that node for a second (its
    // retry-after-failure), and a session created meanwhile would have one copy only.
    absl::SleepFor(absl::Milliseconds(1500));
    const v1::Session first = client_->MustCreate(user);
    const v1::Session second = client_->MustCreate(user);
    for (const v1::Session* s : {&first, &second}) {
      ASSERT_TRUE(MemcachedHas(1, SessionKey(s->token())) &&
                  MemcachedHas(2, SessionKey(s->token())))
          << "a session is not on both nodes before the stall";
    }
    const FrozenMemcached frozen({node});
    client_->set_timeout(absl::Seconds(10));
    v1::Session out;
    grpc::Status st = client_->Get(first.token(), false, &out);
    EXPECT_TRUE(st.ok()) << "GetSession: " << st.error_message();
    st = client_->Update(first.token(), {{"during", "stall"}}, {}, 0, &out);
    EXPECT_TRUE(st.ok()) << "UpdateSession: " << st.error_message();
    st = client_->Create(user, 0, &out);
    EXPECT_TRUE(st.ok()) << "CreateSession: " << st.error_message();
    v1::ListUserSessionsResponse listed;
    st = client_->List(user, &listed);
    EXPECT_TRUE(st.ok()) << "ListUserSessions: " << st.error_message();
    // Ends must reach every copy before they answer OK (see EndsAnswerOkOnlyOnEveryCopy): a
    // rotation does not start while a copy is silent, a revocation holds where it landed;
    // both ask for a retry.
    st = client_->Rotate(second.token(), &out);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << "RotateSession";
    EXPECT_THAT(st.error_message(), HasSubstr("nothing was changed"));
    EXPECT_EQ(client_->GetCode(second.token()), grpc::StatusCode::OK) << "rotation not started";
    v1::RevokeUserSessionsResponse revoked;
    st = client_->Revoke(user, &revoked);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << "RevokeUserSessions";
    EXPECT_EQ(client_->GetCode(first.token()), grpc::StatusCode::NOT_FOUND) << "revoked";
  }
}

// An end (DeleteSession, RotateSession, RevokeUserSessions) answers OK only once every copy
// holds it. Otherwise a copy that missed it (its node stalled) would keep the session, and once
// the node that had taken the end restarted empty, the ended token would work again.
TEST_F(SessionReplicaTest, EndsAnswerOkOnlyOnEveryCopy) {
  const std::string run = absl::StrCat(absl::ToUnixMicros(absl::Now()));
  const v1::Session deleted = client_->MustCreate("end-delete-" + run);
  const v1::Session rotated = client_->MustCreate("end-rotate-" + run);
  const v1::Session revoked = client_->MustCreate("end-revoke-" + run);
  client_->set_timeout(absl::Seconds(10));
  v1::Session new_session;
  v1::RevokeUserSessionsResponse count;
  {
    const FrozenMemcached frozen({2});
    EXPECT_EQ(client_->Delete(deleted.token()).error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(client_->Rotate(rotated.token(), &new_session).error_code(),
              grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(client_->Revoke(revoked.user_id(), &count).error_code(),
              grpc::StatusCode::UNAVAILABLE);
  }
  // The retries, once node 2 answers again (after the second it is skipped as stalled).
  absl::SleepFor(absl::Milliseconds(1500));
  ASSERT_TRUE(client_->Delete(deleted.token()).ok());
  ASSERT_TRUE(client_->Rotate(rotated.token(), &new_session).ok());
  ASSERT_TRUE(client_->Revoke(revoked.user_id(), &count).ok());
  // Node 1, which took every end the first time, restarts empty: node 2 alone must keep them.
  BackingServices({"restart-memcached", "1"});
  absl::SleepFor(absl::Milliseconds(1200));  // Past libmemcached's retry timeout for node 1.
  EXPECT_EQ(OpenAccount(deleted.token()), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(OpenAccount(rotated.token()), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(OpenAccount(revoked.token()), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(OpenAccount(new_session.token()), grpc::StatusCode::OK);
  // The revocation holds without the user's generation too, should memcached evict it: its
  // retry gave the session a tombstone, although the first attempt had raised the generation.
  const std::string generation_key = "sl:v1:g:" + SessionKey(revoked.user_id()).substr(8, 32);
  bool held = false;
  for (int node : {1, 2}) {
    // "get" after the delete ends the reply with the END that MemcachedText waits for.
    held = absl::StartsWith(MemcachedText(MemcachedPort(node),
                                          "delete " + generation_key + "\r\nget " + generation_key),
                            "DELETED") ||
           held;
  }
  ASSERT_TRUE(held) << "no node held " << generation_key;
  EXPECT_EQ(OpenAccount(revoked.token()), grpc::StatusCode::UNAUTHENTICATED);
}

// A caller whose own deadline ends while it waits on a node says nothing about the node: the
// node must not be skipped afterwards as stalled.
TEST(SessionOutageTest, ACallerThatGivesUpEarlyDoesNotMarkTheNodeStalled) {
  std::unique_ptr<ServerProcess> server = StartSessionServer();
  ASSERT_NE(server, nullptr);
  SessionClient client(*server);
  const std::string user = absl::StrCat("hurry-", absl::ToUnixMicros(absl::Now()));
  client.MustCreate(user);
  {
    const FrozenMemcached frozen;
    client.set_timeout(absl::Milliseconds(800));  // Shorter than the node's 2 s I/O timeout.
    v1::ListUserSessionsResponse listed;
    // The server answers shortly before the caller's deadline; on a loaded machine that answer
    // can arrive after it. Either way the call failed; what counts is the next one.
    EXPECT_THAT(
        client.List(user, &listed).error_code(),
        ::testing::AnyOf(grpc::StatusCode::UNAVAILABLE, grpc::StatusCode::DEADLINE_EXCEEDED));
  }
  client.set_timeout(absl::Seconds(5));
  v1::ListUserSessionsResponse listed;
  const grpc::Status st = client.List(user, &listed);
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(listed.sessions_size(), 1);
}

// gRPC's shutdown ends with the connections (or the grace period), not with the asynchronous
// calls: a GetSession that its client cancelled while it waited on a stalled memcached was
// answered after the server had shut the calls' queues, and the process died at exit instead
// of exiting 0. (A call timeout above the grace period is allowed, with a warning.)
TEST(SessionOutageTest, ShutdownWaitsForACancelledCallStillWaitingOnMemcached) {
  // One stalled node, so the call has nowhere else to go.
  std::unique_ptr<ServerProcess> server = StartSessionServer(
      {{"MEMCACHED_URL", absl::StrCat("memcached://127.0.0.1:", MemcachedPort(1))},
       {"SHUTDOWN_NOTICE_MS", "0"},
       {"SHUTDOWN_GRACE_SECONDS", "1"},
       {"DEFAULT_CALL_TIMEOUT_MS", "4000"}},
      /*serve_metrics=*/true);
  ASSERT_NE(server, nullptr);
  const int metrics_port = server->metrics_port();
  const auto one_call_in_flight = [&] { return RpcsInFlight(metrics_port, 1); };
  SessionClient client(*server);
  const v1::Session s =
      client.MustCreate(absl::StrCat("shutdown-cancelled-", absl::ToUnixMicros(absl::Now())));
  const FrozenMemcached frozen({1});
  auto stub = v1::SessionService::NewStub(server->NewChannel());
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
  v1::GetSessionRequest request;
  request.set_token(s.token());
  v1::Session response;
  grpc::Status status;
  std::thread call([&] { status = stub->GetSession(&context, request, &response); });
  // The call reached the server and waits on the frozen node.
  EXPECT_TRUE(PollUntil(absl::Now() + absl::Seconds(10), one_call_in_flight));
  context.TryCancel();
  call.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << status.error_message();
  ASSERT_TRUE(one_call_in_flight()) << "the cancelled call no longer waits: nothing to test";
  server->Signal(SIGTERM);
  // While it drains, the gauge counts that one call until it ends. gRPC also hands the
  // interceptors every call the server had asked for and will now never get; those were once
  // counted too, 52 more.
  const std::string gauge = "\nsessionledger_rpc_in_flight ";
  int scrapes_while_draining = 0;
  std::string unexpected;
  while (!server->WaitForExit(absl::Milliseconds(50)).has_value()) {
    const absl::StatusOr<std::string> metrics = HttpGet(metrics_port, "/metrics");
    const size_t at = metrics.ok() ? metrics->find(gauge) : std::string::npos;
    if (at == std::string::npos) continue;  // The metrics endpoint has closed.
    ++scrapes_while_draining;
    const size_t from = at + gauge.size();
    const std::string value = metrics->substr(from, metrics->find('\n', from) - from);
    if (value != "1" && value != "0" && unexpected.empty()) unexpected = value;
  }
  EXPECT_GT(scrapes_while_draining, 0) << "the drain ended before one scrape: nothing checked";
  EXPECT_EQ(unexpected, "") << "calls in flight while draining one";
  const std::optional<int> exit_code = server->WaitForExit(absl::Seconds(20));
  ASSERT_TRUE(exit_code.has_value()) << "still running after SIGTERM";
  EXPECT_EQ(*exit_code, 0) << server->Output();
}

TEST(SessionOutageTest, StalledMemcachedIsUnavailableWithinTheDeadline) {
  std::unique_ptr<ServerProcess> server = StartSessionServer();
  ASSERT_NE(server, nullptr);
  SessionClient client(*server);
  v1::Session s = client.MustCreate("stall-user");
  {
    const FrozenMemcached frozen;
    // Well over the node's I/O timeout (2 s), at which the server answers: a loaded (or
    // sanitized) machine may take a second more to get there.
    const absl::Duration deadline = absl::Seconds(5);
    client.set_timeout(deadline);
    const absl::Time start = absl::Now();
    v1::Session out;
    grpc::Status st = client.Get(s.token(), false, &out);
    const absl::Duration took = absl::Now() - start;
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
    // By the I/O timeout and a margin, before the server's own cut-off for the deadline (half a
    // second before it), which would answer UNAVAILABLE too, whatever the I/O timeout.
    EXPECT_LT(took, absl::Seconds(3.5)) << "answered by the call's deadline, not the I/O timeout";
    std::cout << "stalled GetSession answered " << st.error_code() << " after " << took << " of a "
              << deadline << " deadline\n";
  }
  client.set_timeout(absl::Seconds(5));
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  grpc::StatusCode code;
  do {
    code = client.GetCode(s.token());
    if (code != grpc::StatusCode::OK) absl::SleepFor(absl::Milliseconds(200));
  } while (code != grpc::StatusCode::OK && absl::Now() < give_up);
  EXPECT_EQ(code, grpc::StatusCode::OK);
}

}  // namespace
}  // namespace sessionledger::testing
