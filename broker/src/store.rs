//! The broker's durable state behind one narrow interface.
//!
//! [`Store`] is all the broker asks of its storage: apply a batch of upserts atomically,
//! load what is unfinished, and answer run queries. [`SqliteStore`] implements it on an
//! embedded SQLite database (WAL, `synchronous=FULL`); a PostgreSQL implementation can
//! take its place so that a standby broker shares the state.

use std::fs::File;
use std::path::Path;

use jobz::jobfile::JobSpec;
use jobz::message::{
    AttemptView, Completion, JobDayStats, Params, RunFilter, RunState, RunView, StepView, TaskState,
};
use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;

use crate::engine::{Edge, Snapshot, Write, Written};
use crate::ids::{RunId, StepId, TaskId};
#[cfg(test)]
use crate::model::Attempt;
use crate::model::{delivery_name, parse_delivery, Dead, Run, Step, Task};
use crate::notify::Notice;
use crate::registry::{CatalogEntry, Worker};

mod notices;
mod retention;
mod stats;
pub use retention::{Pruned, Retention, LISTED_DEAD, TRIGGER_DEDUP_MS};

/// Version of the schema this build writes; older databases are migrated on open.
const SCHEMA_VERSION: i64 = 6;

/// The runs the broker holds in memory: not finished. A cancelled run is unfinished until
/// its workers have reported its tasks.
const UNFINISHED_RUNS: &str = "(runs.state IN ('scheduled', 'waiting', 'pending', 'running') \
     OR (runs.state = 'cancelled' AND runs.finished_at IS NULL))";

/// A failure of the store. The broker stops on a failed write (its memory would be ahead
/// of its disk); it answers a failed read with an error.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store: {context}: {source}")]
    Sqlite {
        context: String,
        source: rusqlite::Error,
    },
    #[error("store: corrupt record: {0}")]
    Corrupt(String),
    #[error("store: {0}")]
    Io(String),
}

/// Locks `dir/broker.lock` (created 0600 if missing) for as long as the returned file is
/// open; the kernel lets go when the process ends, however it ends.
fn lock_state_dir(dir: &Path) -> Result<File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(STATE_LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::Io(format!("opening {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Io(format!(
            "state directory {} is in use by another broker (it holds {}); \
             stop it first, or give this one its own --state",
            dir.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::Io(format!("locking {}: {e}", path.display())))
        }
    }
}

/// A column that does not convert (wrong type, NULL where none may be).
impl From<rusqlite::Error> for StoreError {
    fn from(source: rusqlite::Error) -> Self {
        StoreError::Sqlite {
            context: "reading a row".into(),
            source,
        }
    }
}

trait Context<T> {
    fn context(self, what: &str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, rusqlite::Error> {
    fn context(self, what: &str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sqlite {
            context: what.to_owned(),
            source,
        })
    }
}

/// Everything the broker asks of durable storage.
pub trait Store: Send {
    /// Applies every write in one transaction: all of them are durable, or none.
    fn apply(&mut self, writes: &[Write]) -> Result<(), StoreError>;
    /// Unfinished runs with their steps and tasks, the registry, recent trigger ids.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// One run with all its tasks.
    fn run(&self, run_id: &str) -> Result<Option<RunView>, StoreError>;
    /// The states of those of `run_ids` the store holds (what a trigger's `depends=` needs
    /// of runs no longer in memory).
    fn run_states(&self, run_ids: &[RunId]) -> Result<Vec<(RunId, RunState)>, StoreError>;
    /// Runs, newest first, without tasks.
    fn runs(&self, filter: &RunFilter) -> Result<Vec<RunView>, StoreError>;
    /// Tasks of `jobs` that ended for good at or after `since_ms`, oldest first.
    fn completions(
        &self,
        jobs: &[String],
        since_ms: i64,
        limit: u32,
    ) -> Result<Vec<Completion>, StoreError>;
    /// Tasks of `job` that ended for good at or after `since_ms`, counted per UTC day.
    fn job_stats(&self, job: &str, since_ms: i64) -> Result<Vec<JobDayStats>, StoreError>;
    /// Notices neither delivered nor given up, soonest first.
    fn pending_notices(&self) -> Result<Vec<Notice>, StoreError>;
    /// Removes one small batch of what `retention` no longer keeps, in its own
    /// transaction (see [`Retention`] for what goes and what stays).
    fn prune(&mut self, retention: &Retention, now_ms: i64) -> Result<Pruned, StoreError>;
}

/// The embedded SQLite store.
pub struct SqliteStore {
    conn: Connection,
    /// `broker.lock` in the state directory, locked while the store is open: one broker
    /// per state directory (`None` in memory).
    _state_lock: Option<File>,
}

/// The file in the state directory that a broker holds locked while it runs.
pub const STATE_LOCK_FILE: &str = "broker.lock";

impl SqliteStore {
    /// Opens (creating if needed) `dir/broker.sqlite3`, after locking `dir/broker.lock`:
    /// a second broker on the same state directory is refused with an error naming it,
    /// instead of two brokers writing one database.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Io(format!("creating state directory {}: {e}", dir.display()))
        })?;
        let state_lock = lock_state_dir(dir)?;
        let path = dir.join("broker.sqlite3");
        let conn = Connection::open(&path).context(&format!("opening {}", path.display()))?;
        let store = SqliteStore {
            conn,
            _state_lock: Some(state_lock),
        };
        // Only this process opens the database (the lock above says so): no file lock nor
        // shared-memory index per transaction. Set before the first access, so WAL mode
        // keeps its index in the heap.
        store
            .conn
            .execute_batch("PRAGMA locking_mode = EXCLUSIVE;")
            .context("setting the exclusive locking mode")?;
        store.init()?;
        Ok(store)
    }

    /// An in-memory store, for tests.
    pub fn in_memory() -> Result<SqliteStore, StoreError> {
        let store = SqliteStore {
            conn: Connection::open_in_memory().context("opening in-memory db")?,
            _state_lock: None,
        };
        store.init()?;
        Ok(store)
    }

    fn init(&self) -> Result<(), StoreError> {
        // Every write and read statement stays prepared (rusqlite's default keeps 16).
        self.conn.set_prepared_statement_cache_capacity(64);
        self.conn
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = OFF;
                 PRAGMA busy_timeout = 5000;",
            )
            .context("setting pragmas")?;
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .context("reading schema version")?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "database schema {version} is newer than this broker understands ({SCHEMA_VERSION})"
            )));
        }
        if version == 0 {
            self.conn
                .execute_batch(
                    "BEGIN;
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
                     PRAGMA user_version = 2;
                     COMMIT;",
                )
                .context("creating schema")?;
        } else if version == 1 {
            self.migrate_v1_to_v2()?;
        }
        if version < 3 {
            self.migrate_v2_to_v3()?;
        }
        if version < 4 {
            self.migrate_v3_to_v4()?;
        }
        if version < 5 {
            self.migrate_v4_to_v5()?;
        }
        if version < 6 {
            self.migrate_v5_to_v6()?;
        }
        self.conn
            .execute_batch(retention::SCHEMA)
            .context("creating the retention indexes")?;
        Ok(())
    }
}

