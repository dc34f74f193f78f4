// The bad-input matrix of issue 8 against a real server process: every malformed, hostile or
// oversized request gets its documented status code, the server stays up (pid alive, health
// SERVING), and the data afterwards is exactly what it was (a reference session and reference
// accounts are compared after every test).
#include <openssl/sha.h>
#include <sys/random.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "sessionledger/v1/session.grpc.pb.h"
#include "sessionledger/v1/transaction.grpc.pb.h"
#include "tests/support/raw_call.h"
#include "tests/support/server_process.h"
#include "tests/support/test_env.h"

namespace sessionledger::testing {
namespace {

namespace pb = ::sessionledger::v1;
using grpc::StatusCode;

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

std::string Unique(absl::string_view prefix) {
  static std::atomic<int> counter{0};
  std::random_device random;
  return absl::StrCat(prefix, "-", random(), "-", counter++);
}

std::string RandomBytes(size_t n) {
  std::string out(n, '\0');
  size_t filled = 0;
  while (filled < n) {
    const ssize_t got = getrandom(out.data() + filled, n - filled, 0);
    if (got > 0) filled += static_cast<size_t>(got);
  }
  return out;
}

// Like a real token (64 URL-safe base64 characters: 32 secret bytes + the user's 16-byte tag),
// but never issued.
std::string ForgedToken(const std::string& user_id) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(user_id.data()), user_id.size(), digest);
  std::string raw = RandomBytes(32);
  raw.append(reinterpret_cast<const char*>(digest), 16);
  return absl::WebSafeBase64Escape(raw);
}

std::string CodeName(StatusCode code) { return absl::StrCat(static_cast<int>(code)); }

#define EXPECT_CODE(expected, status_expr)                                     \
  do {                                                                         \
    const grpc::Status sl_status_ = (status_expr);                             \
    EXPECT_EQ(sl_status_.error_code(), (expected))                             \
        << #status_expr << " -> " << CodeName(sl_status_.error_code()) << ": " \
        << sl_status_.error_message().substr(0, 200);                          \
  } while (0)

// A request refused as INVALID_ARGUMENT with exactly `message`, which names the offending field.
#define EXPECT_INVALID(message, status_expr)                                   \
  do {                                                                         \
    const grpc::Status sl_status_ = (status_expr);                             \
    EXPECT_EQ(sl_status_.error_code(), StatusCode::INVALID_ARGUMENT)           \
        << #status_expr << " -> " << CodeName(sl_status_.error_code()) << ": " \
        << sl_status_.error_message().substr(0, 200);                          \
    EXPECT_EQ(sl_status_.error_message(), (message)) << #status_expr;          \
  } while (0)

// A length-delimited field in wire format, for raw request bodies (lengths below 128).
std::string Len(int field, const std::string& bytes) {
  return absl::StrCat(std::string(1, static_cast<char>(field << 3 | 2)),
                      std::string(1, static_cast<char>(bytes.size())), bytes);
}

// What must not change: a session, two accounts and the listing of one of them.
struct Snapshot {
  int64_t session_version = 0;
  std::map<std::string, std::string> attributes;
  int64_t expires_seconds = 0;
  std::vector<int64_t> balances;
  std::vector<std::string> transaction_ids;
  bool operator==(const Snapshot& o) const {
    return session_version == o.session_version && attributes == o.attributes &&
           expires_seconds == o.expires_seconds && balances == o.balances &&
           transaction_ids == o.transaction_ids;
  }
};

class BadInputTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ServerProcess::Options options;
    options.env = BackingServiceEnv();
    options.env["LOG_LEVEL"] = "warn";
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    channel_ = new std::shared_ptr<grpc::Channel>(server_->NewChannel());
    sessions_ = pb::SessionService::NewStub(*channel_).release();
    ledger_ = pb::TransactionService::NewStub(*channel_).release();

    // The reference data every test compares against.
    user_ = new std::string(Unique("victim"));
    pb::Session session;
    ASSERT_TRUE(CreateSession(*user_, {{"role", "admin"}, {"plan", "gold"}}, &session).ok());
    token_ = new std::string(session.token());
    accounts_ = new std::vector<std::string>();
    for (int i = 0; i < 2; ++i) {
      pb::Account account;
      ASSERT_TRUE(OpenAccount(*token_, "EUR", &account).ok());
      accounts_->push_back(account.account_id());
    }
    pb::Transaction t;
    ASSERT_TRUE(Deposit(*token_, (*accounts_)[0], 1000, Unique("seed"), &t).ok());
    ASSERT_TRUE(Transfer(*token_, (*accounts_)[0], (*accounts_)[1], 250, Unique("seed"), &t).ok());
    baseline_ = new Snapshot(Take());
  }
  static void TearDownTestSuite() {
    delete ledger_;
    delete sessions_;
    delete channel_;
    delete server_;
    delete user_;
    delete token_;
    delete accounts_;
    delete baseline_;
  }

  // After every test: the server is up and healthy, and the reference data did not move.
  void TearDown() override {
    ASSERT_NE(server_, nullptr);
    EXPECT_FALSE(server_->WaitForExit(absl::ZeroDuration()).has_value()) << "the server died:\n"
                                                                         << server_->Output();
    auto health = grpc::health::v1::Health::NewStub(*channel_);
    grpc::ClientContext context;
    Prepare(context, "");
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    ASSERT_TRUE(health->Check(&context, request, &response).ok());
    EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);
    EXPECT_TRUE(Take() == *baseline_) << "reference data changed";
  }

  static void Prepare(grpc::ClientContext& context, const std::string& token) {
    if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(20)));
  }

  static Snapshot Take() {
    Snapshot s;
    pb::Session session;
    grpc::Status got = GetSession(*token_, &session);
    EXPECT_TRUE(got.ok()) << got.error_message();
    s.session_version = session.version();
    s.attributes.insert(session.attributes().begin(), session.attributes().end());
    s.expires_seconds = session.expires_at().seconds();
    for (const std::string& id : *accounts_) {
      pb::Account account;
      EXPECT_TRUE(GetAccount(*token_, id, &account).ok());
      s.balances.push_back(account.balance_minor());
    }
    pb::ListTransactionsResponse list;
    EXPECT_TRUE(List(*token_, (*accounts_)[0], 1000, "", &list).ok());
    for (const pb::Transaction& t : list.transactions())
      s.transaction_ids.push_back(t.transaction_id());
    return s;
  }

  // --- SessionService ---
  static grpc::Status CreateSession(const std::string& user_id,
                                    const std::map<std::string, std::string>& attributes,
                                    pb::Session* out, int64_t ttl = 0) {
    grpc::ClientContext context;
    Prepare(context, "");
    pb::CreateSessionRequest request;
    request.set_user_id(user_id);
    request.set_ttl_seconds(ttl);
    request.mutable_attributes()->insert(attributes.begin(), attributes.end());
    return sessions_->CreateSession(&context, request, out);
  }
  static grpc::Status CreateSession(const pb::CreateSessionRequest& request) {
    grpc::ClientContext context;
    Prepare(context, "");
    pb::Session out;
    return sessions_->CreateSession(&context, request, &out);
  }
  static grpc::Status GetSession(const std::string& token, pb::Session* out = nullptr) {
    grpc::ClientContext context;
    Prepare(context, "");
    pb::GetSessionRequest request;
    request.set_token(token);
    pb::Session ignored;
    return sessions_->GetSession(&context, request, out != nullptr ? out : &ignored);
  }
  static grpc::Status UpdateSession(const pb::UpdateSessionRequest& request) {
    grpc::ClientContext context;
    Prepare(context, "");
    pb::Session out;
    return sessions_->UpdateSession(&context, request, &out);
  }
  static grpc::Status RotateSession(const std::string& token) {
    grpc::ClientContext context;
    Prepare(context, "");
    pb::RotateSessionRequest request;
    request.set_token(token);
    pb::Session out;
    return sessions_->RotateSession(&context, request, &out);
  }
  static grpc::Status DeleteSession(const std::string& token) {
    grpc::ClientContext context;
    Prepare(context, "");
    pb::DeleteSessionRequest request;
    request.set_token(token);
    pb::DeleteSessionResponse out;
    return sessions_->DeleteSession(&context, request, &out);
  }
  static grpc::Status ListUserSessions(const std::string& user_id) {
    grpc::ClientContext context;
    Prepare(context, "");
    pb::ListUserSessionsRequest request;
    request.set_user_id(user_id);
    pb::ListUserSessionsResponse out;
    return sessions_->ListUserSessions(&context, request, &out);
  }
  static grpc::Status RevokeUserSessions(const std::string& user_id) {
    grpc::ClientContext context;
    Prepare(context, "");
    pb::RevokeUserSessionsRequest request;
    request.set_user_id(user_id);
    pb::RevokeUserSessionsResponse out;
    return sessions_->RevokeUserSessions(&context, request, &out);
  }

  // --- TransactionService (`authorization` = "Bearer <token>" unless `raw_authorization`) ---
  static void Authorize(grpc::ClientContext& context, const std::string& token) {
    Prepare(context, token);
  }
  static grpc::Status OpenAccount(const std::string& token, const std::string& currency,
                                  pb::Account* out) {
    grpc::ClientContext context;
    Authorize(context, token);
    pb::OpenAccountRequest request;
    request.set_currency(currency);
    return ledger_->OpenAccount(&context, request, out);
  }
  static grpc::Status GetAccount(const std::string& token, const std::string& id,
                                 pb::Account* out = nullptr) {
    grpc::ClientContext context;
    Authorize(context, token);
    pb::GetAccountRequest request;
    request.set_account_id(id);
    pb::Account ignored;
    return ledger_->GetAccount(&context, request, out != nullptr ? out : &ignored);
  }
  static grpc::Status GetAccountWithHeader(const std::string& header) {
    grpc::ClientContext context;
    Prepare(context, "");
    context.AddMetadata("authorization", header);
    pb::GetAccountRequest request;
    request.set_account_id((*accounts_)[0]);
    pb::Account out;
    return ledger_->GetAccount(&context, request, &out);
  }
  static grpc::Status Deposit(const std::string& token, const std::string& id, int64_t amount,
                              const std::string& key, pb::Transaction* out = nullptr) {
    grpc::ClientContext context;
    Authorize(context, token);
    pb::DepositRequest request;
    request.set_account_id(id);
    request.set_amount_minor(amount);
    request.set_idempotency_key(key);
    pb::Transaction ignored;
    return ledger_->Deposit(&context, request, out != nullptr ? out : &ignored);
  }
  static grpc::Status Transfer(const std::string& token, const std::string& from,
                               const std::string& to, int64_t amount, const std::string& key,
                               pb::Transaction* out = nullptr) {
    grpc::ClientContext context;
    Authorize(context, token);
    pb::TransferRequest request;
    request.set_from_account_id(from);
    request.set_to_account_id(to);
    request.set_amount_minor(amount);
    request.set_idempotency_key(key);
    pb::Transaction ignored;
    return ledger_->Transfer(&context, request, out != nullptr ? out : &ignored);
  }
  static grpc::Status List(const std::string& token, const std::string& id, int32_t page_size,
                           const std::string& page_token, pb::ListTransactionsResponse* out) {
    grpc::ClientContext context;
    Authorize(context, token);
    pb::ListTransactionsRequest request;
    request.set_account_id(id);
    request.set_page_size(page_size);
    request.set_page_token(page_token);
    return ledger_->ListTransactions(&context, request, out);
  }
  static grpc::Status ListPage(const std::string& page_token, int32_t page_size = 1) {
    pb::ListTransactionsResponse out;
    return List(*token_, (*accounts_)[0], page_size, page_token, &out);
  }

  // A raw request body sent to `method`, bypassing the generated (well-behaved) serializer.
  static grpc::Status RawCall(const std::string& method, const std::string& body,
                              const std::string& token, std::string* response = nullptr) {
    grpc::ClientContext context;
    Authorize(context, token);
    return testing::RawCall(*channel_, context, method, body, response);
  }

  static ServerProcess* server_;
  static std::shared_ptr<grpc::Channel>* channel_;
  static pb::SessionService::Stub* sessions_;
  static pb::TransactionService::Stub* ledger_;
  static std::string* user_;
  static std::string* token_;
  static std::vector<std::string>* accounts_;
  static Snapshot* baseline_;
};

