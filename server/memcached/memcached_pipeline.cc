#include "server/memcached/memcached_pipeline.h"

#include <netdb.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "server/common/clock.h"
#include "server/common/logger.h"
#include "server/common/notification.h"
#include "server/common/thread_name.h"
#include "server/domain/caller_message.h"
#include "server/domain/session_store.h"

namespace sessionledger {

namespace {

// epoll tag of the wake-up eventfd; nodes are tagged with their index and connection serial.
constexpr uint64_t kWakeTag = 0xffff;
// epoll tags of the nodes' lookup eventfds: this index, with the node's index + 1 above it.
constexpr uint64_t kLookupTagIndex = 0xfffe;
uint64_t LookupTag(size_t node_index) { return ((node_index + 1) << 16) | kLookupTagIndex; }
constexpr size_t kReadChunk = 64 * 1024;
// Longest header line we accept ("VALUE <250-byte key> <flags> <bytes> <cas>"); anything longer
// is not memcached speaking.
constexpr size_t kMaxLine = 512;
// Longer than any value this server writes: a session is at most ~2 MiB (512 KiB of attributes,
// MAX_SESSION_ATTRIBUTES_BYTES' cap, with protobuf framing: LargestSessionWriteRequestBytes), a
// user's index ~0.5 MiB (4,096 entries). A longer announced length is a corrupt or hostile
// reply, which would otherwise have one node's input buffer grow towards it (memcached's own
// bound, -I, goes up to 1 GiB) until the I/O timeout.
constexpr uint64_t kMaxValueBytes = uint64_t{16} << 20;
// How far ahead an exptime given as a Unix time may lie: a year, well past the longest TTL of
// any caller (31 days); larger is a garbled value, not an intent.
constexpr int64_t kFarthestUnixExptimeAhead = int64_t{366} * 24 * 3600;

uint64_t Tag(size_t index, uint64_t serial) { return (serial << 16) | index; }

std::string Errno(absl::string_view what, int err) {
  return absl::StrCat(what, ": ", std::strerror(err));
}

// Whether a failed connect should make reads fail fast for a while. A refusal costs nothing to
// retry and ends the moment memcached is back (a restart), so the next read tries again, as a
// fresh libmemcached handle would. Anything slower or stranger (unreachable host, timeout)
// backs off, and the name is looked up again.
bool BackOffAfter(int connect_errno) { return connect_errno != ECONNREFUSED; }

std::optional<MemcachedStored> StoreReply(absl::string_view line) {
  if (line == "STORED") return MemcachedStored::kStored;
  if (line == "NOT_STORED") return MemcachedStored::kNotStored;
  if (line == "EXISTS") return MemcachedStored::kExists;
  if (line == "NOT_FOUND") return MemcachedStored::kNotFound;
  return std::nullopt;
}

// A store memcached refused: a value too large for it is the caller's to fix (as libmemcached's
// E2BIG); anything else is the node's trouble, and another copy may take the write.
absl::Status StoreRefused(absl::string_view node, absl::string_view line) {
  const absl::Status refused = absl::UnavailableError(absl::StrCat("memcached ", node, ": ", line));
  if (!absl::StrContains(line, "too large")) return refused;
  return ForCallers(absl::StatusCode::kInvalidArgument, kSessionTooLargeForAnItem, refused);
}

bool ValidKey(const std::string& key) {
  if (key.empty() || key.size() > 250) return false;
  return std::all_of(key.begin(), key.end(), [](char c) {
    const auto u = static_cast<unsigned char>(c);
    return u > 32 && u != 127;
  });
}

// Every address of the node's name, in getaddrinfo's order: "localhost" may lead to ::1 first
// while memcached listens on 127.0.0.1 only, and the next address is tried then.
absl::StatusOr<std::vector<MemcachedAddress>> LookUpNode(const MemcachedNode& node) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(node.host.c_str(), absl::StrCat(node.port).c_str(), &hints, &found);
  if (rc != 0 || found == nullptr) {
    if (found != nullptr) freeaddrinfo(found);
    return absl::UnavailableError(absl::StrCat("cannot resolve: ", gai_strerror(rc)));
  }
  std::vector<MemcachedAddress> addresses;
  for (const addrinfo* a = found; a != nullptr; a = a->ai_next) {
    if (a->ai_addrlen > sizeof(sockaddr_storage)) continue;
    MemcachedAddress address;
    std::memcpy(&address.address, a->ai_addr, a->ai_addrlen);
    address.length = a->ai_addrlen;
    addresses.push_back(address);
  }
  freeaddrinfo(found);
  if (addresses.empty()) return absl::UnavailableError("cannot resolve: no usable address");
  return addresses;
}

// What a node's resolver thread shares with the pipeline. The thread touches nothing else, so
// the pipeline never has to wait for it: getaddrinfo cannot be interrupted, and a shutdown that
// joined a thread stuck on an unreachable name server would outlast the pod's grace period.
// The thread and the pipeline each hold it; whichever lets go last closes its eventfd.
struct NodeLookup {
  NodeLookup(MemcachedNode a,
             std::function<absl::StatusOr<std::vector<MemcachedAddress>>(const MemcachedNode&)> r)
      : address(std::move(a)),
        resolve(std::move(r)),
        done_fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  ~NodeLookup() {
    if (done_fd >= 0) close(done_fd);
  }
  NodeLookup(const NodeLookup&) = delete;
  NodeLookup& operator=(const NodeLookup&) = delete;

