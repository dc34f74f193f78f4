#ifndef SESSIONLEDGER_CLIENT_LATENCY_HISTOGRAM_H_
#define SESSIONLEDGER_CLIENT_LATENCY_HISTOGRAM_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace sessionledger::client {

// An HDR-style log-linear histogram of latencies in nanoseconds: values below 128 ns are exact,
// above that every power-of-two range is split into 64 linear buckets, so any recorded value is
// reported within 1/64 (1.6%) of itself. Memory is fixed (about 22 KiB) whatever the number of
// samples. Values above ~78 h, beyond any run's length plus its deadline, are clamped into the
// last bucket.
//
// Not thread-safe: give each writer its own histogram and Merge() them afterwards.
class LatencyHistogram {
 public:
  LatencyHistogram();

  void Record(uint64_t nanos);
  void Merge(const LatencyHistogram& other);

  uint64_t count() const { return count_; }
  uint64_t max() const { return max_; }
  // The value at quantile q in [0, 1] (the smallest bucket whose cumulative count reaches
  // ceil(q * count)), reported as the bucket's midpoint and capped at max(); 0 when empty.
  uint64_t ValueAtQuantile(double q) const;

 private:
  static size_t BucketFor(uint64_t nanos);
  static uint64_t BucketLow(size_t bucket);
  static uint64_t BucketHigh(size_t bucket);

  std::vector<uint64_t> buckets_;
  uint64_t count_ = 0;
  uint64_t max_ = 0;
};

}  // namespace sessionledger::client

#endif  // SESSIONLEDGER_CLIENT_LATENCY_HISTOGRAM_H_
