// Concurrent updates of one session through two server processes on the real memcached.
#include <atomic>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/integration/session_test_support.h"

namespace sessionledger::testing {
namespace {

class SessionConcurrencyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    a_ = StartSessionServer();
    b_ = StartSessionServer();
    ASSERT_TRUE(a_ != nullptr && b_ != nullptr);
  }
  std::unique_ptr<ServerProcess> a_;
  std::unique_ptr<ServerProcess> b_;
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
TEST(SessionConcurrencyReplicatedTest, UnconditionalUpdatesFromTwoServersAllSurvive) {
  const std::map<std::string, std::optional<std::string>> replicated = {
      {"MEMCACHED_URL", RequiredEnv("MEMCACHED_URL_REPLICATED")}};
  auto a = StartSessionServer(replicated);
  auto b = StartSessionServer(replicated);
  ASSERT_TRUE(a != nullptr && b != nullptr);
  ExpectUnconditionalUpdatesAllSurvive(*a, *b);
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
  for (int round = 0; round < 20; ++round) {
    const int64_t version = 1 + round;
    std::atomic<int> ready{0};
    grpc::Status results[2];
    std::vector<std::thread> threads;
    for (int w = 0; w < 2; ++w) {
      threads.emplace_back([&, w] {
        SessionClient& client = writers[w];
        ++ready;
        while (ready.load() < 2) {
        }
        v1::Session out;
        results[w] = client.Update(s.token(), {{"winner", absl::StrCat(w)}}, {}, version, &out);
      });
    }
    for (auto& t : threads) t.join();
    const int ok = results[0].ok() + results[1].ok();
    ASSERT_EQ(ok, 1) << "round " << round << ": " << results[0].error_message() << " / "
                     << results[1].error_message();
    const grpc::Status& loser = results[0].ok() ? results[1] : results[0];
    EXPECT_EQ(loser.error_code(), grpc::StatusCode::ABORTED) << loser.error_message();
  }
  v1::Session final_session;
  ASSERT_TRUE(setup.Get(s.token(), false, &final_session).ok());
  EXPECT_EQ(final_session.version(), 21);
}

}  // namespace
}  // namespace sessionledger::testing
