#ifndef SESSIONLEDGER_SERVER_RPC_INVALID_UTF8_H_
#define SESSIONLEDGER_SERVER_RPC_INVALID_UTF8_H_

#include <google/protobuf/descriptor.h>

#include <optional>
#include <string>

#include "absl/strings/string_view.h"

namespace sessionledger {

// Which proto3 string field of a request made it unparsable, so that the answer can name it.
// Protobuf refuses a proto3 string that is not valid UTF-8 by failing the whole parse, and says
// which field only in a log line; these functions recover the field from the request's bytes
// (FindInvalidUtf8Field) or from that log line's field name (InvalidUtf8FieldFromFullName).
// All of them are pure and thread-safe.
struct InvalidUtf8Field {
  enum class Part {
    kString,    // `path` is the string itself.
    kMapKey,    // A key of the map at `path`.
    kMapValue,  // A value of the map at `path`, under a key that is not shown.
  };
  // Field names from the request message down, separated by '.'; a repeated field's element
  // has its index ("remove[1]"), a map's value its key when that is short printable ASCII
  // (`attributes["theme"]`). Never any of the invalid bytes.
  std::string path;
  Part part = Part::kString;
};

// "user_id: not valid UTF-8", "attributes: a key is not valid UTF-8", ...: the message of the
// INVALID_ARGUMENT answer, in the form the domain's validators use ("<field>: <problem>").
std::string InvalidUtf8Message(const InvalidUtf8Field& field);

// Reads `bytes` as a serialized `type` and returns the first proto3 string field, in wire
// order, that is not valid UTF-8: a singular or repeated string, a map's key or value, or a
// string inside a nested message (or a map's message value) at any depth. That is the field
// protobuf's parser stopped at, as it too parses in wire order and fails at the first problem.
// Unknown fields, fields of other types and fields whose wire type does not match are skipped,
// as the parser skips them; proto2 strings are not checked, as the parser does not check them.
// Returns nothing when every such string is valid, and when the bytes are malformed before the
// first invalid string is reached (truncated, a bad tag or length, an unbalanced group, or
// messages nested deeper than kMaxInvalidUtf8Depth): then the request is garbled in some other
// way, which the generic answer covers. Any bytes are safe to pass: nothing is allocated per
// byte, and the recursion is bounded.
std::optional<InvalidUtf8Field> FindInvalidUtf8Field(const google::protobuf::Descriptor& type,
                                                     absl::string_view bytes);

// Protobuf's own limit on nesting (CodedInputStream's default recursion limit), so that the
// walker gives up where the parser does.
inline constexpr int kMaxInvalidUtf8Depth = 100;

// The field that protobuf named in its complaint, e.g. "sessionledger.v1.TransferRequest.
// idempotency_key" or "sessionledger.v1.CreateSessionRequest.AttributesEntry.key", as a field
// of `request`: the field itself when `request` declares it, or the key or value of one of
// `request`'s map fields. The log line has no indexes or map keys, so repeated elements and map
// values are named without them. Nothing for any other field, including one of a nested
// message: the line names only the message type that declares it, which may be reachable from
// `request` along several paths, and a wrong path would be worse than none.
std::optional<InvalidUtf8Field> InvalidUtf8FieldFromFullName(
    const google::protobuf::Descriptor& request, absl::string_view full_name);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_INVALID_UTF8_H_
