#include "server/memcached/memcached_pool.h"

#include <arpa/inet.h>

#include <algorithm>
#include <ctime>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/common/clock.h"
#include "server/common/host_resolver.h"
#include "server/common/status_macros.h"
#include "server/domain/caller_message.h"
#include "server/domain/session_store.h"

namespace sessionledger {
namespace {

struct MemcachedDeleter {
  void operator()(memcached_st* m) const { memcached_free(m); }
};
using MemcachedPtr = std::unique_ptr<memcached_st, MemcachedDeleter>;

uint64_t ClampMillis(absl::Duration d) {
  return static_cast<uint64_t>(std::max<int64_t>(1, absl::ToInt64Milliseconds(d)));
}

absl::Status AddServers(memcached_st* handle, const MemcachedUrl& url) {
  for (const MemcachedNode& node : url.nodes) {
    const memcached_return_t rc = memcached_server_add(handle, node.host.c_str(), node.port);
    if (!memcached_success(rc)) {
      return absl::InvalidArgumentError(absl::StrCat("MEMCACHED_URL: cannot add node ", node.host,
                                                     ":", node.port, ": ",
                                                     memcached_strerror(handle, rc)));
    }
  }
  return absl::OkStatus();
}

// Behaviours that every handle in the pool shares (the pool clones the master).
absl::Status Configure(memcached_st* handle, const MemcachedPoolOptions& options) {
  const struct {
    memcached_behavior_t flag;
    uint64_t value;
  } behaviours[] = {
      {MEMCACHED_BEHAVIOR_BINARY_PROTOCOL, 1},
      {MEMCACHED_BEHAVIOR_SUPPORT_CAS, 1},
      {MEMCACHED_BEHAVIOR_TCP_NODELAY, 1},
      {MEMCACHED_BEHAVIOR_TCP_KEEPALIVE, 1},
      {MEMCACHED_BEHAVIOR_DISTRIBUTION, MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA},
      {MEMCACHED_BEHAVIOR_KETAMA_HASH, MEMCACHED_HASH_MD5},
      {MEMCACHED_BEHAVIOR_CONNECT_TIMEOUT, ClampMillis(options.connect_timeout)},
      {MEMCACHED_BEHAVIOR_POLL_TIMEOUT, ClampMillis(options.io_timeout)},
      {MEMCACHED_BEHAVIOR_RETRY_TIMEOUT,
       static_cast<uint64_t>(
           std::max<int64_t>(1, absl::ToInt64Seconds(options.retry_after_failure)))},
      // Keep key placement fixed while a node is down: an ejected node would move its keys to
      // other nodes and back again, which reads as lost sessions.
      {MEMCACHED_BEHAVIOR_AUTO_EJECT_HOSTS, 0},
      {MEMCACHED_BEHAVIOR_REMOVE_FAILED_SERVERS, 0},
  };
  for (const auto& b : behaviours) {
    const memcached_return_t rc = memcached_behavior_set(handle, b.flag, b.value);
    if (!memcached_success(rc)) {
      return absl::InternalError(
          absl::StrCat("memcached_behavior_set(", b.flag, "): ", memcached_strerror(handle, rc)));
    }
  }
  return absl::OkStatus();
}

// A version request to memcached at a numeric `address`, on a connection of its own.
bool ProbeAddress(const std::string& address, in_port_t port, absl::Duration timeout) {
  MemcachedPtr probe(memcached_create(nullptr));
  if (probe == nullptr) return false;
  memcached_behavior_set(probe.get(), MEMCACHED_BEHAVIOR_CONNECT_TIMEOUT, ClampMillis(timeout));
  memcached_behavior_set(probe.get(), MEMCACHED_BEHAVIOR_POLL_TIMEOUT, ClampMillis(timeout));
  memcached_behavior_set(probe.get(), MEMCACHED_BEHAVIOR_BINARY_PROTOCOL, 1);
  if (!memcached_success(memcached_server_add(probe.get(), address.c_str(), port))) return false;
  return memcached_success(memcached_version(probe.get()));
}

void SetIoTimeouts(memcached_st* handle, absl::Duration budget,
                   const MemcachedPoolOptions& options) {
  const uint64_t io_ms = ClampMillis(std::min(budget, options.io_timeout));
  const uint64_t connect_ms = ClampMillis(std::min(budget, options.connect_timeout));
  memcached_behavior_set(handle, MEMCACHED_BEHAVIOR_POLL_TIMEOUT, io_ms);
  memcached_behavior_set(handle, MEMCACHED_BEHAVIOR_CONNECT_TIMEOUT, connect_ms);
  // Socket-level timeouts are in microseconds.
  memcached_behavior_set(handle, MEMCACHED_BEHAVIOR_RCV_TIMEOUT, io_ms * 1000);
  memcached_behavior_set(handle, MEMCACHED_BEHAVIOR_SND_TIMEOUT, io_ms * 1000);
}

}  // namespace

absl::Status MemcachedStatus(memcached_return_t rc, absl::string_view what) {
  if (memcached_success(rc)) return absl::OkStatus();
  const std::string message =
      absl::StrCat("memcached ", what, ": ", memcached_strerror(nullptr, rc));
  switch (rc) {
    case MEMCACHED_NOTFOUND:
      return absl::NotFoundError(message);
    case MEMCACHED_DATA_EXISTS:
      return absl::AbortedError(message);
    case MEMCACHED_NOTSTORED:
      return absl::FailedPreconditionError(message);
    case MEMCACHED_E2BIG:
      // As the pipeline's StoreRefused: the caller learns the field to blame, not the words.
      return ForCallers(absl::StatusCode::kInvalidArgument, kSessionTooLargeForAnItem,
                        absl::InvalidArgumentError(message));
    case MEMCACHED_CONNECTION_FAILURE:
    case MEMCACHED_CONNECTION_SOCKET_CREATE_FAILURE:
    case MEMCACHED_HOST_LOOKUP_FAILURE:
    case MEMCACHED_TIMEOUT:
    case MEMCACHED_ERRNO:
    case MEMCACHED_SERVER_ERROR:
    case MEMCACHED_SERVER_MARKED_DEAD:
    case MEMCACHED_SERVER_TEMPORARILY_DISABLED:
    case MEMCACHED_UNKNOWN_READ_FAILURE:
    case MEMCACHED_READ_FAILURE:
    case MEMCACHED_WRITE_FAILURE:
    case MEMCACHED_PARTIAL_READ:
    case MEMCACHED_NO_SERVERS:
    case MEMCACHED_CONNECTION_BIND_FAILURE:
    case MEMCACHED_IN_PROGRESS:
    case MEMCACHED_MEMORY_ALLOCATION_FAILURE:
    case MEMCACHED_SOME_ERRORS:
    case MEMCACHED_FAILURE:
    case MEMCACHED_PROTOCOL_ERROR:
    // A node that refuses our credentials serves no session, as one that is down.
    case MEMCACHED_AUTH_PROBLEM:
    case MEMCACHED_AUTH_FAILURE:
      return absl::UnavailableError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::StatusOr<std::unique_ptr<MemcachedPool>> MemcachedPool::Create(
    const MemcachedPoolOptions& options) {
  if (options.url.nodes.empty()) return absl::InvalidArgumentError("MEMCACHED_URL: no nodes");
  if (options.size < 1) return absl::InvalidArgumentError("MEMCACHED_POOL_SIZE: must be >= 1");
  MemcachedPtr master(memcached_create(nullptr));
  if (master == nullptr) return absl::ResourceExhaustedError("memcached_create failed");
  if (absl::Status s = Configure(master.get(), options); !s.ok()) return s;
  if (absl::Status s = AddServers(master.get(), options.url); !s.ok()) return s;
  // One handle up front (libmemcachedutil refuses an initial size of 0); handles connect
  // lazily, so creating the pool succeeds while memcached is still starting.
  std::unique_ptr<MemcachedPipeline> pipeline;
  if (options.pipeline) {
    MemcachedPipelineOptions pipeline_options;
    pipeline_options.nodes = options.url.nodes;
    pipeline_options.connect_timeout = options.connect_timeout;
    pipeline_options.io_timeout = options.io_timeout;
    pipeline_options.retry_after_failure = options.retry_after_failure;
    SL_ASSIGN_OR_RETURN(pipeline, MemcachedPipeline::Start(std::move(pipeline_options)));
  }
  MemcachedPtr placement(memcached_clone(nullptr, master.get()));
  if (placement == nullptr) return absl::ResourceExhaustedError("memcached_clone failed");
  memcached_pool_st* pool = memcached_pool_create(master.get(), 1, options.size);
  if (pool == nullptr) return absl::ResourceExhaustedError("memcached_pool_create failed");
  return std::unique_ptr<MemcachedPool>(
      new MemcachedPool(options, master.release(), placement.release(), pool, std::move(pipeline)));
}

MemcachedPool::~MemcachedPool() {
  // First: its destruction answers the requests still waiting, and their callbacks may still
  // ask this pool about its nodes.
  pipeline_.reset();
  memcached_pool_destroy(pool_);
  memcached_free(placement_);
  memcached_free(master_);
}

int MemcachedPool::NodeForGroupKey(absl::string_view group_key) const {
  std::lock_guard<std::mutex> lock(placement_mu_);
  memcached_return_t rc = MEMCACHED_SUCCESS;
  const memcached_instance_st* node =
      memcached_server_by_key(placement_, group_key.data(), group_key.size(), &rc);
  if (node == nullptr) return -1;
  const absl::string_view host = memcached_server_name(node);
  const in_port_t port = memcached_server_port(node);
  const auto& nodes = options_.url.nodes;
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (nodes[i].host == host && nodes[i].port == port) return static_cast<int>(i);
  }
  return -1;
}

MemcachedPool::Lease::~Lease() {
  if (handle_ != nullptr) {
    memcached_pool_release(owner_->pool_, handle_);
    owner_->leased_.fetch_sub(1, std::memory_order_relaxed);
    owner_->ReturnSlot();
  }
}

bool MemcachedPool::TakeSlot(SteadyTime give_up) {
  std::unique_lock<std::mutex> lock(slots_mu_);
  if (!slot_returned_.wait_until(lock, give_up, [this] { return free_slots_ > 0; })) return false;
  --free_slots_;
  return true;
}

void MemcachedPool::ReturnSlot() {
  {
    std::lock_guard<std::mutex> lock(slots_mu_);
    ++free_slots_;
  }
  slot_returned_.notify_one();
}

absl::StatusOr<MemcachedPool::Lease> MemcachedPool::Acquire(absl::Time deadline) {
  return Acquire(SteadyDeadline(deadline, options_.wall_clock));
}

absl::StatusOr<MemcachedPool::Lease> MemcachedPool::Acquire(SteadyTime give_up) {
  if (give_up <= SteadyNow()) {
    return absl::UnavailableError("memcached: deadline passed before a connection was free");
  }
  if (!TakeSlot(give_up)) {
    exhausted_.fetch_add(1, std::memory_order_relaxed);
    return absl::UnavailableError(
        absl::StrCat("memcached: no pooled connection free within the deadline (pool size ",
                     options_.size, ")"));
  }
  // A slot is ours, so a handle is free or may be created: no wait.
  timespec no_wait{0, 0};
  memcached_return_t rc = MEMCACHED_SUCCESS;
  memcached_st* handle = memcached_pool_fetch(pool_, &no_wait, &rc);
  if (handle == nullptr) {
    ReturnSlot();
    return absl::UnavailableError(
        absl::StrCat("memcached: no pooled connection: ", memcached_strerror(nullptr, rc)));
  }
  SetIoTimeouts(handle, absl::FromChrono(give_up - SteadyNow()), options_);
  leased_.fetch_add(1, std::memory_order_relaxed);
  return Lease(this, handle);
}

void MemcachedPool::MarkNodeStalled(int node) {
  if (node < 0 || node >= node_count()) return;
  const SteadyTime until = SteadyNow() + ToSteadyDuration(options_.retry_after_failure);
  stalled_until_[static_cast<size_t>(node)].store(until.time_since_epoch().count(),
                                                  std::memory_order_relaxed);
}

bool MemcachedPool::NodeStalled(int node, SteadyTime now) const {
  if (node < 0 || node >= node_count()) return false;
  const int64_t until = stalled_until_[static_cast<size_t>(node)].load(std::memory_order_relaxed);
  return until != 0 && now.time_since_epoch().count() < until;
}

MemcachedReachability ProbeMemcachedNodes(const MemcachedUrl& url, absl::Duration timeout,
                                          const MemcachedProbeLookup& lookup) {
  MemcachedReachability result;
  result.total = static_cast<int>(url.nodes.size());
  // Every name in one go: with the name server down, the probe waits `timeout` once, not once
  // per node.
  std::vector<std::string> names;
  for (const MemcachedNode& node : url.nodes) {
    if (!IsNumericAddress(node.host) &&
        std::find(names.begin(), names.end(), node.host) == names.end()) {
      names.push_back(node.host);
    }
  }
  std::vector<absl::StatusOr<std::vector<std::string>>> found;
  if (!names.empty()) found = lookup(names, SteadyNow() + ToSteadyDuration(timeout));
  for (const MemcachedNode& node : url.nodes) {
    std::vector<std::string> addresses = {node.host};
    if (!IsNumericAddress(node.host)) {
      const size_t i = std::find(names.begin(), names.end(), node.host) - names.begin();
      if (i >= found.size() || !found[i].ok()) continue;  // Unreachable: no address in time.
      addresses = *found[i];
    }
    for (const std::string& address : addresses) {
      if (ProbeAddress(address, node.port, timeout)) {
        ++result.reachable;
        break;
      }
    }
  }
  return result;
}

}  // namespace sessionledger
