// sessionledger-cli: command-line client for sessionledger. Subcommands arrive with the CLI work.
#include <cstdio>

int main() {
  std::fputs("sessionledger-cli: no subcommands yet\n", stderr);
  return 2;
}
