#include "tests/fuzz/fuzz_targets.h"

#include <grpcpp/server_context.h>
#include <grpcpp/test/server_context_test_spouse.h>
#include <libpq-fe.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/common/clock.h"
#include "server/common/host_resolver.h"
#include "server/common/notification.h"
#include "server/common/status_macros.h"
#include "server/config/config.h"
#include "server/ledger/in_memory_ledger_store.h"
#include "server/ledger/ledger_rules.h"
#include "server/ledger/page_token.h"
#include "server/postgres/pg_connect_target.h"
#include "server/rpc/session_handlers.h"
#include "server/rpc/transaction_handlers.h"
#include "server/session/session_service.h"
#include "server/session/token.h"

namespace sessionledger::fuzz {
namespace {

using storage::v1::StoredSession;
using storage::v1::UserSessionIndex;

// ---------------------------------------------------------------------------------------------
// Config

std::string CheckMemcachedUrl(absl::string_view text) {
  absl::StatusOr<MemcachedUrl> url = ParseMemcachedUrl(text);
  if (!url.ok()) {
    if (text.find('\n') == absl::string_view::npos &&
        url.status().message().find('\n') != absl::string_view::npos) {
      return "MEMCACHED_URL error spans lines for a one-line input";
    }
    return "";
  }
  if (url->nodes.empty()) return "accepted a URL without nodes";
  if (url->replicas < 0 || url->replicas >= static_cast<int>(url->nodes.size())) {
    return absl::StrCat("replicas=", url->replicas, " with ", url->nodes.size(), " nodes");
  }
  for (size_t i = 0; i < url->nodes.size(); ++i) {
    const MemcachedNode& node = url->nodes[i];
    if (node.host.empty() || node.port == 0) return "accepted an empty host or port 0";
    for (char c : node.host) {
      if (!(absl::ascii_isalnum(c) || c == '.' || c == '-' || c == '_' || c == ':')) {
        return absl::StrCat("host with a forbidden character: ", node.host);
      }
    }
    for (size_t j = 0; j < i; ++j) {
      if (url->nodes[j] == node) return "accepted a duplicate node";
    }
  }
  return "";
}

// The password libpq would use for `url`, or "" when there is none.
std::string LibpqPassword(const std::string& url) {
  char* error = nullptr;
  std::unique_ptr<PQconninfoOption, decltype(&PQconninfoFree)> options(
      PQconninfoParse(url.c_str(), &error), &PQconninfoFree);
  PQfreemem(error);
  if (options == nullptr) return "";
  std::string password;
  std::vector<std::string> others;
  for (const PQconninfoOption* o = options.get(); o->keyword != nullptr; ++o) {
    if (o->val == nullptr) continue;
    if (absl::string_view(o->keyword) == "password") {
      password = o->val;
    } else {
      others.emplace_back(o->val);
    }
  }
  // Only a password that is not also (part of) another value can be looked for in the output.
  for (const std::string& other : others) {
    if (absl::StrContains(other, password)) return "";
  }
  return password;
}

std::string CheckDatabaseUrl(absl::string_view text) {
  const absl::Status valid = ValidateDatabaseUrl(text);
  if (!valid.ok() && text.find('\n') == absl::string_view::npos &&
      valid.message().find('\n') != absl::string_view::npos) {
    return "DATABASE_URL error spans lines for a one-line input";
  }
  // The URL may hold a password and the error goes to the log: it may quote a single (syntax)
  // character, never a longer piece of the URL.
  if (!valid.ok()) {
    const absl::string_view message = valid.message();
    for (size_t open = message.find('"'); open != absl::string_view::npos;) {
      const size_t close = message.find('"', open + 1);
      if (close == absl::string_view::npos) break;  // The "..." that ends a cut message.
      if (close - open - 1 > 1 && message.substr(open, close - open + 1) != "\"...\"") {
        return absl::StrCat("DATABASE_URL error quotes the URL: ", message);
      }
      open = message.find('"', close + 1);
    }
  }
  const std::string redacted = RedactDatabaseUrl(text);
  if (!valid.ok()) return "";
  // Percent-escapes make libpq's password differ from its spelling in the URL; a distinctive
  // password (6+ bytes, in no other field, not in the scheme) must never survive redaction.
  if (absl::StrContains(text, "%")) return "";
  const std::string password = LibpqPassword(std::string(text));
  if (password.size() < 6 || absl::StrContains("postgresql://", password)) return "";
  // A password spelled more than once in the URL may also be spelled by its non-secret parts
  // (scheme, host and a parameter name: "postgresql://le?pass" in postgresql://le?password=
  // postgresql://le?pass), and one containing '*' may be spelled by the mask itself; neither
  // can be told apart from a leak.
  if (absl::StrContains(password, "*")) return "";
  size_t spellings = 0;
  for (size_t at = text.find(password); at != absl::string_view::npos;
       at = text.find(password, at + 1)) {
    ++spellings;
  }
  if (spellings > 1) return "";
  if (absl::StrContains(redacted, password)) {
    return absl::StrCat("RedactDatabaseUrl leaks the password: ", redacted);
  }
  return "";
}

std::string CheckLoadConfig(absl::string_view text) {
  std::map<std::string, std::string> env;
  bool multiline_value = false;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    const size_t eq = line.find('=');
    if (eq == absl::string_view::npos) continue;
    std::string name(line.substr(0, eq));
    // The TLS variables name files; arbitrary paths (a FIFO, /dev/stdin) would block the fuzzer,
    // and they are covered by tls_config_test instead.
    if (absl::StartsWith(name, "TLS_")) continue;
    std::string value(line.substr(eq + 1));
    if (value.find('\r') != std::string::npos) multiline_value = true;
    env[std::move(name)] = std::move(value);
  }
  absl::StatusOr<Config> config = LoadConfig([&env](absl::string_view name) {
    auto it = env.find(std::string(name));
    return it == env.end() ? std::nullopt : std::optional<std::string>(it->second);
  });
  if (config.ok()) {
    if (config->session_ttl > config->session_max_lifetime) return "ttl above max lifetime";
    if (config->port == 0) return "port 0 accepted";
    return "";
  }
  const absl::string_view message = config.status().message();
  bool named = false;
  for (const ConfigVariable& v : ConfigVariables()) {
    if (absl::StartsWith(message, absl::StrCat(v.name, ": "))) named = true;
  }
  if (!named) return absl::StrCat("config error names no variable: ", message);
  if (!multiline_value && message.find('\n') != absl::string_view::npos) {
    return absl::StrCat("config error spans lines: ", message);
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// Sessions over a store that hands back the fuzzed value.

struct StoredState {
  StoredSession session;
  SessionKey key;
  uint64_t generation = 0;
  bool cas_succeeds = true;
};

class FuzzedSessionStore final : public SessionStore {
 public:
  explicit FuzzedSessionStore(StoredState state) : state_(std::move(state)) {}

  absl::StatusOr<SessionLookup> Lookup(const SessionKey& key, absl::Time) override {
    SessionLookup lookup;
    lookup.user_generation = state_.generation;
    if (key.token_hash == state_.key.token_hash) {
      lookup.record = SessionRecord{state_.session, CasToken{1, 0}};
    }
    return lookup;
  }
  absl::StatusOr<SessionLookup> Peek(const SessionKey& key, absl::Time deadline) override {
    return Lookup(key, deadline);
  }
  absl::Status Add(const SessionKey&, const StoredSession&, absl::Duration ttl,
                   absl::Time) override {
    return CheckTtl(ttl);
  }
  absl::Status CompareAndSwap(const SessionKey&, const CasToken&, const StoredSession&,
                              absl::Duration ttl, absl::Time) override {
    if (!state_.cas_succeeds) return absl::AbortedError("cas conflict (fuzz)");
    return CheckTtl(ttl);
  }
  absl::Status CompareAndSwapEveryCopy(const SessionKey& key, const CasToken& cas,
                                       const StoredSession& session, absl::Duration ttl,
                                       absl::Time deadline) override {
    return CompareAndSwap(key, cas, session, ttl, deadline);
  }
  absl::Status Put(const SessionKey&, const StoredSession&, absl::Duration ttl,
                   absl::Time) override {
    return CheckTtl(ttl);
  }
  absl::Status Remove(const SessionKey&, absl::Time) override { return absl::OkStatus(); }
  absl::StatusOr<uint64_t> ReadGeneration(absl::string_view, absl::Duration keep_for,
                                          absl::Time) override {
    SL_RETURN_IF_ERROR(CheckTtl(keep_for));
    return state_.generation;
  }
  absl::StatusOr<GenerationAdvance> AdvanceGeneration(absl::string_view, uint64_t at_least,
                                                      absl::Duration keep_for,
                                                      absl::Time) override {
    SL_RETURN_IF_ERROR(CheckTtl(keep_for));
    return GenerationAdvance{state_.generation, std::max(state_.generation + 1, at_least)};
  }
  absl::StatusOr<IndexRecord> ReadIndex(absl::string_view, absl::Time) override {
    IndexRecord record;
    auto* entry = record.index.add_entries();
    entry->set_token_hash(state_.key.token_hash);
    entry->set_session_id(state_.session.session_id());
    entry->set_absolute_expires_at_unix_micros(state_.session.absolute_expires_at_unix_micros());
    record.cas = CasToken{2, 0};
    return record;
  }
  absl::Status WriteIndex(absl::string_view, const std::optional<CasToken>&,
                          const UserSessionIndex&, absl::Duration ttl, absl::Time) override {
    return CheckTtl(ttl);
  }
  absl::StatusOr<std::vector<std::optional<StoredSession>>> ReadSessions(
      absl::string_view, const std::vector<std::string>& token_hashes, absl::Time) override {
    std::vector<std::optional<StoredSession>> out;
    for (const std::string& hash : token_hashes) {
      if (hash == state_.key.token_hash) {
        out.emplace_back(state_.session);
      } else {
        out.emplace_back(std::nullopt);
      }
    }
    return out;
  }

 private:
  // The real store refuses what Memcached cannot hold; so does this one.
  static absl::Status CheckTtl(absl::Duration ttl) {
    if (ttl < absl::Seconds(1) || ttl > kMaxStoreTtl) {
      return absl::InvalidArgumentError("ttl out of Memcached's range (fuzz store)");
    }
    return absl::OkStatus();
  }

  const StoredState state_;
};

bool AllowedSessionCode(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::ABORTED:
    case grpc::StatusCode::UNAVAILABLE:
      return true;
    default:
      return false;
  }
}

std::string CheckCode(absl::string_view call, const grpc::Status& status) {
  if (AllowedSessionCode(status.error_code())) return "";
  return absl::StrCat(call, " answered code ", static_cast<int>(status.error_code()), ": ",
                      status.error_message());
}

// ---------------------------------------------------------------------------------------------
// Authorization header

constexpr absl::string_view kAccountId = "00000000-0000-4000-8000-000000000001";

// ---------------------------------------------------------------------------------------------
// PostgreSQL connect target

// Addresses a fake lookup gives names()[i]: one or two, so that entries multiply unevenly.
std::vector<std::string> FakeAddresses(size_t i) {
  std::vector<std::string> addresses = {absl::StrCat("192.0.2.", i % 250 + 1)};
  if (i % 2 == 1) addresses.push_back(absl::StrCat("2001:db8::", absl::Hex(i)));
  return addresses;
}

std::vector<std::string> ListOf(const std::string& list) { return absl::StrSplit(list, ','); }

// WithAddresses over entries [begin, end), every name answered (FakeAddresses) or every lookup
// failed: the three lists stay parallel, each entry keeps its order, its host and its port, and
// a name is replaced by exactly its addresses.
std::string CheckOverrides(const PgConnectTarget& target, size_t begin, size_t end,
                           bool lookups_fail) {
  std::vector<absl::StatusOr<std::vector<std::string>>> answers;
  for (size_t i = 0; i < target.names().size(); ++i) {
    if (lookups_fail) {
      answers.push_back(absl::NotFoundError("no such name"));
    } else {
      answers.push_back(FakeAddresses(i));
    }
  }
  const absl::StatusOr<PgConnectTarget::Overrides> overrides =
      target.WithAddresses(answers, begin, end);
  // What the range should come to: one (host, hostaddr) pair per entry or per address.
  std::vector<std::pair<std::string, std::string>> expected;
  for (size_t e = begin; e < end; ++e) {
    const int name = target.name_index(e);
    if (name < 0) {
      expected.emplace_back("", "");  // Passed on as the conninfo had it; checked by count only.
    } else if (!lookups_fail) {
      for (const std::string& address : FakeAddresses(static_cast<size_t>(name))) {
        expected.emplace_back(target.names()[name], address);
      }
    }
  }
  if (expected.empty()) {
    if (overrides.ok()) return "WithAddresses gave overrides for a range with nothing to try";
    if (overrides.status().code() != absl::StatusCode::kUnavailable) {
      return absl::StrCat("nothing to try, but not UNAVAILABLE: ", overrides.status().ToString());
    }
    return "";
  }
  if (!overrides.ok()) {
    return absl::StrCat("WithAddresses failed with hosts to try: ", overrides.status().ToString());
  }
  const std::vector<std::string> hosts = ListOf(overrides->host);
  const std::vector<std::string> hostaddrs = ListOf(overrides->hostaddr);
  if (hosts.size() != expected.size() || hostaddrs.size() != expected.size()) {
    return absl::StrCat("overrides list ", hosts.size(), " hosts and ", hostaddrs.size(),
                        " hostaddrs for ", expected.size(), " entries: host=", overrides->host,
                        " hostaddr=", overrides->hostaddr);
  }
  if (!overrides->port.empty() && ListOf(overrides->port).size() != expected.size()) {
    return absl::StrCat("port list ", overrides->port, " does not match ", expected.size(),
                        " entries");
  }
  for (size_t i = 0; i < expected.size(); ++i) {
    if (expected[i].first.empty()) continue;
    if (hosts[i] != expected[i].first || hostaddrs[i] != expected[i].second) {
      return absl::StrCat("entry ", i, " is ", hosts[i], "/", hostaddrs[i], ", expected ",
                          expected[i].first, "/", expected[i].second);
    }
  }
  return "";
}

}  // namespace

std::string FuzzConfig(absl::string_view data) {
  if (data.empty()) return "";
  const unsigned char mode = static_cast<unsigned char>(data[0]) % 3;
  // Environment values are C strings: nothing after a NUL ever reaches the parsers (libpq reads
  // up to the first NUL as well), so only the part before it is a realistic input.
  absl::string_view text = data.substr(1);
  text = text.substr(0, text.find('\0'));
  switch (mode) {
    case 0:
      return CheckMemcachedUrl(text);
    case 1:
      return CheckDatabaseUrl(text);
    default:
      return CheckLoadConfig(text);
  }
}

std::string FuzzPageToken(absl::string_view data) {
  absl::StatusOr<PageCursor> cursor = DecodePageToken(data);
  if (cursor.ok()) {
    if (cursor->last_seq <= 0) return "decoded a cursor with seq <= 0";
    if (!CanonicalUuid(cursor->account_id).has_value() ||
        *CanonicalUuid(cursor->account_id) != cursor->account_id) {
      return absl::StrCat("decoded a non-canonical account id: ", cursor->account_id);
    }
    // Decoding is canonical: exactly one text per cursor.
    if (EncodePageToken(*cursor) != data) return "a second spelling of a token was accepted";
  } else if (cursor.status().code() != absl::StatusCode::kInvalidArgument ||
             !absl::StartsWith(cursor.status().message(), "page_token")) {
    return absl::StrCat("decode error is not INVALID_ARGUMENT naming page_token: ",
                        cursor.status().ToString());
  }
  // Round trip of a cursor built from the bytes: 16 bytes of UUID, 8 of seq.
  if (data.size() >= 24) {
    std::string hex;
    for (size_t i = 0; i < 16; ++i) {
      absl::StrAppend(&hex, absl::Hex(static_cast<unsigned char>(data[i]), absl::kZeroPad2));
    }
    PageCursor made;
    made.account_id = absl::StrCat(hex.substr(0, 8), "-", hex.substr(8, 4), "-", hex.substr(12, 4),
                                   "-", hex.substr(16, 4), "-", hex.substr(20));
    uint64_t seq = 0;
    for (size_t i = 16; i < 24; ++i) seq = (seq << 8) | static_cast<unsigned char>(data[i]);
    made.last_seq = static_cast<int64_t>(seq);
    absl::StatusOr<PageCursor> back = DecodePageToken(EncodePageToken(made));
    if (made.last_seq > 0) {
      if (!back.ok()) return absl::StrCat("round trip failed: ", back.status().ToString());
      if (back->account_id != made.account_id || back->last_seq != made.last_seq) {
        return "round trip changed the cursor";
      }
    } else if (back.ok()) {
      return "a cursor with seq <= 0 survived a round trip";
    }
  }
  return "";
}

std::string FuzzStoredSession(absl::string_view data) {
  if (data.size() < 2) return "";
  const unsigned char flags = static_cast<unsigned char>(data[0]);
  StoredState state;
  // The store treats an unparsable value as a miss, so only parsable values matter here.
  if (!state.session.ParseFromArray(data.data() + 1, static_cast<int>(data.size() - 1))) return "";
  const StoredSession& stored = state.session;

  // Choose the token so that the value can pass the key checks (otherwise only the "wrong key"
  // paths would ever run): flag 1 takes the stored user's tag, flag 2 the token's hash.
  const bool user_matches = (flags & 1) != 0;
  const std::string user_id = user_matches ? stored.user_id() : std::string("fuzz-user");
  absl::StatusOr<std::string> token = NewToken(user_id);
  if (!token.ok()) return "NewToken failed";
  absl::StatusOr<SessionKey> key = KeyForToken(*token);
  if (!key.ok()) return "KeyForToken refused a fresh token";
  state.key = *key;
  if ((flags & 2) != 0) state.session.set_token_hash(key->token_hash);
  state.generation = (flags & 4) != 0 ? stored.user_generation() + 1 : 0;
  state.cas_succeeds = (flags & 8) == 0;

  // Now: just before the stored expiry (flag 16), so the live paths run, or a fixed time.
  absl::Time now = absl::FromUnixSeconds(1'700'000'000);
  if ((flags & 16) != 0) {
    const int64_t end =
        std::min(stored.expires_at_unix_micros(), stored.absolute_expires_at_unix_micros());
    if (end > std::numeric_limits<int64_t>::min()) now = absl::FromUnixMicros(end - 1);
  }
  FakeClock clock(now);
  SessionServiceOptions options;
  options.max_cas_attempts = 3;
  options.sleep = [](absl::Duration) {};
  auto sessions =
      std::make_shared<SessionService>(std::make_shared<FuzzedSessionStore>(state), clock, options);
  SessionHandlers handlers(sessions, absl::Seconds(5));
  // Runs one of the handler's asynchronous methods to its answer.
  auto answer = [&handlers](auto method, const auto& request, v1::Session* response) {
    grpc::Status status;
    Notification answered;
    (handlers.*method)(request, absl::Now() + absl::Seconds(5), response, [&](grpc::Status s) {
      status = std::move(s);
      answered.Notify();
    });
    answered.WaitForNotification();
    return status;
  };

  // What CheckLive must refuse whatever the clock says, or "" when the value may be live: a
  // call that serves it has served a session that must not be served. Taken from the values
  // rather than the flags: flag 1 clear still matches a stored user "fuzz-user", and flag 4
  // gives no higher generation when user_generation + 1 wraps to 0.
  std::string must_not_serve;
  if (state.session.deleted()) {
    must_not_serve = "a deleted session";
  } else if (state.session.token_hash() != key->token_hash) {
    must_not_serve = "a session stored under another token's key";
  } else if (UserTag(state.session.user_id()) != key->user_tag) {
    must_not_serve = "a session of another user than the token's";
  } else if (state.generation > state.session.user_generation()) {
    must_not_serve = "a session its user's revocation ended";
  }
  std::string problem;
  {
    v1::GetSessionRequest request;
    request.set_token(*token);
    request.set_touch((flags & 32) != 0);
    v1::Session response;
    const grpc::Status status = answer(&SessionHandlers::AnswerGetSession, request, &response);
    problem = CheckCode("GetSession", status);
    if (problem.empty() && status.ok() && !must_not_serve.empty()) {
      problem = absl::StrCat("GetSession served ", must_not_serve);
    }
    if (problem.empty() && !response.token().empty()) problem = "GetSession returned a token";
  }
  if (problem.empty()) {
    v1::UpdateSessionRequest request;
    request.set_token(*token);
    (*request.mutable_set())["k"] = "v";
    request.add_remove("gone");
    request.set_expected_version((flags & 64) != 0 ? stored.version() : 0);
    v1::Session response;
    const grpc::Status status = answer(&SessionHandlers::AnswerUpdateSession, request, &response);
    problem = CheckCode("UpdateSession", status);
    if (problem.empty() && status.ok() && !must_not_serve.empty()) {
      problem = absl::StrCat("UpdateSession changed ", must_not_serve);
    }
    // Versions only grow: a client waiting for "version > n" must never see it go back.
    if (problem.empty() && status.ok() && response.version() <= stored.version()) {
      problem = absl::StrCat("UpdateSession turned version ", stored.version(), " into ",
                             response.version());
    }
  }
  if (problem.empty()) {
    grpc::ServerContext context;
    v1::RotateSessionRequest request;
    request.set_token(*token);
    v1::Session response;
    const grpc::Status status = handlers.RotateSession(&context, &request, &response);
    problem = CheckCode("RotateSession", status);
    if (problem.empty() && status.ok() && !must_not_serve.empty()) {
      problem = absl::StrCat("RotateSession gave a new token for ", must_not_serve);
    }
    if (problem.empty() && status.ok() && response.token().empty()) {
      problem = "RotateSession returned no token";
    }
  }
  if (problem.empty()) {
    grpc::ServerContext context;
    v1::DeleteSessionRequest request;
    request.set_token(*token);
    v1::DeleteSessionResponse response;
    problem = CheckCode("DeleteSession", handlers.DeleteSession(&context, &request, &response));
  }
  const std::string list_user = stored.user_id().empty() ? std::string("u") : stored.user_id();
  if (problem.empty()) {
    grpc::ServerContext context;
    v1::ListUserSessionsRequest request;
    request.set_user_id(list_user);
    v1::ListUserSessionsResponse response;
    const grpc::Status status = handlers.ListUserSessions(&context, &request, &response);
    problem = CheckCode("ListUserSessions", status);
    for (const v1::Session& s : response.sessions()) {
      if (!s.token().empty()) problem = "ListUserSessions returned a token";
    }
  }
  if (problem.empty()) {
    grpc::ServerContext context;
    v1::RevokeUserSessionsRequest request;
    request.set_user_id(list_user);
    v1::RevokeUserSessionsResponse response;
    problem =
        CheckCode("RevokeUserSessions", handlers.RevokeUserSessions(&context, &request, &response));
  }
  if (problem.empty()) {
    SessionTokenAuthenticator authenticator(sessions);
    absl::StatusOr<std::string> user =
        authenticator.UserIdForToken(*token, absl::Now() + absl::Seconds(5));
    if (!user.ok() && !absl::IsUnauthenticated(user.status()) &&
        !absl::IsUnavailable(user.status())) {
      problem = absl::StrCat("authenticator answered ", user.status().ToString());
    }
    if (user.ok() && !must_not_serve.empty()) {
      problem = absl::StrCat("authenticator accepted ", must_not_serve);
    }
  }
  return problem;
}

std::string FuzzAuthorizationHeader(absl::string_view data) {
  const std::string header(data);
  grpc::ServerContext context;
  grpc::testing::ServerContextTestSpouse spouse(&context);
  spouse.AddClientMetadata("authorization", header);

  const std::string token = BearerToken(context);
  if (!token.empty()) {
    if (header.size() <= 7 || !absl::EqualsIgnoreCase(header.substr(0, 7), "bearer ")) {
      return "a token was taken from a header without the Bearer scheme";
    }
    if (token != absl::StripAsciiWhitespace(header.substr(7))) {
      return "the token is not the header's credentials";
    }
  }

  // The real authenticator over an empty store: whatever the header says, nobody is signed in.
  StoredState empty;
  empty.key.token_hash = "none";
  FakeClock clock;
  SessionServiceOptions options;
  options.sleep = [](absl::Duration) {};
  auto sessions =
      std::make_shared<SessionService>(std::make_shared<FuzzedSessionStore>(empty), clock, options);
  InMemoryLedgerStore ledger(clock);
  SessionTokenAuthenticator authenticator(sessions);
  TransactionHandlers handlers(ledger, authenticator, absl::Seconds(5));
  v1::GetAccountRequest request;
  request.set_account_id(std::string(kAccountId));
  v1::Account response;
  const grpc::Status status = handlers.GetAccount(&context, &request, &response);
  if (status.error_code() != grpc::StatusCode::UNAUTHENTICATED) {
    return absl::StrCat("GetAccount with a bogus authorization header answered ",
                        static_cast<int>(status.error_code()), ": ", status.error_message());
  }
  return "";
}

std::string FuzzPgConnectTarget(absl::string_view data) {
  if (data.empty()) return "";
  const unsigned char control = static_cast<unsigned char>(data[0]);
  // DATABASE_URL is an environment value: nothing after a NUL reaches libpq.
  absl::string_view text = data.substr(1);
  text = text.substr(0, text.find('\0'));
  const PgConnectTarget target{std::string(text)};
  const std::vector<std::string>& names = target.names();
  std::vector<bool> used(names.size(), false);
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string& name = names[i];
    if (name.empty() || name[0] == '/' || name[0] == '@' || IsNumericAddress(name) ||
        absl::StrContains(name, ",")) {
      return absl::StrCat("a name that needs no lookup is looked up: '", name, "'");
    }
    if (std::find(names.begin(), names.begin() + i, name) != names.begin() + i) {
      return absl::StrCat("name listed twice: ", name);
    }
  }
  for (size_t e = 0; e < target.entry_count(); ++e) {
    const int name = target.name_index(e);
    if (name < -1 || name >= static_cast<int>(names.size())) {
      return absl::StrCat("entry ", e, " has name index ", name);
    }
    if (name >= 0) used[name] = true;
  }
  if (std::find(used.begin(), used.end(), false) != used.end()) {
    return "a name no entry needs";
  }
  if (target.entry_count() == 0) return "";
  // The whole list, and a range the input picks (as ConnectBy passes them round by round).
  const bool lookups_fail = (control & 1) != 0;
  if (std::string problem = CheckOverrides(target, 0, target.entry_count(), lookups_fail);
      !problem.empty()) {
    return problem;
  }
  const size_t begin = (control >> 1) % target.entry_count();
  const size_t end = begin + 1 + (control >> 4) % (target.entry_count() - begin);
  return CheckOverrides(target, begin, end, lookups_fail);
}

int RunFuzzTarget(const char* name, std::string (*target)(absl::string_view), const uint8_t* data,
                  size_t size) {
  const std::string problem = target(absl::string_view(reinterpret_cast<const char*>(data), size));
  if (!problem.empty()) {
    std::fprintf(stderr, "%s: %s\n", name, problem.c_str());
    std::abort();
  }
  return 0;
}

}  // namespace sessionledger::fuzz
