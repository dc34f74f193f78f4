#include "server/common/host_resolver.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <condition_variable>
#include <map>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/common/thread_name.h"

namespace sessionledger {

absl::StatusOr<std::vector<std::string>> LookUpHost(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(host.c_str(), nullptr, &hints, &found);
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> owned(found, &freeaddrinfo);
  if (rc != 0) {
    return rc == EAI_NONAME ? absl::NotFoundError(gai_strerror(rc))
                            : absl::UnavailableError(gai_strerror(rc));
  }
  std::vector<std::string> addresses;
  for (const addrinfo* a = found; a != nullptr; a = a->ai_next) {
    char text[NI_MAXHOST];
    if (getnameinfo(a->ai_addr, a->ai_addrlen, text, sizeof text, nullptr, 0, NI_NUMERICHOST) !=
        0) {
      continue;
    }
    // getaddrinfo's order (RFC 6724) is the order libpq would have tried them in.
    if (std::find(addresses.begin(), addresses.end(), text) == addresses.end()) {
      addresses.emplace_back(text);
    }
  }
  if (addresses.empty()) return absl::NotFoundError("no address");
  return addresses;
}

// One lookup in flight; guarded by State::mu.
struct HostResolver::Lookup {
  bool done = false;
  absl::StatusOr<std::vector<std::string>> result;
  std::condition_variable answered;
};

// Shared by the resolver and its lookup threads; whichever lets go last frees it.
struct HostResolver::State {
  State(HostLookupFn fn, std::string name) : lookup(std::move(fn)), thread_name(std::move(name)) {}

  // Records `host`'s answer and wakes its waiters; mu held. The lookup is then forgotten, so
  // that the next caller looks the name up afresh (a failover may have moved it).
  void Answer(const std::string& host, Lookup& answered,
              absl::StatusOr<std::vector<std::string>> result) {
    answered.result = std::move(result);
    answered.done = true;
    auto it = in_flight.find(host);
    if (it != in_flight.end() && it->second.get() == &answered) in_flight.erase(it);
    answered.answered.notify_all();
  }

  const HostLookupFn lookup;
  const std::string thread_name;
  std::mutex mu;
  std::map<std::string, std::shared_ptr<Lookup>> in_flight;  // Guarded by mu,
  int64_t started = 0;                                       // as are these.
  int waiting = 0;
};

HostResolver::HostResolver(HostLookupFn lookup, std::string thread_name)
    : state_(std::make_shared<State>(lookup ? std::move(lookup) : HostLookupFn(LookUpHost),
                                     std::move(thread_name))) {}

// Lookup threads hold their own reference to the state: nothing to wait for.
HostResolver::~HostResolver() = default;

HostResolver::Pending HostResolver::Start(const std::vector<std::string>& hosts) {
  Pending pending;
  pending.state_ = state_;
  std::vector<std::pair<std::string, std::shared_ptr<Lookup>>> to_start;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    for (const std::string& host : hosts) {
      std::shared_ptr<Lookup>& lookup = state_->in_flight[host];
      if (lookup == nullptr) {
        lookup = std::make_shared<Lookup>();
        to_start.emplace_back(host, lookup);
        ++state_->started;
      }
      pending.lookups_.push_back(lookup);
    }
  }
  // Threads start outside the lock: other callers need not wait for thread creation.
  for (auto& [host, lookup] : to_start) {
    try {
      std::thread([state = state_, host = host, lookup = lookup] {
        NameThisThread(state->thread_name);
        absl::StatusOr<std::vector<std::string>> result = state->lookup(host);
        std::lock_guard<std::mutex> lock(state->mu);
        state->Answer(host, *lookup, std::move(result));
      }).detach();
    } catch (const std::system_error& e) {
      std::lock_guard<std::mutex> lock(state_->mu);
      // As a failed lookup: the caller answers UNAVAILABLE (or tries the other hosts).
      state_->Answer(host, *lookup,
                     absl::UnavailableError(absl::StrCat("cannot start a thread: ", e.what())));
    }
  }
  return pending;
}

std::optional<absl::StatusOr<std::vector<std::string>>> HostResolver::Pending::Await(
    size_t i, SteadyTime give_up) {
  Lookup& lookup = *lookups_[i];
  std::unique_lock<std::mutex> lock(state_->mu);
  ++state_->waiting;
  const bool answered = lookup.answered.wait_until(lock, give_up, [&] { return lookup.done; });
  --state_->waiting;
  if (!answered) return std::nullopt;
  return lookup.result;
}

bool HostResolver::Pending::Answered(size_t i) const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return lookups_[i]->done;
}

int64_t HostResolver::lookups_started() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->started;
}

int HostResolver::waiting() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->waiting;
}

bool IsNumericAddress(const std::string& host) {
  in6_addr buffer;
  return inet_pton(AF_INET, host.c_str(), &buffer) == 1 ||
         inet_pton(AF_INET6, host.c_str(), &buffer) == 1;
}

}  // namespace sessionledger
