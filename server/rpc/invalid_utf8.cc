#include "server/rpc/invalid_utf8.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/wire_format_lite.h>

#include <climits>
#include <cstdint>
#include <map>

#include "absl/strings/str_cat.h"
#include "server/common/utf8.h"

namespace sessionledger {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::FileDescriptor;
using google::protobuf::internal::WireFormatLite;
using google::protobuf::io::CodedInputStream;

// Protobuf 3.21 checks UTF-8 exactly for the string fields of proto3 files (map entries are
// declared in their map's file); proto2 strings are parsed unchecked.
bool MustBeUtf8(const FieldDescriptor& field) {
  return field.type() == FieldDescriptor::TYPE_STRING &&
         field.file()->syntax() == FileDescriptor::SYNTAX_PROTO3;
}

// Whether the parser checks what `tag` carries for `field` (nullptr: unknown): a proto3 string,
// or a message that may hold one, sent length-delimited as declared.
bool IsChecked(const FieldDescriptor* field, uint32_t tag) {
  return field != nullptr &&
         WireFormatLite::GetTagWireType(tag) == WireFormatLite::WIRETYPE_LENGTH_DELIMITED &&
         (MustBeUtf8(*field) || field->type() == FieldDescriptor::TYPE_MESSAGE);
}

// How a map's value is shown in a path: `["key"]` for a key that is short printable ASCII
// without quotes or backslashes (what attribute names are), nothing otherwise: a key is the
// client's text, so only one that needs no escaping, and cannot flood a log line, is echoed.
std::optional<std::string> ShownKey(absl::string_view key) {
  constexpr size_t kMaxShownKey = 64;
  if (key.empty() || key.size() > kMaxShownKey) return std::nullopt;
  for (const char c : key) {
    if (c < 0x20 || c > 0x7E || c == '"' || c == '\\') return std::nullopt;
  }
  return absl::StrCat("[\"", key, "\"]");
}

// One pass over a request's bytes. Each Walk* function consumes one message (or map entry) up
// to the stream's current limit.
class Walker {
 public:
  explicit Walker(absl::string_view bytes)
      : bytes_(bytes),
        in_(reinterpret_cast<const uint8_t*>(bytes.data()), static_cast<int>(bytes.size())) {
    in_.SetRecursionLimit(kMaxInvalidUtf8Depth);
  }

  enum class Result {
    kValid,      // Every checked string is valid UTF-8.
    kFound,      // found() holds the first that is not.
    kMalformed,  // The bytes are garbled before any invalid string.
  };

  Result WalkTop(const Descriptor& type) {
    const CodedInputStream::Limit limit = in_.PushLimit(static_cast<int>(bytes_.size()));
    const Result result = WalkMessage(type);
    in_.PopLimit(limit);
    return result;
  }

  InvalidUtf8Field& found() { return found_; }

 private:
  // `path_` holds the path of the message being walked, with a trailing '.' unless empty.
  Result WalkMessage(const Descriptor& type) {
    // Indexes of repeated fields' elements seen so far in this message, by field number.
    std::map<int, int> elements;
    while (true) {
      const uint32_t tag = in_.ReadTag();
      if (tag == 0) {
        // The end of the message, or a tag of 0 (or an unreadable one) before it.
        return in_.BytesUntilLimit() == 0 ? Result::kValid : Result::kMalformed;
      }
      const FieldDescriptor* field =
          type.FindFieldByNumber(static_cast<int>(WireFormatLite::GetTagFieldNumber(tag)));
      if (!IsChecked(field, tag)) {
        if (!SkipUnchecked(tag)) return Result::kMalformed;
        continue;
      }
      const size_t path_size = path_.size();
      path_ += field->name();
      if (field->is_repeated() && !field->is_map()) {
        absl::StrAppend(&path_, "[", elements[field->number()]++, "]");
      }
      const Result result = field->is_map()      ? WalkMapEntry(*field)
                            : MustBeUtf8(*field) ? WalkString(InvalidUtf8Field::Part::kString)
                                                 : WalkNested(*field->message_type());
      path_.resize(path_size);
      if (result != Result::kValid) return result;
    }
  }

