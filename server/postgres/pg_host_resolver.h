#ifndef SESSIONLEDGER_SERVER_POSTGRES_PG_HOST_RESOLVER_H_
#define SESSIONLEDGER_SERVER_POSTGRES_PG_HOST_RESOLVER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/common/clock.h"

namespace sessionledger {

// How a PostgreSQL host name is turned into numeric addresses ("10.0.0.5", "::1"), in the order
// they should be tried. NOT_FOUND or UNAVAILABLE when the name does not resolve.
using PgLookupFn = std::function<absl::StatusOr<std::vector<std::string>>(const std::string& host)>;

// getaddrinfo(3) (TCP, any family), as libpq itself would look the name up.
absl::StatusOr<std::vector<std::string>> LookUpPgHost(const std::string& host);

// Whether `host` is an IPv4 or IPv6 address in numeric form, which needs no lookup.
bool IsNumericAddress(const std::string& host);

// Looks up PostgreSQL host names without ever blocking a caller past its deadline.
//
// libpq resolves names synchronously inside PQconnectStartParams/PQconnectPoll, where no
// deadline reaches, and getaddrinfo cannot be interrupted: with a name server that drops
// packets a connect would block for the resolver's whole timeout (glibc: 5 s x attempts x
// search domains). So each lookup runs on a thread of its own ("sl-pg-dns"), and callers wait
// for it only until their deadline.
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
class PgHostResolver {
  struct Lookup;  // One lookup in flight (the .cc file defines both).
  struct State;   // What the resolver shares with its lookup threads.

 public:
  // `lookup`: LookUpPgHost when unset; tests inject slow or counting ones. It runs on detached
  // threads that may outlive the resolver, so it must capture nothing that dies with it.
  // `thread_name` names those threads (top -H), for a resolver that looks up other hosts than
  // PostgreSQL's.
  explicit PgHostResolver(PgLookupFn lookup = nullptr, std::string thread_name = "sl-pg-dns");
  ~PgHostResolver();
  PgHostResolver(const PgHostResolver&) = delete;
  PgHostResolver& operator=(const PgHostResolver&) = delete;

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
    friend class PgHostResolver;
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

// What a conninfo asks libpq to connect to, parsed once, and how to connect there by address.
//
// A host entry needs a lookup when it is a name: not a unix-socket path ('/' or '@' first), not
// empty (libpq's default socket), not a numeric address, and without a `hostaddr` of its own.
// host, hostaddr and port may be comma lists (libpq tries each host in turn); so may be the
// result: a name with several addresses becomes one entry per address, with the name kept as
// `host` (TLS verify-full, .pgpass and libpq's messages use it) and the address as `hostaddr`
// (libpq then does no lookup). libpq still tries each address in turn, and target_session_attrs
// applies to each as before.
//
// What the conninfo leaves out comes from where libpq would take it: the service PGSERVICE
// names, then PGHOST, PGHOSTADDR and PGPORT. A conninfo that names a service itself, and leaves
// host, hostaddr or port to it, is left to libpq (and its unbounded lookup): libpq offers no way
// to read a service's settings short of connecting; DATABASE_URL cannot name one
// (ValidateDatabaseUrl refuses it). A conninfo libpq cannot parse, or whose lists do not match
// up, is passed on unchanged, so libpq reports the error as before.
class PgConnectTarget {
 public:
  explicit PgConnectTarget(std::string conninfo);

  const std::string& conninfo() const { return conninfo_; }
  // The distinct names to look up, in the order of the host list; empty when none.
  const std::vector<std::string>& names() const { return names_; }
  // The host list's entries, in the order libpq tries them; for each, the index into names()
  // of the name it needs looked up, or -1 when it needs none. None when the host list is left
  // to libpq.
  size_t entry_count() const { return entries_.size(); }
  int name_index(size_t entry) const { return entries_[entry].name_index; }

  // Values for libpq's host, hostaddr and port keywords (port empty: keep the conninfo's),
  // which override the conninfo's.
  struct Overrides {
    std::string host;
    std::string hostaddr;
    std::string port;
  };
  // The overrides for the entries [begin, end) of the host list, given names()'s lookup results
  // (same order; only those of names in the range are read). A name whose lookup failed is left
  // out of the list, as libpq skips a host it cannot resolve; UNAVAILABLE with that failure when
  // nothing is left to try.
  absl::StatusOr<Overrides> WithAddresses(
      const std::vector<absl::StatusOr<std::vector<std::string>>>& addresses, size_t begin = 0,
      size_t end = SIZE_MAX) const;
  // The same, one libpq host entry (one address) each, in the order libpq would try them: to
  // connect to them one at a time, each with its own time limit.
  absl::StatusOr<std::vector<Overrides>> Candidates(
      const std::vector<absl::StatusOr<std::vector<std::string>>>& addresses, size_t begin = 0,
      size_t end = SIZE_MAX) const;

  // The conninfo's connect_timeout (or PGCONNECT_TIMEOUT's), as libpq reads it: at least 2 s;
  // zero when none is set (libpq would wait for each host without a limit).
  absl::Duration connect_timeout() const { return connect_timeout_; }
  // True when only libpq itself can choose among the hosts: target_session_attrs=prefer-standby
  // goes over the whole list twice, for a standby first, then for any server; and an entry
  // with an empty host, or an empty hostaddr beside others', cannot be passed on alone.
  bool needs_whole_list() const { return needs_whole_list_; }

 private:
  struct Entry {
    std::string host;
    std::string hostaddr;
    std::string port;
    int name_index = -1;  // Into names_, when the entry needs a lookup.
  };

  std::string conninfo_;
  std::vector<Entry> entries_;
  bool per_entry_ports_ = false;  // The conninfo has one port per host.
  absl::Duration connect_timeout_ = absl::ZeroDuration();
  bool needs_whole_list_ = false;
  std::vector<std::string> names_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_POSTGRES_PG_HOST_RESOLVER_H_
