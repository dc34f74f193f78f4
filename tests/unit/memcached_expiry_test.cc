// MemcachedExptime against a model of memcached's clock (memcached.c, clock_handler): a timer
// re-armed for one second each time it fires sets current_time to the whole monotonic seconds
// at that instant, and an item is gone once current_time >= the current_time it was stored at
// plus its exptime. The timer fires a little late each time, so its phase drifts; when the phase
// crosses a second boundary the clock steps by two. Measured on memcached 1.6.18 (Debian 12):
// about 0.8 ms of drift per tick.

#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/memcached/memcached_session_store.h"

namespace sessionledger {
namespace {

class ModelClock {
 public:
  // Ticks from `first_tick` seconds on, each `1 + drift` seconds after the previous one.
  ModelClock(double first_tick, double drift, double horizon) {
    for (double t = first_tick; t < horizon; t += 1 + drift) ticks_.push_back(t);
  }

  // When an item stored at `stored_at` (seconds, after the first tick) with `exptime` stops
  // being returned; infinity when that is past the horizon.
  double LapsesAt(double stored_at, int64_t exptime) const {
    size_t i = 0;
    while (i + 1 < ticks_.size() && ticks_[i + 1] <= stored_at) ++i;
    const int64_t expires = ClockAt(i) + exptime;
    for (size_t j = i + 1; j < ticks_.size(); ++j) {
      if (ClockAt(j) >= expires) return ticks_[j];
    }
    return INFINITY;
  }

  double first() const { return ticks_.front(); }

 private:
  int64_t ClockAt(size_t tick) const { return static_cast<int64_t>(std::floor(ticks_[tick])); }
  std::vector<double> ticks_;
};

TEST(MemcachedExptimeTest, ItemOutlivesItsTtlAcrossClockSteps) {
  const std::vector<double> ttls = {0.2, 1.0, 1.5, 2.0, 2.999, 7.0};
  // A first tick just before a second boundary puts a step early in the run for any drift.
  for (double first_tick : {0.0, 0.5, 0.99, 0.9995}) {
    for (double drift : {0.0, 0.0008, 0.004, 0.02}) {
      const ModelClock clock(first_tick, drift, 40.0);
      for (double ttl : ttls) {
        const absl::StatusOr<time_t> exptime = MemcachedExptime(absl::Seconds(ttl));
        ASSERT_TRUE(exptime.ok()) << exptime.status();
        for (double stored_at = clock.first(); stored_at < 20.0; stored_at += 0.0007) {
          const double lifetime = clock.LapsesAt(stored_at, *exptime) - stored_at;
          ASSERT_GE(lifetime, ttl)
              << "first tick " << first_tick << ", drift " << drift << ", ttl " << ttl
              << ", stored at " << stored_at << ", exptime " << *exptime;
        }
      }
    }
  }
}

// memcached reads an exptime up to 30 days as seconds from now and any larger one as a Unix
// time. A TTL whose spare seconds take it past 30 days (the contract allows 30-day lifetimes)
// is written as a Unix time with the same spare seconds, not cut to 30 days (it used to be,
// and such a session lapsed up to two seconds early) nor sent as seconds (a date in 1970: gone
// at once).
TEST(MemcachedExptimeTest, RelativeUpToThirtyDaysThenAUnixTimeWithTheSameMargin) {
  constexpr int64_t kThirtyDays = 30 * 24 * 3600;
  const absl::Time now = absl::FromUnixMicros(1'800'000'000'250'000);  // 0.25 s past a second.
  EXPECT_EQ(*MemcachedExptime(absl::Seconds(kThirtyDays - 2), now), kThirtyDays);
  EXPECT_EQ(*MemcachedExptime(absl::Seconds(kThirtyDays - 2.5), now), kThirtyDays);
  // ceil(now + ttl) + 2 at the least: ToUnixSeconds(now) + 1 + ttl + 2.
  EXPECT_EQ(*MemcachedExptime(absl::Seconds(kThirtyDays - 1), now),
            1'800'000'000 + 1 + kThirtyDays - 1 + 2);
  EXPECT_EQ(*MemcachedExptime(absl::Seconds(kThirtyDays), now),
            1'800'000'000 + 1 + kThirtyDays + 2);
  EXPECT_EQ(*MemcachedExptime(absl::Seconds(kThirtyDays + 60), now),
            1'800'000'000 + 1 + kThirtyDays + 60 + 2);
  EXPECT_EQ(*MemcachedExptime(kMaxStoreTtl, now),
            1'800'000'000 + 1 + absl::ToInt64Seconds(kMaxStoreTtl) + 2);
  for (absl::Duration ttl : {absl::Seconds(kThirtyDays - 1), absl::Seconds(kThirtyDays + 60)}) {
    const int64_t exptime = *MemcachedExptime(ttl, now);
    EXPECT_GE(absl::FromUnixSeconds(exptime), now + ttl + absl::Seconds(2)) << ttl;
  }

  const absl::StatusOr<time_t> too_long = MemcachedExptime(kMaxStoreTtl + absl::Seconds(1), now);
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(too_long.status().message().find("is above"), absl::string_view::npos);
}

}  // namespace
}  // namespace sessionledger
