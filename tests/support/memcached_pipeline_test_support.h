#ifndef SESSIONLEDGER_TESTS_SUPPORT_MEMCACHED_PIPELINE_TEST_SUPPORT_H_
#define SESSIONLEDGER_TESTS_SUPPORT_MEMCACHED_PIPELINE_TEST_SUPPORT_H_

// Helpers shared by the MemcachedPipeline tests, those on the real memcached nodes and those on a
// scripted server. Header-only: the test binaries that include it link sl_memcached, which
// sl_test_support does not.
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/common/clock.h"
#include "server/common/notification.h"
#include "server/config/config.h"
#include "server/memcached/memcached_pipeline.h"

namespace sessionledger::testing {

// CI runs these tests under ASan on two cores: time bounds get this much slack above what they
// check.
inline constexpr absl::Duration kMargin = absl::Milliseconds(1500);

// A deadline `d` from now.
inline absl::Time Deadline(absl::Duration d = absl::Seconds(10)) { return absl::Now() + d; }

// A pipeline with `options` (nullptr, and a failed test, when it cannot start).
inline std::unique_ptr<MemcachedPipeline> StartPipeline(const MemcachedPipelineOptions& options) {
  absl::StatusOr<std::unique_ptr<MemcachedPipeline>> reader = MemcachedPipeline::Start(options);
  EXPECT_TRUE(reader.ok()) << reader.status();
  return reader.ok() ? std::move(*reader) : nullptr;
}

// A pipeline on `nodes` (nullptr, and a failed test, when it cannot start).
inline std::unique_ptr<MemcachedPipeline> StartReader(
    std::vector<MemcachedNode> nodes, absl::Duration io_timeout = absl::Seconds(5),
    absl::Duration retry_after_failure = absl::Seconds(1), const Clock* wall_clock = nullptr) {
  MemcachedPipelineOptions options;
  options.nodes = std::move(nodes);
  options.io_timeout = io_timeout;
  options.retry_after_failure = retry_after_failure;
  options.wall_clock = wall_clock;
  return StartPipeline(options);
}

// The reply memcached sends for `stored`.
inline std::string StoredName(MemcachedStored stored) {
  switch (stored) {
    case MemcachedStored::kStored:
      return "STORED";
    case MemcachedStored::kNotStored:
      return "NOT_STORED";
    case MemcachedStored::kExists:
      return "EXISTS";
    case MemcachedStored::kNotFound:
      return "NOT_FOUND";
  }
  return "?";
}

// Whether a storage command was answered `want` (rather than another reply or an error).
inline ::testing::AssertionResult IsReply(const absl::StatusOr<MemcachedStored>& got,
                                          MemcachedStored want) {
  if (!got.ok()) {
    return ::testing::AssertionFailure() << got.status() << ", want " << StoredName(want);
  }
  if (*got != want) {
    return ::testing::AssertionFailure() << StoredName(*got) << ", want " << StoredName(want);
  }
  return ::testing::AssertionSuccess();
}

// What an asynchronous call answered, when, and on which thread its callback ran.
template <typename T>
struct AsyncAnswer {
  absl::StatusOr<T> result = absl::DeadlineExceededError("no callback in time");
  absl::Time at;
  std::thread::id thread;
};

// The callback of one asynchronous call, and a wait for it. The state is shared with the
// callback, so a callback that comes after a timed-out wait writes to nothing freed.
template <typename T>
class Pending {
 public:
  absl::AnyInvocable<void(absl::StatusOr<T>) &&> Callback() const {
    return [state = state_](absl::StatusOr<T> result) {
      state->answer.result = std::move(result);
      state->answer.at = absl::Now();
      state->answer.thread = std::this_thread::get_id();
      state->done.Notify();
    };
  }
  // The answer, or DEADLINE_EXCEEDED when no callback ran within `timeout`.
  AsyncAnswer<T> Wait(absl::Duration timeout = absl::Seconds(30)) const {
    if (!state_->done.WaitForNotificationWithTimeout(timeout)) return AsyncAnswer<T>{};
    return state_->answer;
  }

 private:
  struct State {
    Notification done;
    AsyncAnswer<T> answer;
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

// Whether `got` is exactly one hit, `key` holding `value`; values are not printed (some are
// 100 KB).
inline ::testing::AssertionResult HitIs(const absl::StatusOr<MemcachedHits>& got,
                                        const std::string& key, const std::string& value) {
  if (!got.ok()) return ::testing::AssertionFailure() << got.status();
  if (got->size() != 1 || got->count(key) != 1) {
    return ::testing::AssertionFailure() << got->size() << " hits, want just " << key;
  }
  const std::string& v = got->at(key).value;
  if (v != value) {
    return ::testing::AssertionFailure() << key << ": value of " << v.size()
                                         << " bytes differs (want " << value.size() << " bytes)";
  }
  return ::testing::AssertionSuccess();
}

}  // namespace sessionledger::testing

#endif  // SESSIONLEDGER_TESTS_SUPPORT_MEMCACHED_PIPELINE_TEST_SUPPORT_H_
