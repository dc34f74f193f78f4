// Secrets never reach the logs: a full session and ledger flow (successes and failures) through a
// server at LOG_LEVEL=debug, then its whole output is searched for every token it handed out and
// for the database password.
#include <signal.h>

#include <atomic>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "sessionledger/v1/session.grpc.pb.h"
#include "sessionledger/v1/transaction.grpc.pb.h"
#include "tests/support/server_process.h"
#include "tests/support/test_env.h"

namespace sessionledger::testing {
namespace {

namespace pb = ::sessionledger::v1;

std::string Unique(absl::string_view prefix) {
  static std::atomic<int> counter{0};
  std::random_device random;
  return absl::StrCat(prefix, "-", random(), "-", counter++);
}

// DATABASE_URL with `password` put into its user info (local PostgreSQL trusts 127.0.0.1, so
// the password is carried around but not needed to connect).
std::string WithPassword(const std::string& url, const std::string& password) {
  const size_t scheme_end = url.find("://");
  const size_t at = url.find('@', scheme_end);
  if (scheme_end == std::string::npos || at == std::string::npos) return url;
  const std::string userinfo = url.substr(scheme_end + 3, at - scheme_end - 3);
  const std::string user = userinfo.substr(0, userinfo.find(':'));
  return absl::StrCat(url.substr(0, scheme_end + 3), user, ":", password, url.substr(at));
}

void Deadline(grpc::ClientContext& context) {
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
}

TEST(SecretsInLogsTest, NoTokenOrPasswordInTheOutputOfAFullRun) {
  const std::string password = "pw-" + Unique("S3cret");
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  options.env["DATABASE_URL"] = WithPassword(RequiredEnv("DATABASE_URL"), password);
  ASSERT_NE(*options.env["DATABASE_URL"], RequiredEnv("DATABASE_URL"))
      << "DATABASE_URL has no user@ part to add a password to";
  options.env["LOG_LEVEL"] = "debug";
  options.env["SHUTDOWN_GRACE_SECONDS"] = "2";
  absl::StatusOr<std::unique_ptr<ServerProcess>> started = ServerProcess::Start(options);
  ASSERT_TRUE(started.ok()) << started.status();
  ServerProcess& server = **started;

  auto channel = server.NewChannel();
  auto sessions = pb::SessionService::NewStub(channel);
  auto ledger = pb::TransactionService::NewStub(channel);
  std::vector<std::string> tokens;
  const std::string user = Unique("secret-user");

  auto create = [&](const std::string& user_id) {
    grpc::ClientContext context;
    Deadline(context);
    pb::CreateSessionRequest request;
    request.set_user_id(user_id);
    (*request.mutable_attributes())["team"] = "blue";
    pb::Session session;
    const grpc::Status status = sessions->CreateSession(&context, request, &session);
    EXPECT_TRUE(status.ok()) << status.error_message();
    tokens.push_back(session.token());
    return session.token();
  };
  auto authorized = [](grpc::ClientContext& context, const std::string& token) {
    Deadline(context);
    context.AddMetadata("authorization", "Bearer " + token);
  };

  // Sessions: create, read, touch, update (also with a conflict), rotate, delete, list, revoke.
  std::string token = create(user);
  const std::string other = create(Unique("other-user"));
  {
    grpc::ClientContext context;
    Deadline(context);
    pb::GetSessionRequest request;
    request.set_token(token);
    request.set_touch(true);
    pb::Session session;
    EXPECT_TRUE(sessions->GetSession(&context, request, &session).ok());
  }
  for (int64_t expected : {int64_t{1}, int64_t{99}}) {
    grpc::ClientContext context;
    Deadline(context);
    pb::UpdateSessionRequest request;
    request.set_token(token);
    (*request.mutable_set())["step"] = absl::StrCat(expected);
    request.set_expected_version(expected);
    pb::Session session;
    (void)sessions->UpdateSession(&context, request, &session);
  }
  {
    grpc::ClientContext context;
    Deadline(context);
    pb::RotateSessionRequest request;
    request.set_token(token);
    pb::Session rotated;
    EXPECT_TRUE(sessions->RotateSession(&context, request, &rotated).ok());
    tokens.push_back(rotated.token());
    // The old token, now dead, in every call that takes one: error paths log too.
    for (int i = 0; i < 2; ++i) {
      grpc::ClientContext again;
      Deadline(again);
      pb::Session ignored;
      pb::GetSessionRequest get;
      get.set_token(token);
      EXPECT_FALSE(sessions->GetSession(&again, get, &ignored).ok());
    }
    token = rotated.token();
  }

  // Ledger: open, deposit, transfer, list, and the failures (bad token, other user, bad key).
  std::string account_a, account_b;
  for (std::string* id : {&account_a, &account_b}) {
    grpc::ClientContext context;
    authorized(context, token);
    pb::OpenAccountRequest request;
    request.set_currency("EUR");
    pb::Account account;
    EXPECT_TRUE(ledger->OpenAccount(&context, request, &account).ok());
    *id = account.account_id();
  }
  {
    grpc::ClientContext context;
    authorized(context, token);
    pb::DepositRequest request;
    request.set_account_id(account_a);
    request.set_amount_minor(500);
    request.set_idempotency_key(Unique("deposit"));
    pb::Transaction t;
    EXPECT_TRUE(ledger->Deposit(&context, request, &t).ok());
  }
  {
    grpc::ClientContext context;
    authorized(context, token);
    pb::TransferRequest request;
    request.set_from_account_id(account_a);
    request.set_to_account_id(account_b);
    request.set_amount_minor(1000);  // More than the balance: FAILED_PRECONDITION.
    request.set_idempotency_key(Unique("transfer"));
    pb::Transaction t;
    EXPECT_FALSE(ledger->Transfer(&context, request, &t).ok());
  }
  for (const std::string& caller : {token, other, tokens.front(), token + "x"}) {
    grpc::ClientContext context;
    authorized(context, caller);
    pb::ListTransactionsRequest request;
    request.set_account_id(account_a);
    pb::ListTransactionsResponse response;
    (void)ledger->ListTransactions(&context, request, &response);
  }
  {
    // A token in a malformed header and as a value of other fields.
    grpc::ClientContext context;
    Deadline(context);
    context.AddMetadata("authorization", "Basic " + token);
    pb::GetAccountRequest request;
    request.set_account_id(token);
    pb::Account account;
    EXPECT_FALSE(ledger->GetAccount(&context, request, &account).ok());
  }
  {
    grpc::ClientContext context;
    Deadline(context);
    pb::DeleteSessionRequest request;
    request.set_token(other);
    pb::DeleteSessionResponse response;
    EXPECT_TRUE(sessions->DeleteSession(&context, request, &response).ok());
  }
  {
    grpc::ClientContext context;
    Deadline(context);
    pb::RevokeUserSessionsRequest request;
    request.set_user_id(user);
    pb::RevokeUserSessionsResponse response;
    EXPECT_TRUE(sessions->RevokeUserSessions(&context, request, &response).ok());
  }

  // Stop the server the normal way so that every log line is written.
  server.Signal(SIGTERM);
  ASSERT_EQ(server.WaitForExit(absl::Seconds(30)), 0) << server.Output();
  const std::string output = server.Output();
  ASSERT_TRUE(absl::StrContains(output, "rpc finished")) << "debug logs were expected:\n" << output;

  ASSERT_EQ(tokens.size(), 3u);
  for (const std::string& t : tokens) {
    ASSERT_EQ(t.size(), 64u);
    EXPECT_FALSE(absl::StrContains(output, t)) << "a session token is in the logs";
    // Any part of its secret is a leak too (a log line may have cut or shortened the token): the
    // first 32 bytes, characters 0-42 of the base64url, are the secret (the rest is the user
    // tag). Sixteen characters are 96 bits, which no log line holds by chance.
    constexpr size_t kSecretChars = 42;
    constexpr size_t kWindow = 16;
    for (size_t at = 0; at + kWindow <= kSecretChars; ++at) {
      EXPECT_FALSE(absl::StrContains(output, t.substr(at, kWindow)))
          << "part of a token's secret (characters " << at << "-" << at + kWindow - 1
          << ") is in the logs";
    }
  }
  EXPECT_FALSE(absl::StrContains(output, password)) << "the database password is in the logs";
}

}  // namespace
}  // namespace sessionledger::testing
