// TLS and mutual TLS of the gRPC port through a real server process. A CA, a server certificate
// (SAN 127.0.0.1 and localhost) and client certificates are made with the openssl CLI in a
// temporary directory at test time; no key material is committed.
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <signal.h>

#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "server/common/openssl_lifetime.h"
#include "sessionledger/v1/session.grpc.pb.h"
#include "tests/support/server_process.h"
#include "tests/support/test_env.h"

namespace sessionledger::testing {
namespace {

namespace pb = ::sessionledger::v1;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // This process is a TLS client like the CLI, whose gRPC threads may outlive main (see
    // server/common/openssl_lifetime.h).
    ASSERT_TRUE(KeepOpenSslUntilProcessExit().ok());
    char pattern[] = "/tmp/sl-tls-test-XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    dir_ = new std::string(pattern);
    // Two CAs: "ca" signs the server and the trusted client (the server certificate is valid for
    // client use too, so that `sessionledger-server healthcheck` can present it under mutual TLS);
    // "rogue" signs a client the server must refuse under mutual TLS.
    const std::string script = absl::StrCat(
        "set -e; cd '", *dir_, "'\n",
        "printf "
        "'subjectAltName=IP:127.0.0.1,DNS:localhost\\nextendedKeyUsage=serverAuth,clientAuth\\n' "
        "> server.ext\n",
        "printf 'extendedKeyUsage=clientAuth\\n' > client.ext\n", "for ca in ca rogue; do\n",
        "  openssl req -x509 -newkey rsa:2048 -nodes -keyout $ca.key -out $ca.pem -days 2 "
        "-subj /CN=sessionledger-test-$ca\n",
        "done\n", "issue() { # name ca ext cn\n",
        "  openssl req -newkey rsa:2048 -nodes -keyout $1.key -out $1.csr -subj /CN=$4\n",
        "  openssl x509 -req -in $1.csr -CA $2.pem -CAkey $2.key -CAcreateserial -days 2 "
        "-extfile $3 -out $1.pem\n",
        "}\n", "issue server ca server.ext localhost\n",
        "issue client ca client.ext trusted-client\n",
        "issue intruder rogue client.ext intruder\n");
    absl::StatusOr<CommandResult> made = RunCommand({"sh", "-c", script});
    ASSERT_TRUE(made.ok()) << made.status();
    ASSERT_EQ(made->exit_code, 0) << made->output;
  }
  static void TearDownTestSuite() {
    if (dir_ == nullptr) return;
    (void)RunCommand({"rm", "-rf", *dir_});
    delete dir_;
    dir_ = nullptr;
  }

  static std::string Path(const std::string& name) { return *dir_ + "/" + name; }

  // A server with TLS (and mutual TLS when `client_ca` is set) on the backing services.
  static std::unique_ptr<ServerProcess> StartTlsServer(bool mutual) {
    ServerProcess::Options options;
    options.env = BackingServiceEnv();
    options.env["LOG_LEVEL"] = "info";
    options.env["TLS_CERT_FILE"] = Path("server.pem");
    options.env["TLS_KEY_FILE"] = Path("server.key");
    if (mutual) options.env["TLS_CLIENT_CA_FILE"] = Path("ca.pem");
    // ServerProcess checks health over plaintext, which a TLS port refuses: wait here instead.
    options.wait_until_serving = false;
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(options);
    EXPECT_TRUE(server.ok()) << server.status();
    if (!server.ok()) return nullptr;
    grpc::SslCredentialsOptions credentials;
    credentials.pem_root_certs = ReadFile(Path("ca.pem"));
    if (mutual) {
      credentials.pem_private_key = ReadFile(Path("client.key"));
      credentials.pem_cert_chain = ReadFile(Path("client.pem"));
    }
    const absl::Time give_up = absl::Now() + absl::Seconds(30);
    while (absl::Now() < give_up) {
      if ((*server)->WaitForExit(absl::ZeroDuration()).has_value()) {
        ADD_FAILURE() << "server exited during start-up:\n" << (*server)->Output();
        return nullptr;
      }
      if (Check((*server)->target(), grpc::SslCredentials(credentials)).ok()) {
        return *std::move(server);
      }
      absl::SleepFor(absl::Milliseconds(100));
    }
    ADD_FAILURE() << "TLS server never served:\n" << (*server)->Output();
    return nullptr;
  }

