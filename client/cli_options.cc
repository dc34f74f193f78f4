#include "client/cli_options.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace sessionledger::client {
namespace {

struct FlagSpec {
  const char* name;
  bool takes_value;
  // Whether each value adds to the others. Any other option with a value is given once: of two
  // --user-id, --to or --idempotency-key values, either could be the one meant, and taking the
  // last would revoke, pay or retry with the other.
  bool repeats = false;
};

// Every option of every command. A name means the same thing (and takes a value or not) in
// every command, which lets us tokenise the command line before knowing the command.
constexpr FlagSpec kFlags[] = {
    {"target", true, /*repeats=*/true},
    {"token", true},
    {"deadline", true},
    {"json", false},
    {"help", false},
    {"service", true},
    {"user-id", true},
    {"ttl", true},
    {"attr", true, /*repeats=*/true},
    {"set", true, /*repeats=*/true},
    {"remove", true, /*repeats=*/true},
    {"expected-version", true},
    {"touch", false},
    {"currency", true},
    {"account", true},
    {"from", true},
    {"to", true},
    {"amount", true},
    {"idempotency-key", true},
    {"page-size", true},
    {"page-token", true},
    {"all", false},
    {"rpc", true},
    {"concurrency", true},
    {"connections", true},
    {"duration", true},
    {"warmup", true},
    {"requests", true},
    {"rate", true},
    {"tls", false},
    {"ca-file", true},
    {"cert-file", true},
    {"key-file", true},
    {"tls-server-name", true},
    {"no-progress", false},
    {"cpu-of", true, /*repeats=*/true},
};

const std::set<std::string>& GlobalFlags() {
  static const auto* const kGlobal =
      new std::set<std::string>{"target", "token",   "deadline",  "json",     "help",
                                "tls",    "ca-file", "cert-file", "key-file", "tls-server-name"};
  return *kGlobal;
}

const FlagSpec* FindFlag(const std::string& name) {
  for (const FlagSpec& spec : kFlags) {
    if (name == spec.name) return &spec;
  }
  return nullptr;
}

absl::Status UsageError(const std::string& message) { return absl::InvalidArgumentError(message); }

// Bounds of bench options whose conversion to nanoseconds would otherwise overflow.
constexpr absl::Duration kLongestBenchPhase = absl::Hours(24);
// The same for --deadline, which is added to the wall clock.
constexpr absl::Duration kLongestDeadline = absl::Hours(24);
constexpr double kLowestRate = 0.001;
constexpr double kHighestRate = 1e9;

// An unknown "--name". It may well be an argument rather than a mistyped option: session
// tokens are URL-safe base64, which can start with "--". So a name that does not look like
// one of ours is not echoed (the message would put a secret on the terminal and in logs),
// and the message says how to pass such an argument.
// Whether `word` could be one of our option or command names, and so may be echoed in a usage
// error: anything else (a token in the wrong place, say) is described by its length only.
bool LooksLikeOurName(const std::string& word) {
  constexpr size_t kLongestEchoed = 20;  // our longest option name has 15 characters
  return word.size() <= kLongestEchoed && std::all_of(word.begin(), word.end(), [](char c) {
           return absl::ascii_islower(static_cast<unsigned char>(c)) ||
                  absl::ascii_isdigit(static_cast<unsigned char>(c)) || c == '-';
         });
}

// A misplaced word for a usage error: itself when it looks like a name of ours, otherwise only
// its length.
std::string Quoted(const std::string& word) {
  return LooksLikeOurName(word) ? absl::StrCat("'", word, "'")
                                : absl::StrCat("of ", word.size(), " characters");
}

absl::Status UnknownOption(const std::string& name, const std::string& arg) {
  // "--user_id" or "--User-Id": one of ours in another spelling, and so no secret either.
  std::string ours = absl::AsciiStrToLower(name);
  std::replace(ours.begin(), ours.end(), '_', '-');
  if (ours != name && FindFlag(ours) != nullptr) {
    return UsageError(absl::StrCat("unknown option --", name, "; did you mean --", ours, "?"));
  }
  return UsageError(absl::StrCat(
      LooksLikeOurName(name) ? absl::StrCat("unknown option --", name)
                             : absl::StrCat("unknown option of ", arg.size(), " characters"),
      "; an argument that starts with '-' (a token can) goes after '--', which ends the "
      "options, e.g. session get -- TOKEN"));
}

// The tokenised command line: option values in the order given, and the positional words.
struct Tokens {
  std::vector<std::pair<std::string, std::string>> flags;
  std::vector<std::string> positionals;

