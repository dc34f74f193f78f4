#ifndef SESSIONLEDGER_SERVER_LEDGER_LEDGER_SERVICE_H_
#define SESSIONLEDGER_SERVER_LEDGER_LEDGER_SERVICE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/domain/ledger_store.h"
#include "server/domain/token_authenticator.h"
#include "server/ledger/ledger_rules.h"

namespace sessionledger {

struct DepositParams {
  std::string account_id;
  int64_t amount_minor = 0;
  std::string idempotency_key;
};

struct TransferParams {
  std::string from_account_id;
  std::string to_account_id;
  int64_t amount_minor = 0;
  std::string idempotency_key;
};

struct ListParams {
  std::string account_id;
  int32_t page_size = 0;
  std::string page_token;
};

struct ListResult {
  std::vector<Transaction> transactions;
  std::string next_page_token;  // Empty on the last page.
};

// The ledger's rules: request validation, authentication, the contract's error order, the
// idempotency fingerprint and page tokens, over a LedgerStore. `session_token` is the bearer
// token from the call's metadata ("" when absent or malformed).
//
// Every method checks, in this order (the contract's): INVALID_ARGUMENT for the request's own
// shape (naming the field), UNAUTHENTICATED (via the TokenAuthenticator), then what the store
// finds: NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION. UNAVAILABLE when the session store
// or PostgreSQL cannot answer before `deadline`. Stateless apart from its two references;
// thread-safe.
struct LedgerLimits {
  size_t max_idempotency_key_bytes = kMaxIdempotencyKeyBytes;
};

class LedgerService {
 public:
  LedgerService(LedgerStore& store, TokenAuthenticator& authenticator, LedgerLimits limits = {})
      : store_(store), authenticator_(authenticator), limits_(limits) {}

  // INVALID_ARGUMENT bad currency; UNAUTHENTICATED; UNAVAILABLE.
  absl::StatusOr<Account> OpenAccount(absl::string_view session_token, absl::string_view currency,
                                      absl::Time deadline);
  // INVALID_ARGUMENT empty id; UNAUTHENTICATED; NOT_FOUND; PERMISSION_DENIED; UNAVAILABLE.
  absl::StatusOr<Account> GetAccount(absl::string_view session_token, absl::string_view account_id,
                                     absl::Time deadline);
  // As Transfer; PERMISSION_DENIED when the account is not the acting user's.
  absl::StatusOr<Transaction> Deposit(absl::string_view session_token, const DepositParams& params,
                                      absl::Time deadline);
  // INVALID_ARGUMENT (amount <= 0, same account, missing key, currency mismatch, overflow);
  // UNAUTHENTICATED; ALREADY_EXISTS (key reused with other parameters); NOT_FOUND;
  // PERMISSION_DENIED (source not the acting user's); FAILED_PRECONDITION (insufficient
  // funds); ABORTED (persistent serialization failures); UNAVAILABLE.
  absl::StatusOr<Transaction> Transfer(absl::string_view session_token,
                                       const TransferParams& params, absl::Time deadline);
  // INVALID_ARGUMENT (negative page_size; page token malformed, altered or for another
  // account); UNAUTHENTICATED; NOT_FOUND; PERMISSION_DENIED; UNAVAILABLE.
  absl::StatusOr<ListResult> ListTransactions(absl::string_view session_token,
                                              const ListParams& params, absl::Time deadline);

 private:
  absl::StatusOr<std::string> Authenticate(absl::string_view session_token, absl::Time deadline);

  LedgerStore& store_;
  TokenAuthenticator& authenticator_;
  const LedgerLimits limits_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_LEDGER_LEDGER_SERVICE_H_
