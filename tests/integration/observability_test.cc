// What operators see of a running server: /metrics, request ids, the container health check.
#include <grpcpp/client_context.h>
#include <grpcpp/generic/generic_stub.h>
#include <signal.h>

#include <functional>
#include <regex>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "sessionledger/v1/session.grpc.pb.h"
#include "sessionledger/v1/transaction.grpc.pb.h"
#include "tests/integration/session_test_support.h"
#include "tests/support/server_process.h"
#include "tests/support/test_env.h"

namespace sessionledger::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// With `serve_metrics`, /metrics is served on the server's metrics_port().
std::unique_ptr<ServerProcess> StartServer(std::map<std::string, std::optional<std::string>> env,
                                           bool serve_metrics = false) {
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  for (auto& [k, v] : env) options.env[k] = v;
  options.serve_metrics = serve_metrics;
  auto server = ServerProcess::Start(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

// The value of the sample `name{labels}` in a Prometheus text exposition, or -1.
double SampleValue(const std::string& exposition, const std::string& series) {
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    if (absl::StartsWith(line, series + " ")) {
      double value = -1;
      if (absl::SimpleAtod(line.substr(series.size() + 1), &value)) return value;
    }
  }
  return -1;
}

std::string Scrape(int port) {
  absl::StatusOr<std::string> response = HttpGet(port, "/metrics");
  EXPECT_TRUE(response.ok()) << response.status();
  if (!response.ok()) return "";
  EXPECT_THAT(*response, ::testing::StartsWith("HTTP/1.1 200"));
  const size_t body = response->find("\r\n\r\n");
  return body == std::string::npos ? "" : response->substr(body + 4);
}

TEST(MetricsTest, CountersMoveAfterCallsAndTheFormatParses) {
  auto server = StartServer({}, /*serve_metrics=*/true);
  ASSERT_NE(server, nullptr);
  const int metrics_port = server->metrics_port();
  auto channel = server->NewChannel();

  const std::string before = Scrape(metrics_port);
  const std::string ok_series =
      R"(sessionledger_rpc_requests_total{code="OK",method="/grpc.health.v1.Health/Check"})";
  const double ok_before = std::max(0.0, SampleValue(before, ok_series));

  auto health = grpc::health::v1::Health::NewStub(channel);
  for (int i = 0; i < 5; ++i) {
    grpc::ClientContext context;
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    ASSERT_TRUE(health->Check(&context, request, &response).ok());
  }
  {
    // A failing call is counted under its code.
    auto sessions = sessionledger::v1::SessionService::NewStub(channel);
    grpc::ClientContext context;
    sessionledger::v1::GetSessionRequest request;  // Empty token: INVALID_ARGUMENT.
    sessionledger::v1::Session response;
    EXPECT_FALSE(sessions->GetSession(&context, request, &response).ok());
  }

  const std::string after = Scrape(metrics_port);
  EXPECT_EQ(SampleValue(after, ok_series), ok_before + 5) << after;
  EXPECT_GE(SampleValue(after, R"(sessionledger_rpc_requests_total{code="INVALID_ARGUMENT",)"
                               R"(method="/sessionledger.v1.SessionService/GetSession"})"),
            1)
      << after;
  EXPECT_GE(SampleValue(after, R"(sessionledger_rpc_duration_seconds_count{)"
                               R"(method="/grpc.health.v1.Health/Check"})"),
            5);
  EXPECT_EQ(SampleValue(after, "sessionledger_rpc_in_flight"), 0);
  EXPECT_EQ(SampleValue(after, R"(sessionledger_pool_size{pool="memcached"})"), 16);
  EXPECT_EQ(SampleValue(after, R"(sessionledger_pool_size{pool="postgres"})"), 8);
  EXPECT_GE(SampleValue(after, R"(sessionledger_pool_waits_total{pool="postgres"})"), 0);
  EXPECT_EQ(SampleValue(after, "sessionledger_memcached_node_failures_total"), 0);
  EXPECT_EQ(SampleValue(after, "sessionledger_postgres_retries_total"), 0);
  EXPECT_EQ(SampleValue(after, "sessionledger_postgres_batches_total"), 0);
  EXPECT_EQ(SampleValue(after, "sessionledger_postgres_batched_movements_total"), 0);
  EXPECT_EQ(SampleValue(after, "sessionledger_postgres_batch_fallbacks_total"), 0);
  EXPECT_EQ(SampleValue(after, "sessionledger_postgres_batch_queue"), 0);

  // Every line is a comment (# HELP / # TYPE) or `name{labels} value`.
  const std::regex sample(
      R"re([a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? [-+0-9.eE]+|[-+]?Inf|NaN)re");
  int samples = 0;
  for (absl::string_view line : absl::StrSplit(after, '\n', absl::SkipEmpty())) {
    if (absl::StartsWith(line, "# HELP ") || absl::StartsWith(line, "# TYPE ")) continue;
    EXPECT_TRUE(std::regex_match(std::string(line), sample)) << line;
    ++samples;
  }
  EXPECT_GT(samples, 10);
}

TEST(MetricsTest, CountsMemcachedNodeFailuresThatReplicasHid) {
  auto server = StartServer({{"MEMCACHED_URL", RequiredEnv("MEMCACHED_URL_REPLICATED")}},
                            /*serve_metrics=*/true);
  ASSERT_NE(server, nullptr);
  const int metrics_port = server->metrics_port();
  auto sessions = sessionledger::v1::SessionService::NewStub(server->NewChannel());
  sessionledger::v1::Session created;
  {
    grpc::ClientContext context;
    sessionledger::v1::CreateSessionRequest request;
    request.set_user_id("metrics-node-failure");
    ASSERT_TRUE(sessions->CreateSession(&context, request, &created).ok());
  }
  BackingServices({"stop-memcached", "2"});
  grpc::Status read;
  for (int i = 0; i < 3; ++i) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    sessionledger::v1::GetSessionRequest request;
    request.set_token(created.token());
    sessionledger::v1::Session got;
    read = sessions->GetSession(&context, request, &got);
    if (!read.ok()) break;
  }
  const std::string exposition = Scrape(metrics_port);
  BackingServices({"start-memcached", "2"});
  EXPECT_TRUE(read.ok()) << "the other copy serves the session: " << read.error_message();
  EXPECT_GE(SampleValue(exposition, "sessionledger_memcached_node_failures_total"), 1)
      << exposition;
  // Requests went through the pipeline: at least the user state and the session on node 1.
  const double batches = SampleValue(exposition, "sessionledger_memcached_pipeline_batches_total");
  const double reads = SampleValue(exposition, "sessionledger_memcached_pipelined_requests_total");
  EXPECT_GE(batches, 1) << exposition;
  EXPECT_GE(reads, 2) << exposition;
  EXPECT_LE(batches, reads) << exposition;
}

