// KeepOpenSslUntilProcessExit, in a child process that ends the way a gRPC client or server
// does: a thread that met an OpenSSL error (a failed handshake) is still running when main
// returns, and ends only while the exit handlers run.
#include "server/common/openssl_lifetime.h"

#include <openssl/crypto.h>
#include <openssl/err.h>

#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "gtest/gtest.h"

namespace sessionledger {
namespace {

constexpr int kOpenSslGoneBeforeTheThreadEnded = 3;

// Synchronised with the standard library's mutex rather than absl::Notification: Debian's
// Abseil is not built for ThreadSanitizer, which would then see no order between the threads.
struct LateThread {
  std::thread thread;
  std::mutex mutex;
  std::condition_variable changed;
  bool met_an_error = false;
  bool may_end = false;
};

// One per child process; exit handlers take no arguments.
LateThread* late_thread = nullptr;

void StartThreadThatMeetsAnOpenSslError() {
  late_thread = new LateThread;
  late_thread->thread = std::thread([t = late_thread] {
    // Gives this thread an OpenSSL error queue, as a failed handshake does.
    ERR_raise(ERR_LIB_SSL, ERR_R_INTERNAL_ERROR);
    std::unique_lock<std::mutex> lock(t->mutex);
    t->met_an_error = true;
    t->changed.notify_all();
    t->changed.wait(lock, [t] { return t->may_end; });
  });
  std::unique_lock<std::mutex> lock(late_thread->mutex);
  late_thread->changed.wait(lock, [] { return late_thread->met_an_error; });
}

// Registered before OpenSSL initialises, so it runs after OpenSSL's own exit handler, if there
// is one: the thread ends there, and then OpenSSL must still be usable. Under LeakSanitizer the
// thread's error queue must also have been freed with it.
void EndTheThreadThenUseOpenSsl() {
  {
    std::lock_guard<std::mutex> lock(late_thread->mutex);
    late_thread->may_end = true;
  }
  late_thread->changed.notify_all();
  late_thread->thread.join();
  delete late_thread;
  if (OPENSSL_init_crypto(0, nullptr) != 1) std::_Exit(kOpenSslGoneBeforeTheThreadEnded);
}

TEST(OpenSslLifetimeTest, AThreadEndingDuringExitStillFindsOpenSsl) {
  EXPECT_EXIT(
      {
        std::atexit(EndTheThreadThenUseOpenSsl);
        if (!KeepOpenSslUntilProcessExit().ok()) std::_Exit(2);
        StartThreadThatMeetsAnOpenSslError();
        std::exit(0);
      },
      ::testing::ExitedWithCode(0), "");
}

// Without it, OpenSSL's exit handler runs first and the late thread finds it gone: the hazard
// the function exists for (and the proof that the test above can fail).
TEST(OpenSslLifetimeTest, WithoutItOpenSslIsGoneBeforeALateThreadEnds) {
  EXPECT_EXIT(
      {
        std::atexit(EndTheThreadThenUseOpenSsl);
        if (OPENSSL_init_crypto(0, nullptr) != 1) std::_Exit(2);
        StartThreadThatMeetsAnOpenSslError();
        std::exit(0);
      },
      ::testing::ExitedWithCode(kOpenSslGoneBeforeTheThreadEnded), "");
}

}  // namespace
}  // namespace sessionledger
