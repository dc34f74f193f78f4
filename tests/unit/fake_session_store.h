#ifndef SESSIONLEDGER_TESTS_UNIT_FAKE_SESSION_STORE_H_
#define SESSIONLEDGER_TESTS_UNIT_FAKE_SESSION_STORE_H_

#include <algorithm>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/cord.h"
#include "server/common/clock.h"
#include "server/common/status_macros.h"
#include "server/domain/session_store.h"

// The fake rejects TTLs a real Memcached would misread, so unit tests catch them.
#define SL_FAKE_CHECK_TTL(ttl)                                                   \
  if ((ttl) <= absl::ZeroDuration() || (ttl) > kMaxStoreTtl) {                   \
    return absl::InvalidArgumentError("fake store: TTL outside 1 s .. 30 days"); \
  }

namespace sessionledger::testing {

// In-memory SessionStore with Memcached semantics (TTL against the injected clock, CAS values
// that change on every write). Knobs let tests force conflicts and outages. Thread-safe.
class FakeSessionStore final : public SessionStore {
 public:
  explicit FakeSessionStore(const Clock& clock) : clock_(clock) {}

  // Every store call fails with UNAVAILABLE while set.
  void set_unavailable(bool v) {
    std::lock_guard<std::mutex> l(mu_);
    unavailable_ = v;
    failure_ = absl::UnavailableError("fake store: down");
  }
  // Every store call fails with `failure` (a store fault of another kind), until
  // set_unavailable(false).
  void set_failure(absl::Status failure) {
    std::lock_guard<std::mutex> l(mu_);
    unavailable_ = true;
    failure_ = std::move(failure);
  }
  // The next `n` session CompareAndSwap calls fail with `failure` without writing: by default
  // ABORTED, as if another writer won.
  void FailNextCas(int n, absl::Status failure = absl::AbortedError("injected conflict")) {
    std::lock_guard<std::mutex> l(mu_);
    fail_cas_ = n;
    cas_failure_ = std::move(failure);
  }
  // The next ReadSessions fails with `failure`.
  void FailNextReadSessions(absl::Status failure) {
    std::lock_guard<std::mutex> l(mu_);
    read_sessions_failure_ = std::move(failure);
  }
  // The next `n` Puts (and CompareAndSwapEveryCopys, AdvanceGenerations) are applied but answer
  // `partial`, marked as the memcached store marks it, as when some copies took the write and
  // others did not answer.
  void PartlyFailNextPuts(int n, absl::Status partial) {
    std::lock_guard<std::mutex> l(mu_);
    partial_puts_ = n;
    partial.SetPayload(kPartialWritePayload, absl::Cord("1"));
    partial_put_failure_ = std::move(partial);
  }
  // While set, lookups say that some copy did not answer (a stalled memcached node).
  void set_some_copies_silent(bool silent) {
    std::lock_guard<std::mutex> l(mu_);
    some_copies_silent_ = silent;
  }
  // Runs `then` once, right after the next AdvanceGeneration (outside the store's lock, so it
  // may call the store): for another caller that gets in between a revocation's steps.
  void AfterNextAdvance(std::function<void()> then) {
    std::lock_guard<std::mutex> l(mu_);
    after_advance_ = std::move(then);
  }
  // Runs `first` once, right before the next AdvanceGeneration: for another revocation that
  // gets in ahead of it.
  void BeforeNextAdvance(std::function<void()> first) {
    std::lock_guard<std::mutex> l(mu_);
    before_advance_ = std::move(first);
  }
  // As memcached evicting the user's generation item (it sits in a slab class of small items,
  // which can fill up while the user's sessions live on).
  void ForgetGeneration(absl::string_view tag) {
    std::lock_guard<std::mutex> l(mu_);
    generations_.erase(std::string(tag));
  }
  // While set, Remove and the Put of a tombstone answer OK but keep the session (as an end
  // lost on its way).
  void set_ends_lost(bool lost) {
    std::lock_guard<std::mutex> l(mu_);
    ends_lost_ = lost;
  }
  // The next `n` Puts fail with `failure` without writing.
  void FailNextPuts(int n, absl::Status failure) {
    std::lock_guard<std::mutex> l(mu_);
    failed_puts_ = n;
    put_failure_ = std::move(failure);
  }
  void PartlyFailNextAdvance(absl::Status partial) {
    std::lock_guard<std::mutex> l(mu_);
    partial.SetPayload(kPartialWritePayload, absl::Cord("1"));
    partial_advance_failure_ = std::move(partial);
  }
  int puts() const {
    std::lock_guard<std::mutex> l(mu_);
    return puts_;
  }
  // The next session CompareAndSwap is applied but answers `lost` (a reply lost to a timeout).
  void LoseNextCasAnswer(absl::Status lost) {
    std::lock_guard<std::mutex> l(mu_);
    lose_cas_answer_ = std::move(lost);
  }
  // From the next session CompareAndSwap on, lookups answer from copy `copy`, as with
  // replicas when the copy the write went to stopped answering.
  void AnswerFromCopyAfterNextCas(int copy) {
    std::lock_guard<std::mutex> l(mu_);
    copy_after_cas_ = copy;
  }
  // How many Adds were called, whatever they answered.
  int adds() const {
    std::lock_guard<std::mutex> l(mu_);
    return adds_;
  }
  // The deadline the last Add was given.
  absl::Time last_add_deadline() const {
    std::lock_guard<std::mutex> l(mu_);
    return last_add_deadline_;
  }
  // The deadline the last Lookup (or Peek) was given.
  absl::Time last_lookup_deadline() const {
    std::lock_guard<std::mutex> l(mu_);
    return last_lookup_deadline_;
  }
  // The most sessions one ReadSessions call asked for.
  size_t largest_read_sessions() const {
    std::lock_guard<std::mutex> l(mu_);
    return largest_read_sessions_;
  }
  int cas_calls() const {
    std::lock_guard<std::mutex> l(mu_);
    return cas_calls_;
  }
  // The next `n` session CompareAndSwaps wait for `pause` first (outside the lock), so that
  // writers running at once read the same version and conflict even when the store answers
  // at once. (On every call it would starve some writer past its tries.)
  void PauseNextCas(int n, absl::Duration pause) {
    std::lock_guard<std::mutex> l(mu_);
    paused_cas_ = n;
    cas_pause_ = pause;
  }
  // The next Add takes `pause` (real time, outside the lock) before it writes, as a slow store.
  void PauseNextAdd(absl::Duration pause) {
    std::lock_guard<std::mutex> l(mu_);
    add_pause_ = pause;
  }
  // The next WriteIndex takes `pause` (real time, outside the lock) before it writes.
  void PauseNextIndexWrite(absl::Duration pause) {
    std::lock_guard<std::mutex> l(mu_);
    index_write_pause_ = pause;
  }
  // The next ReadSessions takes `pause` (real time, outside the lock) before it reads, as a
  // pruning of a large index reading many sessions.
  void PauseNextReadSessions(absl::Duration pause) {
    std::lock_guard<std::mutex> l(mu_);
    read_sessions_pause_ = pause;
  }
  // Runs `first` once, outside the lock, as the next Add begins (before it writes): another
  // call that gets in while a create's session is indexed but not stored yet.
  void BeforeNextAdd(std::function<void()> first) {
    std::lock_guard<std::mutex> l(mu_);
    before_add_ = std::move(first);
  }
  // Runs `first` once, outside the lock, as the next ReadSessions begins (before it reads):
  // another call that gets in while a pruning reads the sessions.
  void BeforeNextReadSessions(std::function<void()> first) {
    std::lock_guard<std::mutex> l(mu_);
    before_read_sessions_ = std::move(first);
  }
  // Runs `then` once, outside the lock, as the next ReadSessions has read (before it answers):
  // a read that took long, when `then` advances the clock.
  void AfterNextReadSessions(std::function<void()> then) {
    std::lock_guard<std::mutex> l(mu_);
    after_read_sessions_ = std::move(then);
  }
  // The next Remove takes `pause` (real time, outside the lock) before it removes; a Remove
  // whose deadline has passed by then removes nothing (see Remove).
  void PauseNextRemove(absl::Duration pause) {
    std::lock_guard<std::mutex> l(mu_);
    remove_pause_ = pause;
  }
  // The next Remove answers `partial`, marked as the memcached store marks it, and the session
  // stays: as when one copy deleted it and another, which still lists it, did not answer.
  void PartlyFailNextRemove(absl::Status partial) {
    std::lock_guard<std::mutex> l(mu_);
    partial.SetPayload(kPartialWritePayload, absl::Cord("1"));
    partial_remove_failure_ = std::move(partial);
  }
  // How many session items the store holds, expired or not.
  int SessionCount() const {
    std::lock_guard<std::mutex> l(mu_);
    return static_cast<int>(sessions_.size());
  }
  // What the store holds under a token hash, expired or not (tests inspect keys).
  bool HasRaw(const std::string& token_hash) const {
    std::lock_guard<std::mutex> l(mu_);
    return sessions_.count(token_hash) != 0;
  }
  absl::Duration TtlOf(const std::string& token_hash) const {
    std::lock_guard<std::mutex> l(mu_);
    auto it = sessions_.find(token_hash);
    return it == sessions_.end() ? absl::ZeroDuration() : it->second.expires - clock_.Now();
  }
  size_t IndexSize(const std::string& user_tag) const {
    std::lock_guard<std::mutex> l(mu_);
    auto it = indexes_.find(user_tag);
    return it == indexes_.end() ? 0 : static_cast<size_t>(it->second.value.entries_size());
  }

