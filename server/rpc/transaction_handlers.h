#ifndef SESSIONLEDGER_SERVER_RPC_TRANSACTION_HANDLERS_H_
#define SESSIONLEDGER_SERVER_RPC_TRANSACTION_HANDLERS_H_

#include "sessionledger/v1/transaction.grpc.pb.h"

namespace sessionledger {

// sessionledger.v1.TransactionService. Every method is UNIMPLEMENTED until the ledger lands.
class TransactionHandlers final : public sessionledger::v1::TransactionService::Service {};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_TRANSACTION_HANDLERS_H_
