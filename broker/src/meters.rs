//! What the broker measures for `/metrics` beyond its named counters: runs ended by job
//! and state, task and queue-wait times by job, journal commit times and frames sent.
//!
//! The engine keeps the per-job numbers ([`JobMeters`]); the journal and publisher threads
//! share [`IoMeters`] with it. [`crate::engine::Engine::health`] ships both to the frontend
//! as a [`BrokerMetrics`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use jobz::message::{BrokerMetrics, HistogramView, RunState, MAX_METRIC_JOBS, OTHER_JOBS};

/// Bucket bounds of task durations, in seconds (a second to a day).
const TASK_SECONDS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

/// Bucket bounds of queue waits, in seconds.
const WAIT_SECONDS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Bucket bounds of journal commit times, in seconds.
const COMMIT_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The final states `jobz_runs_total` names from the start, zero included.
const FINAL_STATES: &[RunState] = &[RunState::Succeeded, RunState::Failed, RunState::Cancelled];

/// A histogram over fixed bucket bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, and one for what is above them all.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Counts one observation of `seconds` (a negative one, from skewed clocks, as 0).
    pub fn observe(&mut self, seconds: f64) {
        let seconds = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        };
        let bucket = self.bounds.partition_point(|b| *b < seconds);
        self.counts[bucket] += 1;
        self.sum += seconds;
    }

    /// The histogram as the wire carries it.
    pub fn view(&self) -> HistogramView {
        HistogramView {
            bounds: self.bounds.to_vec(),
            counts: self.counts.clone(),
            sum: self.sum,
        }
    }
}

/// The job a per-job metric counts under: itself while fewer than [`MAX_METRIC_JOBS`] are
/// named, [`OTHER_JOBS`] after.
fn job_key<V>(map: &BTreeMap<String, V>, job: &str) -> String {
    if map.contains_key(job) || map.len() < MAX_METRIC_JOBS {
        job.to_owned()
    } else {
        OTHER_JOBS.to_owned()
    }
}

/// Observes `ms` in `job`'s histogram (over `bounds`) of `map`.
fn observe_ms(map: &mut BTreeMap<String, Histogram>, bounds: &'static [f64], job: &str, ms: i64) {
    let key = job_key(map, job);
    map.entry(key)
        .or_insert_with(|| Histogram::new(bounds))
        .observe(ms as f64 / 1000.0);
}

/// Adds each job of `catalog` that `map` lacks, as `empty()`, while under the cap.
fn name_jobs<V>(map: &mut BTreeMap<String, V>, catalog: &[&str], empty: impl Fn() -> V) {
    for job in catalog {
        if map.len() >= MAX_METRIC_JOBS {
            return;
        }
        map.entry((*job).to_owned()).or_insert_with(&empty);
    }
}

/// Every final state at 0.
fn final_states_at_zero() -> BTreeMap<String, u64> {
    FINAL_STATES.iter().map(|s| (s.to_string(), 0)).collect()
}

/// The engine's per-job numbers.
#[derive(Debug, Default)]
pub struct JobMeters {
    runs_ended: BTreeMap<String, BTreeMap<String, u64>>,
    task_duration: BTreeMap<String, Histogram>,
    queue_wait: BTreeMap<String, Histogram>,
}

impl JobMeters {
    /// A run of `job` ended in `state`.
    pub fn run_ended(&mut self, job: &str, state: RunState) {
        let key = job_key(&self.runs_ended, job);
        let states = self
            .runs_ended
            .entry(key)
            .or_insert_with(final_states_at_zero);
        *states.entry(state.to_string()).or_default() += 1;
    }

    /// A task attempt of `job` ran `ms` milliseconds.
    pub fn task_ran(&mut self, job: &str, ms: i64) {
        observe_ms(&mut self.task_duration, TASK_SECONDS, job, ms);
    }

    /// A step of `job` waited `ms` milliseconds from its creation to its start.
    pub fn step_waited(&mut self, job: &str, ms: i64) {
        observe_ms(&mut self.queue_wait, WAIT_SECONDS, job, ms);
    }

