#ifndef SESSIONLEDGER_SERVER_LEDGER_LATE_BOUND_AUTHENTICATOR_H_
#define SESSIONLEDGER_SERVER_LEDGER_LATE_BOUND_AUTHENTICATOR_H_

#include <memory>
#include <string>

#include "server/domain/token_authenticator.h"

namespace sessionledger {

// A TokenAuthenticator that forwards to whatever the application's authenticator slot holds at
// call time, so the ledger can be wired before (or without) the session layer. An empty slot
// answers UNAVAILABLE: the server is up but cannot authenticate anybody yet, which is
// retryable, and never a crash. The slot must be filled before the server starts serving and
// not changed afterwards; then this is thread-safe.
class LateBoundAuthenticator final : public TokenAuthenticator {
 public:
  explicit LateBoundAuthenticator(const std::unique_ptr<TokenAuthenticator>& slot) : slot_(slot) {}

  absl::StatusOr<std::string> UserIdForToken(absl::string_view token,
                                             absl::Time deadline) override {
    if (slot_ == nullptr) {
      return absl::UnavailableError("session store: no token authenticator configured");
    }
    return slot_->UserIdForToken(token, deadline);
  }

 private:
  const std::unique_ptr<TokenAuthenticator>& slot_;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_LEDGER_LATE_BOUND_AUTHENTICATOR_H_
