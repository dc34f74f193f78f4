#include <cstdint>

#include "client/latency_histogram.h"
#include "gtest/gtest.h"

namespace sessionledger::client {
namespace {

TEST(LatencyHistogramTest, EmptyReportsZero) {
  LatencyHistogram h;
  EXPECT_EQ(h.count(), 0u);
  EXPECT_EQ(h.ValueAtQuantile(0.5), 0u);
}

TEST(LatencyHistogramTest, SmallValuesAreExact) {
  LatencyHistogram h;
  for (uint64_t v = 1; v <= 100; ++v) h.Record(v);
  EXPECT_EQ(h.count(), 100u);
  EXPECT_EQ(h.ValueAtQuantile(0.5), 50u);
  EXPECT_EQ(h.ValueAtQuantile(0.99), 99u);
  EXPECT_EQ(h.ValueAtQuantile(1.0), 100u);
  EXPECT_EQ(h.max(), 100u);
}

TEST(LatencyHistogramTest, LargeValuesWithinTwoPercent) {
  // 1 µs .. 10 s in 1 µs steps would be too many; use a geometric spread.
  for (uint64_t v : {uint64_t{150}, uint64_t{1'234}, uint64_t{98'765}, uint64_t{1'000'000},
                     uint64_t{2'500'000}, uint64_t{123'456'789}, uint64_t{9'876'543'210}}) {
    LatencyHistogram h;
    h.Record(v);
    h.Record(v * 3);  // max above, so the cap does not hide the bucket error
    const double reported = static_cast<double>(h.ValueAtQuantile(0.5));
    EXPECT_NEAR(reported, static_cast<double>(v), static_cast<double>(v) * 0.02) << v;
  }
}

TEST(LatencyHistogramTest, QuantilesOfUniformSpread) {
  LatencyHistogram h;
  // 1 ms .. 100 ms in 10 µs steps: 9901 samples.
  for (uint64_t us = 1000; us <= 100'000; us += 10) h.Record(us * 1000);
  auto near = [&](double q, double expected_ms) {
    const double ms = static_cast<double>(h.ValueAtQuantile(q)) / 1e6;
    EXPECT_NEAR(ms, expected_ms, expected_ms * 0.02) << q;
  };
  near(0.5, 50.5);
  near(0.9, 90.1);
  near(0.99, 99.01);
  near(0.999, 99.9);
}

TEST(LatencyHistogramTest, MergeAddsCountsAndKeepsMax) {
  LatencyHistogram a;
  LatencyHistogram b;
  for (int i = 0; i < 90; ++i) a.Record(1'000'000);
  for (int i = 0; i < 10; ++i) b.Record(50'000'000);
  a.Merge(b);
  EXPECT_EQ(a.count(), 100u);
  EXPECT_EQ(a.max(), 50'000'000u);
  EXPECT_NEAR(static_cast<double>(a.ValueAtQuantile(0.5)), 1e6, 2e4);
  EXPECT_NEAR(static_cast<double>(a.ValueAtQuantile(0.95)), 5e7, 1e6);
}

// A paced run counts a call from when it was due, so an overloaded run's latencies grow with
// its length; they must be reported as themselves up to a day's run plus a day's deadline.
TEST(LatencyHistogramTest, LatenciesOfHoursAreReportedWithinResolution) {
  for (const uint64_t nanos : {uint64_t{600} * 1'000'000'000,           // 10 min
                               uint64_t{48} * 3600 * 1'000'000'000}) {  // 48 h
    LatencyHistogram h;
    for (int i = 0; i < 100; ++i) h.Record(nanos - static_cast<uint64_t>(i));
    const double p50 = static_cast<double>(h.ValueAtQuantile(0.5));
    EXPECT_NEAR(p50, static_cast<double>(nanos), static_cast<double>(nanos) / 64) << nanos;
  }
}

TEST(LatencyHistogramTest, HugeValuesAreClampedNotLost) {
  LatencyHistogram h;
  h.Record(UINT64_MAX);
  EXPECT_EQ(h.count(), 1u);
  EXPECT_GT(h.ValueAtQuantile(1.0), uint64_t{100'000'000'000});
}

}  // namespace
}  // namespace sessionledger::client