  const MemcachedNode address;
  const std::function<absl::StatusOr<std::vector<MemcachedAddress>>(const MemcachedNode&)>
      resolve;  // Set.
  // Signalled when `result` is set; in the pipeline's epoll set.
  const int done_fd;

  std::mutex mu;
  std::condition_variable wanted_cv;
  bool wanted = false;  // Guarded by mu, as are the two below.
  bool stop = false;
  std::optional<absl::StatusOr<std::vector<MemcachedAddress>>> result;
};

bool SameAddress(const MemcachedAddress& x, const MemcachedAddress& y) {
  return x.length == y.length && std::memcmp(&x.address, &y.address, x.length) == 0;
}

bool SameAddresses(const std::vector<MemcachedAddress>& a, const std::vector<MemcachedAddress>& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(), SameAddress);
}

// A node's resolver thread: one lookup each time it is asked, until told to stop.
void ResolveNames(const std::shared_ptr<NodeLookup>& lookup) {
  std::unique_lock<std::mutex> lock(lookup->mu);
  for (;;) {
    lookup->wanted_cv.wait(lock, [&] { return lookup->stop || lookup->wanted; });
    if (lookup->stop) return;
    lookup->wanted = false;
    lock.unlock();
    absl::StatusOr<std::vector<MemcachedAddress>> address = lookup->resolve(lookup->address);
    if (address.ok() && address->empty()) address = absl::UnavailableError("no address");
    lock.lock();
    if (lookup->stop) return;
    lookup->result = std::move(address);
    const uint64_t one = 1;
    (void)!write(lookup->done_fd, &one, sizeof one);
  }
}

}  // namespace

struct MemcachedPipeline::Request {
  std::string command;            // The request as sent, data block included.
  std::vector<std::string> keys;  // A get's keys; empty for a storage command.
  SteadyTime started;
  SteadyTime sent;       // When it was handed to a connection (after the name was looked up).
  SteadyTime give_up;    // The caller's deadline or io_timeout, whichever is first.
  Callback got;          // Set for a get,
  StoreCallback stored;  // or for a storage command.
  bool answered = false;

  // Said outright rather than read off `stored`: once called, an rvalue-invoked AnyInvocable
  // is left in an unspecified state, and a late reply to an answered store must still be read
  // as a store's.
  bool store = false;
  bool is_store() const { return store; }

  // Only the first answer counts (a request that timed out may still get its reply later).
  void Answer(MemcachedHits hits) {
    if (answered) return;
    answered = true;
    std::move(got)(std::move(hits));
  }
  void Answer(MemcachedStored reply) {
    if (answered) return;
    answered = true;
    std::move(stored)(reply);
  }
  void Fail(const absl::Status& why) {
    if (answered) return;
    answered = true;
    if (is_store()) {
      std::move(stored)(why);
    } else {
      std::move(got)(why);
    }
  }
};

struct MemcachedPipeline::Node {
  Node(size_t i, MemcachedNode a)
      : index(i), address(std::move(a)), label(absl::StrCat(address.host, ":", address.port)) {}

  const size_t index;
  const MemcachedNode address;
  const std::string label;

  // Guarded by the reader's mu_ (callers and the I/O thread).
  std::vector<std::shared_ptr<Request>> queued;
  SteadyTime failed_until = SteadyTime::min();
  bool resolving = false;  // Asked of the node's resolver thread, not answered yet.
  // Requests that came before the name was first resolved; they are queued once it is.
  std::vector<std::shared_ptr<Request>> awaiting_address;
  // Where the name led (empty until a lookup first succeeded; never emptied after), the one to
  // connect to next, and when it was looked up.
  std::vector<MemcachedAddress> addresses;
  size_t next_address = 0;
  size_t failed_in_a_row = 0;  // Connects that failed since one last succeeded.
  // Of this round of failed connects (through the name's addresses, once): whether one was
  // refused, and whether one failed slowly (a timeout, or an error the connect reported later).
  bool round_refused = false;
  bool round_failed_slowly = false;
  SteadyTime resolved_at = SteadyTime::min();

  // Shared with the node's resolver thread; lock order: the reader's mu_, then lookup->mu.
  std::shared_ptr<NodeLookup> lookup;

  // The I/O thread's alone.
  int fd = -1;
  uint64_t serial = 0;  // Tells events of a closed connection from the current one.
  bool connecting = false;
  bool watching_writes = false;
  SteadyTime connect_deadline;
  MemcachedAddress connecting_to;  // While connecting.
  SteadyTime last_progress;
  SteadyTime failed_until_seen = SteadyTime::min();
  // Requests written (or being written), in the order memcached answers them.
  std::deque<std::shared_ptr<Request>> in_flight;
  std::string out;
  size_t out_offset = 0;
  std::string in;
  size_t in_offset = 0;
  MemcachedHits partial;  // Hits read so far for in_flight.front().
};

