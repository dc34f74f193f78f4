// grpc.health.v1.Health/Watch on the asynchronous API: a real server on a loopback port in this
// process, its AsyncCallQueues served on one thread as ServerApp does, and a HealthBoard the
// tests change directly.
#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <deque>
#include <filesystem>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "server/rpc/async_call.h"
#include "server/rpc/health.h"

namespace sessionledger {
namespace {

using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;
using ServingStatus = HealthCheckResponse::ServingStatus;

// Asks `done` every 10 ms until it says yes or `timeout` passes; whether it said yes.
template <typename Done>
bool Eventually(Done done, absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time give_up = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() >= give_up) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

int ThreadsOfThisProcess() {
  return static_cast<int>(std::distance(std::filesystem::directory_iterator("/proc/self/task"),
                                        std::filesystem::directory_iterator()));
}

// One open Watch stream. The deadline ends a stream that a failing test would leave waiting.
struct WatchStream {
  WatchStream(Health::Stub& stub, const std::string& service) {
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
    HealthCheckRequest request;
    request.set_service(service);
    reader = stub.Watch(&context, request);
  }
  // The next status sent, or UNKNOWN once the stream has ended.
  HealthCheckResponse::ServingStatus Next() {
    HealthCheckResponse response;
    return reader->Read(&response) ? response.status() : HealthCheckResponse::UNKNOWN;
  }

  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<HealthCheckResponse>> reader;
};

// A Watch stream read on a thread of its own, so that a test can wait for the next message with
// a deadline, and see that none comes. Its destructor cancels the stream.
class WatchReader {
 public:
  WatchReader(Health::Stub& stub, const std::string& service) : stream_(stub, service) {
    thread_ = std::thread([this] {
      for (;;) {
        const ServingStatus status = stream_.Next();
        std::lock_guard<std::mutex> lock(mutex_);
        if (status == HealthCheckResponse::UNKNOWN) {
          ended_ = true;
          arrived_.notify_all();
          return;
        }
        received_.push_back(status);
        arrived_.notify_all();
      }
    });
  }
  ~WatchReader() {
    stream_.context.TryCancel();
    thread_.join();
    stream_.reader->Finish();
  }
  WatchReader(const WatchReader&) = delete;
  WatchReader& operator=(const WatchReader&) = delete;

  // The next message not yet taken, or std::nullopt when none came within `wait` or the stream
  // has ended (ended() tells which).
  std::optional<ServingStatus> NextWithin(absl::Duration wait) {
    std::unique_lock<std::mutex> lock(mutex_);
    arrived_.wait_for(lock, absl::ToChronoNanoseconds(wait),
                      [this] { return !received_.empty() || ended_; });
    if (received_.empty()) return std::nullopt;
    const ServingStatus next = received_.front();
    received_.pop_front();
    return next;
  }

  bool ended() {
    std::lock_guard<std::mutex> lock(mutex_);
    return ended_;
  }

 private:
  WatchStream stream_;
  std::mutex mutex_;
  std::condition_variable arrived_;
  std::deque<ServingStatus> received_;  // Read and not yet taken.
  bool ended_ = false;
  std::thread thread_;
};

class HealthWatchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service_);
    queues_ = std::make_unique<AsyncCallQueues>(builder.AddCompletionQueue());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    service_.Accept(*queues_, 2);
    serving_ = std::thread([this] { queues_->Run(); });
    stub_ = Health::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  }

  void TearDown() override { StopServer(); }

  // As ServerApp::Wait: the server (cancelling what is left after `grace`), then every call,
  // then the queues. Whether every call had ended before the queues shut down.
  bool StopServer(absl::Duration grace = absl::Seconds(5)) {
    if (!serving_.joinable()) return true;
    server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
    server_->Wait();
    const bool ended = queues_->WaitForCallsAndArrivals(absl::Seconds(5));
    queues_->Shutdown();
    serving_.join();
    return ended;
  }

  HealthBoard board_;
  HealthService service_{board_};
  std::unique_ptr<AsyncCallQueues> queues_;
  std::unique_ptr<grpc::Server> server_;
  std::thread serving_;
  std::unique_ptr<Health::Stub> stub_;
};

TEST_F(HealthWatchTest, SendsTheCurrentStatusThenEveryChange) {
  WatchStream watch(*stub_, kSessionServiceName);
  EXPECT_EQ(watch.Next(), HealthCheckResponse::NOT_SERVING);
  board_.Set(kSessionServiceName, true);
  EXPECT_EQ(watch.Next(), HealthCheckResponse::SERVING);
  board_.Set(kSessionServiceName, true);      // No change: nothing sent.
  board_.Set(kTransactionServiceName, true);  // Another service: nothing sent.
  board_.Set(kSessionServiceName, false);
  EXPECT_EQ(watch.Next(), HealthCheckResponse::NOT_SERVING)
      << "a message was sent for something other than a change of this service";
}

