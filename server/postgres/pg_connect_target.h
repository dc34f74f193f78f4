#ifndef SESSIONLEDGER_SERVER_POSTGRES_PG_CONNECT_TARGET_H_
#define SESSIONLEDGER_SERVER_POSTGRES_PG_CONNECT_TARGET_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace sessionledger {

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

#endif  // SESSIONLEDGER_SERVER_POSTGRES_PG_CONNECT_TARGET_H_
