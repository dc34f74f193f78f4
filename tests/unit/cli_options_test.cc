#include "client/cli_options.h"

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sessionledger::client {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::Pair;
using ::testing::UnorderedElementsAre;

EnvLookup FakeEnv(std::map<std::string, std::string> values) {
  return [values = std::move(values)](const std::string& name) -> std::optional<std::string> {
    auto it = values.find(name);
    if (it == values.end()) return std::nullopt;
    return it->second;
  };
}

absl::StatusOr<CliOptions> Parse(const std::vector<std::string>& args,
                                 std::map<std::string, std::string> env = {}) {
  return ParseCommandLine(args, FakeEnv(std::move(env)));
}

void ExpectUsageError(const std::vector<std::string>& args, const std::string& message_part) {
  absl::StatusOr<CliOptions> o = Parse(args);
  ASSERT_FALSE(o.ok()) << "accepted: " << ::testing::PrintToString(args);
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(o.status().message()), HasSubstr(message_part));
}

TEST(CliOptionsTest, DefaultsWithoutFlagsOrEnvironment) {
  absl::StatusOr<CliOptions> o = Parse({"health"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->command, Command::kHealth);
  EXPECT_THAT(o->targets, ElementsAre("localhost:50051"));
  EXPECT_EQ(o->token, "");
  EXPECT_EQ(o->deadline, absl::Seconds(10));
  EXPECT_FALSE(o->json);
  EXPECT_EQ(o->health_service, "");
}

TEST(CliOptionsTest, EnvironmentSuppliesTargetAndToken) {
  absl::StatusOr<CliOptions> o =
      Parse({"account", "get", "acc-1"},
            {{"SESSIONLEDGER_TARGET", "a:1,b:2"}, {"SESSIONLEDGER_TOKEN", "tok"}});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_THAT(o->targets, ElementsAre("a:1", "b:2"));
  EXPECT_EQ(o->token, "tok");
  EXPECT_EQ(o->account_id, "acc-1");
}

TEST(CliOptionsTest, EnvironmentTargetWithoutAnAddressIsAnErrorLikeAnEmptyTargetFlag) {
  // "export SESSIONLEDGER_TARGET=$PROD" with PROD unset must not send the calls to localhost.
  for (const std::string value : {"", " ", ",", " , "}) {
    absl::StatusOr<CliOptions> o = Parse({"health"}, {{"SESSIONLEDGER_TARGET", value}});
    ASSERT_FALSE(o.ok()) << "accepted SESSIONLEDGER_TARGET='" << value << "'";
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(o.status().message()), HasSubstr("SESSIONLEDGER_TARGET"));
  }
  // Unset still means the default, and --target makes the variable irrelevant.
  absl::StatusOr<CliOptions> o = Parse({"health"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_THAT(o->targets, ElementsAre("localhost:50051"));
  o = Parse({"health", "--target", "a:1"}, {{"SESSIONLEDGER_TARGET", ""}});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_THAT(o->targets, ElementsAre("a:1"));
  EXPECT_THAT(UsageText(), HasSubstr("set but empty is an error"));
}

TEST(CliOptionsTest, FlagsOverrideEnvironmentAndMayFollowTheCommand) {
  absl::StatusOr<CliOptions> o = Parse(
      {"health", "--target", "dns:///svc:50051", "--token=flag", "--json", "--deadline", "250ms"},
      {{"SESSIONLEDGER_TARGET", "env:1"}, {"SESSIONLEDGER_TOKEN", "env"}});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_THAT(o->targets, ElementsAre("dns:///svc:50051"));
  EXPECT_EQ(o->token, "flag");
  EXPECT_TRUE(o->json);
  EXPECT_EQ(o->deadline, absl::Milliseconds(250));
}

TEST(CliOptionsTest, RepeatedAndCommaSeparatedTargetsFormOneList) {
  absl::StatusOr<CliOptions> o =
      Parse({"--target", "10.0.0.1:1, 10.0.0.2:2", "--target=10.0.0.3:3", "health"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_THAT(o->targets, ElementsAre("10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:3"));
}

TEST(CliOptionsTest, Ipv4AddressListStaysWhole) {
  absl::StatusOr<CliOptions> o = Parse({"--target", "ipv4:10.0.0.1:1,10.0.0.2:2", "health"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_THAT(o->targets, ElementsAre("ipv4:10.0.0.1:1,10.0.0.2:2"));
}

// "--target $A,$B" with B unset must not quietly drop a replica from the list.
TEST(CliOptionsTest, AnEmptyAddressInATargetIsAUsageError) {
  for (const std::string value : {"a:1,", ",a:1", "a:1,,b:2", "a:1, ,b:2"}) {
    ExpectUsageError({"health", "--target", value}, "--target: an empty address in the list");
    absl::StatusOr<CliOptions> o = Parse({"health"}, {{"SESSIONLEDGER_TARGET", value}});
    ASSERT_FALSE(o.ok()) << "accepted SESSIONLEDGER_TARGET='" << value << "'";
    EXPECT_THAT(std::string(o.status().message()),
                HasSubstr("SESSIONLEDGER_TARGET: an empty address in the list"));
  }
  // What names an address still does.
  for (const std::string value : {"unix:/tmp/s", "unix:///tmp/s", "unix-abstract:x", "ipv6:[::1]:1",
                                  "ipv4:10.0.0.1:1,10.0.0.2:2", "dns:///h:1", " a:1 , b:2 "}) {
    absl::StatusOr<CliOptions> o = Parse({"health", "--target", value});
    EXPECT_TRUE(o.ok()) << value << ": " << o.status();
  }
}

// An empty --token (say, "--token=$TOKEN" with TOKEN unset) or SESSIONLEDGER_TOKEN would send
// the call without one. Only where the command sends it: a script that always passes --token
// still runs health. No token anywhere is the server's to refuse.
TEST(CliOptionsTest, AnEmptyTokenWhereOneIsSentIsAUsageError) {
  ExpectUsageError({"account", "get", "a", "--token", ""}, "--token: empty value");
  ExpectUsageError({"--token=", "deposit", "--account", "a", "--amount", "1"},
                   "--token: empty value");
  absl::StatusOr<CliOptions> o = Parse({"account", "get", "a"}, {{"SESSIONLEDGER_TOKEN", ""}});
  ASSERT_FALSE(o.ok());
  EXPECT_THAT(std::string(o.status().message()), HasSubstr("SESSIONLEDGER_TOKEN: set but empty"));
  // A session command without its TOKEN argument says which one is missing.
  ExpectUsageError({"session", "get", "--token="}, "missing TOKEN");

  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"--token=", "health"},
        std::vector<std::string>{"session", "get", "--token=", "t"},
        std::vector<std::string>{"session", "create", "u", "--token", ""}}) {
    o = Parse(args);
    EXPECT_TRUE(o.ok()) << ::testing::PrintToString(args) << ": " << o.status();
    o = Parse(args, {{"SESSIONLEDGER_TOKEN", ""}});
    EXPECT_TRUE(o.ok()) << ::testing::PrintToString(args) << ": " << o.status();
  }
  o = Parse({"account", "get", "a"});
  EXPECT_TRUE(o.ok()) << o.status();
}

// A key given twice would keep only its last value without a word.
TEST(CliOptionsTest, AnAttributeKeyGivenTwiceIsAUsageError) {
  ExpectUsageError({"session", "create", "u", "--attr", "role=a", "--attr", "role=b"},
                   "--attr: key 'role' is given twice");
  ExpectUsageError({"session", "update", "t", "--set", "x=1", "--set", "y=2", "--set", "x="},
                   "--set: key 'x' is given twice");
}

TEST(CliOptionsTest, DeadlineAcceptsBareSeconds) {
  absl::StatusOr<CliOptions> o = Parse({"--deadline", "1.5", "health"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->deadline, absl::Milliseconds(1500));
  ExpectUsageError({"--deadline", "soon", "health"}, "--deadline");
  ExpectUsageError({"--deadline", "0", "health"}, "positive");
  ExpectUsageError({"--deadline", "1e10", "health"}, "at most 24h");
  ExpectUsageError({"--deadline", "inf", "health"}, "finite");
  EXPECT_TRUE(Parse({"--deadline", "24h", "health"}).ok());
}

TEST(CliOptionsTest, SessionCreate) {
  absl::StatusOr<CliOptions> o = Parse({"session", "create", "--user-id", "alice", "--ttl", "30m",
                                        "--attr", "role=admin", "--attr", "theme=a=b"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->command, Command::kSessionCreate);
  EXPECT_EQ(o->user_id, "alice");
  EXPECT_EQ(o->ttl_seconds, 1800);
  // Only the first '=' separates key from value.
  EXPECT_THAT(o->attributes, UnorderedElementsAre(Pair("role", "admin"), Pair("theme", "a=b")));

  o = Parse({"session", "create", "bob", "--ttl", "60"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->user_id, "bob");
  EXPECT_EQ(o->ttl_seconds, 60);

  o = Parse({"session", "create", "bob", "--ttl", "90s"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->ttl_seconds, 90);

  ExpectUsageError({"session", "create"}, "--user-id");
  ExpectUsageError({"session", "create", "--user-id", "a", "--attr", "novalue"}, "KEY=VALUE");
  ExpectUsageError({"session", "create", "--user-id", "a", "--attr", "=v"}, "KEY=VALUE");
}

TEST(CliOptionsTest, SessionCreateRejectsTtlBelowOneSecondOrWithAFraction) {
  // A TTL is whole seconds on the wire and 0 means "the server's default" (30 minutes): a
  // truncated "500ms" would have made a long session of a short one.
  for (const char* ttl : {"500ms", "0.5", "999ms", "0", "0s", "-1", "-5s"}) {
    ExpectUsageError({"session", "create", "--user-id", "a", "--ttl", ttl}, "--ttl");
  }
  for (const char* ttl : {"1.5", "1500ms", "90.5s"}) {
    ExpectUsageError({"session", "create", "--user-id", "a", "--ttl", ttl},
                     "not a whole number of seconds");
  }
  absl::StatusOr<CliOptions> o = Parse({"session", "create", "--user-id", "a", "--ttl", "1"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->ttl_seconds, 1);
  o = Parse({"session", "create", "--user-id", "a", "--ttl", "1000ms"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->ttl_seconds, 1);
}

TEST(CliOptionsTest, SessionTokenFromArgumentOrGlobalToken) {
  absl::StatusOr<CliOptions> o = Parse({"session", "get", "tok-arg", "--touch"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->session_token, "tok-arg");
  EXPECT_TRUE(o->touch);

  o = Parse({"session", "rotate"}, {{"SESSIONLEDGER_TOKEN", "tok-env"}});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->command, Command::kSessionRotate);
  EXPECT_EQ(o->session_token, "tok-env");

  o = Parse({"session", "delete", "--token", "tok-flag"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->session_token, "tok-flag");

  ExpectUsageError({"session", "get"}, "TOKEN");
}

TEST(CliOptionsTest, SessionUpdate) {
  absl::StatusOr<CliOptions> o = Parse({"session", "update", "t", "--set", "a=1", "--remove", "b",
                                        "--remove", "c", "--expected-version", "7"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_THAT(o->attributes, UnorderedElementsAre(Pair("a", "1")));
  EXPECT_THAT(o->remove, ElementsAre("b", "c"));
  EXPECT_EQ(o->expected_version, 7);
  ExpectUsageError({"session", "update", "t"}, "--set");
  ExpectUsageError({"session", "update", "t", "--set", "a=1", "--expected-version", "x"},
                   "not an integer");
}

TEST(CliOptionsTest, SessionListAndRevoke) {
  absl::StatusOr<CliOptions> o = Parse({"session", "list", "--user-id", "alice"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->command, Command::kSessionList);
  EXPECT_EQ(o->user_id, "alice");
  o = Parse({"session", "revoke", "alice"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->command, Command::kSessionRevoke);
  EXPECT_EQ(o->user_id, "alice");
  ExpectUsageError({"session", "list"}, "--user-id");
}

TEST(CliOptionsTest, AccountsDepositTransferHistory) {
  absl::StatusOr<CliOptions> o = Parse({"account", "open", "--currency", "EUR"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->command, Command::kAccountOpen);
  EXPECT_EQ(o->currency, "EUR");

  o = Parse({"deposit", "--account", "a1", "--amount", "1250"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->command, Command::kDeposit);
  EXPECT_EQ(o->account_id, "a1");
  EXPECT_EQ(o->amount_minor, 1250);
  EXPECT_EQ(o->idempotency_key, "");  // generated at call time

  o = Parse({"transfer", "--from", "a1", "--to", "a2", "--amount", "5", "--idempotency-key", "k1"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->from_account_id, "a1");
  EXPECT_EQ(o->to_account_id, "a2");
  EXPECT_EQ(o->amount_minor, 5);
  EXPECT_EQ(o->idempotency_key, "k1");

  // An empty key (say, "--idempotency-key=$KEY" with KEY unset) is refused, not replaced by a
  // new one: a retry with a new key would move the money again.
  ExpectUsageError({"deposit", "--account", "a1", "--amount", "1", "--idempotency-key="},
                   "--idempotency-key: empty value");
  ExpectUsageError(
      {"transfer", "--from", "a1", "--to", "a2", "--amount", "5", "--idempotency-key", ""},
      "--idempotency-key: empty value");
  // Nor is a second key taken over the first: either could be the one a retry means.
  ExpectUsageError({"transfer", "--from", "a1", "--to", "a2", "--amount", "5", "--idempotency-key",
                    "", "--idempotency-key", "k1"},
                   "--idempotency-key is given more than once");

  // The server owns the amount rules (> 0); the CLI only checks that it is a number.
  o = Parse({"transfer", "--from", "a1", "--to", "a2", "--amount", "-5"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->amount_minor, -5);

  o = Parse({"history", "a1", "--page-size", "20", "--all"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->command, Command::kHistory);
  EXPECT_EQ(o->page_size, 20);
  EXPECT_TRUE(o->all_pages);

  ExpectUsageError({"deposit", "--account", "a1"}, "--amount");
  ExpectUsageError({"deposit", "--account", "a1", "--amount", "12.50"}, "not an integer");
  ExpectUsageError({"transfer", "--from", "a1", "--amount", "1"}, "--to");
  ExpectUsageError({"history"}, "ACCOUNT_ID");
  ExpectUsageError({"history", "a1", "--page-size", "99999999999"}, "out of range");
}

TEST(CliOptionsTest, Bench) {
  absl::StatusOr<CliOptions> o =
      Parse({"bench", "--rpc", "get-session", "--concurrency", "32", "--duration", "5s", "--warmup",
             "0", "--connections", "2", "--touch", "--no-progress", "--json", "--target", "a:1",
             "--target", "b:2"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->command, Command::kBench);
  EXPECT_EQ(o->bench.rpc, BenchRpc::kGetSession);
  EXPECT_EQ(o->bench.concurrency, 32);
  EXPECT_EQ(o->bench.connections, 2);
  EXPECT_EQ(o->bench.duration, absl::Seconds(5));
  EXPECT_EQ(o->bench.warmup, absl::ZeroDuration());
  EXPECT_TRUE(o->bench.touch);
  EXPECT_FALSE(o->bench.progress);
  EXPECT_TRUE(o->json);
  EXPECT_THAT(o->targets, ElementsAre("a:1", "b:2"));

  for (const char* rpc : {"health", "create-session", "get-session", "update-session", "transfer",
                          "create-get-session"}) {
    o = Parse({"bench", "--rpc", rpc});
    ASSERT_TRUE(o.ok()) << rpc << ": " << o.status();
    EXPECT_EQ(BenchRpcName(o->bench.rpc), std::string(rpc));
  }
  o = Parse({"bench", "--rate", "2500.5"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_DOUBLE_EQ(o->bench.rate, 2500.5);
  ExpectUsageError({"bench", "--rate", "-1"}, "--rate");
  ExpectUsageError({"bench", "--rate", "fast"}, "--rate");
  ExpectUsageError({"bench", "--rpc", "delete-everything"}, "--rpc");
  ExpectUsageError({"bench", "--concurrency", "0"}, "--concurrency");
  ExpectUsageError({"bench", "--duration", "0"}, "--duration");
  ExpectUsageError({"bench", "--requests", "-1"}, "--requests");
}

TEST(CliOptionsTest, BenchRequestsTakeNoDurationOrWarmup) {
  absl::StatusOr<CliOptions> o = Parse({"bench", "--requests", "100"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->bench.requests, 100);
  // Both would be ignored: the run makes its calls with no warm-up and no time limit.
  ExpectUsageError({"bench", "--requests", "100", "--duration", "5s"}, "--requests");
  ExpectUsageError({"bench", "--requests", "100", "--warmup", "0"}, "--warmup");
  // --requests 0 means a timed run, which takes both.
  o = Parse({"bench", "--requests", "0", "--duration", "5s", "--warmup", "1s"});
  ASSERT_TRUE(o.ok()) << o.status();
}

TEST(CliOptionsTest, BenchRateHasALowerBound) {
  // concurrency / rate seconds must fit in int64 nanoseconds; 1e-12 used to overflow the
  // conversion and hang the run.
  for (const char* rate : {"1e-12", "0.0009", "1e-300", "4.9e-324"}) {
    ExpectUsageError({"bench", "--rate", rate}, "--rate");
  }
  for (const char* rate : {"0.001", "0.2", "0"}) {
    absl::StatusOr<CliOptions> o = Parse({"bench", "--rate", rate, "--concurrency", "100000"});
    ASSERT_TRUE(o.ok()) << rate << ": " << o.status();
  }
}

TEST(CliOptionsTest, BenchDurationAndWarmupAreAtMostADay) {
  // 1e10 s overflowed steady_clock arithmetic, and the run ended at once with 0 calls.
  for (const char* flag : {"--duration", "--warmup"}) {
    for (const char* length : {"1e10", "86401", "24h1s", "1e300"}) {
      ExpectUsageError({"bench", flag, length}, flag);
    }
    absl::StatusOr<CliOptions> o = Parse({"bench", flag, "24h"});
    ASSERT_TRUE(o.ok()) << flag << ": " << o.status();
  }
}

TEST(CliOptionsTest, BenchCpuOf) {
  absl::StatusOr<CliOptions> o = Parse({"bench"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->bench.cpu_of.empty());

  o = Parse({"bench", "--cpu-of", "server=1234", "--cpu-of=memcached=2001+2002", "--cpu-of",
             "pooled-server.2_b=7"});
  ASSERT_TRUE(o.ok()) << o.status();
  ASSERT_EQ(o->bench.cpu_of.size(), 3u);
  EXPECT_EQ(o->bench.cpu_of[0].name, "server");
  EXPECT_THAT(o->bench.cpu_of[0].pids, ElementsAre(1234));
  EXPECT_EQ(o->bench.cpu_of[1].name, "memcached");
  EXPECT_THAT(o->bench.cpu_of[1].pids, ElementsAre(2001, 2002));
  EXPECT_EQ(o->bench.cpu_of[2].name, "pooled-server.2_b");
  EXPECT_THAT(o->bench.cpu_of[2].pids, ElementsAre(7));

  for (const char* value :
       {"server", "server1234", "=1234", "server=", "server=abc", "server=12x", "server=0",
        "server=-5", "server=1+", "server=+1", "server=1++2", "server=99999999999", "server=1+1",
        "client=1", "se rver=1", "se\"rver=1"}) {
    ExpectUsageError({"bench", "--cpu-of", value}, "--cpu-of");
  }
  ExpectUsageError({"bench", "--cpu-of", "s=1", "--cpu-of", "s=2"}, "'s' given twice");
  ExpectUsageError({"bench", "--cpu-of", "client=1"}, "reserved");
  ExpectUsageError({"bench", "--cpu-of", "=1"}, "empty NAME");
  ExpectUsageError({"bench", "--cpu-of", "s=0"}, "positive process id");
  ExpectUsageError({"bench", "--cpu-of", "s"}, "NAME=PID");
  ExpectUsageError({"bench", "--cpu-of"}, "needs a value");
  ExpectUsageError({"health", "--cpu-of", "s=1"}, "does not apply to 'health'");
}

TEST(CliOptionsTest, UsageErrors) {
  ExpectUsageError({}, "missing command");
  ExpectUsageError({"frobnicate"}, "unknown command 'frobnicate'");
  ExpectUsageError({"session", "explode"}, "unknown session command 'explode'");
  ExpectUsageError({"session"}, "unknown session command");
  ExpectUsageError({"health", "--bogus"}, "unknown option --bogus");
  ExpectUsageError({"health", "--target"}, "needs a value");
  ExpectUsageError({"health", "--target", ""}, "--target: no address given");
  ExpectUsageError({"health", "--target=,"}, "--target: no address given");
  ExpectUsageError({"health", "--target", " , "}, "--target: no address given");
  ExpectUsageError({"health", "--json=yes"}, "takes no value");
  ExpectUsageError({"health", "--amount", "5"}, "does not apply to 'health'");
  ExpectUsageError({"account", "get", "a", "b"}, "unexpected argument 'b'");
}

TEST(CliOptionsTest, TlsIsOffByDefaultAndImpliedByItsFiles) {
  absl::StatusOr<CliOptions> o = Parse({"health"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_FALSE(o->tls.enabled);

  o = Parse({"--tls", "health"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->tls.enabled);
  EXPECT_EQ(o->tls.ca_file, "");

  o = Parse({"health", "--ca-file", "ca.pem", "--cert-file", "c.pem", "--key-file", "k.pem",
             "--tls-server-name", "api.example"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->tls.enabled);
  EXPECT_EQ(o->tls.ca_file, "ca.pem");
  EXPECT_EQ(o->tls.cert_file, "c.pem");
  EXPECT_EQ(o->tls.key_file, "k.pem");
  EXPECT_EQ(o->tls.server_name, "api.example");

  ExpectUsageError({"health", "--cert-file", "c.pem"}, "--cert-file and --key-file");
}

TEST(CliOptionsTest, EmptyTlsOptionIsAUsageErrorNotPlaintext) {
  // "--ca-file=$CA" with CA unset: counted as not given, it would leave TLS off and the bearer
  // token would go out in the clear.
  for (const std::string flag : {"ca-file", "cert-file", "key-file", "tls-server-name"}) {
    ExpectUsageError({"health", absl::StrCat("--", flag, "=")}, absl::StrCat("--", flag, ":"));
    ExpectUsageError({"health", absl::StrCat("--", flag), ""}, absl::StrCat("--", flag, ":"));
    // A later, non-empty value does not win either.
    ExpectUsageError(
        {"--tls", "health", absl::StrCat("--", flag, "="), absl::StrCat("--", flag), "x.pem"},
        absl::StrCat("--", flag, " is given more than once"));
  }
  ExpectUsageError({"health", "--cert-file=", "--key-file="}, "--cert-file: empty value");
}

TEST(CliOptionsTest, HelpWins) {
  absl::StatusOr<CliOptions> o = Parse({"session", "get", "--help"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->command, Command::kHelp);
  o = Parse({"-h"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->command, Command::kHelp);
  EXPECT_THAT(UsageText(), HasSubstr("session create"));
}

// The help shows each form a command accepts, and each form it shows parses.
TEST(CliOptionsTest, HelpShowsEveryFormOfAnArgument) {
  const std::pair<const char*, std::vector<std::vector<std::string>>> forms[] = {
      {"session create USER_ID|--user-id U",
       {{"session", "create", "u"}, {"session", "create", "--user-id", "u"}}},
      {"session list   USER_ID|--user-id U",
       {{"session", "list", "u"}, {"session", "list", "--user-id", "u"}}},
      {"session revoke USER_ID|--user-id U",
       {{"session", "revoke", "u"}, {"session", "revoke", "--user-id", "u"}}},
      {"account open CURRENCY|--currency EUR",
       {{"account", "open", "EUR"}, {"account", "open", "--currency", "EUR"}}},
      {"account get  ACCOUNT_ID|--account ID",
       {{"account", "get", "a"}, {"account", "get", "--account", "a"}}},
      {"history  ACCOUNT_ID|--account ID", {{"history", "a"}, {"history", "--account", "a"}}},
      {"health [SERVICE|--service NAME]",
       {{"health"}, {"health", "s"}, {"health", "--service", "s"}}},
  };
  for (const auto& [help, argument_lists] : forms) {
    EXPECT_THAT(UsageText(), HasSubstr(help));
    for (const std::vector<std::string>& args : argument_lists) {
      absl::StatusOr<CliOptions> o = Parse(args);
      EXPECT_TRUE(o.ok()) << ::testing::PrintToString(args) << ": " << o.status();
    }
  }
  EXPECT_THAT(UsageText(), HasSubstr("at most 24h (e.g. 500ms"));
  ExpectUsageError({"--deadline", "25h", "health"}, "at most 24h");
}

TEST(CliOptionsTest, UnknownLongOptionIsNotEchoed) {
  // Session tokens are URL-safe base64 and may start with "--": a token passed without "--"
  // before it must not end up on stderr (and in CI logs) in an error message.
  const std::string token = "--Zm9vYmFyLXNlY3JldC10b2tlbi12YWx1ZS0xMjM0NTY3";
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"session", "get", token},
        std::vector<std::string>{"session", "get", token + "=x"},
        std::vector<std::string>{"session", "get", "--Ab_c"}}) {
    absl::StatusOr<CliOptions> o = Parse(args);
    ASSERT_FALSE(o.ok());
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
    const std::string message(o.status().message());
    EXPECT_THAT(message, Not(HasSubstr(args[2].substr(2, 4)))) << message;
    EXPECT_THAT(message,
                HasSubstr(absl::StrCat("unknown option of ", args[2].size(), " characters")));
    EXPECT_THAT(message, HasSubstr("'--'")) << message;  // says how to pass such an argument
  }
  // A short, option-like name is still named, with the same hint.
  ExpectUsageError({"health", "--bogus"}, "unknown option --bogus;");
  ExpectUsageError({"health", "--bogus"}, "goes after '--'");
  EXPECT_THAT(UsageText(), HasSubstr("--                       ends the options"));
}

// One of our options in another spelling is named, with the right one: a token never reads as
// one of our names, however its case and '_' are changed.
TEST(CliOptionsTest, AnOptionSpelledWithUnderscoresOrCapitalsSaysWhichOneIsMeant) {
  ExpectUsageError({"session", "create", "--user_id", "alice"},
                   "unknown option --user_id; did you mean --user-id?");
  ExpectUsageError({"--Target=a:1", "health"}, "unknown option --Target; did you mean --target?");
  ExpectUsageError({"deposit", "--IDEMPOTENCY_KEY", "k"}, "did you mean --idempotency-key?");
}

TEST(CliOptionsTest, AMisplacedTokenIsNotEchoed) {
  // A token given as a command, or one word too many, is as secret as one that looks like an
  // option: the message describes it by its length.
  const std::string token = "Zm9vYmFyLXNlY3JldC10b2tlbi12YWx1ZS0xMjM0NTY3";
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{token, "session", "get"},
        std::vector<std::string>{"session", token},
        std::vector<std::string>{"session", "rotate", token, token}}) {
    absl::StatusOr<CliOptions> o = Parse(args);
    ASSERT_FALSE(o.ok()) << ::testing::PrintToString(args);
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
    const std::string message(o.status().message());
    EXPECT_THAT(message, Not(HasSubstr(token.substr(0, 6)))) << message;
    EXPECT_THAT(message, HasSubstr(absl::StrCat("of ", token.size(), " characters"))) << message;
  }
}

TEST(CliOptionsTest, AValueGivenAsBothArgumentAndOptionIsRefused) {
  // Taking either one silently would act on a user or account the caller did not mean.
  ExpectUsageError({"session", "revoke", "alice", "--user-id", "bob"},
                   "give the argument or --user-id, not both");
  ExpectUsageError({"session", "list", "alice", "--user-id", "alice"}, "--user-id, not both");
  ExpectUsageError({"session", "create", "alice", "--user-id", "bob"}, "--user-id, not both");
  ExpectUsageError({"account", "open", "EUR", "--currency", "USD"}, "--currency, not both");
  ExpectUsageError({"account", "get", "a", "--account", "b"}, "--account, not both");
  ExpectUsageError({"history", "a", "--account", "b"}, "--account, not both");
  ExpectUsageError({"health", "x", "--service", "y"}, "--service, not both");
  // Either one alone still works.
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"session", "revoke", "alice"},
        std::vector<std::string>{"session", "revoke", "--user-id", "alice"}}) {
    absl::StatusOr<CliOptions> o = Parse(args);
    ASSERT_TRUE(o.ok()) << o.status();
    EXPECT_EQ(o->user_id, "alice");
  }
}

TEST(CliOptionsTest, BenchTouchAppliesToGetSessionOnly) {
  ExpectUsageError({"bench", "--rpc", "health", "--touch"}, "--touch applies to --rpc get-session");
  ExpectUsageError({"bench", "--touch"}, "--touch applies to --rpc get-session");
  absl::StatusOr<CliOptions> o = Parse({"bench", "--rpc", "get-session", "--touch"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->bench.touch);
}

TEST(CliOptionsTest, TokenThatCannotBeAHeaderValueIsAUsageErrorThatHidesIt) {
  // gRPC aborts the process on such a header value and prints it, the secret, in hex. A token
  // file with CRLF line endings is the usual source: $(cat file) keeps the '\r'.
  const std::string secret = "c2VjcmV0LXRva2Vu";
  for (const std::string& token :
       {secret + "\r", secret + "\n", "Bearer\t" + secret, secret + std::string(1, '\0'),
        secret + "\x7f", secret + "\xc3\xa9"}) {
    absl::StatusOr<CliOptions> o = Parse({"account", "get", "acc-1", "--token", token});
    ASSERT_FALSE(o.ok()) << ::testing::PrintToString(token);
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(o.status().message()), HasSubstr("--token:"));
    EXPECT_THAT(std::string(o.status().message()), Not(HasSubstr(secret.substr(0, 6))));

    o = Parse({"account", "get", "acc-1"}, {{"SESSIONLEDGER_TOKEN", token}});
    ASSERT_FALSE(o.ok()) << ::testing::PrintToString(token);
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(o.status().message()), HasSubstr("SESSIONLEDGER_TOKEN:"));
    EXPECT_THAT(std::string(o.status().message()), Not(HasSubstr(secret.substr(0, 6))));
  }
  ExpectUsageError({"health", "--token", secret + "\r"}, "is 0x0d");

  // Tokens are opaque to the client: any printable ASCII passes, unchanged.
  const std::string printable = " !\"#$%&'()*+,-./09:;<=>?@AZ[\\]^_`az{|}~";
  absl::StatusOr<CliOptions> o = Parse({"health", "--token", printable});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->token, printable);
  o = Parse({"health"}, {{"SESSIONLEDGER_TOKEN", printable}});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->token, printable);
}

// Of two values of one option, either could be the one meant: taking the last would revoke the
// other user, pay the other account or retry with a new key.
TEST(CliOptionsTest, AnOptionWithAValueIsGivenOnce) {
  ExpectUsageError({"session", "revoke", "--user-id", "alice", "--user-id", "bob"},
                   "option --user-id is given more than once; give it once");
  ExpectUsageError({"transfer", "--from", "a1", "--to", "a2", "--to", "a3", "--amount", "5"},
                   "option --to is given more than once");
  ExpectUsageError({"--deadline", "1s", "health", "--deadline=2s"}, "--deadline is given");
  // Values are not echoed: a token is a secret.
  absl::StatusOr<CliOptions> o =
      Parse({"account", "get", "a1", "--token", "secret-one", "--token", "secret-two"});
  ASSERT_FALSE(o.ok());
  EXPECT_THAT(std::string(o.status().message()), HasSubstr("--token is given more than once"));
  EXPECT_THAT(std::string(o.status().message()), Not(HasSubstr("secret")));

  // Options whose values add up repeat.
  o = Parse({"--target", "10.0.0.1:1", "--target", "10.0.0.2:2", "session", "create", "--user-id",
             "u", "--attr", "a=1", "--attr", "b=2", "--json", "--json"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_THAT(o->targets, ElementsAre("10.0.0.1:1", "10.0.0.2:2"));
  EXPECT_EQ(o->attributes.size(), 2u);
  o = Parse(
      {"session", "update", "t", "--set", "a=1", "--set", "b=2", "--remove", "c", "--remove", "d"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_THAT(o->remove, ElementsAre("c", "d"));
}

// SESSIONLEDGER_TOKEN is checked where it is sent only: one exported from a file with CRLF line
// endings must not break the commands that never send it.
TEST(CliOptionsTest, AnUnsendableTokenInTheEnvironmentFailsOnlyTheCommandsThatSendIt) {
  const std::map<std::string, std::string> env = {{"SESSIONLEDGER_TOKEN", "c2VjcmV0\r"}};
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"health"},
                                             {"session", "create", "--user-id", "u"},
                                             {"session", "list", "--user-id", "u"},
                                             {"session", "get", "explicit-token"},
                                             {"bench", "--rpc", "health"}}) {
    absl::StatusOr<CliOptions> o = Parse(args, env);
    EXPECT_TRUE(o.ok()) << ::testing::PrintToString(args) << ": " << o.status();
  }
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"session", "get"},
           {"session", "rotate"},
           {"account", "open", "--currency", "EUR"},
           {"transfer", "--from", "a1", "--to", "a2", "--amount", "5"}}) {
    absl::StatusOr<CliOptions> o = Parse(args, env);
    ASSERT_FALSE(o.ok()) << ::testing::PrintToString(args);
    EXPECT_THAT(std::string(o.status().message()), HasSubstr("SESSIONLEDGER_TOKEN: byte 9 of 9"))
        << ::testing::PrintToString(args);
  }
}

TEST(CliOptionsTest, DoubleDashEndsOptions) {
  // A token may start with "--" in principle; "--" lets users pass it as an argument.
  absl::StatusOr<CliOptions> o = Parse({"session", "get", "--", "--odd-token"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->session_token, "--odd-token");
}

}  // namespace
}  // namespace sessionledger::client