TEST(MetricsTest, PortZeroTurnsMetricsOff) {
  auto server = StartServer({{"METRICS_PORT", "0"}});
  ASSERT_NE(server, nullptr);
  EXPECT_TRUE(server->WaitForOutput("\"metrics_port\":0", absl::Seconds(10))) << server->Output();
}

TEST(RequestIdTest, EchoesTheCallersIdAndLogsIt) {
  auto server = StartServer({{"LOG_LEVEL", "debug"}});
  ASSERT_NE(server, nullptr);
  auto health = grpc::health::v1::Health::NewStub(server->NewChannel());
  grpc::ClientContext context;
  context.AddMetadata("x-request-id", "req-abc-123");
  grpc::health::v1::HealthCheckRequest request;
  grpc::health::v1::HealthCheckResponse response;
  ASSERT_TRUE(health->Check(&context, request, &response).ok());
  auto echoed = context.GetServerInitialMetadata().find("x-request-id");
  ASSERT_NE(echoed, context.GetServerInitialMetadata().end());
  EXPECT_EQ(std::string(echoed->second.data(), echoed->second.size()), "req-abc-123");
  server->Signal(SIGTERM);
  ASSERT_TRUE(server->WaitForExit(absl::Seconds(15)).has_value());
  EXPECT_THAT(server->Output(), HasSubstr("\"request_id\":\"req-abc-123\""));
}

TEST(RequestIdTest, GeneratesOneWhenAbsentOrUnusable) {
  auto server = StartServer({});
  ASSERT_NE(server, nullptr);
  auto health = grpc::health::v1::Health::NewStub(server->NewChannel());
  std::set<std::string> ids;
  for (const char* sent : {"", "has space", ""}) {
    grpc::ClientContext context;
    if (*sent != '\0') context.AddMetadata("x-request-id", sent);
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    ASSERT_TRUE(health->Check(&context, request, &response).ok());
    auto echoed = context.GetServerInitialMetadata().find("x-request-id");
    ASSERT_NE(echoed, context.GetServerInitialMetadata().end());
    const std::string id(echoed->second.data(), echoed->second.size());
    EXPECT_THAT(id, ::testing::MatchesRegex("[0-9a-f]{24}"));
    ids.insert(id);
  }
  EXPECT_EQ(ids.size(), 3u) << "each call gets its own id";
}

