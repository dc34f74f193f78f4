#ifndef SESSIONLEDGER_SERVER_LEDGER_FAKE_TOKEN_AUTHENTICATOR_H_
#define SESSIONLEDGER_SERVER_LEDGER_FAKE_TOKEN_AUTHENTICATOR_H_

#include <map>
#include <mutex>
#include <string>

#include "server/domain/token_authenticator.h"

namespace sessionledger {

// For unit tests. Tokens registered with Add() resolve to their user; anything else is
// UNAUTHENTICATED. set_unavailable(true) simulates a session store outage. Thread-safe.
class FakeAuthenticator final : public TokenAuthenticator {
 public:
  void Add(const std::string& token, const std::string& user) {
    std::lock_guard<std::mutex> lock(mutex_);
    users_[token] = user;
  }
  void set_unavailable(bool unavailable) {
    std::lock_guard<std::mutex> lock(mutex_);
    unavailable_ = unavailable;
  }
  absl::StatusOr<std::string> UserIdForToken(absl::string_view token,
                                             absl::Time /*deadline*/) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (unavailable_) return absl::UnavailableError("session store down (test)");
    auto it = users_.find(std::string(token));
    if (it == users_.end()) return absl::UnauthenticatedError("unknown token (test)");
    return it->second;
  }

 private:
  std::mutex mutex_;
  bool unavailable_ = false;
  std::map<std::string, std::string> users_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_LEDGER_FAKE_TOKEN_AUTHENTICATOR_H_
