-- The broker's schema version 1, exactly as the first release wrote it, with a run in
-- flight: newer brokers must open and migrate it (see store::tests).
CREATE TABLE IF NOT EXISTS runs (
run_id TEXT PRIMARY KEY, job TEXT NOT NULL, params TEXT NOT NULL,
state TEXT NOT NULL, parent_runs TEXT NOT NULL, request_id TEXT NOT NULL,
created_at INTEGER NOT NULL, finished_at INTEGER);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (created_at);
CREATE INDEX IF NOT EXISTS runs_by_job ON runs (job, created_at);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs (state, created_at);
CREATE TABLE IF NOT EXISTS steps (
step_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, job TEXT NOT NULL,
delivery TEXT NOT NULL, state TEXT NOT NULL, origin_task TEXT,
created_at INTEGER NOT NULL, finished_at INTEGER);
CREATE INDEX IF NOT EXISTS steps_by_run ON steps (run_id);
CREATE TABLE IF NOT EXISTS tasks (
task_id TEXT PRIMARY KEY, step_id TEXT NOT NULL, run_id TEXT NOT NULL,
job TEXT NOT NULL, worker TEXT, state TEXT NOT NULL, attempt INTEGER NOT NULL,
exit_code INTEGER, error TEXT, instance TEXT, created_at INTEGER NOT NULL,
started_at INTEGER, finished_at INTEGER, output_tail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_by_run ON tasks (run_id);
CREATE TABLE IF NOT EXISTS workers (
name TEXT PRIMARY KEY, instance TEXT NOT NULL, jobs TEXT NOT NULL,
capabilities TEXT NOT NULL, slots INTEGER NOT NULL, version TEXT NOT NULL,
last_seen INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
name TEXT PRIMARY KEY, spec TEXT NOT NULL, source TEXT NOT NULL,
updated_at INTEGER NOT NULL);
INSERT INTO runs VALUES ('r1', 'a', '{"date":"2026_11_23"}', 'running', '[]', 'req-r1', 1000, NULL);
INSERT INTO steps VALUES ('s1', 'r1', 'a', 'broadcast', 'running', NULL, 1000, NULL);
INSERT INTO tasks VALUES ('t1', 's1', 'r1', 'a', 'w1', 'running', 1, NULL, NULL, 'i1', 1000, 1001, NULL, '');
INSERT INTO workers VALUES ('w1', 'i1', '["a"]', '[]', 2, '0.0.0', 1000);
PRAGMA user_version = 1;
