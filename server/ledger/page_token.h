#ifndef SESSIONLEDGER_SERVER_LEDGER_PAGE_TOKEN_H_
#define SESSIONLEDGER_SERVER_LEDGER_PAGE_TOKEN_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace sessionledger {

// The keyset cursor of ListTransactions: the account it was made for and the seq of the last
// transaction returned (the next page holds seq < last_seq).
struct PageCursor {
  std::string account_id;  // Canonical UUID.
  int64_t last_seq = 0;
};

// Opaque page tokens: URL-safe base64 (no padding) of
//   version byte | 16-byte account UUID | 8-byte big-endian seq | 8-byte checksum
// where the checksum is the first 8 bytes of SHA-256 over a domain-separation label and the
// preceding bytes.
//
// Why a checksum and not an HMAC: an HMAC needs a secret shared by every replica and the
// configuration has none. The token needs integrity, not secrecy: it only positions a listing
// within an account the caller must own anyway (ownership is checked on every page), so a
// forged token can at worst skip ahead in the caller's own history. The checksum rejects
// altered or truncated tokens, the embedded account id rejects a token made for another
// account, and decoding is canonical (re-encoding must give the same text), so even a flipped
// unused bit of the last character is refused. Stateless and thread-safe.
std::string EncodePageToken(const PageCursor& cursor);

// INVALID_ARGUMENT (naming page_token) when the token is malformed or altered.
absl::StatusOr<PageCursor> DecodePageToken(absl::string_view token);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_LEDGER_PAGE_TOKEN_H_
