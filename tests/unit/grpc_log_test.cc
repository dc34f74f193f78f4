#include "server/rpc/grpc_log.h"

#include <grpc/support/log.h>
#include <stdio.h>
#include <unistd.h>

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/captured_log.h"

namespace sessionledger {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

using ::sessionledger::testing::CapturedLog;

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
