//! The barriers and schedules the semaphores last reported, for `GET /semaphores` and
//! `GET /schedules`.
//!
//! Held per principal (`semaphore:s1`), not per sender id: one principal may run several
//! processes (`semaphore:s1/<random>` each, e.g. an availability pair), but it cannot make
//! the broker hold more than [`MAX_REPORTERS_PER_PRINCIPAL`] reports of at most
//! [`MAX_REPORT_BYTES`] each, however many sender ids it invents. All reports together stay
//! under [`MAX_TOTAL_BYTES`] and [`MAX_REPORTS`] (plain mode has no enrolment to bound the
//! principals); the least recently updated give way. Reports older than [`REPORT_TTL_MS`]
//! are forgotten.

use std::collections::BTreeMap;
use std::mem::size_of;

use jobz::message::{BarrierView, ConditionView, ScheduleView};
use tracing::warn;

/// Barrier views kept of one report (a semaphore reports at most 500), and as many
/// schedule views.
pub const MAX_VIEWS_PER_REPORT: usize = 500;
/// Estimated bytes kept of one report; the views beyond are trimmed.
pub const MAX_REPORT_BYTES: usize = 1 << 20;
/// Reports (processes) kept per principal; the least recently updated gives way.
pub const MAX_REPORTERS_PER_PRINCIPAL: usize = 4;
/// Reports kept in all.
pub const MAX_REPORTS: usize = 1024;
/// Estimated bytes of all reports together.
pub const MAX_TOTAL_BYTES: usize = 32 << 20;
/// A report older than this is stale: not shown, then forgotten.
pub const REPORT_TTL_MS: i64 = 10 * 60 * 1000;
/// At most one warning about trimmed reports this often.
const TRIM_WARNING_EVERY_MS: i64 = 60 * 1000;

/// What recording one report cost.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Views of this report not kept (over the count or byte limit), barriers and
    /// schedules together.
    pub trimmed: usize,
    /// Older reports forgotten to make room.
    pub evicted: usize,
}

/// One process's latest report.
#[derive(Debug)]
struct Report {
    sender: String,
    views: Vec<BarrierView>,
    schedules: Vec<ScheduleView>,
    at_ms: i64,
    /// Estimated bytes held, including the sender id.
    bytes: usize,
}

/// The latest report of each semaphore process, bounded (see the module docs).
#[derive(Debug, Default)]
pub struct SemaphoreReports {
    by_principal: BTreeMap<String, Vec<Report>>,
    bytes: usize,
    reports: usize,
    trim_warned_at: Option<i64>,
}

impl SemaphoreReports {
    /// Records `views` and `schedules` as the latest report of process `sender` of
    /// `principal`.
    pub fn record(
        &mut self,
        principal: &str,
        sender: &str,
        mut views: Vec<BarrierView>,
        mut schedules: Vec<ScheduleView>,
        now: i64,
    ) -> Recorded {
        let mut recorded = Recorded::default();
        let mut bytes = size_of::<Report>() + principal.len() + sender.len();
        recorded.trimmed += keep_within(&mut views, &mut bytes, view_bytes);
        recorded.trimmed += keep_within(&mut schedules, &mut bytes, schedule_bytes);
        if recorded.trimmed > 0
            && self
                .trim_warned_at
                .is_none_or(|at| now - at >= TRIM_WARNING_EVERY_MS)
        {
            self.trim_warned_at = Some(now);
            warn!(principal, sender, kept = views.len() + schedules.len(), trimmed = recorded.trimmed,
                "a semaphore status is over the broker's limit ({MAX_VIEWS_PER_REPORT} barriers, {MAX_REPORT_BYTES} bytes); the rest is not shown");
        }

        self.forget(principal, |r| r.sender == sender);
        while self
            .by_principal
            .get(principal)
            .is_some_and(|reports| reports.len() >= MAX_REPORTERS_PER_PRINCIPAL)
        {
            self.forget_oldest(Some(principal));
            recorded.evicted += 1;
        }
        while self.reports >= MAX_REPORTS || self.bytes + bytes > MAX_TOTAL_BYTES {
            if !self.forget_oldest(None) {
                break;
            }
            recorded.evicted += 1;
        }
        self.bytes += bytes;
        self.reports += 1;
        self.by_principal
            .entry(principal.to_owned())
            .or_default()
            .push(Report {
                sender: sender.to_owned(),
                views,
                schedules,
                at_ms: now,
                bytes,
            });
        recorded
    }

