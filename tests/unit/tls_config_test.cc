// TLS_CERT_FILE / TLS_KEY_FILE / TLS_CLIENT_CA_FILE: read once at start-up, every mistake a
// one-line error naming the variable. Keys and certificates are made with the openssl CLI in a
// temporary directory, so no key material is committed.
#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/config/config.h"

namespace sessionledger {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

class TlsConfigTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char pattern[] = "/tmp/sl-tls-config-XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    dir_ = new std::string(pattern);
    const std::string d = *dir_;
    const std::string script = absl::StrCat(
        "set -e; cd ", d,
        "; openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1"
        " -subj /CN=test-ca",
        "; openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr"
        " -subj /CN=localhost",
        "; openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial"
        " -out server.pem -days 1",
        "; openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out other.key",
        "; openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -aes-128-cbc"
        " -pass pass:secret -out encrypted.key",
        "; echo 'not a certificate' > junk.pem", " ) >/dev/null 2>&1");
    ASSERT_EQ(std::system(("( " + script).c_str()), 0) << "openssl failed in " << d;
  }
  static void TearDownTestSuite() {
    if (dir_ != nullptr) {
      (void)std::system(("rm -rf '" + *dir_ + "'").c_str());
      delete dir_;
      dir_ = nullptr;
    }
  }

  static std::string Path(const std::string& name) { return *dir_ + "/" + name; }
  static std::string Contents(const std::string& name) {
    std::ifstream in(Path(name));
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }

  // The one-line error of LoadConfig with the given TLS variables on top of a valid environment.
  static std::string ConfigError(const std::map<std::string, std::string>& tls_env) {
    std::map<std::string, std::string> env = {
        {"MEMCACHED_URL", "memcached://127.0.0.1:11211"},
        {"DATABASE_URL", "postgres://u:p@127.0.0.1:5432/db?sslmode=disable"}};
    for (const auto& [k, v] : tls_env) env[k] = v;
    absl::StatusOr<Config> config =
        LoadConfig([env](absl::string_view name) -> std::optional<std::string> {
          auto it = env.find(std::string(name));
          if (it == env.end()) return std::nullopt;
          return it->second;
        });
    EXPECT_FALSE(config.ok()) << "accepted";
    if (config.ok()) return "";
    const std::string message(config.status().message());
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    return message;
  }

  static std::string* dir_;
};

std::string* TlsConfigTest::dir_ = nullptr;

TEST_F(TlsConfigTest, UnsetOrEmptyMeansPlaintext) {
  absl::StatusOr<TlsConfig> tls = LoadTlsFiles(std::nullopt, std::nullopt, std::nullopt);
  ASSERT_TRUE(tls.ok()) << tls.status();
  EXPECT_FALSE(tls->enabled());
  tls = LoadTlsFiles("", "", "");
  ASSERT_TRUE(tls.ok()) << tls.status();
  EXPECT_FALSE(tls->enabled());
  EXPECT_FALSE(tls->require_client_cert());
}

TEST_F(TlsConfigTest, CertificateAndKeyTurnTlsOn) {
  absl::StatusOr<TlsConfig> tls = LoadTlsFiles(Path("server.pem"), Path("server.key"), "");
  ASSERT_TRUE(tls.ok()) << tls.status();
  EXPECT_TRUE(tls->enabled());
  EXPECT_FALSE(tls->require_client_cert());
  EXPECT_EQ(tls->cert_chain_pem, Contents("server.pem"));
  EXPECT_EQ(tls->private_key_pem, Contents("server.key"));
}

TEST_F(TlsConfigTest, ClientCaTurnsMutualTlsOn) {
  absl::StatusOr<TlsConfig> tls =
      LoadTlsFiles(Path("server.pem"), Path("server.key"), Path("ca.pem"));
  ASSERT_TRUE(tls.ok()) << tls.status();
  EXPECT_TRUE(tls->require_client_cert());
  EXPECT_EQ(tls->client_ca_pem, Contents("ca.pem"));
}

