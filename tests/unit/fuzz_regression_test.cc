// Replays the fuzzers' committed inputs through the fuzz target bodies in the ordinary build (and
// under ASan/UBSan with scripts/test --sanitize), so that no clang is needed to keep them fixed:
//   tests/fuzz/corpus/<target>/       seeds, each must pass
//   tests/fuzz/regressions/<target>/  inputs that once crashed or broke a property
#include <dirent.h>

#include <algorithm>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/fuzz/fuzz_targets.h"

namespace sessionledger::fuzz {
namespace {

// Sorted file paths of one directory; an absent directory has none.
std::vector<std::string> FilesIn(const std::string& dir) {
  std::vector<std::string> files;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return files;
  while (const dirent* entry = readdir(d)) {
    const std::string name = entry->d_name;
    if (name == "." || name == ".." || name == ".gitkeep") continue;
    files.push_back(dir + "/" + name);
  }
  closedir(d);
  std::sort(files.begin(), files.end());
  return files;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Runs every committed input of `name` through `target`; returns how many there were.
size_t Replay(const std::string& name, std::string (*target)(absl::string_view)) {
  size_t count = 0;
  for (const char* kind : {"corpus", "regressions"}) {
    for (const std::string& path :
         FilesIn(std::string(SL_SOURCE_DIR) + "/tests/fuzz/" + kind + "/" + name)) {
      SCOPED_TRACE(path);
      EXPECT_EQ(target(ReadFile(path)), "");
      ++count;
    }
  }
  return count;
}

TEST(FuzzRegressionTest, Config) { EXPECT_GT(Replay("config", &FuzzConfig), 0u); }

TEST(FuzzRegressionTest, PageToken) { EXPECT_GT(Replay("page_token", &FuzzPageToken), 0u); }

TEST(FuzzRegressionTest, StoredSession) {
  EXPECT_GT(Replay("stored_session", &FuzzStoredSession), 0u);
}

TEST(FuzzRegressionTest, AuthorizationHeader) {
  EXPECT_GT(Replay("authorization_header", &FuzzAuthorizationHeader), 0u);
}

TEST(FuzzRegressionTest, PgConnectTarget) {
  EXPECT_GT(Replay("pg_connect_target", &FuzzPgConnectTarget), 0u);
}

// The bodies must hold for the trivial inputs libFuzzer always starts with.
TEST(FuzzRegressionTest, EmptyAndTinyInputs) {
  for (const std::string& input : {std::string(), std::string(1, '\0'), std::string("\x01"),
                                   std::string("\x02="), std::string(2, '\xff')}) {
    EXPECT_EQ(FuzzConfig(input), "");
    EXPECT_EQ(FuzzPageToken(input), "");
    EXPECT_EQ(FuzzStoredSession(input), "");
    EXPECT_EQ(FuzzAuthorizationHeader(input), "");
    EXPECT_EQ(FuzzPgConnectTarget(input), "");
  }
}

}  // namespace
}  // namespace sessionledger::fuzz