  // Reads a length-delimited string whose path is path_ (`part` of it).
  Result WalkString(InvalidUtf8Field::Part part) {
    absl::string_view value;
    if (!ReadLengthDelimited(&value)) return Result::kMalformed;
    if (IsValidUtf8(value)) return Result::kValid;
    found_ = InvalidUtf8Field{path_, part};
    return Result::kFound;
  }

  // Unknown, of another type, or of another wire type: the parser keeps the field as an
  // unknown one, unchecked. False when `tag` cannot start a field: field number 0 does not
  // exist, and an end-group tag ends only a group, which is skipped whole. (SkipField counts
  // groups against the recursion limit.)
  bool SkipUnchecked(uint32_t tag) {
    return WireFormatLite::GetTagFieldNumber(tag) != 0 &&
           WireFormatLite::GetTagWireType(tag) != WireFormatLite::WIRETYPE_END_GROUP &&
           WireFormatLite::SkipField(&in_, tag);
  }

  // Runs `walk` over the length-delimited message (or map entry) that comes next, within its
  // length and one level deeper: the same budget as the parser's (and as groups skipped
  // inside), so deeper is malformed.
  template <typename Walk>
  Result InNested(Walk walk) {
    int length;
    if (!in_.ReadVarintSizeAsInt(&length) || length > in_.BytesUntilLimit() ||
        !in_.IncrementRecursionDepth()) {
      return Result::kMalformed;
    }
    const CodedInputStream::Limit limit = in_.PushLimit(length);
    const Result result = walk();
    in_.PopLimit(limit);
    in_.DecrementRecursionDepth();
    return result;
  }

  Result WalkNested(const Descriptor& type) {
    const size_t path_size = path_.size();
    path_.push_back('.');
    const Result result = InNested([&] { return WalkMessage(type); });
    path_.resize(path_size);
    return result;
  }

  // One entry (key = 1, value = 2) of the map `map`, whose name path_ ends with. The parser
  // reads the whole entry, then checks the key, then the value (a message value is parsed, and
  // so checked, where it comes); so does this.
  Result WalkMapEntry(const FieldDescriptor& map) {
    const Descriptor& entry = *map.message_type();
    return InNested([&] { return WalkMapEntryFields(*entry.map_key(), *entry.map_value()); });
  }

  Result WalkMapEntryFields(const FieldDescriptor& key_field, const FieldDescriptor& value_field) {
    // A field may repeat inside an entry; the last one counts, as for any singular field.
    std::optional<absl::string_view> key;  // Set only when the key is a string.
    std::optional<absl::string_view> value;
    while (true) {
      const uint32_t tag = in_.ReadTag();
      if (tag == 0) {
        if (in_.BytesUntilLimit() != 0) return Result::kMalformed;
        break;
      }
      const int number = static_cast<int>(WireFormatLite::GetTagFieldNumber(tag));
      const FieldDescriptor* field = number == key_field.number()     ? &key_field
                                     : number == value_field.number() ? &value_field
                                                                      : nullptr;
      if (!IsChecked(field, tag)) {
        if (!SkipUnchecked(tag)) return Result::kMalformed;
        continue;
      }
      if (field->type() == FieldDescriptor::TYPE_MESSAGE) {
        // Only a value can be a message. It is named by the key read so far, if there is one
        // that can be shown; otherwise an invalid string in it is "a value" of the map.
        const std::optional<std::string> shown =
            key.has_value() && IsValidUtf8(*key) ? ShownKey(*key) : std::nullopt;
        const size_t path_size = path_.size();
        if (shown.has_value()) path_ += *shown;
        const Result result = WalkNested(*field->message_type());
        path_.resize(path_size);
        if (result == Result::kFound && !shown.has_value()) {
          found_ = InvalidUtf8Field{path_, InvalidUtf8Field::Part::kMapValue};
        }
        if (result != Result::kValid) return result;
        continue;
      }
      absl::string_view text;
      if (!ReadLengthDelimited(&text)) return Result::kMalformed;
      (field == &key_field ? key : value) = text;
    }
    if (key.has_value() && !IsValidUtf8(*key)) {
      found_ = InvalidUtf8Field{path_, InvalidUtf8Field::Part::kMapKey};
      return Result::kFound;
    }
    if (value.has_value() && !IsValidUtf8(*value)) {
      const std::optional<std::string> shown = key.has_value() ? ShownKey(*key) : std::nullopt;
      found_ = shown.has_value() ? InvalidUtf8Field{path_ + *shown, InvalidUtf8Field::Part::kString}
                                 : InvalidUtf8Field{path_, InvalidUtf8Field::Part::kMapValue};
      return Result::kFound;
    }
    return Result::kValid;
  }

