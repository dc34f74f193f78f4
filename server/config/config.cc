#include "server/config/config.h"

#include <arpa/inet.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "server/common/small_file.h"
#include "server/common/status_macros.h"

namespace sessionledger {
namespace {

constexpr absl::string_view kMemcachedScheme = "memcached://";
// The longest session lifetime (and idle timeout), the contract's 30 days: Memcached's limit for
// relative expiries. The store keeps items a little longer than that (two spare seconds per
// item for memcached's clock, a minute more for the user's revocation generation) and writes
// such an expiry as a Unix time (MemcachedExptime).
constexpr int64_t kMaxSessionLifetimeSeconds = 30 * 24 * 3600;
// A user id and an idempotency key share one btree entry (the key is unique per user), and
// PostgreSQL refuses an entry above 2704 bytes: a longer one would turn a Deposit into INTERNAL.
// Two of these, with their headers, stay well below that.
constexpr int64_t kMaxIndexedTextBytes = 1024;

absl::Status VariableError(absl::string_view name, absl::string_view what) {
  // `what` may quote the value, and a value read from a file often ends in a newline: control
  // bytes are written as \xNN, so the error stays one line on stderr and in a log shipper.
  std::string message = absl::StrCat(name, ": ");
  for (const char c : what) {
    const unsigned char byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f) {
      absl::StrAppend(&message, "\\x", absl::Hex(byte, absl::kZeroPad2));
    } else {
      message.push_back(c);
    }
  }
  return absl::InvalidArgumentError(message);
}

absl::StatusOr<int64_t> ParseInteger(absl::string_view text, int64_t min, int64_t max) {
  int64_t value;
  if (!absl::SimpleAtoi(text, &value) || text.empty() || absl::ascii_isspace(text.front()) ||
      absl::ascii_isspace(text.back())) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not a whole number"));
  }
  if (value < min || value > max) {
    return absl::InvalidArgumentError(absl::StrCat(value, " is out of range ", min, "..", max));
  }
  return value;
}

absl::StatusOr<MemcachedNode> ParseNode(absl::string_view text) {
  MemcachedNode node;
  absl::string_view port_text;
  if (absl::StartsWith(text, "[")) {
    const size_t close = text.find(']');
    if (close == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("'", text, "' has no closing ']'"));
    }
    node.host = std::string(text.substr(1, close - 1));
    absl::string_view rest = text.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':') {
        return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not [ipv6]:port"));
      }
      port_text = rest.substr(1);
      if (port_text.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("'", text, "' has an empty port"));
      }
    }
  } else {
    const size_t colon = text.rfind(':');
    if (colon != absl::string_view::npos && text.find(':') != colon) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", text, "': write IPv6 addresses as [addr]:port"));
    }
    node.host = std::string(text.substr(0, colon));
    if (colon != absl::string_view::npos) {
      port_text = text.substr(colon + 1);
      if (port_text.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("'", text, "' has an empty port"));
      }
    }
  }
  if (node.host.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' has an empty host"));
  }
  for (char c : node.host) {
    if (!(absl::ascii_isalnum(c) || c == '.' || c == '-' || c == '_' || c == ':')) {
      return absl::InvalidArgumentError(
          absl::StrCat("host '", node.host, "' has a character that is not allowed"));
    }
  }
  if (!port_text.empty()) {
    auto port = ParseInteger(port_text, 1, 65535);
    if (!port.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("port of '", text, "': ", port.status().message()));
    }
    node.port = static_cast<uint16_t>(*port);
  }
  return node;
}

struct Raw {
  const EnvLookup& env;
  // The variable's value, or `fallback` when it is unset or empty (an empty value in a
  // Kubernetes manifest means "not set").
  std::string Get(absl::string_view name, absl::string_view fallback) const {
    std::optional<std::string> value = env(name);
    if (!value.has_value() || value->empty()) return std::string(fallback);
    return *value;
  }
  std::optional<std::string> GetRequired(absl::string_view name) const {
    std::optional<std::string> value = env(name);
    if (!value.has_value() || value->empty()) return std::nullopt;
    return value;
  }
};

// Session tokens are 64 characters (kTokenLength in server/session/token.h, a layer above this
// one); UpdateSession carries one where CreateSession carries the user id.
constexpr int64_t kSessionTokenBytes = 64;

// The most distinct keys whose lengths add up to at most `total_bytes`: the shortest ones,
// counting every byte string (256^n of length n). The server accepts fewer keys than that
// (UTF-8, no control characters, none empty), which only makes the true count smaller.
int64_t MostDistinctKeys(int64_t total_bytes) {
  int64_t keys = 0;
  int64_t bytes_left = total_bytes;
  int64_t keys_of_this_length = 1;  // The empty key.
  for (int64_t length = 0;; ++length) {
    if (length > 0 && bytes_left / length < keys_of_this_length) {
      return keys + bytes_left / length;
    }
    keys += keys_of_this_length;
    bytes_left -= keys_of_this_length * length;
    // Capped so that 256^n cannot overflow: more than total_bytes + 1 keys never fit anyway.
    keys_of_this_length = std::min(keys_of_this_length * 256, total_bytes + 1);
  }
}