    /// These numbers with the shared ones, as the wire carries them; every job of `catalog`
    /// is named, at zero if nothing was counted for it (within the cap).
    pub fn view<'a>(&self, io: &IoMeters, catalog: impl Iterator<Item = &'a str>) -> BrokerMetrics {
        let catalog: Vec<&str> = catalog.collect();
        let mut runs_ended = self.runs_ended.clone();
        name_jobs(&mut runs_ended, &catalog, final_states_at_zero);
        let mut task_duration = self.task_duration.clone();
        name_jobs(&mut task_duration, &catalog, || {
            Histogram::new(TASK_SECONDS)
        });
        let mut queue_wait = self.queue_wait.clone();
        name_jobs(&mut queue_wait, &catalog, || Histogram::new(WAIT_SECONDS));
        let views = |m: BTreeMap<String, Histogram>| {
            m.into_iter().map(|(job, h)| (job, h.view())).collect()
        };
        BrokerMetrics {
            runs_ended,
            task_duration: views(task_duration),
            queue_wait: views(queue_wait),
            journal_commit: io.journal_commit(),
            frames_sent: io.frames_sent.load(Ordering::Relaxed),
            ..BrokerMetrics::default()
        }
    }
}

/// Numbers the journal and publisher threads keep, read by the engine.
#[derive(Debug)]
pub struct IoMeters {
    /// Frames sent on PUB.
    frames_sent: AtomicU64,
    journal_commit: Mutex<Histogram>,
}

impl Default for IoMeters {
    fn default() -> Self {
        IoMeters {
            frames_sent: AtomicU64::new(0),
            journal_commit: Mutex::new(Histogram::new(COMMIT_SECONDS)),
        }
    }
}

impl IoMeters {
    /// One journal commit took `took`.
    pub fn committed(&self, took: Duration) {
        if let Ok(mut h) = self.journal_commit.lock() {
            h.observe(took.as_secs_f64());
        }
    }

    /// One frame went out.
    pub fn sent(&self) {
        self.frames_sent.fetch_add(1, Ordering::Relaxed);
    }

    fn journal_commit(&self) -> HistogramView {
        self.journal_commit
            .lock()
            .map(|h| h.view())
            .unwrap_or_else(|_| Histogram::new(COMMIT_SECONDS).view())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_holds_them() {
        let mut h = Histogram::new(&[1.0, 5.0]);
        for s in [0.5, 1.0, 1.5, 5.0, 7.0, -3.0, f64::NAN] {
            h.observe(s);
        }
        let view = h.view();
        assert_eq!(view.counts, vec![4, 2, 1]);
        assert_eq!(view.sum, 0.5 + 1.0 + 1.5 + 5.0 + 7.0);
        assert_eq!(view.count(), 7);
        assert_eq!(view.buckets(), vec![(1.0, 4), (5.0, 2), (f64::INFINITY, 1)]);
    }

    #[test]
    fn jobs_beyond_the_cap_are_folded_into_other() {
        let mut m = JobMeters::default();
        for i in 0..MAX_METRIC_JOBS + 5 {
            m.run_ended(&format!("job{i}"), RunState::Succeeded);
            m.task_ran(&format!("job{i}"), 1500);
        }
        m.run_ended("job0", RunState::Failed);
        let view = m.view(&IoMeters::default(), std::iter::empty());
        assert_eq!(view.runs_ended.len(), MAX_METRIC_JOBS + 1);
        assert_eq!(view.runs_ended[OTHER_JOBS]["succeeded"], 5);
        assert_eq!(view.runs_ended["job0"]["failed"], 1);
        assert_eq!(view.runs_ended["job1"]["cancelled"], 0);
        assert_eq!(view.task_duration.len(), MAX_METRIC_JOBS + 1);
        assert_eq!(view.task_duration[OTHER_JOBS].count(), 5);
        assert_eq!(view.journal_commit.count(), 0);
        assert_eq!(view.journal_commit.counts.len(), COMMIT_SECONDS.len() + 1);
    }

    #[test]
    fn catalog_jobs_are_named_at_zero() {
        let mut m = JobMeters::default();
        m.run_ended("a", RunState::Failed);
        let view = m.view(&IoMeters::default(), ["a", "b"].into_iter());
        assert_eq!(view.runs_ended["a"]["failed"], 1);
        assert_eq!(view.runs_ended["b"]["succeeded"], 0);
        assert_eq!(view.task_duration["b"].count(), 0);
        assert_eq!(view.queue_wait["a"].counts.len(), WAIT_SECONDS.len() + 1);
    }
}