// GetSession is answered on the memcached pipeline's thread, which writes the access-log lines
// of each turn together when the turn ends: the line must come out then, while the server
// idles, not wait for a later turn or for shutdown.
TEST(RequestIdTest, LogsACallThePipelineAnsweredBeforeItsNextTurn) {
  auto server = StartServer({});
  ASSERT_NE(server, nullptr);
  const sessionledger::v1::Session created =
      SessionClient(*server).MustCreate("access-log-pipeline");
  ASSERT_FALSE(created.token().empty());
  auto sessions = sessionledger::v1::SessionService::NewStub(server->NewChannel());
  grpc::ClientContext context;
  context.AddMetadata("x-request-id", "req-pipeline-read");
  sessionledger::v1::GetSessionRequest request;
  request.set_token(created.token());
  sessionledger::v1::Session got;
  ASSERT_TRUE(sessions->GetSession(&context, request, &got).ok());
  EXPECT_TRUE(server->WaitForOutput(
      R"("method":"/sessionledger.v1.SessionService/GetSession","code":"OK")", absl::Seconds(10)))
      << server->Output();
  EXPECT_THAT(server->Output(), HasSubstr(R"("request_id":"req-pipeline-read")"));
}

// Opens a call to `method` that never sends its request: it ends by `end` (a cancel, or the
// deadline passing) while the server still waits for the request message.
void CallThatEndsBeforeItsRequest(ServerProcess& server, const std::string& method,
                                  const std::string& request_id, bool cancel) {
  auto channel = server.NewChannel();
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue queue;
  grpc::ClientContext context;
  context.AddMetadata("x-request-id", request_id);
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Milliseconds(cancel ? 10000 : 300)));
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call =
      stub.PrepareCall(&context, method, &queue);
  void* tag = nullptr;
  bool ok = false;
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(queue.Next(&tag, &ok));
  ASSERT_TRUE(ok) << "the call's headers were not sent";
  absl::SleepFor(absl::Milliseconds(cancel ? 200 : 600));  // The server has seen the headers.
  if (cancel) context.TryCancel();
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(2));
  ASSERT_TRUE(queue.Next(&tag, &ok));
  EXPECT_EQ(status.error_code(),
            cancel ? grpc::StatusCode::CANCELLED : grpc::StatusCode::DEADLINE_EXCEEDED);
  queue.Shutdown();
  while (queue.Next(&tag, &ok)) {
  }
}

// A call that ends before its request arrives has no request, like a request that cannot be
// parsed. The access log and the metrics must count it as what it was: under overload,
// deadlines that pass while requests wait would otherwise show up as a burst of
// INVALID_ARGUMENT, "cannot be parsed". (Methods on the synchronous API: gRPC drops such a call
// of an asynchronous method before our code sees it, see below.)
TEST(AccessLogTest, CallsThatEndBeforeTheirRequestAreNotBadInput) {
  auto server = StartServer({});
  ASSERT_NE(server, nullptr);
  for (bool cancel : {true, false}) {
    const std::string id = cancel ? "req-cancelled-early" : "req-deadline-early";
    CallThatEndsBeforeItsRequest(*server, "/sessionledger.v1.TransactionService/GetAccount", id,
                                 cancel);
    const std::string logged = absl::StrCat(R"("request_id":")", id, R"(")");
    ASSERT_TRUE(server->WaitForOutput(logged, absl::Seconds(10))) << server->Output();
    for (absl::string_view line : absl::StrSplit(server->Output(), '\n')) {
      if (!absl::StrContains(line, logged)) continue;
      // A passed deadline ends the call by the server's own timer or by the caller's cancel,
      // whichever reaches it first: either is the truth.
      const ::testing::Matcher<std::string> cancelled = HasSubstr(R"("code":"CANCELLED")");
      EXPECT_THAT(std::string(line),
                  cancel ? cancelled
                         : ::testing::AnyOf(HasSubstr(R"("code":"DEADLINE_EXCEEDED")"), cancelled));
    }
  }
}

