#include "server/memcached/memcached_session_store.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <optional>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/common/clock.h"
#include "server/common/status_macros.h"
#include "server/memcached/memcached_pipeline.h"

namespace sessionledger {

using storage::v1::StoredSession;
using storage::v1::UserSessionIndex;

namespace {

// Attempts when raising a generation copy by compare-and-swap; only concurrent revocations of
// the same user conflict there.
constexpr int kGenerationCasAttempts = 16;
// How many candidate group keys to try per copy when looking for a distinct node. With two
// nodes each candidate hits the other node with probability ~1/2.
constexpr int kPlacementProbes = 64;

// A result on the stack: libmemcached frees a heap-allocated result by itself when a fetch
// loop ends, so handing it one of ours would free it twice. This owns only the value buffer.
class ScopedResult {
 public:
  explicit ScopedResult(memcached_st* m) : ok_(memcached_result_create(m, &result_) != nullptr) {}
  ~ScopedResult() {
    if (ok_) memcached_result_free(&result_);
  }
  ScopedResult(const ScopedResult&) = delete;
  ScopedResult& operator=(const ScopedResult&) = delete;
  bool ok() const { return ok_; }
  memcached_result_st* get() { return &result_; }

 private:
  memcached_result_st result_;
  bool ok_;
};

using Item = MemcachedItem;

// Answers that prove the node is there (as opposed to connection failures and timeouts). An
// item too large for it is the caller's to fix, not the node's failure.
bool Answered(memcached_return_t rc) {
  return memcached_success(rc) || rc == MEMCACHED_NOTFOUND || rc == MEMCACHED_NOTSTORED ||
         rc == MEMCACHED_DATA_EXISTS || rc == MEMCACHED_END || rc == MEMCACHED_E2BIG;
}

// Seconds left until `micros` (a Unix time), as an exptime; 0 when it has passed.
time_t SecondsUntil(int64_t micros) {
  const absl::Time now = absl::Now();
  const absl::Duration left = absl::FromUnixMicros(micros) - now;
  if (left <= absl::ZeroDuration()) return 0;
  return *MemcachedExptime(std::min(left, kMaxStoreTtl), now);
}

}  // namespace

absl::StatusOr<time_t> MemcachedExptime(absl::Duration ttl, absl::Time now) {
  if (ttl > kMaxStoreTtl) {
    return absl::InvalidArgumentError(absl::StrCat("memcached TTL ", absl::FormatDuration(ttl),
                                                   " is above ",
                                                   absl::FormatDuration(kMaxStoreTtl)));
  }
  // Two seconds over the TTL, one for each way memcached's clock runs ahead of an item (see the
  // header). The session layer checks expires_at itself, so lingering longer is harmless;
  // lapsing early is not (a live session would answer NOT_FOUND, a revoked one come back).
  const int64_t seconds = absl::ToInt64Seconds(absl::Ceil(ttl, absl::Seconds(1))) + 2;
  if (seconds <= kMaxRelativeExptimeSeconds) return static_cast<time_t>(seconds);
  // One more for the fraction of a second that ToUnixSeconds drops.
  return static_cast<time_t>(absl::ToUnixSeconds(now) + 1 + seconds);
}

namespace {

uint64_t ParseGeneration(const std::string& text) {
  uint64_t value = 0;
  return absl::SimpleAtoi(text, &value) ? value : 0;
}

// Where one copy of a user's keys lives: the group key for libmemcached's *_by_key calls and the
// index of the node it hashes to (for the pipeline; -1 if unknown).
struct CopyPlace {
  std::string group;
  int node = -1;
};

// Group key of each copy such that the copies land on distinct nodes of the ketama ring.
std::vector<CopyPlace> PlaceCopies(const MemcachedPool& pool, int replicas,
                                   absl::string_view user_tag) {
  const int copies = std::max(1, std::min(replicas + 1, pool.node_count()));
  std::vector<CopyPlace> places;
  for (int c = 0; c < copies; ++c) {
    for (int probe = 0; probe < kPlacementProbes; ++probe) {
      CopyPlace place;
      place.group = (c == 0 && probe == 0) ? std::string(user_tag)
                                           : absl::StrCat(user_tag, "#", c, ".", probe);
      place.node = pool.NodeForGroupKey(place.group);
      if (place.node < 0) continue;
      const bool taken = std::any_of(places.begin(), places.end(),
                                     [&](const CopyPlace& p) { return p.node == place.node; });
      if (taken) continue;
      places.push_back(std::move(place));
      break;
    }
  }
  if (places.empty()) places.push_back(CopyPlace{std::string(user_tag), -1});
  return places;
}

// A node that did not answer after keeping an operation waiting this long counts as stalled
// (a refused connection fails at once and does not), unless the wait was cut short by the
// caller's deadline rather than by the node's own timeouts.
constexpr absl::Duration kStallEvidence = absl::Milliseconds(100);

// What an add's writes to the other copies go by: none held the key, so each is added there too
// and whatever a copy took since (a tombstone) stays.
std::vector<CopyCas> NoCopyHeldIt(int copies) {
  return std::vector<CopyCas>(static_cast<size_t>(copies), CopyCas{true, 0});
}

// Two copies of one state of a session, but for expires_at: a touch slides the expiry without
// a new version, and may have reached only the secondary (the primary skipped for a second).
bool SameStateExpiringLater(const StoredSession& candidate, const StoredSession& chosen) {
  return candidate.deleted() == chosen.deleted() && candidate.version() == chosen.version() &&
         candidate.expires_at_unix_micros() > chosen.expires_at_unix_micros();
}

// Which of two copies of a session is authoritative: a tombstone anywhere wins (a deletion must
// stick), then the highest version, then the later expiry (expiries only move forward); on a
// tie the one already chosen (the earlier copy, the primary) stays.
bool Supersedes(const StoredSession& candidate, const StoredSession& chosen) {
  return (candidate.deleted() && !chosen.deleted()) ||
         (candidate.deleted() == chosen.deleted() && candidate.version() > chosen.version()) ||
         SameStateExpiringLater(candidate, chosen);
}

// Adds to `into` the entries of `from` that it lacks.
void AddMissingEntries(const UserSessionIndex& from, UserSessionIndex& into) {
  absl::flat_hash_set<std::pair<absl::string_view, absl::string_view>> held;
  held.reserve(static_cast<size_t>(into.entries_size()));
  for (const auto& e : into.entries()) held.emplace(e.token_hash(), e.session_id());
  for (const auto& entry : from.entries()) {
    if (!held.contains({entry.token_hash(), entry.session_id()})) *into.add_entries() = entry;
  }
}

// What a write to one of the other copies puts there when that copy took another write after it
// was read (its compare-and-swap or add was refused): a copy left as it was would lack what this
// write brought, unseen, until the primary lost it and the copy's older state came back.
struct CopyRewrite {
  std::string value;
  time_t expiration = 0;
};
// Given our value and what the copy holds now (null: nothing), what to write there instead of
// it, or nullopt to leave the copy as it is.
using CopyMerge = std::optional<CopyRewrite> (*)(const std::string& ours, time_t expiration,
                                                 const std::string* theirs);

// A session copy takes ours unless it holds a state that wins over it (a tombstone, a later
// version): Supersedes decides, as it does between copies on a read.
std::optional<CopyRewrite> MergeSessionCopy(const std::string& ours, time_t expiration,
                                            const std::string* theirs) {
  StoredSession held;
  if (theirs == nullptr || !held.ParseFromString(*theirs)) return CopyRewrite{ours, expiration};
  StoredSession written;
  if (!written.ParseFromString(ours) || !Supersedes(written, held)) return std::nullopt;
  return CopyRewrite{ours, expiration};
}

// The later of two memcached expirations (relative seconds or a Unix time, see MemcachedExptime).
time_t LaterExpiration(time_t a, time_t b) {
  const int64_t now = absl::ToUnixSeconds(absl::Now());
  const auto absolute = [now](time_t e) -> int64_t {
    return e <= kMaxRelativeExptimeSeconds ? now + e : static_cast<int64_t>(e);
  };
  return absolute(a) >= absolute(b) ? a : b;
}

// An index copy takes ours with the live entries only it holds added (an index has no
// tombstones: an entry that should not be there is dropped by the next listing, while one
// missing hides a live session from listing and revocation), kept as long as its
// longest-lived entry.
std::optional<CopyRewrite> MergeIndexCopy(const std::string& ours, time_t expiration,
                                          const std::string* theirs) {
  UserSessionIndex held;
  if (theirs == nullptr || !held.ParseFromString(*theirs)) return CopyRewrite{ours, expiration};
  UserSessionIndex merged;
  if (!merged.ParseFromString(ours)) return std::nullopt;
  const int64_t now = absl::ToUnixMicros(absl::Now());
  UserSessionIndex live_held;
  for (const auto& entry : held.entries()) {
    if (entry.absolute_expires_at_unix_micros() > now) *live_held.add_entries() = entry;
  }
  const int ours_entries = merged.entries_size();
  AddMissingEntries(live_held, merged);
  if (merged.entries_size() == ours_entries) return CopyRewrite{ours, expiration};
  int64_t newest = 0;
  for (const auto& entry : merged.entries()) {
    newest = std::max(newest, entry.absolute_expires_at_unix_micros());
  }
  return CopyRewrite{merged.SerializeAsString(), LaterExpiration(expiration, SecondsUntil(newest))};
}

// How many times a write to another copy reads it again and retries when it keeps changing
// under the write; past that, the writers it keeps meeting carry the copy forward themselves.
constexpr int kCopyRewriteAttempts = 4;

// Whether a store was refused because the copy holds something else than the write expected
// (as opposed to the node failing to answer).
bool Refused(memcached_return_t rc) {
  return rc == MEMCACHED_DATA_EXISTS || rc == MEMCACHED_NOTFOUND || rc == MEMCACHED_NOTSTORED;
}

// One call's view of memcached: a pooled handle, the group key of each copy, the deadline.
class Conn {
 public:
  // The deadline is read against the wall clock here, once: a step of that clock later in the
  // call (NTP, a resumed VM) neither cuts its remaining round trips short nor stretches them.
  static absl::StatusOr<Conn> Open(MemcachedPool& pool, int replicas, absl::string_view user_tag,
                                   absl::Time deadline) {
    const SteadyTime give_up = SteadyDeadline(deadline, pool.options().wall_clock);
    SL_ASSIGN_OR_RETURN(MemcachedPool::Lease lease, pool.Acquire(give_up));
    return Conn(std::move(lease), pool.options(), give_up, PlaceCopies(pool, replicas, user_tag));
  }

