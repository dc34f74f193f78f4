#include "server/rpc/transaction_handlers.h"

#include <iterator>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/timestamp.pb.h"
#include "server/rpc/call_deadline.h"
#include "server/rpc/proto_time.h"
#include "server/rpc/status_mapping.h"

namespace sessionledger {
namespace {

namespace pb = ::sessionledger::v1;

void ToTimestamp(absl::Time t, google::protobuf::Timestamp* out) {
  SetTimestampFromUnixMicros(absl::ToUnixMicros(t), out);
}

void ToProto(const Account& account, pb::Account* out) {
  out->set_account_id(account.account_id);
  out->set_owner_user_id(account.owner_user_id);
  out->set_currency(account.currency);
  out->set_balance_minor(account.balance_minor);
  ToTimestamp(account.created_at, out->mutable_created_at());
}

void ToProto(const Transaction& t, pb::Transaction* out) {
  out->set_transaction_id(t.transaction_id);
  out->set_kind(std::string(TransactionKindName(t.kind)));
  out->set_from_account_id(t.from_account_id);
  out->set_to_account_id(t.to_account_id);
  out->set_amount_minor(t.amount_minor);
  out->set_currency(t.currency);
  ToTimestamp(t.created_at, out->mutable_created_at());
  out->set_idempotency_key(t.idempotency_key);
}

}  // namespace

std::string BearerToken(const grpc::ServerContext& context) {
  // Two credentials (a proxy adding its own, say) are ambiguous: neither is taken.
  const auto [it, end] = context.client_metadata().equal_range("authorization");
  if (it == end || std::next(it) != end) return "";
  const absl::string_view value(it->second.data(), it->second.size());
  constexpr absl::string_view kScheme = "bearer ";
  if (value.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme)) {
    return "";
  }
  return std::string(absl::StripAsciiWhitespace(value.substr(kScheme.size())));
}

grpc::Status TransactionHandlers::OpenAccount(grpc::ServerContext* context,
                                              const pb::OpenAccountRequest* request,
                                              pb::Account* response) {
  absl::StatusOr<Account> account = ledger_.OpenAccount(BearerToken(*context), request->currency(),
                                                        AnswerBy(*context, default_call_timeout_));
  if (!account.ok()) return ToGrpcStatus(account.status());
  ToProto(*account, response);
  return grpc::Status::OK;
}

grpc::Status TransactionHandlers::GetAccount(grpc::ServerContext* context,
                                             const pb::GetAccountRequest* request,
                                             pb::Account* response) {
  absl::StatusOr<Account> account = ledger_.GetAccount(BearerToken(*context), request->account_id(),
                                                       AnswerBy(*context, default_call_timeout_));
  if (!account.ok()) return ToGrpcStatus(account.status());
  ToProto(*account, response);
  return grpc::Status::OK;
}

grpc::Status TransactionHandlers::Deposit(grpc::ServerContext* context,
                                          const pb::DepositRequest* request,
                                          pb::Transaction* response) {
  DepositParams params;
  params.account_id = request->account_id();
  params.amount_minor = request->amount_minor();
  params.idempotency_key = request->idempotency_key();
  absl::StatusOr<Transaction> transaction =
      ledger_.Deposit(BearerToken(*context), params, AnswerBy(*context, default_call_timeout_));
  if (!transaction.ok()) return ToGrpcStatus(transaction.status());
  ToProto(*transaction, response);
  return grpc::Status::OK;
}

grpc::Status TransactionHandlers::Transfer(grpc::ServerContext* context,
                                           const pb::TransferRequest* request,
                                           pb::Transaction* response) {
  TransferParams params;
  params.from_account_id = request->from_account_id();
  params.to_account_id = request->to_account_id();
  params.amount_minor = request->amount_minor();
  params.idempotency_key = request->idempotency_key();
  absl::StatusOr<Transaction> transaction =
      ledger_.Transfer(BearerToken(*context), params, AnswerBy(*context, default_call_timeout_));
  if (!transaction.ok()) return ToGrpcStatus(transaction.status());
  ToProto(*transaction, response);
  return grpc::Status::OK;
}

grpc::Status TransactionHandlers::ListTransactions(grpc::ServerContext* context,
                                                   const pb::ListTransactionsRequest* request,
                                                   pb::ListTransactionsResponse* response) {
  ListParams params;
  params.account_id = request->account_id();
  params.page_size = request->page_size();
  params.page_token = request->page_token();
  absl::StatusOr<ListResult> result = ledger_.ListTransactions(
      BearerToken(*context), params, AnswerBy(*context, default_call_timeout_));
  if (!result.ok()) return ToGrpcStatus(result.status());
  for (const Transaction& t : result->transactions) ToProto(t, response->add_transactions());
  response->set_next_page_token(result->next_page_token);
  return grpc::Status::OK;
}

}  // namespace sessionledger