impl SqliteStore {
    /// Version 2 added retries, fanout and the broker-clock completion time to tasks, and
    /// the attempt history and dead list. Done in one transaction: all of it, or nothing.
    fn migrate_v1_to_v2(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch(
                "BEGIN;
                 ALTER TABLE tasks ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE tasks ADD COLUMN fanout INTEGER NOT NULL DEFAULT 1;
                 ALTER TABLE tasks ADD COLUMN recorded_at INTEGER;
                 UPDATE tasks SET recorded_at = finished_at WHERE state IN ('succeeded', 'failed');
                 CREATE INDEX IF NOT EXISTS tasks_by_job_end ON tasks (job, recorded_at);
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
                 PRAGMA user_version = 2;
                 COMMIT;",
            )
            .context("migrating the schema from version 1 to 2")?;
        tracing::info!("store migrated from schema version 1 to 2");
        Ok(())
    }

    /// Version 4 added resources (jobs' inputs and outputs): those written or created, and
    /// the lineage graph's edges. Nothing older changes.
    fn migrate_v3_to_v4(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS resources (
                    name TEXT PRIMARY KEY, written_at INTEGER NOT NULL, expires_at INTEGER,
                    run_id TEXT, job TEXT);
                 CREATE TABLE IF NOT EXISTS resource_edges (
                    kind TEXT NOT NULL, from_node TEXT NOT NULL, to_node TEXT NOT NULL,
                    PRIMARY KEY (kind, from_node, to_node)) WITHOUT ROWID;
                 PRAGMA user_version = 4;
                 COMMIT;",
            )
            .context("migrating the schema from version 3 to 4")?;
        tracing::info!("store migrated from schema version 3 to 4");
        Ok(())
    }

    /// Version 6 adds the jobs' statistics per day (`job_stats`, filled from the tasks
    /// held), each run by the runs it names as parents (`run_parents`, so a run's page links
    /// the runs started from it) and the notices to deliver (`notices`).
    fn migrate_v5_to_v6(&self) -> Result<(), StoreError> {
        let sql = format!(
            "BEGIN;
             {stats}
             CREATE TABLE IF NOT EXISTS run_parents (
                parent TEXT NOT NULL, run_id TEXT NOT NULL,
                PRIMARY KEY (parent, run_id)) WITHOUT ROWID;
             INSERT OR IGNORE INTO run_parents (parent, run_id)
                SELECT p.value, runs.run_id FROM runs, json_each(runs.parent_runs) AS p
                WHERE p.type = 'text';
             CREATE TRIGGER IF NOT EXISTS run_parents_follow_runs AFTER DELETE ON runs
                BEGIN DELETE FROM run_parents WHERE run_id = old.run_id; END;
             {notices}
             ALTER TABLE runs ADD COLUMN notify TEXT NOT NULL DEFAULT '[]';
             PRAGMA user_version = 6;
             COMMIT;",
            stats = stats::SCHEMA_V6,
            notices = notices::SCHEMA_V6,
        );
        self.conn
            .execute_batch(&sql)
            .context("migrating the schema from version 5 to 6")?;
        tracing::info!("store migrated from schema version 5 to 6");
        Ok(())
    }

    /// Version 5 keeps each ended attempt's output tail, so every attempt's output can be
    /// read (`/runs/{id}/tasks/{task}/attempts/{n}/log`). Older attempts have none.
    fn migrate_v4_to_v5(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch(
                "BEGIN;
                 ALTER TABLE attempts ADD COLUMN output_tail TEXT NOT NULL DEFAULT '';
                 PRAGMA user_version = 5;
                 COMMIT;",
            )
            .context("migrating the schema from version 4 to 5")?;
        tracing::info!("store migrated from schema version 4 to 5");
        Ok(())
    }

    /// Version 3 added run control: each run's priority, tags (also in `run_tags`, by tag:
    /// a run's older than this version get its job's tags), tracked flag, due time,
    /// dependencies and the reason it ended. `run_tags` follows deleted runs by trigger, so
    /// whatever prunes runs need not know it.
    fn migrate_v2_to_v3(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch(
                "BEGIN;
                 ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE runs ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
                 ALTER TABLE runs ADD COLUMN tracked INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE runs ADD COLUMN not_before INTEGER;
                 ALTER TABLE runs ADD COLUMN depends_on TEXT NOT NULL DEFAULT '[]';
                 ALTER TABLE runs ADD COLUMN reason TEXT;
                 UPDATE runs SET tags = COALESCE(
                    (SELECT json_extract(jobs.spec, '$.tags') FROM jobs WHERE jobs.name = runs.job),
                    '[]');
                 CREATE TABLE IF NOT EXISTS run_tags (
                    tag TEXT NOT NULL, run_id TEXT NOT NULL, created_at INTEGER NOT NULL,
                    PRIMARY KEY (tag, run_id)) WITHOUT ROWID;
                 CREATE INDEX IF NOT EXISTS run_tags_by_time ON run_tags (tag, created_at);
                 INSERT OR IGNORE INTO run_tags (tag, run_id, created_at)
                    SELECT t.value, runs.run_id, runs.created_at FROM runs, json_each(runs.tags) AS t
                    WHERE t.type = 'text';
                 CREATE INDEX IF NOT EXISTS runs_tracked ON runs (created_at) WHERE tracked = 1;
                 CREATE TRIGGER IF NOT EXISTS run_tags_follow_runs AFTER DELETE ON runs
                    BEGIN DELETE FROM run_tags WHERE run_id = old.run_id; END;
                 PRAGMA user_version = 3;
                 COMMIT;",
            )
            .context("migrating the schema from version 2 to 3")?;
        tracing::info!("store migrated from schema version 2 to 3");
        Ok(())
    }
}