  // One health check through a fresh channel with `credentials`.
  static grpc::Status Check(const std::string& target,
                            std::shared_ptr<grpc::ChannelCredentials> credentials,
                            const std::string& authority = "") {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    if (!authority.empty()) args.SetSslTargetNameOverride(authority);
    auto stub = grpc::health::v1::Health::NewStub(
        grpc::CreateCustomChannel(target, std::move(credentials), args));
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(3)));
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    grpc::Status status = stub->Check(&context, request, &response);
    if (status.ok() && response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "not SERVING");
    }
    return status;
  }

  static std::shared_ptr<grpc::ChannelCredentials> Tls(const std::string& client = "") {
    grpc::SslCredentialsOptions options;
    options.pem_root_certs = ReadFile(Path("ca.pem"));
    if (!client.empty()) {
      options.pem_private_key = ReadFile(Path(client + ".key"));
      options.pem_cert_chain = ReadFile(Path(client + ".pem"));
    }
    return grpc::SslCredentials(options);
  }

  // `sessionledger-server healthcheck` with the server's TLS variables (as a container runs it).
  static CommandResult HealthCheckCommand(const ServerProcess& server, bool mutual,
                                          bool with_tls = true) {
    std::map<std::string, std::string> env = {{"PORT", absl::StrCat(server.port())}};
    if (with_tls) {
      env["TLS_CERT_FILE"] = Path("server.pem");
      env["TLS_KEY_FILE"] = Path("server.key");
      if (mutual) env["TLS_CLIENT_CA_FILE"] = Path("ca.pem");
    }
    absl::StatusOr<CommandResult> result =
        RunCommand({SL_SERVER_BINARY, "healthcheck"}, env, absl::Seconds(30));
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? *result : CommandResult{};
  }

  static std::string* dir_;
};

std::string* TlsTest::dir_ = nullptr;

