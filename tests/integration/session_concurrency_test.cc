// Concurrent updates and rotations of one session through two server processes on the real
// memcached.
#include <algorithm>
#include <atomic>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/integration/session_test_support.h"

namespace sessionledger::testing {
namespace {

class SessionConcurrencyTest : public ::testing::Test {
 protected:
  void SetUp() override { StartServers({}); }
  void StartServers(const std::map<std::string, std::optional<std::string>>& env) {
    a_ = StartSessionServer(env);
    b_ = StartSessionServer(env);
    ASSERT_TRUE(a_ != nullptr && b_ != nullptr);
  }
  std::unique_ptr<ServerProcess> a_;
  std::unique_ptr<ServerProcess> b_;
};

// The same two servers on memcached with a replica (MEMCACHED_URL_REPLICATED).
class SessionConcurrencyReplicatedTest : public SessionConcurrencyTest {
 protected:
  void SetUp() override {
    StartServers({{"MEMCACHED_URL", RequiredEnv("MEMCACHED_URL_REPLICATED")}});
  }
};

// Unconditional updates (expected_version 0) from 8 threads, half through each server: the
// servers retry compare-and-swap themselves, so every update must be in the final session.
void ExpectUnconditionalUpdatesAllSurvive(ServerProcess& a, ServerProcess& b) {
  constexpr int kThreads = 8;
  constexpr int kUpdates = 200;
  SessionClient creator(a);
  const v1::Session s = creator.MustCreate(absl::StrCat("conc-", absl::ToUnixMicros(absl::Now())));
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Half the threads go through each server, each over its own connection.
      SessionClient client(t % 2 == 0 ? a : b);
      for (int i = 0; i < kUpdates; ++i) {
        v1::Session out;
        grpc::Status st =
            client.Update(s.token(), {{absl::StrCat("t", t, "-", i), "x"}}, {}, 0, &out);
        if (!st.ok()) {
          ++failures;
          ADD_FAILURE() << st.error_code() << " " << st.error_message();
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  SessionClient reader(b);
  v1::Session final_session;
  ASSERT_TRUE(reader.Get(s.token(), false, &final_session).ok());
  EXPECT_EQ(final_session.attributes_size(), kThreads * kUpdates);
  EXPECT_EQ(final_session.version(), 1 + kThreads * kUpdates);
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kUpdates; ++i) {
      ASSERT_EQ(final_session.attributes().count(absl::StrCat("t", t, "-", i)), 1u)
          << "lost update t" << t << "-" << i;
    }
  }
}

TEST_F(SessionConcurrencyTest, UnconditionalUpdatesFromTwoServersAllSurvive) {
  ExpectUnconditionalUpdatesAllSurvive(*a_, *b_);
}

// With a replica, reads that meet a write half-way (the primary copy changed, the other not
// yet, or the other way round) repair the stale copy. A repair must never overwrite a newer
// write on the primary, where every writer's compare-and-swap meets.
TEST_F(SessionConcurrencyReplicatedTest, UnconditionalUpdatesFromTwoServersAllSurvive) {
  ExpectUnconditionalUpdatesAllSurvive(*a_, *b_);
}

TEST_F(SessionConcurrencyTest, ExactlyOneOfTwoSameVersionWritersWins) {
  SessionClient setup(*a_);
  const v1::Session s = setup.MustCreate(absl::StrCat("race-", absl::ToUnixMicros(absl::Now())));
  // Each writer's channel is connected by a first call before the rounds: a connection opened
  // after the barrier takes longer than an update, so the two writes would rarely overlap and
  // the test would pass without compare-and-swap.
  SessionClient writers[2] = {SessionClient(*a_), SessionClient(*b_)};
  for (SessionClient& writer : writers) {
    v1::Session warm;
    ASSERT_TRUE(writer.Get(s.token(), false, &warm).ok());
  }
  int overlapping_rounds = 0;
  for (int round = 0; round < 20; ++round) {
    const int64_t version = 1 + round;
    std::atomic<int> ready{0};
    grpc::Status results[2];
    absl::Time began[2], ended[2];
    std::vector<std::thread> threads;
    for (int w = 0; w < 2; ++w) {
      threads.emplace_back([&, w] {
        SessionClient& client = writers[w];
        ++ready;
        while (ready.load() < 2) {
        }
        v1::Session out;
        began[w] = absl::Now();
        results[w] = client.Update(s.token(), {{"winner", absl::StrCat(w)}}, {}, version, &out);
        ended[w] = absl::Now();
      });
    }
    for (auto& t : threads) t.join();
    // Without an overlap the expected_version check alone picks the winner, CAS or not.
    if (std::max(began[0], began[1]) < std::min(ended[0], ended[1])) ++overlapping_rounds;
    const int ok = results[0].ok() + results[1].ok();
    ASSERT_EQ(ok, 1) << "round " << round << ": " << results[0].error_message() << " / "
                     << results[1].error_message();
    const grpc::Status& loser = results[0].ok() ? results[1] : results[0];
    EXPECT_EQ(loser.error_code(), grpc::StatusCode::ABORTED) << loser.error_message();
  }
  v1::Session final_session;
  ASSERT_TRUE(setup.Get(s.token(), false, &final_session).ok());
  EXPECT_EQ(final_session.version(), 21);
  EXPECT_GT(overlapping_rounds, 0)
      << "the two updates were never in flight at once: the test raced nothing";
}

// One RotateSession call of a race, and when the client had it in flight.
struct TimedRotation {
  grpc::Status status;
  v1::Session rotated;
  absl::Time began;
  absl::Time ended;
};

// Two rotations of one token, one through each server, released together, on a fresh session
// each round. The old session ends by compare-and-swap, so exactly one rotation succeeds. The
// loser either read the old session after the winner had ended it, or lost the
// compare-and-swap, removed its new session and read the old one again: NOT_FOUND either way.
// (ABORTED never leaves RotateSession, and UNAVAILABLE would mean a backing service failed or
// was too slow for a 10 s deadline, which this healthy setup does not expect.) The loser's new
// session must not survive: the user lists the winner's session and nothing else.
void ExpectOneOfTwoConcurrentRotationsWins(ServerProcess& a, ServerProcess& b) {
  constexpr int kRounds = 20;
  SessionClient setup(a);
  // As in ExactlyOneOfTwoSameVersionWritersWins, each rotator's channel is connected before the
  // rounds, or the two calls of a round would rarely overlap.
  SessionClient rotators[2] = {SessionClient(a), SessionClient(b)};
  for (SessionClient& rotator : rotators) {
    v1::ListUserSessionsResponse warm;
    ASSERT_TRUE(rotator.List("rotate-race-warm-up", &warm).ok());
  }
  const std::string user_prefix = absl::StrCat("rotate-race-", absl::ToUnixMicros(absl::Now()));
  int overlapping_rounds = 0;
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    // A user of its own per round, so that the listing shows this round's sessions only.
    const std::string user = absl::StrCat(user_prefix, "-", round);
    const v1::Session old = setup.MustCreate(user);
    ASSERT_FALSE(old.token().empty());
    std::atomic<int> ready{0};
    TimedRotation calls[2];
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back([&, r] {
        ++ready;
        while (ready.load() < 2) {
        }
        calls[r].began = absl::Now();
        calls[r].status = rotators[r].Rotate(old.token(), &calls[r].rotated);
        calls[r].ended = absl::Now();
      });
    }
    for (auto& t : threads) t.join();
    // Both in flight at once (as the client saw it): each began before the other ended.
    if (std::max(calls[0].began, calls[1].began) < std::min(calls[0].ended, calls[1].ended)) {
      ++overlapping_rounds;
    }

