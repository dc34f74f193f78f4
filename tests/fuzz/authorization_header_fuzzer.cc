// libFuzzer entry point; the target's body and its properties are in fuzz_targets.cc.
#include <cstddef>
#include <cstdint>

#include "tests/fuzz/fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return sessionledger::fuzz::RunFuzzTarget(
      "authorization_header_fuzzer", &sessionledger::fuzz::FuzzAuthorizationHeader, data, size);
}
