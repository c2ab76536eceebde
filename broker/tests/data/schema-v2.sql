-- The broker's schema version 2, exactly as it was written before run control (priority,
-- delay, dependencies, cancel, tags, tracking) came, with a run in flight and a finished
-- run of a tagged job: newer brokers must open and migrate it (see store::tests).
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
   failures INTEGER NOT NULL DEFAULT 0, fanout INTEGER NOT NULL DEFAULT 1, recorded_at INTEGER,
   exit_code INTEGER, error TEXT, instance TEXT, created_at INTEGER NOT NULL,
   started_at INTEGER, finished_at INTEGER, output_tail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_by_run ON tasks (run_id);
CREATE INDEX IF NOT EXISTS tasks_by_job_end ON tasks (job, recorded_at);
CREATE TABLE IF NOT EXISTS workers (
   name TEXT PRIMARY KEY, instance TEXT NOT NULL, jobs TEXT NOT NULL,
   capabilities TEXT NOT NULL, slots INTEGER NOT NULL, version TEXT NOT NULL,
   last_seen INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
   name TEXT PRIMARY KEY, spec TEXT NOT NULL, source TEXT NOT NULL,
   updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
   task_id TEXT NOT NULL, run_id TEXT NOT NULL, attempt INTEGER NOT NULL,
   worker TEXT, state TEXT NOT NULL, exit_code INTEGER, error TEXT,
   started_at INTEGER, finished_at INTEGER NOT NULL, late INTEGER NOT NULL,
   PRIMARY KEY (task_id, attempt, late));
CREATE INDEX IF NOT EXISTS attempts_by_run ON attempts (run_id);
CREATE TABLE IF NOT EXISTS dead (
   task_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, step_id TEXT NOT NULL,
   job TEXT NOT NULL, worker TEXT, params TEXT NOT NULL, attempts INTEGER NOT NULL,
   error TEXT, exit_code INTEGER, failed_at INTEGER NOT NULL, retried_as TEXT);
CREATE INDEX IF NOT EXISTS dead_by_time ON dead (failed_at);
INSERT INTO runs VALUES ('r1', 'a', '{"date":"2026_11_23"}', 'running', '[]', 'req-r1', 1000, NULL);
INSERT INTO runs VALUES ('r0', 'a', '{"date":"2026_11_22"}', 'succeeded', '[]', 'req-r0', 900, 950);
INSERT INTO steps VALUES ('s1', 'r1', 'a', 'broadcast', 'running', NULL, 1000, NULL);
INSERT INTO tasks VALUES ('t1', 's1', 'r1', 'a', 'w1', 'running', 1, 0, 1, NULL, NULL, NULL, 'i1', 1000, 1001, NULL, '');
INSERT INTO workers VALUES ('w1', 'i1', '["a"]', '[]', 2, '0.0.0', 1000);
INSERT INTO jobs VALUES ('a', '{"name":"a","description":"","command":"true","params":{},"on_success":[],"on_failure":[],"delivery":"broadcast","timeout_ms":null,"retries":0,"retry_backoff_ms":10000,"tags":["etl","nightly"]}', 'w1', 1000);
PRAGMA user_version = 2;
