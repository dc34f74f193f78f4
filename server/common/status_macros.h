#ifndef SESSIONLEDGER_SERVER_COMMON_STATUS_MACROS_H_
#define SESSIONLEDGER_SERVER_COMMON_STATUS_MACROS_H_

// Abseil 20220623 (Debian 12) ships no status macros; these are the usual two, prefixed so they
// never collide with a later Abseil's.

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define SL_STATUS_CONCAT_INNER_(a, b) a##b
#define SL_STATUS_CONCAT_(a, b) SL_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define SL_RETURN_IF_ERROR(expr)             \
  do {                                       \
    ::absl::Status sl_status_ = (expr);      \
    if (!sl_status_.ok()) return sl_status_; \
  } while (0)

// `lhs` = value of `rexpr` (an absl::StatusOr<T>), or return its status from the enclosing
// function. `lhs` may declare a variable: SL_ASSIGN_OR_RETURN(auto x, F());
#define SL_ASSIGN_OR_RETURN(lhs, rexpr) \
  SL_ASSIGN_OR_RETURN_IMPL_(SL_STATUS_CONCAT_(sl_statusor_, __LINE__), lhs, rexpr)

#define SL_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr)    \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = *std::move(statusor)

#endif  // SESSIONLEDGER_SERVER_COMMON_STATUS_MACROS_H_
