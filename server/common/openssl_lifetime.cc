#include "server/common/openssl_lifetime.h"

#include <openssl/crypto.h>

namespace sessionledger {

absl::Status KeepOpenSslUntilProcessExit() {
  if (OPENSSL_init_crypto(OPENSSL_INIT_NO_ATEXIT, nullptr) != 1) {
    return absl::InternalError("openssl: initialisation failed");
  }
  return absl::OkStatus();
}

}  // namespace sessionledger