/// Ids are stored as their text: the conversion at the store's edge.
macro_rules! id_as_text {
    ($($id:ty),*) => {$(
        impl rusqlite::types::ToSql for $id {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl rusqlite::types::FromSql for $id {
            fn column_result(
                value: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<Self> {
                String::column_result(value).map(<$id>::from)
            }
        }
    )*};
}

id_as_text!(RunId, StepId, TaskId);

/// Parent run ids as the JSON list of strings the `runs` table holds.
fn parent_runs_json(parents: &[RunId]) -> String {
    json(&parents.iter().map(RunId::as_str).collect::<Vec<_>>())
}

fn json<T: serde::Serialize>(value: &T) -> String {
    // Serialising plain maps and vectors of strings cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn parse_state<T: std::str::FromStr<Err = String>>(s: &str) -> Result<T, StoreError> {
    s.parse().map_err(StoreError::Corrupt)
}

/// Runs one statement through the connection's statement cache: the hot writes are the
/// same few statements, and preparing each anew cost more than executing it.
fn execute_cached(
    tx: &rusqlite::Transaction<'_>,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(params)
}

/// Upserts a task's row.
fn write_task(tx: &rusqlite::Transaction<'_>, t: &Task) -> Result<usize, StoreError> {
    execute_cached(tx,
                                "INSERT INTO tasks (task_id, step_id, run_id, job, worker, state, attempt, exit_code, error, instance,
                                    created_at, started_at, finished_at, output_tail, failures, fanout, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
                 ON CONFLICT (task_id) DO UPDATE SET worker = excluded.worker, state = excluded.state,
                    attempt = excluded.attempt, failures = excluded.failures,
                    exit_code = excluded.exit_code, error = excluded.error,
                    instance = excluded.instance, started_at = excluded.started_at,
                    finished_at = excluded.finished_at, output_tail = excluded.output_tail,
                    recorded_at = excluded.recorded_at",
                params![t.task_id, t.step_id, t.run_id, t.job, t.worker, t.state.as_str(), t.attempt, t.exit_code, t.error,
                        t.instance, t.created_at_ms, t.started_at_ms, t.finished_at_ms, t.output_tail, t.failures, t.fanout, t.recorded_at_ms],
            )
            .context("writing a task")
}

fn apply_one(tx: &rusqlite::Transaction<'_>, write: &Write) -> Result<(), StoreError> {
    match write {
        Write::Run(r) => {
            execute_cached(tx,
                "INSERT INTO runs (run_id, job, params, state, parent_runs, request_id, created_at, finished_at,
                                   priority, tags, tracked, not_before, depends_on, reason, notify)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                 ON CONFLICT (run_id) DO UPDATE SET state = excluded.state, finished_at = excluded.finished_at,
                    priority = excluded.priority, tracked = excluded.tracked,
                    not_before = excluded.not_before, reason = excluded.reason, notify = excluded.notify",
                params![r.run_id, r.job, json(&r.params), r.state.as_str(), parent_runs_json(&r.parent_runs), r.request_id,
                        r.created_at_ms, r.finished_at_ms, r.priority, json(&r.tags), r.tracked, r.not_before_ms,
                        parent_runs_json(&r.depends_on), r.reason, json(&r.notify)],
            )
            .context("writing a run")?;
            for tag in &r.tags {
                execute_cached(tx,
                    "INSERT OR IGNORE INTO run_tags (tag, run_id, created_at) VALUES (?1, ?2, ?3)",
                    params![tag, r.run_id, r.created_at_ms],
                )
                .context("writing a run's tag")?;
            }
            for parent in &r.parent_runs {
                execute_cached(tx,
                    "INSERT OR IGNORE INTO run_parents (parent, run_id) VALUES (?1, ?2)",
                    params![parent, r.run_id],
                )
                .context("writing a run's parent")?;
            }
            Ok(1)
        }
        Write::Tracked { run_id, tracked } => execute_cached(tx,
                "UPDATE runs SET tracked = ?2 WHERE run_id = ?1",
                params![run_id, tracked],
            )
            .context("tracking a run"),
        Write::Step(s) => execute_cached(tx,
                "INSERT INTO steps (step_id, run_id, job, delivery, state, origin_task, created_at, finished_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (step_id) DO UPDATE SET state = excluded.state, finished_at = excluded.finished_at",
                params![s.step_id, s.run_id, s.job, delivery_name(s.delivery), s.state.as_str(), s.origin_task, s.created_at_ms, s.finished_at_ms],
            )
            .context("writing a step"),
        Write::Task(t) => write_task(tx, t),
        Write::TaskEnded(t) => stats::count_ended(tx, t).map(|()| 1),
        Write::Notice(n) => notices::insert(tx, n).map(|()| 1),
        Write::NoticeTried(t) => notices::tried(tx, t).map(|()| 1),
        Write::Worker(w) => execute_cached(tx,
                "INSERT OR REPLACE INTO workers (name, instance, jobs, capabilities, slots, version, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![w.name, w.instance, json(&w.jobs), json(&w.capabilities), w.slots, w.version, w.last_seen_ms],
            )
            .context("writing a worker"),
        Write::WorkerForgotten { name } => execute_cached(tx,
                "DELETE FROM workers WHERE name = ?1",
                params![name],
            )
            .context("forgetting a worker"),
        Write::Job(c) => execute_cached(tx,
                "INSERT OR REPLACE INTO jobs (name, spec, source, updated_at) VALUES (?1, ?2, ?3, ?4)",
                params![c.spec.name, json(&c.spec), c.source, c.updated_at_ms],
            )
                        .context("writing a job"),
        Write::Attempt(a) => execute_cached(tx,
                "INSERT OR REPLACE INTO attempts (task_id, run_id, attempt, worker, state, exit_code, error,
                                                  started_at, finished_at, late, output_tail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![a.task_id, a.run_id, a.attempt, a.worker, a.state.as_str(), a.exit_code, a.error,
                        a.started_at_ms, a.finished_at_ms, a.late, a.output_tail],
            )
            .context("writing an attempt"),
                Write::ResultAfterRunEnd(a) => execute_cached(tx,
                "INSERT OR IGNORE INTO attempts (task_id, run_id, attempt, worker, state, exit_code, error,
                                                 started_at, finished_at, late, output_tail)
                 SELECT ?1, run_id, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1, ?9 FROM tasks
                 WHERE task_id = ?1 AND ?2 <= attempt AND (attempt != ?2 OR worker IS NOT ?3)",
                params![a.task_id, a.attempt, a.worker, a.state.as_str(), a.exit_code, a.error,
                        a.started_at_ms, a.finished_at_ms, a.output_tail],
            )
            .context("recording a result that came after its run ended"),
        Write::Dead(d) => execute_cached(tx,
                "INSERT OR REPLACE INTO dead (task_id, run_id, step_id, job, worker, params, attempts, error,
                                              exit_code, failed_at, retried_as)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![d.task_id, d.run_id, d.step_id, d.job, d.worker, json(&d.params), d.attempts, d.error,
                        d.exit_code, d.failed_at_ms, d.retried_as],
            )
            .context("writing a dead task"),
        Write::Resource(w) => execute_cached(tx,
            "INSERT OR REPLACE INTO resources (name, written_at, expires_at, run_id, job)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![w.name, w.written_at_ms, w.expires_at_ms, w.run_id, w.job],
        )
        .context("writing a resource"),
        Write::ResourceCleared { name } => execute_cached(tx,
            "DELETE FROM resources WHERE name = ?1",
            params![name],
        )
        .context("clearing a resource"),
        Write::Edge(edge) => {
            let (kind, from, to) = match edge {
                Edge::Reads { resource, job } => ("reads", resource, job),
                Edge::Writes { job, resource } => ("writes", job, resource),
            };
            execute_cached(tx,
                "INSERT OR IGNORE INTO resource_edges (kind, from_node, to_node) VALUES (?1, ?2, ?3)",
                params![kind, from, to],
            )
            .context("writing a lineage edge")
        }
    }
    .map(|_| ())
}

