#ifndef SESSIONLEDGER_SERVER_MEMCACHED_MEMCACHED_PIPELINE_H_
#define SESSIONLEDGER_SERVER_MEMCACHED_MEMCACHED_PIPELINE_H_

#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/common/clock.h"
#include "server/config/config.h"

namespace sessionledger {

// One value of a multi-get and its CAS unique.
struct MemcachedItem {
  std::string value;
  uint64_t cas = 0;
};
// The hits of one multi-get by key; a missing key is a miss.
using MemcachedHits = std::map<std::string, MemcachedItem>;

// Storage commands, as memcached names them.
enum class MemcachedWrite { kAdd, kSet, kCas };
// What memcached answered to a storage command: kStored, or why it did not store (add: the key
// exists; cas: it changed since read, or is gone).
enum class MemcachedStored { kStored, kNotStored, kExists, kNotFound };

// Where a node's name led: an address to connect to (a name may lead to several).
struct MemcachedAddress {
  sockaddr_storage address{};
  socklen_t length = 0;
};

// memcached reads an exptime up to this many seconds (30 days) as relative to now, and any
// larger one as a Unix time.
inline constexpr int64_t kMaxRelativeExptimeSeconds = int64_t{30} * 24 * 3600;

struct MemcachedPipelineOptions {
  std::vector<MemcachedNode> nodes;
  // How a node's host is looked up: getaddrinfo when unset (tests inject slow lookups). It runs
  // on the pipeline's own resolver thread, so a slow name server holds up only the requests
  // for that node, and those no longer than their deadlines.
  // Every address it leads to, in the order to try them.
  std::function<absl::StatusOr<std::vector<MemcachedAddress>>(const MemcachedNode&)> resolve;
  absl::Duration connect_timeout = absl::Milliseconds(500);
  // A node with requests in flight that sends nothing for this long, or leaves its oldest
  // request unanswered for this long (it still answers, but slower than it is asked), is
  // declared stalled: its connection is dropped and every request on it fails.
  absl::Duration io_timeout = absl::Seconds(2);
  // After a node could not be reached (connect timed out or failed other than by refusal, or
  // it stalled), requests to it fail at once for this long instead of each waiting for a connect
  // timeout. A refused connect is retried by the next request.
  absl::Duration retry_after_failure = absl::Seconds(1);
  // The clock callers' deadlines are read against; absl::Now() when unset. Only the deadline's
  // distance from now is taken from it, once per request: the pipeline times everything else
  // on the steady clock. Tests inject one that steps. Must outlive the pipeline.
  const Clock* wall_clock = nullptr;
};

// Memcached requests for hot paths that must not block a thread, pipelined over one persistent
// connection per memcached node and driven by one I/O thread: multi-gets ("gets") and storage
// commands (add, set, cas), text protocol.
//
// Why not libmemcached: a blocking client makes every request one cross-process round trip of
// its own (its sends, a wake-up of a memcached worker, a sleep and wake of the calling thread).
// Here requests that arrive while others are in flight are written to the node together and
// answered together, so under load memcached wakes once per batch instead of once per request.
// It serves the non-blocking paths (GetSession, CreateSession, UpdateSession). Blocking paths
// stay on libmemcached: a thread that waits anyway only pays for the extra hand-off to the I/O
// thread (measured: 15-25 us more server CPU per call for CreateSession and UpdateSession when
// they were blocking).
//
// Every request is answered when its reply arrives, its deadline passes or `io_timeout` passes,
// whichever comes first (the I/O thread keeps the clock); a slow or dead node never holds a
// caller beyond that. A write answered UNAVAILABLE may still have been applied, as with any
// client. Replies are matched to requests by order (memcached answers one connection's
// requests in order, and so applies one connection's writes in the order they were sent), so
// any protocol surprise drops the connection rather than risk handing one caller another's
// reply. A dropped connection is reopened by the next request.
//
// Thread-safe. Destruction fails requests still waiting with UNAVAILABLE and joins the I/O
// thread.
class MemcachedPipeline {
 public:
  static absl::StatusOr<std::unique_ptr<MemcachedPipeline>> Start(MemcachedPipelineOptions options);
  ~MemcachedPipeline();
  MemcachedPipeline(const MemcachedPipeline&) = delete;
  MemcachedPipeline& operator=(const MemcachedPipeline&) = delete;

  // Index of `host`:`port` in options().nodes, or -1.
  int NodeIndex(absl::string_view host, uint16_t port) const;

  // The hits among `keys` (memcached text-protocol keys: 1..250 bytes, no spaces or control
  // characters; INVALID_ARGUMENT otherwise) on node `node`. UNAVAILABLE when the node did not
  // answer in time or is marked failed.
  absl::StatusOr<MemcachedHits> Get(int node, const std::vector<std::string>& keys,
                                    absl::Time deadline);

  // Get without blocking: `done` runs exactly once, on the I/O thread (or at once on the
  // calling thread when the request fails before it is queued). `done` must not block: it holds up
  // every request of this process.
  using Callback = absl::AnyInvocable<void(absl::StatusOr<MemcachedHits>) &&>;
  void GetAsync(int node, const std::vector<std::string>& keys, absl::Time deadline, Callback done);

