#pragma once

#include <pthread.h>

#include <string>

namespace sessionledger {

// Names the calling thread as `top -H`, `perf` and /proc/PID/task/*/comm show it, so an operator
// can tell the completion-queue thread from the Memcached I/O thread. Linux keeps 15 bytes.
inline void NameThisThread(const std::string& name) {
  pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
}

inline std::string ThisThreadName() {
  char name[16] = {};
  pthread_getname_np(pthread_self(), name, sizeof name);
  return name;
}

}  // namespace sessionledger