ServerProcess* BadInputTest::server_ = nullptr;
std::shared_ptr<grpc::Channel>* BadInputTest::channel_ = nullptr;
pb::SessionService::Stub* BadInputTest::sessions_ = nullptr;
pb::TransactionService::Stub* BadInputTest::ledger_ = nullptr;
std::string* BadInputTest::user_ = nullptr;
std::string* BadInputTest::token_ = nullptr;
std::vector<std::string>* BadInputTest::accounts_ = nullptr;
Snapshot* BadInputTest::baseline_ = nullptr;

// Strings that would do damage if any layer pasted them into SQL (or a Memcached command).
const std::vector<std::string>& SqlLooking() {
  static const auto* const kStrings = new std::vector<std::string>{
      "'; DROP TABLE accounts; --",
      "1' OR '1'='1",
      "\"); DELETE FROM transactions WHERE (\"1\"=\"1",
      "$$; TRUNCATE accounts; $$",
      "Robert'); UPDATE accounts SET balance_minor = 1e18; --",
      "set sl:v1:g:x 0 0 1\r\nX",  // A memcached text-protocol command.
  };
  return *kStrings;
}

TEST_F(BadInputTest, SessionTokensThatWereNeverIssued) {
  const std::string ten_kib(10 * 1024, 'A');
  const std::string forged = ForgedToken(*user_);
  const std::string foreign_shape = absl::WebSafeBase64Escape(RandomBytes(48));

  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, GetSession(""));
  EXPECT_CODE(StatusCode::NOT_FOUND, GetSession(ten_kib));
  EXPECT_CODE(StatusCode::NOT_FOUND, GetSession(forged));
  EXPECT_CODE(StatusCode::NOT_FOUND, GetSession(foreign_shape));
  EXPECT_CODE(StatusCode::NOT_FOUND, GetSession(*token_ + "A"));
  EXPECT_CODE(StatusCode::NOT_FOUND, GetSession(token_->substr(0, 63)));
  EXPECT_CODE(StatusCode::NOT_FOUND, GetSession(std::string(64, '=')));

  pb::UpdateSessionRequest update;
  (*update.mutable_set())["role"] = "root";
  update.set_token("");
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, UpdateSession(update));
  for (const std::string& token : {ten_kib, forged, foreign_shape}) {
    update.set_token(token);
    EXPECT_CODE(StatusCode::NOT_FOUND, UpdateSession(update));
    EXPECT_CODE(StatusCode::NOT_FOUND, RotateSession(token));
    // Deleting is idempotent: an unknown token is already deleted.
    EXPECT_CODE(StatusCode::OK, DeleteSession(token));
  }
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, RotateSession(""));
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, DeleteSession(""));
}

TEST_F(BadInputTest, UserIdsThatBreakTheTextRules) {
  const std::vector<std::string> bad = {
      "",           std::string(129, 'u'), std::string("nul\0inside", 10),
      "\x01start",  "tab\tinside",         "line\nbreak",
      "del\x7f",
      "c1\xc2\x85",  // U+0085 NEXT LINE, a C1 control.
  };
  for (const std::string& user_id : bad) {
    SCOPED_TRACE(absl::CEscape(user_id));
    pb::Session session;
    EXPECT_CODE(StatusCode::INVALID_ARGUMENT, CreateSession(user_id, {}, &session));
    EXPECT_CODE(StatusCode::INVALID_ARGUMENT, ListUserSessions(user_id));
    EXPECT_CODE(StatusCode::INVALID_ARGUMENT, RevokeUserSessions(user_id));
  }
  // 128 bytes of multi-byte UTF-8 are fine: the limit counts bytes.
  pb::Session session;
  std::string longest;
  while (longest.size() + 2 <= 128) longest += "\xc3\xa9";  // é
  EXPECT_CODE(StatusCode::OK, CreateSession(longest, {}, &session));
  EXPECT_CODE(StatusCode::OK, DeleteSession(session.token()));
}

