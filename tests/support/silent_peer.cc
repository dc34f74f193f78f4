#include "tests/support/silent_peer.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"

namespace sessionledger::testing {

SilentPeer::SilentPeer() {
  fd_ = socket(AF_INET, SOCK_STREAM, 0);
  if (fd_ < 0) return;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  if (bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      listen(fd_, 64) != 0 ||
      getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return;
  }
  port_ = ntohs(address.sin_port);
}

SilentPeer::~SilentPeer() {
  for (int fd : accepted_) close(fd);
  if (fd_ >= 0) close(fd_);
}

std::string SilentPeer::target() const { return absl::StrCat("127.0.0.1:", port_); }

bool SilentPeer::AwaitConnection(absl::Duration timeout) {
  if (port_ == 0) return false;
  pollfd waiting{fd_, POLLIN, 0};
  if (poll(&waiting, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) != 1) return false;
  const int fd = accept(fd_, nullptr, nullptr);
  if (fd < 0) return false;
  accepted_.push_back(fd);
  return true;
}

}  // namespace sessionledger::testing