    /// Forgets reports older than [`REPORT_TTL_MS`].
    pub fn prune(&mut self, now: i64) {
        let principals: Vec<String> = self.by_principal.keys().cloned().collect();
        for principal in principals {
            self.forget(&principal, |r| now - r.at_ms > REPORT_TTL_MS);
        }
    }

    /// Barriers as the semaphores reported them; a key two processes track appears once,
    /// as the one that got furthest. Stale reports are ignored.
    pub fn views(&self, now: i64) -> Vec<BarrierView> {
        let rank = |b: &BarrierView| (b.state != "waiting", b.runs.len());
        let mut merged: BTreeMap<(&str, &str), &BarrierView> = BTreeMap::new();
        for view in self.fresh(now).flat_map(|r| &r.views) {
            let key = (view.semaphore.as_str(), view.key.as_str());
            match merged.get(&key) {
                Some(existing) if rank(existing) >= rank(view) => {}
                _ => {
                    merged.insert(key, view);
                }
            }
        }
        merged.into_values().cloned().collect()
    }

    /// Schedules as the semaphores reported them; a schedule two processes serve appears
    /// once, as the one that fired the latest slot. Stale reports are ignored.
    pub fn schedules(&self, now: i64) -> Vec<ScheduleView> {
        let rank = |s: &ScheduleView| (s.last_slot_ms, s.last_run.is_some());
        let mut merged: BTreeMap<&str, &ScheduleView> = BTreeMap::new();
        for view in self.fresh(now).flat_map(|r| &r.schedules) {
            match merged.get(view.schedule.as_str()) {
                Some(existing) if rank(existing) >= rank(view) => {}
                _ => {
                    merged.insert(&view.schedule, view);
                }
            }
        }
        merged.into_values().cloned().collect()
    }