// Invalid UTF-8 cannot even be parsed as a proto3 string, so these go through raw bytes the way
// a non-C++ client (or an attacker) would send them.
TEST_F(BadInputTest, UserIdsThatAreNotUtf8) {
  const std::vector<std::string> bad = {
      "\xff\xfe",          // Not UTF-8 at all.
      "\xc3\x28",          // Broken continuation.
      "\xc0\xaf",          // Overlong '/'.
      "\xed\xa0\x80",      // UTF-16 surrogate.
      "cut\xe2\x82",       // Truncated sequence.
      "\xf4\x90\x80\x80",  // Above U+10FFFF.
  };
  for (const std::string& user_id : bad) {
    SCOPED_TRACE(absl::CEscape(user_id));
    // Field 1 (user_id), length-delimited. The answer names the field, and never echoes the
    // bytes (whatever a client sent may be a secret).
    const std::string body = Len(1, user_id);
    EXPECT_INVALID("user_id: not valid UTF-8",
                   RawCall("/sessionledger.v1.SessionService/CreateSession", body, ""));
    EXPECT_INVALID("user_id: not valid UTF-8",
                   RawCall("/sessionledger.v1.SessionService/ListUserSessions", body, ""));
    // The same bytes as a token (field 1 of GetSessionRequest too).
    EXPECT_INVALID("token: not valid UTF-8",
                   RawCall("/sessionledger.v1.SessionService/GetSession", body, ""));
    // idempotency_key is field 3 of DepositRequest; account 1, amount 2.
    const std::string deposit = absl::StrCat(Len(1, (*accounts_)[0]), "\x10\x05", Len(3, user_id));
    EXPECT_INVALID("idempotency_key: not valid UTF-8",
                   RawCall("/sessionledger.v1.TransactionService/Deposit", deposit, *token_));
  }
}

// Every field that can hold invalid UTF-8 is named in the answer, on both parse paths: the
// methods that parse their own requests (GetSession, CreateSession, UpdateSession) and those
// that gRPC parses (the rest). The reference token and accounts are used where a real one
// would otherwise make the call succeed, so a call that gets past parsing would show.
TEST_F(BadInputTest, InvalidUtf8IsNamedByField) {
  const std::string bad = "\xc3\x28";
  const std::string& account = (*accounts_)[0];
  const std::string& other = (*accounts_)[1];
  const auto session = [](const char* method) {
    return absl::StrCat("/sessionledger.v1.SessionService/", method);
  };
  const auto ledger = [](const char* method) {
    return absl::StrCat("/sessionledger.v1.TransactionService/", method);
  };
  // CreateSessionRequest: user_id = 1, attributes = 3 (entries: key = 1, value = 2).
  EXPECT_INVALID("user_id: not valid UTF-8",
                 RawCall(session("CreateSession"), Len(1, "x" + bad), ""));
  EXPECT_INVALID("attributes: a key is not valid UTF-8",
                 RawCall(session("CreateSession"),
                         absl::StrCat(Len(1, Unique("u")), Len(3, Len(1, bad) + Len(2, "v"))), ""));
  EXPECT_INVALID(
      "attributes[\"theme\"]: not valid UTF-8",
      RawCall(session("CreateSession"),
              absl::StrCat(Len(1, Unique("u")), Len(3, Len(1, "theme") + Len(2, bad))), ""));
  // GetSessionRequest: token = 1.
  EXPECT_INVALID("token: not valid UTF-8", RawCall(session("GetSession"), Len(1, bad), ""));
  // UpdateSessionRequest: token = 1, set = 2, remove = 3.
  EXPECT_INVALID("token: not valid UTF-8", RawCall(session("UpdateSession"), Len(1, bad), ""));
  EXPECT_INVALID("set: a key is not valid UTF-8",
                 RawCall(session("UpdateSession"),
                         absl::StrCat(Len(1, *token_), Len(2, Len(1, bad) + Len(2, "v"))), ""));
  EXPECT_INVALID("set[\"role\"]: not valid UTF-8",
                 RawCall(session("UpdateSession"),
                         absl::StrCat(Len(1, *token_), Len(2, Len(1, "role") + Len(2, bad))), ""));
  EXPECT_INVALID("remove[1]: not valid UTF-8",
                 RawCall(session("UpdateSession"),
                         absl::StrCat(Len(1, *token_), Len(3, "plan"), Len(3, bad)), ""));
  // The synchronous session methods: token = 1 or user_id = 1.
  EXPECT_INVALID("token: not valid UTF-8", RawCall(session("RotateSession"), Len(1, bad), ""));
  EXPECT_INVALID("token: not valid UTF-8", RawCall(session("DeleteSession"), Len(1, bad), ""));
  EXPECT_INVALID("user_id: not valid UTF-8", RawCall(session("ListUserSessions"), Len(1, bad), ""));
  EXPECT_INVALID("user_id: not valid UTF-8",
                 RawCall(session("RevokeUserSessions"), Len(1, bad), ""));
  // TransactionService, with a valid token: OpenAccount currency = 1; GetAccount account_id = 1;
  // Deposit account_id = 1, idempotency_key = 3; Transfer from = 1, to = 2, key = 4;
  // ListTransactions account_id = 1, page_token = 3.
  EXPECT_INVALID("currency: not valid UTF-8", RawCall(ledger("OpenAccount"), Len(1, bad), *token_));
  EXPECT_INVALID("account_id: not valid UTF-8",
                 RawCall(ledger("GetAccount"), Len(1, bad), *token_));
  EXPECT_INVALID(
      "idempotency_key: not valid UTF-8",
      RawCall(ledger("Deposit"), absl::StrCat(Len(1, account), "\x10\x01", Len(3, bad)), *token_));
  EXPECT_INVALID(
      "account_id: not valid UTF-8",
      RawCall(ledger("Deposit"), absl::StrCat(Len(1, bad), "\x10\x01", Len(3, "k")), *token_));
  EXPECT_INVALID(
      "idempotency_key: not valid UTF-8",
      RawCall(ledger("Transfer"),
              absl::StrCat(Len(1, account), Len(2, other), "\x18\x01", Len(4, bad)), *token_));
  EXPECT_INVALID(
      "to_account_id: not valid UTF-8",
      RawCall(ledger("Transfer"),
              absl::StrCat(Len(1, account), Len(2, bad), "\x18\x01", Len(4, "k")), *token_));
  EXPECT_INVALID(
      "page_token: not valid UTF-8",
      RawCall(ledger("ListTransactions"), absl::StrCat(Len(1, account), Len(3, bad)), *token_));
  // Bad UTF-8 comes first (INVALID_ARGUMENT is the request's own shape), even without a token.
  EXPECT_INVALID("idempotency_key: not valid UTF-8",
                 RawCall(ledger("Deposit"), absl::StrCat(Len(1, account), Len(3, bad)), ""));
}

