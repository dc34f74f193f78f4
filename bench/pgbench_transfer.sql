-- One Transfer as plain SQL statements, the PostgreSQL floor that scripts/bench compares the
-- server's Transfer with: idempotency-key insert, debit, credit, transaction insert, commit,
-- one round trip each. Each pgbench client moves 1 minor unit between its own two accounts
-- (as each bench slot does), so clients never wait on each other's row locks.
-- Needs bench/pgbench_setup.sql with at least as many clients.
\set key random(1, 9000000000000000000)
BEGIN;
INSERT INTO pgbench_sl.idempotency_keys (user_id, idempotency_key)
  VALUES ('pgbench-user-' || :client_id, 'pgb-' || :key);
UPDATE pgbench_sl.accounts SET balance_minor = balance_minor - 1
  WHERE account_id = md5('pgbench-' || :client_id || '-from')::uuid AND balance_minor >= 1;
UPDATE pgbench_sl.accounts SET balance_minor = balance_minor + 1
  WHERE account_id = md5('pgbench-' || :client_id || '-to')::uuid;
INSERT INTO pgbench_sl.transactions (transaction_id, kind, from_account_id, to_account_id,
                                     amount_minor, currency, user_id, idempotency_key)
  VALUES (gen_random_uuid(), 'transfer', md5('pgbench-' || :client_id || '-from')::uuid,
          md5('pgbench-' || :client_id || '-to')::uuid, 1, 'EUR',
          'pgbench-user-' || :client_id, 'pgb-' || :key);
COMMIT;
