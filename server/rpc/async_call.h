#ifndef SESSIONLEDGER_SERVER_RPC_ASYNC_CALL_H_
#define SESSIONLEDGER_SERVER_RPC_ASYNC_CALL_H_

#include <grpcpp/grpcpp.h>

namespace sessionledger {

// A call served on gRPC's asynchronous API: its address is the tag of every operation it
// starts on a completion queue, and the queue's thread hands each completion back to it.
class AsyncCall {
 public:
  virtual ~AsyncCall() = default;
  // One operation of this call completed (`ok` false: the server is shutting down or the call
  // was cancelled). The call may delete itself.
  virtual void Proceed(bool ok) = 0;
};

// Hands every completion of `cq` to its AsyncCall until the queue is shut down and drained.
inline void RunCompletionQueue(grpc::ServerCompletionQueue* cq) {
  void* tag = nullptr;
  bool ok = false;
  while (cq->Next(&tag, &ok)) static_cast<AsyncCall*>(tag)->Proceed(ok);
}

}  // namespace sessionledger

#endif  // SESSIONLEDGER_SERVER_RPC_ASYNC_CALL_H_