  // A length and that many bytes, seen in place: the walker copies nothing.
  bool ReadLengthDelimited(absl::string_view* out) {
    int length;
    if (!in_.ReadVarintSizeAsInt(&length)) return false;
    if (length > in_.BytesUntilLimit()) return false;
    const int position = in_.CurrentPosition();
    if (!in_.Skip(length)) return false;
    *out = bytes_.substr(static_cast<size_t>(position), static_cast<size_t>(length));
    return true;
  }

  const absl::string_view bytes_;
  CodedInputStream in_;
  std::string path_;
  InvalidUtf8Field found_;
};

}  // namespace

std::string InvalidUtf8Message(const InvalidUtf8Field& field) {
  switch (field.part) {
    case InvalidUtf8Field::Part::kMapKey:
      return absl::StrCat(field.path, ": a key is not valid UTF-8");
    case InvalidUtf8Field::Part::kMapValue:
      return absl::StrCat(field.path, ": a value is not valid UTF-8");
    case InvalidUtf8Field::Part::kString:
      break;
  }
  return absl::StrCat(field.path, ": not valid UTF-8");
}

std::optional<InvalidUtf8Field> FindInvalidUtf8Field(const Descriptor& type,
                                                     absl::string_view bytes) {
  // CodedInputStream counts in int; gRPC's message limit keeps requests far below this.
  if (bytes.size() > static_cast<size_t>(INT_MAX)) return std::nullopt;
  Walker walker(bytes);
  if (walker.WalkTop(type) != Walker::Result::kFound) return std::nullopt;
  return std::move(walker.found());
}

std::optional<InvalidUtf8Field> InvalidUtf8FieldFromFullName(const Descriptor& request,
                                                             absl::string_view full_name) {
  const size_t dot = full_name.rfind('.');
  if (dot == absl::string_view::npos) return std::nullopt;
  const absl::string_view type_name = full_name.substr(0, dot);
  const absl::string_view field_name = full_name.substr(dot + 1);
  if (type_name == request.full_name()) {
    const FieldDescriptor* field = request.FindFieldByName(std::string(field_name));
    if (field == nullptr) return std::nullopt;
    return InvalidUtf8Field{field->name(), InvalidUtf8Field::Part::kString};
  }
  // A map's entry type is nested in the request type: "<request>.<Entry>.key" or ".value".
  for (int i = 0; i < request.field_count(); ++i) {
    const FieldDescriptor& map = *request.field(i);
    if (!map.is_map() || map.message_type()->full_name() != type_name) continue;
    if (field_name == "key") return InvalidUtf8Field{map.name(), InvalidUtf8Field::Part::kMapKey};
    if (field_name == "value") {
      return InvalidUtf8Field{map.name(), InvalidUtf8Field::Part::kMapValue};
    }
  }
  return std::nullopt;
}

}  // namespace sessionledger