absl::StatusOr<std::unique_ptr<MemcachedPipeline>> MemcachedPipeline::Start(
    MemcachedPipelineOptions options) {
  if (options.nodes.empty()) return absl::InvalidArgumentError("memcached pipeline: no nodes");
  if (options.nodes.size() >= kLookupTagIndex) {
    return absl::InvalidArgumentError("memcached pipeline: too many nodes");
  }
  const int epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  if (epoll_fd < 0) return absl::InternalError(Errno("epoll_create1", errno));
  const int wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd < 0) {
    const int err = errno;
    close(epoll_fd);
    return absl::InternalError(Errno("eventfd", err));
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kWakeTag;
  if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, wake_fd, &ev) != 0) {
    const int err = errno;
    close(wake_fd);
    close(epoll_fd);
    return absl::InternalError(Errno("epoll_ctl", err));
  }
  std::unique_ptr<MemcachedPipeline> reader(
      new MemcachedPipeline(std::move(options), epoll_fd, wake_fd));
  for (auto& node : reader->nodes_) {
    node->lookup = std::make_shared<NodeLookup>(
        node->address, reader->options_.resolve ? reader->options_.resolve : LookUpNode);
    epoll_event done{};
    done.events = EPOLLIN;
    done.data.u64 = LookupTag(node->index);
    if (node->lookup->done_fd < 0 ||
        epoll_ctl(epoll_fd, EPOLL_CTL_ADD, node->lookup->done_fd, &done) != 0) {
      return absl::InternalError(Errno("lookup eventfd", errno));
    }
  }
  reader->io_thread_ = std::thread([r = reader.get()] {
    NameThisThread("sl-memcached-io");
    r->Run();
  });
  for (auto& node : reader->nodes_) {
    std::thread([lookup = node->lookup] {
      NameThisThread("sl-memcache-dns");
      ResolveNames(lookup);
    }).detach();
  }
  return reader;
}

MemcachedPipeline::MemcachedPipeline(MemcachedPipelineOptions options, int epoll_fd, int wake_fd)
    : options_(std::move(options)),
      epoll_fd_(epoll_fd),
      wake_fd_(wake_fd),
      read_buffer_(new char[kReadChunk]) {
  for (size_t i = 0; i < options_.nodes.size(); ++i) {
    nodes_.push_back(std::make_unique<Node>(i, options_.nodes[i]));
  }
}

MemcachedPipeline::~MemcachedPipeline() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  // Resolver threads are told to stop, never waited for (see NodeLookup); the requests of a
  // lookup in progress are failed by the I/O thread on its way out.
  for (auto& node : nodes_) {
    if (node->lookup == nullptr) continue;
    std::lock_guard<std::mutex> lock(node->lookup->mu);
    node->lookup->stop = true;
    node->lookup->wanted_cv.notify_all();
  }
  const uint64_t one = 1;
  (void)!write(wake_fd_, &one, sizeof one);
  if (io_thread_.joinable()) io_thread_.join();
  close(wake_fd_);
  close(epoll_fd_);
}

