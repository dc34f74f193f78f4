#ifndef SESSIONLEDGER_CLIENT_OUTPUT_FORMAT_H_
#define SESSIONLEDGER_CLIENT_OUTPUT_FORMAT_H_

#include <google/protobuf/message.h>
#include <grpcpp/support/status_code_enum.h>

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"
#include "grpc/health/v1/health.pb.h"
#include "sessionledger/v1/session.pb.h"
#include "sessionledger/v1/transaction.pb.h"

namespace sessionledger::client {

// Protobuf JSON with the contract's field names (snake_case) and every field printed, zeros
// included, so scripts can rely on a field being there (`jq .balance_minor`). Ends with '\n'.
std::string ToJson(const google::protobuf::Message& message);

// "OK", "NOT_FOUND", ...: the canonical names, as in the contract and in bench output.
std::string StatusCodeName(grpc::StatusCode code);

// `text` fit to print on a terminal: a backslash becomes "\\", control characters become C
// escapes ("\n", "\t", "\x1b"), C1 controls and bidirectional overrides become "\u009b" and
// the like, and bytes that are not UTF-8 become "\xNN". Other UTF-8 passes unchanged. Values
// come from the server and, through it, from whoever set them (session attributes), so a
// value must not be able to break a row or send escape sequences to the terminal.
std::string EscapeForTerminal(absl::string_view text);

// Human-readable renderings; each ends with '\n'. Every cell and value is passed through
// EscapeForTerminal (JSON output has its own escaping).
using Rows = std::vector<std::vector<std::string>>;
// Left-aligned columns separated by two spaces; the header row is printed first.
std::string FormatTable(const std::vector<std::string>& header, const Rows& rows);
// One "name  value" line per field.
std::string FormatFields(const std::vector<std::pair<std::string, std::string>>& fields);

std::string FormatSession(const v1::Session& session);
std::string FormatSessionList(const v1::ListUserSessionsResponse& response);
std::string FormatAccount(const v1::Account& account);
std::string FormatTransaction(const v1::Transaction& transaction);
std::string FormatTransactionList(const v1::ListTransactionsResponse& response);
std::string FormatHealth(const grpc::health::v1::HealthCheckResponse& response);

}  // namespace sessionledger::client

#endif  // SESSIONLEDGER_CLIENT_OUTPUT_FORMAT_H_