  int copies() const { return static_cast<int>(copies_.size()); }

  // Multi-get of `keys` on copy `copy`: the hits, or UNAVAILABLE when the node did not answer.
  absl::StatusOr<std::map<std::string, Item>> Get(int copy, const std::vector<std::string>& keys) {
    SL_RETURN_IF_ERROR(Ready(copy));
    std::vector<const char*> ptrs;
    std::vector<size_t> lens;
    for (const std::string& k : keys) {
      ptrs.push_back(k.data());
      lens.push_back(k.size());
    }
    const std::string& group = copies_[copy].group;
    memcached_return_t rc = memcached_mget_by_key(m(), group.data(), group.size(), ptrs.data(),
                                                  lens.data(), keys.size());
    if (!memcached_success(Counted(copy, rc))) return MemcachedStatus(rc, "get");
    ScopedResult result(m());
    if (!result.ok()) return absl::UnavailableError("memcached: out of memory");
    std::map<std::string, Item> hits;
    while (memcached_fetch_result(m(), result.get(), &rc) != nullptr) {
      if (!memcached_success(rc)) break;
      Item item;
      item.value.assign(memcached_result_value(result.get()),
                        memcached_result_length(result.get()));
      item.cas = memcached_result_cas(result.get());
      hits.emplace(std::string(memcached_result_key_value(result.get()),
                               memcached_result_key_length(result.get())),
                   std::move(item));
    }
    if (rc != MEMCACHED_END && rc != MEMCACHED_NOTFOUND && !memcached_success(rc)) {
      return MemcachedStatus(Counted(copy, rc), "get");
    }
    return hits;
  }

  enum class Op { kAdd, kSet, kCas };
  // The raw return code: callers tell "answered" (stored / exists / not found) from failures.
  memcached_return_t Store(Op op, int copy, const std::string& key, const std::string& value,
                           time_t expiration, uint64_t cas = 0) {
    if (!Ready(copy).ok()) return MEMCACHED_TIMEOUT;
    const std::string& g = copies_[copy].group;
    switch (op) {
      case Op::kAdd:
        return Counted(copy, memcached_add_by_key(m(), g.data(), g.size(), key.data(), key.size(),
                                                  value.data(), value.size(), expiration, 0));
      case Op::kSet:
        return Counted(copy, memcached_set_by_key(m(), g.data(), g.size(), key.data(), key.size(),
                                                  value.data(), value.size(), expiration, 0));
      case Op::kCas:
        return Counted(copy, memcached_cas_by_key(m(), g.data(), g.size(), key.data(), key.size(),
                                                  value.data(), value.size(), expiration, 0, cas));
    }
    return MEMCACHED_FAILURE;
  }

  memcached_return_t Delete(int copy, const std::string& key) {
    if (!Ready(copy).ok()) return MEMCACHED_TIMEOUT;
    const std::string& g = copies_[copy].group;
    return Counted(copy,
                   memcached_delete_by_key(m(), g.data(), g.size(), key.data(), key.size(), 0));
  }

  memcached_return_t Touch(int copy, const std::string& key, time_t expiration) {
    if (!Ready(copy).ok()) return MEMCACHED_TIMEOUT;
    const std::string& g = copies_[copy].group;
    return Counted(
        copy, memcached_touch_by_key(m(), g.data(), g.size(), key.data(), key.size(), expiration));
  }

  // Add on the first copy that answers, then on the others, where a value written since (a
  // tombstone) stays as `merge` decides. ABORTED when the primary already holds the key.
  absl::Status AddOnEveryCopy(const std::string& key, const std::string& value, time_t expiration,
                              CopyMerge merge) {
    absl::Status last = absl::UnavailableError("memcached: no node answered");
    for (int c = 0; c < copies(); ++c) {
      const memcached_return_t rc = Store(Op::kAdd, c, key, value, expiration);
      if (memcached_success(rc)) {
        if (copies() > 1) WriteOthers(c, key, value, expiration, NoCopyHeldIt(copies()), merge);
        return absl::OkStatus();
      }
      if (rc == MEMCACHED_NOTSTORED || rc == MEMCACHED_DATA_EXISTS) {
        return absl::AbortedError("memcached add: key exists");
      }
      last = MemcachedStatus(rc, "add");
      // A value too large for one copy is too large for every one; anything else (a node out
      // of memory, say) may be that node's alone, and the next copy may take the write.
      if (rc == MEMCACHED_E2BIG) return last;
    }
    return last;
  }

  // CAS on the copy the value was read from, then on the others where they still hold what the
  // read saw (CasToken::copies); one that changed since gets what `merge` makes of it.
  absl::Status CasThenWriteOthers(const CasToken& token, const std::string& key,
                                  const std::string& value, time_t expiration, CopyMerge merge) {
    SL_RETURN_IF_ERROR(Cas(token.copy, token.cas, key, value, expiration));
    WriteOthers(token.copy, key, value, expiration, token.copies, merge);
    return absl::OkStatus();
  }

  // CAS for an end: OK only when every copy stored it, as SetEveryCopy. The others are set
  // unconditionally: a tombstone overwriting whatever came since is what an end means.
  absl::Status CasThenSetEveryCopy(int copy, uint64_t cas, const std::string& key,
                                   const std::string& value, time_t expiration) {
    SL_RETURN_IF_ERROR(Cas(copy, cas, key, value, expiration));
    return SetCopies(key, value, expiration, /*done=*/copy);
  }

  // Set on every copy; OK only when every copy stored it. The copies that did keep it.
  absl::Status SetEveryCopy(const std::string& key, const std::string& value, time_t expiration) {
    return SetCopies(key, value, expiration, /*done=*/-1);
  }

  // Raises copy `copy` of a generation key to at least `target` (never lowers it) and keeps it
  // for `expiration`. False when the node did not answer.
  bool RaiseGeneration(int copy, const std::string& key, uint64_t target, time_t expiration) {
    const std::string text = absl::StrCat(target);
    for (int attempt = 0; attempt < kGenerationCasAttempts; ++attempt) {
      absl::StatusOr<std::map<std::string, Item>> got = Get(copy, {key});
      if (!got.ok()) return false;
      auto it = got->find(key);
      memcached_return_t rc;
      if (it == got->end()) {
        rc = Store(Op::kAdd, copy, key, text, expiration);
      } else if (ParseGeneration(it->second.value) >= target) {
        rc = Touch(copy, key, expiration);
        // Gone since the read (evicted, or expired that moment): read again, and add it.
        if (rc == MEMCACHED_NOTFOUND) continue;
        return Answered(rc);
      } else {
        rc = Store(Op::kCas, copy, key, text, expiration, it->second.cas);
      }
      if (memcached_success(rc)) return true;
      if (!Answered(rc)) return false;
    }
    return true;  // Lost every race: somebody else keeps raising it, which is as good.
  }