int MemcachedPipeline::NodeIndex(absl::string_view host, uint16_t port) const {
  for (size_t i = 0; i < nodes_.size(); ++i) {
    if (nodes_[i]->address.host == host && nodes_[i]->address.port == port) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

absl::StatusOr<MemcachedHits> MemcachedPipeline::Get(int node_index,
                                                     const std::vector<std::string>& keys,
                                                     absl::Time deadline) {
  return WaitFor<MemcachedHits>(
      [&](Callback done) { GetAsync(node_index, keys, deadline, std::move(done)); }, deadline);
}

template <typename Reply, typename Begin>
absl::StatusOr<Reply> MemcachedPipeline::WaitFor(Begin begin, absl::Time deadline) {
  struct Outcome {
    Notification ready;
    absl::StatusOr<Reply> result;
  };
  auto outcome = std::make_shared<Outcome>();
  begin([outcome](absl::StatusOr<Reply> result) {
    outcome->result = std::move(result);
    outcome->ready.Notify();
  });
  // The I/O thread answers by the deadline; the slack only guards against it being wedged.
  const absl::Duration wait =
      std::min(deadline - WallNow(), options_.io_timeout) + absl::Milliseconds(200);
  if (!outcome->ready.WaitForNotificationWithTimeout(wait)) {
    return absl::UnavailableError("memcached pipeline: no answer from the I/O thread");
  }
  return std::move(outcome->result);
}

void MemcachedPipeline::GetAsync(int node_index, const std::vector<std::string>& keys,
                                 absl::Time deadline, Callback done) {
  if (keys.empty()) {
    std::move(done)(MemcachedHits{});
    return;
  }
  auto request = std::make_shared<Request>();
  request->command = "gets";
  for (const std::string& key : keys) {
    if (!ValidKey(key)) {
      std::move(done)(absl::InvalidArgumentError("memcached pipeline: invalid key"));
      return;
    }
    absl::StrAppend(&request->command, " ", key);
  }
  request->command += "\r\n";
  request->keys = keys;
  request->got = std::move(done);
  Submit(node_index, std::move(request), deadline);
}

absl::StatusOr<MemcachedStored> MemcachedPipeline::Store(int node_index, MemcachedWrite op,
                                                         const std::string& key,
                                                         absl::string_view value, int64_t exptime,
                                                         uint64_t cas, absl::Time deadline) {
  return WaitFor<MemcachedStored>(
      [&](StoreCallback done) {
        StoreAsync(node_index, op, key, value, exptime, cas, deadline, std::move(done));
      },
      deadline);
}

void MemcachedPipeline::StoreAsync(int node_index, MemcachedWrite op, const std::string& key,
                                   absl::string_view value, int64_t exptime, uint64_t cas,
                                   absl::Time deadline, StoreCallback done) {
  if (!ValidKey(key)) {
    std::move(done)(absl::InvalidArgumentError("memcached pipeline: invalid key"));
    return;
  }
  // Above 30 days memcached reads exptime as a Unix time; one already past (the item gone at
  // once, a relative time taken for a date in 1970) is never what a caller means.
  if (exptime > kMaxRelativeExptimeSeconds) {
    const int64_t now = absl::ToUnixSeconds(WallNow());
    // memcached reads exptime into a 32-bit int: past 2038-01-19 a Unix time would wrap to a
    // negative one, and the item, answered STORED, be gone at once.
    if (exptime <= now || exptime - now > kFarthestUnixExptimeAhead ||
        exptime > std::numeric_limits<int32_t>::max()) {
      std::move(done)(absl::InvalidArgumentError(absl::StrCat(
          "memcached pipeline: exptime ", exptime, " is neither 0..", kMaxRelativeExptimeSeconds,
          " seconds nor a Unix time in the coming year that memcached can read (up "
          "to 2038-01-19)")));
      return;
    }
  } else if (exptime < 0) {
    std::move(done)(absl::InvalidArgumentError(
        absl::StrCat("memcached pipeline: exptime ", exptime, " is negative")));
    return;
  }
  auto request = std::make_shared<Request>();
  const char* verb = op == MemcachedWrite::kAdd   ? "add"
                     : op == MemcachedWrite::kSet ? "set"
                                                  : "cas";
  request->command = absl::StrCat(verb, " ", key, " 0 ", exptime, " ", value.size());
  if (op == MemcachedWrite::kCas) absl::StrAppend(&request->command, " ", cas);
  absl::StrAppend(&request->command, "\r\n", value, "\r\n");
  request->stored = std::move(done);
  request->store = true;
  Submit(node_index, std::move(request), deadline);
}

void MemcachedPipeline::Submit(int node_index, std::shared_ptr<Request> request,
                               absl::Time deadline) {
  if (node_index < 0 || node_index >= static_cast<int>(nodes_.size())) {
    request->Fail(
        absl::InvalidArgumentError(absl::StrCat("memcached pipeline: no node ", node_index)));
    return;
  }
  Node& node = *nodes_[static_cast<size_t>(node_index)];
  const SteadyTime now = SteadyNow();
  request->started = now;
  request->give_up = SteadyDeadline(deadline, WallNow(), now, options_.io_timeout);
  if (request->give_up <= now) {
    request->Fail(absl::UnavailableError("memcached: the call's deadline passed"));
    return;
  }

  // No callback runs under mu_: it may start another request.
  absl::Status refused;
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) {
      refused = absl::UnavailableError("memcached pipeline: shutting down");
    } else if (now < node.failed_until) {
      refused = absl::UnavailableError(
          absl::StrCat("memcached ", node.label, ": failed recently; retrying after ",
                       absl::FormatDuration(options_.retry_after_failure)));
    } else {
      if (!node.addresses.empty()) {
        node.queued.push_back(std::move(request));
      } else {
        // The name is looked up on the resolver thread, never here: this may be the thread
        // that takes every call's arrival, or the I/O thread itself (a write to the next copy,
        // started from an answer), and a slow name server would hold up everyone's requests.
        node.awaiting_address.push_back(std::move(request));
        RefreshAddressesLocked(node);
      }
      // Also for a request that waits for an address: the I/O thread keeps its deadline.
      wake = !wake_pending_;
      wake_pending_ = true;
    }
  }
  if (!refused.ok()) {
    request->Fail(refused);
    return;
  }
  if (wake) {
    const uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof one);
  }
}

void MemcachedPipeline::TakeLookupResult(Node& node, SteadyTime now) {
  uint64_t count = 0;
  (void)!read(node.lookup->done_fd, &count, sizeof count);
  std::optional<absl::StatusOr<std::vector<MemcachedAddress>>> address;
  {
    std::lock_guard<std::mutex> lock(node.lookup->mu);
    address.swap(node.lookup->result);
  }
  if (!address.has_value()) return;
  std::vector<std::shared_ptr<Request>> failed;
  bool moved = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    node.resolving = false;
    if (address->ok()) {
      // The same addresses as before (a refresh): where the rotation through them stands is
      // kept, or a first address that does not work would be tried first again.
      if (!SameAddresses(node.addresses, **address)) {
        node.addresses = **std::move(address);
        node.next_address = 0;
        node.failed_in_a_row = 0;
        node.round_refused = false;
        node.round_failed_slowly = false;
        if (node.connecting) {
          // A connect under way to an address still listed goes on (the rotation continues
          // from there); one to an address the name no longer leads to is redirected below.
          const auto listed = std::find_if(
              node.addresses.begin(), node.addresses.end(),
              [&](const MemcachedAddress& a) { return SameAddress(a, node.connecting_to); });
          if (listed != node.addresses.end()) {
            node.next_address = static_cast<size_t>(listed - node.addresses.begin());
          } else {
            moved = true;
          }
        }
      }
      node.resolved_at = now;
      // Dispatched with the rest of this turn's requests.
      for (auto& r : node.awaiting_address) node.queued.push_back(std::move(r));
    } else if (!node.addresses.empty()) {
      // A refresh failed (no request waits for it): the node is tried where it was (a memcached
      // restarted at the same address must not wait for DNS), and its name looked up again
      // after retry_after_failure.
      node.resolved_at = now;
    } else {
      node.failed_until = now + ToSteadyDuration(options_.retry_after_failure);
      failed = std::move(node.awaiting_address);
    }
    node.awaiting_address.clear();
  }
  // The new first address instead, before the old one times out.
  if (moved && node.connecting) Reconnect(node, now);
  if (failed.empty()) return;
  const absl::Status why = absl::UnavailableError(
      absl::StrCat("memcached ", node.label, ": ", address->status().message()));
  for (auto& r : failed) r->Fail(why);
}

