#ifndef SESSIONLEDGER_SERVER_MEMCACHED_MEMCACHED_SESSION_STORE_H_
#define SESSIONLEDGER_SERVER_MEMCACHED_MEMCACHED_SESSION_STORE_H_

#include <ctime>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/common/blocking_executor.h"
#include "server/domain/session_store.h"
#include "server/memcached/memcached_pool.h"

namespace sessionledger {

// The exptime that keeps a memcached item for at least `ttl` from `now`; INVALID_ARGUMENT
// above kMaxStoreTtl. Relative seconds up to memcached's limit for them, 30 days; above it, a
// Unix time (memcached reads every exptime above 30 days as one, against the wall clock of its
// host, which must agree with ours as NTP keeps it). memcached's clock is a count of whole
// seconds that a timer refreshes about once a second, so an exptime can lapse up to two
// seconds early:
//  - one second from rounding: the clock lags real time by the timer's phase, up to a second;
//  - one more when the timer's drift carries that phase across a second boundary: the clock
//    then steps by two. The drift measured on Debian 12's memcached 1.6.18 is about 0.8 ms per
//    tick, so every node steps once in roughly twenty minutes and any session living longer
//    than that meets a step.
absl::StatusOr<time_t> MemcachedExptime(absl::Duration ttl, absl::Time now = absl::Now());

// SessionStore on Memcached (libmemcached through MemcachedPool).
//
// Keys (all derived from digests, never from a token or user_id in clear):
//   sl:v1:s:<hex SHA-256(token)>  StoredSession (protobuf)
//   sl:v1:g:<user tag>            the user's revocation generation (decimal)
//   sl:v1:u:<user tag>            UserSessionIndex (protobuf)
//
// Placement and replicas. Every key of one user is stored with the libmemcached "by key"
// calls under a group key derived from the user tag, so a session and its user's generation
// sit on the same node and GetSession needs one multi-get. With `replicas` = N there are N + 1
// copies, copy i under group key i; the group keys are picked (deterministically, from the
// ketama ring of the node list, the same in every server process) so that copies land on
// distinct nodes. libmemcached's own NUMBER_OF_REPLICAS is not used: it does not combine with
// CAS, and a node that restarts empty answers "miss" for keys it held.
//
// Lookup reads every copy (one multi-get of session + generation per copy; a single round trip
// when replicas = 0), because only reading a copy shows that it is missing: a node that
// restarted empty is repaired (add) by the first read, whichever copy it holds. The copies are
// reconciled: a tombstone anywhere wins, then the highest version; the generation is the highest
// any copy holds and is written back where it is missing, so a restarted node can neither lose
// a session nor un-revoke one. A copy that answers "miss" is trusted over copies that do not
// answer (NOT_FOUND rather than UNAVAILABLE). Index and list reads stop at the first copy that
// has the value. Writes: CAS (or add) on the first copy that answers (the primary), then on
// the others only where they still hold what was read (CasToken::copies); ends (tombstones, a
// generation) are written to every copy unconditionally.
//
// Consistency trade-off (documented, deliberate): while every node is up, all writers of a key
// meet on copy 0, so compare-and-swap is exact. During a node failure writers fall over to the
// next copy; if two processes disagree about whether copy 0 is reachable at the same instant, or
// copy 0 comes back with stale data after a network partition (not a restart), a concurrent
// unconditional update can be lost (last writer wins on the secondary). Deletions write
// tombstones on every copy and revocation uses a max-only generation, so neither a deleted nor
// a revoked session comes back through read repair. Secondary copies are best effort: a write
// succeeds when the primary took it.
//
// Status codes: UNAVAILABLE when no copy answered before the deadline (connection refused,
// timeout, pool exhausted); ABORTED on CAS conflicts; ALREADY_EXISTS from Add; INVALID_ARGUMENT
// for a TTL above 30 days. Thread-safe (one pooled handle per call).
class MemcachedSessionStore final : public SessionStore {
 public:
  // `replicas`: extra copies (MEMCACHED_URL ?replicas=N), capped by the node count.
  // `executor` runs the blocking part of the asynchronous methods (repairs, and everything when
  // the pool has no pipeline); null runs it on the calling thread.
  MemcachedSessionStore(MemcachedPool& pool, int replicas, BlockingExecutor* executor = nullptr)
      : pool_(pool), replicas_(replicas), executor_(executor) {}

