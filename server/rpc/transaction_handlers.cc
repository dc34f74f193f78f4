#include "server/rpc/transaction_handlers.h"