SteadyTime MemcachedPipeline::TakeExpiredAwaitingLocked(
    SteadyTime now, std::vector<std::shared_ptr<Request>>& expired) {
  SteadyTime next = SteadyTime::max();
  for (auto& node : nodes_) {
    auto& awaiting = node->awaiting_address;
    for (auto it = awaiting.begin(); it != awaiting.end();) {
      if (now >= (*it)->give_up) {
        expired.push_back(std::move(*it));
        it = awaiting.erase(it);
      } else {
        next = std::min(next, (*it)->give_up);
        ++it;
      }
    }
  }
  return next;
}

void MemcachedPipeline::Run() {
  epoll_event events[32];
  std::vector<std::vector<std::shared_ptr<Request>>> fresh(nodes_.size());
  std::vector<std::shared_ptr<Request>> unresolved_expired;
  // When the next request waiting for an address gives up (as of the last turn; a new one
  // wakes this thread).
  SteadyTime next_unresolved_give_up = SteadyTime::max();
  for (;;) {
    SteadyTime now = SteadyNow();
    const SteadyTime timer = std::min(NextTimer(now), std::max(next_unresolved_give_up, now));
    int timeout_ms = -1;
    if (timer != SteadyTime::max()) {
      // Every timer is at most a configured timeout away; the cap only keeps the cast safe.
      timeout_ms = static_cast<int>(std::min<int64_t>(
          std::chrono::ceil<std::chrono::milliseconds>(timer - now).count(), 3'600'000));
    }
    const int n = epoll_wait(epoll_fd_, events, 32, timeout_ms);
    // The answers this turn sends log a line each (the call observer); they go out in one
    // write when the turn ends, after the answers rather than before each of them.
    LogBatch access_log_lines;
    now = SteadyNow();
    for (int i = 0; i < n; ++i) {
      const uint64_t tag = events[i].data.u64;
      if (tag == kWakeTag) {
        uint64_t count = 0;
        (void)!read(wake_fd_, &count, sizeof count);
        continue;
      }
      if ((tag & 0xffff) == kLookupTagIndex) {
        TakeLookupResult(*nodes_[(tag >> 16) - 1], now);
        continue;
      }
      Node& node = *nodes_[tag & 0xffff];
      if (node.fd >= 0 && node.serial == (tag >> 16)) OnEvents(node, events[i].events, now);
    }
    bool stopping = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping = stopping_;
      wake_pending_ = false;
      for (size_t i = 0; i < nodes_.size(); ++i) {
        fresh[i].swap(nodes_[i]->queued);
        nodes_[i]->failed_until_seen = nodes_[i]->failed_until;
      }
      next_unresolved_give_up =
          TakeExpiredAwaitingLocked(stopping ? SteadyTime::max() : now, unresolved_expired);
    }
    for (auto& r : unresolved_expired) {
      r->Fail(absl::UnavailableError(stopping
                                         ? "memcached pipeline: shutting down"
                                         : "memcached: the node's name was not resolved in time"));
    }
    unresolved_expired.clear();
    if (stopping) {
      const absl::Status gone = absl::UnavailableError("memcached pipeline: shutting down");
      for (size_t i = 0; i < nodes_.size(); ++i) {
        for (auto& r : fresh[i]) r->Fail(gone);
        Drop(*nodes_[i], gone, false, now);
      }
      return;
    }
    // The answers' callbacks may have taken a while: what is sent goes by the clock now, so
    // that a request whose time ran out meanwhile is not (Dispatch). The checks below keep the
    // reading the events were taken at: a node's answer that came in during the callbacks is
    // read next turn, and must not count as missing.
    const SteadyTime send_now = SteadyNow();
    for (size_t i = 0; i < nodes_.size(); ++i) {
      if (!fresh[i].empty()) Dispatch(*nodes_[i], std::move(fresh[i]), send_now);
      fresh[i].clear();
    }
    for (auto& owned : nodes_) {
      Node& node = *owned;
      if (node.connecting && now >= node.connect_deadline) {
        ConnectFailed(node, ETIMEDOUT, /*at_once=*/false, now);
      } else if (!node.connecting && !node.in_flight.empty() &&
                 now - node.last_progress >= ToSteadyDuration(options_.io_timeout)) {
        Drop(node,
             absl::UnavailableError(absl::StrCat("memcached ", node.label, ": no answer for ",
                                                 absl::FormatDuration(options_.io_timeout))),
             true, now);
      } else if (!node.connecting && !node.in_flight.empty() &&
                 now - node.in_flight.front()->sent >= ToSteadyDuration(options_.io_timeout)) {
        // Still answering, but slower than it is asked: every byte counts as progress, yet
        // the backlog (kept in order, given up or not) would grow without bound, and every new
        // request would wait behind requests nobody waits for any more.
        Drop(node,
             absl::UnavailableError(absl::StrCat(
                 "memcached ", node.label, ": a request unanswered for ",
                 absl::FormatDuration(options_.io_timeout), " (answering too slowly)")),
             true, now);
      } else {
        ExpireRequests(node, now);
      }
    }
  }
}