  // What a conditional write to one copy left there.
  struct CopyOutcome {
    std::optional<std::string> holding;  // The bytes this call left there; none when it wrote none.
    bool changed = false;                // The copy held something else than the write expected.
  };
  // Writes `value` to copy `c` while it still holds what was read there (`read_cas`; 0: nothing):
  // an add or a compare-and-swap. A copy that changed since is read again and takes what `merge`
  // makes of the two (RewriteCopy).
  CopyOutcome WriteUnlessChanged(int c, const std::string& key, const std::string& value,
                                 time_t expiration, uint64_t read_cas, CopyMerge merge) {
    const memcached_return_t rc = read_cas == 0
                                      ? Store(Op::kAdd, c, key, value, expiration)
                                      : Store(Op::kCas, c, key, value, expiration, read_cas);
    if (memcached_success(rc)) return {value, false};
    if (!Refused(rc)) return {};
    return {RewriteCopy(c, key, value, expiration, merge), true};
  }

 private:
  Conn(MemcachedPool::Lease lease, const MemcachedPoolOptions& options, SteadyTime give_up,
       std::vector<CopyPlace> copies)
      : lease_(std::move(lease)),
        options_(options),
        give_up_(give_up),
        copies_(std::move(copies)) {}

  memcached_st* m() const { return lease_.get(); }

  // Counts a node that did not answer (a replica may still have saved the call), so that
  // operators see a failing node before calls fail. A node that made us wait and then did not
  // answer is skipped for a while by every call of this process (see Ready).
  memcached_return_t Counted(int copy, memcached_return_t rc) {
    if (Answered(rc)) return rc;
    lease_.RecordNodeFailure();
    if (!op_cut_by_caller_ && SteadyNow() - op_started_ >= ToSteadyDuration(kStallEvidence)) {
      lease_.MarkNodeStalled(copies_[static_cast<size_t>(copy)].node);
    }
    return rc;
  }

  // One call may take several round trips; each gets only the time that is left. A copy on a
  // node that recently stalled is not asked at all: with replicas, a call makes several round
  // trips to each copy one after the other, and waiting out the I/O timeout on each would
  // spend the whole deadline on a node that the other copy makes unnecessary.
  absl::Status Ready(int copy) {
    op_started_ = SteadyNow();
    const absl::Duration left = absl::FromChrono(give_up_ - op_started_);
    if (left <= absl::ZeroDuration()) {
      return absl::UnavailableError("memcached: the call's deadline passed");
    }
    // A caller in a hurry may give up on a node that is merely slower than it would like.
    op_cut_by_caller_ = left < options_.io_timeout;
    if (lease_.NodeStalled(copies_[static_cast<size_t>(copy)].node, op_started_)) {
      return absl::UnavailableError("memcached: node stalled recently; not asked");
    }
    const auto ms = [](absl::Duration d) {
      return static_cast<uint64_t>(std::max<int64_t>(1, absl::ToInt64Milliseconds(d)));
    };
    memcached_behavior_set(m(), MEMCACHED_BEHAVIOR_POLL_TIMEOUT,
                           ms(std::min(left, options_.io_timeout)));
    memcached_behavior_set(m(), MEMCACHED_BEHAVIOR_CONNECT_TIMEOUT,
                           ms(std::min(left, options_.connect_timeout)));
    return absl::OkStatus();
  }

  // CAS on copy `copy`: ABORTED when the value changed or vanished since it was read.
  absl::Status Cas(int copy, uint64_t cas, const std::string& key, const std::string& value,
                   time_t expiration) {
    if (copy < 0 || copy >= copies()) return absl::AbortedError("memcached cas: stale copy");
    const memcached_return_t rc = Store(Op::kCas, copy, key, value, expiration, cas);
    if (memcached_success(rc)) return absl::OkStatus();
    if (Refused(rc)) return absl::AbortedError("memcached cas: changed concurrently");
    return MemcachedStatus(rc, "cas");
  }

  // Set on every copy but `done` (-1: none), which already holds the value. OK only when every
  // copy holds it; UNAVAILABLE otherwise, marked as a partial write when some copy does.
  absl::Status SetCopies(const std::string& key, const std::string& value, time_t expiration,
                         int done) {
    int stored = 0;
    absl::Status last;
    for (int c = 0; c < copies(); ++c) {
      if (c == done) {
        ++stored;
        continue;
      }
      const memcached_return_t rc = Store(Op::kSet, c, key, value, expiration);
      if (memcached_success(rc)) {
        ++stored;
      } else {
        last = MemcachedStatus(rc, "set");
      }
    }
    if (stored == copies()) return absl::OkStatus();
    absl::Status failed = absl::UnavailableError(absl::StrCat(
        "memcached: ", stored, " of ", copies(), " copies took the write (", last.message(), ")"));
    if (stored > 0) failed.SetPayload(kPartialWritePayload, absl::Cord("1"));
    return failed;
  }

  // Writes to every copy but `done` whose state `read` knows, while it still holds that state
  // (CasToken::copies); a copy that took another write since gets what `merge` makes of the two.
  // Best effort: a copy that does not answer is repaired by a later read.
  void WriteOthers(int done, const std::string& key, const std::string& value, time_t expiration,
                   const std::vector<CopyCas>& read, CopyMerge merge) {
    for (int c = 0; c < copies() && static_cast<size_t>(c) < read.size(); ++c) {
      const CopyCas& held = read[static_cast<size_t>(c)];
      if (c == done || !held.known) continue;
      (void)WriteUnlessChanged(c, key, value, expiration, held.cas, merge);
    }
  }

  // Copy `c` holds something else than a write to it expected: reads it again and writes what
  // `merge` makes of it and `ours`, conditionally on what it read, a few times at most. The
  // bytes the copy was left holding by this call, or nullopt when it wrote nothing there.
  std::optional<std::string> RewriteCopy(int c, const std::string& key, const std::string& ours,
                                         time_t expiration, CopyMerge merge) {
    for (int attempt = 0; attempt < kCopyRewriteAttempts; ++attempt) {
      absl::StatusOr<std::map<std::string, Item>> got = Get(c, {key});
      if (!got.ok()) return std::nullopt;
      const auto it = got->find(key);
      const Item* theirs = it == got->end() ? nullptr : &it->second;
      std::optional<CopyRewrite> rewrite =
          merge(ours, expiration, theirs == nullptr ? nullptr : &theirs->value);
      if (!rewrite.has_value()) return std::nullopt;
      const memcached_return_t rc =
          theirs == nullptr
              ? Store(Op::kAdd, c, key, rewrite->value, rewrite->expiration)
              : Store(Op::kCas, c, key, rewrite->value, rewrite->expiration, theirs->cas);
      if (memcached_success(rc)) return std::move(rewrite->value);
      if (!Refused(rc)) return std::nullopt;
    }
    return std::nullopt;
  }