  bool Has(const std::string& name) const {
    for (const auto& [flag, value] : flags) {
      if (flag == name) return true;
    }
    return false;
  }
  // The value given (Tokenize refuses a second one of an option that does not repeat).
  std::optional<std::string> Last(const std::string& name) const {
    std::optional<std::string> result;
    for (const auto& [flag, value] : flags) {
      if (flag == name) result = value;
    }
    return result;
  }
  std::vector<std::string> All(const std::string& name) const {
    std::vector<std::string> result;
    for (const auto& [flag, value] : flags) {
      if (flag == name) result.push_back(value);
    }
    return result;
  }
  // A usage error if the value given for `name` is empty (say, "--ca-file=$CA" with CA unset),
  // which would otherwise read as the option left out; `instead` tells what to do.
  absl::Status NoEmptyValue(const std::string& name, absl::string_view instead) const {
    for (const auto& [flag, value] : flags) {
      if (flag == name && value.empty()) {
        return UsageError(absl::StrCat("--", name, ": empty value; ", instead));
      }
    }
    return absl::OkStatus();
  }
};

absl::StatusOr<Tokens> Tokenize(const std::vector<std::string>& args) {
  Tokens tokens;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--") {
      tokens.positionals.insert(tokens.positionals.end(), args.begin() + i + 1, args.end());
      break;
    }
    if (arg == "-h") {
      tokens.flags.emplace_back("help", "");
      continue;
    }
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      tokens.positionals.push_back(arg);
      continue;
    }
    const size_t eq = arg.find('=');
    const std::string name = arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
    const FlagSpec* spec = FindFlag(name);
    if (spec == nullptr) return UnknownOption(name, arg);
    if (!spec->takes_value) {
      if (eq != std::string::npos) {
        return UsageError(absl::StrCat("option --", name, " takes no value"));
      }
      tokens.flags.emplace_back(name, "");
      continue;
    }
    if (!spec->repeats && tokens.Has(name)) {
      // Values are not echoed: one may be a token.
      return UsageError(absl::StrCat("option --", name, " is given more than once; give it once"));
    }
    if (eq != std::string::npos) {
      tokens.flags.emplace_back(name, arg.substr(eq + 1));
    } else if (i + 1 < args.size()) {
      tokens.flags.emplace_back(name, args[++i]);
    } else {
      return UsageError(absl::StrCat("option --", name, " needs a value"));
    }
  }
  return tokens;
}

struct CommandSpec {
  const char* words;  // "session get"
  Command command;
  // Options besides the global ones.
  std::vector<std::string> flags;
  // Names of optional positional arguments, in order (for messages).
  std::vector<std::string> positionals;
};

const std::vector<CommandSpec>& Commands() {
  static const auto* const kCommands = new std::vector<CommandSpec>{
      {"help", Command::kHelp, {}, {}},
      {"health", Command::kHealth, {"service"}, {"SERVICE"}},
      {"session create", Command::kSessionCreate, {"user-id", "ttl", "attr"}, {"USER_ID"}},
      {"session get", Command::kSessionGet, {"touch"}, {"TOKEN"}},
      {"session update", Command::kSessionUpdate, {"set", "remove", "expected-version"}, {"TOKEN"}},
      {"session rotate", Command::kSessionRotate, {}, {"TOKEN"}},
      {"session delete", Command::kSessionDelete, {}, {"TOKEN"}},
      {"session list", Command::kSessionList, {"user-id"}, {"USER_ID"}},
      {"session revoke", Command::kSessionRevoke, {"user-id"}, {"USER_ID"}},
      {"account open", Command::kAccountOpen, {"currency"}, {"CURRENCY"}},
      {"account get", Command::kAccountGet, {"account"}, {"ACCOUNT_ID"}},
      {"deposit", Command::kDeposit, {"account", "amount", "idempotency-key"}, {}},
      {"transfer", Command::kTransfer, {"from", "to", "amount", "idempotency-key"}, {}},
      {"history", Command::kHistory, {"account", "page-size", "page-token", "all"}, {"ACCOUNT_ID"}},
      {"bench",
       Command::kBench,
       {"rpc", "concurrency", "connections", "duration", "warmup", "requests", "rate", "touch",
        "no-progress", "cpu-of"},
       {}},
  };
  return *kCommands;
}

absl::StatusOr<int64_t> ParseInt(const std::string& flag, const std::string& value) {
  int64_t result = 0;
  if (!absl::SimpleAtoi(value, &result)) {
    return UsageError(absl::StrCat("--", flag, ": '", value, "' is not an integer"));
  }
  return result;
}

