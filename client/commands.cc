#include "client/commands.h"

#include <grpcpp/client_context.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "absl/container/flat_hash_set.h"
#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "client/bench.h"
#include "client/channel.h"
#include "client/output_format.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "sessionledger/v1/session.grpc.pb.h"
#include "sessionledger/v1/transaction.grpc.pb.h"

namespace sessionledger::client {
namespace {

using grpc::health::v1::Health;
using v1::SessionService;
using v1::TransactionService;

// A context carrying the per-call deadline and, for TransactionService, the bearer token.
std::unique_ptr<grpc::ClientContext> NewContext(const CliOptions& o, bool authenticated) {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(o.deadline));
  if (authenticated && !o.token.empty()) {
    context->AddMetadata("authorization", absl::StrCat("Bearer ", o.token));
  }
  return context;
}

// Prints `response` (or the error) and returns the exit code.
template <typename Response, typename Formatter>
int Finish(const CliOptions& o, const grpc::Status& status, const Response& response,
           Formatter format, std::ostream& out, std::ostream& err) {
  if (!status.ok()) {
    // The server's words (or a proxy's) could carry escape sequences for the terminal.
    err << "error: " << StatusCodeName(status.error_code()) << ": "
        << EscapeForTerminal(status.error_message()) << "\n";
    return ExitCodeForStatus(status);
  }
  out << (o.json ? ToJson(response) : format(response));
  return 0;
}

int RunHistory(const CliOptions& o, TransactionService::Stub& stub, std::ostream& out,
               std::ostream& err) {
  v1::ListTransactionsRequest request;
  request.set_account_id(o.account_id);
  request.set_page_size(o.page_size);
  request.set_page_token(o.page_token);
  v1::ListTransactionsResponse all;
  // A server that hands out a page token it handed out before would keep --all going forever.
  absl::flat_hash_set<std::string> tokens_seen;
  if (!o.page_token.empty()) tokens_seen.insert(o.page_token);
  for (;;) {
    v1::ListTransactionsResponse page;
    const grpc::Status status = stub.ListTransactions(NewContext(o, true).get(), request, &page);
    if (!status.ok() || !o.all_pages) {
      return Finish(o, status, page, FormatTransactionList, out, err);
    }
    for (v1::Transaction& t : *page.mutable_transactions()) *all.add_transactions() = std::move(t);
    if (page.next_page_token().empty()) break;
    if (!tokens_seen.insert(page.next_page_token()).second) {
      err << "error: INTERNAL: the server repeated a next_page_token; stopped after "
          << all.transactions_size() << " transactions\n";
      return static_cast<int>(grpc::StatusCode::INTERNAL);
    }
    request.set_page_token(page.next_page_token());
  }
  return Finish(o, grpc::Status::OK, all, FormatTransactionList, out, err);
}

// Deposit and Transfer: without a key we make one, and say so on stderr before the call, so
// that even a call that times out can be retried safely with the same key.
std::string KeyFor(const CliOptions& o, std::ostream& err) {
  if (!o.idempotency_key.empty()) return o.idempotency_key;
  std::string key = GenerateIdempotencyKey();
  err << "idempotency key: " << key << " (repeat with --idempotency-key " << key
      << " to retry safely)\n";
  return key;
}

}  // namespace

int ExitCodeForStatus(const grpc::Status& status) {
  const int code = static_cast<int>(status.error_code());
  if (code < static_cast<int>(grpc::StatusCode::OK) ||
      code > static_cast<int>(grpc::StatusCode::UNAUTHENTICATED)) {
    return static_cast<int>(grpc::StatusCode::UNKNOWN);
  }
  return code;
}

std::string GenerateIdempotencyKey() {
  absl::BitGen gen;
  return absl::StrFormat("cli-%016x%016x", absl::Uniform<uint64_t>(gen),
                         absl::Uniform<uint64_t>(gen));
}

