#include "client/output_format.h"

#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/time_util.h>

#include <algorithm>
#include <map>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace sessionledger::client {
namespace {

std::string Time(const google::protobuf::Timestamp& ts) {
  if (ts.seconds() == 0 && ts.nanos() == 0) return "-";
  return google::protobuf::util::TimeUtil::ToString(ts);
}

std::string OrDash(const std::string& s) { return s.empty() ? "-" : s; }

// Attributes sorted by key (protobuf maps have no order) as k=v, comma-separated.
std::string Attributes(const google::protobuf::Map<std::string, std::string>& attributes) {
  std::map<std::string, std::string> sorted(attributes.begin(), attributes.end());
  std::string out;
  for (const auto& [k, v] : sorted) {
    absl::StrAppend(&out, out.empty() ? "" : ", ", k, "=", v);
  }
  return out.empty() ? "-" : out;
}

}  // namespace

std::string ToJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  options.add_whitespace = true;
  std::string out;
  // Serialising a well-formed message cannot fail; an empty object is the safe fallback.
  if (!google::protobuf::util::MessageToJsonString(message, &out, options).ok()) out = "{}";
  if (out.empty() || out.back() != '\n') out.push_back('\n');
  return out;
}

std::string StatusCodeName(grpc::StatusCode code) {
  // gRPC and Abseil share the canonical code space and its names.
  std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? "UNKNOWN" : name;
}

std::string FormatTable(const std::vector<std::string>& header, const Rows& rows) {
  std::vector<size_t> widths(header.size(), 0);
  auto widen = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size() && i < widths.size(); ++i) {
      widths[i] = std::max(widths[i], row[i].size());
    }
  };
  widen(header);
  for (const auto& row : rows) widen(row);
  std::string out;
  auto append_row = [&](const std::vector<std::string>& row) {
    std::string line;
    for (size_t i = 0; i < row.size() && i < widths.size(); ++i) {
      line += row[i];
      // No padding after the last column, so lines carry no trailing blanks.
      if (i + 1 < row.size()) line.append(widths[i] - row[i].size() + 2, ' ');
    }
    absl::StrAppend(&out, line, "\n");
  };
  append_row(header);
  for (const auto& row : rows) append_row(row);
  return out;
}

std::string FormatFields(const std::vector<std::pair<std::string, std::string>>& fields) {
  size_t width = 0;
  for (const auto& [name, value] : fields) width = std::max(width, name.size());
  std::string out;
  for (const auto& [name, value] : fields) {
    absl::StrAppend(&out, name, std::string(width - name.size() + 2, ' '), value, "\n");
  }
  return out;
}

std::string FormatSession(const v1::Session& s) {
  std::vector<std::pair<std::string, std::string>> fields;
  if (!s.token().empty()) fields.emplace_back("token", s.token());
  fields.emplace_back("session_id", s.session_id());
  fields.emplace_back("user_id", s.user_id());
  fields.emplace_back("created_at", Time(s.created_at()));
  fields.emplace_back("expires_at", Time(s.expires_at()));
  fields.emplace_back("absolute_expires_at", Time(s.absolute_expires_at()));
  fields.emplace_back("ttl_seconds", absl::StrCat(s.ttl_seconds()));
  fields.emplace_back("version", absl::StrCat(s.version()));
  fields.emplace_back("attributes", Attributes(s.attributes()));
  return FormatFields(fields);
}

std::string FormatSessionList(const v1::ListUserSessionsResponse& response) {
  Rows rows;
  for (const v1::Session& s : response.sessions()) {
    rows.push_back({s.session_id(), s.user_id(), Time(s.created_at()), Time(s.expires_at()),
                    absl::StrCat(s.version()), Attributes(s.attributes())});
  }
  return absl::StrCat(
      FormatTable({"SESSION_ID", "USER_ID", "CREATED_AT", "EXPIRES_AT", "VERSION", "ATTRIBUTES"},
                  rows),
      "(", response.sessions_size(), " live sessions)\n");
}

std::string FormatAccount(const v1::Account& a) {
  return FormatFields({{"account_id", a.account_id()},
                       {"owner_user_id", a.owner_user_id()},
                       {"currency", a.currency()},
                       {"balance_minor", absl::StrCat(a.balance_minor())},
                       {"created_at", Time(a.created_at())}});
}

std::string FormatTransaction(const v1::Transaction& t) {
  return FormatFields({{"transaction_id", t.transaction_id()},
                       {"kind", t.kind()},
                       {"from_account_id", OrDash(t.from_account_id())},
                       {"to_account_id", t.to_account_id()},
                       {"amount_minor", absl::StrCat(t.amount_minor())},
                       {"currency", t.currency()},
                       {"created_at", Time(t.created_at())},
                       {"idempotency_key", t.idempotency_key()}});
}

std::string FormatTransactionList(const v1::ListTransactionsResponse& response) {
  Rows rows;
  for (const v1::Transaction& t : response.transactions()) {
    rows.push_back({Time(t.created_at()), t.kind(), absl::StrCat(t.amount_minor()), t.currency(),
                    OrDash(t.from_account_id()), t.to_account_id(), t.transaction_id()});
  }
  std::string out = FormatTable(
      {"CREATED_AT", "KIND", "AMOUNT_MINOR", "CURRENCY", "FROM", "TO", "TRANSACTION_ID"}, rows);
  if (!response.next_page_token().empty()) {
    absl::StrAppend(&out, "next page: --page-token ", response.next_page_token(), "\n");
  }
  return out;
}

std::string FormatHealth(const grpc::health::v1::HealthCheckResponse& response) {
  return absl::StrCat(grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()),
                      "\n");
}

}  // namespace sessionledger::client
