#ifndef SESSIONLEDGER_SERVER_RPC_PROTO_TIME_H_
#define SESSIONLEDGER_SERVER_RPC_PROTO_TIME_H_

#include <cstdint>

#include "google/protobuf/timestamp.pb.h"

namespace sessionledger {

// A time in microseconds since the Unix epoch as a protobuf Timestamp. Before the epoch the
// seconds round down so that nanos stay in [0, 1e9): a Timestamp with negative nanos is invalid,
// and JSON clients (grpcurl) refuse the whole answer.
inline void SetTimestampFromUnixMicros(int64_t unix_micros, google::protobuf::Timestamp* out) {
  int64_t seconds = unix_micros / 1'000'000;
  int64_t micros = unix_micros % 1'000'000;
  if (micros < 0) {
    micros += 1'000'000;
    --seconds;
  }
  out->set_seconds(seconds);
  out->set_nanos(static_cast<int32_t>(micros * 1000));
}

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_PROTO_TIME_H_
