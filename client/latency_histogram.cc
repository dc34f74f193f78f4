#include "client/latency_histogram.h"

#include <algorithm>
#include <cmath>

namespace sessionledger::client {
namespace {

// 2^kSubBits exact buckets at the bottom, then 2^(kSubBits-1) buckets per power of two.
constexpr int kSubBits = 7;
constexpr uint64_t kSubCount = uint64_t{1} << kSubBits;  // 128
constexpr uint64_t kHalf = kSubCount / 2;                // 64
// Largest tracked magnitude: values up to 2^48 - 1 ns (about 78 h). A paced run counts a call
// from when it was due, so a latency can reach the run's length (--duration, at most 24 h)
// plus a call's deadline (at most 24 h), and must still be reported as itself.
constexpr int kMaxMsb = 47;
constexpr uint64_t kMaxValue = (uint64_t{1} << (kMaxMsb + 1)) - 1;
constexpr size_t kBucketCount = (kMaxMsb - (kSubBits - 1) + 1) * kHalf + kHalf;

int MostSignificantBit(uint64_t v) { return 63 - __builtin_clzll(v); }

}  // namespace

LatencyHistogram::LatencyHistogram() : buckets_(kBucketCount, 0) {}

size_t LatencyHistogram::BucketFor(uint64_t nanos) {
  nanos = std::min(nanos, kMaxValue);
  if (nanos < kSubCount) return static_cast<size_t>(nanos);
  const int shift = MostSignificantBit(nanos) - (kSubBits - 1);
  return static_cast<size_t>((shift + 1) * kHalf + (nanos >> shift) - kHalf);
}

uint64_t LatencyHistogram::BucketLow(size_t bucket) {
  if (bucket < kSubCount) return bucket;
  const uint64_t shift = bucket / kHalf - 1;
  const uint64_t mantissa = bucket % kHalf + kHalf;
  return mantissa << shift;
}

uint64_t LatencyHistogram::BucketHigh(size_t bucket) {
  if (bucket < kSubCount) return bucket;
  const uint64_t shift = bucket / kHalf - 1;
  return BucketLow(bucket) + (uint64_t{1} << shift) - 1;
}

void LatencyHistogram::Record(uint64_t nanos) {
  ++buckets_[BucketFor(nanos)];
  ++count_;
  max_ = std::max(max_, nanos);
}

void LatencyHistogram::Merge(const LatencyHistogram& other) {
  for (size_t i = 0; i < buckets_.size(); ++i) buckets_[i] += other.buckets_[i];
  count_ += other.count_;
  max_ = std::max(max_, other.max_);
}

uint64_t LatencyHistogram::ValueAtQuantile(double q) const {
  if (count_ == 0) return 0;
  q = std::clamp(q, 0.0, 1.0);
  const uint64_t rank =
      std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(q * static_cast<double>(count_))));
  uint64_t seen = 0;
  for (size_t i = 0; i < buckets_.size(); ++i) {
    seen += buckets_[i];
    if (seen >= rank) {
      const uint64_t mid = BucketLow(i) + (BucketHigh(i) - BucketLow(i)) / 2;
      return std::min(mid, max_);
    }
  }
  return max_;
}

}  // namespace sessionledger::client