  absl::StatusOr<SessionLookup> Lookup(const SessionKey& key, absl::Time deadline) override;
  // Reads every copy at once through the pipeline and answers on its I/O thread when no copy
  // needs repair; otherwise (and without a pipeline) runs Lookup on the executor.
  void LookupAsync(const SessionKey& key, absl::Time deadline, LookupCallback done) override;
  absl::StatusOr<SessionLookup> Peek(const SessionKey& key, absl::Time deadline) override;
  absl::Status Add(const SessionKey& key, const storage::v1::StoredSession& session,
                   absl::Duration ttl, absl::Time deadline) override;
  absl::Status CompareAndSwap(const SessionKey& key, const CasToken& cas,
                              const storage::v1::StoredSession& session, absl::Duration ttl,
                              absl::Time deadline) override;
  absl::Status CompareAndSwapEveryCopy(const SessionKey& key, const CasToken& cas,
                                       const storage::v1::StoredSession& session,
                                       absl::Duration ttl, absl::Time deadline) override;
  absl::Status Put(const SessionKey& key, const storage::v1::StoredSession& session,
                   absl::Duration ttl, absl::Time deadline) override;
  absl::Status Remove(const SessionKey& key, absl::Time deadline) override;
  absl::StatusOr<uint64_t> ReadGeneration(absl::string_view user_tag, absl::Duration keep_for,
                                          absl::Time deadline) override;
  absl::StatusOr<GenerationAdvance> AdvanceGeneration(absl::string_view user_tag, uint64_t at_least,
                                                      absl::Duration keep_for,
                                                      absl::Time deadline) override;
  absl::StatusOr<IndexRecord> ReadIndex(absl::string_view user_tag, absl::Time deadline) override;
  // One multi-get per copy for both keys (they share the user's group key, so one node).
  absl::StatusOr<UserState> ReadUserState(absl::string_view user_tag,
                                          absl::Duration keep_generation_for,
                                          absl::Time deadline) override;
  absl::Status WriteIndex(absl::string_view user_tag, const std::optional<CasToken>& cas,
                          const storage::v1::UserSessionIndex& index, absl::Duration ttl,
                          absl::Time deadline) override;
  // CreateSession's and UpdateSession's steps through the pipeline, answering on its I/O
  // thread (a request refused before it is sent, such as a TTL above 30 days or a CAS token of
  // no copy, is answered at once). ReadUserStateAsync writes nothing: when the generation must be
  // kept alive (a revoked user) or an index copy repaired, it runs ReadUserState on the executor.
  // The writes take the primary copy first, then the others, as their blocking forms do.
  // Without a pipeline, each runs its blocking form on the executor.
  void ReadUserStateAsync(absl::string_view user_tag, absl::Duration keep_generation_for,
                          absl::Time deadline, UserStateCallback done) override;
  void WriteIndexAsync(absl::string_view user_tag, const std::optional<CasToken>& cas,
                       const storage::v1::UserSessionIndex& index, absl::Duration ttl,
                       absl::Time deadline, StatusCallback done) override;
  void AddAsync(const SessionKey& key, const storage::v1::StoredSession& session,
                absl::Duration ttl, absl::Time deadline, StatusCallback done) override;
  void CompareAndSwapAsync(const SessionKey& key, const CasToken& cas,
                           const storage::v1::StoredSession& session, absl::Duration ttl,
                           absl::Time deadline, StatusCallback done) override;
  absl::StatusOr<std::vector<std::optional<storage::v1::StoredSession>>> ReadSessions(
      absl::string_view user_tag, const std::vector<std::string>& token_hashes,
      absl::Time deadline) override;

  // The memcached keys, exposed for tests that inspect the nodes.
  static std::string SessionKeyName(absl::string_view token_hash);
  static std::string GenerationKeyName(absl::string_view user_tag);
  static std::string IndexKeyName(absl::string_view user_tag);

 private:
  // Lookup on the executor (or here, without one), answering through `done`.
  void LookupBlocking(const SessionKey& key, absl::Time deadline, LookupCallback done);
  // ReadUserState on the executor (or here, without one), answering through `done`.
  void ReadUserStateBlocking(std::string user_tag, absl::Duration keep_generation_for,
                             absl::Time deadline, UserStateCallback done);
  // Runs `work` on the executor (or here, without one).
  void RunBlocking(absl::AnyInvocable<void() &&> work);
  // What a value written to every copy is, which decides what a copy that took another write
  // since it was read is left holding: the state that wins (a session), or both's entries (an
  // index).
  enum class CopyKind { kSession, kIndex };
  // The asynchronous writes: `value` (a `kind`) under `key_name` among `user_tag`'s copies, by
  // CAS on the copy `cas` names, or by add when there is none. When the pipeline cannot place every
  // copy, the write `blocking` returns (the same write through libmemcached) runs on the executor;
  // it is made only then, so the hot path copies nothing for it.
  using BlockingWrite = absl::AnyInvocable<absl::Status() &&>;
  void WriteCopiesAsync(absl::string_view user_tag, std::string key_name, std::string value,
                        CopyKind kind, const std::optional<CasToken>& cas, absl::Duration ttl,
                        absl::Time deadline, absl::FunctionRef<BlockingWrite()> blocking,
                        StatusCallback done);

  MemcachedPool& pool_;
  const int replicas_;
  BlockingExecutor* const executor_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_MEMCACHED_MEMCACHED_SESSION_STORE_H_