// The asynchronous methods keep a fixed number of calls waiting to be matched. A call that
// ends before its request arrives must not use one up: gRPC drops it and asks for the next
// itself. More of them than are waiting, and GetSession must still be served.
TEST(AccessLogTest, AsynchronousMethodsOutlastCallsThatEndBeforeTheirRequest) {
  auto server = StartServer({});
  ASSERT_NE(server, nullptr);
  for (int i = 0; i < 20; ++i) {
    CallThatEndsBeforeItsRequest(*server, "/sessionledger.v1.SessionService/GetSession",
                                 absl::StrCat("req-dropped-", i), /*cancel=*/true);
  }
  SessionClient client(*server);
  const sessionledger::v1::Session created = client.MustCreate("dropped-calls");
  EXPECT_EQ(client.GetCode(created.token()), grpc::StatusCode::OK);
  // A line is in Output() only once the reader has taken it from the pipe, so an absence read
  // while the server runs proves nothing. Stopped the normal way, it has written every line,
  // and WaitForExit returns once the reader has them all.
  server->Signal(SIGTERM);
  ASSERT_EQ(server->WaitForExit(absl::Seconds(30)), 0) << server->Output();
  const std::string output = server->Output();
  // The output holds the calls that were served, so it would hold the dropped ones too had any
  // been logged.
  EXPECT_THAT(output,
              HasSubstr(R"("method":"/sessionledger.v1.SessionService/GetSession","code":"OK")"));
  EXPECT_THAT(output, ::testing::Not(HasSubstr("req-dropped-")));
}

