#ifndef SESSIONLEDGER_SERVER_COMMON_UTF8_H_
#define SESSIONLEDGER_SERVER_COMMON_UTF8_H_

#include <cstddef>

#include "absl/strings/string_view.h"

namespace sessionledger {

// Well-formed UTF-8 as RFC 3629 defines it, the rule protobuf enforces on proto3 string fields
// and PostgreSQL on text: no overlong forms, no UTF-16 surrogates (U+D800..U+DFFF), nothing past
// U+10FFFF. The one implementation the logger, the validators and the request-parse errors
// share, so that they can never disagree on what "valid UTF-8" is. Pure functions.

// Length (1..4) of the well-formed UTF-8 sequence that starts at text[i], or 0 when none does
// (including when it is cut off by the end of `text`). Requires i < text.size().
size_t Utf8SequenceLength(absl::string_view text, size_t i);

// Whether all of `text` is well-formed UTF-8. The empty string is.
bool IsValidUtf8(absl::string_view text);

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_COMMON_UTF8_H_
