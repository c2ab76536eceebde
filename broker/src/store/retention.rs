//! Retention: finished runs are pruned in small transactions, oldest first.
//!
//! What goes: a finished run older than [`Retention::max_age_ms`] (by its end) or beyond
//! the newest [`Retention::max_count`] finished runs, with its steps, tasks, attempts and
//! dead-list entries. What stays whatever its age:
//! - an unfinished run (no end time, or a state that is not final);
//! - a run holding a dead task that was not retried and is among the newest
//!   [`Retention::held_dead`] dead tasks: those are exactly the ones `GET /dead` lists and
//!   `/dead/{id}/retry` accepts (the broker keeps that many in memory), so a listed entry
//!   always has its run and can be retried. A dead task that was retried, or fell out of
//!   the listed window, follows its run;
//! - the trigger id of a pruned run created within [`TRIGGER_DEDUP_MS`]: it moves to
//!   `pruned_triggers` (loaded at start with the runs' own), so a resent trigger is still
//!   ingested once after a restart.
//!
//! One call is one transaction of at most [`Retention::batch_rows`] rows: whole runs while
//! they fit; a single run bigger than that (a broadcast to many workers) loses its
//! children over several batches, its run row last.

use jobz::message::RunState;
use rusqlite::{params, OptionalExtension, Transaction};

use super::{Context, SqliteStore, StoreError};
use crate::ids::{RunId, TaskId};

/// How long a trigger id is remembered for ingesting a resent trigger once.
pub const TRIGGER_DEDUP_MS: i64 = 24 * 3600 * 1000;

/// Dead tasks the broker lists and can retry: the newest this many (it loads as many).
pub const LISTED_DEAD: usize = 10_000;

/// Final run states: only runs in one of these are ever pruned. A state added later is
/// kept until it is named here (the safe side).
const FINAL_RUN_STATES: [RunState; 3] =
    [RunState::Succeeded, RunState::Failed, RunState::Cancelled];

/// What the broker keeps of finished runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// A finished run that ended longer ago than this goes (`--history-days`).
    pub max_age_ms: i64,
    /// Finished runs kept at most, the newest by end (`--history-count`); runs held by
    /// the dead list are not pruned but count.
    pub max_count: u64,
    /// Most rows one prune transaction touches.
    pub batch_rows: usize,
    /// Unretried dead tasks among this many newest hold their runs ([`LISTED_DEAD`]).
    pub held_dead: usize,
}

impl Retention {
    /// `days` and `count` as the flags give them, in batches of at most 1,000 rows.
    pub fn new(days: u32, count: u64) -> Retention {
        Retention {
            max_age_ms: i64::from(days) * 24 * 3600 * 1000,
            max_count: count,
            batch_rows: 1000,
            held_dead: LISTED_DEAD,
        }
    }
}

/// What one prune transaction removed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pruned {
    /// Runs removed whole.
    pub runs: u64,
    /// Rows touched, of every table (at most [`Retention::batch_rows`]).
    pub rows: u64,
    /// Dead tasks removed with their runs: the broker forgets them too.
    pub dead_tasks: Vec<TaskId>,
    /// Trigger ids past the dedup window, forgotten.
    pub trigger_ids: u64,
    /// More is due now: the next batch should follow soon.
    pub more: bool,
}

impl Pruned {
    /// Nothing was removed.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }
}

/// The SQL list of [`FINAL_RUN_STATES`]: `('succeeded', …)`.
fn final_states_sql() -> String {
    let names: Vec<String> = FINAL_RUN_STATES
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    format!("({})", names.join(", "))
}

/// The oldest prunable runs: finished before the cutoff (?1, ?2), not held by a listed
/// dead task (?3), at most ?4. `+state` keeps SQLite off the state index, which would sort
/// every finished run for each batch: the end-time index is walked in order instead.
fn candidates_sql() -> String {
    format!(
        "SELECT run_id FROM runs
         WHERE finished_at IS NOT NULL AND (finished_at, rowid) < (?1, ?2)
           AND +state IN {}
           AND NOT EXISTS (SELECT 1 FROM dead WHERE dead.run_id = runs.run_id
                           AND dead.retried_as IS NULL AND dead.failed_at >= ?3)
         ORDER BY finished_at, rowid LIMIT ?4",
        final_states_sql()
    )
}

