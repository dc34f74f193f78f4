#include "server/session/session_service.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <set>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/common/status_macros.h"
#include "server/common/utf8.h"
#include "server/domain/caller_message.h"
#include "server/session/token.h"

namespace sessionledger {

using storage::v1::StoredSession;
using storage::v1::UserSessionIndex;

namespace {

// Beyond this many entries, creating a session first drops the entries of dead sessions, so an
// index stays far below Memcached's 1 MiB item limit even for a user who never lists.
constexpr int kIndexPruneThreshold = 256;
// How long an index entry whose session is missing is kept: longer than any Create or Rotate
// takes between writing the entry and adding the session (AddSessionBy).
constexpr absl::Duration kJustIndexed = absl::Seconds(30);
// How many sessions one store read asks for when a call reads all of a user's sessions (list,
// revoke, pruning). A user may hold thousands of sessions of up to 64 KiB, each read from every
// copy: asked for at once, that was hundreds of MiB of replies held by one call, for a revoke
// or a create at the limit that needs none of the attributes. In batches a call holds one
// batch's replies at a time, and keeps attributes only where it answers with them.
constexpr size_t kSessionsPerRead = 64;
// At most this many tombstones of revoked sessions written by one listing or pruning (see
// LiveSessions): each is a round trip of its own, and the call must stay within its deadline
// and keep its blocking thread for no longer. The next one writes the next ones.
constexpr int kTombstonesPerPruning = 64;

// How long after its index entry was written, until the count's read began, a session that is
// not stored is counted against the user's limit as a create (or rotation) still under way.
// Short, because a session missing for another reason is counted too: one evicted, a losing
// rotation's new one removed again, a create whose add failed. Mostly not one that ended: a
// deletion leaves a tombstone, a revoked session stays stored, and an expired one lived at
// least its TTL, 1 s or more, after its add, which came after its entry (memcached may drop an
// item up to 2 s before its exptime, which is why MemcachedExptime adds 2). The exceptions, an
// asynchronous create that wrote its session and its entry at once and a short session that
// expired while a slow read ran, cost a needless UNAVAILABLE at worst. An add slower than this
// (a stalled node) is not counted, and can take the user one past the limit.
constexpr absl::Duration kAddUnderWay = absl::Seconds(1);

// When an index entry was written. A rotated session keeps its predecessor's absolute expiry,
// so only the entry's own time tells; entries of older releases lack it, and theirs is that of
// a new session.
absl::Time IndexedAt(const storage::v1::UserSessionIndex::Entry& entry,
                     absl::Duration max_lifetime) {
  return entry.indexed_at_unix_micros() != 0
             ? absl::FromUnixMicros(entry.indexed_at_unix_micros())
             : absl::FromUnixMicros(entry.absolute_expires_at_unix_micros()) - max_lifetime;
}

// The deadline of the add that follows an index entry written at `indexed_at`. A listing prunes
// an entry whose session is still missing kJustIndexed after it was written; an add that came
// later (a call timeout above that, a stalled node) would leave a live session out of the
// index, unlisted and unrevocable by RevokeUserSessions' count. Half of it leaves room for
// clock skew between the server that indexed and the one that lists.
absl::Time AddSessionBy(absl::Time indexed_at, absl::Time deadline) {
  return std::min(deadline, indexed_at + kJustIndexed / 2);
}

absl::Status NotFound() { return absl::NotFoundError("token: no live session for this token"); }

// The answer once the user's index kept changing under a create or rotation until it ran out of
// tries, or of time to wait before the next.
absl::Status IndexTooBusy() {
  return ForCallers(absl::StatusCode::kUnavailable,
                    "user_id: the user's session index is too busy; retry");
}

absl::Time FromMicros(int64_t micros) { return absl::FromUnixMicros(micros); }
int64_t ToMicros(absl::Time t) { return absl::ToUnixMicros(t); }

// Memcached counts whole seconds; round up so an item never vanishes before its expires_at.
absl::Duration StoreTtl(absl::Time expires_at, absl::Time now) {
  const absl::Duration left = expires_at - now;
  const absl::Duration rounded = absl::Ceil(left, absl::Seconds(1));
  return std::max(rounded, absl::Seconds(1));
}

// Slides the idle expiry to now + ttl, never past the absolute lifetime and never back: the
// server that last slid it may have a clock ahead of ours.
int64_t SlidExpiry(const StoredSession& s, absl::Time now) {
  return std::max(s.expires_at_unix_micros(),
                  std::min(ToMicros(now + absl::Seconds(s.ttl_seconds())),
                           s.absolute_expires_at_unix_micros()));
}

// The least a touch slides an expiry by; see TouchEdit.
constexpr absl::Duration kTouchGranularity = absl::Seconds(1);

// Room for the clocks of the servers that touch one session to differ.
constexpr absl::Duration kClockSkewMargin = absl::Minutes(1);

// Rotate's answer when it stops for lack of deadline before the old token's end.
constexpr absl::string_view kRotationOutOfTime =
    "token: too little of the deadline was left to end the old token on every copy; ";
constexpr absl::string_view kNothingChangedRetry =
    "nothing was changed, retry with a longer deadline";
// What a rotation leaves when it cannot remove the new session it made again.
constexpr absl::string_view kUnremovedSessionMayBeListed =
    "a session that was never handed out may be listed until it expires";

// Until when the tombstone that ends `s` at `now` must stay: as long as any copy of the session
// could still be live. A touch or update that read the session before it ended can still land
// on a copy after the tombstone, having slid the expiry to its own now + ttl; when the tombstone
// expired first, that copy would bring the ended session back until then.
absl::Time TombstoneEnd(const StoredSession& s, absl::Time now) {
  return std::min(FromMicros(SlidExpiry(s, now)) + kClockSkewMargin,
                  FromMicros(s.absolute_expires_at_unix_micros()));
}

absl::Duration TombstoneTtl(const StoredSession& s, absl::Time now) {
  return StoreTtl(TombstoneEnd(s, now), now);
}

size_t AttributesBytes(const AttributeMap& attributes) {
  size_t total = 0;
  for (const auto& [k, v] : attributes) total += k.size() + v.size();
  return total;
}

absl::Status ValidateAttributeKeys(absl::string_view field, const AttributeMap& attributes,
                                   const SessionLimits& limits) {
  for (const auto& kv : attributes) {
    SL_RETURN_IF_ERROR(ValidateText(field, kv.first, limits.max_attribute_key_bytes));
  }
  return absl::OkStatus();
}

absl::Status CheckAttributesSize(absl::string_view field, size_t bytes,
                                 const SessionLimits& limits) {
  if (bytes > limits.max_attributes_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": attributes total ", bytes,
                                                   " bytes, above the limit of ",
                                                   limits.max_attributes_bytes));
  }
  return absl::OkStatus();
}