absl::Status ParseKeyValue(const std::string& flag, const std::string& value,
                           std::map<std::string, std::string>& into) {
  const size_t eq = value.find('=');
  if (eq == std::string::npos || eq == 0) {
    return UsageError(absl::StrCat("--", flag, ": expected KEY=VALUE, got '", value, "'"));
  }
  // A key given twice would keep its last value only, without a word.
  if (!into.emplace(value.substr(0, eq), value.substr(eq + 1)).second) {
    return UsageError(absl::StrCat("--", flag, ": key '", value.substr(0, eq),
                                   "' is given twice; give each key once"));
  }
  return absl::OkStatus();
}

// Splits a --target value (or SESSIONLEDGER_TARGET's, named by `source`) into addresses.
// "ipv4:" and "ipv6:" targets are already gRPC address lists (their commas are part of the
// syntax), so they stay whole. A value without any address gives an empty list, which the
// caller reports in its own words; an empty entry beside others ("$A,$B" with B unset) is an
// error here. (BuildChannelTarget checks each address.)
absl::StatusOr<std::vector<std::string>> SplitTargets(absl::string_view source,
                                                      const std::string& value) {
  const std::string trimmed(absl::StripAsciiWhitespace(value));
  std::vector<std::string> result;
  if (absl::StartsWith(trimmed, "ipv4:") || absl::StartsWith(trimmed, "ipv6:")) {
    result.push_back(trimmed);
  } else {
    for (absl::string_view part : absl::StrSplit(trimmed, ',')) {
      result.emplace_back(absl::StripAsciiWhitespace(part));
    }
    const bool all_empty = std::all_of(result.begin(), result.end(),
                                       [](const std::string& address) { return address.empty(); });
    if (all_empty) return std::vector<std::string>{};
  }
  if (std::find(result.begin(), result.end(), "") != result.end()) {
    return UsageError(absl::StrCat(
        source, ": an empty address in the list (a comma too many, or an unset variable?)"));
  }
  return result;
}

// The token goes into an HTTP/2 header value, which may hold printable ASCII only. gRPC
// aborts the process on any other byte, and prints the header (the secret) in hex as it
// does. The realistic cause is a token file with CRLF line endings: $(cat file) keeps the
// '\r'. So such a token is a usage error, reported by position and byte, never by value; it
// is not repaired, since a token changed by the CLI would be a different token.
absl::Status CheckTokenFitsHeader(absl::string_view source, const std::string& token) {
  for (size_t i = 0; i < token.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(token[i]);
    if (c >= 0x20 && c <= 0x7e) continue;
    return UsageError(absl::StrCat(
        source, ": byte ", i + 1, " of ", token.size(), " is ", absl::StrFormat("0x%02x", c),
        ", which a gRPC header cannot carry; a token is printable ASCII",
        c == '\r' || c == '\n' ? " (a line ending from the file it was read from?)" : ""));
  }
  return absl::OkStatus();
}

// Whether `command` sends --token / SESSIONLEDGER_TOKEN: every TransactionService call, as its
// bearer token, and a session command whose TOKEN argument (`rest`) is left out.
bool SendsGlobalToken(Command command, const std::vector<std::string>& rest) {
  switch (command) {
    case Command::kAccountOpen:
    case Command::kAccountGet:
    case Command::kDeposit:
    case Command::kTransfer:
    case Command::kHistory:
      return true;
    case Command::kSessionGet:
    case Command::kSessionUpdate:
    case Command::kSessionRotate:
    case Command::kSessionDelete:
      return rest.empty();
    default:
      return false;
  }
}

absl::StatusOr<BenchRpc> ParseBenchRpc(const std::string& value) {
  for (BenchRpc rpc :
       {BenchRpc::kHealth, BenchRpc::kCreateSession, BenchRpc::kGetSession,
        BenchRpc::kUpdateSession, BenchRpc::kTransfer, BenchRpc::kCreateGetSession}) {
    if (value == BenchRpcName(rpc)) return rpc;
  }
  return UsageError(
      absl::StrCat("--rpc: '", value,
                   "' is not one of health, create-session, get-session, update-session, transfer, "
                   "create-get-session"));
}

