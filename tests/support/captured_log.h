#ifndef SESSIONLEDGER_TESTS_SUPPORT_CAPTURED_LOG_H_
#define SESSIONLEDGER_TESTS_SUPPORT_CAPTURED_LOG_H_

#include <stdio.h>
#include <unistd.h>

#include <string>

#include "server/common/logger.h"

namespace sessionledger::testing {

// A logger writing into an unlinked temporary file, read back whole.
class CapturedLog {
 public:
  CapturedLog() : file_(tmpfile()), logger_(LogLevel::kDebug, fileno(file_)) {}
  ~CapturedLog() { fclose(file_); }
  CapturedLog(const CapturedLog&) = delete;
  CapturedLog& operator=(const CapturedLog&) = delete;

  Logger& logger() { return logger_; }
  std::string Read() {
    std::string out;
    char buffer[4096];
    ssize_t n;
    off_t offset = 0;
    while ((n = pread(fileno(file_), buffer, sizeof(buffer), offset)) > 0) {
      out.append(buffer, static_cast<size_t>(n));
      offset += n;
    }
    return out;
  }

 private:
  FILE* const file_;
  Logger logger_;
};

}  // namespace sessionledger::testing

#endif  // SESSIONLEDGER_TESTS_SUPPORT_CAPTURED_LOG_H_