absl::StatusOr<int64_t> IntegerVariable(const Raw& raw, absl::string_view name,
                                        absl::string_view fallback, int64_t min, int64_t max) {
  auto value = ParseInteger(raw.Get(name, fallback), min, max);
  if (!value.ok()) return VariableError(name, value.status().message());
  return *value;
}

absl::Status LoadDatabase(const Raw& raw, Config& config) {
  std::optional<std::string> url = raw.GetRequired("DATABASE_URL");
  if (!url.has_value()) {
    return VariableError("DATABASE_URL",
                         "required, e.g. postgres://user:pass@127.0.0.1:5432/db?sslmode=disable");
  }
  if (absl::Status valid = ValidateDatabaseUrl(*url); !valid.ok()) {
    return VariableError("DATABASE_URL", valid.message());
  }
  config.database_url = *url;
  SL_ASSIGN_OR_RETURN(config.database_pool_size,
                      IntegerVariable(raw, "DATABASE_POOL_SIZE", "8", 1, 1024));
  return absl::OkStatus();
}

// A certificate or key file is a few KiB; the cap keeps a mistaken path (/dev/zero, a disk
// image) from eating memory before the process even listens.
constexpr size_t kMaxPemFileBytes = 1 << 20;

absl::StatusOr<std::string> ReadPemFile(absl::string_view variable, const std::string& path) {
  absl::StatusOr<std::string> contents = ReadSmallFile(path, kMaxPemFileBytes);
  if (!contents.ok()) return VariableError(variable, contents.status().message());
  return contents;
}

using BioPtr = std::unique_ptr<BIO, decltype(&BIO_free)>;
using X509Ptr = std::unique_ptr<X509, decltype(&X509_free)>;
using EvpPkeyPtr = std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>;

BioPtr MemoryBio(const std::string& pem) {
  return BioPtr(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), &BIO_free);
}

// OpenSSL would otherwise ask on the terminal for the passphrase of an encrypted key.
int NoPassphrase(char*, int, int, void*) { return 0; }

absl::StatusOr<X509Ptr> FirstCertificate(absl::string_view variable, const std::string& path,
                                         const std::string& pem) {
  BioPtr bio = MemoryBio(pem);
  X509Ptr cert(
      bio != nullptr ? PEM_read_bio_X509(bio.get(), nullptr, NoPassphrase, nullptr) : nullptr,
      &X509_free);
  ERR_clear_error();  // The queue is per thread; leave nothing behind for gRPC's TLS code.
  if (cert == nullptr) {
    return VariableError(variable, absl::StrCat(path, " holds no PEM certificate"));
  }
  return cert;
}

}  // namespace

absl::StatusOr<TlsConfig> LoadTlsFiles(std::optional<std::string> cert_file,
                                       std::optional<std::string> key_file,
                                       std::optional<std::string> client_ca_file) {
  // Empty means unset, as for every other variable (Kubernetes manifests write "").
  if (cert_file.has_value() && cert_file->empty()) cert_file.reset();
  if (key_file.has_value() && key_file->empty()) key_file.reset();
  if (client_ca_file.has_value() && client_ca_file->empty()) client_ca_file.reset();
  TlsConfig tls;
  if (!cert_file.has_value() && !key_file.has_value()) {
    if (client_ca_file.has_value()) {
      return VariableError("TLS_CLIENT_CA_FILE",
                           "needs TLS_CERT_FILE and TLS_KEY_FILE (mutual TLS is TLS first)");
    }
    return tls;
  }
  if (!cert_file.has_value()) return VariableError("TLS_CERT_FILE", "required with TLS_KEY_FILE");
  if (!key_file.has_value()) return VariableError("TLS_KEY_FILE", "required with TLS_CERT_FILE");

  SL_ASSIGN_OR_RETURN(tls.cert_chain_pem, ReadPemFile("TLS_CERT_FILE", *cert_file));
  SL_ASSIGN_OR_RETURN(tls.private_key_pem, ReadPemFile("TLS_KEY_FILE", *key_file));
  SL_ASSIGN_OR_RETURN(X509Ptr cert,
                      FirstCertificate("TLS_CERT_FILE", *cert_file, tls.cert_chain_pem));
  BioPtr key_bio = MemoryBio(tls.private_key_pem);
  EvpPkeyPtr key(key_bio != nullptr
                     ? PEM_read_bio_PrivateKey(key_bio.get(), nullptr, NoPassphrase, nullptr)
                     : nullptr,
                 &EVP_PKEY_free);
  ERR_clear_error();
  if (key == nullptr) {
    return VariableError("TLS_KEY_FILE",
                         absl::StrCat(*key_file, " holds no unencrypted PEM private key"));
  }
  // gRPC would only fail later with "cannot listen"; a mismatch is a configuration error.
  const bool matches = X509_check_private_key(cert.get(), key.get()) == 1;
  ERR_clear_error();
  if (!matches) {
    return VariableError(
        "TLS_KEY_FILE",
        absl::StrCat(*key_file, " is not the key of the certificate in ", *cert_file));
  }
  if (client_ca_file.has_value()) {
    SL_ASSIGN_OR_RETURN(tls.client_ca_pem, ReadPemFile("TLS_CLIENT_CA_FILE", *client_ca_file));
    SL_RETURN_IF_ERROR(
        FirstCertificate("TLS_CLIENT_CA_FILE", *client_ca_file, tls.client_ca_pem).status());
  }
  return tls;
}

