#ifndef SESSIONLEDGER_TESTS_SUPPORT_SILENT_PEER_H_
#define SESSIONLEDGER_TESTS_SUPPORT_SILENT_PEER_H_

#include <string>
#include <vector>

#include "absl/time/time.h"

namespace sessionledger::testing {

// A peer on 127.0.0.1 that takes connections and never answers (a hung server or memcached, a
// black-holing proxy): the kernel completes the TCP handshakes and nobody reads, so whatever
// the client sends waits for an answer until its own timeout.
class SilentPeer {
 public:
  SilentPeer();
  ~SilentPeer();
  SilentPeer(const SilentPeer&) = delete;
  SilentPeer& operator=(const SilentPeer&) = delete;

  // 0 when the listener could not be set up.
  int port() const { return port_; }
  std::string target() const;
  // Waits until `timeout` for the next connection and keeps it open (still silent); false when
  // none came.
  bool AwaitConnection(absl::Duration timeout);

 private:
  int fd_ = -1;
  int port_ = 0;
  std::vector<int> accepted_;
};

}  // namespace sessionledger::testing

#endif  // SESSIONLEDGER_TESTS_SUPPORT_SILENT_PEER_H_
