#include "server/rpc/grpc_log.h"

#include <grpc/support/log.h>
#include <stdio.h>
#include <unistd.h>

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sessionledger {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// A logger writing into an unlinked temporary file, read back whole.
class CapturedLog {
 public:
  CapturedLog() : file_(tmpfile()), logger_(LogLevel::kDebug, fileno(file_)) {}
  ~CapturedLog() { fclose(file_); }
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

// grpc_init does this in the server; until then gRPC logs nothing at all (GRPC_VERBOSITY unread).
void LogLikeTheServer() { gpr_log_verbosity_init(); }

TEST(GrpcLogTest, GrpcLinesBecomeJsonLinesWithTheirLevelAndPlace) {
  LogLikeTheServer();
  CapturedLog log;
  {
    const GrpcLogToLogger forward(log.logger());
    gpr_log("chttp2_transport.cc", 42, GPR_LOG_SEVERITY_ERROR, "Handshake failed with %s",
            "fatal error");
  }
  EXPECT_THAT(log.Read(),
              AllOf(HasSubstr("\"level\":\"error\""),
                    HasSubstr("\"msg\":\"Handshake failed with fatal error\""),
                    HasSubstr("\"source\":\"grpc\""), HasSubstr("\"file\":\"chttp2_transport.cc\""),
                    HasSubstr("\"line\":42")));
}

TEST(GrpcLogTest, NothingReachesTheLoggerOnceTheForwardingHasEnded) {
  LogLikeTheServer();
  CapturedLog log;
  { const GrpcLogToLogger forward(log.logger()); }
  gpr_log(GPR_ERROR, "after the end");  // gRPC's default function again: stderr.
  EXPECT_THAT(log.Read(), IsEmpty());
}

}  // namespace
}  // namespace sessionledger