/// Schema the pruning needs, made at every open (idempotent, any schema version): an
/// index to walk finished runs by their end, one to find a run's dead tasks, and the
/// trigger ids of pruned runs still inside the dedup window.
pub(super) const SCHEMA: &str = "
    CREATE INDEX IF NOT EXISTS runs_by_finish ON runs (finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX IF NOT EXISTS dead_by_run ON dead (run_id);
    CREATE TABLE IF NOT EXISTS pruned_triggers (
        request_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, created_at INTEGER NOT NULL);
    CREATE INDEX IF NOT EXISTS pruned_triggers_by_time ON pruned_triggers (created_at);";

impl SqliteStore {
    /// One batch of pruning under `retention` at `now_ms`, in its own transaction.
    pub(super) fn prune_batch(
        &mut self,
        retention: &Retention,
        now_ms: i64,
    ) -> Result<Pruned, StoreError> {
        let tx = self
            .conn
            .transaction()
            .context("beginning a prune transaction")?;
        let mut pruned = Pruned::default();
        let mut budget = retention.batch_rows.max(1) as u64;
        let dedup_floor = now_ms.saturating_sub(TRIGGER_DEDUP_MS);

        let (cut_at, cut_rowid) = cutoff(&tx, retention, now_ms)?;
        let dead_floor = held_dead_floor(&tx, retention.held_dead)?;
        // Each run touches at least its own row: no more candidates than the budget.
        let limit = budget.min(256);
        let candidates: Vec<RunId> = {
            let mut stmt = tx
                .prepare_cached(&candidates_sql())
                .context("selecting runs to prune")?;
            let rows = stmt
                .query_map(params![cut_at, cut_rowid, dead_floor, limit as i64], |r| {
                    r.get::<_, String>(0)
                })
                .context("selecting runs to prune")?;
            rows.map(|r| r.map(RunId::from))
                .collect::<Result<_, _>>()
                .context("selecting runs to prune")?
        };
        pruned.more = candidates.len() as u64 == limit;

        for (n, run_id) in candidates.iter().enumerate() {
            let children = count_children(&tx, run_id)?;
            let recent = is_recent(&tx, run_id, dedup_floor)?;
            let whole = children + 1 + u64::from(recent);
            if whole > budget && n > 0 {
                pruned.more = true;
                break;
            }
            // The first run may be bigger than a whole batch: its children go in parts.
            let deleted = delete_children(&tx, run_id, budget, &mut pruned.dead_tasks)?;
            budget -= deleted;
            pruned.rows += deleted;
            if deleted < children || budget < 1 + u64::from(recent) {
                pruned.more = true;
                break;
            }
            if recent {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO pruned_triggers (request_id, run_id, created_at)
                     SELECT request_id, run_id, created_at FROM runs WHERE run_id = ?1",
                )
                .and_then(|mut s| s.execute([run_id]))
                .context("keeping a pruned run's trigger id")?;
                budget -= 1;
                pruned.rows += 1;
            }
            tx.prepare_cached("DELETE FROM runs WHERE run_id = ?1")
                .and_then(|mut s| s.execute([run_id]))
                .context("deleting a run")?;
            budget -= 1;
            pruned.rows += 1;
            pruned.runs += 1;
        }

        if budget > 0 {
            let forgotten = tx
                .prepare_cached(
                    "DELETE FROM pruned_triggers WHERE rowid IN
                     (SELECT rowid FROM pruned_triggers WHERE created_at <= ?1 LIMIT ?2)",
                )
                .and_then(|mut s| s.execute(params![dedup_floor, budget as i64]))
                .context("forgetting old trigger ids")? as u64;
            pruned.trigger_ids = forgotten;
            pruned.rows += forgotten;
            pruned.more |= forgotten == budget;
        }
        tx.commit().context("committing a prune")?;
        Ok(pruned)
    }
}