// An end (a deletion, rotation or revocation) that some copy did not take: what the caller
// should know, and do, about it.
absl::Status EndedOnEveryCopy(absl::string_view field, const absl::Status& written) {
  if (!written.GetPayload(kPartialWritePayload).has_value()) return written;
  return ForCallers(absl::StatusCode::kUnavailable,
                    absl::StrCat(field,
                                 ": ended on some copies only, where it holds; retry to end it "
                                 "on every copy, or a node that restarts empty could bring it "
                                 "back"),
                    written);
}

// `written` with other words for callers (and `code`) when the store refused its item as too
// large: the store's words name the session's attributes, which fits CreateSession only.
absl::Status TooLargeForAnItemAs(const absl::Status& written, absl::StatusCode code,
                                 absl::string_view for_callers) {
  if (CallerMessage(written) != kSessionTooLargeForAnItem) return written;
  return ForCallers(code, for_callers, written);
}

// A write of the user's session index that failed: the index is the item, which grows with the
// user's sessions.
absl::Status IndexWriteFailure(const absl::Status& written) {
  return TooLargeForAnItemAs(
      written, absl::StatusCode::kResourceExhausted,
      "user_id: the user's session index is larger than the session store takes in one item; "
      "delete or revoke some sessions first");
}

// An update that failed: its request sets the attributes through `set`.
absl::Status UpdateWriteFailure(const absl::Status& written) {
  return TooLargeForAnItemAs(
      written, absl::StatusCode::kInvalidArgument,
      "set: the session with these attributes is larger than the session store takes in one item");
}

// A share of the bytes all listings may hold at once, given back when the listing is done.
class ListingBudget {
 public:
  ListingBudget(std::atomic<size_t>& in_flight, size_t limit)
      : in_flight_(in_flight), limit_(limit) {}
  ~ListingBudget() { in_flight_.fetch_sub(taken_); }
  ListingBudget(const ListingBudget&) = delete;
  ListingBudget& operator=(const ListingBudget&) = delete;

  // False when the listings together would pass the limit (the bytes are taken even so, and
  // given back with the rest).
  bool Take(size_t bytes) {
    taken_ += bytes;
    return in_flight_.fetch_add(bytes) + bytes <= limit_;
  }

 private:
  std::atomic<size_t>& in_flight_;
  const size_t limit_;
  size_t taken_ = 0;
};

// The end of `live`, kept until `ends_at`. Its expiry is that end rather than the session's:
// reads copy a tombstone onto the copies that lack it only until its expiry, and a copy that a
// racing touch slid past the session's expiry (see TombstoneEnd) must be ended too.
StoredSession Tombstone(const StoredSession& live, absl::Time ends_at) {
  StoredSession t;
  t.set_session_id(live.session_id());
  t.set_user_id(live.user_id());
  t.set_token_hash(live.token_hash());
  t.set_expires_at_unix_micros(ToMicros(ends_at));
  t.set_absolute_expires_at_unix_micros(live.absolute_expires_at_unix_micros());
  t.set_deleted(true);
  return t;
}

}  // namespace

// Full-jitter exponential backoff for compare-and-swap retries, bounded by attempts and by the
// call's deadline. The random source is created on the first conflict only.
class SessionService::Backoff {
 public:
  Backoff(const SessionServiceOptions& options, absl::Time deadline)
      : options_(options), deadline_(deadline) {}

  // The backoff of a caller whose first try already lost a race, so that try counts against
  // max_cas_attempts; without one, a fresh backoff held in `own`.
  static Backoff& ContinuedOrNew(Backoff* after_lost_race, std::optional<Backoff>& own,
                                 const SessionServiceOptions& options, absl::Time deadline) {
    return after_lost_race != nullptr ? *after_lost_race : own.emplace(options, deadline);
  }

  // False when the caller must give up.
  bool Wait() {
    ++attempt_;
    if (attempt_ >= options_.max_cas_attempts) return false;
    const absl::Duration cap = std::min(
        options_.backoff_max, options_.backoff_base * (int64_t{1} << std::min(attempt_, 20)));
    if (!gen_) gen_ = std::make_unique<absl::BitGen>();
    const absl::Duration pause =
        absl::Microseconds(absl::Uniform<int64_t>(*gen_, 0, absl::ToInt64Microseconds(cap) + 1));
    if (absl::Now() + pause >= deadline_) return false;
    if (options_.sleep) {
      options_.sleep(pause);
    } else {
      absl::SleepFor(pause);
    }
    return true;
  }
  // The answer once Wait() has said to give up: the session kept changing under the caller, who
  // can only try again later. UNAVAILABLE, as for any backing service too busy to answer in time;
  // never ABORTED, which the contract keeps for an expected_version that does not match.
  absl::Status GiveUp() const {
    return ForCallers(absl::StatusCode::kUnavailable,
                      absl::StrCat("token: the session changed concurrently at each of ", attempt_,
                                   " tries; retry"));
  }

 private:
  const SessionServiceOptions& options_;
  const absl::Time deadline_;
  int attempt_ = 0;
  std::unique_ptr<absl::BitGen> gen_;
};

absl::Status ValidateText(absl::string_view field, absl::string_view value, size_t max_bytes) {
  if (value.empty() || value.size() > max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": must be 1..", max_bytes, " bytes, got ", value.size()));
  }
  for (size_t i = 0; i < value.size();) {
    const size_t length = Utf8SequenceLength(value, i);
    if (length == 0) return absl::InvalidArgumentError(absl::StrCat(field, ": not valid UTF-8"));
    const auto lead = static_cast<unsigned char>(value[i]);
    // C0 controls and DEL are single bytes; the C1 controls, U+0080..U+009F, are C2 80..C2 9F.
    const bool control =
        (length == 1 && (lead < 0x20 || lead == 0x7F)) ||
        (length == 2 && lead == 0xC2 && static_cast<unsigned char>(value[i + 1]) <= 0x9F);
    if (control) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": contains a control character"));
    }
    i += length;
  }
  return absl::OkStatus();
}

SessionService::SessionService(std::shared_ptr<SessionStore> store, const Clock& clock,
                               SessionServiceOptions options)
    : store_(std::move(store)), clock_(clock), options_(std::move(options)) {}

absl::Duration SessionService::GenerationKeepFor() const {
  // Every session ends by created_at + max_lifetime; the generation must outlive all of them.
  // (At most 30 days and a minute: within kMaxStoreTtl.)
  return options_.max_lifetime + absl::Minutes(1);
}

absl::Status SessionService::CheckLive(const SessionLookup& lookup, const SessionKey& key,
                                       absl::Time now) const {
  if (!lookup.record.has_value()) return NotFound();
  const StoredSession& s = lookup.record->session;
  // The hash comparisons guard against a value stored under the wrong key; they use secrets'
  // digests, hence constant time.
  if (s.deleted() || !ConstantTimeEquals(s.token_hash(), key.token_hash) ||
      !ConstantTimeEquals(UserTag(s.user_id()), key.user_tag)) {
    return NotFound();
  }
  if (s.user_generation() < lookup.user_generation) return NotFound();  // Revoked.
  // Versions start at 1 and grow by one per update: anything else was not written by this
  // service (a corrupt or forged Memcached value), and at INT64_MAX the next update would
  // overflow (found by tests/fuzz's stored_session target; UBSan).
  if (s.version() < 1 || s.version() == std::numeric_limits<int64_t>::max()) return NotFound();
  if (now >= FromMicros(s.expires_at_unix_micros()) ||
      now >= FromMicros(s.absolute_expires_at_unix_micros())) {
    return NotFound();
  }
  return absl::OkStatus();
}