const RUN_COLUMNS: &str = "runs.run_id, runs.job, runs.params, runs.state, runs.parent_runs, \
     runs.request_id, runs.created_at, runs.finished_at, runs.priority, runs.tags, runs.tracked, \
     runs.not_before, runs.depends_on, runs.reason, runs.notify";
const STEP_COLUMNS: &str =
    "step_id, run_id, job, delivery, state, origin_task, created_at, finished_at";
const TASK_COLUMNS: &str =
    "task_id, step_id, run_id, job, worker, state, attempt, exit_code, error, instance, \
                            created_at, started_at, finished_at, output_tail, failures, fanout, recorded_at";

fn run_from_row(row: &rusqlite::Row<'_>) -> Result<Run, StoreError> {
    let params: String = row.get(2)?;
    let state: String = row.get(3)?;
    let parents: String = row.get(4)?;
    Ok(Run {
        run_id: row.get(0)?,
        job: row.get(1)?,
        params: from_json(&params, "run params")?,
        state: parse_state(&state)?,
        parent_runs: from_json::<Vec<String>>(&parents, "parent runs")?
            .into_iter()
            .map(RunId::from)
            .collect(),
        request_id: row.get(5)?,
        created_at_ms: row.get(6)?,
        finished_at_ms: row.get(7)?,
        priority: row.get(8)?,
        tags: from_json(&row.get::<_, String>(9)?, "run tags")?,
        tracked: row.get(10)?,
        not_before_ms: row.get(11)?,
        depends_on: from_json::<Vec<String>>(&row.get::<_, String>(12)?, "run dependencies")?
            .into_iter()
            .map(RunId::from)
            .collect(),
        reason: row.get(13)?,
        notify: from_json(&row.get::<_, String>(14)?, "run notify targets")?,
    })
}

fn state_from_row(row: &rusqlite::Row<'_>) -> Result<(RunId, RunState), StoreError> {
    let state: String = row.get(1)?;
    Ok((row.get(0)?, parse_state(&state)?))
}

fn step_from_row(row: &rusqlite::Row<'_>) -> Result<Step, StoreError> {
    let delivery: String = row.get(3)?;
    let state: String = row.get(4)?;
    let delivery = parse_delivery(&delivery)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown delivery {delivery:?}")))?;
    let state: TaskState = parse_state(&state)?;
    Ok(Step {
        step_id: row.get(0)?,
        run_id: row.get(1)?,
        job: row.get(2)?,
        delivery,
        state,
        origin_task: row.get(5)?,
        created_at_ms: row.get(6)?,
        finished_at_ms: row.get(7)?,
    })
}

fn task_from_row(row: &rusqlite::Row<'_>) -> Result<Task, StoreError> {
    let state: String = row.get(5)?;
    let state: TaskState = parse_state(&state)?;
    Ok(Task {
        task_id: row.get(0)?,
        step_id: row.get(1)?,
        run_id: row.get(2)?,
        job: row.get(3)?,
        worker: row.get(4)?,
        state,
        attempt: row.get(6)?,
        exit_code: row.get(7)?,
        error: row.get(8)?,
        instance: row.get(9)?,
        created_at_ms: row.get(10)?,
        started_at_ms: row.get(11)?,
        finished_at_ms: row.get(12)?,
        output_tail: row.get(13)?,
        failures: row.get(14)?,
        fanout: row.get(15)?,
        recorded_at_ms: row.get(16)?,
    })
}

impl SqliteStore {
    fn select<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        map: fn(&rusqlite::Row<'_>) -> Result<T, StoreError>,
        what: &str,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).context(what)?;
        let mut rows = stmt.query(params).context(what)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().context(what)? {
            out.push(map(row)?);
        }
        Ok(out)
    }
}

