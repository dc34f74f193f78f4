#include "server/ledger/ledger_rules.h"

#include <openssl/sha.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "server/common/utf8.h"

namespace sessionledger {
namespace {

void AppendLengthPrefixed(std::string& out, absl::string_view field) {
  const uint32_t n = static_cast<uint32_t>(field.size());
  for (int shift = 24; shift >= 0; shift -= 8)
    out.push_back(static_cast<char>((n >> shift) & 0xFF));
  out.append(field.data(), field.size());
}

}  // namespace

absl::Status ValidateCurrency(absl::string_view currency) {
  if (currency.size() != 3 || !absl::ascii_isupper(static_cast<unsigned char>(currency[0])) ||
      !absl::ascii_isupper(static_cast<unsigned char>(currency[1])) ||
      !absl::ascii_isupper(static_cast<unsigned char>(currency[2]))) {
    return absl::InvalidArgumentError(
        "currency: must be three upper-case ASCII letters (ISO 4217 form), e.g. EUR");
  }
  return absl::OkStatus();
}

absl::Status ValidateIdempotencyKey(absl::string_view key, size_t max_bytes) {
  if (key.empty()) return absl::InvalidArgumentError("idempotency_key: required");
  if (key.size() > max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("idempotency_key: at most ", max_bytes, " bytes"));
  }
  if (key.find('\0') != absl::string_view::npos || !IsValidUtf8(key)) {
    return absl::InvalidArgumentError("idempotency_key: must be UTF-8 without NUL characters");
  }
  return absl::OkStatus();
}

std::optional<std::string> CanonicalUuid(absl::string_view text) {
  if (text.size() != 36) return std::nullopt;
  std::string out(text);
  for (size_t i = 0; i < out.size(); ++i) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (out[i] != '-') return std::nullopt;
      continue;
    }
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(out[i]))) return std::nullopt;
    out[i] = absl::ascii_tolower(static_cast<unsigned char>(out[i]));
  }
  return out;
}

std::string MovementFingerprint(TransactionKind kind, absl::string_view from_account_id,
                                absl::string_view to_account_id, int64_t amount_minor) {
  std::string encoded = "sessionledger/movement/v1";
  AppendLengthPrefixed(encoded, TransactionKindName(kind));
  AppendLengthPrefixed(encoded, from_account_id);
  AppendLengthPrefixed(encoded, to_account_id);
  AppendLengthPrefixed(encoded, absl::StrCat(amount_minor));
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(encoded.data()), encoded.size(), digest);
  return std::string(reinterpret_cast<const char*>(digest), sizeof(digest));
}

absl::StatusOr<int> EffectivePageSize(int32_t requested) {
  if (requested < 0) return absl::InvalidArgumentError("page_size: must not be negative");
  if (requested == 0) return kDefaultPageSize;
  return std::min<int>(requested, kMaxPageSize);
}

}  // namespace sessionledger
