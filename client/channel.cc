#include "client/channel.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <tuple>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "server/common/clock.h"
#include "server/common/small_file.h"

namespace sessionledger::client {
namespace {

struct HostPort {
  std::string host;
  std::string port;
};

absl::StatusOr<HostPort> SplitHostPort(const std::string& address) {
  std::string host;
  std::string port;
  if (!address.empty() && address.front() == '[') {
    const size_t close = address.find(']');
    if (close == std::string::npos || close + 1 >= address.size() || address[close + 1] != ':') {
      return absl::InvalidArgumentError(absl::StrCat("--target: bad address '", address, "'"));
    }
    host = address.substr(1, close - 1);
    port = address.substr(close + 2);
  } else {
    const size_t colon = address.rfind(':');
    if (colon == std::string::npos || address.find(':') != colon) {
      return absl::InvalidArgumentError(
          absl::StrCat("--target: '", address, "' needs the form host:port (IPv6 as [addr]:port)"));
    }
    host = address.substr(0, colon);
    port = address.substr(colon + 1);
  }
  int port_number = 0;
  if (host.empty() || !absl::SimpleAtoi(port, &port_number) || port_number < 1 ||
      port_number > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--target: '", address, "' needs the form host:port"));
  }
  return HostPort{host, port};
}

// A certificate or key file is a few KiB. The cap keeps a mistaken path (/dev/zero, a disk
// image) from eating memory without bound; the server caps its TLS files the same way.
constexpr size_t kMaxPemFileBytes = 1 << 20;

// The contents of the file a TLS option names; INVALID_ARGUMENT names the option.
absl::StatusOr<std::string> ReadPemFile(const char* flag, const std::string& path) {
  absl::StatusOr<std::string> contents = ReadSmallFile(path, kMaxPemFileBytes);
  if (!contents.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": ", contents.status().message()));
  }
  if (contents->empty()) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": ", path, " is empty"));
  }
  return contents;
}

// The schemes of gRPC's resolvers a --target may name besides a plain host:port.
constexpr absl::string_view kResolverSchemes[] = {
    "dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:"};

// The resolver scheme `target` starts with, if any.
std::optional<absl::string_view> ResolverScheme(absl::string_view target) {
  for (absl::string_view scheme : kResolverSchemes) {
    if (absl::StartsWith(target, scheme)) return scheme;
  }
  return std::nullopt;
}

}  // namespace

