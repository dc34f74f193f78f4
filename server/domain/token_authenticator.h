#ifndef SESSIONLEDGER_SERVER_DOMAIN_TOKEN_AUTHENTICATOR_H_
#define SESSIONLEDGER_SERVER_DOMAIN_TOKEN_AUTHENTICATOR_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace sessionledger {

// Resolves a session token to the user it acts for. The ledger depends on this interface only;
// the session layer implements it over the session store (one Memcached round trip).
// Implementations are thread-safe.
class TokenAuthenticator {
 public:
  virtual ~TokenAuthenticator() = default;
  // The user_id of the live session that `token` names, without touching the session.
  // UNAUTHENTICATED: empty, malformed, unknown, expired, deleted or revoked token.
  // UNAVAILABLE: the session store could not be asked before `deadline`.
  virtual absl::StatusOr<std::string> UserIdForToken(absl::string_view token,
                                                     absl::Time deadline) = 0;
};

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_DOMAIN_TOKEN_AUTHENTICATOR_H_