int SessionService::PruneIndexAt(const UserSessionIndex& index) const {
  // Amortized: a pruning that kept K entries reads K sessions, and the next one waits for K
  // more entries. At the per-user limit it must prune, as only pruning tells how many live.
  const int64_t after_growth =
      std::max<int64_t>(kIndexPruneThreshold, int64_t{2} * index.kept_when_pruned());
  return static_cast<int>(
      std::min<int64_t>(after_growth, options_.limits.max_live_sessions_per_user));
}

absl::Status SessionService::RoomForOneMore(size_t live, const IndexCensus& census,
                                            const UserSessionIndex& index_now) const {
  // Without a bound the index would outgrow Memcached's item limit, and every create of this
  // user would then fail with Memcached's "object too large".
  const int limit = options_.limits.max_live_sessions_per_user;
  if (static_cast<int64_t>(live) >= limit) {
    return absl::ResourceExhaustedError(absl::StrCat("user_id: already holds ", live,
                                                     " live sessions, the most one user may hold (",
                                                     limit, "); delete or revoke some first"));
  }
  // Counted too: the creates under way, whose sessions are not stored yet, and those indexed
  // while the sessions were read, whatever their time (a write that took long to land, a
  // writer's clock behind ours). The caller's index write is conditional on `index_now`, so a
  // create indexed after that makes it count again. (A copy that answered the second read only
  // may add stale entries here: a needless UNAVAILABLE, never a create past the limit.)
  int64_t indexed_meanwhile = 0;
  for (const auto& entry : index_now.entries()) {
    indexed_meanwhile += census.token_hashes.count(entry.token_hash()) == 0;
  }
  const int64_t being_created = census.adds_under_way + indexed_meanwhile;
  if (static_cast<int64_t>(live) + being_created >= limit) {
    // Not RESOURCE_EXHAUSTED: some of those creates may yet fail.
    return ForCallers(absl::StatusCode::kUnavailable,
                      absl::StrCat("user_id: holds ", live, " live sessions and ", being_created,
                                   " more are being created, which reach the most one user may "
                                   "hold (",
                                   limit, "); retry once they are done"));
  }
  return absl::OkStatus();
}

absl::StatusOr<SessionService::Indexed> SessionService::AddToIndex(
    absl::string_view user_tag, const StoredSession& session,
    std::optional<IndexRecord> already_read, bool replaces_one, absl::Time deadline,
    Backoff* after_lost_race) {
  std::optional<Backoff> own;
  Backoff& backoff = Backoff::ContinuedOrNew(after_lost_race, own, options_, deadline);
  for (;;) {
    absl::Time attempt_began = absl::Now();
    IndexRecord record;
    if (already_read.has_value()) {
      record = *std::move(already_read);
      already_read.reset();  // A conflict means it is stale: read again.
    } else {
      SL_ASSIGN_OR_RETURN(record, store_->ReadIndex(user_tag, deadline));
    }
    absl::Time now = clock_.Now();
    if (record.index.entries_size() >= PruneIndexAt(record.index)) {
      // Rare: drop dead entries first (reads the user's sessions once).
      SL_ASSIGN_OR_RETURN(uint64_t generation,
                          store_->ReadGeneration(user_tag, GenerationKeepFor(), deadline));
      IndexCensus census;
      SL_ASSIGN_OR_RETURN(std::vector<StoredSession> live,
                          LiveSessions(session.user_id(), user_tag, generation, Attributes::kDrop,
                                       deadline, &census));
      attempt_began = absl::Now();
      SL_ASSIGN_OR_RETURN(record, store_->ReadIndex(user_tag, deadline));
      if (!replaces_one) {
        SL_RETURN_IF_ERROR(RoomForOneMore(live.size(), census, record.index));
      }
      // The entry says when it was written, which a count of this user's sessions on another
      // call weighs against kAddUnderWay; the count above may have taken a while.
      now = clock_.Now();
    }
    const IndexWrite write = IndexWith(record.index, session, now);
    const absl::Status written =
        store_->WriteIndex(user_tag, record.cas, write.index, write.ttl, deadline);
    if (written.ok()) return Indexed{now, attempt_began};
    if (!absl::IsAborted(written)) return IndexWriteFailure(written);
    if (!backoff.Wait()) return IndexTooBusy();
  }
}

absl::StatusOr<SessionService::NewSession> SessionService::PrepareCreate(
    absl::string_view user_id, int64_t ttl_seconds, const AttributeMap& attributes) const {
  SL_RETURN_IF_ERROR(ValidateText("user_id", user_id, options_.limits.max_user_id_bytes));
  const int64_t max_ttl = absl::ToInt64Seconds(options_.max_lifetime);
  if (ttl_seconds < 0 || ttl_seconds > max_ttl) {
    return absl::InvalidArgumentError(
        absl::StrCat("ttl_seconds: must be 0 (server default) or 1..", max_ttl));
  }
  if (ttl_seconds == 0) ttl_seconds = absl::ToInt64Seconds(options_.default_ttl);
  SL_RETURN_IF_ERROR(ValidateAttributeKeys("attributes", attributes, options_.limits));
  SL_RETURN_IF_ERROR(
      CheckAttributesSize("attributes", AttributesBytes(attributes), options_.limits));

  NewSession created;
  SL_ASSIGN_OR_RETURN(created.view.token, NewToken(user_id));
  SL_ASSIGN_OR_RETURN(created.key, KeyForToken(created.view.token));
  StoredSession& s = created.view.stored;
  SL_ASSIGN_OR_RETURN(*s.mutable_session_id(), NewSessionId());
  s.set_user_id(std::string(user_id));
  s.set_ttl_seconds(ttl_seconds);
  s.set_version(1);
  *s.mutable_attributes() = attributes;
  s.set_token_hash(created.key.token_hash);
  return created;
}

void SessionService::StampCreated(StoredSession& s, uint64_t user_generation,
                                  absl::Time now) const {
  s.set_created_at_unix_micros(ToMicros(now));
  s.set_absolute_expires_at_unix_micros(ToMicros(now + options_.max_lifetime));
  s.set_expires_at_unix_micros(SlidExpiry(s, now));
  s.set_user_generation(user_generation);
}

absl::Duration SessionService::SessionTtl(const StoredSession& s, absl::Time now) {
  return StoreTtl(FromMicros(s.expires_at_unix_micros()), now);
}

