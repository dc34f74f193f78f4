#ifndef SESSIONLEDGER_SERVER_SESSION_SESSION_SERVICE_H_
#define SESSIONLEDGER_SERVER_SESSION_SESSION_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "google/protobuf/map.h"
#include "google/protobuf/repeated_ptr_field.h"
#include "server/common/blocking_executor.h"
#include "server/common/clock.h"
#include "server/domain/session_store.h"
#include "server/domain/token_authenticator.h"

namespace sessionledger {

// Input limits of the contract (defaults); all lengths in bytes.
struct SessionLimits {
  size_t max_user_id_bytes = 128;
  size_t max_attribute_key_bytes = 128;
  // Sum of key and value bytes over all attributes of a session.
  size_t max_attributes_bytes = 64 * 1024;
  // Live sessions one user may hold at once. Each is an entry of ~100 bytes in the user's index,
  // one Memcached item of at most 1 MiB: 4096 of them take ~400 KiB.
  int max_live_sessions_per_user = 4096;
  // Most a ListUserSessions answer carries: 4096 sessions of 64 KiB would be 256 MiB, built in
  // the server's memory for one small request. A user over it gets RESOURCE_EXHAUSTED.
  size_t max_listing_bytes = 16 * 1024 * 1024;
  // Most all the listings a process assembles at once may hold together, so that concurrent
  // large listings do not add up without bound while they are built (their answers are then
  // gRPC's until sent): one that would pass it gets UNAVAILABLE (retry, perhaps elsewhere).
  size_t max_listing_bytes_in_flight = 64 * 1024 * 1024;
};

struct SessionServiceOptions {
  absl::Duration default_ttl = absl::Seconds(1800);
  absl::Duration max_lifetime = absl::Seconds(86400);
  SessionLimits limits;
  // Compare-and-swap conflicts are retried at most this often (and never past the deadline),
  // sleeping a random time in [0, min(backoff_max, backoff_base * 2^attempt)) between tries
  // ("full jitter"), so that writers on many replicas spread out instead of colliding again.
  int max_cas_attempts = 64;
  absl::Duration backoff_base = absl::Microseconds(500);
  absl::Duration backoff_max = absl::Milliseconds(20);
  // How the retry loop waits; tests inject one that does not sleep.
  std::function<void(absl::Duration)> sleep;
  // Runs what an asynchronous call must finish blocking (a retry loop that sleeps); null runs
  // it on the thread the store answered on.
  BlockingExecutor* blocking = nullptr;
};

using AttributeMap = google::protobuf::Map<std::string, std::string>;
using KeyList = google::protobuf::RepeatedPtrField<std::string>;

// A session as the service returns it. `token` is set only by Create and Rotate.
struct SessionView {
  std::string token;
  storage::v1::StoredSession stored;
};

// The SessionService rules of api-contract.md over a SessionStore: token issue, idle expiry and
// absolute lifetime (with the injected clock), compare-and-swap updates, rotation, per-user
// listing and revocation. Keeps no state between calls (the store holds everything), so any
// number of server processes can serve the same sessions.
//
// Status codes: INVALID_ARGUMENT (request shape; checked first), NOT_FOUND (unknown, expired,
// deleted or revoked session), ABORTED (UpdateSession's expected_version mismatch),
// UNAVAILABLE (store down or too slow for `deadline`, or compare-and-swap still conflicting
// after the bounded retries). Thread-safe.
class SessionService {
 public:
  SessionService(std::shared_ptr<SessionStore> store, const Clock& clock,
                 SessionServiceOptions options);

  absl::StatusOr<SessionView> Create(absl::string_view user_id, int64_t ttl_seconds,
                                     const AttributeMap& attributes, absl::Time deadline);
  // The answers of the asynchronous calls: `done` runs exactly once, possibly before the call
  // returns, possibly on the store's I/O thread, and must not block.
  using ViewCallback = absl::AnyInvocable<void(absl::StatusOr<SessionView>) &&>;
  // Create for callers that must not block. It writes the index entry and the session at once
  // (one round trip less than Create): the token is handed out only once both are stored, so no
  // caller ever holds a session that is not indexed; one whose index write failed is never
  // handed out and expires unseen.
  void CreateAsync(absl::string_view user_id, int64_t ttl_seconds, const AttributeMap& attributes,
                   absl::Time deadline, ViewCallback done);
  absl::StatusOr<SessionView> Get(absl::string_view token, bool touch, absl::Time deadline);
  absl::StatusOr<SessionView> Update(absl::string_view token, const AttributeMap& set,
                                     const KeyList& remove, int64_t expected_version,
                                     absl::Time deadline);
  // Get and Update for callers that must not block: one read and (for an update, or a touch
  // that slides the expiry) one compare-and-swap through the store's asynchronous methods. A
  // lost race finishes on options_.blocking as the blocking form, which reads again and retries
  // with backoff, so both answer what Get and Update would (the asynchronous attempt counts
  // as the first of max_cas_attempts).
  void GetAsync(absl::string_view token, bool touch, absl::Time deadline, ViewCallback done);
  void UpdateAsync(absl::string_view token, const AttributeMap& set, const KeyList& remove,
                   int64_t expected_version, absl::Time deadline, ViewCallback done);
  absl::StatusOr<SessionView> Rotate(absl::string_view token, absl::Time deadline);
  absl::Status Delete(absl::string_view token, absl::Time deadline);
  // Live sessions of the user, oldest first.
  absl::StatusOr<std::vector<storage::v1::StoredSession>> List(absl::string_view user_id,
                                                               absl::Time deadline);
  // Ends every live session of the user; returns how many were live.
  absl::StatusOr<int64_t> Revoke(absl::string_view user_id, absl::Time deadline);

