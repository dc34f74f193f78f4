#include "server/ledger/ledger_rules.h"

#include <limits>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/ledger/page_token.h"

namespace sessionledger {
namespace {

TEST(LedgerRules, Currency) {
  EXPECT_TRUE(ValidateCurrency("EUR").ok());
  for (const char* bad : {"", "EU", "EURO", "eur", "Eur", "EUr", "E1R", "EU1", "EÜR"}) {
    const absl::Status s = ValidateCurrency(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(std::string(s.message()).find("currency"), std::string::npos);
  }
}

TEST(LedgerRules, IdempotencyKey) {
  EXPECT_TRUE(ValidateIdempotencyKey("k").ok());
  EXPECT_TRUE(ValidateIdempotencyKey(std::string(128, 'x')).ok());
  EXPECT_TRUE(ValidateIdempotencyKey("ключ-✓").ok());
  EXPECT_EQ(ValidateIdempotencyKey("").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateIdempotencyKey(std::string(129, 'x')).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateIdempotencyKey(std::string("a\0b", 3)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateIdempotencyKey("\xff").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateIdempotencyKey("\xc3").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateIdempotencyKey("\xc0\xaf").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateIdempotencyKey("\xed\xa0\x80").code(), absl::StatusCode::kInvalidArgument);
  // The limit is configurable (MAX_IDEMPOTENCY_KEY_BYTES).
  EXPECT_TRUE(ValidateIdempotencyKey("abcd", 4).ok());
  EXPECT_EQ(ValidateIdempotencyKey("abcde", 4).code(), absl::StatusCode::kInvalidArgument);
}

TEST(LedgerRules, CanonicalUuid) {
  EXPECT_EQ(CanonicalUuid("0B6F5C1E-1234-4ABC-8DEF-0123456789AB").value_or(""),
            "0b6f5c1e-1234-4abc-8def-0123456789ab");
  EXPECT_FALSE(CanonicalUuid("").has_value());
  EXPECT_FALSE(CanonicalUuid("not-a-uuid").has_value());
  EXPECT_FALSE(CanonicalUuid("0b6f5c1e_1234-4abc-8def-0123456789ab").has_value());
  EXPECT_FALSE(CanonicalUuid("0b6f5c1e-1234-4abc-8def-0123456789ag").has_value());
}

TEST(LedgerRules, FingerprintDistinguishesEveryParameter) {
  const std::string a = "00000000-0000-4000-8000-000000000001";
  const std::string b = "00000000-0000-4000-8000-000000000002";
  std::set<std::string> prints = {
      MovementFingerprint(TransactionKind::kDeposit, "", a, 5),
      MovementFingerprint(TransactionKind::kTransfer, "", a, 5),
      MovementFingerprint(TransactionKind::kTransfer, b, a, 5),
      MovementFingerprint(TransactionKind::kTransfer, a, b, 5),
      MovementFingerprint(TransactionKind::kTransfer, a, b, 50),
  };
  EXPECT_EQ(prints.size(), 5u);
  EXPECT_EQ(MovementFingerprint(TransactionKind::kTransfer, a, b, 5),
            MovementFingerprint(TransactionKind::kTransfer, a, b, 5));
}

TEST(LedgerRules, PageSize) {
  EXPECT_EQ(EffectivePageSize(0).value(), 50);
  EXPECT_EQ(EffectivePageSize(7).value(), 7);
  EXPECT_EQ(EffectivePageSize(1000).value(), 1000);
  EXPECT_EQ(EffectivePageSize(1001).value(), 1000);
  EXPECT_EQ(EffectivePageSize(-1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(LedgerPageToken, RoundTrips) {
  const PageCursor cursor{"0b6f5c1e-1234-4abc-8def-0123456789ab", 123456789012345};
  const std::string token = EncodePageToken(cursor);
  for (char c : token) {
    EXPECT_TRUE(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_') << token;
  }
  absl::StatusOr<PageCursor> decoded = DecodePageToken(token);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->account_id, cursor.account_id);
  EXPECT_EQ(decoded->last_seq, cursor.last_seq);
}

TEST(LedgerPageToken, EveryAlteredCharacterIsRejected) {
  const std::string token = EncodePageToken({"0b6f5c1e-1234-4abc-8def-0123456789ab", 42});
  const std::string alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  for (size_t i = 0; i < token.size(); ++i) {
    for (char c : alphabet) {
      if (c == token[i]) continue;
      std::string altered = token;
      altered[i] = c;
      EXPECT_EQ(DecodePageToken(altered).status().code(), absl::StatusCode::kInvalidArgument)
          << "position " << i << " char " << c;
    }
  }
  for (const std::string& bad : {std::string(), token.substr(1), token + "A", std::string("!!!"),
                                 token.substr(0, token.size() - 1)}) {
    EXPECT_EQ(DecodePageToken(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

// The checksum is not keyed, so a client can make a well-formed token for any seq; no seq that
// no page could have ended on (seqs start at 1) may pass as a position.
TEST(LedgerPageToken, ASequenceNoPageEndsOnIsRejected) {
  for (int64_t seq : {int64_t{0}, int64_t{-1}, std::numeric_limits<int64_t>::min()}) {
    const std::string token = EncodePageToken({"0b6f5c1e-1234-4abc-8def-0123456789ab", seq});
    const absl::StatusOr<PageCursor> decoded = DecodePageToken(token);
    EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument) << seq;
    EXPECT_THAT(std::string(decoded.status().message()), ::testing::HasSubstr("page_token"));
  }
}

}  // namespace
}  // namespace sessionledger