// One --cpu-of value, NAME=PID[+PID...]. Names go into the JSON report unescaped, so they are
// restricted to characters that need no escaping.
absl::StatusOr<CpuOf> ParseCpuOf(const std::string& value) {
  const size_t eq = value.find('=');
  if (eq == std::string::npos) {
    return UsageError(absl::StrCat("--cpu-of: expected NAME=PID[+PID...], got '", value, "'"));
  }
  CpuOf entry;
  entry.name = value.substr(0, eq);
  if (entry.name.empty()) return UsageError(absl::StrCat("--cpu-of: empty NAME in '", value, "'"));
  for (const char c : entry.name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
      return UsageError(absl::StrCat("--cpu-of: NAME '", entry.name,
                                     "' may hold only letters, digits, '-', '_' and '.'"));
    }
  }
  if (entry.name == "client") {
    return UsageError("--cpu-of: NAME 'client' is reserved for the CLI's own CPU");
  }
  for (const absl::string_view part : absl::StrSplit(value.substr(eq + 1), '+')) {
    int pid = 0;
    if (!absl::SimpleAtoi(part, &pid) || pid <= 0) {
      return UsageError(
          absl::StrCat("--cpu-of ", entry.name, ": '", part, "' is not a positive process id"));
    }
    if (std::find(entry.pids.begin(), entry.pids.end(), pid) != entry.pids.end()) {
      return UsageError(absl::StrCat("--cpu-of ", entry.name, ": pid ", pid, " given twice"));
    }
    entry.pids.push_back(pid);
  }
  return entry;
}

// --ttl: whole seconds on the wire; "30m" is accepted too, as people think in minutes. A
// fraction is an error rather than truncated: "500ms" would become 0, which the server takes
// as "its default TTL" (30 minutes), the opposite of what was asked.
absl::StatusOr<int64_t> ParseTtl(const std::string& value) {
  int64_t seconds = 0;
  if (!absl::SimpleAtoi(value, &seconds)) {
    absl::StatusOr<absl::Duration> d = ParseDurationFlag("ttl", value);
    if (!d.ok()) return d.status();
    if (absl::Trunc(*d, absl::Seconds(1)) != *d) {
      return UsageError(absl::StrCat("--ttl: '", value, "' is not a whole number of seconds"));
    }
    seconds = absl::ToInt64Seconds(*d);
  }
  if (seconds < 1) {
    return UsageError(absl::StrCat(
        "--ttl must be at least 1 second (leave it out for the server's default), got '", value,
        "'"));
  }
  return seconds;
}