absl::StatusOr<std::string> BuildChannelTarget(const std::vector<std::string>& targets,
                                               absl::Duration lookup_limit, HostLookupFn lookup) {
  if (targets.empty()) return absl::InvalidArgumentError("--target: no address given");
  if (targets.size() == 1) {
    // A URI of another resolver (unix:, ipv4:, xds:///...) is gRPC's to read. A plain address
    // is checked here: gRPC would take "localhost" to mean port 443 and "host:abc" to mean
    // port 0, and report either as UNAVAILABLE after sending nothing useful (or the token to
    // a port nobody meant).
    const std::string& target = targets.front();
    const std::optional<absl::string_view> scheme = ResolverScheme(target);
    // "ipv4:" or "unix://" alone (an unset variable after it) would reach gRPC, which says only
    // UNAVAILABLE.
    if (scheme.has_value() && target.find_first_not_of('/', scheme->size()) == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("--target: no address after '", target, "'"));
    }
    const bool plain = absl::StartsWith(target, "dns:///") ||
                       (!absl::StrContains(target, "://") && !scheme.has_value());
    if (plain) {
      absl::string_view address = target;
      absl::ConsumePrefix(&address, "dns:///");
      // gRPC's resolvers also take the service names http and https for a port.
      std::string numeric(address);
      if (absl::ConsumeSuffix(&address, ":https")) {
        numeric = absl::StrCat(address, ":443");
      } else if (absl::ConsumeSuffix(&address, ":http")) {
        numeric = absl::StrCat(address, ":80");
      }
      absl::StatusOr<HostPort> checked = SplitHostPort(numeric);
      if (!checked.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--target: '", target, "' needs the form host:port (IPv6 as [addr]:port)"));
      }
    }
    return target;
  }

  std::vector<HostPort> hosts;
  std::vector<std::string> names;  // The hosts that need a lookup, each once.
  for (const std::string& raw : targets) {
    std::string address = raw;
    if (absl::StartsWith(address, "dns:///")) address = address.substr(7);
    if (absl::StrContains(address, "://") || ResolverScheme(address).has_value()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--target: '", raw, "' cannot be part of a list; list plain host:port addresses"));
    }
    absl::StatusOr<HostPort> hp = SplitHostPort(address);
    if (!hp.ok()) return hp.status();
    if (!IsNumericAddress(hp->host) &&
        std::find(names.begin(), names.end(), hp->host) == names.end()) {
      names.push_back(hp->host);
    }
    hosts.push_back(*std::move(hp));
  }
  // getaddrinfo cannot be interrupted, and a silent name server would hold it for the
  // resolver's whole timeout: each name is looked up on a thread of its own, all at once, and
  // waited for until --deadline at most. A lookup left running dies with the process.
  HostResolver resolver(std::move(lookup), "sl-cli-dns");
  HostResolver::Pending pending = resolver.Start(names);
  const SteadyTime give_up = SteadyNow() + ToSteadyDuration(lookup_limit);
  // Per host, its addresses of each family: names like "localhost" resolve to both.
  std::vector<std::string> v4;
  std::vector<std::string> v6;
  bool every_host_has_v4 = true;
  bool every_host_has_v6 = true;
  for (const HostPort& hp : hosts) {
    std::vector<std::string> addresses{hp.host};
    if (const auto name = std::find(names.begin(), names.end(), hp.host); name != names.end()) {
      std::optional<absl::StatusOr<std::vector<std::string>>> found =
          pending.Await(name - names.begin(), give_up);
      if (!found.has_value()) {
        return absl::DeadlineExceededError(absl::StrCat("--target: looking up '", hp.host,
                                                        "' took longer than --deadline (",
                                                        absl::FormatDuration(lookup_limit), ")"));
      }
      if (!found->ok()) {
        return absl::UnavailableError(
            absl::StrCat("--target: cannot resolve '", hp.host, "': ", found->status().message()));
      }
      addresses = **std::move(found);
    }
    bool has_v4 = false;
    bool has_v6 = false;
    for (const std::string& literal : addresses) {
      if (absl::StrContains(literal, ':')) {
        v6.push_back(absl::StrCat("[", literal, "]:", hp.port));
        has_v6 = true;
      } else {
        v4.push_back(absl::StrCat(literal, ":", hp.port));
        has_v4 = true;
      }
    }
    every_host_has_v4 = every_host_has_v4 && has_v4;
    every_host_has_v6 = every_host_has_v6 && has_v6;
  }
  // IPv4 first: a server listening on 0.0.0.0 only is common, one on [::] only is rare.
  if (every_host_has_v4) return absl::StrCat("ipv4:", absl::StrJoin(v4, ","));
  if (every_host_has_v6) return absl::StrCat("ipv6:", absl::StrJoin(v6, ","));
  return absl::InvalidArgumentError(
      "--target: the list mixes IPv4-only and IPv6-only hosts; gRPC needs one family per list");
}

absl::StatusOr<std::string> TlsNameForTargets(const std::vector<std::string>& targets) {
  if (targets.size() == 1) {
    // An explicit ipv4:/ipv6: list is the same list BuildChannelTarget makes of several
    // addresses, and gRPC's only name for it is the whole string: it needs the same name.
    absl::string_view list = targets.front();
    if ((absl::ConsumePrefix(&list, "ipv4:") || absl::ConsumePrefix(&list, "ipv6:")) &&
        absl::StrContains(list, ',')) {
      const std::vector<std::string> addresses = absl::StrSplit(list, ',');
      return TlsNameForTargets(addresses);
    }
  }
  if (targets.size() < 2) return std::string();
  std::string common;
  for (const std::string& raw : targets) {
    absl::StatusOr<HostPort> hp =
        SplitHostPort(absl::StartsWith(raw, "dns:///") ? raw.substr(7) : raw);
    if (!hp.ok()) return hp.status();
    if (common.empty()) {
      common = hp->host;
    } else if (!absl::EqualsIgnoreCase(common, hp->host)) {
      return absl::InvalidArgumentError(
          "--target: a list of different hosts over TLS needs --tls-server-name NAME, a name "
          "every server's certificate carries (gRPC checks one name for the whole list)");
    }
  }
  return common;
}

