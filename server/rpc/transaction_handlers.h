#ifndef SESSIONLEDGER_SERVER_RPC_TRANSACTION_HANDLERS_H_
#define SESSIONLEDGER_SERVER_RPC_TRANSACTION_HANDLERS_H_

#include <memory>
#include <string>

#include "absl/time/time.h"
#include "server/domain/ledger_store.h"
#include "server/domain/token_authenticator.h"
#include "server/ledger/ledger_service.h"
#include "sessionledger/v1/transaction.grpc.pb.h"

namespace sessionledger {

// The session token of `authorization: Bearer <token>` metadata; "" when the header is
// missing or not of that form (LedgerService then answers UNAUTHENTICATED). The scheme is
// matched case-insensitively (RFC 6750).
std::string BearerToken(const grpc::ServerContext& context);

// sessionledger.v1.TransactionService: proto <-> domain only. Rules live in LedgerService;
// errors become grpc::Status through ToGrpcStatus. Every call's deadline is the caller's, or
// now + `default_call_timeout` when it set none, and is passed down to the stores. Holds no
// per-request state; thread-safe. The store and authenticator must outlive it.
class TransactionHandlers final : public sessionledger::v1::TransactionService::Service {
 public:
  TransactionHandlers(LedgerStore& store, TokenAuthenticator& authenticator,
                      absl::Duration default_call_timeout)
      : ledger_(store, authenticator), default_call_timeout_(default_call_timeout) {}
  // The same, owning the store and the authenticator (how the server wires it).
  TransactionHandlers(std::unique_ptr<LedgerStore> store,
                      std::unique_ptr<TokenAuthenticator> authenticator,
                      absl::Duration default_call_timeout, LedgerLimits limits = {})
      : owned_store_(std::move(store)),
        owned_authenticator_(std::move(authenticator)),
        ledger_(*owned_store_, *owned_authenticator_, limits),
        default_call_timeout_(default_call_timeout) {}

  grpc::Status OpenAccount(grpc::ServerContext* context,
                           const sessionledger::v1::OpenAccountRequest* request,
                           sessionledger::v1::Account* response) override;
  grpc::Status GetAccount(grpc::ServerContext* context,
                          const sessionledger::v1::GetAccountRequest* request,
                          sessionledger::v1::Account* response) override;
  grpc::Status Deposit(grpc::ServerContext* context,
                       const sessionledger::v1::DepositRequest* request,
                       sessionledger::v1::Transaction* response) override;
  grpc::Status Transfer(grpc::ServerContext* context,
                        const sessionledger::v1::TransferRequest* request,
                        sessionledger::v1::Transaction* response) override;
  grpc::Status ListTransactions(grpc::ServerContext* context,
                                const sessionledger::v1::ListTransactionsRequest* request,
                                sessionledger::v1::ListTransactionsResponse* response) override;

 private:
  // Declared before ledger_, which refers to them.
  std::unique_ptr<LedgerStore> owned_store_;
  std::unique_ptr<TokenAuthenticator> owned_authenticator_;
  LedgerService ledger_;
  const absl::Duration default_call_timeout_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_TRANSACTION_HANDLERS_H_