// Applies the command-specific options. `positional` holds the words after the command.
absl::Status ApplyCommandOptions(const Tokens& t, const std::vector<std::string>& positional,
                                 CliOptions& o) {
  auto first_positional = [&]() -> std::optional<std::string> {
    if (positional.empty()) return std::nullopt;
    return positional.front();
  };
  // A value from an option or from the positional argument. Both at once is refused rather
  // than one silently dropped: "session revoke alice --user-id bob" must not revoke bob.
  auto option_or_positional =
      [&](const std::string& flag) -> absl::StatusOr<std::optional<std::string>> {
    std::optional<std::string> option = t.Last(flag);
    if (option.has_value() && !positional.empty()) {
      return UsageError(absl::StrCat("give the argument or --", flag, ", not both"));
    }
    return option.has_value() ? option : first_positional();
  };
  auto required = [&](const std::optional<std::string>& v, const std::string& what,
                      std::string& into) -> absl::Status {
    if (!v.has_value() || v->empty()) return UsageError(absl::StrCat("missing ", what));
    into = *v;
    return absl::OkStatus();
  };
  auto required_option_or_positional = [&](const std::string& flag, const std::string& what,
                                           std::string& into) -> absl::Status {
    absl::StatusOr<std::optional<std::string>> v = option_or_positional(flag);
    if (!v.ok()) return v.status();
    return required(*v, what, into);
  };
  auto int_flag = [&](const std::string& flag, int64_t& into) -> absl::Status {
    if (auto v = t.Last(flag)) {
      absl::StatusOr<int64_t> parsed = ParseInt(flag, *v);
      if (!parsed.ok()) return parsed.status();
      into = *parsed;
    }
    return absl::OkStatus();
  };
  // A money movement's key, or none (the CLI then generates one). A value given must be a key:
  // "--idempotency-key=$KEY" with KEY unset would otherwise get a new key on every retry,
  // and the retry would move the money again.
  auto idempotency_key = [&]() -> absl::Status {
    absl::Status given = t.NoEmptyValue(
        "idempotency-key", "give the key to retry with, or leave the option out for a new one");
    if (!given.ok()) return given;
    o.idempotency_key = t.Last("idempotency-key").value_or("");
    return absl::OkStatus();
  };
  // Session commands take their TOKEN argument from the command line or, so that a token can
  // be exported once, from --token / SESSIONLEDGER_TOKEN.
  auto session_token = [&]() -> absl::Status {
    std::optional<std::string> v = first_positional();
    if (!v.has_value() && !o.token.empty()) v = o.token;
    return required(v, "TOKEN (argument, --token or SESSIONLEDGER_TOKEN)", o.session_token);
  };

  switch (o.command) {
    case Command::kHelp:
      return absl::OkStatus();
    case Command::kHealth: {
      absl::StatusOr<std::optional<std::string>> service = option_or_positional("service");
      if (!service.ok()) return service.status();
      o.health_service = service->value_or("");
      return absl::OkStatus();
    }
    case Command::kSessionCreate: {
      absl::Status s = required_option_or_positional("user-id", "--user-id", o.user_id);
      if (!s.ok()) return s;
      if (auto v = t.Last("ttl")) {
        absl::StatusOr<int64_t> seconds = ParseTtl(*v);
        if (!seconds.ok()) return seconds.status();
        o.ttl_seconds = *seconds;
      }
      for (const std::string& kv : t.All("attr")) {
        absl::Status st = ParseKeyValue("attr", kv, o.attributes);
        if (!st.ok()) return st;
      }
      return absl::OkStatus();
    }
    case Command::kSessionGet:
      o.touch = t.Has("touch");
      return session_token();
    case Command::kSessionUpdate: {
      absl::Status s = session_token();
      if (!s.ok()) return s;
      for (const std::string& kv : t.All("set")) {
        s = ParseKeyValue("set", kv, o.attributes);
        if (!s.ok()) return s;
      }
      o.remove = t.All("remove");
      if (o.attributes.empty() && o.remove.empty()) {
        return UsageError("session update needs at least one --set KEY=VALUE or --remove KEY");
      }
      return int_flag("expected-version", o.expected_version);
    }
    case Command::kSessionRotate:
    case Command::kSessionDelete:
      return session_token();
    case Command::kSessionList:
    case Command::kSessionRevoke:
      return required_option_or_positional("user-id", "--user-id", o.user_id);
    case Command::kAccountOpen:
      return required_option_or_positional("currency", "--currency", o.currency);
    case Command::kAccountGet:
      return required_option_or_positional("account", "ACCOUNT_ID", o.account_id);
    case Command::kDeposit: {
      absl::Status s = required(t.Last("account"), "--account", o.account_id);
      if (!s.ok()) return s;
      if (!t.Has("amount")) return UsageError("missing --amount (minor units, e.g. cents)");
      s = int_flag("amount", o.amount_minor);
      if (!s.ok()) return s;
      return idempotency_key();
    }
    case Command::kTransfer: {
      absl::Status s = required(t.Last("from"), "--from", o.from_account_id);
      if (!s.ok()) return s;
      s = required(t.Last("to"), "--to", o.to_account_id);
      if (!s.ok()) return s;
      if (!t.Has("amount")) return UsageError("missing --amount (minor units, e.g. cents)");
      s = int_flag("amount", o.amount_minor);
      if (!s.ok()) return s;
      return idempotency_key();
    }
    case Command::kHistory: {
      absl::Status s = required_option_or_positional("account", "ACCOUNT_ID", o.account_id);
      if (!s.ok()) return s;
      int64_t page_size = 0;
      s = int_flag("page-size", page_size);
      if (!s.ok()) return s;
      if (page_size < INT32_MIN || page_size > INT32_MAX) {
        return UsageError("--page-size is out of range");
      }
      o.page_size = static_cast<int32_t>(page_size);
      o.page_token = t.Last("page-token").value_or("");
      o.all_pages = t.Has("all");
      return absl::OkStatus();
    }
    case Command::kBench: {
      BenchOptions& b = o.bench;
      if (auto v = t.Last("rpc")) {
        absl::StatusOr<BenchRpc> rpc = ParseBenchRpc(*v);
        if (!rpc.ok()) return rpc.status();
        b.rpc = *rpc;
      }
      int64_t concurrency = b.concurrency;
      int64_t connections = b.connections;
      absl::Status s = int_flag("concurrency", concurrency);
      if (s.ok()) s = int_flag("connections", connections);
      if (s.ok()) s = int_flag("requests", b.requests);
      if (!s.ok()) return s;
      if (concurrency < 1 || concurrency > 100000) {
        return UsageError("--concurrency must be 1..100000");
      }
      if (connections < 0 || connections > 1000) {
        return UsageError("--connections must be 0..1000");
      }
      if (b.requests < 0) return UsageError("--requests must not be negative");
      b.concurrency = static_cast<int>(concurrency);
      b.connections = static_cast<int>(connections);
      for (auto [flag, into] : {std::pair<const char*, absl::Duration*>{"duration", &b.duration},
                                {"warmup", &b.warmup}}) {
        if (auto v = t.Last(flag)) {
          absl::StatusOr<absl::Duration> d = ParseDurationFlag(flag, *v);
          if (!d.ok()) return d.status();
          // The generator adds the length to a steady_clock time point in nanoseconds; far
          // beyond a day that overflows and the phase would end at once.
          if (*d > kLongestBenchPhase) {
            return UsageError(absl::StrCat("--", flag, " must be at most 24h, got '", *v, "'"));
          }
          *into = *d;
        }
      }
      // A fixed number of calls runs without a warm-up and until they are all done: a length
      // given with it would be silently ignored.
      if (b.requests > 0 && (t.Has("duration") || t.Has("warmup"))) {
        return UsageError(
            "--requests runs a fixed number of calls, with no warm-up and no time limit; leave "
            "out --duration and --warmup");
      }
      if (b.requests == 0 && b.duration <= absl::ZeroDuration()) {
        return UsageError("--duration must be positive");
      }
      if (auto v = t.Last("rate")) {
        if (!absl::SimpleAtod(*v, &b.rate) || !(b.rate >= 0) || b.rate > kHighestRate) {
          return UsageError(absl::StrCat("--rate: '", *v, "' is not a rate in calls/s"));
        }
        // One slot's interval, concurrency / rate seconds, must fit in int64 nanoseconds:
        // with at most 100000 slots this bound keeps it under 10^17 ns.
        if (b.rate > 0 && b.rate < kLowestRate) {
          return UsageError(absl::StrCat(
              "--rate must be 0 (no pacing) or at least 0.001 calls/s, got '", *v, "'"));
        }
      }
      b.touch = t.Has("touch");
      if (b.touch && b.rpc != BenchRpc::kGetSession) {
        return UsageError("--touch applies to --rpc get-session only");
      }
      b.progress = !t.Has("no-progress");
      for (const std::string& value : t.All("cpu-of")) {
        absl::StatusOr<CpuOf> entry = ParseCpuOf(value);
        if (!entry.ok()) return entry.status();
        for (const CpuOf& earlier : b.cpu_of) {
          if (earlier.name == entry->name) {
            return UsageError(absl::StrCat("--cpu-of: NAME '", entry->name, "' given twice"));
          }
        }
        b.cpu_of.push_back(*std::move(entry));
      }
      return absl::OkStatus();
    }
  }
  return absl::OkStatus();
}

}  // namespace

