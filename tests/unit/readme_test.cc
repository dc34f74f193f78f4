// The README's configuration table is what operators read; it must list every variable the
// binary reads, with the same default.
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/config/config.h"

namespace sessionledger {
namespace {

std::string ReadReadme() {
  std::ifstream in(std::string(SL_SOURCE_DIR) + "/README.md");
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

TEST(ReadmeTest, ConfigurationTableListsEveryVariableWithItsDefault) {
  const std::string readme = ReadReadme();
  ASSERT_FALSE(readme.empty()) << "README.md not found under " << SL_SOURCE_DIR;
  for (const ConfigVariable& variable : ConfigVariables()) {
    const std::string name(variable.name);
    const std::string fallback(variable.default_value);
    const std::string expected = fallback.empty() ? absl::StrCat("| `", name, "` | required |")
                                 : fallback == "unset"
                                     ? absl::StrCat("| `", name, "` | unset |")
                                     : absl::StrCat("| `", name, "` | `", fallback, "` |");
    EXPECT_TRUE(absl::StrContains(readme, expected)) << "README.md lacks the row " << expected;
  }
}

}  // namespace
}  // namespace sessionledger