TEST_F(TlsTest, TlsServesTlsClientsOnly) {
  std::unique_ptr<ServerProcess> server = StartTlsServer(/*mutual=*/false);
  ASSERT_NE(server, nullptr);

  EXPECT_TRUE(Check(server->target(), Tls()).ok());
  // The certificate names localhost too.
  EXPECT_TRUE(Check(absl::StrCat("localhost:", server->port()), Tls()).ok());

  // A plaintext client gets no answer: the handshake fails, no handler runs.
  EXPECT_EQ(Check(server->target(), grpc::InsecureChannelCredentials()).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // A client that does not trust the server's CA refuses the server.
  grpc::SslCredentialsOptions untrusting;
  untrusting.pem_root_certs = ReadFile(Path("rogue.pem"));
  EXPECT_EQ(Check(server->target(), grpc::SslCredentials(untrusting)).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // Nor does a client that expects another name.
  EXPECT_EQ(Check(server->target(), Tls(), "payments.example").error_code(),
            grpc::StatusCode::UNAVAILABLE);

  // The API works over TLS.
  grpc::ChannelArguments args;
  auto sessions =
      pb::SessionService::NewStub(grpc::CreateCustomChannel(server->target(), Tls(), args));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  pb::CreateSessionRequest request;
  request.set_user_id("tls-user");
  pb::Session session;
  grpc::Status created = sessions->CreateSession(&context, request, &session);
  EXPECT_TRUE(created.ok()) << created.error_message();
  EXPECT_FALSE(session.token().empty());

  // The container health check speaks TLS too.
  CommandResult health = HealthCheckCommand(*server, /*mutual=*/false);
  EXPECT_EQ(health.exit_code, 0) << health.output;
  health = HealthCheckCommand(*server, /*mutual=*/false, /*with_tls=*/false);
  EXPECT_EQ(health.exit_code, 1) << "plaintext health check got through: " << health.output;

  EXPECT_FALSE(server->WaitForExit(absl::ZeroDuration()).has_value()) << server->Output();
  EXPECT_TRUE(server->WaitForOutput("\"tls\":\"on\"", absl::Seconds(10))) << server->Output();
}

// A list of addresses is one gRPC target named by the list itself; the CLI checks the
// certificates against the list's one host, or asks for --tls-server-name.
TEST_F(TlsTest, CliVerifiesAListOfTargetsAgainstOneName) {
  std::unique_ptr<ServerProcess> server = StartTlsServer(/*mutual=*/false);
  ASSERT_NE(server, nullptr);
  const auto cli = [&](std::vector<std::string> args) {
    std::vector<std::string> argv = {SL_CLI_BINARY, "--tls", "--ca-file", Path("ca.pem")};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.push_back("health");
    absl::StatusOr<CommandResult> result = RunCommand(argv, {}, absl::Seconds(30));
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? *result : CommandResult{-1, ""};
  };
  const std::string port = absl::StrCat(server->port());
  CommandResult same_host =
      cli({"--deadline", "5s", "--target", absl::StrCat("localhost:", port, ",localhost:", port)});
  EXPECT_EQ(same_host.exit_code, 0) << same_host.output;
  const std::string two_hosts = absl::StrCat("localhost:", port, ",127.0.0.1:", port);
  CommandResult unnamed = cli({"--target", two_hosts});
  EXPECT_EQ(unnamed.exit_code, 3) << unnamed.output;
  EXPECT_TRUE(absl::StrContains(unnamed.output, "--tls-server-name")) << unnamed.output;
  CommandResult named =
      cli({"--deadline", "5s", "--target", two_hosts, "--tls-server-name", "localhost"});
  EXPECT_EQ(named.exit_code, 0) << named.output;
}

// gRPC core logs a failed handshake itself; like every line of the server, it must be one JSON
// object on stdout, not gRPC's own text format on stderr.
TEST_F(TlsTest, GrpcCoreLinesAreJsonLikeEveryOther) {
  std::unique_ptr<ServerProcess> server = StartTlsServer(/*mutual=*/false);
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(Check(server->target(), grpc::InsecureChannelCredentials()).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(server->WaitForOutput("\"source\":\"grpc\"", absl::Seconds(10)))
      << "no line of gRPC's reached the logger:\n"
      << server->Output();
  server->Signal(SIGTERM);
  ASSERT_TRUE(server->WaitForExit(absl::Seconds(30)).has_value());
  for (absl::string_view line : absl::StrSplit(server->Output(), '\n', absl::SkipEmpty())) {
    EXPECT_TRUE(absl::StartsWith(line, "{\"ts\":") && absl::EndsWith(line, "}")) << line;
  }
}

TEST_F(TlsTest, MutualTlsRequiresAClientCertificateFromTheCa) {
  std::unique_ptr<ServerProcess> server = StartTlsServer(/*mutual=*/true);
  ASSERT_NE(server, nullptr);

  EXPECT_TRUE(Check(server->target(), Tls("client")).ok());
  EXPECT_EQ(Check(server->target(), Tls()).error_code(), grpc::StatusCode::UNAVAILABLE)
      << "a TLS client without a certificate got through";
  EXPECT_EQ(Check(server->target(), Tls("intruder")).error_code(), grpc::StatusCode::UNAVAILABLE)
      << "a certificate from another CA got through";
  EXPECT_EQ(Check(server->target(), grpc::InsecureChannelCredentials()).error_code(),
            grpc::StatusCode::UNAVAILABLE);

  const CommandResult health = HealthCheckCommand(*server, /*mutual=*/true);
  EXPECT_EQ(health.exit_code, 0) << health.output;

  EXPECT_FALSE(server->WaitForExit(absl::ZeroDuration()).has_value()) << server->Output();
  EXPECT_TRUE(server->WaitForOutput("\"tls\":\"mutual\"", absl::Seconds(10))) << server->Output();
}

TEST_F(TlsTest, UnreadableFilesStopTheServerWithOneLineNamingTheVariable) {
  const std::pair<std::map<std::string, std::string>, std::string> cases[] = {
      {{{"TLS_CERT_FILE", Path("nope.pem")}, {"TLS_KEY_FILE", Path("server.key")}},
       "TLS_CERT_FILE: cannot read " + Path("nope.pem")},
      {{{"TLS_CERT_FILE", Path("server.pem")}, {"TLS_KEY_FILE", Path("client.key")}},
       "TLS_KEY_FILE: "},
      {{{"TLS_CERT_FILE", Path("server.pem")},
        {"TLS_KEY_FILE", Path("server.key")},
        {"TLS_CLIENT_CA_FILE", Path("nope-ca.pem")}},
       "TLS_CLIENT_CA_FILE: cannot read"},
  };
  for (const auto& [tls_env, expected] : cases) {
    ServerProcess::Options options;
    options.env = BackingServiceEnv();
    for (const auto& [k, v] : tls_env) options.env[k] = v;
    options.wait_until_serving = false;
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    const std::optional<int> code = (*server)->WaitForExit(absl::Seconds(20));
    ASSERT_TRUE(code.has_value()) << "server kept running with " << expected;
    EXPECT_EQ(*code, 2);
    const std::string output = (*server)->Output();
    EXPECT_TRUE(absl::StrContains(output, "sessionledger-server: " + expected)) << output;
    EXPECT_EQ(output.find('\n'), output.size() - 1) << "not one line:\n" << output;
  }
}

}  // namespace
}  // namespace sessionledger::testing
