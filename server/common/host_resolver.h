#ifndef SESSIONLEDGER_SERVER_COMMON_HOST_RESOLVER_H_
#define SESSIONLEDGER_SERVER_COMMON_HOST_RESOLVER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/common/clock.h"

namespace sessionledger {

// How a host name is turned into numeric addresses ("10.0.0.5", "::1"), in the order they
// should be tried. NOT_FOUND or UNAVAILABLE when the name does not resolve.
using HostLookupFn =
    std::function<absl::StatusOr<std::vector<std::string>>(const std::string& host)>;

// getaddrinfo(3) (TCP, any family), as libpq, libmemcached and gRPC's native resolver would look
// the name up, in its order (RFC 6724).
absl::StatusOr<std::vector<std::string>> LookUpHost(const std::string& host);

// Whether `host` is an IPv4 or IPv6 address in numeric form, which needs no lookup.
bool IsNumericAddress(const std::string& host);

// Looks up host names without ever blocking a caller past its deadline.
//
// getaddrinfo cannot be interrupted: with a name server that drops packets it blocks for the
// resolver's whole timeout (glibc: 5 s x attempts x search domains), and libpq calls it inside
// PQconnectStartParams/PQconnectPoll, where no deadline reaches. So each lookup runs on a thread
// of its own (named by the owner: "sl-pg-dns" for PostgreSQL's hosts), and callers wait for it
// only until their deadline.
//
// Lookups are coalesced: while a name's lookup is in flight, every caller asking for that name
// waits on the same one, so a DNS outage costs at most one thread per name, however many calls
// reconnect. Nothing is cached beyond that: once a lookup has answered, the next caller starts
// a new one, so a connection opened after a failover finds the new address.
//
// Lookup threads are never joined: they share only a reference-counted state with the
// resolver, which the last of them frees. Destroying the resolver therefore never waits for a
// stuck lookup (a shutdown must not outlast the pod's grace period because of DNS).
//
// Thread-safe. A Pending shares the resolver's state, so it may outlive the resolver, as lookups
// may.
class HostResolver {
  struct Lookup;  // One lookup in flight (the .cc file defines both).
  struct State;   // What the resolver shares with its lookup threads.

 public:
  // `lookup`: LookUpHost when unset; tests inject slow or counting ones. It runs on detached
  // threads that may outlive the resolver, so it must capture nothing that dies with it.
  // `thread_name` names those threads (top -H), after what their hosts are for.
  explicit HostResolver(HostLookupFn lookup = nullptr, std::string thread_name = "sl-dns");
  ~HostResolver();
  HostResolver(const HostResolver&) = delete;
  HostResolver& operator=(const HostResolver&) = delete;

  // Lookups of a list of hosts, all started at once, each awaited on its own: a caller that
  // tries hosts in order waits only for the one it comes to, not for a slower one after it.
  class Pending {
   public:
    // The addresses of hosts[i] once its lookup has answered (its error when the name does not
    // resolve); nullopt when `give_up` comes first (the lookup goes on, and later callers may
    // still use it).
    std::optional<absl::StatusOr<std::vector<std::string>>> Await(size_t i, SteadyTime give_up);
    // Whether hosts[i]'s lookup has answered (Await would not wait).
    bool Answered(size_t i) const;

   private:
    friend class HostResolver;
    std::shared_ptr<State> state_;
    std::vector<std::shared_ptr<Lookup>> lookups_;
  };

  // Starts a lookup of each of `hosts` (in that order), or joins the one in flight for it, as
  // described above. A lookup whose thread cannot be started fails like a lookup (UNAVAILABLE).
  Pending Start(const std::vector<std::string>& hosts);

  // Lookups started so far, and callers waiting on one right now (metrics, tests).
  int64_t lookups_started() const;
  int waiting() const;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_COMMON_HOST_RESOLVER_H_