std::string ServiceConfigJson() {
  // maxAttempts counts the first attempt. Backoff is randomised by gRPC (jitter), so
  // replicas restarting together are not hit in lockstep.
  return R"json({
  "loadBalancingConfig": [{"round_robin": {}}],
  "methodConfig": [{
    "name": [
      {"service": "grpc.health.v1.Health", "method": "Check"},
      {"service": "sessionledger.v1.SessionService", "method": "GetSession"},
      {"service": "sessionledger.v1.SessionService", "method": "DeleteSession"},
      {"service": "sessionledger.v1.SessionService", "method": "ListUserSessions"},
      {"service": "sessionledger.v1.TransactionService", "method": "GetAccount"},
      {"service": "sessionledger.v1.TransactionService", "method": "ListTransactions"},
      {"service": "sessionledger.v1.TransactionService", "method": "Deposit"},
      {"service": "sessionledger.v1.TransactionService", "method": "Transfer"}
    ],
    "retryPolicy": {
      "maxAttempts": 4,
      "initialBackoff": "0.1s",
      "maxBackoff": "1s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
})json";
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeCredentials(const TlsOptions& tls) {
  if (!tls.enabled) return grpc::InsecureChannelCredentials();
  if (tls.cert_file.empty() != tls.key_file.empty()) {
    return absl::InvalidArgumentError("--cert-file and --key-file go together");
  }
  grpc::SslCredentialsOptions ssl;
  for (auto [flag, path, into] : {std::tuple<const char*, const std::string*, std::string*>{
                                      "--ca-file", &tls.ca_file, &ssl.pem_root_certs},
                                  {"--cert-file", &tls.cert_file, &ssl.pem_cert_chain},
                                  {"--key-file", &tls.key_file, &ssl.pem_private_key}}) {
    if (path->empty()) continue;
    absl::StatusOr<std::string> contents = ReadPemFile(flag, *path);
    if (!contents.ok()) return contents.status();
    // gRPC takes any bytes here and only fails at connect time, with log noise and
    // "UNAVAILABLE: empty address list", which names neither the option nor the file.
    if (!absl::StrContains(*contents, "-----BEGIN ")) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, ": '", *path,
                       "' is not PEM (no \"-----BEGIN \" line); DER converts with "
                       "openssl x509 (or pkey) -inform der -outform pem"));
    }
    *into = *std::move(contents);
  }
  return grpc::SslCredentials(ssl);
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target,
                                           const ChannelOptions& options) {
  grpc::ChannelArguments args;
  if (!options.ssl_target_name_override.empty()) {
    args.SetSslTargetNameOverride(options.ssl_target_name_override);
  }
  args.SetServiceConfigJSON(ServiceConfigJson());
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, options.enable_retries ? 1 : 0);
  // gRPC's default refuses answers above 4 MiB. A user's listing holds up to 4,096 sessions
  // with up to 64 KiB of attributes each; 64 such sessions already pass 4 MiB.
  args.SetMaxReceiveMessageSize(-1);
  if (options.connection_index != 0) {
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    // Distinct arguments also keep the global pool from merging connections.
    args.SetInt("sessionledger.connection_index", options.connection_index);
  }
  return grpc::CreateCustomChannel(
      target, options.credentials ? options.credentials : grpc::InsecureChannelCredentials(), args);
}

}  // namespace sessionledger::client
