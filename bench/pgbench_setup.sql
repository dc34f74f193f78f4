-- Schema for scripts/bench's PostgreSQL floor (bench/pgbench_transfer.sql). It mirrors the
-- ledger's tables in a schema of its own, so the floor runs on the same PostgreSQL as the
-- server without touching the server's data, and with a separate idempotency-key table as a
-- straightforward SQL design would have it.
-- psql -v clients=N: two accounts per pgbench client (client_id 0..N-1), the source funded.
DROP SCHEMA IF EXISTS pgbench_sl CASCADE;
CREATE SCHEMA pgbench_sl;

CREATE TABLE pgbench_sl.accounts (
  account_id    uuid        PRIMARY KEY,
  owner_user_id text        NOT NULL,
  currency      text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
  balance_minor bigint      NOT NULL DEFAULT 0 CHECK (balance_minor >= 0),
  created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pgbench_sl.idempotency_keys (
  user_id         text        NOT NULL,
  idempotency_key text        NOT NULL,
  created_at      timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (user_id, idempotency_key)
);

CREATE TABLE pgbench_sl.transactions (
  seq             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  transaction_id  uuid        NOT NULL UNIQUE,
  kind            text        NOT NULL,
  from_account_id uuid,
  to_account_id   uuid        NOT NULL,
  amount_minor    bigint      NOT NULL CHECK (amount_minor > 0),
  currency        text        NOT NULL,
  created_at      timestamptz NOT NULL DEFAULT now(),
  user_id         text        NOT NULL,
  idempotency_key text        NOT NULL
);
CREATE INDEX ON pgbench_sl.transactions (from_account_id, seq DESC);
CREATE INDEX ON pgbench_sl.transactions (to_account_id, seq DESC);

INSERT INTO pgbench_sl.accounts (account_id, owner_user_id, currency, balance_minor)
SELECT md5('pgbench-' || c || '-from')::uuid, 'pgbench-user-' || c, 'EUR', 1000000000000
FROM generate_series(0, :clients - 1) AS c
UNION ALL
SELECT md5('pgbench-' || c || '-to')::uuid, 'pgbench-user-' || c, 'EUR', 0
FROM generate_series(0, :clients - 1) AS c;
ANALYZE pgbench_sl.accounts;
