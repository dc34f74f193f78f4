#ifndef SESSIONLEDGER_TESTS_FUZZ_FUZZ_TARGETS_H_
#define SESSIONLEDGER_TESTS_FUZZ_FUZZ_TARGETS_H_

// The bodies of the libFuzzer targets, kept apart from LLVMFuzzerTestOneInput so that the
// ordinary (gcc) test build replays the committed corpora and every crash input through the very
// same code (tests/unit/fuzz_regression_test.cc) without clang.
//
// Each function takes arbitrary bytes and returns "" when every property held, or a description
// of the broken property. Crashes, leaks and undefined behaviour are left to the sanitizers.
// Stateless apart from function-local constants; safe to call repeatedly from one thread.

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace sessionledger::fuzz {

// MEMCACHED_URL parsing, DATABASE_URL validation and redaction, and LoadConfig over an
// environment made of "NAME=value" lines.
std::string FuzzConfig(absl::string_view data);

// DecodePageToken on arbitrary text, and Encode/Decode round trips of arbitrary cursors.
std::string FuzzPageToken(absl::string_view data);

// A StoredSession value as Memcached might hand it back (corrupted, truncated, written by another
// release or by an attacker with access to Memcached), fed to every SessionService operation
// through the gRPC handlers over an in-memory store.
std::string FuzzStoredSession(absl::string_view data);

// The `authorization` header: BearerToken, then a TransactionService call that must answer
// UNAUTHENTICATED for anything but the one valid token.
std::string FuzzAuthorizationHeader(absl::string_view data);

// PgConnectTarget over a DATABASE_URL (or key=value conninfo) after one control byte: the names
// it looks up, and WithAddresses over the whole host list and over a part of it, with every
// lookup answered or every lookup failed.
std::string FuzzPgConnectTarget(absl::string_view data);

// The body of every LLVMFuzzerTestOneInput: runs `target` on the input and, when it reports a
// broken property, prints it under `name` and aborts, so that libFuzzer keeps the input as it
// keeps a crash. Returns 0, as libFuzzer expects.
int RunFuzzTarget(const char* name, std::string (*target)(absl::string_view), const uint8_t* data,
                  size_t size);

}  // namespace sessionledger::fuzz

#endif  // SESSIONLEDGER_TESTS_FUZZ_FUZZ_TARGETS_H_