// Changes faster than the stream sends are coalesced (HealthService::WatchCall): one write at
// a time, and once it has completed the board is read again and its status then is sent, if it
// differs from the last one sent. So no status comes twice in a row, fewer messages come than
// there were changes, and once the changes stop the last message is the board's status, with
// nothing stale queued behind it: the next change is the next message, and the only one.
TEST_F(HealthWatchTest, ChangesDuringAWriteEndWithTheLatestStatus) {
  // Once the changes stop, at most one write is in flight and one more is due; a pause this long
  // between them takes a stalled machine, not a slow one (two cores under a sanitizer).
  // Long enough for a write already in flight to arrive on a loaded machine under sanitizers:
  // stopping before it would judge a stale status.
  constexpr absl::Duration kQuiet = absl::Seconds(2);
  // For a message that must come.
  constexpr absl::Duration kPatience = absl::Seconds(10);
  WatchReader watch(*stub_, kSessionServiceName);
  ASSERT_EQ(watch.NextWithin(kPatience), HealthCheckResponse::NOT_SERVING);
  constexpr int kFlips = 1001;  // Odd: it ends SERVING.
  for (int i = 0; i < kFlips; ++i) board_.Set(kSessionServiceName, i % 2 == 0);

  // Read until the stream has been quiet for kQuiet after a message with the board's status.
  // After any other message, quiet is waited out for up to kPatience: the latest status is
  // still owed, and only a lost change never sends it.
  ServingStatus last = HealthCheckResponse::NOT_SERVING;
  int received = 0;  // After the first message.
  for (;;) {
    const std::optional<ServingStatus> next =
        watch.NextWithin(last == HealthCheckResponse::SERVING ? kQuiet : kPatience);
    if (!next.has_value()) break;
    ASSERT_NE(*next, last) << "the same status sent twice in a row, after " << received
                           << " messages";
    last = *next;
    ++received;
    // Each message differs from the one before, so there cannot be more than changes.
    ASSERT_LE(received, kFlips) << "more messages than changes";
  }
  ASSERT_FALSE(watch.ended()) << "the stream ended";
  EXPECT_EQ(last, HealthCheckResponse::SERVING)
      << "the board's latest status was never sent: the last of " << received
      << " messages is stale";
  EXPECT_LT(received, kFlips) << "a message for every change: none was coalesced";

  // Everything due has been read: the next message is the next change, and nothing follows it.
  board_.Set(kSessionServiceName, false);
  EXPECT_EQ(watch.NextWithin(kPatience), HealthCheckResponse::NOT_SERVING)
      << "the change after the stream went quiet was not sent";
  if (const std::optional<ServingStatus> extra = watch.NextWithin(kQuiet); extra.has_value()) {
    ADD_FAILURE() << "a message after the last change: "
                  << HealthCheckResponse::ServingStatus_Name(*extra);
  }
}

TEST_F(HealthWatchTest, AnUnknownNameReadsServiceUnknownAndWaitsForItsOwnChange) {
  WatchStream watch(*stub_, "no.such.Service");
  EXPECT_EQ(watch.Next(), HealthCheckResponse::SERVICE_UNKNOWN);
  board_.Set(kSessionServiceName, true);
  board_.Set("", false);
  board_.Set("no.such.Service", true);
  EXPECT_EQ(watch.Next(), HealthCheckResponse::SERVING)
      << "something was sent before the name's own change";
}