SteadyTime MemcachedPipeline::NextTimer(SteadyTime now) const {
  SteadyTime next = SteadyTime::max();
  for (const auto& node : nodes_) {
    if (node->connecting) next = std::min(next, node->connect_deadline);
    if (node->in_flight.empty()) continue;
    // The stall checks wait while a connect is under way (Run), and so do their timers.
    if (!node->connecting) {
      next = std::min(next, node->last_progress + ToSteadyDuration(options_.io_timeout));
      next = std::min(next, node->in_flight.front()->sent + ToSteadyDuration(options_.io_timeout));
    }
    for (const auto& r : node->in_flight) {
      if (!r->answered) next = std::min(next, r->give_up);
    }
  }
  return std::max(next, now);
}

absl::Status MemcachedPipeline::TooLateToSend(const Node& node, const Request& r) {
  return absl::UnavailableError(
      absl::StrCat("memcached ", node.label, ": no answer within ",
                   absl::FormatDuration(absl::FromChrono(r.give_up - r.started)),
                   " (not sent: its time ran out before it could be)"));
}

void MemcachedPipeline::ExpireRequests(Node& node, SteadyTime now) {
  for (auto& r : node.in_flight) {
    if (r->answered || now < r->give_up) continue;
    r->Fail(absl::UnavailableError(
        absl::StrCat("memcached ", node.label, ": no answer within ",
                     absl::FormatDuration(absl::FromChrono(r->give_up - r->started)))));
  }
}

void MemcachedPipeline::Dispatch(Node& node, std::vector<std::shared_ptr<Request>> fresh,
                                 SteadyTime now) {
  if (node.fd < 0) {
    if (now < node.failed_until_seen) {
      const absl::Status failed =
          absl::UnavailableError(absl::StrCat("memcached ", node.label, ": failed recently"));
      for (auto& r : fresh) r->Fail(failed);
      return;
    }
    StartConnect(node, now);
    if (node.fd < 0) {
      const absl::Status failed =
          absl::UnavailableError(absl::StrCat("memcached ", node.label, ": cannot connect"));
      for (auto& r : fresh) r->Fail(failed);
      return;
    }
  }
  // The stall clock starts when an idle node is given work.
  if (node.in_flight.empty()) node.last_progress = now;
  batches_.fetch_add(1, std::memory_order_relaxed);
  batched_requests_.fetch_add(static_cast<int64_t>(fresh.size()), std::memory_order_relaxed);
  for (auto& r : fresh) {
    // Its time ran out while it waited for this turn of the loop (the I/O thread late, a slow
    // callback): not sent at all, as a write its caller is told failed must not land later.
    if (now >= r->give_up) {
      r->Fail(TooLateToSend(node, *r));
      continue;
    }
    // A slow name lookup is not the node answering slowly: the "answering too slowly" check
    // counts from here, not from when the caller asked.
    r->sent = now;
    node.out += r->command;
    node.in_flight.push_back(std::move(r));
  }
  if (!node.connecting) Flush(node, now);
}

void MemcachedPipeline::StartConnect(Node& node, SteadyTime now) {
  MemcachedAddress peer;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (node.addresses.empty()) return;
    peer = node.addresses[node.next_address % node.addresses.size()];
  }
  const int fd = socket(peer.address.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    // No socket of that family on this host (::1 with IPv6 off): the next address, then.
    ConnectFailed(node, errno, /*at_once=*/true, now);
    return;
  }
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  node.fd = fd;
  ++node.serial;
  node.connecting = false;
  node.watching_writes = false;
  if (connect(fd, reinterpret_cast<const sockaddr*>(&peer.address), peer.length) != 0) {
    const int err = errno;
    if (err != EINPROGRESS) {
      ConnectFailed(node, err, /*at_once=*/true, now);
      return;
    }
    node.connecting = true;
    node.connecting_to = peer;
    node.connect_deadline = now + ToSteadyDuration(options_.connect_timeout);
  } else {
    Connected(node, now);
  }
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP | (node.connecting ? EPOLLOUT : 0u);
  ev.data.u64 = Tag(node.index, node.serial);
  node.watching_writes = node.connecting;
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
    Drop(node, absl::UnavailableError(Errno("epoll_ctl", errno)), false, now);
  }
}

