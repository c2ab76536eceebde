//! A job's task statistics per UTC day (qless's job stats): how many tasks ended, how many
//! failed, and the count, mean, standard deviation and histogram of their wait (creation
//! to start) and run (start to end) times.
//!
//! As qless keeps them: a rollup row per (job, day) in `job_stats`, added to by the
//! `Write::TaskEnded` the engine makes where a task ends for good (in the commit that
//! records the end: [`count_ended`]), so reading a fortnight is reading 14 rows
//! however many tasks ran; summing the tasks at read time took 200 ms for 100,000 of them.
//! The rows outlive the pruned history they count. Schema 6 made the table and filled it
//! from the tasks the store held ([`SCHEMA_V6`]).

use jobz::message::{DurationStats, JobDayStats, STATS_BUCKETS_MS};
use rusqlite::{params, Connection, Transaction};

use super::{Context, StoreError};
use crate::model::Task;

const DAY_MS: i64 = 86_400_000;

/// Histogram buckets of each duration: those of [`STATS_BUCKETS_MS`] and one beyond.
const BUCKETS: usize = STATS_BUCKETS_MS.len() + 1;

/// Schema 6: the rollup table, filled from the ended tasks already stored (the same
/// bucketing as [`bucket_of`]: `w0..w7` and `r0..r7` count the waits and runs per bucket).
pub(super) const SCHEMA_V6: &str = "
    CREATE TABLE IF NOT EXISTS job_stats (
        job TEXT NOT NULL, day INTEGER NOT NULL,
        count INTEGER NOT NULL, failed INTEGER NOT NULL,
        wait_count INTEGER NOT NULL, wait_sum REAL NOT NULL, wait_sq REAL NOT NULL,
        run_count INTEGER NOT NULL, run_sum REAL NOT NULL, run_sq REAL NOT NULL,
        w0 INTEGER NOT NULL, w1 INTEGER NOT NULL, w2 INTEGER NOT NULL, w3 INTEGER NOT NULL,
        w4 INTEGER NOT NULL, w5 INTEGER NOT NULL, w6 INTEGER NOT NULL, w7 INTEGER NOT NULL,
        r0 INTEGER NOT NULL, r1 INTEGER NOT NULL, r2 INTEGER NOT NULL, r3 INTEGER NOT NULL,
        r4 INTEGER NOT NULL, r5 INTEGER NOT NULL, r6 INTEGER NOT NULL, r7 INTEGER NOT NULL,
        PRIMARY KEY (job, day)) WITHOUT ROWID;
    INSERT INTO job_stats
    SELECT job, day, count(*), total(state = 'failed'),
           count(wait), total(wait), total(wait * 1.0 * wait),
           count(run), total(run), total(run * 1.0 * run),
           total(wait < 10), total(wait >= 10 AND wait < 100), total(wait >= 100 AND wait < 1000),
           total(wait >= 1000 AND wait < 10000), total(wait >= 10000 AND wait < 60000),
           total(wait >= 60000 AND wait < 600000), total(wait >= 600000 AND wait < 3600000),
           total(wait >= 3600000),
           total(run < 10), total(run >= 10 AND run < 100), total(run >= 100 AND run < 1000),
           total(run >= 1000 AND run < 10000), total(run >= 10000 AND run < 60000),
           total(run >= 60000 AND run < 600000), total(run >= 600000 AND run < 3600000),
           total(run >= 3600000)
    FROM (SELECT job, recorded_at / 86400000 AS day, state,
            CASE WHEN started_at IS NOT NULL THEN max(started_at - created_at, 0) END AS wait,
            CASE WHEN started_at IS NOT NULL AND finished_at IS NOT NULL
                 THEN max(finished_at - started_at, 0) END AS run
          FROM tasks
          WHERE recorded_at IS NOT NULL AND state IN ('succeeded', 'failed'))
    GROUP BY job, day;";

/// The histogram bucket of a duration.
fn bucket_of(ms: i64) -> usize {
    STATS_BUCKETS_MS
        .iter()
        .position(|bound| ms < *bound)
        .unwrap_or(STATS_BUCKETS_MS.len())
}