TEST_F(BadInputTest, AttributesTooManyOrTooBig) {
  // 100,000 attributes: about 1 MiB below the gRPC limit but far above the 64 KiB rule.
  pb::CreateSessionRequest many;
  many.set_user_id(Unique("many"));
  // Three-character keys keep the message under the 1 MiB transport limit, so the 64 KiB rule
  // (not the size limit) is what refuses it.
  for (int i = 0; i < 100'000; ++i) {
    const std::string key = {static_cast<char>('!' + i % 94), static_cast<char>('!' + i / 94 % 94),
                             static_cast<char>('!' + i / (94 * 94))};
    (*many.mutable_attributes())[key] = "";
  }
  ASSERT_EQ(many.attributes_size(), 100'000);
  ASSERT_LT(many.ByteSizeLong(), size_t{1} << 20);
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, CreateSession(many));
  pb::UpdateSessionRequest update;
  update.set_token(*token_);
  *update.mutable_set() = many.attributes();
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, UpdateSession(update));

  // A 2 MiB attribute is over GRPC_MAX_RECV_BYTES (1 MiB): refused before any handler runs.
  pb::CreateSessionRequest big;
  big.set_user_id(Unique("big"));
  (*big.mutable_attributes())["blob"] = std::string(2 << 20, 'x');
  EXPECT_CODE(StatusCode::RESOURCE_EXHAUSTED, CreateSession(big));
  update.clear_set();
  (*update.mutable_set())["blob"] = std::string(2 << 20, 'x');
  EXPECT_CODE(StatusCode::RESOURCE_EXHAUSTED, UpdateSession(update));

  // Exactly at the limit works; one byte more does not.
  pb::Session session;
  const std::string fits(64 * 1024 - 1, 'v');
  EXPECT_CODE(StatusCode::OK, CreateSession(Unique("fits"), {{"k", fits}}, &session));
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT,
              CreateSession(Unique("over"), {{"k", fits + "v"}}, &session));

  // Keys follow the text rules.
  for (const std::string& key :
       {std::string(), std::string(129, 'k'), std::string("a\nb"), std::string("\x1b[31m")}) {
    SCOPED_TRACE(absl::CEscape(key));
    EXPECT_CODE(StatusCode::INVALID_ARGUMENT,
                CreateSession(Unique("keys"), {{key, "v"}}, &session));
    update.clear_set();
    (*update.mutable_set())[key] = "v";
    EXPECT_CODE(StatusCode::INVALID_ARGUMENT, UpdateSession(update));
  }
}

TEST_F(BadInputTest, SessionNumbersOutOfRange) {
  pb::Session session;
  for (int64_t ttl :
       {int64_t{-1}, std::numeric_limits<int64_t>::min(), kInt64Max, int64_t{86400} + 1}) {
    SCOPED_TRACE(ttl);
    EXPECT_CODE(StatusCode::INVALID_ARGUMENT, CreateSession(Unique("ttl"), {}, &session, ttl));
  }
  pb::UpdateSessionRequest update;
  update.set_token(*token_);
  update.set_expected_version(-1);
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, UpdateSession(update));
  // A version that will never exist is a conflict, not a crash or an overflow.
  update.set_expected_version(kInt64Max);
  (*update.mutable_set())["role"] = "root";
  EXPECT_CODE(StatusCode::ABORTED, UpdateSession(update));
  // The same key in set and remove.
  update.set_expected_version(0);
  update.add_remove("role");
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, UpdateSession(update));
}

