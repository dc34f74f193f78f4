#include <atomic>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/session/session_service.h"
#include "server/session/token.h"

namespace sessionledger {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

bool IsUrlSafeAlphabet(const std::string& s) {
  for (char c : s) {
    const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_';
    if (!ok) return false;
  }
  return true;
}

TEST(Base64UrlTest, MatchesRfc4648Vectors) {
  EXPECT_EQ(Base64UrlEncode(""), "");
  EXPECT_EQ(Base64UrlEncode("f"), "Zg");
  EXPECT_EQ(Base64UrlEncode("fo"), "Zm8");
  EXPECT_EQ(Base64UrlEncode("foo"), "Zm9v");
  EXPECT_EQ(Base64UrlEncode("foob"), "Zm9vYg");
  EXPECT_EQ(Base64UrlEncode("fooba"), "Zm9vYmE");
  EXPECT_EQ(Base64UrlEncode("foobar"), "Zm9vYmFy");
  // The two characters where URL-safe base64 differs from the standard alphabet.
  EXPECT_EQ(Base64UrlEncode(std::string("\xfb\xff", 2)), "-_8");
}

TEST(Base64UrlTest, RoundTripsEveryLength) {
  std::string bytes;
  for (int n = 0; n < 70; ++n) {
    const std::string encoded = Base64UrlEncode(bytes);
    EXPECT_TRUE(IsUrlSafeAlphabet(encoded)) << encoded;
    absl::StatusOr<std::string> decoded = Base64UrlDecode(encoded);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(*decoded, bytes);
    bytes.push_back(static_cast<char>(n * 37 + 11));
  }
}

TEST(Base64UrlTest, RejectsStandardAlphabetPaddingAndNonCanonicalText) {
  EXPECT_FALSE(Base64UrlDecode("ab+c").ok());
  EXPECT_FALSE(Base64UrlDecode("ab/c").ok());
  EXPECT_FALSE(Base64UrlDecode("Zg==").ok());
  EXPECT_FALSE(Base64UrlDecode("Zh").ok());     // Trailing bits set: "f" is only "Zg".
  EXPECT_FALSE(Base64UrlDecode("Zm9vY").ok());  // Impossible length.
}

// Decoding reads whole groups of four characters and then the tail on its own: every byte
// value must survive both, and a character outside the alphabet must fail in every position.
TEST(Base64UrlTest, EveryByteRoundTripsAndEveryForeignCharacterIsRejected) {
  std::string all_bytes;
  for (int b = 0; b < 256; ++b) all_bytes.push_back(static_cast<char>(b));
  for (size_t offset = 0; offset < 3; ++offset) {  // Every byte in each position of a group.
    const std::string bytes = all_bytes.substr(offset);
    absl::StatusOr<std::string> decoded = Base64UrlDecode(Base64UrlEncode(bytes));
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(*decoded, bytes);
  }
  const std::string valid = Base64UrlEncode("token bytes!");             // 16 characters, no tail.
  const std::string valid_with_tail = Base64UrlEncode("token bytes!!");  // 18 characters.
  for (int b = 0; b < 256; ++b) {
    const char c = static_cast<char>(b);
    if (IsUrlSafeAlphabet(std::string(1, c))) continue;
    for (const std::string& text : {valid, valid_with_tail}) {
      for (size_t at = 0; at < text.size(); ++at) {
        std::string bad = text;
        bad[at] = c;
        EXPECT_FALSE(Base64UrlDecode(bad).ok()) << "byte " << b << " at " << at;
      }
    }
  }
}

TEST(Sha256Test, MatchesKnownDigest) {
  EXPECT_EQ(HexLower(Sha256("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(HexLower(Sha256("")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  // Two blocks once padded (FIPS 180-2, appendix B.2).
  EXPECT_EQ(HexLower(Sha256("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_TRUE(CheckSha256().ok());
}

// The algorithm object is fetched once and shared: threads digesting at once must each get
// their own right answer (and the TSan run sees no race).
TEST(Sha256Test, ConcurrentDigestsAreIndependent) {
  const std::string expected_abc = Sha256("abc");
  const std::string expected_token = Sha256(std::string(64, 't'));
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2000; ++i) {
        const bool odd = (i + t) % 2 == 1;
        const std::string got = odd ? Sha256("abc") : Sha256(std::string(64, 't'));
        if (got != (odd ? expected_abc : expected_token)) wrong.fetch_add(1);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(wrong.load(), 0);
}

TEST(TokenTest, HasAtLeast256RandomBitsUrlSafeNoPadding) {
  absl::StatusOr<std::string> token = NewToken("alice");
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(token->size(), kTokenLength);
  EXPECT_TRUE(IsUrlSafeAlphabet(*token)) << *token;
  absl::StatusOr<std::string> raw = Base64UrlDecode(*token);
  ASSERT_TRUE(raw.ok());
  ASSERT_EQ(raw->size(), kTokenSecretBytes + kUserTagBytes);
  EXPECT_GE(kTokenSecretBytes * 8, 256u);
  EXPECT_EQ(HexLower(raw->substr(kTokenSecretBytes)), UserTag("alice"));
}

TEST(TokenTest, TokensAndSessionIdsAreUnique) {
  std::set<std::string> tokens;
  std::set<std::string> ids;
  std::set<std::string> secrets;
  for (int i = 0; i < 1000; ++i) {
    absl::StatusOr<std::string> token = NewToken("alice");
    absl::StatusOr<std::string> id = NewSessionId();
    ASSERT_TRUE(token.ok() && id.ok());
    tokens.insert(*token);
    ids.insert(*id);
    secrets.insert(Base64UrlDecode(*token)->substr(0, kTokenSecretBytes));
    EXPECT_EQ(id->size(), 22u);
    EXPECT_TRUE(IsUrlSafeAlphabet(*id));
  }
  EXPECT_EQ(tokens.size(), 1000u);
  EXPECT_EQ(ids.size(), 1000u);
  EXPECT_EQ(secrets.size(), 1000u);
}

TEST(TokenTest, RandomBytesAreNotConstant) {
  absl::StatusOr<std::string> a = RandomBytes(32);
  absl::StatusOr<std::string> b = RandomBytes(32);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(*a, *b);
  EXPECT_NE(*a, std::string(32, '\0'));
}

TEST(KeyForTokenTest, DerivesHashedKeyThatRevealsNoToken) {
  absl::StatusOr<std::string> token = NewToken("bob");
  ASSERT_TRUE(token.ok());
  absl::StatusOr<SessionKey> key = KeyForToken(*token);
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(key->token_hash, HexLower(Sha256(*token)));
  EXPECT_EQ(key->token_hash.size(), 64u);
  EXPECT_EQ(key->user_tag, UserTag("bob"));
  EXPECT_EQ(key->user_tag.size(), 32u);
  EXPECT_THAT(key->token_hash, Not(HasSubstr(token->substr(0, 16))));
  // Deterministic: every replica derives the same key.
  EXPECT_EQ(KeyForToken(*token)->token_hash, key->token_hash);
}

TEST(KeyForTokenTest, RejectsTokensWeCouldNotHaveIssued) {
  absl::StatusOr<std::string> token = NewToken("bob");
  ASSERT_TRUE(token.ok());
  EXPECT_TRUE(absl::IsNotFound(KeyForToken("").status()));
  EXPECT_TRUE(absl::IsNotFound(KeyForToken(token->substr(1)).status()));
  EXPECT_TRUE(absl::IsNotFound(KeyForToken(*token + "A").status()));
  std::string bad = *token;
  bad[10] = '+';
  EXPECT_TRUE(absl::IsNotFound(KeyForToken(bad).status()));
}

TEST(ConstantTimeEqualsTest, ComparesContentAndLength) {
  EXPECT_TRUE(ConstantTimeEquals("abc", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "ab"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
}

TEST(ValidateTextTest, AcceptsUtf8WithinLimits) {
  EXPECT_TRUE(ValidateText("user_id", "alice", 128).ok());
  EXPECT_TRUE(ValidateText("user_id", "J\xC3\xBCrgen \xE2\x82\xAC \xF0\x9F\x98\x80", 128).ok());
  EXPECT_TRUE(ValidateText("user_id", std::string(128, 'x'), 128).ok());
}

TEST(ValidateTextTest, RejectsEmptyLongControlAndInvalidUtf8) {
  for (const std::string& bad : {std::string(""), std::string(129, 'x'), std::string("a\nb"),
                                 std::string("a\x7f"), std::string("\xC2\x85"),  // C1 NEL
                                 std::string("a\0b", 3), std::string("\xC3"),
                                 std::string("\xC0\xAF"),          // Overlong '/'.
                                 std::string("\xED\xA0\x80"),      // Surrogate.
                                 std::string("\xF4\x90\x80\x80"),  // Above U+10FFFF.
                                 std::string("\xFF")}) {
    absl::Status s = ValidateText("user_id", bad, 128);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << testing::PrintToString(bad);
    EXPECT_THAT(std::string(s.message()), HasSubstr("user_id"));
  }
}

}  // namespace
}  // namespace sessionledger