int RunRpcCommand(const CliOptions& o, const std::shared_ptr<grpc::Channel>& channel,
                  std::ostream& out, std::ostream& err) {
  SessionService::Stub sessions(channel);
  TransactionService::Stub ledger(channel);

  switch (o.command) {
    case Command::kHealth: {
      Health::Stub health(channel);
      grpc::health::v1::HealthCheckRequest request;
      request.set_service(o.health_service);
      grpc::health::v1::HealthCheckResponse response;
      const grpc::Status status = health.Check(NewContext(o, false).get(), request, &response);
      const int code = Finish(o, status, response, FormatHealth, out, err);
      // A NOT_SERVING answer is a successful call but an unhealthy service; scripts probing
      // with `health` need a failing exit code, and UNAVAILABLE is what gRPC clients use for it.
      if (code == 0 && response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
        err << "error: UNAVAILABLE: "
            << (o.health_service.empty() ? "the server"
                                         : absl::StrCat("service '", o.health_service, "'"))
            << " is "
            << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()) << "\n";
        return static_cast<int>(grpc::StatusCode::UNAVAILABLE);
      }
      return code;
    }
    case Command::kSessionCreate: {
      v1::CreateSessionRequest request;
      request.set_user_id(o.user_id);
      request.set_ttl_seconds(o.ttl_seconds);
      request.mutable_attributes()->insert(o.attributes.begin(), o.attributes.end());
      v1::Session response;
      const grpc::Status status =
          sessions.CreateSession(NewContext(o, false).get(), request, &response);
      return Finish(o, status, response, FormatSession, out, err);
    }
    case Command::kSessionGet: {
      v1::GetSessionRequest request;
      request.set_token(o.session_token);
      request.set_touch(o.touch);
      v1::Session response;
      const grpc::Status status =
          sessions.GetSession(NewContext(o, false).get(), request, &response);
      return Finish(o, status, response, FormatSession, out, err);
    }
    case Command::kSessionUpdate: {
      v1::UpdateSessionRequest request;
      request.set_token(o.session_token);
      request.mutable_set()->insert(o.attributes.begin(), o.attributes.end());
      for (const std::string& key : o.remove) request.add_remove(key);
      request.set_expected_version(o.expected_version);
      v1::Session response;
      const grpc::Status status =
          sessions.UpdateSession(NewContext(o, false).get(), request, &response);
      return Finish(o, status, response, FormatSession, out, err);
    }
    case Command::kSessionRotate: {
      v1::RotateSessionRequest request;
      request.set_token(o.session_token);
      v1::Session response;
      const grpc::Status status =
          sessions.RotateSession(NewContext(o, false).get(), request, &response);
      return Finish(o, status, response, FormatSession, out, err);
    }
    case Command::kSessionDelete: {
      v1::DeleteSessionRequest request;
      request.set_token(o.session_token);
      v1::DeleteSessionResponse response;
      const grpc::Status status =
          sessions.DeleteSession(NewContext(o, false).get(), request, &response);
      return Finish(
          o, status, response, [](const v1::DeleteSessionResponse&) { return "deleted\n"; }, out,
          err);
    }
    case Command::kSessionList: {
      v1::ListUserSessionsRequest request;
      request.set_user_id(o.user_id);
      v1::ListUserSessionsResponse response;
      const grpc::Status status =
          sessions.ListUserSessions(NewContext(o, false).get(), request, &response);
      return Finish(o, status, response, FormatSessionList, out, err);
    }
    case Command::kSessionRevoke: {
      v1::RevokeUserSessionsRequest request;
      request.set_user_id(o.user_id);
      v1::RevokeUserSessionsResponse response;
      const grpc::Status status =
          sessions.RevokeUserSessions(NewContext(o, false).get(), request, &response);
      return Finish(
          o, status, response,
          [](const v1::RevokeUserSessionsResponse& r) {
            return FormatFields({{"revoked", absl::StrCat(r.revoked())}});
          },
          out, err);
    }
    case Command::kAccountOpen: {
      v1::OpenAccountRequest request;
      request.set_currency(o.currency);
      v1::Account response;
      const grpc::Status status = ledger.OpenAccount(NewContext(o, true).get(), request, &response);
      return Finish(o, status, response, FormatAccount, out, err);
    }
    case Command::kAccountGet: {
      v1::GetAccountRequest request;
      request.set_account_id(o.account_id);
      v1::Account response;
      const grpc::Status status = ledger.GetAccount(NewContext(o, true).get(), request, &response);
      return Finish(o, status, response, FormatAccount, out, err);
    }
    case Command::kDeposit: {
      v1::DepositRequest request;
      request.set_account_id(o.account_id);
      request.set_amount_minor(o.amount_minor);
      request.set_idempotency_key(KeyFor(o, err));
      v1::Transaction response;
      const grpc::Status status = ledger.Deposit(NewContext(o, true).get(), request, &response);
      return Finish(o, status, response, FormatTransaction, out, err);
    }
    case Command::kTransfer: {
      v1::TransferRequest request;
      request.set_from_account_id(o.from_account_id);
      request.set_to_account_id(o.to_account_id);
      request.set_amount_minor(o.amount_minor);
      request.set_idempotency_key(KeyFor(o, err));
      v1::Transaction response;
      const grpc::Status status = ledger.Transfer(NewContext(o, true).get(), request, &response);
      return Finish(o, status, response, FormatTransaction, out, err);
    }
    case Command::kHistory:
      return RunHistory(o, ledger, out, err);
    case Command::kHelp:
    case Command::kBench:
      break;
  }
  err << "error: INTERNAL: command not handled here\n";
  return static_cast<int>(grpc::StatusCode::INTERNAL);
}

int RunCli(const std::vector<std::string>& args, const EnvLookup& env, std::ostream& out,
           std::ostream& err) {
  // The CLI's own errors quote what the caller gave (a key, a file name, a target), which may
  // hold a terminal's control sequences: escaped as the server's words are.
  absl::StatusOr<CliOptions> options = ParseCommandLine(args, env);
  if (!options.ok()) {
    err << "sessionledger-cli: " << EscapeForTerminal(options.status().message()) << "\n";
    return static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT);
  }
  if (options->command == Command::kHelp) {
    out << UsageText();
    return 0;
  }
  absl::StatusOr<std::string> target = BuildChannelTarget(options->targets, options->deadline);
  if (!target.ok()) {
    err << "sessionledger-cli: " << EscapeForTerminal(target.status().message()) << "\n";
    return static_cast<int>(target.status().code());
  }
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      MakeCredentials(options->tls);
  if (!credentials.ok()) {
    err << "sessionledger-cli: " << EscapeForTerminal(credentials.status().message()) << "\n";
    return static_cast<int>(credentials.status().code());
  }
  ChannelOptions channel_options;
  channel_options.credentials = *credentials;
  channel_options.ssl_target_name_override = options->tls.server_name;
  if (options->tls.enabled && options->tls.server_name.empty()) {
    absl::StatusOr<std::string> name = TlsNameForTargets(options->targets);
    if (!name.ok()) {
      err << "sessionledger-cli: " << EscapeForTerminal(name.status().message()) << "\n";
      return static_cast<int>(name.status().code());
    }
    channel_options.ssl_target_name_override = *name;
  }
  if (options->command == Command::kBench) {
    return RunBenchCommand(*options, *target, channel_options, out, err);
  }
  return RunRpcCommand(*options, MakeChannel(*target, channel_options), out, err);
}

}  // namespace sessionledger::client