const char* BenchRpcName(BenchRpc rpc) {
  switch (rpc) {
    case BenchRpc::kHealth:
      return "health";
    case BenchRpc::kCreateSession:
      return "create-session";
    case BenchRpc::kGetSession:
      return "get-session";
    case BenchRpc::kUpdateSession:
      return "update-session";
    case BenchRpc::kTransfer:
      return "transfer";
    case BenchRpc::kCreateGetSession:
      return "create-get-session";
  }
  return "?";
}

absl::StatusOr<absl::Duration> ParseDurationFlag(const std::string& name,
                                                 const std::string& value) {
  double seconds = 0;
  absl::Duration d;
  if (absl::SimpleAtod(value, &seconds)) {
    d = absl::Seconds(seconds);
  } else if (!absl::ParseDuration(value, &d)) {
    return UsageError(absl::StrCat("--", name, ": '", value,
                                   "' is not a duration (e.g. 10s, 500ms, 2m or seconds)"));
  }
  if (d < absl::ZeroDuration() || d == absl::InfiniteDuration()) {
    return UsageError(absl::StrCat("--", name, " must be a finite, non-negative duration"));
  }
  return d;
}

absl::StatusOr<CliOptions> ParseCommandLine(const std::vector<std::string>& args,
                                            const EnvLookup& env) {
  absl::StatusOr<Tokens> tokens = Tokenize(args);
  if (!tokens.ok()) return tokens.status();
  CliOptions o;

  if (tokens->Has("help") || tokens->positionals.empty()) {
    if (!tokens->Has("help")) return UsageError("missing command; try --help");
    o.command = Command::kHelp;
    return o;
  }

  // Longest match first, so "session get" wins over a (non-existent) "session".
  const CommandSpec* spec = nullptr;
  size_t words_used = 0;
  const std::vector<std::string>& pos = tokens->positionals;
  for (const CommandSpec& candidate : Commands()) {
    std::vector<std::string> words = absl::StrSplit(candidate.words, ' ');
    if (words.size() > pos.size()) continue;
    if (!std::equal(words.begin(), words.end(), pos.begin())) continue;
    if (words.size() > words_used) {
      spec = &candidate;
      words_used = words.size();
    }
  }
  if (spec == nullptr) {
    if (pos[0] == "session" || pos[0] == "account") {
      return UsageError(absl::StrCat("unknown ", pos[0], " command ",
                                     Quoted(pos.size() > 1 ? pos[1] : ""), "; try --help"));
    }
    return UsageError(absl::StrCat("unknown command ", Quoted(pos[0]), "; try --help"));
  }
  o.command = spec->command;
  const std::vector<std::string> rest(pos.begin() + words_used, pos.end());
  if (rest.size() > spec->positionals.size()) {
    return UsageError(absl::StrCat("unexpected argument ", Quoted(rest[spec->positionals.size()]),
                                   " for '", spec->words, "'"));
  }
  for (const auto& [flag, value] : tokens->flags) {
    if (GlobalFlags().count(flag) > 0) continue;
    if (std::find(spec->flags.begin(), spec->flags.end(), flag) == spec->flags.end()) {
      return UsageError(absl::StrCat("option --", flag, " does not apply to '", spec->words, "'"));
    }
  }

  // Global options, with the environment as fallback.
  for (const std::string& value : tokens->All("target")) {
    absl::StatusOr<std::vector<std::string>> addresses = SplitTargets("--target", value);
    if (!addresses.ok()) return addresses.status();
    // An empty --target (say, from an unset shell variable) must not quietly become the
    // default address: the call would go to whatever listens there.
    if (addresses->empty()) return UsageError("--target: no address given");
    for (std::string& t : *addresses) o.targets.push_back(std::move(t));
  }
  // The variable only when no --target was given, and held to the same rule: set but empty
  // is an error too, not the default. "export SESSIONLEDGER_TARGET=$PROD" with PROD unset
  // is the same mistake as "--target $PROD", and would send the calls (and the token) to
  // whatever listens on localhost. Only an unset variable means the default.
  if (o.targets.empty()) {
    if (std::optional<std::string> from_env = env(kTargetEnv)) {
      absl::StatusOr<std::vector<std::string>> addresses = SplitTargets(kTargetEnv, *from_env);
      if (!addresses.ok()) return addresses.status();
      o.targets = *std::move(addresses);
      if (o.targets.empty()) {
        return UsageError(absl::StrCat(
            kTargetEnv, ": set but holds no address; unset it for the default ", kDefaultTarget));
      }
    }
  }
  if (o.targets.empty()) o.targets.push_back(kDefaultTarget);
  // A --token given is checked whatever the command; the variable only where the command sends
  // it (below): one exported from a CRLF file must not break `health` or `session create`.
  bool token_from_env = false;
  if (auto v = tokens->Last("token")) {
    o.token = *v;
    absl::Status fits = CheckTokenFitsHeader("--token", o.token);
    if (!fits.ok()) return fits;
  } else if (std::optional<std::string> from_env = env(kTokenEnv)) {
    o.token = *from_env;
    token_from_env = true;
  }
  if (auto v = tokens->Last("deadline")) {
    absl::StatusOr<absl::Duration> d = ParseDurationFlag("deadline", *v);
    if (!d.ok()) return d.status();
    if (*d <= absl::ZeroDuration()) return UsageError("--deadline must be positive");
    // The deadline is now + this in nanoseconds: far beyond a day ("inf", 1e10) that overflows
    // into the past, and every call would end at once as DEADLINE_EXCEEDED.
    if (*d > kLongestDeadline) {
      return UsageError(absl::StrCat("--deadline must be at most 24h, got '", *v, "'"));
    }
    o.deadline = *d;
  }
  o.json = tokens->Has("json");
  // An empty value (say, "--ca-file=$CA" with CA unset) would count as not given, and
  // without the other TLS options the CLI would then talk plaintext and send the bearer
  // token in the clear.
  for (const char* flag : {"ca-file", "cert-file", "key-file", "tls-server-name"}) {
    absl::Status given = tokens->NoEmptyValue(flag, "leave the option out instead");
    if (!given.ok()) return given;
  }
  o.tls.ca_file = tokens->Last("ca-file").value_or("");
  o.tls.cert_file = tokens->Last("cert-file").value_or("");
  o.tls.key_file = tokens->Last("key-file").value_or("");
  o.tls.server_name = tokens->Last("tls-server-name").value_or("");
  // Any TLS file or name implies TLS: a CA file with a plaintext channel would be ignored
  // silently, which is worse than either.
  o.tls.enabled = tokens->Has("tls") || !o.tls.ca_file.empty() || !o.tls.cert_file.empty() ||
                  !o.tls.key_file.empty() || !o.tls.server_name.empty();
  if (o.tls.cert_file.empty() != o.tls.key_file.empty()) {
    return UsageError("--cert-file and --key-file go together");
  }

  absl::Status s = ApplyCommandOptions(*tokens, rest, o);
  if (!s.ok()) return s;
  if (SendsGlobalToken(o.command, rest)) {
    // "--token=$TOKEN" with TOKEN unset, or an exported empty variable, would send the call
    // without a token; a token nowhere at all is the server's to refuse (UNAUTHENTICATED).
    if (o.token.empty() && token_from_env) {
      return UsageError(absl::StrCat(kTokenEnv, ": set but empty; unset it or give the token"));
    }
    if (o.token.empty() && tokens->Has("token")) {
      return UsageError("--token: empty value; give the session token or leave the option out");
    }
    if (token_from_env) {
      s = CheckTokenFitsHeader(kTokenEnv, o.token);
      if (!s.ok()) return s;
    }
  }
  return o;
}