  // token -> user_id without touching the session (one store round trip).
  absl::StatusOr<std::string> UserIdForToken(absl::string_view token, absl::Time deadline);

  const SessionServiceOptions& options() const { return options_; }

 private:
  class Backoff;

  // A session Create is about to store: checked input, fresh token and key.
  struct NewSession {
    SessionView view;
    SessionKey key;
  };
  // The user's index with `session` added (dead entries dropped) and how long to keep it.
  struct IndexWrite {
    storage::v1::UserSessionIndex index;
    absl::Duration ttl;
  };

  absl::StatusOr<NewSession> PrepareCreate(absl::string_view user_id, int64_t ttl_seconds,
                                           const AttributeMap& attributes) const;
  // Sets what depends on the moment of creation and the user's revocation generation.
  void StampCreated(storage::v1::StoredSession& s, uint64_t user_generation, absl::Time now) const;
  static absl::Duration SessionTtl(const storage::v1::StoredSession& s, absl::Time now);
  static IndexWrite IndexWith(const storage::v1::UserSessionIndex& current,
                              const storage::v1::StoredSession& session, absl::Time now);
  // Indexes and stores a stamped session (the blocking tail of Create).
  absl::StatusOr<SessionView> FinishCreate(NewSession created, std::optional<IndexRecord> index,
                                           absl::Time deadline);
  // FinishCreate on options_.blocking, answering through `done`; with `added`, the session is
  // already stored and only its index entry is written.
  void FinishCreateBlocking(std::shared_ptr<NewSession> created, std::optional<IndexRecord> index,
                            absl::Time deadline, ViewCallback done, bool added = false);

