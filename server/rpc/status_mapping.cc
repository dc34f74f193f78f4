#include "server/rpc/status_mapping.h"

#include <optional>
#include <string>

#include "server/domain/caller_message.h"

namespace sessionledger {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  const grpc::StatusCode code = status.code() == absl::StatusCode::kDeadlineExceeded
                                    ? grpc::StatusCode::UNAVAILABLE
                                    : static_cast<grpc::StatusCode>(status.code());
  std::string whole(status.message());
  std::optional<std::string> for_callers = CallerMessage(status);
  if (!for_callers.has_value()) {
    switch (code) {
      case grpc::StatusCode::UNAVAILABLE:
        for_callers = kBackingServiceFailed;
        break;
      case grpc::StatusCode::INTERNAL:
      case grpc::StatusCode::UNKNOWN:
      case grpc::StatusCode::DATA_LOSS:
        for_callers = kInternalFailure;
        break;
      default:
        return grpc::Status(code, whole);
    }
  }
  if (*for_callers == whole) return grpc::Status(code, whole);
  return grpc::Status(code, *for_callers, whole);
}

}  // namespace sessionledger
