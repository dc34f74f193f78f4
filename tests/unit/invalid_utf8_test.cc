#include "server/rpc/invalid_utf8.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>
#include <google/protobuf/text_format.h>

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "sessionledger/v1/session.pb.h"
#include "sessionledger/v1/transaction.pb.h"

namespace sessionledger {
namespace {

using google::protobuf::Descriptor;
using Part = InvalidUtf8Field::Part;

// Test types with every shape the walker distinguishes, built at run time so that no test proto
// needs compiling. Map fields are spelled out as protoc declares them: a repeated nested
// "<Name>Entry" with key = 1, value = 2 and map_entry set.
constexpr char kTestProto[] = R"pb(
  name: "walker_test.proto"
  package: "t"
  syntax: "proto3"
  message_type {
    name: "Node"
    field { name: "child" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".t.Node" }
    field { name: "text" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
  }
  message_type {
    name: "Inner"
    field { name: "name" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "tags" number: 2 label: LABEL_REPEATED type: TYPE_STRING }
  }
  message_type {
    name: "Outer"
    field { name: "id" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "items" number: 2 label: LABEL_REPEATED type: TYPE_STRING }
    field {
      name: "attrs"
      number: 3
      label: LABEL_REPEATED
      type: TYPE_MESSAGE
      type_name: ".t.Outer.AttrsEntry"
    }
    field { name: "inner" number: 4 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".t.Inner" }
    field {
      name: "inners"
      number: 5
      label: LABEL_REPEATED
      type: TYPE_MESSAGE
      type_name: ".t.Inner"
    }
    field {
      name: "by_name"
      number: 6
      label: LABEL_REPEATED
      type: TYPE_MESSAGE
      type_name: ".t.Outer.ByNameEntry"
    }
    field { name: "blob" number: 7 label: LABEL_OPTIONAL type: TYPE_BYTES }
    field { name: "n" number: 8 label: LABEL_OPTIONAL type: TYPE_INT64 }
    field { name: "node" number: 9 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".t.Node" }
    field {
      name: "by_number"
      number: 10
      label: LABEL_REPEATED
      type: TYPE_MESSAGE
      type_name: ".t.Outer.ByNumberEntry"
    }
    nested_type {
      name: "AttrsEntry"
      field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
      field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
      options { map_entry: true }
    }
    nested_type {
      name: "ByNameEntry"
      field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
      field {
        name: "value"
        number: 2
        label: LABEL_OPTIONAL
        type: TYPE_MESSAGE
        type_name: ".t.Inner"
      }
      options { map_entry: true }
    }
    nested_type {
      name: "ByNumberEntry"
      field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_INT32 }
      field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
      options { map_entry: true }
    }
  }
)pb";

// proto2 strings are not checked by the parser, so not by the walker either.
constexpr char kLegacyProto[] = R"pb(
  name: "legacy_test.proto"
  package: "t"
  syntax: "proto2"
  message_type {
    name: "Legacy"
    field { name: "text" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  }
)pb";

const google::protobuf::DescriptorPool& TestPool() {
  static const auto* const pool = [] {
    auto* built = new google::protobuf::DescriptorPool();
    for (const char* text : {kTestProto, kLegacyProto}) {
      google::protobuf::FileDescriptorProto file;
      const bool parsed = google::protobuf::TextFormat::ParseFromString(text, &file);
      const bool added = parsed && built->BuildFile(file) != nullptr;
      EXPECT_TRUE(added) << text;
    }
    return built;
  }();
  return *pool;
}

const Descriptor& Type(const std::string& name) {
  const Descriptor* type = TestPool().FindMessageTypeByName(name);
  EXPECT_NE(type, nullptr) << name;
  return *type;
}

// Wire format by hand, so that invalid UTF-8 goes in as it is.
std::string Varint(uint64_t value) {
  std::string out;
  while (value >= 0x80) {
    out.push_back(static_cast<char>(value | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
  return out;
}
std::string Len(int field, const std::string& bytes) {
  return absl::StrCat(Varint(static_cast<uint64_t>(field) << 3 | 2), Varint(bytes.size()), bytes);
}
std::string Int(int field, uint64_t value) {
  return absl::StrCat(Varint(static_cast<uint64_t>(field) << 3), Varint(value));
}
std::string Entry(const std::string& key, const std::string& value) {
  return absl::StrCat(Len(1, key), Len(2, value));
}

constexpr char kBad[] = "\xc3\x28";  // A broken continuation byte.

std::optional<std::string> Message(const Descriptor& type, const std::string& bytes) {
  const std::optional<InvalidUtf8Field> found = FindInvalidUtf8Field(type, bytes);
  if (!found.has_value()) return std::nullopt;
  return InvalidUtf8Message(*found);
}

TEST(InvalidUtf8Test, ValidMessagesHaveNone) {
  const Descriptor& outer = Type("t.Outer");
  EXPECT_EQ(Message(outer, ""), std::nullopt);
  const std::string all = absl::StrCat(
      Len(1, "id \xc3\xa9\xf0\x9f\x98\x80"), Len(2, "a"), Len(2, "b"), Len(3, Entry("k", "v")),
      Len(4, Len(1, "name")), Len(5, Len(2, "tag")), Len(6, Entry("n", Len(1, "x"))),
      Len(7, "\xff\xfe bytes are not text"), Int(8, 42), Len(9, Len(1, Len(2, "deep"))));
  EXPECT_EQ(Message(outer, all), std::nullopt);
}

TEST(InvalidUtf8Test, TopLevelString) {
  const Descriptor& outer = Type("t.Outer");
  EXPECT_EQ(Message(outer, Len(1, kBad)), "id: not valid UTF-8");
  EXPECT_EQ(Message(outer, absl::StrCat(Int(8, 1), Len(1, "ok"), Len(1, absl::StrCat("x", kBad)))),
            "id: not valid UTF-8");
  // Every kind of invalid sequence protobuf refuses.
  for (const std::string& bad :
       {std::string("\xff"), std::string("\xc0\xaf"), std::string("\xed\xa0\x80"),
        std::string("cut\xe2\x82"), std::string("\xf4\x90\x80\x80"), std::string("\x80")}) {
    EXPECT_EQ(Message(outer, Len(1, bad)), "id: not valid UTF-8");
  }
}

TEST(InvalidUtf8Test, TheRealRequestTypes) {
  EXPECT_EQ(Message(*v1::CreateSessionRequest::descriptor(), Len(1, kBad)),
            "user_id: not valid UTF-8");
  EXPECT_EQ(Message(*v1::TransferRequest::descriptor(),
                    absl::StrCat(Len(1, "a"), Len(2, "b"), Int(3, 5), Len(4, kBad))),
            "idempotency_key: not valid UTF-8");
  EXPECT_EQ(Message(*v1::UpdateSessionRequest::descriptor(),
                    absl::StrCat(Len(1, "tok"), Len(3, "a"), Len(3, kBad))),
            "remove[1]: not valid UTF-8");
}

TEST(InvalidUtf8Test, RepeatedStringsHaveTheirIndex) {
  const Descriptor& outer = Type("t.Outer");
  EXPECT_EQ(Message(outer, absl::StrCat(Len(2, "a"), Len(1, "id"), Len(2, "b"), Len(2, kBad))),
            "items[2]: not valid UTF-8");
}

TEST(InvalidUtf8Test, MapKeysAndValues) {
  const Descriptor& outer = Type("t.Outer");
  EXPECT_EQ(Message(outer, Len(3, Entry(kBad, "v"))), "attrs: a key is not valid UTF-8");
  // The key is checked before the value, as the parser does.
  EXPECT_EQ(Message(outer, Len(3, Entry(kBad, kBad))), "attrs: a key is not valid UTF-8");
  EXPECT_EQ(Message(outer, Len(3, Entry("theme", kBad))), "attrs[\"theme\"]: not valid UTF-8");
  // The value before the key on the wire is legal; the key still names it.
  EXPECT_EQ(Message(outer, Len(3, absl::StrCat(Len(2, kBad), Len(1, "theme")))),
            "attrs[\"theme\"]: not valid UTF-8");
  // A key that would need escaping, or is long, is not echoed.
  for (const std::string& key : {std::string("a\"b"), std::string("new\nline"),
                                 std::string(65, 'k'), std::string(), std::string("\xc3\xa9")}) {
    EXPECT_EQ(Message(outer, Len(3, Entry(key, kBad))), "attrs: a value is not valid UTF-8");
  }
  EXPECT_EQ(Message(outer, Len(3, Len(2, kBad))), "attrs: a value is not valid UTF-8");
  // Integer keys are not shown either.
  EXPECT_EQ(Message(outer, Len(10, absl::StrCat(Int(1, 7), Len(2, kBad)))),
            "by_number: a value is not valid UTF-8");
  // A second entry, the first valid.
  EXPECT_EQ(Message(outer, absl::StrCat(Len(3, Entry("a", "b")), Len(3, Entry("c", kBad)))),
            "attrs[\"c\"]: not valid UTF-8");
  EXPECT_EQ(Message(*v1::CreateSessionRequest::descriptor(),
                    absl::StrCat(Len(1, "user"), Len(3, Entry(kBad, "v")))),
            "attributes: a key is not valid UTF-8");
}

TEST(InvalidUtf8Test, NestedMessages) {
  const Descriptor& outer = Type("t.Outer");
  EXPECT_EQ(Message(outer, Len(4, Len(1, kBad))), "inner.name: not valid UTF-8");
  EXPECT_EQ(Message(outer, Len(4, Len(2, kBad))), "inner.tags[0]: not valid UTF-8");
  EXPECT_EQ(Message(outer, absl::StrCat(Len(5, Len(1, "ok")), Len(5, Len(2, kBad)))),
            "inners[1].tags[0]: not valid UTF-8");
  EXPECT_EQ(Message(outer, Len(6, Entry("n", Len(1, kBad)))),
            "by_name[\"n\"].name: not valid UTF-8");
  EXPECT_EQ(Message(outer, Len(6, Entry("\n", Len(1, kBad)))),
            "by_name: a value is not valid UTF-8");
  EXPECT_EQ(Message(outer, Len(9, Len(1, Len(1, Len(2, kBad))))),
            "node.child.child.text: not valid UTF-8");
}

TEST(InvalidUtf8Test, UnknownAndOtherFieldsAreSkipped) {
  const Descriptor& outer = Type("t.Outer");
  // Unknown fields of every wire type, bytes, and a known string field with another wire type
  // (an unknown field to the parser): none is checked.
  const std::string skipped =
      absl::StrCat(Int(99, 1), Len(1000, kBad), Varint(2047 << 3 | 1), std::string(8, '\x42'),
                   Varint(77 << 3 | 5), std::string(4, '\x01'), Varint(55 << 3 | 3), Len(1, kBad),
                   Varint(55 << 3 | 4), Len(7, kBad), Int(1, 5));
  EXPECT_EQ(Message(outer, skipped), std::nullopt);
  EXPECT_EQ(Message(outer, absl::StrCat(skipped, Len(1, kBad))), "id: not valid UTF-8");
  EXPECT_EQ(Message(Type("t.Legacy"), Len(1, kBad)), std::nullopt);
}

TEST(InvalidUtf8Test, MalformedInputHasNoneAndDoesNotCrash) {
  const Descriptor& outer = Type("t.Outer");
  for (const std::string& garbage : {
           std::string("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 11),  // Endless varint.
           std::string("\x0a\x7f", 2),                                       // Truncated string.
           std::string("\x0a\x05"
                       "ab",
                       4),                              // Truncated too.
           std::string("\x0a\xff\xff\xff\xff\x0f", 6),  // Length past int.
           std::string("\x0f", 1),                      // Field 1, group.
           std::string("\x0c", 1),                      // Stray end-group.
           std::string("\x00\x01", 2),                  // Field number 0.
           std::string("\x02\x01"
                       "a",
                       3),  // Field 0, string.
           Len(4,
               "\x0a\x05"
               "ab"),  // Nested, truncated.
           Len(3,
               "\x12\x09"
               "ab"),                  // Entry, truncated.
           Len(1, "ok") + "\x22\x7f",  // Message cut off.
       }) {
    SCOPED_TRACE(absl::CEscape(garbage));
    EXPECT_EQ(Message(outer, garbage), std::nullopt);
  }
  // Random bytes: whatever they read as, the walker returns, and names only fields it knows.
  std::mt19937 random(12345);
  for (int round = 0; round < 20000; ++round) {
    std::string bytes(random() % 64, '\0');
    for (char& c : bytes) c = static_cast<char>(random());
    const std::optional<InvalidUtf8Field> found = FindInvalidUtf8Field(outer, bytes);
    if (found.has_value()) {
      EXPECT_FALSE(found->path.empty());
    }
  }
}

TEST(InvalidUtf8Test, NestingIsBounded) {
  const Descriptor& node = Type("t.Node");
  // Node{child: Node{child: ... Node{text: bad}}}, `depth` messages below the top.
  const auto nested = [](int depth) {
    std::string bytes = Len(2, kBad);
    for (int i = 0; i < depth; ++i) bytes = Len(1, bytes);
    return bytes;
  };
  std::string path;
  for (int i = 0; i < kMaxInvalidUtf8Depth; ++i) path += "child.";
  EXPECT_EQ(Message(node, nested(kMaxInvalidUtf8Depth)), path + "text: not valid UTF-8");
  EXPECT_EQ(Message(node, nested(kMaxInvalidUtf8Depth + 1)), std::nullopt);
  // Far deeper than any stack would survive without the bound: about as many levels as fit in
  // gRPC's 1 MiB message limit. Built from the inside out, each level's header giving the
  // length of everything inside it.
  std::string inside = Len(2, kBad);
  std::vector<std::string> headers;
  size_t size = inside.size();
  for (int i = 0; i < 200'000; ++i) {
    headers.push_back(absl::StrCat("\x0a", Varint(size)));
    size += headers.back().size();
  }
  std::string hostile;
  hostile.reserve(size);
  for (auto it = headers.rbegin(); it != headers.rend(); ++it) hostile += *it;
  hostile += inside;
  ASSERT_EQ(hostile.size(), size);
  EXPECT_EQ(Message(node, hostile), std::nullopt);
  // The same with groups, which are skipped (and bounded by protobuf's own budget).
  EXPECT_EQ(Message(node, std::string(1'000'000, '\x1b')), std::nullopt);
}

TEST(InvalidUtf8Test, FieldsNamedByProtobufsComplaint) {
  const Descriptor& create = *v1::CreateSessionRequest::descriptor();
  const auto message = [](const Descriptor& request, const std::string& full_name) {
    const std::optional<InvalidUtf8Field> field = InvalidUtf8FieldFromFullName(request, full_name);
    return field.has_value() ? std::optional<std::string>(InvalidUtf8Message(*field))
                             : std::nullopt;
  };
  EXPECT_EQ(message(create, "sessionledger.v1.CreateSessionRequest.user_id"),
            "user_id: not valid UTF-8");
  EXPECT_EQ(message(create, "sessionledger.v1.CreateSessionRequest.AttributesEntry.key"),
            "attributes: a key is not valid UTF-8");
  EXPECT_EQ(message(create, "sessionledger.v1.CreateSessionRequest.AttributesEntry.value"),
            "attributes: a value is not valid UTF-8");
  EXPECT_EQ(message(*v1::UpdateSessionRequest::descriptor(),
                    "sessionledger.v1.UpdateSessionRequest.remove"),
            "remove: not valid UTF-8");
  EXPECT_EQ(
      message(*v1::DepositRequest::descriptor(), "sessionledger.v1.DepositRequest.idempotency_key"),
      "idempotency_key: not valid UTF-8");
  // Another request's field, an unknown one, a field of a nested type, nonsense.
  EXPECT_EQ(message(create, "sessionledger.v1.GetSessionRequest.token"), std::nullopt);
  EXPECT_EQ(message(create, "sessionledger.v1.CreateSessionRequest.nope"), std::nullopt);
  EXPECT_EQ(
      message(*v1::ListUserSessionsResponse::descriptor(), "sessionledger.v1.Session.user_id"),
      std::nullopt);
  EXPECT_EQ(message(create, ""), std::nullopt);
  EXPECT_EQ(message(create, "user_id"), std::nullopt);
}

}  // namespace
}  // namespace sessionledger
