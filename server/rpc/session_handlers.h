#ifndef SESSIONLEDGER_SERVER_RPC_SESSION_HANDLERS_H_
#define SESSIONLEDGER_SERVER_RPC_SESSION_HANDLERS_H_

#include "sessionledger/v1/session.grpc.pb.h"

namespace sessionledger {

// sessionledger.v1.SessionService. Every method is UNIMPLEMENTED until the session layer lands.
class SessionHandlers final : public sessionledger::v1::SessionService::Service {};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_SESSION_HANDLERS_H_