TEST_F(BadInputTest, MalformedAuthorizationHeaders) {
  const std::string forged = ForgedToken(*user_);
  const std::vector<std::string> headers = {
      "",
      "Bearer",
      "Bearer ",
      "Bearer      ",
      "Basic dXNlcjpwYXNz",
      "Token " + *token_,
      *token_,  // No scheme.
      "Bearer" + *token_,
      "Bearer " + *token_ + "A",
      "Bearer " + token_->substr(1),
      "Bearer " + forged,
      "Bearer " + std::string(6 * 1024, 'A'),
      "Bearer " + SqlLooking()[0],
  };
  for (const std::string& header : headers) {
    SCOPED_TRACE(header.substr(0, 80));
    EXPECT_CODE(StatusCode::UNAUTHENTICATED, GetAccountWithHeader(header));
  }
  // 10 KiB of headers is over gRPC's metadata limit (8 KiB): refused before any handler runs.
  // gRPC also closes that HTTP/2 connection (the next call on it sees UNAVAILABLE, "Socket
  // closed"), so the oversized header goes over a connection of its own.
  {
    auto stub = pb::TransactionService::NewStub(server_->NewChannel());
    grpc::ClientContext context;
    Prepare(context, "");
    context.AddMetadata("authorization", "Bearer " + std::string(10 * 1024, 'A'));
    pb::GetAccountRequest request;
    request.set_account_id((*accounts_)[0]);
    pb::Account out;
    EXPECT_CODE(StatusCode::RESOURCE_EXHAUSTED, stub->GetAccount(&context, request, &out));
  }
  // No header at all.
  pb::Account account;
  EXPECT_CODE(StatusCode::UNAUTHENTICATED, GetAccount("", (*accounts_)[0], &account));
  // The scheme is case-insensitive (RFC 6750), so these are the real token.
  EXPECT_CODE(StatusCode::OK, GetAccountWithHeader("bearer " + *token_));
  EXPECT_CODE(StatusCode::OK, GetAccountWithHeader("BEARER " + *token_));

  // A deleted session's token stops working at once.
  pb::Session other;
  ASSERT_TRUE(CreateSession(Unique("short-lived"), {}, &other).ok());
  EXPECT_CODE(StatusCode::PERMISSION_DENIED, GetAccount(other.token(), (*accounts_)[0]));
  ASSERT_TRUE(DeleteSession(other.token()).ok());
  EXPECT_CODE(StatusCode::UNAUTHENTICATED, GetAccount(other.token(), (*accounts_)[0]));
}

TEST_F(BadInputTest, AmountsZeroNegativeAndOverflowing) {
  const std::string from = (*accounts_)[0];
  const std::string to = (*accounts_)[1];
  for (int64_t amount : {int64_t{0}, int64_t{-1}, std::numeric_limits<int64_t>::min()}) {
    SCOPED_TRACE(amount);
    EXPECT_CODE(StatusCode::INVALID_ARGUMENT, Deposit(*token_, from, amount, Unique("k")));
    EXPECT_CODE(StatusCode::INVALID_ARGUMENT, Transfer(*token_, from, to, amount, Unique("k")));
  }
  // INT64_MAX onto a non-zero balance overflows.
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, Deposit(*token_, from, kInt64Max, Unique("k")));
  // More than the balance.
  EXPECT_CODE(StatusCode::FAILED_PRECONDITION, Transfer(*token_, from, to, 1'000'000, Unique("k")));

  // Separate accounts for the overflow cases, so the reference accounts stay as they are.
  pb::Account full, small;
  ASSERT_TRUE(OpenAccount(*token_, "EUR", &full).ok());
  ASSERT_TRUE(OpenAccount(*token_, "EUR", &small).ok());
  EXPECT_CODE(StatusCode::OK, Deposit(*token_, full.account_id(), kInt64Max, Unique("k")));
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, Deposit(*token_, full.account_id(), 1, Unique("k")));
  EXPECT_CODE(StatusCode::OK, Deposit(*token_, small.account_id(), 5, Unique("k")));
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT,
              Transfer(*token_, small.account_id(), full.account_id(), 1, Unique("k")));
  pb::Account after;
  ASSERT_TRUE(GetAccount(*token_, full.account_id(), &after).ok());
  EXPECT_EQ(after.balance_minor(), kInt64Max);
  ASSERT_TRUE(GetAccount(*token_, small.account_id(), &after).ok());
  EXPECT_EQ(after.balance_minor(), 5);

  // Same account, currency mismatch, missing and oversized keys.
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, Transfer(*token_, from, from, 1, Unique("k")));
  pb::Account usd;
  ASSERT_TRUE(OpenAccount(*token_, "USD", &usd).ok());
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT,
              Transfer(*token_, from, usd.account_id(), 1, Unique("k")));
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, Transfer(*token_, from, to, 1, ""));
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, Deposit(*token_, from, 1, std::string(129, 'k')));
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, Deposit(*token_, from, 1, std::string("a\0b", 3)));
}

