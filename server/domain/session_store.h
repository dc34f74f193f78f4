#ifndef SESSIONLEDGER_SERVER_DOMAIN_SESSION_STORE_H_
#define SESSIONLEDGER_SERVER_DOMAIN_SESSION_STORE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "sessionledger/storage/v1/stored_session.pb.h"

namespace sessionledger {

// Where a session lives. Both parts are lower-case hex digests, never secrets:
//   token_hash  SHA-256 of the token (the session's key suffix);
//   user_tag    the first 16 bytes of SHA-256(user_id): groups every key of one user, so a
//               session and its user's revocation generation can be read in one round trip.
struct SessionKey {
  std::string token_hash;
  std::string user_tag;
};

// What one copy held when a value was read (see CasToken::copies).
struct CopyCas {
  // False when the copy did not answer the read, or was written since: its state is unknown.
  bool known = false;
  // Its CAS value; 0 when it held no value.
  uint64_t cas = 0;
};

// Opaque compare-and-swap token of one read: which copy answered and its CAS value.
struct CasToken {
  CasToken() = default;
  CasToken(uint64_t cas, int copy, std::vector<CopyCas> copies = {})
      : cas(cas), copy(copy), copies(std::move(copies)) {}

  uint64_t cas = 0;
  int copy = 0;
  // What every copy held at the read, by copy; empty with a single copy, or when unknown for
  // all. A write through this token reaches the other copies only where they still hold what
  // was read: compare-and-swap where they held a value, add where they held none, nothing
  // where it is unknown (a session's next read repairs it; the next write of an index read
  // from every copy, merging their entries, brings that copy up to date). A copy that took
  // another write since is read again and gets what wins of the two: the later state of a
  // session (a tombstone stays), both writers' entries of an index. A plain set there could
  // land late, behind other requests on its connection, and undo what came since: a deletion's
  // tombstone, which would bring the session back once the node holding the tombstone restarted
  // empty, or another writer's newer state.
  std::vector<CopyCas> copies;
};

struct SessionRecord {
  storage::v1::StoredSession session;
  CasToken cas;
};

struct SessionLookup {
  // Absent when no copy holds the key.
  std::optional<SessionRecord> record;
  // The user's current revocation generation (0 when the user was never revoked).
  uint64_t user_generation = 0;
  // False when some copy did not answer: it may hold a state the answer does not show (a live
  // session where the others have none), which an end must not overlook.
  bool every_copy_answered = true;
};

// What AdvanceGeneration did: the highest generation the copies held (0: none), and the one it
// raised them to. Sessions stamped from `found` up to below `raised_to` are the ones it ended.
struct GenerationAdvance {
  uint64_t found = 0;
  uint64_t raised_to = 0;
};

// The payload key of an UNAVAILABLE that Put or AdvanceGeneration answer when some copies, but
// not all, took the write: the end then holds where it landed.
inline constexpr char kPartialWritePayload[] = "sessionledger.dev/partial-write";

// The words for callers (ForCallers) of the INVALID_ARGUMENT a store answers when the backing
// store refused a write as larger than it takes in one item (memcached -I below what
// MAX_SESSION_ATTRIBUTES_BYTES allows). They name the session's attributes; SessionService
// names the user when the item was the user's session index.
inline constexpr char kSessionTooLargeForAnItem[] =
    "attributes: the session is larger than the session store takes in one item";

struct IndexRecord {
  storage::v1::UserSessionIndex index;
  // Absent when the user has no index yet (write it with `cas` = nullopt to create it).
  std::optional<CasToken> cas;
};

// What creating a session for a user needs to know first.
struct UserState {
  uint64_t generation = 0;
  IndexRecord index;
};

// Storage of sessions, per-user revocation generations and per-user session indexes. Knows
// nothing of the session rules (expiry, versions, limits): the session layer decides, the store
// keeps bytes with a Memcached-style relative TTL (1 s .. 30 days; longer is INVALID_ARGUMENT).
//
// Every method blocks at most until `deadline` and returns UNAVAILABLE when the backing service
// cannot answer in time. Implementations are thread-safe.
class SessionStore {
 public:
  virtual ~SessionStore() = default;

  // The session under `key` and its user's generation, read together (one round trip per
  // copy). NOT_FOUND is never returned: a missing session is an empty `record`.
  virtual absl::StatusOr<SessionLookup> Lookup(const SessionKey& key, absl::Time deadline) = 0;

  // Lookup that answers through `done` instead of returning, for callers that must not block
  // (gRPC callback handlers). `done` runs exactly once, possibly before LookupAsync returns,
  // possibly on another thread, and must not block. This default runs Lookup on the calling
  // thread; a store with non-blocking I/O overrides it.
  using LookupCallback = absl::AnyInvocable<void(absl::StatusOr<SessionLookup>) &&>;
  virtual void LookupAsync(const SessionKey& key, absl::Time deadline, LookupCallback done) {
    std::move(done)(Lookup(key, deadline));
  }

