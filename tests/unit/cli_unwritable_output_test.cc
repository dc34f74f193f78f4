// The sessionledger-cli binary with its stdout on /dev/full, where every write fails (ENOSPC) as
// on a full disk: output the CLI could not write must not exit 0, or `session create > file`
// loses the token without a word. Runs the built binary; needs no server.
#include <unistd.h>

#include <string>

#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/test_env.h"

namespace sessionledger::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// The CLI with `args` and its stdout sent to `stdout_path`; the output is its stderr only.
CommandResult CliWithStdoutAt(const std::string& stdout_path, const std::string& args) {
  absl::StatusOr<CommandResult> result =
      RunCommand({"/bin/sh", "-c", "exec \"$0\" " + args + " > " + stdout_path, SL_CLI_BINARY});
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? *result : CommandResult{};
}

class CliUnwritableOutputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (access("/dev/full", W_OK) != 0) GTEST_SKIP() << "no writable /dev/full here";
  }
};

TEST_F(CliUnwritableOutputTest, OutputThatCannotBeWrittenExits15) {
  const CommandResult r = CliWithStdoutAt("/dev/full", "--help");
  EXPECT_EQ(r.exit_code, 15) << r.output;  // DATA_LOSS
  EXPECT_THAT(r.output, HasSubstr("sessionledger-cli: cannot write output")) << r.output;
}

TEST_F(CliUnwritableOutputTest, WritableOutputExits0) {
  const CommandResult r = CliWithStdoutAt("/dev/null", "--help");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output, "");
}

// A usage error (here, no --user-id) writes nothing to stdout: it keeps its own code and says
// nothing of output.
TEST_F(CliUnwritableOutputTest, AFailedCommandKeepsItsCode) {
  const CommandResult r = CliWithStdoutAt("/dev/full", "session create");
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_THAT(r.output, HasSubstr("sessionledger-cli: ")) << r.output;
  EXPECT_THAT(r.output, Not(HasSubstr("cannot write output"))) << r.output;
}

}  // namespace
}  // namespace sessionledger::testing