TEST_F(BadInputTest, SqlLookingStringsInEveryStringField) {
  const std::string from = (*accounts_)[0];
  for (const std::string& sql : SqlLooking()) {
    SCOPED_TRACE(absl::CEscape(sql));
    const bool has_control = sql.find_first_of("\r\n") != std::string::npos;
    // Session fields: valid text is stored as text (and comes back byte for byte).
    pb::Session session;
    const grpc::Status created = CreateSession(sql, {{sql, sql}}, &session);
    if (has_control) {
      EXPECT_EQ(created.error_code(), StatusCode::INVALID_ARGUMENT);
    } else {
      ASSERT_TRUE(created.ok()) << created.error_message();
      pb::Session read;
      ASSERT_TRUE(GetSession(session.token(), &read).ok());
      EXPECT_EQ(read.user_id(), sql);
      EXPECT_EQ(read.attributes().at(sql), sql);
      EXPECT_CODE(StatusCode::OK, ListUserSessions(sql));
      EXPECT_CODE(StatusCode::OK, RevokeUserSessions(sql));
      EXPECT_CODE(StatusCode::NOT_FOUND, GetSession(session.token()));
    }
    EXPECT_CODE(StatusCode::NOT_FOUND, GetSession(sql));

    // Ledger fields.
    pb::Account account;
    EXPECT_CODE(StatusCode::INVALID_ARGUMENT, OpenAccount(*token_, sql, &account));
    EXPECT_CODE(StatusCode::NOT_FOUND, GetAccount(*token_, sql));
    EXPECT_CODE(StatusCode::NOT_FOUND, Deposit(*token_, sql, 1, Unique("k")));
    EXPECT_CODE(StatusCode::NOT_FOUND, Transfer(*token_, from, sql, 1, Unique("k")));
    EXPECT_CODE(StatusCode::NOT_FOUND, Transfer(*token_, sql, from, 1, Unique("k")));
    EXPECT_CODE(StatusCode::INVALID_ARGUMENT, ListPage(sql));
    pb::ListTransactionsResponse list;
    EXPECT_CODE(StatusCode::NOT_FOUND, List(*token_, sql, 10, "", &list));
    // As an idempotency key the string is just a key: one deposit, recorded once, on an account
    // opened for it.
    pb::Account keyed;
    ASSERT_TRUE(OpenAccount(*token_, "EUR", &keyed).ok());
    const std::string key = absl::StrCat(sql, Unique(""));
    pb::Transaction first, again;
    EXPECT_CODE(StatusCode::OK, Deposit(*token_, keyed.account_id(), 7, key, &first));
    EXPECT_CODE(StatusCode::OK, Deposit(*token_, keyed.account_id(), 7, key, &again));
    EXPECT_EQ(first.transaction_id(), again.transaction_id());
    EXPECT_EQ(again.idempotency_key(), key);
    pb::Account after;
    ASSERT_TRUE(GetAccount(*token_, keyed.account_id(), &after).ok());
    EXPECT_EQ(after.balance_minor(), 7);
  }
}

TEST_F(BadInputTest, UnknownFieldsAreIgnoredAndGarbageIsRefused) {
  // A CreateSessionRequest with fields this server does not know (a newer client): field 99
  // varint, field 1000 length-delimited, field 2047 fixed64. proto3 ignores them.
  pb::CreateSessionRequest request;
  const std::string user = Unique("unknown-fields");
  request.set_user_id(user);
  std::string body = request.SerializeAsString();
  body += std::string("\x98\x06\x01", 3);                       // 99: varint 1
  body += std::string("\xc2\x3e\x05", 3) + "hello";             // 1000: "hello"
  body += std::string("\xf9\x7f", 2) + std::string(8, '\x42');  // 2047: fixed64
  std::string reply;
  EXPECT_CODE(StatusCode::OK,
              RawCall("/sessionledger.v1.SessionService/CreateSession", body, "", &reply));
  pb::Session created;
  ASSERT_TRUE(created.ParseFromString(reply));
  EXPECT_EQ(created.user_id(), user);
  EXPECT_CODE(StatusCode::OK, DeleteSession(created.token()));

  // A message of another type: a TransferRequest sent to Deposit. Field 1 lines up (an account
  // id); fields 2 and 3 have other wire types than Deposit's, so they are unknown fields and the
  // request has no amount and no key.
  pb::TransferRequest transfer;
  transfer.set_from_account_id((*accounts_)[0]);
  transfer.set_to_account_id((*accounts_)[1]);
  transfer.set_amount_minor(5);
  transfer.set_idempotency_key(Unique("k"));
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, RawCall("/sessionledger.v1.TransactionService/Deposit",
                                                    transfer.SerializeAsString(), *token_));

  // Bytes that are no protobuf at all: refused, never served, never a crash.
  for (const std::string& garbage :
       {std::string("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 11),  // Endless varint.
        std::string("\x0a\x7f", 2),                                       // Truncated string.
        std::string("\x0f", 1)}) {                                        // Field number 1, group.
    SCOPED_TRACE(absl::CEscape(garbage));
    // GetSession, CreateSession and UpdateSession parse their own requests (asynchronous, raw
    // methods); the answer is the same as where gRPC parses them (the other methods).
    for (const char* method : {"/sessionledger.v1.SessionService/CreateSession",
                               "/sessionledger.v1.SessionService/GetSession",
                               "/sessionledger.v1.SessionService/UpdateSession",
                               "/sessionledger.v1.SessionService/RotateSession"}) {
      SCOPED_TRACE(method);
      const grpc::Status status = RawCall(method, garbage, "");
      EXPECT_EQ(status.error_code(), StatusCode::INVALID_ARGUMENT) << status.error_message();
      EXPECT_NE(status.error_message().find(method), std::string::npos) << status.error_message();
    }
    // Deposit is parsed by gRPC and answered by the request-parse interceptor, whose words
    // are the generic ones: garbage names no field.
    const grpc::Status deposit =
        RawCall("/sessionledger.v1.TransactionService/Deposit", garbage, *token_);
    EXPECT_EQ(deposit.error_code(), StatusCode::INVALID_ARGUMENT) << deposit.error_message();
    EXPECT_EQ(deposit.error_message(),
              "request: cannot be parsed as the request message of "
              "/sessionledger.v1.TransactionService/Deposit (string fields must be valid UTF-8)");
  }
}

