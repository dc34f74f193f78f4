#ifndef SESSIONLEDGER_SERVER_RPC_STATUS_MAPPING_H_
#define SESSIONLEDGER_SERVER_RPC_STATUS_MAPPING_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace sessionledger {

// What callers read of a failure of the server or of a backing service whose words were not
// written for them (see server/domain/caller_message.h).
inline constexpr char kBackingServiceFailed[] =
    "a backing service failed or did not answer in time; retry";
inline constexpr char kInternalFailure[] = "internal error";

// The one place where domain errors become gRPC statuses. Codes map one to one (absl and gRPC
// share the canonical code space); DEADLINE_EXCEEDED from a backing service is reported as
// UNAVAILABLE so that callers retry it, as the contract asks.
//
// A status marked by ForCallers gets those words, whatever its code; an unmarked failure of the
// server or of a backing service (UNAVAILABLE, INTERNAL, UNKNOWN, DATA_LOSS) a generic message.
// Either way the whole message rides in error_details for the call's log line: CallObserver
// logs it and takes it out before the status is sent, so callers never read a backing
// service's words (hosts, the database user, SQL). An unmarked status of another code keeps
// its message, which the domain wrote for the caller.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_STATUS_MAPPING_H_
