#include "client/output_format.h"

#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/time_util.h>

#include <algorithm>
#include <cstdint>
#include <map>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace sessionledger::client {
namespace {

std::string Time(const google::protobuf::Timestamp& ts) {
  if (ts.seconds() == 0 && ts.nanos() == 0) return "-";
  return google::protobuf::util::TimeUtil::ToString(ts);
}

std::string OrDash(const std::string& s) { return s.empty() ? "-" : s; }

// A key or value as one unambiguous piece of a k=v list: in double quotes (an inner quote
// doubled) when it is empty, has a comma, '=' or quote, or starts or ends with a space.
// Otherwise the value "x, role=admin" would read as a second attribute.
std::string AttributePiece(const std::string& text) {
  const bool plain = !text.empty() && text.find_first_of(",=\"") == std::string::npos &&
                     text.front() != ' ' && text.back() != ' ';
  if (plain) return text;
  std::string quoted = "\"";
  for (char c : text) {
    if (c == '"') quoted.push_back('"');
    quoted.push_back(c);
  }
  quoted.push_back('"');
  return quoted;
}

// Attributes sorted by key (protobuf maps have no order) as k=v, comma-separated.
std::string Attributes(const google::protobuf::Map<std::string, std::string>& attributes) {
  std::map<std::string, std::string> sorted(attributes.begin(), attributes.end());
  std::string out;
  for (const auto& [k, v] : sorted) {
    absl::StrAppend(&out, out.empty() ? "" : ", ", AttributePiece(k), "=", AttributePiece(v));
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

std::string EscapeForTerminal(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  auto code_point = [&](uint32_t c) { absl::StrAppend(&out, absl::StrFormat("\\u%04x", c)); };
  size_t i = 0;
  while (i < text.size()) {
    const unsigned char byte = static_cast<unsigned char>(text[i]);
    if (byte < 0x80) {
      switch (byte) {
        case '\\':
          out += "\\\\";
          break;
        case '\n':
          out += "\\n";
          break;
        case '\r':
          out += "\\r";
          break;
        case '\t':
          out += "\\t";
          break;
        default:
          if (byte < 0x20 || byte == 0x7f) {
            absl::StrAppend(&out, absl::StrFormat("\\x%02x", byte));
          } else {
            out.push_back(static_cast<char>(byte));
          }
      }
      ++i;
      continue;
    }
    // A multi-byte UTF-8 sequence: copied when well formed and not a control character.
    const size_t length = byte >= 0xf0 ? 4 : byte >= 0xe0 ? 3 : byte >= 0xc0 ? 2 : 0;
    uint32_t c = length == 4 ? byte & 0x07u : length == 3 ? byte & 0x0fu : byte & 0x1fu;
    bool well_formed = length != 0 && byte < 0xf5 && i + length <= text.size();
    for (size_t k = 1; well_formed && k < length; ++k) {
      const unsigned char next = static_cast<unsigned char>(text[i + k]);
      well_formed = (next & 0xc0) == 0x80;
      c = (c << 6) | (next & 0x3fu);
    }
    // Overlong forms and surrogates are not UTF-8; terminals may still act on them.
    well_formed = well_formed &&
                  c >= (length == 2   ? 0x80u
                        : length == 3 ? 0x800u
                                      : 0x10000u) &&
                  c <= 0x10ffff && !(c >= 0xd800 && c <= 0xdfff);
    if (!well_formed) {
      absl::StrAppend(&out, absl::StrFormat("\\x%02x", byte));
      ++i;
      continue;
    }
    // C1 controls (U+0080..U+009F, e.g. U+009B, a one-character CSI) and the bidirectional
    // overrides and isolates, which reorder what the terminal shows.
    if (c <= 0x9f || (c >= 0x202a && c <= 0x202e) || (c >= 0x2066 && c <= 0x2069)) {
      code_point(c);
    } else {
      out.append(text.data() + i, length);
    }
    i += length;
  }
  return out;
}

std::string FormatTable(const std::vector<std::string>& raw_header, const Rows& raw_rows) {
  auto escape_row = [](const std::vector<std::string>& row) {
    std::vector<std::string> escaped;
    escaped.reserve(row.size());
    for (const std::string& cell : row) escaped.push_back(EscapeForTerminal(cell));
    return escaped;
  };
  const std::vector<std::string> header = escape_row(raw_header);
  Rows rows;
  rows.reserve(raw_rows.size());
  for (const auto& row : raw_rows) rows.push_back(escape_row(row));

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

std::string FormatFields(const std::vector<std::pair<std::string, std::string>>& raw_fields) {
  std::vector<std::pair<std::string, std::string>> fields;
  fields.reserve(raw_fields.size());
  for (const auto& [name, value] : raw_fields) {
    fields.emplace_back(EscapeForTerminal(name), EscapeForTerminal(value));
  }
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
    absl::StrAppend(&out, "next page: --page-token ", EscapeForTerminal(response.next_page_token()),
                    "\n");
  }
  return out;
}

std::string FormatHealth(const grpc::health::v1::HealthCheckResponse& response) {
  return absl::StrCat(grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()),
                      "\n");
}

}  // namespace sessionledger::client