void MemcachedPipeline::Connected(Node& node, SteadyTime now) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    node.failed_in_a_row = 0;
    node.round_refused = false;
    node.round_failed_slowly = false;
  }
  // The requests that waited for the connect (through several addresses, maybe) are sent now,
  // and the stall checks count from here. Those that gave up meanwhile are not sent: a write
  // its caller was told had failed must not land later. (Nothing is on the wire yet.) The clock
  // is read again for that: `now` is from before this turn's callbacks, which may have taken a
  // while.
  const SteadyTime send_now = std::max(now, SteadyNow());
  node.last_progress = send_now;
  std::deque<std::shared_ptr<Request>> waiting;
  node.out.clear();
  node.out_offset = 0;
  for (auto& r : node.in_flight) {
    if (r->answered) continue;
    if (send_now >= r->give_up) {
      r->Fail(TooLateToSend(node, *r));
      continue;
    }
    r->sent = send_now;
    node.out += r->command;
    waiting.push_back(std::move(r));
  }
  node.in_flight = std::move(waiting);
}

void MemcachedPipeline::ConnectFailed(Node& node, int err, bool at_once, SteadyTime now) {
  bool try_next = false;
  bool back_off = BackOffAfter(err);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!node.addresses.empty()) {
      if (err == ECONNREFUSED) {
        node.round_refused = true;
      } else if (!at_once) {
        node.round_failed_slowly = true;
      }
      node.next_address = (node.next_address + 1) % node.addresses.size();
      try_next = ++node.failed_in_a_row < node.addresses.size();
      if (!try_next) {
        // Every address failed. Requests fail at once for a while only when waiting for this
        // node cost time (a connect timed out) or nothing but odd errors came back; a refusal
        // is retried at once, as memcached may be restarting. (An address that cannot work
        // on this host at all, ::1 with IPv6 off, fails at once and does not count.)
        back_off = node.round_failed_slowly || !node.round_refused;
        node.failed_in_a_row = 0;
        node.round_refused = false;
        node.round_failed_slowly = false;
        // The node may have moved (a pod's new IP): its name is looked up again, in the
        // background and at most once per retry_after_failure, while it is tried where it was.
        if (now - node.resolved_at >= ToSteadyDuration(options_.retry_after_failure)) {
          RefreshAddressesLocked(node);
        }
      }
    }
  }
  if (try_next) {
    Reconnect(node, now);
    return;
  }
  Drop(node,
       absl::UnavailableError(err == ETIMEDOUT
                                  ? absl::StrCat("memcached ", node.label, ": connect timed out")
                                  : Errno(absl::StrCat("memcached ", node.label), err)),
       back_off, now);
}

void MemcachedPipeline::Reconnect(Node& node, SteadyTime now) {
  if (node.fd >= 0) close(node.fd);  // Also leaves the epoll set.
  node.fd = -1;
  node.connecting = false;
  node.watching_writes = false;
  node.out_offset = 0;
  StartConnect(node, now);
  if (node.fd >= 0 && !node.connecting) Flush(node, now);
}

void MemcachedPipeline::RefreshAddressesLocked(Node& node) {
  if (node.resolving) return;
  node.resolving = true;
  std::lock_guard<std::mutex> asking(node.lookup->mu);
  node.lookup->wanted = true;
  node.lookup->wanted_cv.notify_one();
}

void MemcachedPipeline::Watch(Node& node, bool want_write) {
  if (node.fd < 0 || node.watching_writes == want_write) return;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP | (want_write ? EPOLLOUT : 0u);
  ev.data.u64 = Tag(node.index, node.serial);
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, node.fd, &ev) == 0) node.watching_writes = want_write;
}