SessionService::IndexWrite SessionService::IndexWith(const UserSessionIndex& current,
                                                     const StoredSession& session, absl::Time now) {
  IndexWrite write;
  write.index.set_kept_when_pruned(current.kept_when_pruned());
  int64_t newest = session.absolute_expires_at_unix_micros();
  for (const auto& e : current.entries()) {
    if (FromMicros(e.absolute_expires_at_unix_micros()) <= now) continue;
    newest = std::max(newest, e.absolute_expires_at_unix_micros());
    *write.index.add_entries() = e;
  }
  auto* entry = write.index.add_entries();
  entry->set_token_hash(session.token_hash());
  entry->set_session_id(session.session_id());
  entry->set_absolute_expires_at_unix_micros(session.absolute_expires_at_unix_micros());
  entry->set_indexed_at_unix_micros(ToMicros(now));
  // The index lives exactly as long as its longest-lived session could.
  write.ttl = StoreTtl(FromMicros(newest), now);
  return write;
}

absl::StatusOr<SessionView> SessionService::FinishCreate(NewSession created,
                                                         std::optional<IndexRecord> index,
                                                         absl::Time deadline) {
  StoredSession& s = created.view.stored;
  // Indexed before it exists, so a session is never live without being listable/revocable by
  // the index; an entry whose add failed is pruned later.
  SL_ASSIGN_OR_RETURN(const Indexed indexed, AddToIndex(created.key.user_tag, s, std::move(index),
                                                        /*replaces_one=*/false, deadline));
  // Its idle time starts once it is indexed: a count of the user's sessions before that may
  // have taken longer than a short TTL. (Its absolute expiry is in the entry, and stays.)
  s.set_expires_at_unix_micros(SlidExpiry(s, indexed.indexed_at));
  SL_RETURN_IF_ERROR(store_->Add(created.key, s, SessionTtl(s, indexed.indexed_at),
                                 AddSessionBy(indexed.indexed_at, deadline)));
  return std::move(created.view);
}

absl::StatusOr<SessionView> SessionService::Create(absl::string_view user_id, int64_t ttl_seconds,
                                                   const AttributeMap& attributes,
                                                   absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(NewSession created, PrepareCreate(user_id, ttl_seconds, attributes));
  // The generation and the index in one round trip: the session records the former and joins
  // the latter.
  SL_ASSIGN_OR_RETURN(UserState user,
                      store_->ReadUserState(created.key.user_tag, GenerationKeepFor(), deadline));
  const absl::Time now = clock_.Now();
  StampCreated(created.view.stored, user.generation, now);
  return FinishCreate(std::move(created), std::move(user.index), deadline);
}

