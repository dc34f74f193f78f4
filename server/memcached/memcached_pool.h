#ifndef SESSIONLEDGER_SERVER_MEMCACHED_MEMCACHED_POOL_H_
#define SESSIONLEDGER_SERVER_MEMCACHED_MEMCACHED_POOL_H_

#include <libmemcached/memcached.h>
#include <libmemcached/util.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/common/clock.h"
#include "server/config/config.h"
#include "server/memcached/memcached_pipeline.h"

namespace sessionledger {

struct MemcachedPoolOptions {
  MemcachedUrl url;
  int size = 16;
  // Upper bounds; each lease lowers the I/O timeout further to the caller's remaining deadline.
  absl::Duration connect_timeout = absl::Milliseconds(500);
  absl::Duration io_timeout = absl::Seconds(2);
  // After a node fails, how long libmemcached waits before it tries that node again.
  absl::Duration retry_after_failure = absl::Seconds(1);
  // Starts a MemcachedPipeline (one pipelined connection per node, batching concurrent requests)
  // for the non-blocking session calls. Blocking calls always use the pool.
  bool pipeline = true;
  // What a caller's deadline is read against, once per call (absl::Now() when unset; tests step
  // one): every later wait of the call is timed on the steady clock.
  const Clock* wall_clock = nullptr;
};

// Maps a libmemcached return code to a status: connection and timeout failures become
// UNAVAILABLE, a miss NOT_FOUND, a CAS conflict ABORTED, "not stored" FAILED_PRECONDITION, a
// value above the item size limit INVALID_ARGUMENT (kSessionTooLargeForAnItem for callers), the
// rest INTERNAL. `what` names the operation for the message.
absl::Status MemcachedStatus(memcached_return_t rc, absl::string_view what);

// A fixed-size, thread-safe pool of libmemcached handles (libmemcachedutil's memcached_pool_st)
// over every node of MEMCACHED_URL with consistent (ketama) hashing, the binary protocol and CAS.
// Nodes are never ejected: a node that fails is retried after `retry_after_failure`, so a
// memcached that restarts is used again without restarting this process, and keys never move
// between nodes because one node is briefly down.
class MemcachedPool {
 public:
  // A handle borrowed from the pool; returned on destruction. Move-only. Never copy the
  // memcached_st it holds.
  class Lease {
   public:
    Lease(Lease&& other) noexcept : owner_(other.owner_), handle_(other.handle_) {
      other.handle_ = nullptr;
    }
    Lease& operator=(Lease&&) = delete;
    Lease(const Lease&) = delete;
    ~Lease();
    memcached_st* get() const { return handle_; }
    memcached_st* operator->() const { return handle_; }
    // An operation on this handle found its node down or too slow (for metrics).
    void RecordNodeFailure() { owner_->RecordNodeFailure(); }
    // See MemcachedPool::MarkNodeStalled and NodeStalled.
    void MarkNodeStalled(int node) { owner_->MarkNodeStalled(node); }
    bool NodeStalled(int node, SteadyTime now) const { return owner_->NodeStalled(node, now); }

   private:
    friend class MemcachedPool;
    Lease(MemcachedPool* owner, memcached_st* handle) : owner_(owner), handle_(handle) {}
    MemcachedPool* owner_;
    memcached_st* handle_;
  };

  static absl::StatusOr<std::unique_ptr<MemcachedPool>> Create(const MemcachedPoolOptions& options);
  ~MemcachedPool();
  MemcachedPool(const MemcachedPool&) = delete;
  MemcachedPool& operator=(const MemcachedPool&) = delete;

  // Waits for a free handle until `deadline`; UNAVAILABLE when none frees up in time (the pool
  // is exhausted) or the deadline has passed. The handle's I/O timeouts are set to the time
  // left. libmemcached applies them to each wait for the socket, not to a whole operation: a
  // node that sends its answer a few bytes at a time can hold one call past `deadline` (the
  // pipeline drops such a node; README, "Known limit").
  absl::StatusOr<Lease> Acquire(absl::Time deadline);
  // The same, for a deadline already on the steady clock.
  absl::StatusOr<Lease> Acquire(SteadyTime give_up);