  absl::Status CheckLive(const SessionLookup& lookup, const SessionKey& key, absl::Time now) const;
  // A change to a live session read at `now`: true when it must be written back (by
  // compare-and-swap), false when the session is the answer as it is; an error ends the call.
  using Edit = absl::AnyInvocable<absl::StatusOr<bool>(storage::v1::StoredSession&, absl::Time)>;
  // GetSession's edit: with `touch`, slide the idle expiry (no write when that changes nothing).
  static Edit TouchEdit(bool touch);
  // Update's request checks; the key of `token` when they pass.
  absl::StatusOr<SessionKey> CheckUpdate(absl::string_view token, const AttributeMap& set,
                                         const KeyList& remove, int64_t expected_version) const;
  // UpdateSession's edit: ABORTED on an expected_version mismatch, INVALID_ARGUMENT when the
  // attributes grow past the limit; otherwise the next version with the expiry slid.
  Edit UpdateEdit(const AttributeMap& set, const KeyList& remove, int64_t expected_version) const;
  // Reads the session under `key`, checks it is live, applies `edit` and writes the result by
  // compare-and-swap, re-reading after a conflict (bounded, with backoff).
  // `after_lost_race`: the backoff of a caller that already lost a compare-and-swap (ModifyAsync),
  // whose tries count towards options_.max_cas_attempts.
  absl::StatusOr<SessionView> Modify(const SessionKey& key, absl::Time deadline, Edit& edit,
                                     Backoff* after_lost_race = nullptr);
  // Modify without blocking: one read and at most one compare-and-swap through the store's
  // asynchronous methods; a lost race finishes as Modify on options_.blocking.
  void ModifyAsync(SessionKey key, absl::Time deadline, Edit edit, ViewCallback done);
  // Runs `work` on options_.blocking, or here without one.
  void RunBlocking(absl::AnyInvocable<void() &&> work) const;
  // Adds `session` to its user's index by compare-and-swap, starting from `already_read` when
  // the caller has just read the index (saves a round trip), re-reading after a conflict.
  // RESOURCE_EXHAUSTED when the user already holds limits.max_live_sessions_per_user live
  // sessions, UNAVAILABLE when creates under way reach that (RoomForOneMore), unless
  // `replaces_one` (a rotation, whose old session ends).
  struct Indexed {
    absl::Time indexed_at;  // The entry's, on clock_.
    // When the attempt that wrote it began (absl::Now()): after any pruning and back-off, so
    // what it took since is the read and write of one index item, what a caller may weigh
    // against the writes still to come.
    absl::Time attempt_began;
  };
  // `after_lost_race`: the backoff of a caller whose own index write already lost a race, so
  // that its try counts against max_cas_attempts; null for a first try.
  absl::StatusOr<Indexed> AddToIndex(absl::string_view user_tag,
                                     const storage::v1::StoredSession& session,
                                     std::optional<IndexRecord> already_read, bool replaces_one,
                                     absl::Time deadline, Backoff* after_lost_race = nullptr);
  // How many entries `index` may have before a new session prunes it first.
  int PruneIndexAt(const storage::v1::UserSessionIndex& index) const;
  // Whether LiveSessions' sessions carry their attributes (only a listing answers with them).
  enum class Attributes { kKeep, kDrop };
  // What a count of the user's sessions against the limit needs besides the live ones: the
  // entries the index held when read, and how many of them are of creates (or rotations) whose
  // session is not stored yet.
  struct IndexCensus {
    std::unordered_set<std::string> token_hashes;
    int64_t adds_under_way = 0;
  };
  // OK when the user, holding `live` sessions as counted by LiveSessions (`census`), may have
  // one more: RESOURCE_EXHAUSTED at the limit, UNAVAILABLE when creates under way reach it.
  // `index_now` is the index as read after the count.
  absl::Status RoomForOneMore(size_t live, const IndexCensus& census,
                              const storage::v1::UserSessionIndex& index_now) const;
  // Drops index entries whose session is gone, expired, deleted or (below `generation`)
  // revoked, writing the tombstone of a revoked one that has none yet (and keeping its entry
  // when that fails); returns the live sessions. Reads them in batches (kSessionsPerRead).
  // Writing the pruned index back is best effort. Fills `census` when given.
  absl::StatusOr<std::vector<storage::v1::StoredSession>> LiveSessions(
      absl::string_view user_id, absl::string_view user_tag, uint64_t generation,
      Attributes attributes, absl::Time deadline, IndexCensus* census = nullptr);
  absl::Duration GenerationKeepFor() const;
  // Ends `s`, stored under `key`, at `now` with a tombstone on every copy (see SessionStore::Put).
  absl::Status PutTombstone(const SessionKey& key, const storage::v1::StoredSession& s,
                            absl::Time now, absl::Time deadline);
  // Rotate's last step after a compare-and-swap whose answer was lost but which took effect:
  // the end of the old session (`ended_old`) written to every copy again. When some copy did
  // not take it, the new session is removed again (it was never handed out).
  absl::StatusOr<SessionView> FinishRotation(const SessionKey& old_key,
                                             const storage::v1::StoredSession& ended_old,
                                             absl::Duration ttl, const SessionKey& new_key,
                                             SessionView view, absl::Time deadline);
  // A rotation whose end of the old session reached some copies only (`why`): removes the new
  // session, never handed out, and says so.
  absl::Status RotationNotEverywhere(const SessionKey& new_key, const absl::Status& why,
                                     absl::Time deadline);

  std::shared_ptr<SessionStore> store_;
  const Clock& clock_;
  SessionServiceOptions options_;
  // Bytes of the listings being assembled now (limits.max_listing_bytes_in_flight).
  std::atomic<size_t> listing_bytes_in_flight_{0};
};

// TokenAuthenticator for the ledger: a thin adapter that maps NOT_FOUND (and a malformed token)
// to UNAUTHENTICATED, and every other failure of the session store to UNAVAILABLE. Thread-safe.
class SessionTokenAuthenticator final : public TokenAuthenticator {
 public:
  explicit SessionTokenAuthenticator(std::shared_ptr<SessionService> sessions)
      : sessions_(std::move(sessions)) {}
  absl::StatusOr<std::string> UserIdForToken(absl::string_view token, absl::Time deadline) override;

 private:
  std::shared_ptr<SessionService> sessions_;
};

// Validation helpers, exposed for tests.
// 1..max_bytes of UTF-8 without control characters (C0, DEL, C1).
absl::Status ValidateText(absl::string_view field, absl::string_view value, size_t max_bytes);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_SESSION_SESSION_SERVICE_H_