void SessionService::CreateAsync(absl::string_view user_id, int64_t ttl_seconds,
                                 const AttributeMap& attributes, absl::Time deadline,
                                 ViewCallback done) {
  absl::StatusOr<NewSession> prepared = PrepareCreate(user_id, ttl_seconds, attributes);
  if (!prepared.ok()) {
    std::move(done)(prepared.status());
    return;
  }
  // Create's steps, each started from the answer of the one before. The common case never
  // blocks; an index conflict or a large index goes to the blocking path, whose retries sleep.
  auto created = std::make_shared<NewSession>(*std::move(prepared));
  store_->ReadUserStateAsync(
      created->key.user_tag, GenerationKeepFor(), deadline,
      [this, created, deadline, done = std::move(done)](absl::StatusOr<UserState> user) mutable {
        if (!user.ok()) {
          std::move(done)(user.status());
          return;
        }
        const absl::Time now = clock_.Now();
        StampCreated(created->view.stored, user->generation, now);
        if (user->index.index.entries_size() >= PruneIndexAt(user->index.index)) {
          FinishCreateBlocking(created, std::move(user->index), deadline, std::move(done));
          return;
        }
        const IndexWrite write = IndexWith(user->index.index, created->view.stored, now);
        // The index entry and the session are written at once (one round trip, not two): the
        // token is handed out only once both are in, so no caller ever holds a session that is
        // not indexed. A session whose index write failed is never handed out and expires.
        struct Join {
          absl::Status written;
          absl::Status added;
          std::atomic<int> pending{2};
          ViewCallback done;
        };
        auto join = std::make_shared<Join>();
        join->done = std::move(done);
        auto settle = [this, created, now, deadline, join]() {
          if (join->pending.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
          if (!join->added.ok()) {
            std::move(join->done)(join->added);
          } else if (absl::IsAborted(join->written)) {
            // Another session of this user was indexed meanwhile: read again and retry.
            FinishCreateBlocking(created, std::nullopt, deadline, std::move(join->done),
                                 /*added=*/true);
          } else if (!join->written.ok()) {
            std::move(join->done)(IndexWriteFailure(join->written));
          } else {
            std::move(join->done)(std::move(created->view));
          }
        };
        store_->WriteIndexAsync(created->key.user_tag, user->index.cas, write.index, write.ttl,
                                deadline, [join, settle](absl::Status written) mutable {
                                  join->written = std::move(written);
                                  settle();
                                });
        const StoredSession& s = created->view.stored;
        store_->AddAsync(created->key, s, SessionTtl(s, now), AddSessionBy(now, deadline),
                         [join, settle](absl::Status added) mutable {
                           join->added = std::move(added);
                           settle();
                         });
      });
}

void SessionService::FinishCreateBlocking(std::shared_ptr<NewSession> created,
                                          std::optional<IndexRecord> index, absl::Time deadline,
                                          ViewCallback done, bool added) {
  auto finish = [this, created = std::move(created), index = std::move(index), deadline,
                 done = std::move(done), added]() mutable {
    if (added) {
      // The index write lost a race: that was the first try. Wait as AddToIndex would after a
      // conflict, then retry with the same count of tries.
      Backoff backoff(options_, deadline);
      if (!backoff.Wait()) {
        std::move(done)(IndexTooBusy());
        return;
      }
      const absl::Status indexed =
          AddToIndex(created->key.user_tag, created->view.stored, std::move(index),
                     /*replaces_one=*/false, deadline, &backoff)
              .status();
      if (!indexed.ok()) {
        std::move(done)(indexed);
      } else if (FromMicros(created->view.stored.expires_at_unix_micros()) <= clock_.Now()) {
        // Stored before the race, with the expiry stamped then: retries that outlasted a short
        // TTL would hand out a token that is already dead.
        std::move(done)(ForCallers(absl::StatusCode::kUnavailable,
                                   "user_id: the session expired while the user's session index "
                                   "was busy; retry"));
      } else {
        std::move(done)(std::move(created->view));
      }
      return;
    }
    std::move(done)(FinishCreate(std::move(*created), std::move(index), deadline));
  };
  RunBlocking(std::move(finish));
}

absl::StatusOr<SessionView> SessionService::Modify(const SessionKey& key, absl::Time deadline,
                                                   Edit& edit, Backoff* after_lost_race) {
  std::optional<Backoff> own;
  Backoff& backoff = Backoff::ContinuedOrNew(after_lost_race, own, options_, deadline);
  for (;;) {
    SL_ASSIGN_OR_RETURN(SessionLookup lookup, store_->Lookup(key, deadline));
    const absl::Time now = clock_.Now();
    SL_RETURN_IF_ERROR(CheckLive(lookup, key, now));
    SessionView view;
    view.stored = std::move(lookup.record->session);
    SL_ASSIGN_OR_RETURN(const bool write, edit(view.stored, now));
    if (!write) return view;
    const absl::Status written = store_->CompareAndSwap(key, lookup.record->cas, view.stored,
                                                        SessionTtl(view.stored, now), deadline);
    if (written.ok()) return view;
    if (!absl::IsAborted(written)) return written;
    // Every conflict re-reads, a conditional update too: the conflict may have been a touch
    // that left the version alone, and the re-read decides between success and ABORTED.
    if (!backoff.Wait()) {
      return backoff.GiveUp();
    }
  }
}

void SessionService::ModifyAsync(SessionKey key, absl::Time deadline, Edit edit,
                                 ViewCallback done) {
  // The continuation keeps its own copy of the key: the store may answer after we return.
  auto owned = std::make_shared<SessionKey>(std::move(key));
  const SessionKey& k = *owned;
  store_->LookupAsync(k, deadline,
                      [this, key = std::move(owned), deadline, edit = std::move(edit),
                       done = std::move(done)](absl::StatusOr<SessionLookup> lookup) mutable {
                        if (!lookup.ok()) {
                          std::move(done)(lookup.status());
                          return;
                        }
                        const absl::Time now = clock_.Now();
                        if (absl::Status live = CheckLive(*lookup, *key, now); !live.ok()) {
                          std::move(done)(live);
                          return;
                        }
                        auto view = std::make_shared<SessionView>();
                        view->stored = std::move(lookup->record->session);
                        absl::StatusOr<bool> write = edit(view->stored, now);
                        if (!write.ok()) {
                          std::move(done)(write.status());
                          return;
                        }
                        if (!*write) {
                          std::move(done)(std::move(*view));
                          return;
                        }
                        store_->CompareAndSwapAsync(
                            *key, lookup->record->cas, view->stored, SessionTtl(view->stored, now),
                            deadline,
                            [this, key, view, deadline, edit = std::move(edit),
                             done = std::move(done)](absl::Status written) mutable {
                              if (written.ok()) {
                                std::move(done)(std::move(*view));
                                return;
                              }
                              if (!absl::IsAborted(written)) {
                                std::move(done)(written);
                                return;
                              }
                              // Lost a race: Modify reads again and retries, sleeping between
                              // tries. It first waits as its loop would after a conflict, so that
                              // the writers that just collided spread out instead of colliding
                              // again.
                              RunBlocking([this, key, deadline, edit = std::move(edit),
                                           done = std::move(done)]() mutable {
                                Backoff backoff(options_, deadline);
                                if (!backoff.Wait()) {
                                  std::move(done)(backoff.GiveUp());
                                  return;
                                }
                                std::move(done)(Modify(*key, deadline, edit, &backoff));
                              });
                            });
                      });
}

SessionService::Edit SessionService::TouchEdit(bool touch) {
  return [touch](StoredSession& s, absl::Time now) -> absl::StatusOr<bool> {
    if (!touch) return false;
    const int64_t slid = SlidExpiry(s, now);
    // Less than a second to gain: nothing to write. Without the threshold every touch wrote
    // (now moves by microseconds), so parallel touches of one session (a page's concurrent
    // requests) collided on compare-and-swap, and each loser's re-read wrote again and could
    // collide again; now the loser's re-read finds the winner's slide and is done. memcached
    // keeps whole seconds anyway. Half the idle timeout when that is shorter: a second to gain
    // comes to a one-second session only once it has expired, so no touch could keep it alive.
    // In absl::Duration, which saturates: both numbers come from Memcached, where a corrupt or
    // forged value may be anything.
    const absl::Duration least_gain =
        std::min(kTouchGranularity, absl::Seconds(std::max<int64_t>(0, s.ttl_seconds())) / 2);
    if (absl::Microseconds(slid) - absl::Microseconds(s.expires_at_unix_micros()) < least_gain) {
      return false;
    }
    s.set_expires_at_unix_micros(slid);
    return true;
  };
}

absl::StatusOr<SessionView> SessionService::Get(absl::string_view token, bool touch,
                                                absl::Time deadline) {
  if (token.empty()) return absl::InvalidArgumentError("token: required");
  SL_ASSIGN_OR_RETURN(SessionKey key, KeyForToken(token));
  Edit edit = TouchEdit(touch);
  return Modify(key, deadline, edit);
}

void SessionService::GetAsync(absl::string_view token, bool touch, absl::Time deadline,
                              ViewCallback done) {
  if (token.empty()) {
    std::move(done)(absl::InvalidArgumentError("token: required"));
    return;
  }
  absl::StatusOr<SessionKey> key = KeyForToken(token);
  if (!key.ok()) {
    std::move(done)(key.status());
    return;
  }
  ModifyAsync(*std::move(key), deadline, TouchEdit(touch), std::move(done));
}

void SessionService::RunBlocking(absl::AnyInvocable<void() &&> work) const {
  if (options_.blocking == nullptr) {
    std::move(work)();
  } else {
    options_.blocking->Run(std::move(work));
  }
}

absl::StatusOr<SessionKey> SessionService::CheckUpdate(absl::string_view token,
                                                       const AttributeMap& set,
                                                       const KeyList& remove,
                                                       int64_t expected_version) const {
  if (token.empty()) return absl::InvalidArgumentError("token: required");
  if (expected_version < 0) {
    return absl::InvalidArgumentError("expected_version: must be 0 (unconditional) or >= 1");
  }
  SL_RETURN_IF_ERROR(ValidateAttributeKeys("set", set, options_.limits));
  for (const std::string& k : remove) {
    SL_RETURN_IF_ERROR(ValidateText("remove", k, options_.limits.max_attribute_key_bytes));
    if (set.count(k) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("remove: key '", k, "' is also in set; a key may be in only one of them"));
    }
  }
  SL_RETURN_IF_ERROR(CheckAttributesSize("set", AttributesBytes(set), options_.limits));
  return KeyForToken(token);
}

SessionService::Edit SessionService::UpdateEdit(const AttributeMap& set, const KeyList& remove,
                                                int64_t expected_version) const {
  return [this, set, remove, expected_version](StoredSession& s,
                                               absl::Time now) -> absl::StatusOr<bool> {
    if (expected_version != 0 && s.version() != expected_version) {
      return absl::AbortedError(absl::StrCat("expected_version: ", expected_version,
                                             " does not match the stored version ", s.version()));
    }
    auto& attributes = *s.mutable_attributes();
    for (const std::string& k : remove) attributes.erase(k);
    for (const auto& [k, v] : set) attributes[k] = v;
    SL_RETURN_IF_ERROR(CheckAttributesSize("set", AttributesBytes(attributes), options_.limits));
    s.set_version(s.version() + 1);
    s.set_expires_at_unix_micros(SlidExpiry(s, now));
    return true;
  };
}