impl Store for SqliteStore {
    fn apply(&mut self, writes: &[Write]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction().context("beginning a transaction")?;
        for write in writes {
            apply_one(&tx, write)?;
        }
        tx.commit().context("committing")
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        let active = UNFINISHED_RUNS;
        let runs = self.select(
            &format!("SELECT {RUN_COLUMNS} FROM runs WHERE {active} ORDER BY created_at, rowid"),
            [],
            run_from_row,
            "loading active runs",
        )?;
        let steps = self.select(
            &format!("SELECT {STEP_COLUMNS} FROM steps WHERE run_id IN (SELECT run_id FROM runs WHERE {active}) ORDER BY rowid"),
            [],
            step_from_row,
            "loading active steps",
        )?;
        let tasks = self.select(
            &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE run_id IN (SELECT run_id FROM runs WHERE {active}) ORDER BY rowid"),
            [],
            task_from_row,
            "loading active tasks",
        )?;
        let dependency_states = self.select(
            "SELECT run_id, state FROM runs WHERE run_id IN (
                SELECT d.value FROM runs AS held, json_each(held.depends_on) AS d
                WHERE held.state IN ('scheduled', 'waiting'))",
            [],
            state_from_row,
            "loading the states of the runs held runs depend on",
        )?;
        let workers = self.select(
            "SELECT name, instance, jobs, capabilities, slots, version, last_seen FROM workers",
            [],
            |row| {
                let jobs: String = row.get(2)?;
                let caps: String = row.get(3)?;
                let (jobs, capabilities) = (
                    from_json(&jobs, "worker jobs")?,
                    from_json(&caps, "capabilities")?,
                );
                Ok(Worker {
                    name: row.get(0)?,
                    instance: row.get(1)?,
                    jobs,
                    capabilities,
                    slots: row.get(4)?,
                    running: 0,
                    version: row.get(5)?,
                    last_seen_ms: row.get(6)?,
                    live: true,
                    leaving: false,
                    counters: Default::default(),
                })
            },
            "loading workers",
        )?;
        let catalog = self.select(
            "SELECT spec, source, updated_at FROM jobs",
            [],
            |row| {
                let spec: String = row.get(0)?;
                let spec: JobSpec = from_json(&spec, "job spec")?;
                Ok(CatalogEntry {
                    spec,
                    source: row.get(1)?,
                    updated_at_ms: row.get(2)?,
                })
            },
            "loading jobs",
        )?;
        let day_ago = jobz::now_ms() - TRIGGER_DEDUP_MS;
        let recent_requests = self.select(
            "SELECT request_id, run_id FROM runs WHERE created_at > ?1
             UNION ALL SELECT request_id, run_id FROM pruned_triggers WHERE created_at > ?1",
            [day_ago],
            |row| Ok((row.get(0)?, row.get(1)?)),
            "loading recent trigger ids",
        )?;
        let dead = self.select(
            "SELECT task_id, run_id, step_id, job, worker, params, attempts, error, exit_code, failed_at, retried_as
             FROM dead ORDER BY failed_at DESC LIMIT ?1",
            [LISTED_DEAD as i64],
            |row| {
                let params: String = row.get(5)?;
                let params = from_json(&params, "dead task params")?;
                Ok(Dead {
                    task_id: row.get(0)?,
                    run_id: row.get(1)?,
                    step_id: row.get(2)?,
                    job: row.get(3)?,
                    worker: row.get(4)?,
                    params,
                    attempts: row.get(6)?,
                    error: row.get(7)?,
                    exit_code: row.get(8)?,
                    failed_at_ms: row.get(9)?,
                    retried_as: row.get(10)?,
                })
            },
            "loading dead tasks",
        )?;
        let resources = self.select(
            "SELECT name, written_at, expires_at, run_id, job FROM resources ORDER BY name",
            [],
            |row| {
                Ok(Written {
                    name: row.get(0)?,
                    written_at_ms: row.get(1)?,
                    expires_at_ms: row.get(2)?,
                    run_id: row.get(3)?,
                    job: row.get(4)?,
                })
            },
            "loading resources",
        )?;
        let edges = self.select(
            "SELECT kind, from_node, to_node FROM resource_edges",
            [],
            |row| {
                let kind: String = row.get(0)?;
                let (from, to): (String, String) = (row.get(1)?, row.get(2)?);
                match kind.as_str() {
                    "reads" => Ok(Edge::Reads {
                        resource: from,
                        job: to,
                    }),
                    "writes" => Ok(Edge::Writes {
                        job: from,
                        resource: to,
                    }),
                    other => Err(StoreError::Corrupt(format!("lineage edge kind {other:?}"))),
                }
            },
            "loading lineage edges",
        )?;
        Ok(Snapshot {
            resources,
            edges,
            dead,
            dependency_states,
            runs,
            steps,
            tasks,
            workers,
            catalog,
            recent_requests,
        })
    }

    fn run(&self, run_id: &str) -> Result<Option<RunView>, StoreError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?1");
        let Some(run) = self
            .select(&sql, [run_id], run_from_row, "reading a run")?
            .pop()
        else {
            return Ok(None);
        };
        let tasks = self.select(
            &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE run_id = ?1 ORDER BY rowid"),
            [run_id],
            task_from_row,
            "reading a run's tasks",
        )?;
        let steps = self.select(
            &format!(
                "SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ?1 AND state IN ('pending', 'cancelled')
                 AND step_id NOT IN (SELECT step_id FROM tasks WHERE run_id = ?1) ORDER BY rowid"
            ),
            [run_id],
            step_from_row,
            "reading a run's steps without tasks",
        )?;
        let mut views: Vec<StepView> = tasks.iter().map(Task::view).collect();
        views.extend(steps.iter().map(Step::waiting_view));
        let attempts = self.select(
            "SELECT task_id, attempt, worker, state, exit_code, error, started_at, finished_at, late,
                    output_tail
             FROM attempts WHERE run_id = ?1 ORDER BY finished_at, rowid",
            [run_id],
            |row| {
                let state: String = row.get(3)?;
                let state: TaskState = parse_state(&state)?;
                Ok(AttemptView {
                    task_id: row.get(0)?,
                    attempt: row.get(1)?,
                    worker: row.get(2)?,
                    state,
                    exit_code: row.get(4)?,
                    error: row.get(5)?,
                    started_at_ms: row.get(6)?,
                    finished_at_ms: row.get(7)?,
                    late: row.get(8)?,
                    output_tail: row.get(9)?,
                })
            },
            "reading a run's attempts",
        )?;
        let waiting_for = if run.state.is_held() {
            self.select(
                // One no longer in the store was pruned after it succeeded (see
                // `Engine::restore`): nothing to wait for.
                "SELECT d.value FROM json_each(?1) AS d
                 WHERE EXISTS (SELECT 1 FROM runs WHERE run_id = d.value AND state != 'succeeded')",
                [parent_runs_json(&run.depends_on)],
                |row| Ok(row.get::<_, String>(0)?),
                "reading what a run waits for",
            )?
        } else {
            Vec::new()
        };
        let children = self.select(
            "SELECT run_parents.run_id FROM run_parents JOIN runs USING (run_id)
             WHERE run_parents.parent = ?1 ORDER BY runs.created_at, runs.rowid LIMIT 100",
            [run_id],
            |row| Ok(row.get::<_, String>(0)?),
            "reading the runs started from a run",
        )?;
        let mut view = run.view(views, attempts, waiting_for);
        view.child_runs = children;
        Ok(Some(view))
    }

    fn run_states(&self, run_ids: &[RunId]) -> Result<Vec<(RunId, RunState)>, StoreError> {
        let ids: Vec<&str> = run_ids.iter().map(RunId::as_str).collect();
        self.select(
            "SELECT run_id, state FROM runs WHERE run_id IN (SELECT value FROM json_each(?1))",
            [json(&ids)],
            state_from_row,
            "reading the states of runs",
        )
    }

    fn runs(&self, filter: &RunFilter) -> Result<Vec<RunView>, StoreError> {
        let limit = filter.limit.clamp(1, 1000) as i64;
        // `before` pages by the list's own order: (created_at, rowid) of the run named.
        let conditions = "(?1 IS NULL OR runs.job = ?1) AND (?2 IS NULL OR runs.state = ?2)
                          AND (?4 IS NULL OR runs.tracked = ?4)
                          AND (?6 IS NULL OR EXISTS (SELECT 1 FROM tasks
                               WHERE tasks.run_id = runs.run_id AND tasks.worker = ?6))
                          AND (?7 IS NULL OR (runs.created_at, runs.rowid) <
                               (SELECT created_at, rowid FROM runs WHERE run_id = ?7))
                          AND (?8 IS NULL OR runs.created_at >= ?8)
                          AND (?9 IS NULL OR runs.created_at < ?9)";
        // With a tag, the tag's own index leads: a rare tag must not walk every run.
        let sql = match filter.tag {
            None => format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE {conditions} AND ?5 IS NULL
                 ORDER BY runs.created_at DESC, runs.rowid DESC LIMIT ?3"
            ),
            Some(_) => format!(
                "SELECT {RUN_COLUMNS} FROM run_tags JOIN runs ON runs.run_id = run_tags.run_id
                 WHERE run_tags.tag = ?5 AND {conditions}
                 ORDER BY run_tags.created_at DESC, runs.rowid DESC LIMIT ?3"
            ),
        };
        let runs = self.select(
            &sql,
            params![
                filter.job,
                filter.state.map(|s| s.as_str()),
                limit,
                filter.tracked,
                filter.tag,
                filter.worker,
                filter.before,
                filter.since_ms,
                filter.until_ms
            ],
            run_from_row,
            "listing runs",
        )?;
        Ok(runs
            .into_iter()
            .map(|r| r.view(Vec::new(), Vec::new(), Vec::new()))
            .collect())
    }

    fn completions(
        &self,
        jobs: &[String],
        since_ms: i64,
        limit: u32,
    ) -> Result<Vec<Completion>, StoreError> {
        let tasks = self.select(
            &format!(
                "SELECT {TASK_COLUMNS} FROM tasks
                 WHERE job IN (SELECT value FROM json_each(?1)) AND recorded_at >= ?2
                   AND state IN ('succeeded', 'failed')
                 ORDER BY recorded_at, rowid LIMIT ?3"
            ),
            params![json(&jobs), since_ms, limit.clamp(1, 10_000)],
            task_from_row,
            "listing completions",
        )?;
        let mut params_of: std::collections::HashMap<RunId, Params> =
            std::collections::HashMap::new();
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            if !params_of.contains_key(&task.run_id) {
                let params: Option<String> = self
                    .conn
                    .query_row(
                        "SELECT params FROM runs WHERE run_id = ?1",
                        [&task.run_id],
                        |r| r.get(0),
                    )
                    .optional()
                    .context("reading a run's params")?;
                let params = match params {
                    Some(p) => from_json(&p, "run params")?,
                    None => Params::new(),
                };
                params_of.insert(task.run_id.clone(), params);
            }
            let params = params_of.get(&task.run_id).cloned().unwrap_or_default();
            out.push(task.completion(params));
        }
        Ok(out)
    }

    fn prune(&mut self, retention: &Retention, now_ms: i64) -> Result<Pruned, StoreError> {
        self.prune_batch(retention, now_ms)
    }

    fn job_stats(&self, job: &str, since_ms: i64) -> Result<Vec<JobDayStats>, StoreError> {
        stats::job_stats(&self.conn, job, since_ms)
    }

    fn pending_notices(&self) -> Result<Vec<Notice>, StoreError> {
        notices::pending(&self.conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobz::jobfile::Delivery;

    pub(super) fn run(id: &str, state: RunState, created: i64) -> Run {
        Run::new(
            id.into(),
            "a",
            [("date".to_string(), "2026_11_23".to_string())].into(),
            state,
            format!("req-{id}"),
            created,
        )
    }

    /// The ids of the runs `filter` lists, in order.
    fn listed(store: &SqliteStore, filter: &RunFilter) -> Vec<String> {
        let runs = store.runs(filter).unwrap();
        runs.into_iter().map(|r| r.run_id).collect()
    }

    pub(super) fn step(id: &str, run: &str, state: TaskState) -> Step {
        Step {
            step_id: id.into(),
            run_id: run.into(),
            job: "a".into(),
            delivery: Delivery::Broadcast,
            state,
            origin_task: None,
            created_at_ms: 1,
            finished_at_ms: None,
        }
    }

    pub(super) fn task(id: &str, step: &str, run: &str) -> Task {
        Task {
            task_id: id.into(),
            step_id: step.into(),
            run_id: run.into(),
            job: "a".into(),
            worker: Some("w1".into()),
            state: TaskState::Running,
            attempt: 1,
            exit_code: None,
            error: None,
            instance: Some("i".into()),
            created_at_ms: 1,
            started_at_ms: Some(2),
            finished_at_ms: None,
            recorded_at_ms: None,
            output_tail: String::new(),
            failures: 0,
            fanout: 1,
        }
    }

    #[test]
    fn writes_are_upserts_and_load_returns_only_active_runs() {
        let mut store = SqliteStore::in_memory().unwrap();
        let now = jobz::now_ms();
        store
            .apply(&[
                Write::Run(run("r1", RunState::Running, now)),
                Write::Step(step("s1", "r1", TaskState::Running)),
                Write::Task(task("t1", "s1", "r1")),
                Write::Run(run("r2", RunState::Running, now + 1)),
            ])
            .unwrap();
        let mut done = run("r2", RunState::Succeeded, now + 1);
        done.finished_at_ms = Some(now + 5);
        store.apply(&[Write::Run(done)]).unwrap();

        let snap = store.load().unwrap();
        assert_eq!(snap.runs.len(), 1);
        assert_eq!(snap.runs[0].run_id, "r1");
        assert_eq!(snap.steps.len(), 1);
        assert_eq!(snap.tasks.len(), 1);
        assert_eq!(snap.recent_requests.len(), 2);

        let view = store.run("r1").unwrap().unwrap();
        assert_eq!(view.steps.len(), 1);
        assert_eq!(view.params["date"], "2026_11_23");
        assert!(store.run("nope").unwrap().is_none());

        let all = store
            .runs(&RunFilter {
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            all.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(),
            vec!["r2", "r1"]
        );
        let ok = store
            .runs(&RunFilter {
                limit: 10,
                state: Some(RunState::Succeeded),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(ok.len(), 1);
    }

    #[test]
    fn completions_list_finished_tasks_of_the_jobs_since_a_time() {
        let mut store = SqliteStore::in_memory().unwrap();
        let mut done = task("t1", "s1", "r1");
        done.state = TaskState::Succeeded;
        done.finished_at_ms = Some(100);
        done.recorded_at_ms = Some(100);
        let mut later = task("t2", "s1", "r1");
        later.state = TaskState::Failed;
        later.finished_at_ms = Some(5); // the worker's clock may be anything
        later.recorded_at_ms = Some(200);
        let running = task("t3", "s1", "r1");
        store
            .apply(&[
                Write::Run(run("r1", RunState::Running, 1)),
                Write::Task(done),
                Write::Task(later),
                Write::Task(running),
            ])
            .unwrap();
        let all = store.completions(&["a".into()], 0, 100).unwrap();
        assert_eq!(
            all.iter()
                .map(|c| c.task.task_id.as_str())
                .collect::<Vec<_>>(),
            vec!["t1", "t2"]
        );
        assert_eq!(all[0].params["date"], "2026_11_23");
        assert_eq!(store.completions(&["a".into()], 150, 100).unwrap().len(), 1);
        assert!(store
            .completions(&["other".into()], 0, 100)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_second_store_on_the_same_state_directory_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let first = SqliteStore::open(dir.path()).unwrap();
        let Err(refused) = SqliteStore::open(dir.path()) else {
            panic!("two stores opened one state directory");
        };
        let text = refused.to_string();
        assert!(text.contains("in use by another broker"), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        drop(first);
        SqliteStore::open(dir.path()).unwrap();
    }

    /// A store opened on a database that `sql` made, in a directory of its own.
    fn opened_from(sql: &str) -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("broker.sqlite3")).unwrap();
        conn.execute_batch(sql).unwrap();
        drop(conn);
        let store = SqliteStore::open(dir.path()).unwrap();
        (dir, store)
    }

    fn schema_version(store: &SqliteStore) -> i64 {
        store
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_version_1_database_is_migrated_and_its_run_resumes() {
        let (dir, mut store) = opened_from(include_str!("../tests/data/schema-v1.sql"));
        let snap = store.load().unwrap();
        assert_eq!(snap.runs.len(), 1);
        assert_eq!(snap.tasks.len(), 1);
        assert_eq!(snap.tasks[0].failures, 0);
        assert_eq!(snap.workers.len(), 1);
        // And it takes version-2 writes.
        let mut t = snap.tasks[0].clone();
        t.state = TaskState::Succeeded;
        t.recorded_at_ms = Some(5000);
        store.apply(&[Write::Task(t)]).unwrap();
        assert_eq!(store.completions(&["a".into()], 0, 10).unwrap().len(), 1);
        assert_eq!(schema_version(&store), SCHEMA_VERSION);
        drop(store);
        SqliteStore::open(dir.path()).unwrap(); // opening again is a no-op
    }

    #[test]
    fn a_result_after_the_run_ended_is_recorded_late_unless_it_is_the_current_attempt() {
        let mut store = SqliteStore::in_memory().unwrap();
        let mut current = task("t1", "s1", "r1");
        current.attempt = 2;
        current.worker = Some("w2".into());
        current.state = TaskState::Succeeded;
        store
            .apply(&[
                Write::Run(run("r1", RunState::Succeeded, 1)),
                Write::Task(current),
            ])
            .unwrap();
        let result = |attempt: u32, worker: &str| Attempt {
            task_id: "t1".into(),
            run_id: "".into(),
            attempt,
            worker: Some(worker.into()),
            state: TaskState::Succeeded,
            exit_code: Some(0),
            error: None,
            started_at_ms: Some(1),
            finished_at_ms: 2,
            late: true,
            output_tail: "late output\n".into(),
        };
        store
            .apply(&[Write::ResultAfterRunEnd(result(2, "w2"))])
            .unwrap(); // a duplicate
        store
            .apply(&[Write::ResultAfterRunEnd(result(1, "w1"))])
            .unwrap(); // late
        store
            .apply(&[Write::ResultAfterRunEnd(Attempt {
                task_id: "nope".into(),
                ..result(1, "w1")
            })])
            .unwrap();
        // An attempt that was never made is not history: a worker cannot fill the table
        // with made-up attempt numbers.
        for attempt in [3, 4, u32::MAX] {
            store
                .apply(&[Write::ResultAfterRunEnd(result(attempt, "w3"))])
                .unwrap();
        }
        let view = store.run("r1").unwrap().unwrap();
        assert_eq!(view.attempts.len(), 1, "{:?}", view.attempts);
        assert_eq!((view.attempts[0].attempt, view.attempts[0].late), (1, true));
        assert_eq!(view.attempts[0].output_tail, "late output\n");
    }

    #[test]
    fn reopening_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = SqliteStore::open(dir.path()).unwrap();
            store
                .apply(&[Write::Run(run("r1", RunState::Pending, jobz::now_ms()))])
                .unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap().runs.len(), 1);
    }

    #[test]
    fn a_version_2_database_is_migrated_and_its_runs_take_their_jobs_tags() {
        let (dir, mut store) = opened_from(include_str!("../tests/data/schema-v2.sql"));
        let snap = store.load().unwrap();
        assert_eq!(snap.runs.len(), 1);
        assert_eq!(snap.runs[0].priority, 0);
        assert_eq!(snap.runs[0].tags, ["etl", "nightly"]);
        let tagged = |store: &SqliteStore, tag: &str| {
            let filter = RunFilter {
                limit: 10,
                tag: Some(tag.into()),
                ..Default::default()
            };
            listed(store, &filter)
        };
        assert_eq!(tagged(&store, "nightly"), ["r1", "r0"], "finished runs too");
        assert!(tagged(&store, "web").is_empty());
        // And it takes version-3 writes.
        let mut new = run("r2", RunState::Scheduled, 2000);
        new.tags = vec!["web".into()];
        new.not_before_ms = Some(5000);
        store.apply(&[Write::Run(new)]).unwrap();
        assert_eq!(tagged(&store, "web"), ["r2"]);
        assert_eq!(schema_version(&store), SCHEMA_VERSION);
        drop(store);
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(
            store.load().unwrap().runs.len(),
            2,
            "r1 and the scheduled r2"
        );
    }

    #[test]
    fn held_and_cancelling_runs_are_unfinished_and_their_dependencies_are_loaded() {
        let mut store = SqliteStore::in_memory().unwrap();
        let mut done = run("dep-done", RunState::Succeeded, 1);
        done.finished_at_ms = Some(2);
        let dep_active = run("dep-active", RunState::Running, 2);
        let mut waiting = run("waiting", RunState::Waiting, 3);
        waiting.depends_on = vec!["dep-done".into(), "dep-active".into(), "gone".into()];
        let mut scheduled = run("scheduled", RunState::Scheduled, 4);
        scheduled.not_before_ms = Some(99);
        let cancelling = run("cancelling", RunState::Cancelled, 5);
        let mut cancelled = run("cancelled", RunState::Cancelled, 6);
        cancelled.finished_at_ms = Some(7);
        cancelled.reason = Some("cancelled through frontend:f".into());
        store
            .apply(&[
                Write::Run(done),
                Write::Run(dep_active),
                Write::Run(waiting),
                Write::Run(scheduled),
                Write::Run(cancelling),
                Write::Run(cancelled),
            ])
            .unwrap();
        let snap = store.load().unwrap();
        let ids: Vec<&str> = snap.runs.iter().map(|r| r.run_id.as_str()).collect();
        assert_eq!(ids, ["dep-active", "waiting", "scheduled", "cancelling"]);
        let mut states = snap.dependency_states.clone();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            states,
            [
                (RunId::from("dep-active"), RunState::Running),
                (RunId::from("dep-done"), RunState::Succeeded)
            ]
        );
        let view = store.run("waiting").unwrap().unwrap();
        assert_eq!(view.depends_on, ["dep-done", "dep-active", "gone"]);
        assert_eq!(
            view.waiting_for,
            ["dep-active"],
            "gone: pruned after it succeeded"
        );
        let view = store.run("cancelled").unwrap().unwrap();
        assert_eq!(view.reason.as_deref(), Some("cancelled through frontend:f"));
        assert!(view.waiting_for.is_empty());
        let mut known = store
            .run_states(&["dep-done".into(), "nope".into(), "waiting".into()])
            .unwrap();
        known.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            known,
            [
                (RunId::from("dep-done"), RunState::Succeeded),
                (RunId::from("waiting"), RunState::Waiting)
            ]
        );
    }

    #[test]
    fn a_run_lists_the_runs_that_name_it_as_a_parent() {
        let mut store = SqliteStore::in_memory().unwrap();
        let mut child = run("c1", RunState::Pending, 5);
        child.parent_runs = vec!["p1".into(), "p2".into()];
        let mut later = run("c2", RunState::Pending, 6);
        later.parent_runs = vec!["p1".into()];
        store
            .apply(&[
                Write::Run(run("p1", RunState::Succeeded, 1)),
                Write::Run(run("p2", RunState::Succeeded, 2)),
                Write::Run(child.clone()),
                Write::Run(later),
                // Rewritten: listed once.
                Write::Run(child),
            ])
            .unwrap();
        let children = |id: &str| store.run(id).unwrap().unwrap().child_runs;
        assert_eq!(children("p1"), ["c1", "c2"]);
        assert_eq!(children("p2"), ["c1"]);
        assert!(children("c1").is_empty());
        // A pruned child is no longer listed.
        store
            .conn
            .execute("DELETE FROM runs WHERE run_id = 'c1'", [])
            .unwrap();
        assert_eq!(children("p1"), ["c2"]);
    }

    #[test]
    fn runs_are_paged_and_filtered_by_worker_and_time() {
        let mut store = SqliteStore::in_memory().unwrap();
        let mut writes = Vec::new();
        // Two runs share each millisecond: paging must neither skip nor repeat one.
        for i in 0..10 {
            let id = format!("r{i}");
            writes.push(Write::Run(run(&id, RunState::Succeeded, 100 + i / 2)));
            let mut t = task(&format!("t{i}"), &format!("s{i}"), &id);
            t.worker = Some(if i % 3 == 0 { "w3" } else { "w1" }.into());
            writes.push(Write::Task(t));
        }
        store.apply(&writes).unwrap();
        let list = |filter: RunFilter| listed(&store, &RunFilter { limit: 4, ..filter });
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = list(RunFilter {
                before: before.clone(),
                ..Default::default()
            });
            if page.is_empty() {
                break;
            }
            before = page.last().cloned();
            seen.extend(page);
        }
        assert_eq!(
            seen,
            ["r9", "r8", "r7", "r6", "r5", "r4", "r3", "r2", "r1", "r0"]
        );
        let w3 = RunFilter {
            worker: Some("w3".into()),
            ..Default::default()
        };
        assert_eq!(list(w3), ["r9", "r6", "r3", "r0"]);
        let window = RunFilter {
            since_ms: Some(101),
            until_ms: Some(103),
            ..Default::default()
        };
        assert_eq!(list(window), ["r5", "r4", "r3", "r2"]);
        let unknown = RunFilter {
            before: Some("nope".into()),
            ..Default::default()
        };
        assert!(list(unknown).is_empty());
    }

    #[test]
    fn runs_are_listed_by_tag_and_by_tracked_and_a_run_is_tracked_in_place() {
        let mut store = SqliteStore::in_memory().unwrap();
        let mut writes = Vec::new();
        for i in 0..6 {
            let mut r = run(&format!("r{i}"), RunState::Succeeded, i);
            r.tags = match i % 3 {
                0 => vec!["a".into()],
                1 => vec!["a".into(), "b".into()],
                _ => vec![],
            };
            r.tracked = i == 4;
            writes.push(Write::Run(r));
        }
        store.apply(&writes).unwrap();
        store
            .apply(&[
                Write::Tracked {
                    run_id: "r1".into(),
                    tracked: true,
                },
                Write::Tracked {
                    run_id: "nope".into(),
                    tracked: true,
                },
            ])
            .unwrap();
        // The runs listed with a tag and a tracked filter.
        let list = |store: &SqliteStore, tag: Option<&str>, tracked: Option<bool>| {
            let filter = RunFilter {
                limit: 10,
                tag: tag.map(str::to_owned),
                tracked,
                ..Default::default()
            };
            listed(store, &filter)
        };
        assert_eq!(list(&store, Some("a"), None), ["r4", "r3", "r1", "r0"]);
        assert_eq!(list(&store, Some("b"), None), ["r4", "r1"]);
        assert_eq!(list(&store, None, Some(true)), ["r4", "r1"]);
        assert_eq!(list(&store, Some("b"), Some(true)), ["r4", "r1"]);
        assert_eq!(list(&store, Some("a"), Some(false)), ["r3", "r0"]);
        assert_eq!(list(&store, None, Some(false)).len(), 4);
        // Rewriting a run keeps its tag rows once.
        let mut again = run("r0", RunState::Succeeded, 0);
        again.tags = vec!["a".into()];
        store.apply(&[Write::Run(again)]).unwrap();
        assert_eq!(list(&store, Some("a"), None).len(), 4);
        // Deleting a run (as pruning does) takes its tags with it.
        store
            .conn
            .execute("DELETE FROM runs WHERE run_id = 'r1'", [])
            .unwrap();
        let rows: i64 = store
            .conn
            .query_row(
                "SELECT count(*) FROM run_tags WHERE run_id = 'r1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows, 0);
    }
}