// A backing service's words (hosts and ports, the database user, SQL) are for operators: a
// caller reads what kind of thing failed and the call's request id, and that call's log line
// has the rest. Through each way a call reaches Memcached: the pipeline (GetSession), a pooled
// libmemcached connection (DeleteSession) and the ledger's session check (GetAccount).
TEST(AccessLogTest, ABackingServicesWordsReachTheLogNotTheCaller) {
  const std::string dead_port = absl::StrCat(RestartableTcpPort());
  auto server = StartServer({{"MEMCACHED_URL", absl::StrCat("memcached://127.0.0.1:", dead_port)}});
  ASSERT_NE(server, nullptr);
  auto sessions = sessionledger::v1::SessionService::NewStub(server->NewChannel());
  auto ledger = sessionledger::v1::TransactionService::NewStub(server->NewChannel());
  const std::string token(64, 'A');  // Well formed, so that the store is asked.
  struct Call {
    std::string request_id;
    std::function<grpc::Status(grpc::ClientContext&)> run;
    std::string words_for_callers;
    std::string words_for_the_log;
  };
  const std::vector<Call> calls = {
      {"req-words-get",
       [&](grpc::ClientContext& context) {
         sessionledger::v1::GetSessionRequest request;
         request.set_token(token);
         sessionledger::v1::Session response;
         return sessions->GetSession(&context, request, &response);
       },
       "a backing service failed or did not answer in time; retry",
       absl::StrCat("memcached 127.0.0.1:", dead_port, ": Connection refused")},
      {"req-words-delete",
       [&](grpc::ClientContext& context) {
         sessionledger::v1::DeleteSessionRequest request;
         request.set_token(token);
         sessionledger::v1::DeleteSessionResponse response;
         return sessions->DeleteSession(&context, request, &response);
       },
       "a backing service failed or did not answer in time; retry", "memcached get: "},
      {"req-words-ledger",
       [&](grpc::ClientContext& context) {
         context.AddMetadata("authorization", "Bearer " + token);
         sessionledger::v1::GetAccountRequest request;
         request.set_account_id("acct");
         sessionledger::v1::Account response;
         return ledger->GetAccount(&context, request, &response);
       },
       "authorization: the session store failed; retry",
       "authorization: the session store failed; retry (memcached get: "},
  };
  for (const Call& call : calls) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    context.AddMetadata("x-request-id", call.request_id);
    const grpc::Status status = call.run(context);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << call.request_id;
    EXPECT_EQ(status.error_message(),
              absl::StrCat(call.words_for_callers, " (request id ", call.request_id,
                           " has the cause in the server log)"));
    EXPECT_THAT(status.error_message(), ::testing::Not(HasSubstr("memcached")));
    EXPECT_TRUE(status.error_details().empty()) << call.request_id;
    EXPECT_EQ(context.GetServerTrailingMetadata().count("grpc-status-details-bin"), 0u);
  }
  for (const Call& call : calls) {
    const std::string id = absl::StrCat(R"("request_id":")", call.request_id, R"(")");
    // Other lines may carry the id too; the cause belongs on the call's own line.
    std::string finished_line;
    const bool finished = PollUntil(absl::Now() + absl::Seconds(10), [&] {
      for (absl::string_view line : absl::StrSplit(server->Output(), '\n')) {
        if (absl::StrContains(line, id) && absl::StrContains(line, R"("msg":"rpc finished")")) {
          finished_line = std::string(line);
          return true;
        }
      }
      return false;
    });
    ASSERT_TRUE(finished) << call.request_id << ": " << server->Output();
    EXPECT_THAT(finished_line, HasSubstr(absl::StrCat(R"("error":")", call.words_for_the_log)));
  }
}

TEST(HealthcheckCommandTest, ExitsZeroOnlyWhileTheServerServes) {
  // A notice long enough to ask while the server drains.
  auto server = StartServer({{"SHUTDOWN_NOTICE_MS", "10000"}});
  ASSERT_NE(server, nullptr);
  const std::string port = absl::StrCat(server->port());
  auto serving = RunCommand({SL_SERVER_BINARY, "healthcheck"}, {{"PORT", port}});
  ASSERT_TRUE(serving.ok());
  EXPECT_EQ(serving->exit_code, 0) << serving->output;
  EXPECT_THAT(serving->output, HasSubstr("SERVING"));
  EXPECT_THAT(serving->output, Not(HasSubstr("NOT_SERVING")));

  // Draining: alive, answering, NOT_SERVING. The container is then unhealthy. The log line and
  // the switch to NOT_SERVING come from two threads, so the check is asked until it says so.
  server->Signal(SIGTERM);
  ASSERT_TRUE(server->WaitForOutput("shutting down", absl::Seconds(10))) << server->Output();
  absl::StatusOr<CommandResult> draining;
  const bool unhealthy = PollUntil(absl::Now() + absl::Seconds(5), [&] {
    draining = RunCommand({SL_SERVER_BINARY, "healthcheck"}, {{"PORT", port}});
    return draining.ok() && draining->exit_code != 0;
  });
  ASSERT_TRUE(draining.ok()) << draining.status();
  EXPECT_TRUE(unhealthy) << "still healthy while draining: " << draining->output;
  EXPECT_EQ(draining->exit_code, 1) << draining->output;
  EXPECT_THAT(draining->output, HasSubstr("NOT_SERVING"));

  server->Signal(SIGKILL);
  server->WaitForExit(absl::Seconds(10));
  auto down = RunCommand({SL_SERVER_BINARY, "healthcheck"}, {{"PORT", port}});
  ASSERT_TRUE(down.ok());
  EXPECT_EQ(down->exit_code, 1) << down->output;
}

// Docker injects the proxy settings of ~/.docker/config.json into every container, and gRPC
// sends a channel through the proxy that http_proxy (or https_proxy, grpc_proxy) names: the
// container's health check must still reach its own server on the loopback.
TEST(HealthcheckCommandTest, IgnoresHttpProxySettings) {
  auto server = StartServer({});
  ASSERT_NE(server, nullptr);
  // Nothing listens on port 1: a check sent to this proxy fails.
  const std::string proxy = "http://127.0.0.1:1";
  auto checked = RunCommand({SL_SERVER_BINARY, "healthcheck"},
                            {{"PORT", absl::StrCat(server->port())},
                             {"http_proxy", proxy},
                             {"https_proxy", proxy},
                             {"grpc_proxy", proxy},
                             {"HTTP_PROXY", proxy},
                             {"HTTPS_PROXY", proxy},
                             // An exemption in the test's own environment must not hide the proxy.
                             {"no_proxy", ""},
                             {"no_grpc_proxy", ""},
                             {"NO_PROXY", ""}});
  ASSERT_TRUE(checked.ok());
  EXPECT_EQ(checked->exit_code, 0) << checked->output;
  EXPECT_THAT(checked->output, HasSubstr("SERVING"));
  EXPECT_THAT(checked->output, Not(HasSubstr("NOT_SERVING")));
}

TEST(HealthcheckCommandTest, NamesABadPort) {
  auto bad = RunCommand({SL_SERVER_BINARY, "healthcheck"}, {{"PORT", "5005x"}});
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ(bad->exit_code, 2) << bad->output;
  EXPECT_THAT(bad->output, HasSubstr("PORT: ")) << bad->output;
}

}  // namespace
}  // namespace sessionledger::testing
