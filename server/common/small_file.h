#ifndef SESSIONLEDGER_SERVER_COMMON_SMALL_FILE_H_
#define SESSIONLEDGER_SERVER_COMMON_SMALL_FILE_H_

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"

namespace sessionledger {

// The whole of a file that should be small (a PEM certificate or key: a few KiB), read at most
// `max_bytes` far, so that a mistaken path (/dev/zero, a disk image) cannot eat memory.
// INVALID_ARGUMENT "cannot read <path>: <reason>" or "<path> is larger than <max>"; the
// caller puts the name of its setting in front.
absl::StatusOr<std::string> ReadSmallFile(const std::string& path, size_t max_bytes);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_COMMON_SMALL_FILE_H_
