//! A job's task statistics per UTC day (qless's job stats): how many tasks ended, how many
//! failed, and the count, mean, standard deviation and histogram of their wait (creation
//! to start) and run (start to end) times. Read with two grouped queries over the
//! `tasks_by_job_end` index, so a day of 100,000 tasks is summed in SQLite, not here.

use std::collections::BTreeMap;

use jobz::message::{DurationStats, JobDayStats, STATS_BUCKETS_MS};
use rusqlite::{params, Connection};

use super::{Context, StoreError};

const DAY_MS: i64 = 86_400_000;

/// The tasks the statistics count: ended for good, with their two durations.
const ENDED: &str = "SELECT recorded_at / 86400000 AS day, state,
        CASE WHEN started_at IS NOT NULL THEN max(started_at - created_at, 0) END AS wait,
        CASE WHEN started_at IS NOT NULL AND finished_at IS NOT NULL
             THEN max(finished_at - started_at, 0) END AS run
    FROM tasks
    WHERE job = ?1 AND recorded_at >= ?2 AND state IN ('succeeded', 'failed')";

/// The histogram bucket of `column` as an SQL expression (see [`STATS_BUCKETS_MS`]).
fn bucket(column: &str) -> String {
    let mut sql = String::from("CASE");
    for (i, bound) in STATS_BUCKETS_MS.iter().enumerate() {
        sql.push_str(&format!(" WHEN {column} < {bound} THEN {i}"));
    }
    sql.push_str(&format!(" ELSE {} END", STATS_BUCKETS_MS.len()));
    sql
}

/// Sums of one duration column, turned into a [`DurationStats`].
fn durations(count: i64, sum: f64, squares: f64) -> DurationStats {
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
        histogram: vec![0; STATS_BUCKETS_MS.len() + 1],
    }
}

pub(super) fn job_stats(
    conn: &Connection,
    job: &str,
    since_ms: i64,
) -> Result<Vec<JobDayStats>, StoreError> {
    const WHAT: &str = "reading a job's statistics";
    let mut days: BTreeMap<i64, JobDayStats> = BTreeMap::new();
    let sums = format!(
        "SELECT day, count(*), total(state = 'failed'),
                count(wait), total(wait), total(wait * 1.0 * wait),
                count(run), total(run), total(run * 1.0 * run)
         FROM ({ENDED}) GROUP BY day"
    );
    let mut stmt = conn.prepare_cached(&sums).context(WHAT)?;
    let mut rows = stmt.query(params![job, since_ms]).context(WHAT)?;
    while let Some(row) = rows.next().context(WHAT)? {
        let day: i64 = row.get(0).context(WHAT)?;
        let count: i64 = row.get(1).context(WHAT)?;
        let failed: f64 = row.get(2).context(WHAT)?;
        let wait = durations(
            row.get(3).context(WHAT)?,
            row.get(4).context(WHAT)?,
            row.get(5).context(WHAT)?,
        );
        let run = durations(
            row.get(6).context(WHAT)?,
            row.get(7).context(WHAT)?,
            row.get(8).context(WHAT)?,
        );
        days.insert(
            day,
            JobDayStats {
                day_ms: day * DAY_MS,
                count: count.max(0) as u64,
                failed: failed as u64,
                wait,
                run,
            },
        );
    }
    let histograms = format!(
        "SELECT day, 0, {wait}, count(*) FROM ({ENDED}) WHERE wait IS NOT NULL GROUP BY 1, 3
         UNION ALL
         SELECT day, 1, {run}, count(*) FROM ({ENDED}) WHERE run IS NOT NULL GROUP BY 1, 3",
        wait = bucket("wait"),
        run = bucket("run"),
    );
    let mut stmt = conn.prepare_cached(&histograms).context(WHAT)?;
    let mut rows = stmt.query(params![job, since_ms]).context(WHAT)?;
    while let Some(row) = rows.next().context(WHAT)? {
        let day: i64 = row.get(0).context(WHAT)?;
        let which: i64 = row.get(1).context(WHAT)?;
        let slot: i64 = row.get(2).context(WHAT)?;
        let count: i64 = row.get(3).context(WHAT)?;
        let Some(stats) = days.get_mut(&day) else {
            continue;
        };
        let histogram = match which {
            0 => &mut stats.wait.histogram,
            _ => &mut stats.run.histogram,
        };
        if let Some(cell) = usize::try_from(slot)
            .ok()
            .and_then(|s| histogram.get_mut(s))
        {
            *cell = count.max(0) as u64;
        }
    }
    Ok(days.into_values().collect())
}

#[cfg(test)]
mod tests {
    use jobz::message::TaskState;

    use super::super::tests::task;
    use super::super::{SqliteStore, Store};
    use super::*;
    use crate::engine::Write;

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
            writes.push(Write::Task(t));
        }
        // Day two: one that never started, one still running (not counted), another job.
        let mut unstarted = task("t2", "s", "r");
        unstarted.state = TaskState::Failed;
        unstarted.started_at_ms = None;
        unstarted.recorded_at_ms = Some(day + DAY_MS + 5);
        writes.push(Write::Task(unstarted));
        writes.push(Write::Task(task("t3", "s", "r")));
        let mut other = task("t4", "s", "r");
        other.job = "b".into();
        other.state = TaskState::Succeeded;
        other.recorded_at_ms = Some(day + 7);
        writes.push(Write::Task(other));
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
    }
}