  MemcachedPool::Lease lease_;
  const MemcachedPoolOptions& options_;
  SteadyTime give_up_;
  std::vector<CopyPlace> copies_;
  // How long the node took is measured on the steady clock: a wall-clock step forward would
  // otherwise mark a node that answered at once as stalled.
  SteadyTime op_started_;
  bool op_cut_by_caller_ = false;
};

// `last`, the error of the last copy that failed, or UNAVAILABLE when none was recorded. Callers
// keep `last` OK until a copy fails: an error with a message is a heap allocation, and reads
// and writes that succeed should not pay for one.
absl::Status LastCopyError(const absl::Status& last) {
  return last.ok() ? absl::UnavailableError("memcached: no node answered") : last;
}

// What each copy answered to one multi-get; nullopt for a copy that did not answer.
using CopyReads = std::vector<std::optional<std::map<std::string, Item>>>;

// What every copy answered, from each copy's own result: UNAVAILABLE (the last copy's error)
// when none answered.
absl::StatusOr<CopyReads> CopyReadsOf(std::vector<absl::StatusOr<MemcachedHits>> answers) {
  CopyReads reads(answers.size());
  absl::Status last;  // See LastCopyError.
  bool any = false;
  for (size_t c = 0; c < answers.size(); ++c) {
    if (!answers[c].ok()) {
      last = answers[c].status();
      continue;
    }
    reads[c] = *std::move(answers[c]);
    any = true;
  }
  if (!any) return LastCopyError(last);
  return reads;
}

// Reads `keys` from every copy, one after the other. UNAVAILABLE when none answered.
absl::StatusOr<CopyReads> ReadEveryCopy(Conn& conn, const std::vector<std::string>& keys) {
  std::vector<absl::StatusOr<MemcachedHits>> answers;
  for (int c = 0; c < conn.copies(); ++c) answers.push_back(conn.Get(c, keys));
  return CopyReadsOf(std::move(answers));
}

// What each copy held of `key` in `reads`, for a token's writes to the other copies
// (CasToken::copies); empty with a single copy, which has no other.
std::vector<CopyCas> CopyCasOf(const CopyReads& reads, const std::string& key) {
  std::vector<CopyCas> held;
  if (reads.size() < 2) return held;
  held.resize(reads.size());
  for (size_t c = 0; c < reads.size(); ++c) {
    if (!reads[c].has_value()) continue;
    held[c].known = true;
    if (auto it = reads[c]->find(key); it != reads[c]->end()) held[c].cas = it->second.cas;
  }
  return held;
}

// The highest generation any copy answered (0 when none holds the key).
uint64_t HighestGeneration(const std::string& gkey, const CopyReads& reads) {
  uint64_t highest = 0;
  for (const auto& read : reads) {
    if (!read.has_value()) continue;
    if (auto g = read->find(gkey); g != read->end()) {
      highest = std::max(highest, ParseGeneration(g->second.value));
    }
  }
  return highest;
}

// The user's generation from what the copies answered. Every copy that answered then holds it
// for `expiration` (a touch where it is already there; a repair where it is missing or lower),
// so that it outlives every session created now. Generation 0 (never revoked) is the absence
// of the key and needs no write.
uint64_t KeepGeneration(Conn& conn, const std::string& gkey, const CopyReads& reads,
                        time_t expiration) {
  const uint64_t generation = HighestGeneration(gkey, reads);
  if (generation == 0) return 0;
  for (int c = 0; c < conn.copies(); ++c) {
    const auto& read = reads[static_cast<size_t>(c)];
    if (!read.has_value()) continue;
    auto g = read->find(gkey);
    // A touch that finds the key gone since the read (evicted) repairs it as a missing copy.
    if (g != read->end() && ParseGeneration(g->second.value) == generation &&
        conn.Touch(c, gkey, expiration) != MEMCACHED_NOTFOUND) {
      continue;
    }
    conn.RaiseGeneration(c, gkey, generation, expiration);
  }
  return generation;
}

// Where a user's index was found among the copies' answers.
struct IndexPlan {
  // The index of the first copy that holds one (empty when none does), with the entries that
  // only later copies hold added; the CAS token is the first copy's.
  IndexRecord record;
  std::vector<int> missed;  // Copies before it that answered without it (came back empty).
};

// Copies of an index can differ: a node skipped while it stalled misses the writes of that
// time, and comes back with its older index. Taking the first copy alone would then hide the
// sessions indexed meanwhile from listing and revocation, and the next write would build on it
// and erase them from every copy. So every answering copy's entries count; an entry that is no
// longer live (deleted, rotated away, revoked) is dropped by the next listing, as any is.
IndexPlan PlanIndex(const CopyReads& reads, const std::string& ikey) {
  IndexPlan plan;
  std::vector<int> missed;
  const std::string* first_value = nullptr;
  for (size_t i = 0; i < reads.size(); ++i) {
    const auto& read = reads[i];
    if (!read.has_value()) continue;
    const int c = static_cast<int>(i);
    auto it = read->find(ikey);
    if (it == read->end()) {
      if (first_value == nullptr) missed.push_back(c);
      continue;
    }
    const std::string& value = it->second.value;
    if (first_value != nullptr && value == *first_value) continue;  // The usual case.
    UserSessionIndex index;
    if (!index.ParseFromString(value)) {
      if (first_value == nullptr) missed.push_back(c);
      continue;
    }
    if (first_value != nullptr) {
      AddMissingEntries(index, plan.record.index);
      continue;
    }
    first_value = &value;
    plan.record.index = std::move(index);
    plan.record.cas = CasToken{it->second.cas, c};
  }
  if (first_value != nullptr) {
    plan.missed = std::move(missed);  // Else nothing to repair from.
    plan.record.cas->copies = CopyCasOf(reads, ikey);
  }
  return plan;
}

// A CAS token's copy when no copy's CAS value is current: compare-and-swap fails at once.
constexpr int kNoCopy = -1;

// The CAS token of `key` on `copy`, just written there with `written`: only while the copy
// still holds those bytes. Another writer may have changed it between our write and this read;
// its CAS value with our older value would let a compare-and-swap overwrite that write unseen.
CasToken CasOfWhatWeWrote(Conn& conn, int copy, const std::string& key,
                          const std::string& written) {
  absl::StatusOr<std::map<std::string, Item>> again = conn.Get(copy, {key});
  if (!again.ok()) return CasToken{0, kNoCopy};
  auto it = again->find(key);
  if (it == again->end() || it->second.value != written) return CasToken{0, kNoCopy};
  return CasToken{it->second.cas, copy};
}

// What `copy` holds once this call wrote `written` there, for a token's writes to the other
// copies (CasToken::copies): its new CAS value, known only while it still holds those bytes.
// Left unknown, every later write would skip that copy, and each read repair it again: one
// write behind for good.
CopyCas CopyAfterOurWrite(Conn& conn, int copy, const std::string& key,
                          const std::string& written) {
  const CasToken read_back = CasOfWhatWeWrote(conn, copy, key, written);
  return read_back.copy == copy ? CopyCas{true, read_back.cas} : CopyCas{false, 0};
}

// The index from every copy that holds it; copies before the first of them that answered
// without it (a node that came back empty) get it back, and the CAS token is then the
// primary's.
IndexRecord IndexFromCopies(Conn& conn, const std::string& ikey, const CopyReads& reads) {
  IndexPlan plan = PlanIndex(reads, ikey);
  if (plan.missed.empty()) return std::move(plan.record);
  int64_t newest = 0;
  for (const auto& e : plan.record.index.entries()) {
    newest = std::max(newest, e.absolute_expires_at_unix_micros());
  }
  const time_t ttl = SecondsUntil(newest);
  // Every entry has expired (or none is left: an emptied index kept for a second), so the index
  // lists no live session: it is as good as absent. Copying it back would not do (a TTL of 0
  // would mean "never expire"), and without it on the primary no CAS value there would be
  // current, so every write of the index would be ABORTED until the stale copy expired.
  if (ttl <= 0) return IndexRecord{};
  const std::string value = plan.record.index.SerializeAsString();
  std::vector<CopyCas> held = std::move(plan.record.cas->copies);
  CasToken token{0, kNoCopy};
  for (int m : plan.missed) {
    // A copy that got an index since takes the entries it lacks (a concurrent writer's index
    // may lack ours).
    const Conn::CopyOutcome written =
        conn.WriteUnlessChanged(m, ikey, value, ttl, /*read_cas=*/0, MergeIndexCopy);
    // Known only where the copy holds what the record says: with entries merged in that the
    // record lacks, a write through its token would drop them there again.
    const CopyCas now_held =
        written.holding == value ? CopyAfterOurWrite(conn, m, ikey, value) : CopyCas{false, 0};
    if (static_cast<size_t>(m) < held.size()) held[static_cast<size_t>(m)] = now_held;
    if (m == plan.missed.front() && now_held.known) token = CasToken{now_held.cas, m};
  }
  token.copies = std::move(held);
  plan.record.cas = std::move(token);
  return std::move(plan.record);
}

// What one copy answered to a lookup's multi-get (session + generation).
struct CopyState {
  bool answered = false;
  std::optional<Item> session;  // Raw value, when present and parsable.
  StoredSession parsed;
  uint64_t generation = 0;
  bool has_generation = false;
};

// The copies of a lookup reconciled: which copy is authoritative and what the others lack.
struct LookupPlan {
  std::vector<CopyState> copies;
  int best = -1;              // The copy whose session wins; -1 when no copy holds the session.
  int primary = -1;           // The first copy that answered.
  uint64_t generation = 0;    // The highest any copy holds.
  std::vector<CopyCas> held;  // What each copy held of the session (CasToken::copies).
};

LookupPlan PlanLookup(CopyReads& reads, const std::string& skey, const std::string& gkey) {
  LookupPlan plan;
  plan.held = CopyCasOf(reads, skey);
  plan.copies.resize(reads.size());
  for (size_t i = 0; i < reads.size(); ++i) {
    if (!reads[i].has_value()) continue;
    const int c = static_cast<int>(i);
    CopyState& state = plan.copies[i];
    state.answered = true;
    if (plan.primary < 0) plan.primary = c;
    std::map<std::string, Item>& got = *reads[i];
    if (auto g = got.find(gkey); g != got.end()) {
      state.generation = ParseGeneration(g->second.value);
      state.has_generation = true;
      plan.generation = std::max(plan.generation, state.generation);
    }
    // An unparsable value counts as missing on this copy.
    if (auto it = got.find(skey);
        it != got.end() && state.parsed.ParseFromString(it->second.value)) {
      state.session = std::move(it->second);
      if (plan.best < 0 ||
          Supersedes(state.parsed, plan.copies[static_cast<size_t>(plan.best)].parsed)) {
        plan.best = c;
      }
    }
  }
  return plan;
}

// A copy that lacks the winning session or holds an older state of it (or an earlier expiry).
bool IsStale(const CopyState& copy, const CopyState& winner) {
  return !copy.session.has_value() || (winner.parsed.deleted() && !copy.parsed.deleted()) ||
         copy.parsed.version() < winner.parsed.version() ||
         SameStateExpiringLater(winner.parsed, copy.parsed);
}

bool LacksGeneration(const CopyState& copy, uint64_t generation) {
  return generation > 0 && (!copy.has_generation || copy.generation < generation);
}

// The generation is written back wherever an answering copy lacks it (or holds a lower one), so
// a restarted node cannot un-revoke a user.
void RepairGenerations(Conn& conn, const std::string& gkey, const LookupPlan& plan) {
  const time_t generation_ttl = *MemcachedExptime(kMaxStoreTtl);
  for (int c = 0; c < conn.copies(); ++c) {
    const CopyState& state = plan.copies[static_cast<size_t>(c)];
    if (state.answered && LacksGeneration(state, plan.generation)) {
      conn.RaiseGeneration(c, gkey, plan.generation, generation_ttl);
    }
  }
}

// True when a read-only answer would be wrong or incomplete: some answering copy lacks what
// the others hold, or the winner is not on the primary (its CAS value would not meet other
// writers). Lookup repairs those cases.
bool NeedsRepair(const LookupPlan& plan) {
  if (plan.best < 0) return false;  // Nothing to repair from.
  const CopyState* winner = &plan.copies[static_cast<size_t>(plan.best)];
  if (plan.best != plan.primary) return true;
  const bool live = SecondsUntil(winner->parsed.expires_at_unix_micros()) > 0;
  for (const CopyState& state : plan.copies) {
    if (!state.answered) continue;
    if (LacksGeneration(state, plan.generation)) return true;
    if (live && &state != winner && IsStale(state, *winner)) return true;
  }
  return false;
}

bool EveryCopyAnswered(const LookupPlan& plan) {
  return std::all_of(plan.copies.begin(), plan.copies.end(),
                     [](const CopyState& c) { return c.answered; });
}

// The lookup of a plan that needs no repair.
SessionLookup Settled(LookupPlan plan) {
  SessionLookup lookup;
  lookup.user_generation = plan.generation;
  lookup.every_copy_answered = EveryCopyAnswered(plan);
  if (plan.best < 0) return lookup;
  CopyState& winner = plan.copies[static_cast<size_t>(plan.best)];
  SessionRecord record;
  record.session = std::move(winner.parsed);
  record.cas = CasToken{winner.session->cas, plan.best, std::move(plan.held)};
  lookup.record = std::move(record);
  return lookup;
}

// The pipeline when it can reach every copy, else null (no pipeline, or a node it does not
// know): the caller then takes the blocking path.
MemcachedPipeline* PipelineFor(const MemcachedPool& pool, const std::vector<CopyPlace>& places) {
  MemcachedPipeline* pipeline = pool.pipeline();
  if (pipeline == nullptr) return nullptr;
  const bool known =
      std::all_of(places.begin(), places.end(), [](const CopyPlace& p) { return p.node >= 0; });
  return known ? pipeline : nullptr;
}

void CountFailure(MemcachedPool& pool, const absl::Status& status) {
  if (absl::IsUnavailable(status)) pool.RecordNodeFailure();
}

// ReadEveryCopy without blocking: every copy is read at once, and `done` gets what each
// answered once the last answer is in (on the pipeline's I/O thread).
using CopyReadsCallback = absl::AnyInvocable<void(absl::StatusOr<CopyReads>) &&>;
void ReadEveryCopyAsync(MemcachedPool& pool, MemcachedPipeline& pipeline,
                        const std::vector<CopyPlace>& places, const std::vector<std::string>& keys,
                        absl::Time deadline, CopyReadsCallback done) {
  struct Join {
    MemcachedPool* pool;
    std::vector<absl::StatusOr<MemcachedHits>> answers;
    std::atomic<size_t> pending;
    CopyReadsCallback done;
  };
  auto join = std::make_shared<Join>();
  join->pool = &pool;
  // Each slot is overwritten by its copy's answer before `done` runs. The placeholder has no
  // message, which keeps it off the heap (this runs for every read).
  join->answers.assign(places.size(), absl::Status(absl::StatusCode::kUnavailable, ""));
  join->pending.store(places.size());
  join->done = std::move(done);
  for (size_t c = 0; c < places.size(); ++c) {
    pipeline.GetAsync(places[c].node, keys, deadline, [join, c](absl::StatusOr<MemcachedHits> got) {
      CountFailure(*join->pool, got.status());
      join->answers[c] = std::move(got);
      if (join->pending.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
      std::move(join->done)(CopyReadsOf(std::move(join->answers)));
    });
  }
}

// One value written the way Conn::AddOnEveryCopy and Conn::CasThenWriteOthers write it (the
// primary copy first, then the others where they still hold what was read), without blocking: each
// step starts from the answer of the one before, on the pipeline's I/O thread.
struct CopyWrite {
  MemcachedPool* pool = nullptr;
  MemcachedPipeline* pipeline = nullptr;
  std::vector<CopyPlace> places;
  std::string key;
  std::string value;
  time_t expiration = 0;
  // What the other copies held when read (CasToken::copies), which their writes depend on.
  std::vector<CopyCas> held;
  // What a copy that changed since takes (see Conn::WriteOthers).
  CopyMerge merge = nullptr;
  absl::Time deadline;
  SessionStore::StatusCallback done;
  absl::Status last;  // The last copy's error; see LastCopyError.
  std::atomic<size_t> writes_pending{0};

  int copies() const { return static_cast<int>(places.size()); }
};

std::shared_ptr<CopyWrite> NewCopyWrite(MemcachedPool& pool, MemcachedPipeline& pipeline,
                                        std::vector<CopyPlace> places, std::string key,
                                        std::string value, time_t expiration, CopyMerge merge,
                                        absl::Time deadline, SessionStore::StatusCallback done) {
  auto write = std::make_shared<CopyWrite>();
  write->merge = merge;
  write->pool = &pool;
  write->pipeline = &pipeline;
  write->places = std::move(places);
  write->key = std::move(key);
  write->value = std::move(value);
  write->expiration = expiration;
  write->deadline = deadline;
  write->done = std::move(done);
  return write;
}

// One of WriteOthersAsync's writes is over; the caller is answered after the last.
void OtherCopyWritten(const std::shared_ptr<CopyWrite>& write) {
  if (write->writes_pending.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  std::move(write->done)(absl::OkStatus());
}

// Conn::RewriteCopy without blocking: copy `c` refused the write to it, so it is read again and
// takes what `write->merge` makes of the two, conditionally on that read.
void RewriteCopyAsync(const std::shared_ptr<CopyWrite>& write, int c, int attempt) {
  if (attempt >= kCopyRewriteAttempts) {
    OtherCopyWritten(write);
    return;
  }
  const int node = write->places[static_cast<size_t>(c)].node;
  write->pipeline->GetAsync(
      node, {write->key}, write->deadline,
      [write, c, attempt, node](absl::StatusOr<MemcachedHits> got) {
        CountFailure(*write->pool, got.status());
        if (!got.ok()) {
          OtherCopyWritten(write);
          return;
        }
        const auto it = got->find(write->key);
        const bool held = it != got->end();
        const std::optional<CopyRewrite> rewrite =
            write->merge(write->value, write->expiration, held ? &it->second.value : nullptr);
        if (!rewrite.has_value()) {
          OtherCopyWritten(write);
          return;
        }
        write->pipeline->StoreAsync(node, held ? MemcachedWrite::kCas : MemcachedWrite::kAdd,
                                    write->key, rewrite->value, rewrite->expiration,
                                    held ? it->second.cas : 0, write->deadline,
                                    [write, c, attempt](absl::StatusOr<MemcachedStored> stored) {
                                      CountFailure(*write->pool, stored.status());
                                      if (stored.ok() && *stored != MemcachedStored::kStored) {
                                        RewriteCopyAsync(write, c, attempt + 1);
                                        return;
                                      }
                                      OtherCopyWritten(write);
                                    });
      });
}

// The primary took the value: write it to the other copies as Conn::WriteOthers does (best
// effort) and answer once they have answered, so that a caller's next write cannot overtake
// them.
void WriteOthersAsync(const std::shared_ptr<CopyWrite>& write, int primary) {
  const auto written = [&](int c) {
    return c != primary && static_cast<size_t>(c) < write->held.size() &&
           write->held[static_cast<size_t>(c)].known;
  };
  size_t others = 0;
  for (int c = 0; c < write->copies(); ++c) others += written(c) ? 1 : 0;
  if (others == 0) {
    std::move(write->done)(absl::OkStatus());
    return;
  }
  write->writes_pending.store(others);
  for (int c = 0; c < write->copies(); ++c) {
    if (!written(c)) continue;
    const uint64_t cas = write->held[static_cast<size_t>(c)].cas;
    write->pipeline->StoreAsync(write->places[static_cast<size_t>(c)].node,
                                cas == 0 ? MemcachedWrite::kAdd : MemcachedWrite::kCas, write->key,
                                write->value, write->expiration, cas, write->deadline,
                                [write, c](absl::StatusOr<MemcachedStored> stored) {
                                  CountFailure(*write->pool, stored.status());
                                  if (stored.ok() && *stored != MemcachedStored::kStored) {
                                    RewriteCopyAsync(write, c, 0);
                                    return;
                                  }
                                  OtherCopyWritten(write);
                                });
  }
}

// Add on copy `copy`, or on the next one when it does not answer. ABORTED when the key exists.
void AddFromCopy(const std::shared_ptr<CopyWrite>& write, int copy) {
  if (copy >= write->copies()) {
    std::move(write->done)(LastCopyError(write->last));
    return;
  }
  MemcachedPipeline& pipeline = *write->pipeline;
  const int node = write->places[static_cast<size_t>(copy)].node;
  pipeline.StoreAsync(node, MemcachedWrite::kAdd, write->key, write->value, write->expiration, 0,
                      write->deadline, [write, copy](absl::StatusOr<MemcachedStored> stored) {
                        if (stored.ok() && *stored == MemcachedStored::kStored) {
                          WriteOthersAsync(write, copy);
                        } else if (stored.ok()) {
                          std::move(write->done)(absl::AbortedError("memcached add: key exists"));
                        } else if (absl::IsUnavailable(stored.status())) {
                          write->pool->RecordNodeFailure();
                          write->last = stored.status();
                          AddFromCopy(write, copy + 1);
                        } else {
                          std::move(write->done)(stored.status());
                        }
                      });
}

// CAS on the copy the value was read from. ABORTED when it changed or vanished since.
void CasOnCopy(const std::shared_ptr<CopyWrite>& write, const CasToken& cas) {
  if (cas.copy < 0 || cas.copy >= write->copies()) {
    std::move(write->done)(absl::AbortedError("memcached cas: stale copy"));
    return;
  }
  MemcachedPipeline& pipeline = *write->pipeline;
  const int node = write->places[static_cast<size_t>(cas.copy)].node;
  pipeline.StoreAsync(
      node, MemcachedWrite::kCas, write->key, write->value, write->expiration, cas.cas,
      write->deadline, [write, copy = cas.copy](absl::StatusOr<MemcachedStored> stored) {
        if (stored.ok() && *stored == MemcachedStored::kStored) {
          WriteOthersAsync(write, copy);
        } else if (stored.ok()) {
          std::move(write->done)(absl::AbortedError("memcached cas: changed concurrently"));
        } else {
          CountFailure(*write->pool, stored.status());
          std::move(write->done)(stored.status());
        }
      });
}

}  // namespace

std::string MemcachedSessionStore::SessionKeyName(absl::string_view token_hash) {
  return absl::StrCat("sl:v1:s:", token_hash);
}
std::string MemcachedSessionStore::GenerationKeyName(absl::string_view user_tag) {
  return absl::StrCat("sl:v1:g:", user_tag);
}
std::string MemcachedSessionStore::IndexKeyName(absl::string_view user_tag) {
  return absl::StrCat("sl:v1:u:", user_tag);
}

absl::StatusOr<SessionLookup> MemcachedSessionStore::Lookup(const SessionKey& key,
                                                            absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(Conn conn, Conn::Open(pool_, replicas_, key.user_tag, deadline));
  const std::string skey = SessionKeyName(key.token_hash);
  const std::string gkey = GenerationKeyName(key.user_tag);

  // Every copy is consulted (one multi-get each: session + generation), because only reading a
  // copy tells whether it is missing: a node that restarted empty is repaired on the first read
  // whichever copy it holds. With replicas = 0 this is a single round trip.
  SL_ASSIGN_OR_RETURN(CopyReads reads, ReadEveryCopy(conn, {skey, gkey}));
  LookupPlan plan = PlanLookup(reads, skey, gkey);
  SessionLookup lookup;
  lookup.user_generation = plan.generation;
  lookup.every_copy_answered = EveryCopyAnswered(plan);
  if (plan.best < 0) return lookup;  // No copy holds the session.

  const CopyState& winner = plan.copies[static_cast<size_t>(plan.best)];
  const time_t ttl = SecondsUntil(winner.parsed.expires_at_unix_micros());
  RepairGenerations(conn, gkey, plan);
  std::optional<CasToken> primary_rewritten;
  bool primary_moved_on = false;
  std::vector<CopyCas> held = std::move(plan.held);
  // Read repair: copies that answered but lack the session or hold an older version get the
  // authoritative state back, but only if they still hold what we read (add where it was
  // missing, compare-and-swap where it was older). The copies were read one after another, so
  // a copy that looks stale may have taken a newer write since: overwriting it would undo that
  // write, and on the primary, where every writer's compare-and-swap meets, lose it for good.
  // So a copy that changed is read again and takes the winner only where it still wins.
  for (int c = 0; c < conn.copies() && ttl > 0; ++c) {
    const CopyState& state = plan.copies[static_cast<size_t>(c)];
    if (!state.answered || c == plan.best || !IsStale(state, winner)) continue;
    // A copy that took a write since (or holds bytes that do not parse) gets what wins of the
    // two; left as it is, it would stay behind, skipped by every write through this token.
    const Conn::CopyOutcome written = conn.WriteUnlessChanged(
        c, skey, winner.session->value, ttl, state.session.has_value() ? state.session->cas : 0,
        MergeSessionCopy);
    // Its CAS value changed: read back, as a token's writes to this copy need it.
    const CopyCas now_held = written.holding.has_value()
                                 ? CopyAfterOurWrite(conn, c, skey, *written.holding)
                                 : CopyCas{false, 0};
    if (static_cast<size_t>(c) < held.size()) held[static_cast<size_t>(c)] = now_held;
    if (c != plan.primary) continue;
    if (written.holding.has_value()) {
      primary_rewritten = now_held.known ? CasToken{now_held.cas, c} : CasToken{0, kNoCopy};
    } else if (written.changed) {
      primary_moved_on = true;
    }
  }

  SessionRecord record;
  record.session = winner.parsed;
  record.cas = CasToken{winner.session->cas, plan.best};
  if (plan.best != plan.primary) {
    // Compare-and-swap must meet every writer on the primary, so hand out its CAS value.
    const CopyState& primary = plan.copies[static_cast<size_t>(plan.primary)];
    if (primary_moved_on) {
      // Another writer got there first, so no CAS value we hold is current: a token on no copy
      // makes a compare-and-swap fail at once (ABORTED), and an unconditional update reads
      // again. (CAS value 0 would not do: libmemcached's binary protocol reads it as "store
      // unconditionally".)
      record.cas = CasToken{0, kNoCopy};
    } else if (primary_rewritten.has_value()) {
      record.cas = *primary_rewritten;
    } else if (primary.session.has_value() && primary.parsed.version() == winner.parsed.version()) {
      record.cas = CasToken{primary.session->cas, plan.primary};
    }
  }
  record.cas.copies = std::move(held);
  lookup.record = std::move(record);
  return lookup;
}

void MemcachedSessionStore::LookupAsync(const SessionKey& key, absl::Time deadline,
                                        LookupCallback done) {
  const std::vector<CopyPlace> places = PlaceCopies(pool_, replicas_, key.user_tag);
  MemcachedPipeline* pipeline = PipelineFor(pool_, places);
  if (pipeline == nullptr) {
    LookupBlocking(key, deadline, std::move(done));
    return;
  }
  // The copies are read at once; the last answer to arrive decides. A lookup that needs no
  // repair (the common case) is answered right there, on the pipeline's thread; one that must
  // write goes to the blocking path, which reads again and repairs.
  std::string skey = SessionKeyName(key.token_hash);
  std::string gkey = GenerationKeyName(key.user_tag);
  const std::vector<std::string> keys = {skey, gkey};
  ReadEveryCopyAsync(pool_, *pipeline, places, keys, deadline,
                     [this, key, deadline, skey = std::move(skey), gkey = std::move(gkey),
                      done = std::move(done)](absl::StatusOr<CopyReads> reads) mutable {
                       if (!reads.ok()) {
                         std::move(done)(reads.status());
                         return;
                       }
                       LookupPlan plan = PlanLookup(*reads, skey, gkey);
                       if (!NeedsRepair(plan)) {
                         std::move(done)(Settled(std::move(plan)));
                         return;
                       }
                       LookupBlocking(key, deadline, std::move(done));
                     });
}

void MemcachedSessionStore::LookupBlocking(const SessionKey& key, absl::Time deadline,
                                           LookupCallback done) {
  RunBlocking([this, key, deadline, done = std::move(done)]() mutable {
    std::move(done)(Lookup(key, deadline));
  });
}

void MemcachedSessionStore::RunBlocking(absl::AnyInvocable<void() &&> work) {
  if (executor_ == nullptr) {
    std::move(work)();
    return;
  }
  executor_->Run(std::move(work));
}

void MemcachedSessionStore::ReadUserStateAsync(absl::string_view user_tag,
                                               absl::Duration keep_generation_for,
                                               absl::Time deadline, UserStateCallback done) {
  if (const absl::StatusOr<time_t> expiration = MemcachedExptime(keep_generation_for);
      !expiration.ok()) {
    std::move(done)(expiration.status());
    return;
  }
  const std::vector<CopyPlace> places = PlaceCopies(pool_, replicas_, user_tag);
  MemcachedPipeline* pipeline = PipelineFor(pool_, places);
  if (pipeline == nullptr) {
    ReadUserStateBlocking(std::string(user_tag), keep_generation_for, deadline, std::move(done));
    return;
  }
  std::string gkey = GenerationKeyName(user_tag);
  std::string ikey = IndexKeyName(user_tag);
  const std::vector<std::string> keys = {gkey, ikey};
  ReadEveryCopyAsync(
      pool_, *pipeline, places, keys, deadline,
      [this, tag = std::string(user_tag), keep_generation_for, deadline, gkey = std::move(gkey),
       ikey = std::move(ikey), done = std::move(done)](absl::StatusOr<CopyReads> reads) mutable {
        if (!reads.ok()) {
          std::move(done)(reads.status());
          return;
        }
        // A user who was never revoked has no generation to keep alive; an index that no
        // answering copy lost needs no repair. Then nothing is written, as here; otherwise
        // ReadUserState reads again and writes, on the blocking path.
        if (HighestGeneration(gkey, *reads) == 0) {
          IndexPlan plan = PlanIndex(*reads, ikey);
          if (plan.missed.empty()) {
            UserState state;
            state.index = std::move(plan.record);
            std::move(done)(std::move(state));
            return;
          }
        }
        ReadUserStateBlocking(std::move(tag), keep_generation_for, deadline, std::move(done));
      });
}

void MemcachedSessionStore::ReadUserStateBlocking(std::string user_tag,
                                                  absl::Duration keep_generation_for,
                                                  absl::Time deadline, UserStateCallback done) {
  RunBlocking([this, user_tag = std::move(user_tag), keep_generation_for, deadline,
               done = std::move(done)]() mutable {
    std::move(done)(ReadUserState(user_tag, keep_generation_for, deadline));
  });
}

void MemcachedSessionStore::WriteCopiesAsync(absl::string_view user_tag, std::string key_name,
                                             std::string value, CopyKind kind,
                                             const std::optional<CasToken>& cas, absl::Duration ttl,
                                             absl::Time deadline,
                                             absl::FunctionRef<BlockingWrite()> blocking,
                                             StatusCallback done) {
  std::vector<CopyPlace> places = PlaceCopies(pool_, replicas_, user_tag);
  MemcachedPipeline* pipeline = PipelineFor(pool_, places);
  const absl::StatusOr<time_t> expiration = MemcachedExptime(ttl);
  if (!expiration.ok()) {
    std::move(done)(expiration.status());
    return;
  }
  if (pipeline == nullptr) {
    RunBlocking([write = blocking(), done = std::move(done)]() mutable {
      std::move(done)(std::move(write)());
    });
    return;
  }
  auto write = NewCopyWrite(
      pool_, *pipeline, std::move(places), std::move(key_name), std::move(value), *expiration,
      kind == CopyKind::kIndex ? MergeIndexCopy : MergeSessionCopy, deadline, std::move(done));
  if (cas.has_value()) {
    write->held = cas->copies;
    CasOnCopy(write, *cas);
  } else {
    if (write->copies() > 1) write->held = NoCopyHeldIt(write->copies());
    AddFromCopy(write, 0);
  }
}

void MemcachedSessionStore::WriteIndexAsync(absl::string_view user_tag,
                                            const std::optional<CasToken>& cas,
                                            const UserSessionIndex& index, absl::Duration ttl,
                                            absl::Time deadline, StatusCallback done) {
  WriteCopiesAsync(
      user_tag, IndexKeyName(user_tag), index.SerializeAsString(), CopyKind::kIndex, cas, ttl,
      deadline,
      [&]() -> BlockingWrite {
        return [this, tag = std::string(user_tag), cas, index, ttl, deadline] {
          return WriteIndex(tag, cas, index, ttl, deadline);
        };
      },
      std::move(done));
}

void MemcachedSessionStore::AddAsync(const SessionKey& key, const StoredSession& session,
                                     absl::Duration ttl, absl::Time deadline, StatusCallback done) {
  WriteCopiesAsync(
      key.user_tag, SessionKeyName(key.token_hash), session.SerializeAsString(), CopyKind::kSession,
      std::nullopt, ttl, deadline,
      [&]() -> BlockingWrite {
        return [this, key, session, ttl, deadline] { return Add(key, session, ttl, deadline); };
      },
      [done = std::move(done)](absl::Status added) mutable {
        // The pipeline's add reports a taken key as ABORTED; Add's contract says ALREADY_EXISTS.
        if (absl::IsAborted(added)) added = absl::AlreadyExistsError("session key already taken");
        std::move(done)(std::move(added));
      });
}

void MemcachedSessionStore::CompareAndSwapAsync(const SessionKey& key, const CasToken& cas,
                                                const StoredSession& session, absl::Duration ttl,
                                                absl::Time deadline, StatusCallback done) {
  WriteCopiesAsync(
      key.user_tag, SessionKeyName(key.token_hash), session.SerializeAsString(), CopyKind::kSession,
      cas, ttl, deadline,
      [&]() -> BlockingWrite {
        return [this, key, cas, session, ttl, deadline] {
          return CompareAndSwap(key, cas, session, ttl, deadline);
        };
      },
      std::move(done));
}

absl::StatusOr<SessionLookup> MemcachedSessionStore::Peek(const SessionKey& key,
                                                          absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(Conn conn, Conn::Open(pool_, replicas_, key.user_tag, deadline));
  const std::string skey = SessionKeyName(key.token_hash);
  const std::string gkey = GenerationKeyName(key.user_tag);
  // Every copy, reconciled as Lookup reconciles them (a tombstone anywhere wins, then the
  // highest version; the highest generation), but nothing is written back. Stopping at the
  // first copy that held the session let a copy that missed a deletion, rotation or second
  // revocation (skipped for a second after it stalled) keep authorising ledger calls.
  SL_ASSIGN_OR_RETURN(CopyReads reads, ReadEveryCopy(conn, {skey, gkey}));
  return Settled(PlanLookup(reads, skey, gkey));
}

absl::Status MemcachedSessionStore::Add(const SessionKey& key, const StoredSession& session,
                                        absl::Duration ttl, absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(time_t expiration, MemcachedExptime(ttl));
  SL_ASSIGN_OR_RETURN(Conn conn, Conn::Open(pool_, replicas_, key.user_tag, deadline));
  const absl::Status added = conn.AddOnEveryCopy(
      SessionKeyName(key.token_hash), session.SerializeAsString(), expiration, MergeSessionCopy);
  if (absl::IsAborted(added)) return absl::AlreadyExistsError("session key already taken");
  return added;
}

absl::Status MemcachedSessionStore::CompareAndSwap(const SessionKey& key, const CasToken& cas,
                                                   const StoredSession& session, absl::Duration ttl,
                                                   absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(time_t expiration, MemcachedExptime(ttl));
  SL_ASSIGN_OR_RETURN(Conn conn, Conn::Open(pool_, replicas_, key.user_tag, deadline));
  return conn.CasThenWriteOthers(cas, SessionKeyName(key.token_hash), session.SerializeAsString(),
                                 expiration, MergeSessionCopy);
}

absl::Status MemcachedSessionStore::CompareAndSwapEveryCopy(const SessionKey& key,
                                                            const CasToken& cas,
                                                            const StoredSession& session,
                                                            absl::Duration ttl,
                                                            absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(time_t expiration, MemcachedExptime(ttl));
  SL_ASSIGN_OR_RETURN(Conn conn, Conn::Open(pool_, replicas_, key.user_tag, deadline));
  return conn.CasThenSetEveryCopy(cas.copy, cas.cas, SessionKeyName(key.token_hash),
                                  session.SerializeAsString(), expiration);
}

absl::Status MemcachedSessionStore::Put(const SessionKey& key, const StoredSession& session,
                                        absl::Duration ttl, absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(time_t expiration, MemcachedExptime(ttl));
  SL_ASSIGN_OR_RETURN(Conn conn, Conn::Open(pool_, replicas_, key.user_tag, deadline));
  return conn.SetEveryCopy(SessionKeyName(key.token_hash), session.SerializeAsString(), expiration);
}

absl::Status MemcachedSessionStore::Remove(const SessionKey& key, absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(Conn conn, Conn::Open(pool_, replicas_, key.user_tag, deadline));
  const std::string skey = SessionKeyName(key.token_hash);
  // Every copy must answer: a copy that kept the item would still list it, and count it against
  // the user's limit, until it expired.
  int answered = 0;
  absl::Status last;
  for (int c = 0; c < conn.copies(); ++c) {
    const memcached_return_t rc = conn.Delete(c, skey);
    if (Answered(rc)) {
      ++answered;
    } else {
      last = MemcachedStatus(rc, "delete");
    }
  }
  if (answered == conn.copies()) return absl::OkStatus();
  absl::Status failed =
      absl::UnavailableError(absl::StrCat("memcached: ", answered, " of ", conn.copies(),
                                          " copies took the delete (", last.message(), ")"));
  if (answered > 0) failed.SetPayload(kPartialWritePayload, absl::Cord("1"));
  return failed;
}

absl::StatusOr<uint64_t> MemcachedSessionStore::ReadGeneration(absl::string_view user_tag,
                                                               absl::Duration keep_for,
                                                               absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(time_t expiration, MemcachedExptime(keep_for));
  SL_ASSIGN_OR_RETURN(Conn conn, Conn::Open(pool_, replicas_, user_tag, deadline));
  const std::string gkey = GenerationKeyName(user_tag);
  SL_ASSIGN_OR_RETURN(CopyReads reads, ReadEveryCopy(conn, {gkey}));
  return KeepGeneration(conn, gkey, reads, expiration);
}

absl::StatusOr<GenerationAdvance> MemcachedSessionStore::AdvanceGeneration(
    absl::string_view user_tag, uint64_t at_least, absl::Duration keep_for, absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(time_t expiration, MemcachedExptime(keep_for));
  SL_ASSIGN_OR_RETURN(Conn conn, Conn::Open(pool_, replicas_, user_tag, deadline));
  const std::string gkey = GenerationKeyName(user_tag);
  SL_ASSIGN_OR_RETURN(CopyReads reads, ReadEveryCopy(conn, {gkey}));
  GenerationAdvance advance;
  advance.found = HighestGeneration(gkey, reads);
  advance.raised_to = std::max(advance.found + 1, at_least);
  int raised = 0;
  for (int c = 0; c < conn.copies(); ++c) {
    if (conn.RaiseGeneration(c, gkey, advance.raised_to, expiration)) ++raised;
  }
  if (raised < conn.copies()) {
    absl::Status failed = absl::UnavailableError(absl::StrCat(
        "memcached: ", raised, " of ", conn.copies(), " copies took the new generation"));
    if (raised > 0) failed.SetPayload(kPartialWritePayload, absl::Cord("1"));
    return failed;
  }
  return advance;
}

absl::StatusOr<IndexRecord> MemcachedSessionStore::ReadIndex(absl::string_view user_tag,
                                                             absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(Conn conn, Conn::Open(pool_, replicas_, user_tag, deadline));
  const std::string ikey = IndexKeyName(user_tag);
  SL_ASSIGN_OR_RETURN(CopyReads reads, ReadEveryCopy(conn, {ikey}));
  return IndexFromCopies(conn, ikey, reads);
}

absl::StatusOr<UserState> MemcachedSessionStore::ReadUserState(absl::string_view user_tag,
                                                               absl::Duration keep_generation_for,
                                                               absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(time_t expiration, MemcachedExptime(keep_generation_for));
  SL_ASSIGN_OR_RETURN(Conn conn, Conn::Open(pool_, replicas_, user_tag, deadline));
  const std::string gkey = GenerationKeyName(user_tag);
  const std::string ikey = IndexKeyName(user_tag);
  SL_ASSIGN_OR_RETURN(CopyReads reads, ReadEveryCopy(conn, {gkey, ikey}));
  UserState state;
  state.generation = KeepGeneration(conn, gkey, reads, expiration);
  state.index = IndexFromCopies(conn, ikey, reads);
  return state;
}

absl::Status MemcachedSessionStore::WriteIndex(absl::string_view user_tag,
                                               const std::optional<CasToken>& cas,
                                               const UserSessionIndex& index, absl::Duration ttl,
                                               absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(time_t expiration, MemcachedExptime(ttl));
  SL_ASSIGN_OR_RETURN(Conn conn, Conn::Open(pool_, replicas_, user_tag, deadline));
  const std::string ikey = IndexKeyName(user_tag);
  const std::string value = index.SerializeAsString();
  if (!cas.has_value()) return conn.AddOnEveryCopy(ikey, value, expiration, MergeIndexCopy);
  return conn.CasThenWriteOthers(*cas, ikey, value, expiration, MergeIndexCopy);
}

absl::StatusOr<std::vector<std::optional<StoredSession>>> MemcachedSessionStore::ReadSessions(
    absl::string_view user_tag, const std::vector<std::string>& token_hashes, absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(Conn conn, Conn::Open(pool_, replicas_, user_tag, deadline));
  std::vector<std::string> keys;
  keys.reserve(token_hashes.size());
  for (const std::string& hash : token_hashes) keys.push_back(SessionKeyName(hash));
  // Every copy, each session reconciled as Lookup reconciles it: a copy that missed a deletion
  // or an update must not list a session as live or stale (nothing is repaired here).
  SL_ASSIGN_OR_RETURN(CopyReads reads, ReadEveryCopy(conn, keys));
  std::vector<std::optional<StoredSession>> out(token_hashes.size());
  for (const auto& read : reads) {
    if (!read.has_value()) continue;
    for (size_t i = 0; i < keys.size(); ++i) {
      auto it = read->find(keys[i]);
      StoredSession s;
      if (it == read->end() || !s.ParseFromString(it->second.value)) continue;
      if (!out[i].has_value() || Supersedes(s, *out[i])) out[i] = std::move(s);
    }
  }
  return out;
}

}  // namespace sessionledger
