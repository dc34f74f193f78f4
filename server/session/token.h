#ifndef SESSIONLEDGER_SERVER_SESSION_TOKEN_H_
#define SESSIONLEDGER_SERVER_SESSION_TOKEN_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/domain/session_store.h"

namespace sessionledger {

// Session tokens are 48 bytes, URL-safe base64 without padding (64 characters):
//   32 bytes from getrandom(2)   the secret (256 bits);
//   16 bytes user tag            first 16 bytes of SHA-256(user_id).
// The user tag lets a reader fetch the session and its user's revocation generation in one
// Memcached round trip (both keys are grouped by user). It is not secret: whoever holds a token
// holds the session anyway, and nothing about the key derivation depends on hiding it.
// All functions are thread-safe.
inline constexpr size_t kTokenSecretBytes = 32;
inline constexpr size_t kUserTagBytes = 16;
inline constexpr size_t kTokenLength = 64;  // base64 of 48 bytes, no padding.

// `n` bytes from the kernel CSPRNG. UNAVAILABLE if the kernel refuses (it blocks only before
// the entropy pool is initialised at boot).
absl::StatusOr<std::string> RandomBytes(size_t n);

std::string Base64UrlEncode(absl::string_view bytes);
// Strict: URL-safe alphabet only, no padding, no trailing bits set. nullopt-like error on junk.
absl::StatusOr<std::string> Base64UrlDecode(absl::string_view text);

// Raw 32-byte SHA-256 (OpenSSL libcrypto).
std::string Sha256(absl::string_view data);
// Whether OpenSSL can make SHA-256 digests, and right ones. Call it once at startup: Sha256
// aborts if it cannot.
absl::Status CheckSha256();
std::string HexLower(absl::string_view bytes);

// Hex of the first 16 bytes of SHA-256(user_id).
std::string UserTag(absl::string_view user_id);

// A new token for `user_id`.
absl::StatusOr<std::string> NewToken(absl::string_view user_id);
// A new public session id: 16 random bytes, URL-safe base64 (22 characters).
absl::StatusOr<std::string> NewSessionId();

// Derives the storage key of a token: its SHA-256 and the user tag it carries. NOT_FOUND when
// the token is not one we could have issued (wrong length or alphabet).
absl::StatusOr<SessionKey> KeyForToken(absl::string_view token);

// Constant-time comparison of two secrets or digests (time depends only on the lengths).
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_SESSION_TOKEN_H_