namespace {

absl::Status LoadLogLevel(const Raw& raw, Config& config) {
  auto level = ParseLogLevel(raw.Get("LOG_LEVEL", "info"));
  if (!level.ok()) return VariableError("LOG_LEVEL", level.status().message());
  config.log_level = *level;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<MemcachedUrl> ParseMemcachedUrl(absl::string_view url) {
  if (!absl::StartsWith(url, kMemcachedScheme)) {
    return absl::InvalidArgumentError("must start with memcached://");
  }
  absl::string_view rest = url.substr(kMemcachedScheme.size());
  absl::string_view query;
  if (const size_t q = rest.find('?'); q != absl::string_view::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  if (absl::EndsWith(rest, "/")) rest.remove_suffix(1);
  if (rest.empty()) return absl::InvalidArgumentError("names no host:port");

  MemcachedUrl parsed;
  for (absl::string_view part : absl::StrSplit(rest, ',')) {
    SL_ASSIGN_OR_RETURN(MemcachedNode node, ParseNode(part));
    for (const MemcachedNode& seen : parsed.nodes) {
      if (seen == node) {
        return absl::InvalidArgumentError(
            absl::StrCat("node ", node.host, ":", node.port, " is listed twice"));
      }
    }
    parsed.nodes.push_back(std::move(node));
  }

  if (!query.empty()) {
    for (absl::string_view param : absl::StrSplit(query, '&')) {
      std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(param, '=');
      if (kv.first != "replicas") {
        return absl::InvalidArgumentError(
            absl::StrCat("unknown parameter '", kv.first, "' (only replicas=N is known)"));
      }
      auto replicas = ParseInteger(kv.second, 0, 64);
      if (!replicas.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("replicas: ", replicas.status().message()));
      }
      parsed.replicas = static_cast<int>(*replicas);
    }
  }
  if (parsed.replicas >= static_cast<int>(parsed.nodes.size())) {
    return absl::InvalidArgumentError(absl::StrCat("replicas=", parsed.replicas, " needs at least ",
                                                   parsed.replicas + 1, " nodes, the URL names ",
                                                   parsed.nodes.size()));
  }
  return parsed;
}

namespace {

// libpq's parse errors quote the piece of the URL they stumbled on, which may be the password
// ("invalid percent-encoded token: \"s3cr%et\""); start-up errors end up in logs. Quoted
// single characters (syntax, such as "]" or "=") stay; the message ends at the first longer or
// unclosed quotation, which becomes "...": what follows could be the rest of the URL.
std::string WithoutQuotedText(absl::string_view message) {
  std::string out;
  size_t i = 0;
  while (i < message.size()) {
    const size_t open = message.find('"', i);
    if (open == absl::string_view::npos) {
      absl::StrAppend(&out, message.substr(i));
      break;
    }
    const size_t close = message.find('"', open + 1);
    absl::StrAppend(&out, message.substr(i, open - i));
    if (close == absl::string_view::npos || close - open - 1 > 1) {
      out.append("\"...\"");
      break;
    }
    absl::StrAppend(&out, message.substr(open, close - open + 1));
    i = close + 1;
  }
  return out;
}

}  // namespace

// Never echoes a value from the URL: see WithoutQuotedText.
absl::Status ValidateDatabaseUrl(absl::string_view url) {
  if (!absl::StartsWith(url, "postgres://") && !absl::StartsWith(url, "postgresql://")) {
    return absl::InvalidArgumentError("must start with postgres:// or postgresql://");
  }
  char* error = nullptr;
  const std::string copy(url);
  std::unique_ptr<PQconninfoOption, decltype(&PQconninfoFree)> options(
      PQconninfoParse(copy.c_str(), &error), &PQconninfoFree);
  if (options == nullptr) {
    std::string message = error != nullptr ? error : "cannot be parsed";
    PQfreemem(error);
    // libpq's messages end in a newline; keep the one-line promise.
    while (!message.empty() && absl::ascii_isspace(message.back())) message.pop_back();
    return absl::InvalidArgumentError(
        absl::StrCat(WithoutQuotedText(message),
                     " (percent-encode any of : / @ ? # % in the user name or password)"));
  }
  // libpq parses values lazily, at connect time; catch the common mistakes at start-up instead.
  for (const PQconninfoOption* option = options.get(); option->keyword != nullptr; ++option) {
    if (option->val == nullptr) continue;
    const absl::string_view keyword = option->keyword;
    const absl::string_view value = option->val;
    if (keyword == "host") {
      // libpq ends the user info at the first '@': "postgres://app:pa@ss@db/x" is password "pa"
      // on host "ss@db", whose failed lookup would put the rest of the password in the logs. A
      // leading '@' names an abstract unix socket (host=@name), and a leading '/' a socket
      // directory, whose path may hold an '@': neither is looked up.
      for (absl::string_view host : absl::StrSplit(value, ',')) {
        if (!absl::StartsWith(host, "/") && host.find('@', 1) != absl::string_view::npos) {
          return absl::InvalidArgumentError(
              "the host holds an '@' (percent-encode any of : / @ ? # % in the user name or "
              "password)");
        }
      }
    } else if (keyword == "port") {
      for (absl::string_view port : absl::StrSplit(value, ',')) {
        // libpq keeps one entry per host, empty for a host written without a port: that host
        // takes the default (5432), as in "postgres://u@pg-0,pg-1/db".
        if (port.empty()) continue;
        if (!ParseInteger(port, 1, 65535).ok()) {
          // A password with an unencoded '/' is read as host:port ("postgres://app:se/cret@db"
          // gives port "se"): the value is not echoed.
          return absl::InvalidArgumentError(
              "the port is not 1..65535 (percent-encode any of : / @ ? # % in the user name or "
              "password)");
        }
      }
    } else if (keyword == "sslmode") {
      static constexpr absl::string_view kModes[] = {"disable", "allow",     "prefer",
                                                     "require", "verify-ca", "verify-full"};
      if (std::find(std::begin(kModes), std::end(kModes), value) == std::end(kModes)) {
        return absl::InvalidArgumentError(
            "sslmode is not one of disable, allow, prefer, require, verify-ca, verify-full");
      }
    } else if (keyword == "service") {
      // libpq reads a named service only when it connects, so the server could not look its
      // hosts up within a call's deadline, and one hung name server would hang connects.
      return absl::InvalidArgumentError(
          "service= is not taken: name the hosts in the URL, or set PGSERVICE, whose hosts the "
          "server looks up within each call's deadline");
    } else if (keyword == "connect_timeout") {
      if (!ParseInteger(value, 0, 3600).ok()) {
        return absl::InvalidArgumentError("connect_timeout is not a number of seconds (0..3600)");
      }
    }
  }
  return absl::OkStatus();
}

namespace {

// `text` with its %XX escapes decoded, as libpq decodes a URL's query keywords.
std::string PercentDecoded(absl::string_view text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    int value = 0;
    if (text[i] == '%' && i + 2 < text.size() && absl::ascii_isxdigit(text[i + 1]) &&
        absl::ascii_isxdigit(text[i + 2]) && absl::SimpleHexAtoi(text.substr(i + 1, 2), &value)) {
      out.push_back(static_cast<char>(value));
      i += 2;
    } else {
      out.push_back(text[i]);
    }
  }
  return out;
}

}  // namespace

std::string RedactDatabaseUrl(absl::string_view url) {
  // postgres://user:secret@host/db -> postgres://user:****@host/db
  const size_t scheme_end = url.find("://");
  if (scheme_end == absl::string_view::npos) return "****";
  const size_t authority_start = scheme_end + 3;
  // libpq reads user info up to the first '@' before the first '/', across any '?': a password
  // may hold an unencoded '?' (postgres://app:my?secret@db/x). Stopping at '?' would log it.
  const size_t path_start = url.find('/', authority_start);
  const absl::string_view before_path = url.substr(
      authority_start, path_start == absl::string_view::npos ? absl::string_view::npos
                                                             : path_start - authority_start);
  std::string redacted(url.substr(0, authority_start));
  size_t rest_start = authority_start;
  if (const size_t at = before_path.rfind('@'); at != absl::string_view::npos) {
    const absl::string_view userinfo = before_path.substr(0, at);
    if (const size_t colon = userinfo.find(':'); colon != absl::string_view::npos) {
      absl::StrAppend(&redacted, userinfo.substr(0, colon), ":****@");
    } else {
      absl::StrAppend(&redacted, userinfo, "@");
    }
    rest_start = authority_start + at + 1;
  }
  // The keywords libpq itself treats as secret (shown as '*' in a dialog): password, and
  // sslpassword, the passphrase of the client key.
  const std::string copy(url);
  std::unique_ptr<PQconninfoOption, decltype(&PQconninfoFree)> options(
      PQconninfoParse(copy.c_str(), nullptr), &PQconninfoFree);
  const auto secret = [&options](const PQconninfoOption& o) {
    return o.dispchar != nullptr && o.dispchar[0] == '*';
  };
  const auto is_secret_keyword = [&](absl::string_view keyword) {
    if (options == nullptr) return absl::EqualsIgnoreCase(keyword, "password");
    for (const PQconninfoOption* o = options.get(); o->keyword != nullptr; ++o) {
      if (secret(*o) && absl::EqualsIgnoreCase(keyword, o->keyword)) return true;
    }
    return false;
  };
  // Host, path and query; a secret may also be a query parameter, its keyword percent-encoded.
  const absl::string_view rest = url.substr(rest_start);
  const size_t q = rest.find('?');
  absl::StrAppend(&redacted, rest.substr(0, q));
  if (q != absl::string_view::npos) {
    std::vector<std::string> params;
    for (absl::string_view param : absl::StrSplit(rest.substr(q + 1), '&')) {
      const size_t equals = param.find('=');
      const absl::string_view keyword = param.substr(0, equals);
      if (equals != absl::string_view::npos && is_secret_keyword(PercentDecoded(keyword))) {
        params.push_back(absl::StrCat(keyword, "=****"));
      } else {
        params.emplace_back(param);
      }
    }
    absl::StrAppend(&redacted, "?", absl::StrJoin(params, "&"));
  }
  // Belt and braces: whatever libpq itself would use as a secret goes too, wherever and however
  // the URL spells it (found by fuzzing: tests/fuzz/regressions/config).
  for (const PQconninfoOption* o = options.get(); o != nullptr && o->keyword != nullptr; ++o) {
    if (o->val == nullptr || *o->val == '\0' || !secret(*o)) continue;
    std::string tail = redacted.substr(authority_start);
    absl::StrReplaceAll({{o->val, "****"}}, &tail);
    redacted = absl::StrCat(redacted.substr(0, authority_start), tail);
  }
  return redacted;
}

const std::vector<ConfigVariable>& ConfigVariables() {
  static const auto* const kVariables = new std::vector<ConfigVariable>{
      {"PORT", "50051", "gRPC listen port (on LISTEN_ADDRESS)"},
      {"LISTEN_ADDRESS", "[::]",
       "address the gRPC port and /metrics listen on: [::] (every interface), an IPv4 or IPv6 "
       "address, or localhost (127.0.0.1 and ::1); scripts/run, scripts/cluster, scripts/bench "
       "and scripts/bench-instructions use 127.0.0.1"},
      {"MEMCACHED_URL", "",
       "memcached://host:port[,host:port...][?replicas=N]; replicas=N keeps N extra copies of "
       "each session on other nodes"},
      {"DATABASE_URL", "", "libpq URL, e.g. postgres://user:pass@host:5432/db?sslmode=disable"},
      {"SESSION_TTL_SECONDS", "1800", "default idle timeout of a session"},
      {"SESSION_MAX_LIFETIME_SECONDS", "86400",
       "absolute lifetime of a session; at most 2592000 (30 days); must be >= "
       "SESSION_TTL_SECONDS"},
      {"SHUTDOWN_GRACE_SECONDS", "20",
       "on SIGTERM/SIGINT: stop accepting, finish in-flight calls within this, exit 0"},
      {"SHUTDOWN_NOTICE_MS", "1000",
       "on SIGTERM/SIGINT: how long health reads NOT_SERVING (new calls still served) before the "
       "server refuses new calls, so health-checking clients and load balancers move away first"},
      {"LOG_LEVEL", "info", "debug, info, warn or error; JSON logs to stdout, one object a line"},
      {"METRICS_PORT", "9464", "HTTP /metrics in Prometheus text format; 0 turns it off"},
      {"MEMCACHED_POOL_SIZE", "16",
       "Memcached connections per process (for the blocking calls; and for GetSession, "
       "CreateSession and UpdateSession when MEMCACHED_PIPELINE is 0)"},
      {"MEMCACHED_PIPELINE", "1",
       "1: GetSession, CreateSession and UpdateSession share one pipelined connection per "
       "Memcached node, so "
       "concurrent requests travel together and no thread waits; 0: they take pooled "
       "libmemcached connections"},
      {"DATABASE_POOL_SIZE", "8", "PostgreSQL connections per process"},
      {"DEFAULT_CALL_TIMEOUT_MS", "5000",
       "longest a call waits on Memcached/PostgreSQL, whatever the caller's deadline (an "
       "earlier deadline of the caller's comes first)"},
      {"HEALTH_CHECK_INTERVAL_MS", "2000", "how often Memcached and PostgreSQL are probed"},
      {"GRPC_MAX_CONNECTION_AGE_SECONDS", "300",
       "clients reconnect after this long, so load spreads over new replicas"},
      {"MAX_USER_ID_BYTES", "128",
       "longest user_id accepted (bytes of UTF-8); at most 1024, as PostgreSQL indexes it "
       "together with an idempotency key"},
      {"MAX_ATTRIBUTE_KEY_BYTES", "128", "longest session attribute key accepted"},
      {"MAX_SESSION_ATTRIBUTES_BYTES", "65536",
       "a session's attributes together (key and value bytes); at most 524288, as one "
       "Memcached item holds at most 1 MiB; above about 300000, raise GRPC_MAX_RECV_BYTES too"},
      {"MAX_IDEMPOTENCY_KEY_BYTES", "128",
       "longest idempotency_key accepted; at most 1024 (see MAX_USER_ID_BYTES)"},
      {"GRPC_MAX_RECV_BYTES", "1048576",
       "largest request message accepted; a larger one fails with RESOURCE_EXHAUSTED; the "
       "server refuses to start when a CreateSession within MAX_SESSION_ATTRIBUTES_BYTES "
       "(in many small attributes) could be larger (266336 bytes for the defaults)"},
      {"GRPC_MAX_CONCURRENT_STREAMS", "100",
       "concurrent calls per client connection (HTTP/2 streams); more wait for a free one"},
      {"TLS_CERT_FILE", "unset",
       "PEM certificate chain of the gRPC port; with TLS_KEY_FILE turns TLS on (read at start)"},
      {"TLS_KEY_FILE", "unset", "PEM private key (unencrypted) of TLS_CERT_FILE"},
      {"TLS_CLIENT_CA_FILE", "unset",
       "PEM CA bundle; set = mutual TLS: every client must present a certificate it signed"},
      {"MALLOC_ARENA_MAX", "2",
       "glibc's malloc arenas (a whole number >= 1); the server sets 2 unless the variable is "
       "set, so that RSS does not grow with the number of threads"},
  };
  return *kVariables;
}

std::string ConfigHelpText() {
  std::string text =
      "sessionledger-server: stateless gRPC session and ledger service.\n\n"
      "Usage:\n"
      "  sessionledger-server            serve (schema must be up to date)\n"
      "  sessionledger-server migrate    create or upgrade the PostgreSQL schema, then exit\n"
      "  sessionledger-server healthcheck  exit 0 when the server on PORT is SERVING (containers)\n"
      "  sessionledger-server --help     this text\n\n"
      "Configuration (environment only):\n";
  size_t width = 0;
  for (const ConfigVariable& v : ConfigVariables()) width = std::max(width, v.name.size());
  for (const ConfigVariable& v : ConfigVariables()) {
    absl::StrAppend(
        &text, "  ", v.name, std::string(width + 2 - v.name.size(), ' '),
        v.default_value.empty() ? "(required)" : absl::StrCat("[", v.default_value, "]"), "  ",
        v.meaning, "\n");
  }
  return text;
}

int64_t LargestSessionWriteRequestBytes(int64_t max_session_attributes_bytes,
                                        int64_t max_user_id_bytes) {
  // SessionService counts MAX_SESSION_ATTRIBUTES_BYTES as the key and value bytes of the map
  // alone (AttributesBytes), so the protobuf framing of each entry comes on top, and a map of
  // many small entries carries much more framing than a few large ones. On the wire an entry of
  // key length k and value length v (content c = k + v) is
  //   tag(1) len(e) e,  e = tag(1) len(k) k tag(1) len(v) v,
  // every length a varint: 1 byte below 128, at most 3 below 2^21 (LoadConfig caps the limit at
  // 512 KiB, so e stays below that). Writers that leave out an empty key or value only send less.
  // An entry thus takes c + 6 bytes while e < 128, and at most c + 12 otherwise; such an entry
  // has c >= 128 - 8 = 120, so there are at most limit / 120 of them. Over all entries:
  //   limit + 6 * (number of entries) + 6 * (limit / 120),
  // and map keys are distinct, so the number of entries is at most MostDistinctKeys(limit).
  // For the default 64 KiB that is 266,194 bytes; the map of 32,897 entries (keys of up to 2
  // bytes, empty values) that it allows for takes 262,918 bytes on the wire.
  const int64_t limit = max_session_attributes_bytes;
  const int64_t attributes = limit + 6 * MostDistinctKeys(limit) + 6 * (limit / 120);
  // Besides the map: CreateSession's user_id (tag, length of at most 2 bytes below 16384, the
  // id) and ttl_seconds (tag and a varint of at most 10 bytes), or UpdateSession's token and
  // expected_version, alike. UpdateSession's `remove` list is left out: no limit bounds how
  // many keys a request names there.
  const int64_t other_fields = 1 + 2 + std::max(max_user_id_bytes, kSessionTokenBytes) + 1 + 10;
  return attributes + other_fields;
}

EnvLookup ProcessEnvironment() {
  return [](absl::string_view name) -> std::optional<std::string> {
    const char* value = std::getenv(std::string(name).c_str());
    if (value == nullptr) return std::nullopt;
    return std::string(value);
  };
}

absl::StatusOr<uint16_t> ListenPort(const EnvLookup& env) {
  SL_ASSIGN_OR_RETURN(const int64_t port, IntegerVariable(Raw{env}, "PORT", "50051", 1, 65535));
  return static_cast<uint16_t>(port);
}

absl::StatusOr<std::string> ParseListenAddress(absl::string_view text) {
  if (text == "localhost") return std::string(text);
  // inet_pton reads a C string: a NUL inside the value must not cut it short.
  if (!text.empty() && text.find('\0') == absl::string_view::npos) {
    char written[INET6_ADDRSTRLEN];
    const std::string v4_text(text);
    in_addr v4{};
    if (inet_pton(AF_INET, v4_text.c_str(), &v4) == 1 &&
        inet_ntop(AF_INET, &v4, written, sizeof written) != nullptr) {
      return std::string(written);
    }
    absl::string_view inner = text;
    if (absl::ConsumePrefix(&inner, "[") && !absl::ConsumeSuffix(&inner, "]")) inner = text;
    const std::string v6_text(inner);
    in6_addr v6{};
    if (inet_pton(AF_INET6, v6_text.c_str(), &v6) == 1) {
      // ::ffff:a.b.c.d is the IPv4 address a.b.c.d: the metrics listener then needs no IPv6,
      // and the address reads the same wherever it is shown.
      static constexpr unsigned char kV4MappedPrefix[12] = {0, 0, 0, 0, 0,    0,
                                                            0, 0, 0, 0, 0xff, 0xff};
      if (std::memcmp(v6.s6_addr, kV4MappedPrefix, sizeof kV4MappedPrefix) == 0) {
        std::memcpy(&v4, &v6.s6_addr[12], sizeof v4);
        if (inet_ntop(AF_INET, &v4, written, sizeof written) != nullptr) {
          return std::string(written);
        }
      } else if (inet_ntop(AF_INET6, &v6, written, sizeof written) != nullptr) {
        return absl::StrCat("[", written, "]");
      }
    }
  }
  if (text.empty()) {
    return absl::InvalidArgumentError(
        "empty: unset it to listen on every interface ([::]), or name an address, e.g. "
        "127.0.0.1");
  }
  return absl::InvalidArgumentError(
      absl::StrCat("'", text,
                   "' is not an IPv4 or IPv6 address or localhost, e.g. 127.0.0.1, ::1 or [::] "
                   "(without a port: that is PORT)"));
}

absl::StatusOr<std::string> ListenAddress(const EnvLookup& env) {
  // Unlike the other variables, an empty value is not taken for unset: that would listen on
  // every interface, the one outcome a mistyped or unexpanded setting must not have.
  const std::optional<std::string> value = env("LISTEN_ADDRESS");
  if (!value.has_value()) return std::string("[::]");
  absl::StatusOr<std::string> address = ParseListenAddress(*value);
  if (!address.ok()) return VariableError("LISTEN_ADDRESS", address.status().message());
  return address;
}

std::string LocalTarget(absl::string_view listen_address, uint16_t port) {
  // A wildcard takes connections on the loopback too ([::] on IPv4 as well: gRPC turns
  // IPV6_V6ONLY off); localhost includes 127.0.0.1.
  if (listen_address == "[::]" || listen_address == "0.0.0.0" || listen_address == "localhost") {
    return absl::StrCat("127.0.0.1:", port);
  }
  return absl::StrCat(listen_address, ":", port);
}

absl::StatusOr<Config> LoadConfig(const EnvLookup& env) {
  const Raw raw{env};
  Config config;
  SL_RETURN_IF_ERROR(LoadLogLevel(raw, config));
  SL_ASSIGN_OR_RETURN(config.port, ListenPort(env));
  SL_ASSIGN_OR_RETURN(config.listen_address, ListenAddress(env));

  std::optional<std::string> memcached_url = raw.GetRequired("MEMCACHED_URL");
  if (!memcached_url.has_value()) {
    return VariableError("MEMCACHED_URL", "required, e.g. memcached://127.0.0.1:11211");
  }
  auto memcached = ParseMemcachedUrl(*memcached_url);
  if (!memcached.ok()) return VariableError("MEMCACHED_URL", memcached.status().message());
  config.memcached = *std::move(memcached);

  SL_RETURN_IF_ERROR(LoadDatabase(raw, config));

  SL_ASSIGN_OR_RETURN(
      const int64_t max_lifetime,
      IntegerVariable(raw, "SESSION_MAX_LIFETIME_SECONDS", "86400", 1, kMaxSessionLifetimeSeconds));
  SL_ASSIGN_OR_RETURN(const int64_t ttl, IntegerVariable(raw, "SESSION_TTL_SECONDS", "1800", 1,
                                                         kMaxSessionLifetimeSeconds));
  if (ttl > max_lifetime) {
    return VariableError(
        "SESSION_TTL_SECONDS",
        absl::StrCat(ttl, " is above SESSION_MAX_LIFETIME_SECONDS (", max_lifetime, ")"));
  }
  config.session_ttl = absl::Seconds(ttl);
  config.session_max_lifetime = absl::Seconds(max_lifetime);

  SL_ASSIGN_OR_RETURN(const int64_t grace,
                      IntegerVariable(raw, "SHUTDOWN_GRACE_SECONDS", "20", 0, 3600));
  config.shutdown_grace = absl::Seconds(grace);
  SL_ASSIGN_OR_RETURN(const int64_t notice_ms,
                      IntegerVariable(raw, "SHUTDOWN_NOTICE_MS", "1000", 0, 60'000));
  config.shutdown_notice = absl::Milliseconds(notice_ms);
  SL_ASSIGN_OR_RETURN(config.metrics_port, IntegerVariable(raw, "METRICS_PORT", "9464", 0, 65535));
  if (config.metrics_port != 0 && config.metrics_port == config.port) {
    return VariableError("METRICS_PORT", absl::StrCat(config.metrics_port, " is also PORT"));
  }
  SL_ASSIGN_OR_RETURN(config.memcached_pool_size,
                      IntegerVariable(raw, "MEMCACHED_POOL_SIZE", "16", 1, 1024));
  SL_ASSIGN_OR_RETURN(const int64_t pipeline,
                      IntegerVariable(raw, "MEMCACHED_PIPELINE", "1", 0, 1));
  config.memcached_pipeline = pipeline == 1;
  SL_ASSIGN_OR_RETURN(const int64_t call_timeout_ms,
                      IntegerVariable(raw, "DEFAULT_CALL_TIMEOUT_MS", "5000", 1, 600'000));
  config.default_call_timeout = absl::Milliseconds(call_timeout_ms);
  SL_ASSIGN_OR_RETURN(const int64_t health_ms,
                      IntegerVariable(raw, "HEALTH_CHECK_INTERVAL_MS", "2000", 50, 600'000));
  config.health_check_interval = absl::Milliseconds(health_ms);
  SL_ASSIGN_OR_RETURN(const int64_t max_age,
                      IntegerVariable(raw, "GRPC_MAX_CONNECTION_AGE_SECONDS", "300", 1,
                                      std::numeric_limits<int32_t>::max() / 1000));
  config.grpc_max_connection_age = absl::Seconds(max_age);
  SL_ASSIGN_OR_RETURN(config.grpc_max_recv_bytes,
                      IntegerVariable(raw, "GRPC_MAX_RECV_BYTES", "1048576", 1024,
                                      std::numeric_limits<int32_t>::max()));
  SL_ASSIGN_OR_RETURN(config.grpc_max_concurrent_streams,
                      IntegerVariable(raw, "GRPC_MAX_CONCURRENT_STREAMS", "100", 1, 100'000));
  SL_ASSIGN_OR_RETURN(config.tls, LoadTlsFiles(env("TLS_CERT_FILE"), env("TLS_KEY_FILE"),
                                               env("TLS_CLIENT_CA_FILE")));
  SL_ASSIGN_OR_RETURN(config.max_user_id_bytes,
                      IntegerVariable(raw, "MAX_USER_ID_BYTES", "128", 1, kMaxIndexedTextBytes));
  SL_ASSIGN_OR_RETURN(config.max_attribute_key_bytes,
                      IntegerVariable(raw, "MAX_ATTRIBUTE_KEY_BYTES", "128", 1, 4096));
  SL_ASSIGN_OR_RETURN(config.max_session_attributes_bytes,
                      IntegerVariable(raw, "MAX_SESSION_ATTRIBUTES_BYTES", "65536", 1, 512 * 1024));
  SL_ASSIGN_OR_RETURN(
      config.max_idempotency_key_bytes,
      IntegerVariable(raw, "MAX_IDEMPOTENCY_KEY_BYTES", "128", 1, kMaxIndexedTextBytes));
  // gRPC refuses a larger message with RESOURCE_EXHAUSTED before any handler runs, and nothing
  // is logged: a CreateSession within every configured limit would fail without a trace.
  if (const int64_t needed = LargestSessionWriteRequestBytes(config.max_session_attributes_bytes,
                                                             config.max_user_id_bytes);
      config.grpc_max_recv_bytes < needed) {
    return VariableError(
        "GRPC_MAX_RECV_BYTES",
        absl::StrCat(config.grpc_max_recv_bytes, " is below ", needed,
                     ", the size of a CreateSession or UpdateSession request within "
                     "MAX_SESSION_ATTRIBUTES_BYTES (",
                     config.max_session_attributes_bytes, ") and MAX_USER_ID_BYTES (",
                     config.max_user_id_bytes,
                     "), which gRPC would refuse: raise it or lower MAX_SESSION_ATTRIBUTES_BYTES"));
  }
  // glibc reads this variable itself and ignores a value it cannot use ("two", "0") without a
  // word, which would leave the process with no arena cap at all.
  SL_ASSIGN_OR_RETURN(
      config.malloc_arena_max,
      IntegerVariable(raw, "MALLOC_ARENA_MAX", "2", 1, std::numeric_limits<int32_t>::max()));
  return config;
}

absl::StatusOr<Config> LoadMigrateConfig(const EnvLookup& env) {
  const Raw raw{env};
  Config config;
  SL_RETURN_IF_ERROR(LoadLogLevel(raw, config));
  SL_RETURN_IF_ERROR(LoadDatabase(raw, config));
  return config;
}

}  // namespace sessionledger
