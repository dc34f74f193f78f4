#include "server/ledger/ledger_service.h"

#include <limits>
#include <optional>

#include "absl/strings/str_cat.h"
#include "server/common/status_macros.h"
#include "server/domain/caller_message.h"
#include "server/ledger/ledger_rules.h"
#include "server/ledger/page_token.h"

namespace sessionledger {
namespace {

absl::Status RequireNonEmpty(absl::string_view value, absl::string_view field) {
  if (value.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": required"));
  }
  return absl::OkStatus();
}

absl::Status ValidateAmount(int64_t amount_minor) {
  if (amount_minor <= 0) {
    return absl::InvalidArgumentError("amount_minor: must be greater than 0");
  }
  return absl::OkStatus();
}

// Account ids that are not UUIDs cannot exist.
absl::StatusOr<std::string> ExistingAccountId(absl::string_view id, absl::string_view field) {
  std::optional<std::string> canonical = CanonicalUuid(id);
  if (!canonical.has_value()) {
    return absl::NotFoundError(absl::StrCat(field, ": no such account"));
  }
  return *std::move(canonical);
}

}  // namespace

absl::StatusOr<std::string> LedgerService::Authenticate(absl::string_view session_token,
                                                        absl::Time deadline) {
  if (session_token.empty()) {
    return absl::UnauthenticatedError(
        "authorization: missing or malformed; send `authorization: Bearer <session token>`");
  }
  absl::StatusOr<std::string> user = authenticator_.UserIdForToken(session_token, deadline);
  if (user.ok()) return user;
  switch (user.status().code()) {
    case absl::StatusCode::kUnauthenticated:
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
      return user.status();
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kPermissionDenied:
      // Codes the interface does not promise but whose meaning is clear: the token names no
      // live session. The caller must see UNAUTHENTICATED, not an account-level NOT_FOUND.
      return absl::UnauthenticatedError("authorization: unknown or expired session token");
    default:
      // Anything else means the session store is unusable: a transient outage to the caller.
      return ForCallers(absl::StatusCode::kUnavailable,
                        "authorization: the session store failed; retry", user.status());
  }
}

absl::StatusOr<Account> LedgerService::OpenAccount(absl::string_view session_token,
                                                   absl::string_view currency,
                                                   absl::Time deadline) {
  SL_RETURN_IF_ERROR(ValidateCurrency(currency));
  SL_ASSIGN_OR_RETURN(const std::string user, Authenticate(session_token, deadline));
  return store_.CreateAccount(user, currency, deadline);
}

absl::StatusOr<Account> LedgerService::GetAccount(absl::string_view session_token,
                                                  absl::string_view account_id,
                                                  absl::Time deadline) {
  SL_RETURN_IF_ERROR(RequireNonEmpty(account_id, "account_id"));
  SL_ASSIGN_OR_RETURN(const std::string user, Authenticate(session_token, deadline));
  SL_ASSIGN_OR_RETURN(const std::string id, ExistingAccountId(account_id, "account_id"));
  SL_ASSIGN_OR_RETURN(Account account, store_.GetAccount(id, deadline));
  if (account.owner_user_id != user) {
    return absl::PermissionDeniedError("account_id: not an account of the acting user");
  }
  return account;
}

absl::StatusOr<Transaction> LedgerService::Deposit(absl::string_view session_token,
                                                   const DepositParams& params,
                                                   absl::Time deadline) {
  SL_RETURN_IF_ERROR(RequireNonEmpty(params.account_id, "account_id"));
  SL_RETURN_IF_ERROR(ValidateAmount(params.amount_minor));
  SL_RETURN_IF_ERROR(
      ValidateIdempotencyKey(params.idempotency_key, limits_.max_idempotency_key_bytes));
  SL_ASSIGN_OR_RETURN(std::string user, Authenticate(session_token, deadline));
  SL_ASSIGN_OR_RETURN(std::string to, ExistingAccountId(params.account_id, "account_id"));
  MoneyMovement movement;
  movement.acting_user_id = std::move(user);
  movement.idempotency_key = params.idempotency_key;
  movement.kind = TransactionKind::kDeposit;
  movement.fingerprint = MovementFingerprint(movement.kind, "", to, params.amount_minor);
  movement.to_account_id = std::move(to);
  movement.amount_minor = params.amount_minor;
  return store_.ApplyMovement(movement, deadline);
}

absl::StatusOr<Transaction> LedgerService::Transfer(absl::string_view session_token,
                                                    const TransferParams& params,
                                                    absl::Time deadline) {
  SL_RETURN_IF_ERROR(RequireNonEmpty(params.from_account_id, "from_account_id"));
  SL_RETURN_IF_ERROR(RequireNonEmpty(params.to_account_id, "to_account_id"));
  // Compare canonical forms, so that one account spelt in two letter cases is still "same".
  const std::optional<std::string> from_canonical = CanonicalUuid(params.from_account_id);
  const std::optional<std::string> to_canonical = CanonicalUuid(params.to_account_id);
  if (from_canonical.value_or(params.from_account_id) ==
      to_canonical.value_or(params.to_account_id)) {
    return absl::InvalidArgumentError("to_account_id: must differ from from_account_id");
  }
  SL_RETURN_IF_ERROR(ValidateAmount(params.amount_minor));
  SL_RETURN_IF_ERROR(
      ValidateIdempotencyKey(params.idempotency_key, limits_.max_idempotency_key_bytes));
  SL_ASSIGN_OR_RETURN(std::string user, Authenticate(session_token, deadline));
  SL_ASSIGN_OR_RETURN(std::string from,
                      ExistingAccountId(params.from_account_id, "from_account_id"));
  SL_ASSIGN_OR_RETURN(std::string to, ExistingAccountId(params.to_account_id, "to_account_id"));
  MoneyMovement movement;
  movement.acting_user_id = std::move(user);
  movement.idempotency_key = params.idempotency_key;
  movement.kind = TransactionKind::kTransfer;
  movement.fingerprint = MovementFingerprint(movement.kind, from, to, params.amount_minor);
  movement.from_account_id = std::move(from);
  movement.to_account_id = std::move(to);
  movement.amount_minor = params.amount_minor;
  return store_.ApplyMovement(movement, deadline);
}

absl::StatusOr<ListResult> LedgerService::ListTransactions(absl::string_view session_token,
                                                           const ListParams& params,
                                                           absl::Time deadline) {
  SL_RETURN_IF_ERROR(RequireNonEmpty(params.account_id, "account_id"));
  SL_ASSIGN_OR_RETURN(const int page_size, EffectivePageSize(params.page_size));
  const std::optional<std::string> canonical = CanonicalUuid(params.account_id);
  int64_t before_seq = std::numeric_limits<int64_t>::max();
  if (!params.page_token.empty()) {
    SL_ASSIGN_OR_RETURN(const PageCursor cursor, DecodePageToken(params.page_token));
    if (!canonical.has_value() || cursor.account_id != *canonical) {
      return absl::InvalidArgumentError("page_token: made for another account");
    }
    before_seq = cursor.last_seq;
  }
  SL_ASSIGN_OR_RETURN(const std::string user, Authenticate(session_token, deadline));
  if (!canonical.has_value()) return absl::NotFoundError("account_id: no such account");
  SL_ASSIGN_OR_RETURN(TransactionPage page,
                      store_.ListTransactions(user, *canonical, before_seq, page_size, deadline));
  ListResult result;
  if (page.more && !page.transactions.empty()) {
    result.next_page_token = EncodePageToken({*canonical, page.transactions.back().seq});
  }
  result.transactions = std::move(page.transactions);
  return result;
}

}  // namespace sessionledger