absl::StatusOr<SessionView> SessionService::Update(absl::string_view token, const AttributeMap& set,
                                                   const KeyList& remove, int64_t expected_version,
                                                   absl::Time deadline) {
  SL_ASSIGN_OR_RETURN(SessionKey key, CheckUpdate(token, set, remove, expected_version));
  Edit edit = UpdateEdit(set, remove, expected_version);
  absl::StatusOr<SessionView> updated = Modify(key, deadline, edit);
  if (!updated.ok()) return UpdateWriteFailure(updated.status());
  return updated;
}

void SessionService::UpdateAsync(absl::string_view token, const AttributeMap& set,
                                 const KeyList& remove, int64_t expected_version,
                                 absl::Time deadline, ViewCallback done) {
  absl::StatusOr<SessionKey> key = CheckUpdate(token, set, remove, expected_version);
  if (!key.ok()) {
    std::move(done)(key.status());
    return;
  }
  ModifyAsync(*std::move(key), deadline, UpdateEdit(set, remove, expected_version),
              [done = std::move(done)](absl::StatusOr<SessionView> updated) mutable {
                if (!updated.ok()) updated = UpdateWriteFailure(updated.status());
                std::move(done)(std::move(updated));
              });
}

absl::StatusOr<SessionView> SessionService::Rotate(absl::string_view token, absl::Time deadline) {
  if (token.empty()) return absl::InvalidArgumentError("token: required");
  SL_ASSIGN_OR_RETURN(SessionKey old_key, KeyForToken(token));
  Backoff backoff(options_, deadline);
  for (;;) {
    SL_ASSIGN_OR_RETURN(SessionLookup lookup, store_->Lookup(old_key, deadline));
    const absl::Time now = clock_.Now();
    SL_RETURN_IF_ERROR(CheckLive(lookup, old_key, now));
    // A rotation must end the old token on every copy (see SessionStore::Put); with a copy
    // that does not answer, it could not, so it does not start.
    if (!lookup.every_copy_answered) {
      return ForCallers(absl::StatusCode::kUnavailable,
                        "token: a copy of the session did not answer; nothing was changed, retry");
    }
    const StoredSession& old = lookup.record->session;

    SessionView view;
    SL_ASSIGN_OR_RETURN(view.token, NewToken(old.user_id()));
    SL_ASSIGN_OR_RETURN(SessionKey new_key, KeyForToken(view.token));
    StoredSession& s = view.stored;
    s = old;
    SL_ASSIGN_OR_RETURN(*s.mutable_session_id(), NewSessionId());
    s.set_version(1);
    s.set_token_hash(new_key.token_hash);
    s.set_expires_at_unix_micros(SlidExpiry(s, now));

    // Ending the old token cannot be undone, and takes a compare-and-swap and a write to every
    // other copy. With too little of the deadline left for it, the deadline would likely cut
    // the end off after some copies only: the old token ended, and the new one not given out
    // (RotationNotEverywhere). The index write below has that shape, and the add and the end
    // are still to come after it; so with less of the deadline left than twice what it took,
    // the rotation stops there, before the new session exists. Its index entry, whose session
    // never comes, is pruned by a later listing (kJustIndexed). Only the attempt that wrote the
    // entry counts: a pruning before it (every rotation at the per-user limit reads all of the
    // user's sessions) says nothing of how long one write takes.
    SL_ASSIGN_OR_RETURN(const Indexed index_entry, AddToIndex(new_key.user_tag, s, std::nullopt,
                                                              /*replaces_one=*/true, deadline));
    if (const absl::Time indexed = absl::Now();
        deadline - indexed < 2 * (indexed - index_entry.attempt_began)) {
      return ForCallers(absl::StatusCode::kUnavailable,
                        absl::StrCat(kRotationOutOfTime, kNothingChangedRetry));
    }
    // As for a create, the idle time starts once the entry is written, after any count.
    s.set_expires_at_unix_micros(SlidExpiry(s, index_entry.indexed_at));
    const absl::Time add_began = absl::Now();
    SL_RETURN_IF_ERROR(store_->Add(new_key, s, SessionTtl(s, index_entry.indexed_at),
                                   AddSessionBy(index_entry.indexed_at, deadline)));
    // A backstop for an add that was slower than the index write: with less of the deadline
    // left than the add took, the end does not start either. The new session, never handed
    // out, is removed again; that removal has even less time, and when it is cut off the
    // session stays, listed (and counted against the user's limit) until it expires.
    if (const absl::Time added = absl::Now(); deadline - added < added - add_began) {
      const absl::Status removed = store_->Remove(new_key, deadline);
      if (removed.ok()) {
        return ForCallers(absl::StatusCode::kUnavailable,
                          absl::StrCat(kRotationOutOfTime, kNothingChangedRetry));
      }
      return ForCallers(
          absl::StatusCode::kUnavailable,
          absl::StrCat(kRotationOutOfTime, "the old token still works, and ",
                       kUnremovedSessionMayBeListed, "; retry with a longer deadline"),
          removed);
    }
    // The old session ends by compare-and-swap, so two concurrent rotations of one token cannot
    // both succeed (the loser's new session is removed again). The tombstone's end is taken
    // now, not at `now`: a count at the limit came between them, and a touch that raced the
    // end slides the copy it lands on from its own clock.
    const absl::Time ending = clock_.Now();
    StoredSession ended_old = Tombstone(old, TombstoneEnd(old, ending));
    ended_old.set_rotated_to_token_hash(new_key.token_hash);
    const absl::Duration ended_old_ttl = TombstoneTtl(old, ending);
    const absl::Status ended = store_->CompareAndSwapEveryCopy(old_key, lookup.record->cas,
                                                               ended_old, ended_old_ttl, deadline);
    if (ended.ok()) return view;
    if (ended.GetPayload(kPartialWritePayload).has_value()) {
      return RotationNotEverywhere(new_key, ended, deadline);
    }
    if (!absl::IsAborted(ended)) {
      // No answer is not no: a compare-and-swap whose reply was lost (a timeout) may have ended
      // the old token, and removing the new session then would leave the caller with neither.
      // Only the copy it was sent to can say it was not applied (the others get the write only
      // after it); when that copy does not answer, the outcome stays unknown and the new
      // session, never handed out, is left to expire.
      absl::StatusOr<SessionLookup> after = store_->Lookup(old_key, deadline);
      if (!after.ok() || !after->record.has_value()) return ended;
      const SessionRecord& now_stored = *after->record;
      if (now_stored.session.deleted() &&
          now_stored.session.rotated_to_token_hash() == new_key.token_hash) {
        return FinishRotation(old_key, ended_old, ended_old_ttl, new_key, std::move(view),
                              deadline);
      }
      if (!now_stored.session.deleted() && now_stored.cas.copy == lookup.record->cas.copy) {
        (void)store_->Remove(new_key, deadline);
      }
      return ended;
    }
    // Lost to a concurrent write of the old session: the new one, never handed out, goes again.
    if (const absl::Status removed = store_->Remove(new_key, deadline); !removed.ok()) {
      return ForCallers(
          absl::StatusCode::kUnavailable,
          absl::StrCat("token: the rotation was interrupted; it did not change the old token, and ",
                       kUnremovedSessionMayBeListed, "; retry"),
          removed);
    }
    if (!backoff.Wait()) {
      return backoff.GiveUp();
    }
  }
}