    const int succeeded = calls[0].status.ok() + calls[1].status.ok();
    ASSERT_LE(succeeded, 1) << "both rotations of one token succeeded";
    ASSERT_EQ(succeeded, 1) << "neither rotation succeeded: " << calls[0].status.error_code() << " "
                            << calls[0].status.error_message() << " / "
                            << calls[1].status.error_code() << " "
                            << calls[1].status.error_message();
    const TimedRotation& winner = calls[0].status.ok() ? calls[0] : calls[1];
    const TimedRotation& loser = calls[0].status.ok() ? calls[1] : calls[0];
    EXPECT_EQ(loser.status.error_code(), grpc::StatusCode::NOT_FOUND)
        << loser.status.error_message();
    for (SessionClient& reader : rotators) {
      EXPECT_EQ(reader.GetCode(old.token()), grpc::StatusCode::NOT_FOUND)
          << "the old token still works";
      v1::Session current;
      const grpc::Status got = reader.Get(winner.rotated.token(), false, &current);
      EXPECT_TRUE(got.ok()) << "the winner's new token: " << got.error_code() << " "
                            << got.error_message();
      EXPECT_EQ(current.session_id(), winner.rotated.session_id());
    }
    v1::ListUserSessionsResponse listed;
    const grpc::Status list_status = setup.List(user, &listed);
    ASSERT_TRUE(list_status.ok()) << list_status.error_message();
    std::vector<std::string> listed_ids;
    for (const v1::Session& s : listed.sessions()) listed_ids.push_back(s.session_id());
    EXPECT_EQ(listed_ids, std::vector<std::string>{winner.rotated.session_id()})
        << "the loser's new session survived, or the winner's is not listed";
  }
  EXPECT_GT(overlapping_rounds, 0)
      << "the two rotations were never in flight at once: the test raced nothing";
}

TEST_F(SessionConcurrencyTest, OneOfTwoConcurrentRotationsWins) {
  ExpectOneOfTwoConcurrentRotationsWins(*a_, *b_);
}

// With a replica, the old session ends on both copies (a compare-and-swap on the copy that was
// read, then a write to the other): a rotation that reads it half-way must still lose.
TEST_F(SessionConcurrencyReplicatedTest, OneOfTwoConcurrentRotationsWins) {
  ExpectOneOfTwoConcurrentRotationsWins(*a_, *b_);
}

}  // namespace
}  // namespace sessionledger::testing
