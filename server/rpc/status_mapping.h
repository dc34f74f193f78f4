#ifndef SESSIONLEDGER_SERVER_RPC_STATUS_MAPPING_H_
#define SESSIONLEDGER_SERVER_RPC_STATUS_MAPPING_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace sessionledger {

// The one place where domain errors become gRPC statuses. Codes map one to one (absl and gRPC
// share the canonical code space); DEADLINE_EXCEEDED from a backing service is reported as
// UNAVAILABLE so that callers retry it, as the contract asks.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_STATUS_MAPPING_H_
