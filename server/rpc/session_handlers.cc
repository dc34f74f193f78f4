#include "server/rpc/session_handlers.h"
