#ifndef SESSIONLEDGER_CLIENT_COMMANDS_H_
#define SESSIONLEDGER_CLIENT_COMMANDS_H_

#include <grpcpp/channel.h>

#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "client/cli_options.h"

namespace sessionledger::client {

// Runs one RPC command (anything but help and bench) over `channel`, printing the response to
// `out` (a table, or protobuf JSON with --json) and errors to `err`. Returns the gRPC status
// code, which the CLI uses as its exit code. Thread-compatible; makes one call at a time
// (history --all makes one per page).
int RunRpcCommand(const CliOptions& options, const std::shared_ptr<grpc::Channel>& channel,
                  std::ostream& out, std::ostream& err);

// The whole CLI: parses `args` (argv without the program name), builds the channel and runs
// the command or the load generator. Returns the process exit code.
int RunCli(const std::vector<std::string>& args, const EnvLookup& env, std::ostream& out,
           std::ostream& err);

// A fresh idempotency key: "cli-" and 128 random bits in hex, unique without coordination.
std::string GenerateIdempotencyKey();

}  // namespace sessionledger::client

#endif  // SESSIONLEDGER_CLIENT_COMMANDS_H_