std::string UsageText() {
  return R"(usage: sessionledger-cli [GLOBAL OPTIONS] COMMAND [ARGS]

Commands (SessionService):
  session create USER_ID|--user-id U [--ttl SECONDS|30m] [--attr K=V ...]
                 (--ttl: whole seconds, at least 1; without it the server's default)
  session get    [TOKEN] [--touch]
  session update [TOKEN] [--set K=V ...] [--remove K ...] [--expected-version N]
  session rotate [TOKEN]
  session delete [TOKEN]
  session list   USER_ID|--user-id U
  session revoke USER_ID|--user-id U
  (TOKEN defaults to --token / SESSIONLEDGER_TOKEN)

Commands (TransactionService; authenticated with --token / SESSIONLEDGER_TOKEN):
  account open CURRENCY|--currency EUR
  account get  ACCOUNT_ID|--account ID
  deposit  --account ID --amount MINOR [--idempotency-key K]
  transfer --from ID --to ID --amount MINOR [--idempotency-key K]
  history  ACCOUNT_ID|--account ID [--page-size N] [--page-token T] [--all]
  (amounts are integer minor units, e.g. cents; without --idempotency-key a key is generated
   and printed on stderr, so a failed call can be retried with the same key)

Other:
  health [SERVICE|--service NAME]
  bench --rpc health|create-session|get-session|update-session|transfer|create-get-session
        [--concurrency 16] [--connections N] [--duration 10s] [--warmup 2s]
        [--requests N] [--rate CALLS_PER_S] [--touch] [--no-progress]
        [--cpu-of NAME=PID[+PID...] ...]
        (--duration and --warmup: at most 24h; --rate: at least 0.001, or 0 for unpaced;
         --connections: default 4, never more than --concurrency; --requests N: N calls
         instead of a timed run, without --duration or --warmup; for create-get-session,
         --requests and --rate count create-and-read pairs, the report both calls)
        (--cpu-of: also report the CPU microseconds per call of these processes over the
         measured window, e.g. --cpu-of server=1234 --cpu-of memcached=2001+2002; the
         client's own is always reported)

Global options:
  --target ADDR[,ADDR...]  default $SESSIONLEDGER_TARGET, or localhost:50051 if it is unset
                           (set but empty is an error); accepts host:port, dns:///host:port,
                           ipv4:/ipv6: lists; a comma-separated list is balanced with
                           client-side round_robin
  --token TOKEN            session token, sent as "authorization: Bearer TOKEN"
                           (default $SESSIONLEDGER_TOKEN); printable ASCII only
  --deadline DURATION      per call, default 10s, at most 24h (e.g. 500ms, 2s)
  --json                   print responses as protobuf JSON
  --tls                    use TLS (system root certificates); implied by the options below
  --ca-file PEM            roots that sign the server's certificate
  --cert-file PEM --key-file PEM
                           client certificate, for servers with TLS_CLIENT_CA_FILE (mTLS)
  --tls-server-name NAME   name to verify in the server certificate (e.g. for IP targets)
  -h, --help
  --                       ends the options: every word after it is an argument, so an
                           argument that starts with '-' (a token can) goes after it, e.g.
                           session get -- TOKEN

The exit code is the gRPC status code (0 OK, 3 INVALID_ARGUMENT also for usage errors,
5 NOT_FOUND, 14 UNAVAILABLE, 15 DATA_LOSS when stdout cannot be written, 16 UNAUTHENTICATED,
...; 2 UNKNOWN for a code outside 0..16); errors go to stderr.
)";
}

}  // namespace sessionledger::client
