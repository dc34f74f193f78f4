#include "server/ledger/page_token.h"

#include <openssl/sha.h>

#include "absl/strings/escaping.h"
#include "server/ledger/ledger_rules.h"

namespace sessionledger {
namespace {

constexpr char kVersion = 1;
constexpr size_t kUuidBytes = 16;
constexpr size_t kChecksumBytes = 8;
constexpr size_t kPayloadBytes = 1 + kUuidBytes + 8;
constexpr size_t kTokenBytes = kPayloadBytes + kChecksumBytes;
constexpr absl::string_view kLabel = "sessionledger/page-token/v1";

std::string Checksum(absl::string_view payload) {
  std::string input(kLabel);
  input.append(payload.data(), payload.size());
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(input.data()), input.size(), digest);
  return std::string(reinterpret_cast<const char*>(digest), kChecksumBytes);
}

absl::Status Malformed() {
  return absl::InvalidArgumentError("page_token: malformed or altered; use a next_page_token");
}

}  // namespace

std::string EncodePageToken(const PageCursor& cursor) {
  std::string raw;
  raw.reserve(kTokenBytes);
  raw.push_back(kVersion);
  // The account id is canonical hex with hyphens; pack it to 16 bytes.
  std::string hex;
  for (char c : cursor.account_id) {
    if (c != '-') hex.push_back(c);
  }
  raw += absl::HexStringToBytes(hex);
  const auto seq = static_cast<uint64_t>(cursor.last_seq);
  for (int shift = 56; shift >= 0; shift -= 8)
    raw.push_back(static_cast<char>((seq >> shift) & 0xFF));
  raw += Checksum(raw);
  return absl::WebSafeBase64Escape(raw);
}

absl::StatusOr<PageCursor> DecodePageToken(absl::string_view token) {
  std::string raw;
  if (!absl::WebSafeBase64Unescape(token, &raw) || raw.size() != kTokenBytes ||
      raw[0] != kVersion || absl::WebSafeBase64Escape(raw) != token) {
    return Malformed();
  }
  const absl::string_view payload(raw.data(), kPayloadBytes);
  if (Checksum(payload) != absl::string_view(raw).substr(kPayloadBytes)) return Malformed();
  const std::string hex = absl::BytesToHexString(absl::string_view(raw).substr(1, kUuidBytes));
  PageCursor cursor;
  cursor.account_id = hex.substr(0, 8) + "-" + hex.substr(8, 4) + "-" + hex.substr(12, 4) + "-" +
                      hex.substr(16, 4) + "-" + hex.substr(20);
  uint64_t seq = 0;
  for (size_t i = 0; i < 8; ++i)
    seq = (seq << 8) | static_cast<unsigned char>(raw[1 + kUuidBytes + i]);
  cursor.last_seq = static_cast<int64_t>(seq);
  if (cursor.last_seq <= 0) return Malformed();
  return cursor;
}

}  // namespace sessionledger