  absl::StatusOr<SessionLookup> Lookup(const SessionKey& key, absl::Time deadline) override {
    std::lock_guard<std::mutex> l(mu_);
    last_lookup_deadline_ = deadline;
    if (unavailable_) return Down();
    SessionLookup out;
    out.every_copy_answered = !some_copies_silent_;
    if (auto* e = Live(sessions_, key.token_hash))
      out.record = SessionRecord{e->value, {e->cas, answering_copy_}};
    if (auto* g = Live(generations_, key.user_tag)) out.user_generation = g->value;
    return out;
  }

  absl::StatusOr<SessionLookup> Peek(const SessionKey& key, absl::Time deadline) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      ++peeks_;
    }
    return Lookup(key, deadline);
  }
  int peeks() const {
    std::lock_guard<std::mutex> l(mu_);
    return peeks_;
  }

  absl::Status Add(const SessionKey& key, const storage::v1::StoredSession& s, absl::Duration ttl,
                   absl::Time deadline) override {
    absl::Duration pause;
    std::function<void()> first;
    {
      std::lock_guard<std::mutex> l(mu_);
      pause = std::exchange(add_pause_, absl::ZeroDuration());
      first = std::exchange(before_add_, nullptr);
    }
    if (first) first();
    absl::SleepFor(pause);
    std::lock_guard<std::mutex> l(mu_);
    ++adds_;
    last_add_deadline_ = deadline;
    if (unavailable_) return Down();
    SL_FAKE_CHECK_TTL(ttl);
    if (Live(sessions_, key.token_hash) != nullptr) return absl::AlreadyExistsError("exists");
    sessions_[key.token_hash] = {s, ++next_cas_, clock_.Now() + ttl};
    return absl::OkStatus();
  }

  absl::Status CompareAndSwap(const SessionKey& key, const CasToken& cas,
                              const storage::v1::StoredSession& s, absl::Duration ttl,
                              absl::Time) override {
    absl::Duration pause;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (paused_cas_ > 0) {
        --paused_cas_;
        pause = cas_pause_;
      }
    }
    absl::SleepFor(pause);
    std::lock_guard<std::mutex> l(mu_);
    if (unavailable_) return Down();
    SL_FAKE_CHECK_TTL(ttl);
    ++cas_calls_;
    if (copy_after_cas_.has_value())
      answering_copy_ = *std::exchange(copy_after_cas_, std::nullopt);
    if (fail_cas_ > 0) {
      --fail_cas_;
      return cas_failure_;
    }
    auto* e = Live(sessions_, key.token_hash);
    if (e == nullptr || e->cas != cas.cas) return absl::AbortedError("cas mismatch");
    *e = {s, ++next_cas_, clock_.Now() + ttl};
    return std::exchange(lose_cas_answer_, absl::OkStatus());
  }

  absl::Status CompareAndSwapEveryCopy(const SessionKey& key, const CasToken& cas,
                                       const storage::v1::StoredSession& s, absl::Duration ttl,
                                       absl::Time deadline) override {
    SL_RETURN_IF_ERROR(CompareAndSwap(key, cas, s, ttl, deadline));
    std::lock_guard<std::mutex> l(mu_);
    if (partial_puts_ > 0) {
      --partial_puts_;
      return partial_put_failure_;
    }
    return absl::OkStatus();
  }

  absl::Status Put(const SessionKey& key, const storage::v1::StoredSession& s, absl::Duration ttl,
                   absl::Time) override {
    std::lock_guard<std::mutex> l(mu_);
    if (unavailable_) return Down();
    SL_FAKE_CHECK_TTL(ttl);
    if (failed_puts_ > 0) {
      --failed_puts_;
      return put_failure_;
    }
    ++puts_;
    if (ends_lost_ && s.deleted()) return absl::OkStatus();
    sessions_[key.token_hash] = {s, ++next_cas_, clock_.Now() + ttl};
    if (partial_puts_ > 0) {
      --partial_puts_;
      return partial_put_failure_;
    }
    return absl::OkStatus();
  }

  // Fails with UNAVAILABLE, removing nothing, once `deadline` (wall-clock time, as callers'
  // deadlines are) has passed: a removal cut off by its deadline, which callers must not take
  // for one that happened.
  absl::Status Remove(const SessionKey& key, absl::Time deadline) override {
    absl::Duration pause;
    {
      std::lock_guard<std::mutex> l(mu_);
      pause = std::exchange(remove_pause_, absl::ZeroDuration());
    }
    absl::SleepFor(pause);
    std::lock_guard<std::mutex> l(mu_);
    if (unavailable_) return Down();
    if (absl::Now() >= deadline) return absl::UnavailableError("fake store: deadline passed");
    if (absl::Status partial = std::exchange(partial_remove_failure_, absl::OkStatus());
        !partial.ok()) {
      return partial;
    }
    if (!ends_lost_) sessions_.erase(key.token_hash);
    return absl::OkStatus();
  }

  absl::StatusOr<uint64_t> ReadGeneration(absl::string_view tag, absl::Duration keep_for,
                                          absl::Time) override {
    std::lock_guard<std::mutex> l(mu_);
    if (unavailable_) return Down();
    SL_FAKE_CHECK_TTL(keep_for);
    auto* g = Live(generations_, std::string(tag));
    const uint64_t value = g == nullptr ? 0 : g->value;
    generations_[std::string(tag)] = {value, ++next_cas_, clock_.Now() + keep_for};
    return value;
  }

  absl::StatusOr<GenerationAdvance> AdvanceGeneration(absl::string_view tag, uint64_t at_least,
                                                      absl::Duration keep_for,
                                                      absl::Time deadline) override {
    std::function<void()> first;
    {
      std::lock_guard<std::mutex> l(mu_);
      first = std::exchange(before_advance_, nullptr);
    }
    if (first) first();
    absl::StatusOr<GenerationAdvance> advanced =
        AdvanceGenerationLocked(tag, at_least, keep_for, deadline);
    std::function<void()> then;
    {
      std::lock_guard<std::mutex> l(mu_);
      then = std::exchange(after_advance_, nullptr);
    }
    if (then) then();
    return advanced;
  }

  absl::StatusOr<GenerationAdvance> AdvanceGenerationLocked(absl::string_view tag,
                                                            uint64_t at_least,
                                                            absl::Duration keep_for, absl::Time) {
    std::lock_guard<std::mutex> l(mu_);
    if (unavailable_) return Down();
    SL_FAKE_CHECK_TTL(keep_for);
    auto* g = Live(generations_, std::string(tag));
    GenerationAdvance advance;
    advance.found = g == nullptr ? 0 : g->value;
    advance.raised_to = std::max(advance.found + 1, at_least);
    generations_[std::string(tag)] = {advance.raised_to, ++next_cas_, clock_.Now() + keep_for};
    if (!partial_advance_failure_.ok()) return std::exchange(partial_advance_failure_, {});
    return advance;
  }

  absl::StatusOr<IndexRecord> ReadIndex(absl::string_view tag, absl::Time) override {
    std::lock_guard<std::mutex> l(mu_);
    if (unavailable_) return Down();
    IndexRecord out;
    if (auto* e = Live(indexes_, std::string(tag))) {
      out.index = e->value;
      out.cas = CasToken{e->cas, 0};
    }
    return out;
  }

  absl::Status WriteIndex(absl::string_view tag, const std::optional<CasToken>& cas,
                          const storage::v1::UserSessionIndex& index, absl::Duration ttl,
                          absl::Time) override {
    absl::Duration pause;
    {
      std::lock_guard<std::mutex> l(mu_);
      pause = std::exchange(index_write_pause_, absl::ZeroDuration());
    }
    absl::SleepFor(pause);
    std::lock_guard<std::mutex> l(mu_);
    if (unavailable_) return Down();
    SL_FAKE_CHECK_TTL(ttl);
    auto* e = Live(indexes_, std::string(tag));
    if (cas.has_value() ? (e == nullptr || e->cas != cas->cas) : e != nullptr) {
      return absl::AbortedError("index changed");
    }
    indexes_[std::string(tag)] = {index, ++next_cas_, clock_.Now() + ttl};
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<std::optional<storage::v1::StoredSession>>> ReadSessions(
      absl::string_view, const std::vector<std::string>& hashes, absl::Time) override {
    absl::Duration pause;
    std::function<void()> first;
    {
      std::lock_guard<std::mutex> l(mu_);
      pause = std::exchange(read_sessions_pause_, absl::ZeroDuration());
      first = std::exchange(before_read_sessions_, nullptr);
    }
    if (first) first();
    absl::SleepFor(pause);
    std::vector<std::optional<storage::v1::StoredSession>> out;
    std::function<void()> then;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (unavailable_) return Down();
      if (!read_sessions_failure_.ok())
        return std::exchange(read_sessions_failure_, absl::OkStatus());
      largest_read_sessions_ = std::max(largest_read_sessions_, hashes.size());
      for (const auto& h : hashes) {
        auto* e = Live(sessions_, h);
        out.push_back(e == nullptr ? std::nullopt
                                   : std::optional<storage::v1::StoredSession>(e->value));
      }
      then = std::exchange(after_read_sessions_, nullptr);
    }
    if (then) then();
    return out;
  }

 private:
  template <typename T>
  struct Entry {
    T value;
    uint64_t cas = 0;
    absl::Time expires;
  };

  absl::Status Down() const { return failure_; }

  template <typename T>
  Entry<T>* Live(std::map<std::string, Entry<T>>& m, const std::string& k) {
    auto it = m.find(k);
    if (it == m.end()) return nullptr;
    if (clock_.Now() >= it->second.expires) {
      m.erase(it);
      return nullptr;
    }
    return &it->second;
  }

  const Clock& clock_;
  mutable std::mutex mu_;
  bool unavailable_ = false;
  absl::Status failure_ = absl::UnavailableError("fake store: down");
  int fail_cas_ = 0;
  int partial_puts_ = 0;
  absl::Status partial_put_failure_;
  absl::Status partial_advance_failure_;
  std::function<void()> after_advance_;
  std::function<void()> before_advance_;
  bool ends_lost_ = false;
  int failed_puts_ = 0;
  absl::Status put_failure_;
  bool some_copies_silent_ = false;
  int puts_ = 0;
  int adds_ = 0;
  absl::Status read_sessions_failure_;
  size_t largest_read_sessions_ = 0;
  absl::Status cas_failure_;
  std::optional<int> copy_after_cas_;
  int answering_copy_ = 0;
  absl::Status lose_cas_answer_;
  int cas_calls_ = 0;
  int paused_cas_ = 0;
  absl::Duration cas_pause_;
  absl::Duration add_pause_;
  absl::Duration index_write_pause_;
  absl::Duration read_sessions_pause_;
  absl::Duration remove_pause_;
  std::function<void()> before_add_;
  std::function<void()> before_read_sessions_;
  std::function<void()> after_read_sessions_;
  absl::Status partial_remove_failure_;
  absl::Time last_add_deadline_ = absl::InfinitePast();
  absl::Time last_lookup_deadline_ = absl::InfinitePast();
  int peeks_ = 0;
  uint64_t next_cas_ = 0;
  std::map<std::string, Entry<storage::v1::StoredSession>> sessions_;
  std::map<std::string, Entry<uint64_t>> generations_;
  std::map<std::string, Entry<storage::v1::UserSessionIndex>> indexes_;
};

}  // namespace sessionledger::testing

#undef SL_FAKE_CHECK_TTL

#endif  // SESSIONLEDGER_TESTS_UNIT_FAKE_SESSION_STORE_H_
