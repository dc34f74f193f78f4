#include "server/common/logger.h"

#include <unistd.h>

#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sessionledger {
namespace {

using ::testing::HasSubstr;

// Captures what a Logger writes through a pipe.
class PipeCapture {
 public:
  PipeCapture() { EXPECT_EQ(pipe(fds_), 0); }
  ~PipeCapture() {
    close(fds_[0]);
    if (fds_[1] >= 0) close(fds_[1]);
  }
  int write_fd() const { return fds_[1]; }
  std::string CloseAndRead() {
    close(fds_[1]);
    fds_[1] = -1;
    std::string out;
    char buffer[4096];
    ssize_t n;
    while ((n = read(fds_[0], buffer, sizeof(buffer))) > 0) out.append(buffer, n);
    return out;
  }

 private:
  int fds_[2] = {-1, -1};
};

TEST(LoggerTest, WritesOneJsonObjectPerLine) {
  PipeCapture capture;
  {
    Logger logger(LogLevel::kInfo, capture.write_fd());
    logger.Info("rpc finished",
                {{"method", "/a/B"}, {"code", "OK"}, {"duration_ms", 1.5}, {"n", 3}, {"ok", true}});
  }
  const std::string out = capture.CloseAndRead();
  EXPECT_THAT(out, ::testing::MatchesRegex(
                       R"(\{"ts":"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z","level":"info",)"
                       R"("msg":"rpc finished","method":"/a/B","code":"OK","duration_ms":1.5,)"
                       R"("n":3,"ok":true\}
)"));
}

TEST(LoggerTest, DropsLinesBelowTheLevel) {
  PipeCapture capture;
  {
    Logger logger(LogLevel::kWarn, capture.write_fd());
    logger.Info("hidden");
    logger.Debug("hidden");
    logger.Warn("shown");
  }
  const std::string out = capture.CloseAndRead();
  EXPECT_THAT(out, ::testing::Not(HasSubstr("hidden")));
  EXPECT_THAT(out, HasSubstr("\"level\":\"warn\""));
}

TEST(LoggerTest, EscapesControlCharactersAndInvalidUtf8) {
  std::string out;
  AppendJsonString(out, std::string("a\"b\\c\nd\x01\xff\xc3\xa9", 11));
  EXPECT_EQ(out, R"("a\"b\\c\nd\u0001\ufffdé")");
}

TEST(LoggerTest, ConcurrentLinesNeverInterleave) {
  PipeCapture capture;
  {
    Logger logger(LogLevel::kInfo, capture.write_fd());
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&logger, t] {
        for (int i = 0; i < 50; ++i) logger.Info("line", {{"thread", t}, {"i", i}});
      });
    }
    for (auto& th : threads) th.join();
  }
  const std::string out = capture.CloseAndRead();
  std::vector<std::string> lines = absl::StrSplit(out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 200u);
  for (const std::string& line : lines) {
    EXPECT_THAT(line, ::testing::MatchesRegex(R"(\{.*"msg":"line","thread":[0-3],"i":[0-9]+\})"));
  }
}

TEST(LogLevelTest, ParsesKnownNames) {
  EXPECT_EQ(*ParseLogLevel("Info"), LogLevel::kInfo);
  EXPECT_EQ(*ParseLogLevel("warning"), LogLevel::kWarn);
  EXPECT_FALSE(ParseLogLevel("trace").ok());
}

}  // namespace
}  // namespace sessionledger