    /// Reports younger than [`REPORT_TTL_MS`].
    fn fresh(&self, now: i64) -> impl Iterator<Item = &Report> {
        self.by_principal
            .values()
            .flatten()
            .filter(move |r| now - r.at_ms <= REPORT_TTL_MS)
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Reports held.
    pub fn len(&self) -> usize {
        self.reports
    }

    /// True when no report is held.
    pub fn is_empty(&self) -> bool {
        self.reports == 0
    }

    /// Forgets the reports of `principal` that `matches`.
    fn forget(&mut self, principal: &str, matches: impl Fn(&Report) -> bool) {
        let Some(reports) = self.by_principal.get_mut(principal) else {
            return;
        };
        reports.retain(|r| {
            if matches(r) {
                self.bytes -= r.bytes;
                self.reports -= 1;
                false
            } else {
                true
            }
        });
        if reports.is_empty() {
            self.by_principal.remove(principal);
        }
    }

    /// Forgets the least recently updated report (of `principal`, or of anyone); false if
    /// there is none.
    fn forget_oldest(&mut self, principal: Option<&str>) -> bool {
        let oldest = self
            .by_principal
            .iter()
            .filter(|(p, _)| principal.is_none_or(|only| only == p.as_str()))
            .flat_map(|(p, reports)| reports.iter().map(move |r| (r.at_ms, p, &r.sender)))
            .min()
            .map(|(_, p, sender)| (p.clone(), sender.clone()));
        let Some((principal, sender)) = oldest else {
            return false;
        };
        self.forget(&principal, |r| r.sender == sender);
        true
    }
}

/// Keeps the first views of `list` that fit [`MAX_VIEWS_PER_REPORT`] and, added to
/// `bytes`, [`MAX_REPORT_BYTES`]; returns how many were dropped.
fn keep_within<T>(list: &mut Vec<T>, bytes: &mut usize, cost: fn(&T) -> usize) -> usize {
    let mut keep = 0;
    for item in list.iter().take(MAX_VIEWS_PER_REPORT) {
        let item_bytes = cost(item);
        if *bytes + item_bytes > MAX_REPORT_BYTES {
            break;
        }
        *bytes += item_bytes;
        keep += 1;
    }
    let dropped = list.len() - keep;
    list.truncate(keep);
    // The capacity the decoder allocated for the whole list goes too.
    list.shrink_to_fit();
    dropped
}

/// What a schedule view costs in memory, estimated from its parts.
fn schedule_bytes(view: &ScheduleView) -> usize {
    size_of::<ScheduleView>()
        + view.schedule.len()
        + view.job.len()
        + view.cron.as_ref().map_or(0, String::len)
        + view.timezone.len()
        + view.catch_up.len()
        + view.last_run.as_ref().map_or(0, String::len)
        + view.reporter.len()
}

/// What a view costs in memory, estimated from its parts (the decoder allocates strings of
/// exactly their length).
fn view_bytes(view: &BarrierView) -> usize {
    let string = size_of::<String>();
    size_of::<BarrierView>()
        + view.semaphore.len()
        + view.key.len()
        + view.state.len()
        + view.reporter.len()
        + view.started_run.as_ref().map_or(0, String::len)
        // A map entry: key, value and a share of its node.
        + view
            .params
            .iter()
            .map(|(k, v)| 3 * string + k.len() + v.len())
            .sum::<usize>()
        + view
            .conditions
            .iter()
            .map(|c| size_of::<ConditionView>() + c.job.len())
            .sum::<usize>()
        + view.runs.iter().map(|r| string + r.len()).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000;

    fn view(semaphore: &str, key: &str, reporter: &str, runs: usize) -> BarrierView {
        BarrierView {
            semaphore: semaphore.into(),
            key: key.into(),
            params: Default::default(),
            conditions: vec![],
            state: "waiting".into(),
            runs: (0..runs).map(|i| format!("run-{i}")).collect(),
            started_run: None,
            opened_at_ms: 0,
            reporter: reporter.into(),
        }
    }

    fn report(reporter: &str, n: usize) -> Vec<BarrierView> {
        (0..n)
            .map(|i| view("nightly", &format!("k{i}"), reporter, 1))
            .collect()
    }

    #[test]
    fn one_principal_holds_a_bounded_number_of_reports_however_many_sender_ids_it_uses() {
        let mut reports = SemaphoreReports::default();
        for i in 0..1000 {
            let sender = format!("semaphore:s1/{i:08x}");
            reports.record("semaphore:s1", &sender, report(&sender, 3), vec![], T0 + i);
        }
        assert_eq!(reports.len(), MAX_REPORTERS_PER_PRINCIPAL);
        let one = reports.bytes() / MAX_REPORTERS_PER_PRINCIPAL;
        assert!(one < 2_000, "{one} bytes for a report of three small views");
        // The newest processes are the ones kept.
        let shown = reports.views(T0 + 1000);
        assert_eq!(shown.len(), 3, "the same keys, merged");
        assert!(shown.iter().all(|v| v.reporter.ends_with("000003e7")
            || v.reporter.ends_with("000003e6")
            || v.reporter.ends_with("000003e5")
            || v.reporter.ends_with("000003e4")));
    }

    #[test]
    fn a_report_over_the_view_or_byte_limit_is_trimmed_and_the_trim_counted() {
        let mut reports = SemaphoreReports::default();
        let sender = "semaphore:s1/a";
        let recorded = reports.record("semaphore:s1", sender, report(sender, 2000), vec![], T0);
        assert_eq!(recorded.trimmed, 2000 - MAX_VIEWS_PER_REPORT);
        assert_eq!(reports.views(T0).len(), MAX_VIEWS_PER_REPORT);

        let fat: Vec<BarrierView> = (0..50)
            .map(|i| view("nightly", &format!("k{i}"), sender, 2_000))
            .collect();
        let recorded = reports.record("semaphore:s1", sender, fat, vec![], T0 + 1);
        assert!(recorded.trimmed > 0, "{recorded:?}");
        assert!(reports.bytes() <= MAX_REPORT_BYTES, "{}", reports.bytes());
        assert_eq!(
            reports.len(),
            1,
            "the process's earlier report was replaced"
        );
    }

    #[test]
    fn all_reports_together_stay_under_the_total_limits() {
        let mut reports = SemaphoreReports::default();
        let big: Vec<BarrierView> = (0..MAX_VIEWS_PER_REPORT)
            .map(|i| view("nightly", &format!("k{i}"), "x", 200))
            .collect();
        for i in 0..100 {
            let principal = format!("semaphore:s{i}");
            reports.record(&principal, &principal, big.clone(), vec![], T0 + i);
            assert!(reports.bytes() <= MAX_TOTAL_BYTES);
        }
        for i in 0..(2 * MAX_REPORTS) {
            let principal = format!("semaphore:t{i}");
            reports.record(&principal, &principal, vec![], vec![], T0 + 100 + i as i64);
            assert!(reports.len() <= MAX_REPORTS);
        }
    }

    #[test]
    fn stale_reports_are_hidden_then_forgotten() {
        let mut reports = SemaphoreReports::default();
        reports.record(
            "semaphore:s1",
            "semaphore:s1/a",
            report("semaphore:s1/a", 2),
            vec![],
            T0,
        );
        reports.record(
            "semaphore:s2",
            "semaphore:s2/a",
            report("semaphore:s2/a", 1),
            vec![],
            T0 + REPORT_TTL_MS,
        );
        let later = T0 + REPORT_TTL_MS + 1;
        assert_eq!(reports.views(later).len(), 1);
        reports.prune(later);
        assert_eq!(reports.len(), 1);
        reports.prune(later + REPORT_TTL_MS);
        assert!(reports.is_empty());
        assert_eq!(reports.bytes(), 0);
    }

    fn schedule(name: &str, reporter: &str, last_slot_ms: Option<i64>) -> ScheduleView {
        ScheduleView {
            schedule: name.into(),
            job: "ledger".into(),
            cron: None,
            every_ms: Some(2000),
            offset_ms: Some(0),
            timezone: "UTC".into(),
            catch_up: "none".into(),
            next_fire_ms: Some(T0 + 2000),
            last_slot_ms,
            last_run: last_slot_ms.map(|s| format!("run-{s}")),
            pending: 0,
            settled_ms: None,
            reporter: reporter.into(),
        }
    }

    #[test]
    fn a_schedule_two_processes_serve_is_shown_once_as_the_one_that_fired_last() {
        let mut reports = SemaphoreReports::default();
        let (a, b) = ("semaphore:s1/a", "semaphore:s2/b");
        reports.record(
            "semaphore:s1",
            a,
            vec![],
            vec![schedule("tick", a, Some(T0))],
            T0,
        );
        reports.record(
            "semaphore:s2",
            b,
            vec![],
            vec![
                schedule("tick", b, Some(T0 + 2000)),
                schedule("other", b, None),
            ],
            T0,
        );
        let shown = reports.schedules(T0);
        assert_eq!(shown.len(), 2);
        let tick = shown.iter().find(|s| s.schedule == "tick").unwrap();
        assert_eq!(
            (tick.reporter.as_str(), tick.last_slot_ms),
            (b, Some(T0 + 2000))
        );
        // Stale reports are not shown.
        assert!(reports.schedules(T0 + REPORT_TTL_MS + 1).is_empty());
    }

    #[test]
    fn schedules_count_against_a_reports_limits() {
        let mut reports = SemaphoreReports::default();
        let sender = "semaphore:s1/a";
        let many: Vec<ScheduleView> = (0..2_000)
            .map(|i| schedule(&format!("s{i}"), sender, Some(T0)))
            .collect();
        let recorded = reports.record("semaphore:s1", sender, report(sender, 10), many, T0);
        assert_eq!(recorded.trimmed, 2_000 - MAX_VIEWS_PER_REPORT);
        assert_eq!(reports.schedules(T0).len(), MAX_VIEWS_PER_REPORT);
        assert!(reports.bytes() <= MAX_REPORT_BYTES);
    }

    #[test]
    fn the_furthest_report_of_a_barrier_is_shown() {
        let mut reports = SemaphoreReports::default();
        let mut fired = view("nightly", "d1", "semaphore:s1/b", 2);
        fired.state = "fired".into();
        reports.record(
            "semaphore:s1",
            "semaphore:s1/a",
            vec![view("nightly", "d1", "semaphore:s1/a", 3)],
            vec![],
            T0,
        );
        reports.record("semaphore:s1", "semaphore:s1/b", vec![fired], vec![], T0);
        let shown = reports.views(T0);
        assert_eq!(shown.len(), 1);
        assert_eq!(shown[0].state, "fired");
    }
}
