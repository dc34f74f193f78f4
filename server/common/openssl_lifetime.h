#ifndef SESSIONLEDGER_SERVER_COMMON_OPENSSL_LIFETIME_H_
#define SESSIONLEDGER_SERVER_COMMON_OPENSSL_LIFETIME_H_

#include "absl/status/status.h"

namespace sessionledger {

// Initialises OpenSSL without its exit-time cleanup, so that its process-wide state lives as
// long as the process. Call it at the top of main, before anything (gRPC's TLS, libpq, a digest)
// initialises OpenSSL: the choice is made once, by the first initialisation.
//
// Why: gRPC's threads can outlive main (a detached shutdown thread, pool threads still winding
// down while exit handlers run). OpenSSL's atexit handler deletes its thread-local keys and its
// per-thread cleanup hooks; a thread that used OpenSSL and ends after that point has its error
// queue (904 bytes, allocated on the first handshake error or error check) freed by nobody, and
// OpenSSL documents that cleanup as unsafe while other threads still use it. An exiting process
// gains nothing from it: the kernel takes the memory back. INTERNAL if OpenSSL cannot start.
absl::Status KeepOpenSslUntilProcessExit();

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_COMMON_OPENSSL_LIFETIME_H_
