#ifndef SESSIONLEDGER_SERVER_DOMAIN_CALLER_MESSAGE_H_
#define SESSIONLEDGER_SERVER_DOMAIN_CALLER_MESSAGE_H_

#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/optional.h"

namespace sessionledger {

// Who may read an error's words. The stores' messages quote libpq, libmemcached and the
// network (host names, addresses, the database user, SQL): an operator needs them, a caller
// must not see them. So a failure of the server or of a backing service (UNAVAILABLE,
// INTERNAL, UNKNOWN, DATA_LOSS) reaches callers with a generic message (ToGrpcStatus) and its
// own words go to the call's log line, unless the domain wrote words for callers, which it
// marks with ForCallers. The message of the absl::Status stays whole either way, so tests and
// logs inside the process read everything.
inline constexpr char kCallerMessagePayload[] = "sessionledger.dev/caller-message";

// `code` with `for_callers` as the words callers get, and `cause`'s words after them, in
// parentheses, for the log only.
inline absl::Status ForCallers(absl::StatusCode code, absl::string_view for_callers,
                               const absl::Status& cause) {
  absl::Status status(code, absl::StrCat(for_callers, " (", cause.message(), ")"));
  status.SetPayload(kCallerMessagePayload, absl::Cord(for_callers));
  return status;
}

// `code` with a message written for callers, quoting no backing service.
inline absl::Status ForCallers(absl::StatusCode code, absl::string_view for_callers) {
  absl::Status status(code, for_callers);
  status.SetPayload(kCallerMessagePayload, absl::Cord(for_callers));
  return status;
}

// The words ForCallers marked for callers, if any.
inline std::optional<std::string> CallerMessage(const absl::Status& status) {
  absl::optional<absl::Cord> words = status.GetPayload(kCallerMessagePayload);
  if (!words.has_value()) return std::nullopt;
  return std::string(*words);
}

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_DOMAIN_CALLER_MESSAGE_H_
