#ifndef SESSIONLEDGER_TESTS_INTEGRATION_SESSION_TEST_SUPPORT_H_
#define SESSIONLEDGER_TESTS_INTEGRATION_SESSION_TEST_SUPPORT_H_

// Helpers for the SessionService integration tests: a typed client over a real server process
// and raw access to the memcached nodes (to see what a dump of Memcached reveals).

#include <arpa/inet.h>
#include <grpcpp/client_context.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "sessionledger/v1/session.grpc.pb.h"
#include "tests/support/server_process.h"
#include "tests/support/test_env.h"

namespace sessionledger::testing {

namespace v1 = ::sessionledger::v1;

inline absl::Time ToTime(const google::protobuf::Timestamp& t) {
  return absl::FromUnixSeconds(t.seconds()) + absl::Nanoseconds(t.nanos());
}

// With `serve_metrics`, /metrics is served on the server's metrics_port().
inline std::unique_ptr<ServerProcess> StartSessionServer(
    std::map<std::string, std::optional<std::string>> overrides = {}, bool serve_metrics = false) {
  ServerProcess::Options options;
  options.env = BackingServiceEnv();
  for (auto& [k, v] : overrides) options.env[k] = v;
  options.serve_metrics = serve_metrics;
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? std::move(*server) : nullptr;
}

class SessionClient {
 public:
  explicit SessionClient(const ServerProcess& server)
      : stub_(v1::SessionService::NewStub(server.NewChannel())) {}

  grpc::Status Create(const std::string& user, int64_t ttl, v1::Session* out,
                      std::map<std::string, std::string> attributes = {}) {
    v1::CreateSessionRequest req;
    req.set_user_id(user);
    req.set_ttl_seconds(ttl);
    for (auto& [k, v] : attributes) (*req.mutable_attributes())[k] = v;
    auto ctx = Context();
    return stub_->CreateSession(ctx.get(), req, out);
  }
  v1::Session MustCreate(const std::string& user, int64_t ttl = 0,
                         std::map<std::string, std::string> attributes = {}) {
    v1::Session s;
    grpc::Status st = Create(user, ttl, &s, std::move(attributes));
    EXPECT_TRUE(st.ok()) << st.error_code() << " " << st.error_message();
    return s;
  }
  grpc::Status Get(const std::string& token, bool touch, v1::Session* out) {
    v1::GetSessionRequest req;
    req.set_token(token);
    req.set_touch(touch);
    auto ctx = Context();
    return stub_->GetSession(ctx.get(), req, out);
  }
  grpc::StatusCode GetCode(const std::string& token, bool touch = false) {
    v1::Session s;
    return Get(token, touch, &s).error_code();
  }
  grpc::Status Update(const std::string& token, std::map<std::string, std::string> set,
                      std::vector<std::string> remove, int64_t expected, v1::Session* out) {
    v1::UpdateSessionRequest req;
    req.set_token(token);
    for (auto& [k, v] : set) (*req.mutable_set())[k] = v;
    for (auto& k : remove) req.add_remove(k);
    req.set_expected_version(expected);
    auto ctx = Context();
    return stub_->UpdateSession(ctx.get(), req, out);
  }
  grpc::Status Rotate(const std::string& token, v1::Session* out) {
    v1::RotateSessionRequest req;
    req.set_token(token);
    auto ctx = Context();
    return stub_->RotateSession(ctx.get(), req, out);
  }
  grpc::Status Delete(const std::string& token) {
    v1::DeleteSessionRequest req;
    req.set_token(token);
    v1::DeleteSessionResponse resp;
    auto ctx = Context();
    return stub_->DeleteSession(ctx.get(), req, &resp);
  }
  grpc::Status List(const std::string& user, v1::ListUserSessionsResponse* out) {
    v1::ListUserSessionsRequest req;
    req.set_user_id(user);
    auto ctx = Context();
    return stub_->ListUserSessions(ctx.get(), req, out);
  }
  grpc::Status Revoke(const std::string& user, v1::RevokeUserSessionsResponse* out) {
    v1::RevokeUserSessionsRequest req;
    req.set_user_id(user);
    auto ctx = Context();
    return stub_->RevokeUserSessions(ctx.get(), req, out);
  }

  void set_timeout(absl::Duration d) { timeout_ = d; }

 private:
  std::unique_ptr<grpc::ClientContext> Context() const {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(absl::ToChronoTime(absl::Now() + timeout_));
    return ctx;
  }