/// Adds `task`'s end to its job's row of the day it ended.
pub(super) fn count_ended(tx: &Transaction<'_>, task: &Task) -> Result<(), StoreError> {
    let Some(recorded) = task.recorded_at_ms else {
        return Ok(());
    };
    let wait = task
        .started_at_ms
        .map(|started| (started - task.created_at_ms).max(0));
    let run = match (task.started_at_ms, task.finished_at_ms) {
        (Some(started), Some(finished)) => Some((finished - started).max(0)),
        _ => None,
    };
    let one_hot = |ms: Option<i64>| {
        let mut cells = [0i64; BUCKETS];
        if let Some(ms) = ms {
            cells[bucket_of(ms)] = 1;
        }
        cells
    };
    let (w, r) = (one_hot(wait), one_hot(run));
    let square = |ms: Option<i64>| ms.map_or(0.0, |v| (v as f64) * (v as f64));
    tx.prepare_cached(
        "INSERT INTO job_stats VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6, ?7, ?8, ?9,
             ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)
         ON CONFLICT (job, day) DO UPDATE SET count = count + 1, failed = failed + excluded.failed,
             wait_count = wait_count + excluded.wait_count, wait_sum = wait_sum + excluded.wait_sum,
             wait_sq = wait_sq + excluded.wait_sq, run_count = run_count + excluded.run_count,
             run_sum = run_sum + excluded.run_sum, run_sq = run_sq + excluded.run_sq,
             w0 = w0 + excluded.w0, w1 = w1 + excluded.w1, w2 = w2 + excluded.w2,
             w3 = w3 + excluded.w3, w4 = w4 + excluded.w4, w5 = w5 + excluded.w5,
             w6 = w6 + excluded.w6, w7 = w7 + excluded.w7,
             r0 = r0 + excluded.r0, r1 = r1 + excluded.r1, r2 = r2 + excluded.r2,
             r3 = r3 + excluded.r3, r4 = r4 + excluded.r4, r5 = r5 + excluded.r5,
             r6 = r6 + excluded.r6, r7 = r7 + excluded.r7",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            task.job,
            recorded.div_euclid(DAY_MS),
            i64::from(task.state.as_str() == "failed"),
            i64::from(wait.is_some()),
            wait.unwrap_or(0) as f64,
            square(wait),
            i64::from(run.is_some()),
            run.unwrap_or(0) as f64,
            square(run),
            w[0],
            w[1],
            w[2],
            w[3],
            w[4],
            w[5],
            w[6],
            w[7],
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            r[6],
            r[7],
        ])
    })
    .context("counting a task's end in its job's statistics")?;
    Ok(())
}

/// Sums of one duration, turned into a [`DurationStats`].
fn durations(count: i64, sum: f64, squares: f64, histogram: Vec<u64>) -> DurationStats {
    let n = count.max(0) as u64;
    let mean = if n > 0 { sum / n as f64 } else { 0.0 };
    let variance = if n > 0 {
        (squares / n as f64 - mean * mean).max(0.0)
    } else {
        0.0
    };
    DurationStats {
        count: n,
        mean_ms: mean,
        std_dev_ms: variance.sqrt(),
        histogram,
    }
}

/// The rows of `job` from the day of `since_ms` on, oldest first.
pub(super) fn job_stats(
    conn: &Connection,
    job: &str,
    since_ms: i64,
) -> Result<Vec<JobDayStats>, StoreError> {
    const WHAT: &str = "reading a job's statistics";
    let mut stmt = conn
        .prepare_cached("SELECT * FROM job_stats WHERE job = ?1 AND day >= ?2 ORDER BY day")
        .context(WHAT)?;
    let mut rows = stmt
        .query(params![job, since_ms.div_euclid(DAY_MS)])
        .context(WHAT)?;
    let mut days = Vec::new();
    while let Some(row) = rows.next().context(WHAT)? {
        let histogram = |first: usize| -> Result<Vec<u64>, StoreError> {
            (first..first + BUCKETS)
                .map(|i| row.get::<_, i64>(i).map(|v| v.max(0) as u64).context(WHAT))
                .collect()
        };
        let day: i64 = row.get(1).context(WHAT)?;
        let count: i64 = row.get(2).context(WHAT)?;
        let failed: i64 = row.get(3).context(WHAT)?;
        days.push(JobDayStats {
            day_ms: day * DAY_MS,
            count: count.max(0) as u64,
            failed: failed.max(0) as u64,
            wait: durations(
                row.get(4).context(WHAT)?,
                row.get(5).context(WHAT)?,
                row.get(6).context(WHAT)?,
                histogram(10)?,
            ),
            run: durations(
                row.get(7).context(WHAT)?,
                row.get(8).context(WHAT)?,
                row.get(9).context(WHAT)?,
                histogram(10 + BUCKETS)?,
            ),
        });
    }
    Ok(days)
}

