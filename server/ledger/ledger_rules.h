#ifndef SESSIONLEDGER_SERVER_LEDGER_LEDGER_RULES_H_
#define SESSIONLEDGER_SERVER_LEDGER_LEDGER_RULES_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/domain/ledger_store.h"

namespace sessionledger {

// Pure request-shape rules of the ledger. Stateless and thread-safe.

inline constexpr size_t kMaxIdempotencyKeyBytes = 128;
inline constexpr int kDefaultPageSize = 50;
inline constexpr int kMaxPageSize = 1000;

// OK for three upper-case ASCII letters (ISO 4217 form); INVALID_ARGUMENT naming `currency`.
absl::Status ValidateCurrency(absl::string_view currency);

// OK for 1..128 bytes of valid UTF-8 without NUL; INVALID_ARGUMENT naming `idempotency_key`.
// NUL is refused because PostgreSQL text cannot hold it, and invalid UTF-8 because the
// database encoding is UTF-8: both would otherwise fail deep in the store as INTERNAL.
absl::Status ValidateIdempotencyKey(absl::string_view key,
                                    size_t max_bytes = kMaxIdempotencyKeyBytes);

// The canonical (lower-case, hyphenated) form of a UUID written as 8-4-4-4-12 hex digits in
// either case; std::nullopt for anything else. Account ids are UUIDs, so a string that is not
// one names no account (NOT_FOUND, not INVALID_ARGUMENT: the request is well-formed, the object
// does not exist).
std::optional<std::string> CanonicalUuid(absl::string_view text);

// The digest compared when an idempotency key is reused: SHA-256 over the kind, both
// (canonical) account ids and the amount, length-prefixed so that no two distinct requests
// share an encoding. 32 raw bytes.
std::string MovementFingerprint(TransactionKind kind, absl::string_view from_account_id,
                                absl::string_view to_account_id, int64_t amount_minor);

// page_size as the contract defines it: 0 = 50, above 1000 = 1000, negative INVALID_ARGUMENT.
absl::StatusOr<int> EffectivePageSize(int32_t requested);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_LEDGER_LEDGER_RULES_H_
