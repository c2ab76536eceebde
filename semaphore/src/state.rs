//! The durable barrier state: SQLite in WAL mode with `synchronous = FULL` under `--state`.
//!
//! Tables: `barriers` (one row per semaphore and key), `counted` (the completions each
//! barrier has seen; the primary key (semaphore, key, job, run, worker) is what makes a
//! replayed completion count once even across restarts), `triggers` (the jobs a closed
//! barrier starts, with the run the broker gave each), `meta` (the catch-up high-water
//! mark), `schedules` (each schedule's mark: every slot up to it is decided) and
//! `schedule_fires` (slots decided to fire, with the run each started). The schema version
//! is `PRAGMA user_version`; version 1 (barriers only) is upgraded in place.
//!
//! The database is opened in exclusive locking mode: a second `jobz-semaphore` pointed at
//! the same `--state` fails at start instead of sharing it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use jobz::message::{Params, TaskState};
use rusqlite::{params, Connection, OptionalExtension};

use crate::barrier::{
    Action, Barrier, BarrierId, BarrierState, Barriers, Counted, Trigger, TriggerKind,
};
use crate::schedule::{Fire, ScheduleAction};

/// Version of the schema this build writes.
const SCHEMA_VERSION: i64 = 2;

/// The semaphore's database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) `<dir>/semaphore.sqlite3` and takes its lock.
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
        let path = dir.join("semaphore.sqlite3");
        let conn =
            Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let store = Store { conn };
        store
            .init()
            .with_context(|| format!("initialising {}", path.display()))
            .map_err(lock_hint)?;
        Ok(store)
    }

    /// An in-memory store, for tests.
    pub fn in_memory() -> anyhow::Result<Store> {
        let store = Store {
            conn: Connection::open_in_memory().context("opening an in-memory database")?,
        };
        store.init()?;
        Ok(store)
    }

    fn init(&self) -> anyhow::Result<()> {
        self.conn
            .execute_batch(
                "PRAGMA busy_timeout = 1000;
                 PRAGMA locking_mode = EXCLUSIVE;
                 PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;",
            )
            .context("setting pragmas")?;
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .context("reading the schema version")?;
        if version > SCHEMA_VERSION {
            bail!("the state was written by a newer jobz-semaphore (schema {version}, this build knows {SCHEMA_VERSION})");
        }
        if version < 1 {
            self.conn
                .execute_batch(
                    "BEGIN;
                     CREATE TABLE IF NOT EXISTS barriers (
                        semaphore TEXT NOT NULL, key TEXT NOT NULL, params TEXT NOT NULL,
                        state TEXT NOT NULL, opened_at INTEGER NOT NULL, closed_at INTEGER,
                        PRIMARY KEY (semaphore, key));
                     CREATE TABLE IF NOT EXISTS counted (
                        semaphore TEXT NOT NULL, key TEXT NOT NULL, job TEXT NOT NULL,
                        run_id TEXT NOT NULL, worker TEXT NOT NULL, task_id TEXT NOT NULL,
                        state TEXT NOT NULL, fanout INTEGER NOT NULL, finished_at INTEGER NOT NULL,
                        PRIMARY KEY (semaphore, key, job, run_id, worker));
                     CREATE TABLE IF NOT EXISTS triggers (
                        id TEXT PRIMARY KEY, semaphore TEXT NOT NULL, key TEXT NOT NULL,
                        kind TEXT NOT NULL, job TEXT NOT NULL, params TEXT NOT NULL,
                        parent_runs TEXT NOT NULL, run_id TEXT);
                     CREATE INDEX IF NOT EXISTS triggers_by_barrier ON triggers (semaphore, key);
                     CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
                     PRAGMA user_version = 1;
                     COMMIT;",
                )
                .context("creating the schema")?;
        }
        if version < 2 {
            self.conn
                .execute_batch(
                    "BEGIN;
                     CREATE TABLE IF NOT EXISTS schedules (
                        name TEXT PRIMARY KEY, mark INTEGER NOT NULL);
                     CREATE TABLE IF NOT EXISTS schedule_fires (
                        id TEXT PRIMARY KEY, schedule TEXT NOT NULL, slot INTEGER NOT NULL,
                        job TEXT NOT NULL, params TEXT NOT NULL, run_id TEXT);
                     PRAGMA user_version = 2;
                     COMMIT;",
                )
                .context("adding the schedule tables")?;
        } else {
            // Take the exclusive lock now, so a second process fails at start.
            self.conn
                .execute_batch("BEGIN IMMEDIATE; COMMIT;")
                .context("locking the state")?;
        }
        Ok(())
    }

    /// Every barrier, as last stored.
    pub fn load(&self) -> anyhow::Result<Vec<Barrier>> {
        let mut barriers: BTreeMap<BarrierId, Barrier> = BTreeMap::new();
        let mut stmt = self
            .conn
            .prepare("SELECT semaphore, key, params, state, opened_at, closed_at FROM barriers")
            .context("reading barriers")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                ))
            })
            .context("reading barriers")?;
        for row in rows {
            let (semaphore, key, params, state, opened_at_ms, closed_at_ms) =
                row.context("reading a barrier")?;
            let id = BarrierId { semaphore, key };
            let params: Params = serde_json::from_str(&params)
                .with_context(|| format!("barrier {id}: bad params"))?;
            let state = BarrierState::parse(&state)
                .with_context(|| format!("barrier {id}: unknown state {state:?}"))?;
            barriers.insert(
                id.clone(),
                Barrier {
                    id,
                    params,
                    state,
                    opened_at_ms,
                    closed_at_ms,
                    counted: BTreeMap::new(),
                    triggers: Vec::new(),
                },
            );
        }
        let mut stmt = self
            .conn
            .prepare(
                "SELECT semaphore, key, job, run_id, worker, task_id, state, fanout, finished_at
                 FROM counted",
            )
            .context("reading counted completions")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    BarrierId {
                        semaphore: r.get(0)?,
                        key: r.get(1)?,
                    },
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, u32>(7)?,
                    r.get::<_, i64>(8)?,
                ))
            })
            .context("reading counted completions")?;
        for row in rows {
            let (id, job, run_id, worker, task_id, state, fanout, finished_at_ms) =
                row.context("reading a counted completion")?;
            let state: TaskState = state
                .parse()
                .map_err(|e: String| anyhow::anyhow!("barrier {id}: {e}"))?;
            let Some(barrier) = barriers.get_mut(&id) else {
                continue; // orphan row: its barrier was removed
            };
            let counted = Counted {
                job,
                run_id,
                worker,
                task_id,
                state,
                fanout,
                finished_at_ms,
            };
            barrier.counted.insert(counted.identity(), counted);
        }
        let mut stmt = self
            .conn
            .prepare(
                "SELECT semaphore, key, id, kind, job, params, parent_runs, run_id FROM triggers
                 ORDER BY rowid",
            )
            .context("reading triggers")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    BarrierId {
                        semaphore: r.get(0)?,
                        key: r.get(1)?,
                    },
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, Option<String>>(7)?,
                ))
            })
            .context("reading triggers")?;
        for row in rows {
            let (bid, id, kind, job, params, parent_runs, run_id) =
                row.context("reading a trigger")?;
            let kind = TriggerKind::parse(&kind)
                .with_context(|| format!("trigger {id}: unknown kind {kind:?}"))?;
            let params: Params = serde_json::from_str(&params)
                .with_context(|| format!("trigger {id}: bad params"))?;
            let parent_runs: Vec<String> = serde_json::from_str(&parent_runs)
                .with_context(|| format!("trigger {id}: bad parent runs"))?;
            let Some(barrier) = barriers.get_mut(&bid) else {
                continue;
            };
            barrier.triggers.push(Trigger {
                id,
                kind,
                job,
                params,
                parent_runs,
                run_id,
            });
        }
        Ok(barriers.into_values().collect())
    }

    /// Every schedule's mark and every fire kept, as last stored.
    pub fn load_schedules(&self) -> anyhow::Result<(BTreeMap<String, i64>, Vec<Fire>)> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, mark FROM schedules")
            .context("reading schedule marks")?;
        let marks = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .context("reading schedule marks")?
            .collect::<Result<BTreeMap<_, _>, _>>()
            .context("reading a schedule mark")?;
        let mut stmt = self
            .conn
            .prepare("SELECT id, schedule, slot, job, params, run_id FROM schedule_fires")
            .context("reading schedule fires")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })
            .context("reading schedule fires")?;
        let mut fires = Vec::new();
        for row in rows {
            let (id, schedule, slot_ms, job, params, run_id) =
                row.context("reading a schedule fire")?;
            let params: Params = serde_json::from_str(&params)
                .with_context(|| format!("schedule fire {id}: bad params"))?;
            fires.push(Fire {
                id,
                schedule,
                slot_ms,
                job,
                params,
                run_id,
            });
        }
        Ok((marks, fires))
    }

    /// The catch-up high-water mark (ms since the epoch), if one was stored.
    pub fn high_water(&self) -> anyhow::Result<Option<i64>> {
        self.conn
            .query_row(
                "SELECT value FROM meta WHERE name = 'high_water'",
                [],
                |r| r.get(0),
            )
            .optional()
            .context("reading the high-water mark")
    }

    /// Makes `actions`, `schedule_actions` and the high-water mark durable, in one
    /// transaction.
    pub fn apply(
        &mut self,
        barriers: &Barriers,
        actions: &[Action],
        schedule_actions: &[ScheduleAction],
        high_water: Option<i64>,
    ) -> anyhow::Result<()> {
        let tx = self.conn.transaction().context("starting a transaction")?;
        for action in schedule_actions {
            apply_schedule_action(&tx, action)?;
        }
        for action in actions {
            match action {
                Action::Save { barrier, counted } => {
                    let Some(b) = barriers.get(barrier) else {
                        continue;
                    };
                    tx.execute(
                        "INSERT INTO barriers (semaphore, key, params, state, opened_at, closed_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (semaphore, key) DO UPDATE SET params = excluded.params,
                           state = excluded.state, opened_at = excluded.opened_at,
                           closed_at = excluded.closed_at",
                        params![
                            b.id.semaphore,
                            b.id.key,
                            json(&b.params),
                            b.state.as_str(),
                            b.opened_at_ms,
                            b.closed_at_ms
                        ],
                    )
                    .with_context(|| format!("saving barrier {}", b.id))?;
                    if let Some(c) = counted {
                        tx.execute(
                            "INSERT OR IGNORE INTO counted (semaphore, key, job, run_id, worker,
                               task_id, state, fanout, finished_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                            params![
                                b.id.semaphore,
                                b.id.key,
                                c.job,
                                c.run_id,
                                c.worker,
                                c.task_id,
                                c.state.as_str(),
                                c.fanout,
                                c.finished_at_ms
                            ],
                        )
                        .with_context(|| format!("saving a completion of barrier {}", b.id))?;
                    }
                    for t in &b.triggers {
                        tx.execute(
                            "INSERT INTO triggers (id, semaphore, key, kind, job, params,
                               parent_runs, run_id)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                             ON CONFLICT (id) DO UPDATE SET run_id = excluded.run_id",
                            params![
                                t.id,
                                b.id.semaphore,
                                b.id.key,
                                t.kind.as_str(),
                                t.job,
                                json(&t.params),
                                json(&t.parent_runs),
                                t.run_id
                            ],
                        )
                        .with_context(|| format!("saving a trigger of barrier {}", b.id))?;
                    }
                }
                Action::Remove(id) => {
                    for table in ["barriers", "counted", "triggers"] {
                        tx.execute(
                            &format!("DELETE FROM {table} WHERE semaphore = ?1 AND key = ?2"),
                            params![id.semaphore, id.key],
                        )
                        .with_context(|| format!("removing barrier {id}"))?;
                    }
                }
            }
        }
        if let Some(mark) = high_water {
            tx.execute(
                "INSERT INTO meta (name, value) VALUES ('high_water', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                [mark],
            )
            .context("saving the high-water mark")?;
        }
        tx.commit().context("committing the barrier state")
    }
}