  // Stores `value` under `key` on node `node` with `op` (`cas`: the CAS unique read; ignored
  // otherwise) and a memcached expiration (`exptime`: seconds, 0..30 days, 0 never expires; or
  // a Unix time in the coming year, as memcached reads any exptime above 30 days).
  // UNAVAILABLE as for reads; INVALID_ARGUMENT for a bad key or exptime.
  absl::StatusOr<MemcachedStored> Store(int node, MemcachedWrite op, const std::string& key,
                                        absl::string_view value, int64_t exptime, uint64_t cas,
                                        absl::Time deadline);
  // Store without blocking, under GetAsync's rules.
  using StoreCallback = absl::AnyInvocable<void(absl::StatusOr<MemcachedStored>) &&>;
  void StoreAsync(int node, MemcachedWrite op, const std::string& key, absl::string_view value,
                  int64_t exptime, uint64_t cas, absl::Time deadline, StoreCallback done);

  const MemcachedPipelineOptions& options() const { return options_; }
  // For metrics: write batches sent, and requests they carried.
  int64_t batches() const { return batches_.load(std::memory_order_relaxed); }
  int64_t batched_requests() const { return batched_requests_.load(std::memory_order_relaxed); }

 private:
  struct Request;
  struct Node;

  MemcachedPipeline(MemcachedPipelineOptions options, int epoll_fd, int wake_fd);
  // Queues `request` (its command and callback set) for node `node_index`, or fails it.
  void Submit(int node_index, std::shared_ptr<Request> request, absl::Time deadline);
  // Runs `begin` with a callback and waits for it (the blocking Get and Store).
  template <typename Reply, typename Begin>
  absl::StatusOr<Reply> WaitFor(Begin begin, absl::Time deadline);
  void Run();
  // I/O thread: applies what the node's resolver thread found (one per node, so that a slow
  // lookup of one never delays another's): the address, and the requests that waited for it
  // queued; or the requests failed and the node backed off.
  void TakeLookupResult(Node& node, SteadyTime now);
  // Under mu_: requests waiting for an address whose time is up are moved to `expired`; the
  // result is when the next of the others gives up.
  SteadyTime TakeExpiredAwaitingLocked(SteadyTime now,
                                       std::vector<std::shared_ptr<Request>>& expired);
  // I/O-thread helpers; `node` belongs to the I/O thread except where noted.
  void Dispatch(Node& node, std::vector<std::shared_ptr<Request>> fresh, SteadyTime now);
  void StartConnect(Node& node, SteadyTime now);
  // A connect succeeded: the name's addresses are tried from this one again after a failure,
  // and the requests that waited for it count as sent now.
  void Connected(Node& node, SteadyTime now);
  // A connect failed with `err` (ETIMEDOUT: connect_timeout passed), `at_once` (socket() or
  // connect() itself) or later. It moves on to the name's next address, at once while some
  // address has not failed since the last connect that worked (the requests wait for it). Once
  // every one has, the requests fail, the node backs off unless waiting cost nothing (see the
  // definition), and the name is looked up again in the background.
  void ConnectFailed(Node& node, int err, bool at_once, SteadyTime now);
  // Closes a connection that never opened and connects to the node's current address instead.
  // Nothing was sent on it: its requests stay, to be sent on the new one (or failed by Drop).
  void Reconnect(Node& node, SteadyTime now);
  // Asks the node's resolver thread for its addresses (again), unless a lookup is under way.
  // The node keeps its current addresses, if any, until the answer comes. Needs mu_.
  void RefreshAddressesLocked(Node& node);
  void OnEvents(Node& node, uint32_t events, SteadyTime now);
  void Flush(Node& node, SteadyTime now);
  void ReadAnswers(Node& node, SteadyTime now);
  // Parses complete answers from the node's input; false on a protocol error.
  bool ParseAnswers(Node& node);
  void Drop(Node& node, const absl::Status& why, bool mark_failed, SteadyTime now);
  // Answers requests whose time is up; their replies, when they come, are read and dropped.
  // The failure of a request whose time ran out before it was sent.
  static absl::Status TooLateToSend(const Node& node, const Request& r);
  void ExpireRequests(Node& node, SteadyTime now);
  void Watch(Node& node, bool want_write);
  absl::Time WallNow() const;
  SteadyTime NextTimer(SteadyTime now) const;

  const MemcachedPipelineOptions options_;
  const int epoll_fd_;
  const int wake_fd_;
  std::vector<std::unique_ptr<Node>> nodes_;
  // Where the I/O thread receives, before appending to a node's input.
  const std::unique_ptr<char[]> read_buffer_;

  // std::mutex rather than absl::Mutex: ThreadSanitizer sees its hand-overs (Debian's Abseil
  // is not instrumented).
  std::mutex mu_;
  bool stopping_ = false;  // Guarded by mu_.
  // True while a wake-up is written but not yet consumed, so that callers arriving meanwhile
  // skip the write (one wake-up per I/O loop turn, not per read). Guarded by mu_.
  bool wake_pending_ = false;

  std::atomic<int64_t> batches_{0};
  std::atomic<int64_t> batched_requests_{0};
  std::thread io_thread_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_MEMCACHED_MEMCACHED_PIPELINE_H_
