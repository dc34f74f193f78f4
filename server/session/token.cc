#include "server/session/token.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <sys/random.h>

#include <array>
#include <cerrno>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace sessionledger {
namespace {

constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

// kAlphabet inverted: the 6-bit value of each byte, or -1 for a byte outside the alphabet.
// A table rather than range tests because every authenticated call decodes a token.
struct DecodeTable {
  int8_t value[256] = {};
  constexpr DecodeTable() {
    for (auto& v : value) v = -1;
    for (int i = 0; i < 64; ++i)
      value[static_cast<unsigned char>(kAlphabet[i])] = static_cast<int8_t>(i);
  }
};
constexpr DecodeTable kDecode;

// SHA-256 fetched from the default provider once. SHA256(), and EVP_Digest given EVP_sha256(),
// look the implementation up by name on every digest (OpenSSL 3 "implicit fetching": a locked
// lookup and a third allocation), and the hot read digests two or three times per call. Immutable
// once fetched, so shared by all threads; never freed, as it lives as long as the process.
const EVP_MD* Sha256Algorithm() {
  static const EVP_MD* const algorithm = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  return algorithm;
}

// The digest on the stack: the hot read derives two hex keys from digests, and a std::string
// of 32 bytes would be one more heap allocation each.
using Sha256Digest = std::array<unsigned char, SHA256_DIGEST_LENGTH>;
Sha256Digest Sha256Of(absl::string_view data) {
  Sha256Digest digest;
  const EVP_MD* algorithm = Sha256Algorithm();
  // CheckSha256 at startup rules this out; should it still happen, keys derived from an
  // unwritten digest would be wrong for every token, so stop instead.
  if (algorithm == nullptr ||
      EVP_Digest(data.data(), data.size(), digest.data(), nullptr, algorithm, nullptr) != 1) {
    std::abort();
  }
  return digest;
}

// The first `n` bytes of a digest, as the string_view the encoders take.
absl::string_view DigestBytes(const Sha256Digest& digest, size_t n = SHA256_DIGEST_LENGTH) {
  return absl::string_view(reinterpret_cast<const char*>(digest.data()), n);
}

}  // namespace

absl::StatusOr<std::string> RandomBytes(size_t n) {
  std::string out(n, '\0');
  size_t filled = 0;
  while (filled < n) {
    const ssize_t got = getrandom(out.data() + filled, n - filled, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      return absl::UnavailableError(absl::StrCat("getrandom failed, errno ", errno));
    }
    filled += static_cast<size_t>(got);
  }
  return out;
}

std::string Base64UrlEncode(absl::string_view bytes) {
  // Sized once and written by index: these run on every token issued and read, and a
  // push_back per character cost several times the encoding itself.
  std::string out((bytes.size() * 4 + 2) / 3, '\0');
  char* o = out.data();
  const auto byte = [&](size_t k) { return static_cast<uint32_t>(static_cast<uint8_t>(bytes[k])); };
  size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    const uint32_t v = (byte(i) << 16) | (byte(i + 1) << 8) | byte(i + 2);
    *o++ = kAlphabet[(v >> 18) & 63];
    *o++ = kAlphabet[(v >> 12) & 63];
    *o++ = kAlphabet[(v >> 6) & 63];
    *o++ = kAlphabet[v & 63];
  }
  const size_t rest = bytes.size() - i;
  if (rest == 1) {
    const uint32_t v = byte(i) << 16;
    *o++ = kAlphabet[(v >> 18) & 63];
    *o++ = kAlphabet[(v >> 12) & 63];
  } else if (rest == 2) {
    const uint32_t v = (byte(i) << 16) | (byte(i + 1) << 8);
    *o++ = kAlphabet[(v >> 18) & 63];
    *o++ = kAlphabet[(v >> 12) & 63];
    *o++ = kAlphabet[(v >> 6) & 63];
  }
  return out;
}

absl::StatusOr<std::string> Base64UrlDecode(absl::string_view text) {
  if (text.size() % 4 == 1) return absl::InvalidArgumentError("bad base64url length");
  std::string out(text.size() * 3 / 4, '\0');
  char* o = out.data();
  const auto value = [&](size_t k) { return kDecode.value[static_cast<unsigned char>(text[k])]; };
  // Whole groups of four characters (three bytes) first, the tail bit by bit below.
  size_t i = 0;
  for (; i + 4 <= text.size(); i += 4) {
    const int a = value(i), b = value(i + 1), c = value(i + 2), d = value(i + 3);
    if ((a | b | c | d) < 0) return absl::InvalidArgumentError("bad base64url character");
    const uint32_t v = (static_cast<uint32_t>(a) << 18) | (static_cast<uint32_t>(b) << 12) |
                       (static_cast<uint32_t>(c) << 6) | static_cast<uint32_t>(d);
    *o++ = static_cast<char>(v >> 16);
    *o++ = static_cast<char>((v >> 8) & 0xff);
    *o++ = static_cast<char>(v & 0xff);
  }
  uint32_t acc = 0;
  int bits = 0;
  for (; i < text.size(); ++i) {
    const int v = value(i);
    if (v < 0) return absl::InvalidArgumentError("bad base64url character");
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      *o++ = static_cast<char>((acc >> bits) & 0xff);
    }
  }
  // Leftover bits must be zero, so every byte string has exactly one encoding.
  if ((acc & ((1u << bits) - 1)) != 0) return absl::InvalidArgumentError("non-canonical base64url");
  return out;
}

std::string Sha256(absl::string_view data) { return std::string(DigestBytes(Sha256Of(data))); }

absl::Status CheckSha256() {
  if (Sha256Algorithm() == nullptr) {
    return absl::InternalError(
        "OpenSSL has no SHA-256 (is the default provider disabled in the OpenSSL configuration?)");
  }
  // FIPS 180-2, appendix B.1.
  if (HexLower(Sha256("abc")) !=
      "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad") {
    return absl::InternalError("OpenSSL's SHA-256 gives a wrong digest of \"abc\"");
  }
  return absl::OkStatus();
}

std::string HexLower(absl::string_view bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(bytes.size() * 2, '\0');
  char* o = out.data();
  for (char c : bytes) {
    const auto b = static_cast<uint8_t>(c);
    *o++ = kHex[b >> 4];
    *o++ = kHex[b & 15];
  }
  return out;
}

std::string UserTag(absl::string_view user_id) {
  return HexLower(DigestBytes(Sha256Of(user_id), kUserTagBytes));
}

absl::StatusOr<std::string> NewToken(absl::string_view user_id) {
  absl::StatusOr<std::string> secret = RandomBytes(kTokenSecretBytes);
  if (!secret.ok()) return secret.status();
  return Base64UrlEncode(absl::StrCat(*secret, DigestBytes(Sha256Of(user_id), kUserTagBytes)));
}

absl::StatusOr<std::string> NewSessionId() {
  absl::StatusOr<std::string> id = RandomBytes(16);
  if (!id.ok()) return id.status();
  return Base64UrlEncode(*id);
}

absl::StatusOr<SessionKey> KeyForToken(absl::string_view token) {
  if (token.size() != kTokenLength) return absl::NotFoundError("token: unknown session");
  absl::StatusOr<std::string> raw = Base64UrlDecode(token);
  if (!raw.ok() || raw->size() != kTokenSecretBytes + kUserTagBytes) {
    return absl::NotFoundError("token: unknown session");
  }
  SessionKey key;
  key.token_hash = HexLower(DigestBytes(Sha256Of(token)));
  key.user_tag = HexLower(absl::string_view(*raw).substr(kTokenSecretBytes));
  return key;
}

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace sessionledger
