// sessionledger-cli: a command-line client for every sessionledger RPC, and a load generator.
// Everything lives in the sl_client library; main only hands it argv, the environment and the
// standard streams.
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "client/commands.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  auto env = [](const std::string& name) -> std::optional<std::string> {
    const char* value = std::getenv(name.c_str());
    if (value == nullptr) return std::nullopt;
    return std::string(value);
  };
  return sessionledger::client::RunCli(args, env, std::cout, std::cerr);
}
