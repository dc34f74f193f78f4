#include "server/postgres/pg_connect_target.h"

#include <libpq-fe.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "server/common/host_resolver.h"
#include "server/common/status_macros.h"

namespace sessionledger {

namespace {

std::vector<std::string> SplitList(const char* value) {
  if (value == nullptr || *value == '\0') return {};
  return absl::StrSplit(value, ',');
}

// `keyword`'s entry in `options` (libpq lists every keyword it knows, set or not).
const PQconninfoOption& OptionOf(const PQconninfoOption* options, const char* keyword) {
  const PQconninfoOption* o = options;
  while (o->keyword != nullptr && std::strcmp(o->keyword, keyword) != 0) ++o;
  return *o;  // The terminator, all null, for a keyword libpq does not know.
}

// The value `keyword` has in `options`; null when unset.
const char* ValueOf(const PQconninfoOption* options, const char* keyword) {
  return OptionOf(options, keyword).val;
}

}  // namespace

PgConnectTarget::PgConnectTarget(std::string conninfo) : conninfo_(std::move(conninfo)) {
  std::unique_ptr<PQconninfoOption, decltype(&PQconninfoFree)> options(
      PQconninfoParse(conninfo_.c_str(), nullptr), &PQconninfoFree);
  if (options == nullptr) return;  // libpq will say why when it connects.
  const char* host = ValueOf(options.get(), "host");
  const char* hostaddr = ValueOf(options.get(), "hostaddr");
  const char* port = ValueOf(options.get(), "port");
  std::unique_ptr<PQconninfoOption, decltype(&PQconninfoFree)> defaults(nullptr, &PQconninfoFree);
  if (host == nullptr || hostaddr == nullptr || port == nullptr) {
    // A service named here would fill these in before the environment, and only libpq reads it.
    if (ValueOf(options.get(), "service") != nullptr) return;
    // What libpq fills in: the settings of the service PGSERVICE names, then PGHOST and the like.
    defaults.reset(PQconndefaults());
    if (defaults == nullptr) return;
    if (host == nullptr) host = ValueOf(defaults.get(), "host");
    if (hostaddr == nullptr) hostaddr = ValueOf(defaults.get(), "hostaddr");
    if (port == nullptr) port = ValueOf(defaults.get(), "port");
  }
  // Read before the host list, whose shape may leave everything to libpq.
  const auto setting = [&](const char* keyword) -> const char* {
    if (const char* value = ValueOf(options.get(), keyword); value != nullptr) return value;
    if (defaults == nullptr && ValueOf(options.get(), "service") == nullptr) {
      defaults.reset(PQconndefaults());
    }
    return defaults == nullptr ? nullptr : ValueOf(defaults.get(), keyword);
  };
  if (const char* timeout = setting("connect_timeout"); timeout != nullptr) {
    int seconds = 0;
    if (absl::SimpleAtoi(timeout, &seconds) && seconds > 0) {
      connect_timeout_ = absl::Seconds(std::max(seconds, 2));
    }
  }
  if (const char* attrs = setting("target_session_attrs"); attrs != nullptr) {
    needs_whole_list_ = absl::string_view(attrs) == "prefer-standby";
  }
  const std::vector<std::string> hosts = SplitList(host);
  const std::vector<std::string> hostaddrs = SplitList(hostaddr);
  const std::vector<std::string> ports = SplitList(port);
  // The same rules as libpq's: hostaddr one per host when both are given; one port for all or
  // one per host. Otherwise libpq refuses the conninfo (before any lookup), so leave it be.
  if (hosts.empty()) return;
  if (!hostaddrs.empty() && hostaddrs.size() != hosts.size()) return;
  if (ports.size() > 1 && ports.size() != hosts.size()) return;
  per_entry_ports_ = ports.size() > 1;
  for (size_t i = 0; i < hosts.size(); ++i) {
    // libpq drops an empty keyword value, and the conninfo's own list would then apply: an
    // entry with no host (the default socket) or, beside other entries' hostaddrs, none of its
    // own cannot be handed over alone.
    if (hosts[i].empty() || (!hostaddrs.empty() && hostaddrs[i].empty())) {
      needs_whole_list_ = true;
    }
    Entry entry;
    entry.host = hosts[i];
    if (!hostaddrs.empty()) entry.hostaddr = hostaddrs[i];
    // An empty entry means libpq's built-in port (not PGPORT's). Spelled out, so that it stays
    // the entry's own when the entry is passed on without the others (see WithAddresses).
    if (per_entry_ports_) {
      const char* built_in = OptionOf(options.get(), "port").compiled;
      entry.port = !ports[i].empty() ? ports[i] : built_in != nullptr ? built_in : "";
    }
    const bool needs_lookup = !entry.host.empty() && entry.hostaddr.empty() &&
                              entry.host[0] != '/' && entry.host[0] != '@' &&
                              !IsNumericAddress(entry.host);
    if (needs_lookup) {
      auto it = std::find(names_.begin(), names_.end(), entry.host);
      entry.name_index = static_cast<int>(it - names_.begin());
      if (it == names_.end()) names_.push_back(entry.host);
    }
    entries_.push_back(std::move(entry));
  }
}

absl::StatusOr<PgConnectTarget::Overrides> PgConnectTarget::WithAddresses(
    const std::vector<absl::StatusOr<std::vector<std::string>>>& addresses, size_t begin,
    size_t end) const {
  SL_ASSIGN_OR_RETURN(const std::vector<Overrides> candidates, Candidates(addresses, begin, end));
  std::vector<absl::string_view> hosts;
  std::vector<absl::string_view> hostaddrs;
  std::vector<absl::string_view> ports;
  for (const Overrides& candidate : candidates) {
    hosts.push_back(candidate.host);
    hostaddrs.push_back(candidate.hostaddr);
    ports.push_back(candidate.port);
  }
  Overrides overrides;
  overrides.host = absl::StrJoin(hosts, ",");
  overrides.hostaddr = absl::StrJoin(hostaddrs, ",");
  // One port for all (or none) is the conninfo's own and still applies to every entry.
  if (per_entry_ports_) overrides.port = absl::StrJoin(ports, ",");
  return overrides;
}

absl::StatusOr<std::vector<PgConnectTarget::Overrides>> PgConnectTarget::Candidates(
    const std::vector<absl::StatusOr<std::vector<std::string>>>& addresses, size_t begin,
    size_t end) const {
  if (addresses.size() != names_.size()) {
    return absl::InternalError("postgres: lookup results do not match the host names");
  }
  end = std::min(end, entries_.size());
  std::vector<Overrides> candidates;
  absl::Status first_failure;
  for (size_t i = begin; i < end; ++i) {
    const Entry& entry = entries_[i];
    if (entry.name_index < 0) {
      candidates.push_back(Overrides{entry.host, entry.hostaddr, entry.port});
      continue;
    }
    const absl::StatusOr<std::vector<std::string>>& found = addresses[entry.name_index];
    if (!found.ok()) {
      if (first_failure.ok()) {
        first_failure = absl::UnavailableError(absl::StrCat(
            "postgres: cannot look up '", entry.host, "': ", found.status().message()));
      }
      continue;
    }
    for (const std::string& address : *found) {
      candidates.push_back(Overrides{entry.host, address, entry.port});
    }
  }
  if (candidates.empty()) {
    // Nothing to try: every name failed (say why), or answered without an address.
    if (!first_failure.ok()) return first_failure;
    return absl::UnavailableError("postgres: no address to connect to");
  }
  return candidates;
}

}  // namespace sessionledger