fn apply_schedule_action(
    tx: &rusqlite::Transaction,
    action: &ScheduleAction,
) -> anyhow::Result<()> {
    match action {
        ScheduleAction::Mark { schedule, mark_ms } => tx
            .execute(
                "INSERT INTO schedules (name, mark) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET mark = excluded.mark",
                params![schedule, mark_ms],
            )
            .with_context(|| format!("saving the mark of schedule {schedule}"))?,
        ScheduleAction::Unmark { schedule } => tx
            .execute("DELETE FROM schedules WHERE name = ?1", params![schedule])
            .with_context(|| format!("forgetting schedule {schedule}"))?,
        ScheduleAction::Fire(f) => tx
            .execute(
                "INSERT INTO schedule_fires (id, schedule, slot, job, params, run_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (id) DO UPDATE SET run_id = excluded.run_id",
                params![
                    f.id,
                    f.schedule,
                    f.slot_ms,
                    f.job,
                    json(&f.params),
                    f.run_id
                ],
            )
            .with_context(|| format!("saving schedule fire {}", f.id))?,
        ScheduleAction::Accepted { id, run_id } => tx
            .execute(
                "UPDATE schedule_fires SET run_id = ?2 WHERE id = ?1",
                params![id, run_id],
            )
            .with_context(|| format!("saving the run of schedule fire {id}"))?,
        ScheduleAction::Forget { id } => tx
            .execute("DELETE FROM schedule_fires WHERE id = ?1", params![id])
            .with_context(|| format!("forgetting schedule fire {id}"))?,
    };
    Ok(())
}