TEST_F(TlsConfigTest, LoadConfigReadsTheFiles) {
  std::map<std::string, std::string> env = {{"MEMCACHED_URL", "memcached://127.0.0.1:11211"},
                                            {"DATABASE_URL", "postgres://u:p@127.0.0.1:5432/db"},
                                            {"TLS_CERT_FILE", Path("server.pem")},
                                            {"TLS_KEY_FILE", Path("server.key")},
                                            {"TLS_CLIENT_CA_FILE", Path("ca.pem")}};
  absl::StatusOr<Config> config =
      LoadConfig([env](absl::string_view name) -> std::optional<std::string> {
        auto it = env.find(std::string(name));
        if (it == env.end()) return std::nullopt;
        return it->second;
      });
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->tls.enabled());
  EXPECT_TRUE(config->tls.require_client_cert());
}

TEST_F(TlsConfigTest, EveryMistakeNamesItsVariable) {
  EXPECT_THAT(
      ConfigError({{"TLS_CERT_FILE", Path("missing.pem")}, {"TLS_KEY_FILE", Path("server.key")}}),
      StartsWith("TLS_CERT_FILE: cannot read " + Path("missing.pem") +
                 ": No such file or directory"));
  EXPECT_THAT(
      ConfigError({{"TLS_CERT_FILE", Path("server.pem")}, {"TLS_KEY_FILE", Path("missing.key")}}),
      StartsWith("TLS_KEY_FILE: cannot read"));
  EXPECT_THAT(ConfigError({{"TLS_KEY_FILE", Path("server.key")}}),
              StartsWith("TLS_CERT_FILE: required with TLS_KEY_FILE"));
  EXPECT_THAT(ConfigError({{"TLS_CERT_FILE", Path("server.pem")}}),
              StartsWith("TLS_KEY_FILE: required with TLS_CERT_FILE"));
  EXPECT_THAT(ConfigError({{"TLS_CLIENT_CA_FILE", Path("ca.pem")}}),
              StartsWith("TLS_CLIENT_CA_FILE: needs TLS_CERT_FILE"));
  EXPECT_THAT(
      ConfigError({{"TLS_CERT_FILE", Path("junk.pem")}, {"TLS_KEY_FILE", Path("server.key")}}),
      StartsWith("TLS_CERT_FILE: " + Path("junk.pem") + " holds no PEM certificate"));
  EXPECT_THAT(
      ConfigError({{"TLS_CERT_FILE", Path("server.pem")}, {"TLS_KEY_FILE", Path("other.key")}}),
      StartsWith("TLS_KEY_FILE: " + Path("other.key") + " is not the key of the certificate"));
  // An encrypted key would need a passphrase nobody can type into a container.
  EXPECT_THAT(
      ConfigError({{"TLS_CERT_FILE", Path("server.pem")}, {"TLS_KEY_FILE", Path("encrypted.key")}}),
      StartsWith("TLS_KEY_FILE: "));
  EXPECT_THAT(ConfigError({{"TLS_CERT_FILE", Path("server.pem")},
                           {"TLS_KEY_FILE", Path("server.key")},
                           {"TLS_CLIENT_CA_FILE", Path("junk.pem")}}),
              StartsWith("TLS_CLIENT_CA_FILE: "));
  EXPECT_THAT(ConfigError({{"TLS_CERT_FILE", Path("server.pem")},
                           {"TLS_KEY_FILE", Path("server.key")},
                           {"TLS_CLIENT_CA_FILE", *dir_}}),
              StartsWith("TLS_CLIENT_CA_FILE: "));
}

TEST_F(TlsConfigTest, ErrorsNeverQuoteKeyMaterial) {
  // The key file given as the certificate: the error must name the file, not print its bytes.
  const std::string message =
      ConfigError({{"TLS_CERT_FILE", Path("server.key")}, {"TLS_KEY_FILE", Path("server.key")}});
  EXPECT_THAT(message, HasSubstr("TLS_CERT_FILE"));
  EXPECT_THAT(message, ::testing::Not(HasSubstr("PRIVATE KEY")));
}

}  // namespace
}  // namespace sessionledger