// The shutdown notice: streams say NOT_SERVING and stay open (gRPC's client health checking
// would open the next Watch at once, on this server, had they ended); they end just before the
// server stops taking calls.
TEST_F(HealthWatchTest, ShutdownSendsNotServingOnceAndEndsEveryStreamOkOnlyAtTheNoticesEnd) {
  WatchStream overall(*stub_, "");
  WatchStream session(*stub_, kSessionServiceName);
  ASSERT_EQ(overall.Next(), HealthCheckResponse::SERVING);
  ASSERT_EQ(session.Next(), HealthCheckResponse::NOT_SERVING);
  board_.Shutdown();
  EXPECT_EQ(overall.Next(), HealthCheckResponse::NOT_SERVING);
  // A stream opened during the notice hears NOT_SERVING too.
  WatchStream late(*stub_, "");
  EXPECT_EQ(late.Next(), HealthCheckResponse::NOT_SERVING);
  // Every stream is still open: none has left the board, and none ends meanwhile.
  auto overall_next = std::async(std::launch::async, [&] { return overall.Next(); });
  auto late_next = std::async(std::launch::async, [&] { return late.Next(); });
  EXPECT_EQ(overall_next.wait_for(std::chrono::milliseconds(300)), std::future_status::timeout)
      << "a stream ended during the notice";
  EXPECT_EQ(late_next.wait_for(std::chrono::milliseconds(0)), std::future_status::timeout)
      << "a stream opened during the notice ended during it";
  EXPECT_EQ(board_.watchers(), 3u);

  board_.EndWatches();
  EXPECT_EQ(overall_next.get(), HealthCheckResponse::UNKNOWN) << "the stream did not end";
  EXPECT_EQ(late_next.get(), HealthCheckResponse::UNKNOWN) << "the stream did not end";
  EXPECT_EQ(session.Next(), HealthCheckResponse::UNKNOWN) << "NOT_SERVING was sent twice";
  EXPECT_TRUE(overall.reader->Finish().ok());
  EXPECT_TRUE(session.reader->Finish().ok());
  EXPECT_TRUE(late.reader->Finish().ok());
  // A stream opened after that hears NOT_SERVING and ends at once.
  WatchStream later(*stub_, "");
  EXPECT_EQ(later.Next(), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(later.Next(), HealthCheckResponse::UNKNOWN);
  EXPECT_TRUE(later.reader->Finish().ok());
  EXPECT_TRUE(Eventually([&] { return board_.watchers() == 0; }));
  const absl::Time stopping = absl::Now();
  EXPECT_TRUE(StopServer(absl::Seconds(10))) << "a call was left when the queues shut down";
  EXPECT_LT(absl::Now() - stopping, absl::Seconds(5)) << "the drain waited for the grace";
}

TEST_F(HealthWatchTest, ACancelledStreamLeavesTheBoardAndEnds) {
  std::vector<std::unique_ptr<WatchStream>> streams;
  for (int i = 0; i < 20; ++i) {
    streams.push_back(std::make_unique<WatchStream>(*stub_, i % 2 ? "" : "no.such.Service"));
    ASSERT_NE(streams.back()->Next(), HealthCheckResponse::UNKNOWN);
  }
  EXPECT_EQ(board_.watchers(), 20u);
  for (auto& stream : streams) stream->context.TryCancel();
  for (auto& stream : streams) {
    EXPECT_EQ(stream->reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  EXPECT_TRUE(Eventually([&] { return board_.watchers() == 0; }))
      << board_.watchers() << " cancelled streams still on the board";
  // Every call has ended: the wait for them returns at once.
  EXPECT_TRUE(queues_->WaitForCallsToEnd(absl::Seconds(5)));
  // A change now wakes nothing that is gone.
  board_.Set("", false);
  board_.Set("no.such.Service", true);
  EXPECT_TRUE(StopServer());
}

// The server shutting down with streams open and the board still serving (a server stopped
// without its board): gRPC cancels the streams at the end of the grace, and every call ends
// before the queues do.
TEST_F(HealthWatchTest, StreamsOpenAtServerShutdownAreCancelledAndFreed) {
  WatchStream a(*stub_, "");
  WatchStream b(*stub_, kSessionServiceName);
  ASSERT_EQ(a.Next(), HealthCheckResponse::SERVING);
  ASSERT_EQ(b.Next(), HealthCheckResponse::NOT_SERVING);
  EXPECT_TRUE(StopServer(absl::Milliseconds(100)));
  EXPECT_EQ(board_.watchers(), 0u);
  EXPECT_FALSE(a.reader->Finish().ok());
  EXPECT_FALSE(b.reader->Finish().ok());
}

// The defect this design fixes: each open Watch held a server thread, woken every second.
TEST_F(HealthWatchTest, OpenStreamsHoldNoThreads) {
  constexpr int kStreams = 200;
  std::vector<std::unique_ptr<WatchStream>> streams;
  streams.push_back(std::make_unique<WatchStream>(*stub_, ""));
  ASSERT_EQ(streams.back()->Next(), HealthCheckResponse::SERVING);
  absl::SleepFor(absl::Milliseconds(200));  // Threads started for the first call settle.
  const int before = ThreadsOfThisProcess();
  for (int i = 1; i < kStreams; ++i) {
    streams.push_back(std::make_unique<WatchStream>(*stub_, i % 2 ? "" : kSessionServiceName));
    ASSERT_NE(streams.back()->Next(), HealthCheckResponse::UNKNOWN) << "stream " << i;
  }
  const int open = ThreadsOfThisProcess();
  EXPECT_LT(open - before, 10) << before << " threads with one stream open, " << open << " with "
                               << kStreams;
  // All of them still hear a change.
  board_.Set(kSessionServiceName, true);
  for (int i = 2; i < kStreams; i += 2) {
    EXPECT_EQ(streams[i]->Next(), HealthCheckResponse::SERVING) << "stream " << i;
  }
  for (auto& stream : streams) stream->context.TryCancel();
  for (auto& stream : streams) stream->reader->Finish();
  EXPECT_TRUE(Eventually([&] { return board_.watchers() == 0; }));
}

}  // namespace
}  // namespace sessionledger