TEST_F(BadInputTest, PageTokensThatWereTamperedWith) {
  pb::ListTransactionsResponse first;
  ASSERT_TRUE(List(*token_, (*accounts_)[0], 1, "", &first).ok());
  const std::string good = first.next_page_token();
  ASSERT_FALSE(good.empty()) << "the reference account has two transactions";
  EXPECT_CODE(StatusCode::OK, ListPage(good));

  std::vector<std::string> tampered;
  for (size_t i = 0; i < good.size(); ++i) {
    std::string t = good;
    t[i] = t[i] == 'A' ? 'B' : 'A';
    tampered.push_back(t);
  }
  tampered.push_back(good.substr(0, good.size() - 1));
  tampered.push_back(good + "A");
  tampered.push_back(good + "=");
  tampered.push_back(std::string(10 * 1024, 'A'));
  tampered.push_back(std::string("\0", 1));
  for (const std::string& t : tampered) {
    SCOPED_TRACE(t.substr(0, 80));
    EXPECT_CODE(StatusCode::INVALID_ARGUMENT, ListPage(t));
  }
  // A good token for another account.
  pb::ListTransactionsResponse other;
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, List(*token_, (*accounts_)[1], 1, good, &other));
  // Page sizes.
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, ListPage("", -1));
  EXPECT_CODE(StatusCode::INVALID_ARGUMENT, ListPage("", std::numeric_limits<int32_t>::min()));
  EXPECT_CODE(StatusCode::OK, ListPage("", std::numeric_limits<int32_t>::max()));
}

TEST_F(BadInputTest, DuplicateIdempotencyKeysWithOtherParameters) {
  pb::Account a, b;
  ASSERT_TRUE(OpenAccount(*token_, "EUR", &a).ok());
  ASSERT_TRUE(OpenAccount(*token_, "EUR", &b).ok());
  const std::string key = Unique("dup");
  pb::Transaction original;
  ASSERT_TRUE(Deposit(*token_, a.account_id(), 100, key, &original).ok());

  EXPECT_CODE(StatusCode::ALREADY_EXISTS, Deposit(*token_, a.account_id(), 101, key));
  EXPECT_CODE(StatusCode::ALREADY_EXISTS, Deposit(*token_, b.account_id(), 100, key));
  EXPECT_CODE(StatusCode::ALREADY_EXISTS,
              Transfer(*token_, a.account_id(), b.account_id(), 100, key));
  pb::Transaction again;
  EXPECT_CODE(StatusCode::OK, Deposit(*token_, a.account_id(), 100, key, &again));
  EXPECT_EQ(again.transaction_id(), original.transaction_id());

  const std::string transfer_key = Unique("dup-transfer");
  ASSERT_TRUE(Transfer(*token_, a.account_id(), b.account_id(), 10, transfer_key).ok());
  EXPECT_CODE(StatusCode::ALREADY_EXISTS,
              Transfer(*token_, a.account_id(), b.account_id(), 11, transfer_key));
  EXPECT_CODE(StatusCode::ALREADY_EXISTS,
              Transfer(*token_, b.account_id(), a.account_id(), 10, transfer_key));
  EXPECT_CODE(StatusCode::ALREADY_EXISTS, Deposit(*token_, a.account_id(), 10, transfer_key));

  // A used key is answered before the accounts are looked up: its replay must get the original
  // answer whatever became of them since, and keys are the caller's own, so the answer tells
  // nothing about another user's account.
  pb::Session stranger;
  ASSERT_TRUE(CreateSession(Unique("stranger"), {}, &stranger).ok());
  pb::Account theirs;
  ASSERT_TRUE(OpenAccount(stranger.token(), "EUR", &theirs).ok());
  EXPECT_CODE(StatusCode::ALREADY_EXISTS,
              Transfer(*token_, theirs.account_id(), a.account_id(), 100, key));
  EXPECT_CODE(StatusCode::ALREADY_EXISTS,
              Deposit(*token_, "00000000-0000-4000-8000-000000000000", 100, key));
  EXPECT_CODE(StatusCode::OK, DeleteSession(stranger.token()));

  pb::Account after_a, after_b;
  ASSERT_TRUE(GetAccount(*token_, a.account_id(), &after_a).ok());
  ASSERT_TRUE(GetAccount(*token_, b.account_id(), &after_b).ok());
  EXPECT_EQ(after_a.balance_minor(), 90);
  EXPECT_EQ(after_b.balance_minor(), 10);
}

TEST_F(BadInputTest, OtherUsersObjects) {
  pb::Session intruder;
  ASSERT_TRUE(CreateSession(Unique("intruder"), {}, &intruder).ok());
  const std::string& victim = (*accounts_)[0];
  pb::Account own;
  ASSERT_TRUE(OpenAccount(intruder.token(), "EUR", &own).ok());
  EXPECT_CODE(StatusCode::PERMISSION_DENIED, GetAccount(intruder.token(), victim));
  EXPECT_CODE(StatusCode::PERMISSION_DENIED, Deposit(intruder.token(), victim, 1, Unique("k")));
  EXPECT_CODE(StatusCode::PERMISSION_DENIED,
              Transfer(intruder.token(), victim, own.account_id(), 1, Unique("k")));
  pb::ListTransactionsResponse list;
  EXPECT_CODE(StatusCode::PERMISSION_DENIED, List(intruder.token(), victim, 10, "", &list));
  // Currency codes.
  for (const char* currency : {"", "eur", "EURO", "EU", "E1R", "\xe2\x82\xac\xe2\x82\xac"}) {
    SCOPED_TRACE(currency);
    EXPECT_CODE(StatusCode::INVALID_ARGUMENT, OpenAccount(intruder.token(), currency, &own));
  }
  EXPECT_CODE(StatusCode::OK, DeleteSession(intruder.token()));
}

}  // namespace
}  // namespace sessionledger::testing
