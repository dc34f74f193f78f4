#ifndef SESSIONLEDGER_SERVER_COMMON_TSAN_HANDOFF_H_
#define SESSIONLEDGER_SERVER_COMMON_TSAN_HANDOFF_H_

// Hand-overs of an object from one thread to another through a library that ThreadSanitizer
// cannot see into (Debian's gRPC is not built with it: a completion-queue tag given to gRPC on
// one thread and returned by the queue on another looks unsynchronised). Marking both ends tells
// TSan what gRPC's own locks guarantee. Nothing at all in other builds.

#if defined(__SANITIZE_THREAD__)
#define SL_TSAN_HANDOFF 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SL_TSAN_HANDOFF 1
#endif
#endif

#ifdef SL_TSAN_HANDOFF
#include <sanitizer/tsan_interface.h>
#endif

namespace sessionledger {

// Before `object` is given away: what this thread did to it happens before...
inline void MarkHandedOver([[maybe_unused]] const void* object) {
#ifdef SL_TSAN_HANDOFF
  __tsan_release(const_cast<void*>(object));
#endif
}

// ... what the thread that received it does after this.
inline void MarkReceived([[maybe_unused]] const void* object) {
#ifdef SL_TSAN_HANDOFF
  __tsan_acquire(const_cast<void*>(object));
#endif
}

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_COMMON_TSAN_HANDOFF_H_