  // Asynchronous forms of ReadUserState, WriteIndex, Add (CreateSession's steps) and
  // CompareAndSwap (UpdateSession's and a touch's write), under LookupAsync's rules; these
  // defaults call the blocking form on the calling thread.
  using StatusCallback = absl::AnyInvocable<void(absl::Status) &&>;
  using UserStateCallback = absl::AnyInvocable<void(absl::StatusOr<UserState>) &&>;
  virtual void ReadUserStateAsync(absl::string_view user_tag, absl::Duration keep_generation_for,
                                  absl::Time deadline, UserStateCallback done) {
    std::move(done)(ReadUserState(user_tag, keep_generation_for, deadline));
  }
  virtual void WriteIndexAsync(absl::string_view user_tag, const std::optional<CasToken>& cas,
                               const storage::v1::UserSessionIndex& index, absl::Duration ttl,
                               absl::Time deadline, StatusCallback done) {
    std::move(done)(WriteIndex(user_tag, cas, index, ttl, deadline));
  }
  virtual void AddAsync(const SessionKey& key, const storage::v1::StoredSession& session,
                        absl::Duration ttl, absl::Time deadline, StatusCallback done) {
    std::move(done)(Add(key, session, ttl, deadline));
  }
  virtual void CompareAndSwapAsync(const SessionKey& key, const CasToken& cas,
                                   const storage::v1::StoredSession& session, absl::Duration ttl,
                                   absl::Time deadline, StatusCallback done) {
    std::move(done)(CompareAndSwap(key, cas, session, ttl, deadline));
  }

  // Like Lookup, for read-only paths (authentication): the same answer from every copy (a
  // deletion or revocation on any copy holds), but nothing is repaired.
  virtual absl::StatusOr<SessionLookup> Peek(const SessionKey& key, absl::Time deadline) = 0;

  // Stores a new session. ALREADY_EXISTS when the key is taken.
  virtual absl::Status Add(const SessionKey& key, const storage::v1::StoredSession& session,
                           absl::Duration ttl, absl::Time deadline) = 0;

  // Replaces the session read with `cas`. ABORTED when it changed or vanished since.
  virtual absl::Status CompareAndSwap(const SessionKey& key, const CasToken& cas,
                                      const storage::v1::StoredSession& session, absl::Duration ttl,
                                      absl::Time deadline) = 0;

  // CompareAndSwap for an end (a rotation's tombstone), which, as with Put, must reach every
  // copy. ABORTED as CompareAndSwap, having written nothing; OK only when every copy took it;
  // otherwise UNAVAILABLE, marked with kPartialWritePayload when the copy read took it.
  virtual absl::Status CompareAndSwapEveryCopy(const SessionKey& key, const CasToken& cas,
                                               const storage::v1::StoredSession& session,
                                               absl::Duration ttl, absl::Time deadline) = 0;

  // Unconditional write (tombstones) to every copy. OK only when every copy took it: an end
  // that reached one copy would come back if that copy's node restarted empty while another
  // still held the live session. UNAVAILABLE otherwise; the copies that took it keep it.
  virtual absl::Status Put(const SessionKey& key, const storage::v1::StoredSession& session,
                           absl::Duration ttl, absl::Time deadline) = 0;

  // Deletes the key from every copy; OK when every copy answered (the key is gone, or never was
  // there). UNAVAILABLE otherwise, marked with kPartialWritePayload when some copy deleted it.
  virtual absl::Status Remove(const SessionKey& key, absl::Time deadline) = 0;

  // The user's generation, making sure it is kept for at least `keep_for` from now (so that it
  // outlives every session created now).
  virtual absl::StatusOr<uint64_t> ReadGeneration(absl::string_view user_tag,
                                                  absl::Duration keep_for, absl::Time deadline) = 0;

  // Raises the user's generation to one above the highest stored value, or to `at_least` if
  // that is higher; every session created before is revoked from then on. Kept for `keep_for`.
  // As for Put, OK only when every copy took it; UNAVAILABLE otherwise, the revocation holding
  // where it did.
  virtual absl::StatusOr<GenerationAdvance> AdvanceGeneration(absl::string_view user_tag,
                                                              uint64_t at_least,
                                                              absl::Duration keep_for,
                                                              absl::Time deadline) = 0;

  virtual absl::StatusOr<IndexRecord> ReadIndex(absl::string_view user_tag,
                                                absl::Time deadline) = 0;
  // Creates (`cas` = nullopt) or replaces the index. ABORTED when another writer got there first.
  virtual absl::Status WriteIndex(absl::string_view user_tag, const std::optional<CasToken>& cas,
                                  const storage::v1::UserSessionIndex& index, absl::Duration ttl,
                                  absl::Time deadline) = 0;

  // ReadGeneration and ReadIndex together. This default makes two calls; a store that keeps
  // both next to each other overrides it to read them in one round trip.
  virtual absl::StatusOr<UserState> ReadUserState(absl::string_view user_tag,
                                                  absl::Duration keep_generation_for,
                                                  absl::Time deadline) {
    UserState state;
    absl::StatusOr<uint64_t> generation = ReadGeneration(user_tag, keep_generation_for, deadline);
    if (!generation.ok()) return generation.status();
    state.generation = *generation;
    absl::StatusOr<IndexRecord> index = ReadIndex(user_tag, deadline);
    if (!index.ok()) return index.status();
    state.index = *std::move(index);
    return state;
  }

  // Reads many sessions of one user (their keys share `user_tag`); the result is parallel to
  // `token_hashes`, nullopt for a missing one. Copies are weighed as Lookup weighs them (a
  // tombstone on any copy wins), and nothing is repaired.
  virtual absl::StatusOr<std::vector<std::optional<storage::v1::StoredSession>>> ReadSessions(
      absl::string_view user_tag, const std::vector<std::string>& token_hashes,
      absl::Time deadline) = 0;
};

// The longest TTL a store takes: the contract's longest session lifetime (30 days) and the
// minute a user's revocation generation is kept beyond it, with room to spare. (Memcached takes
// relative expirations up to 30 days only; the Memcached store writes a longer one as a Unix
// time, see MemcachedExptime.)
inline constexpr absl::Duration kMaxStoreTtl = absl::Hours(24 * 31);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_DOMAIN_SESSION_STORE_H_
