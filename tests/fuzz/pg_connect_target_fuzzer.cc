// libFuzzer entry point; the target's body and its properties are in fuzz_targets.cc.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "tests/fuzz/fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string problem = sessionledger::fuzz::FuzzPgConnectTarget(
      absl::string_view(reinterpret_cast<const char*>(data), size));
  if (!problem.empty()) {
    // A broken property is a finding like a crash: abort so libFuzzer saves the input.
    std::fprintf(stderr, "pg_connect_target_fuzzer: %s\n", problem.c_str());
    std::abort();
  }
  return 0;
}