void MemcachedPipeline::OnEvents(Node& node, uint32_t events, SteadyTime now) {
  if (node.connecting) {
    if ((events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) == 0) return;
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(node.fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
    if (err != 0) {
      ConnectFailed(node, err, /*at_once=*/false, now);
      return;
    }
    node.connecting = false;
    Connected(node, now);
    Flush(node, now);
    return;
  }
  if ((events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0) ReadAnswers(node, now);
  if (node.fd >= 0 && (events & EPOLLOUT) != 0) Flush(node, now);
}

void MemcachedPipeline::Flush(Node& node, SteadyTime now) {
  while (node.out_offset < node.out.size()) {
    const ssize_t sent = send(node.fd, node.out.data() + node.out_offset,
                              node.out.size() - node.out_offset, MSG_NOSIGNAL);
    if (sent > 0) {
      node.out_offset += static_cast<size_t>(sent);
      continue;
    }
    if (sent < 0 && errno == EINTR) continue;
    if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      // The part already sent goes once it is a chunk's worth: a node that always has more
      // to take than its socket holds would otherwise keep the buffer from ever emptying, and
      // it would hold every byte sent to it since.
      if (node.out_offset >= kReadChunk) {
        node.out.erase(0, node.out_offset);
        node.out_offset = 0;
      }
      Watch(node, true);
      return;
    }
    Drop(node, absl::UnavailableError(Errno(absl::StrCat("memcached ", node.label), errno)), false,
         now);
    return;
  }
  node.out.clear();
  node.out_offset = 0;
  Watch(node, false);
}

void MemcachedPipeline::ReadAnswers(Node& node, SteadyTime now) {
  for (;;) {
    // Received into a buffer kept for the purpose, not straight into `in`: growing a string
    // by a chunk zero-fills all of it, 64 KiB per read for replies of a few hundred bytes.
    const ssize_t got = recv(node.fd, read_buffer_.get(), kReadChunk, 0);
    if (got > 0) {
      node.in.append(read_buffer_.get(), static_cast<size_t>(got));
      node.last_progress = now;
      if (!ParseAnswers(node)) {
        Drop(node,
             absl::UnavailableError(
                 absl::StrCat("memcached ", node.label, ": unexpected answer; connection reset")),
             false, now);
        return;
      }
      if (static_cast<size_t>(got) < kReadChunk) return;
      continue;
    }
    if (got < 0 && errno == EINTR) continue;
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    Drop(node,
         absl::UnavailableError(
             got == 0 ? absl::StrCat("memcached ", node.label, ": connection closed by the server")
                      : Errno(absl::StrCat("memcached ", node.label), errno)),
         false, now);
    return;
  }
}

bool MemcachedPipeline::ParseAnswers(Node& node) {
  std::string& in = node.in;
  for (;;) {
    const size_t eol = in.find("\r\n", node.in_offset);
    if (eol == std::string::npos) {
      if (in.size() - node.in_offset > kMaxLine) return false;
      break;
    }
    // Bytes with nobody waiting for them mean we lost track of the stream.
    if (node.in_flight.empty()) return false;
    const absl::string_view line(in.data() + node.in_offset, eol - node.in_offset);
    if (node.in_flight.front()->is_store()) {
      std::optional<MemcachedStored> reply = StoreReply(line);
      // memcached refuses a store it cannot carry out (a value above its item size limit, no
      // memory) with SERVER_ERROR and swallows the data, so the stream stays in step: only
      // that store fails. Anything else (ERROR, CLIENT_ERROR, ...) means we lost track.
      const bool refused = absl::StartsWith(line, "SERVER_ERROR");
      if (!reply.has_value() && !refused) return false;
      std::shared_ptr<Request> done = std::move(node.in_flight.front());
      node.in_flight.pop_front();
      if (refused) {
        done->Fail(StoreRefused(node.label, line));
      } else {
        done->Answer(*reply);
      }
      node.in_offset = eol + 2;
      continue;
    }
    if (line == "END") {
      std::shared_ptr<Request> done = std::move(node.in_flight.front());
      node.in_flight.pop_front();
      MemcachedHits hits = std::move(node.partial);
      node.partial.clear();
      done->Answer(std::move(hits));
      node.in_offset = eol + 2;
      continue;
    }
    if (!absl::StartsWith(line, "VALUE ")) return false;  // ERROR, SERVER_ERROR, ...
    const std::vector<absl::string_view> fields = absl::StrSplit(line, ' ');
    uint64_t bytes = 0;
    uint64_t cas = 0;
    if (fields.size() != 5 || !absl::SimpleAtoi(fields[3], &bytes) ||
        !absl::SimpleAtoi(fields[4], &cas) || bytes > kMaxValueBytes) {
      return false;
    }
    const Request& front = *node.in_flight.front();
    if (std::find(front.keys.begin(), front.keys.end(), fields[1]) == front.keys.end()) {
      return false;
    }
    const size_t value_at = eol + 2;
    if (in.size() < value_at + bytes + 2) break;  // The value is still on its way.
    if (in.compare(value_at + bytes, 2, "\r\n") != 0) return false;
    MemcachedItem item;
    item.value.assign(in, value_at, bytes);
    item.cas = cas;
    node.partial[std::string(fields[1])] = std::move(item);
    node.in_offset = value_at + bytes + 2;
  }
  if (node.in_offset == in.size()) {
    in.clear();
    node.in_offset = 0;
  } else if (node.in_offset > kReadChunk) {
    in.erase(0, node.in_offset);
    node.in_offset = 0;
  }
  return true;
}

absl::Time MemcachedPipeline::WallNow() const {
  return options_.wall_clock != nullptr ? options_.wall_clock->Now() : absl::Now();
}

void MemcachedPipeline::Drop(Node& node, const absl::Status& why, bool mark_failed,
                             SteadyTime now) {
  if (node.fd >= 0) close(node.fd);  // Also leaves the epoll set.
  node.fd = -1;
  node.connecting = false;
  node.watching_writes = false;
  node.out.clear();
  node.out_offset = 0;
  node.in.clear();
  node.in_offset = 0;
  node.partial.clear();
  // Marked first, so that a caller retrying from its callback already fails fast.
  if (mark_failed) {
    node.failed_until_seen = now + ToSteadyDuration(options_.retry_after_failure);
    std::lock_guard<std::mutex> lock(mu_);
    node.failed_until = node.failed_until_seen;
    // The node may come back at another address: its name is looked up again in the
    // background, and it is tried where it was meanwhile.
    RefreshAddressesLocked(node);
  }
  std::deque<std::shared_ptr<Request>> answered = std::move(node.in_flight);
  node.in_flight.clear();
  for (auto& r : answered) r->Fail(why);
}

}  // namespace sessionledger