#[cfg(test)]
mod tests {
    use jobz::message::TaskState;

    use super::super::tests::task;
    use super::super::{SqliteStore, Store};
    use super::*;
    use crate::engine::Write;
    use crate::model::Task;

    /// What the engine writes as a task ends for good: its record, and the count.
    fn ended(task: Task) -> [Write; 2] {
        [Write::Task(task.clone()), Write::TaskEnded(task)]
    }

    #[test]
    fn counts_failures_and_sums_wait_and_run_times_per_day() {
        let mut store = SqliteStore::in_memory().unwrap();
        let day = 20_000 * DAY_MS;
        let mut writes = Vec::new();
        // Day one: waits 5 and 15 ms, runs 50 ms and 2 s, one failed.
        for (i, (wait, run, state)) in [
            (5, 50, TaskState::Succeeded),
            (15, 2_000, TaskState::Failed),
        ]
        .into_iter()
        .enumerate()
        {
            let mut t = task(&format!("t{i}"), "s", "r");
            t.created_at_ms = day + 1_000;
            t.started_at_ms = Some(day + 1_000 + wait);
            t.finished_at_ms = Some(day + 1_000 + wait + run);
            t.recorded_at_ms = t.finished_at_ms;
            t.state = state;
            writes.extend(ended(t));
        }
        // Day two: one that never started, one still running (not counted), another job.
        let mut unstarted = task("t2", "s", "r");
        unstarted.state = TaskState::Failed;
        unstarted.started_at_ms = None;
        unstarted.recorded_at_ms = Some(day + DAY_MS + 5);
        writes.extend(ended(unstarted));
        writes.push(Write::Task(task("t3", "s", "r")));
        let mut other = task("t4", "s", "r");
        other.job = "b".into();
        other.state = TaskState::Succeeded;
        other.recorded_at_ms = Some(day + 7);
        writes.extend(ended(other));
        store.apply(&writes).unwrap();

        let stats = store.job_stats("a", day).unwrap();
        assert_eq!(stats.len(), 2);
        let one = &stats[0];
        assert_eq!((one.day_ms, one.count, one.failed), (day, 2, 1));
        assert_eq!(one.wait.count, 2);
        assert!((one.wait.mean_ms - 10.0).abs() < 1e-9);
        assert!((one.wait.std_dev_ms - 5.0).abs() < 1e-9);
        assert_eq!(one.wait.histogram, [1, 1, 0, 0, 0, 0, 0, 0]);
        assert!((one.run.mean_ms - 1_025.0).abs() < 1e-9);
        assert_eq!(one.run.histogram, [0, 1, 0, 1, 0, 0, 0, 0]);
        let two = &stats[1];
        assert_eq!((two.count, two.failed, two.wait.count), (1, 1, 0));
        assert_eq!(two.wait.histogram.iter().sum::<u64>(), 0);
        // Since a later time: only what ended since.
        assert_eq!(store.job_stats("a", day + DAY_MS).unwrap().len(), 1);
        // A task's record written again (a later commit, a restart) is not counted again.
        store.apply(&writes[..1]).unwrap();
        assert!(matches!(writes[0], Write::Task(_)));
        assert_eq!(store.job_stats("a", day).unwrap()[0].count, 2);
    }

    #[test]
    fn the_migration_counts_the_tasks_a_store_already_holds_as_a_commit_would() {
        let mut store = SqliteStore::in_memory().unwrap();
        let day = 20_001 * DAY_MS;
        let mut writes = Vec::new();
        for i in 0..5 {
            let mut t = task(&format!("t{i}"), "s", "r");
            t.created_at_ms = day;
            t.started_at_ms = Some(day + 20 * i);
            t.finished_at_ms = Some(day + 20 * i + 1_500);
            t.recorded_at_ms = t.finished_at_ms;
            t.state = if i == 0 {
                TaskState::Failed
            } else {
                TaskState::Succeeded
            };
            writes.extend(ended(t));
        }
        store.apply(&writes).unwrap();
        let counted = store.job_stats("a", day).unwrap();
        // As an older store would be migrated: the table made again from the tasks.
        store.conn.execute_batch("DROP TABLE job_stats;").unwrap();
        store.conn.execute_batch(SCHEMA_V6).unwrap();
        assert_eq!(store.job_stats("a", day).unwrap(), counted);
        assert_eq!(counted[0].failed, 1);
        assert_eq!(
            counted[0].run.histogram[3], 5,
            "1.5 s runs: the 1-10 s bucket"
        );
    }
}