fn json<T: serde::Serialize>(value: &T) -> String {
    // Maps and lists of strings always serialise.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// "database is locked" means another process holds this state directory.
fn lock_hint(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("locked") || text.contains("busy") {
        e.context("another jobz-semaphore is using this --state directory")
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobz::jobfile::{SemaphoreSpec, WaitFor};
    use jobz::message::{Completion, TaskRef};

    fn spec() -> BTreeMap<String, SemaphoreSpec> {
        let s = SemaphoreSpec {
            name: "s".into(),
            wait_for: vec![WaitFor {
                job: "s4".into(),
                count: Some(2),
            }],
            key: "{date}".into(),
            then: vec!["publish".into(), "notify".into()],
            timeout_ms: None,
            on_timeout: vec![],
            on_failure: vec![],
            count_failures: false,
        };
        [("s".to_string(), s)].into()
    }

    fn done(run: &str, worker: &str) -> Completion {
        Completion {
            run_id: run.into(),
            step_id: "st".into(),
            task: TaskRef {
                task_id: format!("t-{worker}"),
                attempt: 1,
            },
            job: "s4".into(),
            worker: worker.into(),
            params: [("date".to_string(), "d1".to_string())].into(),
            state: TaskState::Succeeded,
            finished_at_ms: 1_800_000_000_000,
            fanout: 2,
        }
    }

    #[test]
    fn barriers_round_trip_through_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_800_000_000_000;
        let mut b = Barriers::default();
        b.set_specs(&spec(), now);
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.high_water().unwrap(), None);
        let actions = b.on_completion(&done("r1", "w1"), now);
        store.apply(&b, &actions, &[], Some(now)).unwrap();
        // A replay is a no-op, and a no-op writes nothing.
        assert!(b.on_completion(&done("r1", "w1"), now).is_empty());
        let actions = b.on_completion(&done("r1", "w2"), now);
        store.apply(&b, &actions, &[], None).unwrap();
        let tid = b.pending_triggers().next().unwrap().1.id.clone();
        let accepted = b.on_accepted(&tid, "run-7").unwrap();
        store.apply(&b, &[accepted], &[], Some(now + 5)).unwrap();
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.high_water().unwrap(), Some(now + 5));
        let loaded = store.load().unwrap();
        let original: Vec<Barrier> = b.iter().cloned().collect();
        assert_eq!(loaded, original);
        assert_eq!(loaded[0].triggers.len(), 2);
        assert_eq!(loaded[0].triggers[0].run_id.as_deref(), Some("run-7"));
        assert_eq!(loaded[0].counted.len(), 2);

        let mut restored = Barriers::restore(loaded);
        restored.set_specs(&spec(), now);
        let pending: Vec<String> = restored
            .pending_triggers()
            .map(|(_, t)| t.job.clone())
            .collect();
        assert_eq!(pending, vec!["notify".to_string()]);
    }

    #[test]
    fn removed_barriers_are_gone_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_800_000_000_000;
        let mut b = Barriers::default();
        b.set_specs(&spec(), now);
        let mut store = Store::open(dir.path()).unwrap();
        let actions = b.on_completion(&done("r1", "w1"), now);
        store.apply(&b, &actions, &[], None).unwrap();
        let id = BarrierId {
            semaphore: "s".into(),
            key: "d1".into(),
        };
        store.apply(&b, &[Action::Remove(id)], &[], None).unwrap();
        drop(store);
        assert!(Store::open(dir.path()).unwrap().load().unwrap().is_empty());
    }

    #[test]
    fn a_second_process_cannot_open_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = match Store::open(dir.path()) {
            Ok(_) => panic!("a second store opened the same state"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("another jobz-semaphore"), "{err}");
    }

    #[test]
    fn schedule_marks_and_fires_round_trip_and_version_1_state_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        // A state written before schedules existed.
        {
            let conn = Connection::open(dir.path().join("semaphore.sqlite3")).unwrap();
            conn.execute_batch(
                "CREATE TABLE barriers (semaphore TEXT NOT NULL, key TEXT NOT NULL,
                   params TEXT NOT NULL, state TEXT NOT NULL, opened_at INTEGER NOT NULL,
                   closed_at INTEGER, PRIMARY KEY (semaphore, key));
                 CREATE TABLE counted (semaphore TEXT NOT NULL, key TEXT NOT NULL,
                   job TEXT NOT NULL, run_id TEXT NOT NULL, worker TEXT NOT NULL,
                   task_id TEXT NOT NULL, state TEXT NOT NULL, fanout INTEGER NOT NULL,
                   finished_at INTEGER NOT NULL, PRIMARY KEY (semaphore, key, job, run_id, worker));
                 CREATE TABLE triggers (id TEXT PRIMARY KEY, semaphore TEXT NOT NULL,
                   key TEXT NOT NULL, kind TEXT NOT NULL, job TEXT NOT NULL, params TEXT NOT NULL,
                   parent_runs TEXT NOT NULL, run_id TEXT);
                 CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO meta VALUES ('high_water', 42);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.high_water().unwrap(), Some(42));
        let fire = |id: &str, slot_ms| Fire {
            id: id.into(),
            schedule: "tick".into(),
            slot_ms,
            job: "ledger".into(),
            params: [("slot".to_string(), slot_ms.to_string())].into(),
            run_id: None,
        };
        let actions = [
            ScheduleAction::Mark {
                schedule: "tick".into(),
                mark_ms: 5000,
            },
            ScheduleAction::Fire(fire("sch-tick-2", 2000)),
            ScheduleAction::Fire(fire("sch-tick-4", 4000)),
            ScheduleAction::Accepted {
                id: "sch-tick-4".into(),
                run_id: "run-4".into(),
            },
            ScheduleAction::Fire(fire("sch-tick-0", 0)),
            ScheduleAction::Forget {
                id: "sch-tick-0".into(),
            },
            ScheduleAction::Mark {
                schedule: "gone".into(),
                mark_ms: 1,
            },
            ScheduleAction::Unmark {
                schedule: "gone".into(),
            },
        ];
        store
            .apply(&Barriers::default(), &[], &actions, None)
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let (marks, mut fires) = store.load_schedules().unwrap();
        assert_eq!(marks, [("tick".to_string(), 5000)].into());
        fires.sort_by_key(|f| f.slot_ms);
        let mut accepted = fire("sch-tick-4", 4000);
        accepted.run_id = Some("run-4".into());
        assert_eq!(fires, [fire("sch-tick-2", 2000), accepted]);
    }

    #[test]
    fn in_memory_store_works() {
        let mut store = Store::in_memory().unwrap();
        store
            .apply(&Barriers::default(), &[], &[], Some(1))
            .unwrap();
        assert_eq!(store.high_water().unwrap(), Some(1));
    }
}