  std::unique_ptr<v1::SessionService::Stub> stub_;
  absl::Duration timeout_ = absl::Seconds(10);
};

inline int MemcachedPort(int node) {
  return std::atoi(RequiredEnv(absl::StrCat("SL_MEMCACHED_PORT_", node)).c_str());
}

// Sends one text-protocol command to 127.0.0.1:`port` and returns the reply up to "END\r\n".
inline std::string MemcachedText(int port, const std::string& command) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string reply;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    timeval tv{5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    const std::string line = command + "\r\n";
    if (write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size())) {
      char buf[65536];
      // A refusal (BUSY, ERROR, CLIENT_ERROR, SERVER_ERROR) is one line with no END after it.
      const auto refused = [&reply] {
        return absl::EndsWith(reply, "\r\n") &&
               (absl::StartsWith(reply, "BUSY") || absl::StartsWith(reply, "ERROR") ||
                absl::StartsWith(reply, "CLIENT_ERROR") || absl::StartsWith(reply, "SERVER_ERROR"));
      };
      while (!absl::EndsWith(reply, "END\r\n") && !refused()) {
        const ssize_t got = read(fd, buf, sizeof(buf));
        if (got <= 0) break;
        reply.append(buf, static_cast<size_t>(got));
      }
    }
  }
  close(fd);
  return reply;
}

// Every key a node holds (lru_crawler metadump), URL-decoded enough for our key alphabet. A
// dump refused because memcached's own crawler is busy is asked for again: an empty answer
// would let a test that looks for a key find nothing and pass.
inline std::vector<std::string> MemcachedKeys(int node) {
  std::vector<std::string> keys;
  std::string dump;
  const bool dumped = PollUntil(
      absl::Now() + absl::Seconds(20),
      [&] {
        dump = MemcachedText(MemcachedPort(node), "lru_crawler metadump all");
        return absl::EndsWith(dump, "END\r\n");
      },
      absl::Milliseconds(100));
  if (!dumped) {
    ADD_FAILURE() << "memcached node " << node << " refused a key dump: " << dump;
    return keys;
  }
  // One line per key, ended by "\n" alone (only the final END has "\r\n").
  for (absl::string_view line : absl::StrSplit(dump, '\n')) {
    if (!absl::StartsWith(line, "key=")) continue;
    absl::string_view key = line.substr(4, line.find(' ') - 4);
    std::string decoded;
    for (size_t i = 0; i < key.size(); ++i) {
      if (key[i] == '%' && i + 2 < key.size()) {
        decoded.push_back(
            static_cast<char>(std::stoi(std::string(key.substr(i + 1, 2)), nullptr, 16)));
        i += 2;
      } else {
        decoded.push_back(key[i]);
      }
    }
    keys.push_back(decoded);
  }
  return keys;
}

// Whether node `node` holds `key` right now (a plain text get).
inline bool MemcachedHas(int node, const std::string& key) {
  const std::string reply = MemcachedText(MemcachedPort(node), "get " + key);
  return absl::StartsWith(reply, "VALUE ");
}

// The raw value of `key` on node `node` (text protocol), or nullopt when it is absent.
inline std::optional<std::string> MemcachedGetValue(int node, const std::string& key) {
  const std::string reply = MemcachedText(MemcachedPort(node), "get " + key);
  if (!absl::StartsWith(reply, "VALUE ")) return std::nullopt;
  const size_t header_end = reply.find("\r\n");
  std::vector<std::string> header = absl::StrSplit(reply.substr(0, header_end), ' ');
  if (header.size() < 4) return std::nullopt;
  return reply.substr(header_end + 2, std::stoul(header[3]));
}

// The seconds node `node` keeps `key` for (meta get flag "t"; -1: forever); nullopt when absent.
inline std::optional<int64_t> MemcachedTtl(int node, const std::string& key) {
  // MemcachedText reads up to "END": the plain get after the meta get ends the reply.
  const std::string reply =
      MemcachedText(MemcachedPort(node), absl::StrCat("mg ", key, " t\r\nget ", key));
  int64_t ttl = 0;
  if (!absl::StartsWith(reply, "HD t") ||
      !absl::SimpleAtoi(reply.substr(4, reply.find("\r\n") - 4), &ttl)) {
    return std::nullopt;
  }
  return ttl;
}

// Writes `key` = `value` on node `node` directly (as a stale copy would be left behind).
inline bool MemcachedSetRaw(int node, const std::string& key, const std::string& value,
                            int ttl_seconds) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(MemcachedPort(node)));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool stored = false;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string request =
        absl::StrCat("set ", key, " 0 ", ttl_seconds, " ", value.size(), "\r\n", value, "\r\n");
    if (write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
      char buf[64];
      const ssize_t got = read(fd, buf, sizeof(buf));
      stored = got >= 6 && std::string(buf, 6) == "STORED";
    }
  }
  close(fd);
  return stored;
}

}  // namespace sessionledger::testing

#endif  // SESSIONLEDGER_TESTS_INTEGRATION_SESSION_TEST_SUPPORT_H_