/// The exclusive upper bound, as (end time, rowid), of the finished runs that may go: the
/// later of the age limit and the end of the newest run beyond the count limit.
fn cutoff(
    tx: &Transaction<'_>,
    retention: &Retention,
    now_ms: i64,
) -> Result<(i64, i64), StoreError> {
    let by_age = (now_ms.saturating_sub(retention.max_age_ms), i64::MIN);
    let beyond_count: Option<(i64, i64)> = tx
        .prepare_cached(
            "SELECT finished_at, rowid FROM runs WHERE finished_at IS NOT NULL
             ORDER BY finished_at DESC, rowid DESC LIMIT 1 OFFSET ?1",
        )
        .and_then(|mut s| {
            s.query_row(
                [i64::try_from(retention.max_count).unwrap_or(i64::MAX)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
        .context("finding the count limit")?;
    // That run goes too: the bound is just past it.
    let by_count = beyond_count.map(|(at, rowid)| (at, rowid.saturating_add(1)));
    Ok(by_count.map_or(by_age, |c| c.max(by_age)))
}

/// Unretried dead tasks that failed at or after this hold their runs: the newest
/// `held` dead tasks (all of them if there are fewer).
fn held_dead_floor(tx: &Transaction<'_>, held: usize) -> Result<i64, StoreError> {
    if held == 0 {
        return Ok(i64::MAX);
    }
    let floor: Option<i64> = tx
        .prepare_cached("SELECT failed_at FROM dead ORDER BY failed_at DESC LIMIT 1 OFFSET ?1")
        .and_then(|mut s| s.query_row([held as i64 - 1], |r| r.get(0)).optional())
        .context("finding the listed dead tasks")?;
    Ok(floor.unwrap_or(i64::MIN))
}

/// Rows of `run_id` in the tables that hang off a run.
fn count_children(tx: &Transaction<'_>, run_id: &RunId) -> Result<u64, StoreError> {
    let n: i64 = tx
        .prepare_cached(
            "SELECT (SELECT count(*) FROM attempts WHERE run_id = ?1)
                  + (SELECT count(*) FROM tasks WHERE run_id = ?1)
                  + (SELECT count(*) FROM steps WHERE run_id = ?1)
                  + (SELECT count(*) FROM dead WHERE run_id = ?1)",
        )
        .and_then(|mut s| s.query_row([run_id], |r| r.get(0)))
        .context("counting a run's rows")?;
    Ok(n.max(0) as u64)
}

/// The run was created inside the dedup window: its trigger id must outlive it.
fn is_recent(tx: &Transaction<'_>, run_id: &RunId, dedup_floor: i64) -> Result<bool, StoreError> {
    tx.prepare_cached("SELECT created_at > ?2 FROM runs WHERE run_id = ?1")
        .and_then(|mut s| s.query_row(params![run_id, dedup_floor], |r| r.get(0)))
        .context("reading a run's age")
}

/// Deletes up to `limit` rows that hang off `run_id`, history first and its dead tasks
/// last (noted in `dead`); returns how many went.
fn delete_children(
    tx: &Transaction<'_>,
    run_id: &RunId,
    limit: u64,
    dead: &mut Vec<TaskId>,
) -> Result<u64, StoreError> {
    let mut deleted = 0;
    for table in ["attempts", "tasks", "steps"] {
        if deleted == limit {
            return Ok(deleted);
        }
        let sql = format!(
            "DELETE FROM {table} WHERE rowid IN
             (SELECT rowid FROM {table} WHERE run_id = ?1 LIMIT ?2)"
        );
        deleted += tx
            .prepare_cached(&sql)
            .and_then(|mut s| s.execute(params![run_id, (limit - deleted) as i64]))
            .context(&format!("deleting a run's {table}"))? as u64;
    }
    if deleted == limit {
        return Ok(deleted);
    }
    let ids: Vec<TaskId> = {
        let mut stmt = tx
            .prepare_cached("SELECT task_id FROM dead WHERE run_id = ?1 LIMIT ?2")
            .context("reading a run's dead tasks")?;
        let rows = stmt
            .query_map(params![run_id, (limit - deleted) as i64], |r| {
                r.get::<_, String>(0)
            })
            .context("reading a run's dead tasks")?;
        rows.map(|r| r.map(TaskId::from))
            .collect::<Result<_, _>>()
            .context("reading a run's dead tasks")?
    };
    for id in ids {
        tx.prepare_cached("DELETE FROM dead WHERE task_id = ?1")
            .and_then(|mut s| s.execute([&id]))
            .context("deleting a dead task")?;
        deleted += 1;
        dead.push(id);
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use jobz::message::{RunState, TaskState};

    use super::*;
    use crate::engine::Write;
    use crate::model::{Attempt, Dead};
    use crate::store::tests::{run, step, task};
    use crate::store::Store;

    const HOUR: i64 = 3600 * 1000;
    const DAY: i64 = 24 * HOUR;

    /// A run that ended at `at`, created a minute before, with one step, one task and one
    /// attempt: four rows.
    fn finished(id: &str, at: i64) -> Vec<Write> {
        let mut r = run(id, RunState::Succeeded, at - 60_000);
        r.finished_at_ms = Some(at);
        let (s, t) = (format!("{id}-s"), format!("{id}-t"));
        let mut done = task(&t, &s, id);
        done.state = TaskState::Succeeded;
        vec![
            Write::Run(r),
            Write::Step(step(&s, id, TaskState::Succeeded)),
            Write::Task(done),
            Write::Attempt(attempt(&t, id)),
        ]
    }

    fn attempt(task_id: &str, run_id: &str) -> Attempt {
        Attempt {
            task_id: task_id.into(),
            run_id: run_id.into(),
            attempt: 1,
            worker: Some("w1".into()),
            state: TaskState::Succeeded,
            exit_code: Some(0),
            error: None,
            started_at_ms: Some(1),
            finished_at_ms: 2,
            late: false,
            output_tail: String::new(),
        }
    }

    fn dead(run_id: &str, failed_at: i64, retried: bool) -> Dead {
        Dead {
            task_id: format!("{run_id}-t").into(),
            run_id: run_id.into(),
            step_id: format!("{run_id}-s").into(),
            job: "a".into(),
            worker: Some("w1".into()),
            params: Default::default(),
            attempts: 1,
            error: Some("exit 1".into()),
            exit_code: Some(1),
            failed_at_ms: failed_at,
            retried_as: retried.then(|| RunId::from("later")),
        }
    }

    fn keep(days: u32, count: u64) -> Retention {
        Retention::new(days, count)
    }

    /// Prunes until nothing more is due; every batch within its row budget.
    fn prune_all(store: &mut SqliteStore, retention: &Retention, now: i64) -> Vec<Pruned> {
        let mut batches = Vec::new();
        loop {
            let pruned = store.prune(retention, now).unwrap();
            assert!(
                pruned.rows <= retention.batch_rows as u64,
                "a batch of {} rows",
                pruned.rows
            );
            let more = pruned.more;
            batches.push(pruned);
            if !more {
                return batches;
            }
            assert!(batches.len() < 10_000, "pruning never ends");
        }
    }

    fn run_ids(store: &SqliteStore) -> Vec<String> {
        let mut ids: Vec<String> = store
            .conn
            .prepare("SELECT run_id FROM runs")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        ids.sort();
        ids
    }

    fn rows_of(store: &SqliteStore, table: &str, run_id: &str) -> i64 {
        store
            .conn
            .query_row(
                &format!("SELECT count(*) FROM {table} WHERE run_id = ?1"),
                [run_id],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[test]
    fn only_the_newest_finished_runs_up_to_the_count_stay_and_active_runs_are_never_pruned() {
        let mut store = SqliteStore::in_memory().unwrap();
        let now = 100 * DAY;
        for i in 0..10 {
            store
                .apply(&finished(&format!("f{i}"), now - 10_000 + i))
                .unwrap();
        }
        // Unfinished runs far older than anything finished, with an end time set by
        // mistake on one of them: never pruned.
        let mut stuck = run("active-running", RunState::Running, 1);
        stuck.finished_at_ms = Some(2);
        store
            .apply(&[
                Write::Run(run("active-pending", RunState::Pending, 1)),
                Write::Run(stuck),
                Write::Step(step("as", "active-pending", TaskState::Pending)),
            ])
            .unwrap();

        let batches = prune_all(&mut store, &keep(7, 4), now);
        assert_eq!(batches.iter().map(|b| b.runs).sum::<u64>(), 6);
        assert_eq!(
            run_ids(&store),
            ["active-pending", "active-running", "f6", "f7", "f8", "f9"]
        );
        assert_eq!(rows_of(&store, "steps", "active-pending"), 1);
        assert_eq!(store.load().unwrap().runs.len(), 2);
        // Nothing more to do: an idle store touches nothing.
        let idle = store.prune(&keep(7, 4), now).unwrap();
        assert_eq!(idle, Pruned::default());
        // Keeping none leaves the active runs.
        prune_all(&mut store, &keep(7, 0), now);
        assert_eq!(run_ids(&store), ["active-pending", "active-running"]);
    }

    #[test]
    fn finished_runs_older_than_the_age_limit_go() {
        let mut store = SqliteStore::in_memory().unwrap();
        let now = 100 * DAY;
        store.apply(&finished("old", now - 7 * DAY - 1)).unwrap();
        store
            .apply(&finished("young", now - 7 * DAY + HOUR))
            .unwrap();
        let batches = prune_all(&mut store, &keep(7, 100_000), now);
        assert_eq!(batches.iter().map(|b| b.runs).sum::<u64>(), 1);
        assert_eq!(run_ids(&store), ["young"]);
        // An hour later it is old enough too.
        prune_all(&mut store, &keep(7, 100_000), now + 2 * HOUR);
        assert!(run_ids(&store).is_empty());
    }

    #[test]
    fn a_batch_touches_at_most_its_row_budget_and_takes_whole_runs() {
        let mut store = SqliteStore::in_memory().unwrap();
        let now = 100 * DAY;
        for i in 0..20 {
            store
                .apply(&finished(&format!("r{i:02}"), 1_000 + i))
                .unwrap();
        }
        let retention = Retention {
            batch_rows: 10,
            ..keep(7, 0)
        };
        let batches = prune_all(&mut store, &retention, now);
        // Four rows a run (old runs: no trigger id kept), so two runs a batch.
        assert_eq!(batches.len(), 10, "{batches:?}");
        assert!(batches.iter().all(|b| b.runs == 2 && b.rows == 8));
        assert!(run_ids(&store).is_empty());
    }

    #[test]
    fn a_run_bigger_than_a_batch_loses_its_children_in_parts_and_its_row_last() {
        let mut store = SqliteStore::in_memory().unwrap();
        let mut writes = finished("big", 1_000);
        for i in 0..25 {
            let id = format!("big-t{i}");
            writes.push(Write::Task(task(&id, "big-s", "big")));
            writes.push(Write::Attempt(attempt(&id, "big")));
        }
        store.apply(&writes).unwrap();
        store.apply(&finished("small", 2_000)).unwrap();
        let retention = Retention {
            batch_rows: 10,
            ..keep(7, 0)
        };
        let first = store.prune(&retention, 100 * DAY).unwrap();
        assert_eq!((first.rows, first.runs, first.more), (10, 0, true));
        assert_eq!(run_ids(&store), ["big", "small"]);
        let batches = prune_all(&mut store, &retention, 100 * DAY);
        assert!(run_ids(&store).is_empty());
        assert_eq!(batches.iter().map(|b| b.runs).sum::<u64>(), 2);
    }

    #[test]
    fn a_pruned_run_takes_its_steps_tasks_attempts_and_dead_tasks_along() {
        let mut store = SqliteStore::in_memory().unwrap();
        let mut writes = finished("gone", 1_000);
        writes.push(Write::Dead(dead("gone", 1_000, true)));
        store.apply(&writes).unwrap();
        store.apply(&finished("kept", 2_000)).unwrap();
        let batches = prune_all(&mut store, &keep(1000, 1), 100 * DAY);
        let dead_tasks: Vec<TaskId> = batches.into_iter().flat_map(|b| b.dead_tasks).collect();
        assert_eq!(dead_tasks, [TaskId::from("gone-t")]);
        for table in ["runs", "steps", "tasks", "attempts", "dead"] {
            assert_eq!(rows_of(&store, table, "gone"), 0, "{table}");
        }
        for table in ["runs", "steps", "tasks", "attempts"] {
            assert_eq!(rows_of(&store, table, "kept"), 1, "{table}");
        }
        assert!(store.run("gone").unwrap().is_none());
        assert!(store.run("kept").unwrap().is_some());
        // And nothing of it comes back as a late result: the task is gone.
        store
            .apply(&[Write::ResultAfterRunEnd(attempt("gone-t", ""))])
            .unwrap();
        assert_eq!(rows_of(&store, "attempts", "gone"), 0);
    }

    #[test]
    fn the_trigger_ids_of_pruned_runs_survive_for_the_dedup_window() {
        let mut store = SqliteStore::in_memory().unwrap();
        let now = jobz::now_ms();
        store.apply(&finished("recent", now - HOUR)).unwrap();
        store.apply(&finished("old", now - 2 * DAY)).unwrap();
        let batches = prune_all(&mut store, &keep(7, 0), now);
        assert_eq!(batches.iter().map(|b| b.runs).sum::<u64>(), 2);
        assert!(run_ids(&store).is_empty());
        // A restarted broker still knows the recent trigger, and what run it made.
        let recent = store.load().unwrap().recent_requests;
        assert_eq!(recent, [("req-recent".to_string(), RunId::from("recent"))]);
        // Past the window it is forgotten, in a batch of its own.
        let later = prune_all(&mut store, &keep(7, 0), now + DAY);
        assert_eq!(later.iter().map(|b| b.trigger_ids).sum::<u64>(), 1);
        assert!(store.load().unwrap().recent_requests.is_empty());
    }

    #[test]
    fn a_listed_dead_task_holds_its_run_until_it_is_retried() {
        let mut store = SqliteStore::in_memory().unwrap();
        let now = 100 * DAY;
        for (id, at, retried) in [("open", 1_000, false), ("retried", 2_000, true)] {
            let mut writes = finished(id, at);
            writes.push(Write::Dead(dead(id, at, retried)));
            store.apply(&writes).unwrap();
        }
        let pruned = prune_all(&mut store, &keep(0, 0), now);
        let forgotten: Vec<TaskId> = pruned.into_iter().flat_map(|b| b.dead_tasks).collect();
        assert_eq!(forgotten, [TaskId::from("retried-t")]);
        assert_eq!(run_ids(&store), ["open"]);
        // What a restarted broker lists is what it can retry, with its run.
        let listed = store.load().unwrap().dead;
        assert_eq!(listed.len(), 1);
        assert!(store.run(listed[0].run_id.as_str()).unwrap().is_some());
        // Once retried, it follows its run.
        store
            .apply(&[Write::Dead(dead("open", 1_000, true))])
            .unwrap();
        prune_all(&mut store, &keep(0, 0), now);
        assert!(run_ids(&store).is_empty());
        assert!(store.load().unwrap().dead.is_empty());
    }

    #[test]
    fn a_dead_task_beyond_the_listed_window_no_longer_holds_its_run() {
        let mut store = SqliteStore::in_memory().unwrap();
        for (id, at) in [("older", 1_000), ("newer", 2_000)] {
            let mut writes = finished(id, at);
            writes.push(Write::Dead(dead(id, at, false)));
            store.apply(&writes).unwrap();
        }
        let retention = Retention {
            held_dead: 1,
            ..keep(0, 0)
        };
        prune_all(&mut store, &retention, 100 * DAY);
        assert_eq!(run_ids(&store), ["newer"]);
    }

    #[test]
    fn a_batch_walks_the_end_time_index_and_never_sorts_the_runs() {
        let store = SqliteStore::in_memory().unwrap();
        let plan: Vec<String> = store
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", candidates_sql()))
            .unwrap()
            .query_map(params![1, 2, 3, 4], |r| r.get(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(plan[0].contains("runs_by_finish"), "{plan:?}");
        assert!(!plan.iter().any(|p| p.contains("TEMP B-TREE")), "{plan:?}");
    }

    #[test]
    fn only_final_states_are_pruned() {
        for state in FINAL_RUN_STATES {
            assert!(state.is_final(), "{state}");
        }
        for state in [RunState::Pending, RunState::Running] {
            assert!(!final_states_sql().contains(&format!("'{state}'")));
        }
    }
}
