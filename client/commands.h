#ifndef SESSIONLEDGER_CLIENT_COMMANDS_H_
#define SESSIONLEDGER_CLIENT_COMMANDS_H_

#include <grpcpp/channel.h>
#include <grpcpp/support/status.h>

#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "client/cli_options.h"

namespace sessionledger::client {

// Runs one RPC command (anything but help and bench) over `channel`, printing the response to
// `out` (a table, or protobuf JSON with --json) and errors to `err`. Returns the exit code of
// the call's status (ExitCodeForStatus). Thread-compatible; makes one call at a time
// (history --all makes one per page).
int RunRpcCommand(const CliOptions& options, const std::shared_ptr<grpc::Channel>& channel,
                  std::ostream& out, std::ostream& err);

// The whole CLI: parses `args` (argv without the program name), builds the channel and runs
// the command or the load generator. Returns the process exit code.
int RunCli(const std::vector<std::string>& args, const EnvLookup& env, std::ostream& out,
           std::ostream& err);

// The CLI's exit code for a call that ended with `status`: 0 for OK, the status code for the
// codes gRPC defines (1 CANCELLED to 16 UNAUTHENTICATED), and 2 (UNKNOWN) for any other number.
// gRPC 1.51 hands on whatever a peer's grpc-status trailer says, and a shell sees an exit code
// modulo 256: a proxy answering "grpc-status: 256" would exit 0 after printing an error, and 270
// would exit 14 (UNAVAILABLE), which scripts retry.
int ExitCodeForStatus(const grpc::Status& status);

// A fresh idempotency key: "cli-" and 128 random bits in hex, unique without coordination.
std::string GenerateIdempotencyKey();

}  // namespace sessionledger::client

#endif  // SESSIONLEDGER_CLIENT_COMMANDS_H_