absl::StatusOr<SessionView> SessionService::FinishRotation(const SessionKey& old_key,
                                                           const StoredSession& ended_old,
                                                           absl::Duration ttl,
                                                           const SessionKey& new_key,
                                                           SessionView view, absl::Time deadline) {
  // The compare-and-swap's answer was lost, so which copies took it is unknown.
  const absl::Status everywhere = store_->Put(old_key, ended_old, ttl, deadline);
  if (everywhere.ok()) return view;
  return RotationNotEverywhere(new_key, everywhere, deadline);
}

absl::Status SessionService::RotationNotEverywhere(const SessionKey& new_key,
                                                   const absl::Status& why, absl::Time deadline) {
  // The old token has ended where the end landed (a tombstone on any copy wins), so it is not
  // put back: undoing could revive a token a concurrent DeleteSession has ended meanwhile.
  (void)store_->Remove(new_key, deadline);
  return ForCallers(absl::StatusCode::kUnavailable,
                    "token: the rotation could not reach every copy of the session, so its new "
                    "token is not given out, and the old one has ended: create a new session",
                    why);
}

absl::Status SessionService::Delete(absl::string_view token, absl::Time deadline) {
  if (token.empty()) return absl::InvalidArgumentError("token: required");
  absl::StatusOr<SessionKey> key = KeyForToken(token);
  if (!key.ok()) return absl::OkStatus();  // Never issued, so nothing to delete.
  SL_ASSIGN_OR_RETURN(SessionLookup lookup, store_->Lookup(*key, deadline));
  if (!lookup.record.has_value()) {
    // None of the copies that answered holds it; one that did not may.
    if (lookup.every_copy_answered) return absl::OkStatus();
    return ForCallers(absl::StatusCode::kUnavailable,
                      "token: a copy of the session did not answer, which may hold it; retry");
  }
  const StoredSession& s = lookup.record->session;
  const absl::Time now = clock_.Now();
  if (!ConstantTimeEquals(s.token_hash(), key->token_hash)) return absl::OkStatus();
  if (s.deleted()) {
    // Ended already, but maybe on some copies only: a deletion that could not reach every
    // copy answered UNAVAILABLE, and this retry completes it. No copy of the session outlives
    // its absolute expiry, so neither need the end. A plain tombstone: this deletion is not
    // the rotation the stored one may record.
    const absl::Time absolute = FromMicros(s.absolute_expires_at_unix_micros());
    return EndedOnEveryCopy(
        "token", store_->Put(*key, Tombstone(s, absolute), StoreTtl(absolute, now), deadline));
  }
  // A tombstone rather than a delete: a copy that missed this write (its node was unreachable)
  // must not be able to bring the session back through read repair. It needs to live only as
  // long as the session itself could have.
  return EndedOnEveryCopy("token", PutTombstone(*key, s, now, deadline));
}

absl::Status SessionService::PutTombstone(const SessionKey& key, const StoredSession& s,
                                          absl::Time now, absl::Time deadline) {
  return store_->Put(key, Tombstone(s, TombstoneEnd(s, now)), TombstoneTtl(s, now), deadline);
}

absl::StatusOr<std::vector<StoredSession>> SessionService::LiveSessions(
    absl::string_view user_id, absl::string_view user_tag, uint64_t generation,
    Attributes attributes, absl::Time deadline, IndexCensus* census) {
  SL_ASSIGN_OR_RETURN(IndexRecord record, store_->ReadIndex(user_tag, deadline));
  if (census != nullptr) {
    for (const auto& entry : record.index.entries())
      census->token_hashes.insert(entry.token_hash());
  }
  const size_t indexed = static_cast<size_t>(record.index.entries_size());
  std::vector<StoredSession> live;
  size_t listed_bytes = 0;
  ListingBudget budget(listing_bytes_in_flight_, options_.limits.max_listing_bytes_in_flight);
  UserSessionIndex pruned;
  int64_t newest = 0;
  int tombstones_left = kTombstonesPerPruning;
  for (size_t first = 0; first < indexed; first += kSessionsPerRead) {
    const size_t end = std::min(indexed, first + kSessionsPerRead);
    std::vector<std::string> hashes;
    hashes.reserve(end - first);
    for (size_t i = first; i < end; ++i) {
      hashes.push_back(record.index.entries(static_cast<int>(i)).token_hash());
    }
    // A create whose session this read misses was under way when the read began, not when it
    // answered: the read may take a while, and the add land meanwhile.
    const absl::Time read_began = clock_.Now();
    SL_ASSIGN_OR_RETURN(std::vector<std::optional<StoredSession>> sessions,
                        store_->ReadSessions(user_tag, hashes, deadline));
    const absl::Time now = clock_.Now();
    for (size_t i = first; i < end; ++i) {
      const auto& entry = record.index.entries(static_cast<int>(i));
      std::optional<StoredSession>& s = sessions[i - first];
      const bool expired_for_good = FromMicros(entry.absolute_expires_at_unix_micros()) <= now;
      if (!s.has_value()) {
        // Just indexed by a Create or Rotate whose Add has not landed yet: keep it.
        const absl::Time indexed_at = IndexedAt(entry, options_.max_lifetime);
        if (!expired_for_good && indexed_at > now - kJustIndexed) {
          *pruned.add_entries() = entry;
          newest = std::max(newest, entry.absolute_expires_at_unix_micros());
          if (census != nullptr && indexed_at > read_began - kAddUnderWay) {
            ++census->adds_under_way;
          }
        }
        continue;
      }
      const bool owned =
          !s->deleted() && s->user_id() == user_id && s->token_hash() == entry.token_hash();
      const bool unended = owned && now < FromMicros(s->expires_at_unix_micros()) &&
                           now < FromMicros(s->absolute_expires_at_unix_micros());
      if (!unended) {
        // Expired by this server's clock, but another's may run up to kClockSkewMargin behind
        // it and still touch the session, which then lives on: dropped from the index now, it
        // would be live and yet missing from listings and revocations. So its entry stays that
        // long, unlisted.
        if (owned && now < FromMicros(s->expires_at_unix_micros()) + kClockSkewMargin &&
            now < FromMicros(s->absolute_expires_at_unix_micros()) + kClockSkewMargin) {
          *pruned.add_entries() = entry;
          newest = std::max(newest, entry.absolute_expires_at_unix_micros());
        }
        continue;
      }
      if (s->user_generation() < generation) {
        // Revoked by the generation but without the tombstone a revocation writes: it could
        // not write them all, or the session was added while it ran. Should memcached evict the
        // generation item, only a tombstone keeps it ended, so it is written here, a few per
        // call, and none more once one failed (a copy is down: the next call tries again). The
        // entry stays until one is written, for the next try (a listing, a revocation's retry).
        bool ended = false;
        if (tombstones_left > 0) {
          --tombstones_left;
          ended =
              PutTombstone(SessionKey{s->token_hash(), std::string(user_tag)}, *s, now, deadline)
                  .ok();
          if (!ended) tombstones_left = 0;
        }
        if (!ended) {
          *pruned.add_entries() = entry;
          newest = std::max(newest, entry.absolute_expires_at_unix_micros());
        }
        continue;
      }
      *pruned.add_entries() = entry;
      newest = std::max(newest, entry.absolute_expires_at_unix_micros());
      if (attributes == Attributes::kDrop) {
        s->clear_attributes();
      } else {
        const size_t bytes = s->ByteSizeLong();
        if ((listed_bytes += bytes) > options_.limits.max_listing_bytes) {
          return absl::ResourceExhaustedError(absl::StrCat(
              "user_id: the user's live sessions come to more than ",
              options_.limits.max_listing_bytes,
              " bytes with their attributes, more than one listing answers; end some of them"));
        }
        if (!budget.Take(bytes)) {
          return ForCallers(absl::StatusCode::kUnavailable,
                            "user_id: this server is assembling other large listings; retry, "
                            "perhaps on another replica");
        }
      }
      live.push_back(*std::move(s));
    }
  }
  const absl::Time now = clock_.Now();
  pruned.set_kept_when_pruned(pruned.entries_size());
  // Nothing dropped: written back only where the count moves the next pruning (PruneIndexAt),
  // so that listing a small index costs no write.
  const bool count_matters = pruned.entries_size() >= kIndexPruneThreshold / 2 &&
                             pruned.kept_when_pruned() != record.index.kept_when_pruned();
  if ((pruned.entries_size() != record.index.entries_size() || count_matters) &&
      record.cas.has_value()) {
    // Best effort: a conflicting writer's index wins and is pruned another time.
    if (pruned.entries_size() == 0) {
      (void)store_->WriteIndex(user_tag, record.cas, pruned, absl::Seconds(1), deadline);
    } else {
      (void)store_->WriteIndex(user_tag, record.cas, pruned, StoreTtl(FromMicros(newest), now),
                               deadline);
    }
  }
  std::sort(live.begin(), live.end(), [](const StoredSession& a, const StoredSession& b) {
    return a.created_at_unix_micros() < b.created_at_unix_micros();
  });
  return live;
}