  const MemcachedPoolOptions& options() const { return options_; }
  // Index in options().url.nodes of the node that `group_key` maps to on the ketama ring (the
  // node libmemcached's *_by_key calls use), or -1. No I/O; thread-safe.
  int NodeForGroupKey(absl::string_view group_key) const;
  // The pipelined connections, or null when `pipeline` is off.
  MemcachedPipeline* pipeline() const { return pipeline_.get(); }
  int node_count() const { return static_cast<int>(options_.url.nodes.size()); }
  // For metrics: handles lent out now, and Acquire calls that found none free in time.
  int leased() const { return leased_.load(std::memory_order_relaxed); }
  int64_t exhausted() const { return exhausted_.load(std::memory_order_relaxed); }
  int64_t node_failures() const { return node_failures_.load(std::memory_order_relaxed); }
  // An operation found a node down or too slow.
  void RecordNodeFailure() { node_failures_.fetch_add(1, std::memory_order_relaxed); }
  // Node `node` (an index in options().url.nodes) kept an operation waiting and did not answer:
  // for `retry_after_failure`, NodeStalled says so to every handle of the pool. Each handle
  // would otherwise find out for itself, waiting out its own I/O timeout. Out-of-range nodes
  // are ignored. Thread-safe.
  void MarkNodeStalled(int node);
  // Whether `node` counts as stalled at `now` (the caller's clock reading, to spare a second).
  // Timed on the steady clock, so that no wall-clock step lengthens or ends the window.
  bool NodeStalled(int node, SteadyTime now) const;

 private:
  MemcachedPool(MemcachedPoolOptions options, memcached_st* master, memcached_st* placement,
                memcached_pool_st* pool, std::unique_ptr<MemcachedPipeline> pipeline)
      : options_(std::move(options)),
        master_(master),
        pool_(pool),
        free_slots_(options_.size),
        pipeline_(std::move(pipeline)),
        placement_(placement),
        stalled_until_(new std::atomic<int64_t>[options_.url.nodes.size()]()) {}

  // Takes one of the pool's `size` handles, waiting until `give_up` (steady) at most.
  bool TakeSlot(SteadyTime give_up);
  void ReturnSlot();

  const MemcachedPoolOptions options_;
  memcached_st* master_;  // Template the pool clones; owned.
  memcached_pool_st* pool_;
  // The wait for a free handle is ours, not libmemcachedutil's: its memcached_pool_fetch times
  // a wait on the wall clock from time(NULL), whole seconds, so a wait of under a second ended
  // at once more often than not (and one woken by a returned handle it then lost to another
  // waiter started over with its whole budget). A slot is taken here first; the fetch that
  // follows then never waits.
  std::mutex slots_mu_;
  std::condition_variable slot_returned_;
  int free_slots_;  // Guarded by slots_mu_.
  std::unique_ptr<MemcachedPipeline> pipeline_;
  mutable std::mutex placement_mu_;
  // A clone of master_ that only hashes keys to nodes (never connects); owned; used under
  // placement_mu_.
  memcached_st* const placement_;
  std::atomic<int> leased_{0};
  std::atomic<int64_t> exhausted_{0};
  std::atomic<int64_t> node_failures_{0};
  // Per node: until when it counts as stalled (SteadyTime ticks since the clock's epoch; 0: not
  // stalled).
  std::unique_ptr<std::atomic<int64_t>[]> stalled_until_;
};

// Looks up host names for ProbeMemcachedNodes: for each of `hosts`, its numeric addresses
// ("10.0.0.5", "::1") in the order to try them, or why there are none. Must return by
// `give_up`, whatever the name server does; a lookup that has not answered by then counts as a
// failure (it may go on in the background).
using MemcachedProbeLookup = std::function<std::vector<absl::StatusOr<std::vector<std::string>>>(
    const std::vector<std::string>& hosts, SteadyTime give_up)>;

// Probes every node with a fresh connection (a version request) and counts the ones that answer.
// Thread-safe; keeps no connection between calls.
//
// Host names are looked up through `lookup`, all at once and for at most `timeout`, and
// libmemcached is handed the addresses: given a name, it would call getaddrinfo itself, which
// no timeout of its own covers, so a name server that does not answer would hold the probe (and
// the start-up and shutdown that wait for it) indefinitely. Each address then gets `timeout` to
// connect and `timeout` to answer; a node counts as reachable when one of its addresses answers.
struct MemcachedReachability {
  int reachable = 0;
  int total = 0;
};
MemcachedReachability ProbeMemcachedNodes(const MemcachedUrl& url, absl::Duration timeout,
                                          const MemcachedProbeLookup& lookup);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_MEMCACHED_MEMCACHED_POOL_H_