absl::StatusOr<std::vector<StoredSession>> SessionService::List(absl::string_view user_id,
                                                                absl::Time deadline) {
  SL_RETURN_IF_ERROR(ValidateText("user_id", user_id, options_.limits.max_user_id_bytes));
  const std::string tag = UserTag(user_id);
  SL_ASSIGN_OR_RETURN(uint64_t generation,
                      store_->ReadGeneration(tag, GenerationKeepFor(), deadline));
  return LiveSessions(user_id, tag, generation, Attributes::kKeep, deadline);
}

absl::StatusOr<int64_t> SessionService::Revoke(absl::string_view user_id, absl::Time deadline) {
  SL_RETURN_IF_ERROR(ValidateText("user_id", user_id, options_.limits.max_user_id_bytes));
  const std::string tag = UserTag(user_id);
  // Advancing the generation is what ends the sessions everywhere at once, so it comes first:
  // the count reads every session of the user, and when that read failed (a slow node, a large
  // index, the deadline) nothing used to be revoked. Counted afterwards, the sessions ended are
  // those stamped from the generation it found up to below the new one, so a revocation that
  // reads the generation after another raised it does not count the other's sessions again
  // (two that read it at the same moment may both count them).
  //
  // The new generation is at least the time now, in microseconds. memcached may evict the small
  // generation item (its slab class fills on its own) while the user's sessions live on; one
  // above the highest stored value would then start again from 1 and reuse a generation that
  // sessions already carry, which would leave them live. A time never repeats (as long as the
  // replicas' clocks agree to within the time between two revocations of one user).
  //
  // The generation alone does not keep the sessions ended: were the item evicted, they would
  // be live again. So each also gets a tombstone, as DeleteSession writes, and a revocation
  // that could not write them all asks for a retry. The retry finds them again, those an
  // earlier revocation ended included (pruning keeps their entries until they have one).
  const uint64_t now_micros = static_cast<uint64_t>(std::max<int64_t>(0, ToMicros(clock_.Now())));
  absl::StatusOr<GenerationAdvance> advanced =
      store_->AdvanceGeneration(tag, now_micros, GenerationKeepFor(), deadline);
  if (!advanced.ok()) return EndedOnEveryCopy("user_id", advanced.status());
  absl::StatusOr<std::vector<StoredSession>> unended =
      LiveSessions(user_id, tag, /*generation=*/0, Attributes::kDrop, deadline);
  if (!unended.ok()) {
    return ForCallers(unended.status().code(),
                      "user_id: every session was revoked, but reading them to end each one "
                      "failed; retry to finish (a retry counts 0)",
                      unended.status());
  }
  int64_t ended = 0;
  int64_t not_ended = 0;
  absl::Status first_failure;
  const absl::Time now = clock_.Now();
  for (const StoredSession& s : *unended) {
    if (s.user_generation() >= advanced->raised_to) continue;  // Created after the revocation.
    if (s.user_generation() >= advanced->found) ++ended;       // Else an earlier revocation's.
    const absl::Status written = PutTombstone(SessionKey{s.token_hash(), tag}, s, now, deadline);
    if (!written.ok()) {
      ++not_ended;
      if (first_failure.ok()) first_failure = written;
    }
  }
  if (not_ended > 0) {
    return ForCallers(absl::StatusCode::kUnavailable,
                      absl::StrCat("user_id: every session was revoked, but ", not_ended,
                                   " could not be ended on every copy; retry to finish (a retry "
                                   "counts 0)"),
                      first_failure);
  }
  return ended;
}

absl::StatusOr<std::string> SessionService::UserIdForToken(absl::string_view token,
                                                           absl::Time deadline) {
  if (token.empty()) return absl::InvalidArgumentError("token: required");
  SL_ASSIGN_OR_RETURN(SessionKey key, KeyForToken(token));
  SL_ASSIGN_OR_RETURN(SessionLookup lookup, store_->Peek(key, deadline));
  SL_RETURN_IF_ERROR(CheckLive(lookup, key, clock_.Now()));
  return lookup.record->session.user_id();
}

absl::StatusOr<std::string> SessionTokenAuthenticator::UserIdForToken(absl::string_view token,
                                                                      absl::Time deadline) {
  absl::StatusOr<std::string> user = sessions_->UserIdForToken(token, deadline);
  if (user.ok()) return user;
  const absl::Status& why = user.status();
  // Only these say the token is bad. Anything else is the session store's fault, not the
  // token's, and a client told UNAUTHENTICATED would give up a good session.
  if (absl::IsNotFound(why) || absl::IsInvalidArgument(why) || absl::IsUnauthenticated(why)) {
    return absl::UnauthenticatedError("authorization: missing, unknown or expired session token");
  }
  return ForCallers(absl::StatusCode::kUnavailable,
                    "authorization: the session store failed; retry", why);
}

}  // namespace sessionledger
