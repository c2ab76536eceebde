//! Who serves what: the live workers and the job catalog they registered.
//!
//! Workers register with every heartbeat; the catalog is the union of the jobs they serve.
//! A worker is live while its last heartbeat is younger than the expiry. A worker that
//! says it is leaving (it stops) is given nothing new and is not listed live; when its
//! heartbeats have expired it is forgotten (not lost), unless it came back first (a
//! restart). An operator may forget a lost one.
//!
//! A job's parameter patterns are compiled when its definition enters the catalog, never
//! when a trigger is checked. A definition whose patterns cannot be compiled (malformed, or
//! over the size limit) is refused: it is not catalogued and its worker is not given the
//! job, while the worker's other jobs register as usual.

use std::collections::{BTreeMap, BTreeSet};

use jobz::jobfile::{JobSpec, ParamRules};
use jobz::message::{
    is_valid_counter_name, JobView, WorkerStatus, WorkerView, MAX_WORKER_COUNTERS,
};
use tracing::{info, warn};

/// A registered worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Worker {
    pub name: String,
    pub instance: String,
    pub jobs: BTreeSet<String>,
    pub capabilities: Vec<String>,
    pub slots: u32,
    pub running: u32,
    pub version: String,
    pub last_seen_ms: i64,
    pub live: bool,
    /// It said it is stopping (not stored: a restarted broker hears it again).
    pub leaving: bool,
    /// Its own counters, as its last heartbeat gave them (not stored).
    pub counters: BTreeMap<String, u64>,
}

/// A job in the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    pub spec: JobSpec,
    /// The worker whose registration last set the spec.
    pub source: String,
    pub updated_at_ms: i64,
}

/// What a heartbeat changed.
#[derive(Debug, Default, PartialEq)]
pub struct Registration {
    /// The worker was unknown or expired and is live again.
    pub became_live: bool,
    /// The worker process restarted (new instance id); holds the old one.
    pub restarted_from: Option<String>,
    /// The set of served jobs or a job spec changed: persist it.
    pub changed: bool,
    /// Definitions refused by this heartbeat (not by an earlier one): job and reason.
    pub refused: Vec<(String, String)>,
    /// The worker said, for the first time, that it is leaving.
    pub started_leaving: bool,
}

/// A worker whose heartbeats expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub name: String,
    /// It had said it was leaving: it stopped cleanly and is forgotten, not lost.
    pub left: bool,
}

/// Why a worker cannot be forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgetRefusal {
    Unknown,
    Live,
}

#[derive(Debug, Default)]
pub struct Registry {
    workers: BTreeMap<String, Worker>,
    catalog: BTreeMap<String, Cataloged>,
    /// Per worker, the definitions its last heartbeat carried that were refused, so that one
    /// sent again is neither compiled nor reported again.
    refused: BTreeMap<String, BTreeMap<String, JobSpec>>,
}

/// A catalog entry with the patterns of its spec, compiled when it was registered.
#[derive(Debug)]
struct Cataloged {
    entry: CatalogEntry,
    params: ParamRules,
}

impl Registry {
    /// A registry restored from the store. Every restored worker gets a fresh `last_seen`:
    /// the broker was down, not the workers, so each has a full expiry to beat again.
    pub fn restore(workers: Vec<Worker>, catalog: Vec<CatalogEntry>, now_ms: i64) -> Self {
        Registry {
            workers: workers
                .into_iter()
                .map(|mut w| {
                    w.last_seen_ms = now_ms;
                    w.live = true;
                    (w.name.clone(), w)
                })
                .collect(),
            catalog: catalog
                .into_iter()
                .filter_map(|entry| match ParamRules::compile(&entry.spec) {
                    Ok(params) => Some((entry.spec.name.clone(), Cataloged { entry, params })),
                    Err(e) => {
                        warn!(job = %entry.spec.name, worker = %entry.source,
                            "stored job definition dropped until a worker registers a usable one: {e}");
                        None
                    }
                })
                .collect(),
            refused: BTreeMap::new(),
        }
    }

    /// Records a heartbeat. Definitions new to the catalog are compiled here, once.
    pub fn heartbeat(&mut self, status: &WorkerStatus, now_ms: i64) -> Registration {
        let mut reg = Registration::default();
        let was_refused = self.refused.remove(&status.name).unwrap_or_default();
        let mut refused = BTreeMap::new();
        let mut jobs = BTreeSet::new();
        for spec in &status.jobs {
            if was_refused.get(&spec.name) == Some(spec) {
                refused.insert(spec.name.clone(), spec.clone());
            } else if self.catalog_spec(spec, &status.name, now_ms, &mut reg) {
                jobs.insert(spec.name.clone());
            } else {
                refused.insert(spec.name.clone(), spec.clone());
            }
        }
        // A name both served and refused in one heartbeat (sent twice): not served.
        jobs.retain(|name| !refused.contains_key(name));
        if !refused.is_empty() {
            self.refused.insert(status.name.clone(), refused);
        }
        match self.workers.get_mut(&status.name) {
            Some(w) => {
                reg.became_live = !w.live && !status.leaving;
                reg.started_leaving = status.leaving && !w.leaving;
                if w.instance != status.instance {
                    reg.restarted_from = Some(w.instance.clone());
                    reg.changed = true;
                }
                if w.jobs != jobs
                    || w.slots != status.slots
                    || w.capabilities != status.capabilities
                    || w.version != status.version
                {
                    reg.changed = true;
                }
                w.instance = status.instance.clone();
                w.jobs = jobs;
                w.capabilities = status.capabilities.clone();
                w.slots = status.slots;
                w.running = status.running.len() as u32;
                w.version = status.version.clone();
                w.last_seen_ms = now_ms;
                w.live = true;
                w.leaving = status.leaving;
                w.counters = worker_counters(status, w.counters.get(COUNTERS_REFUSED));
            }
            None => {
                info!(worker = %status.name, jobs = jobs.len(), "worker registered");
                reg.became_live = !status.leaving;
                reg.started_leaving = status.leaving;
                reg.changed = true;
                self.workers.insert(
                    status.name.clone(),
                    Worker {
                        name: status.name.clone(),
                        instance: status.instance.clone(),
                        jobs,
                        capabilities: status.capabilities.clone(),
                        slots: status.slots,
                        running: status.running.len() as u32,
                        version: status.version.clone(),
                        last_seen_ms: now_ms,
                        live: true,
                        leaving: status.leaving,
                        counters: worker_counters(status, None),
                    },
                );
            }
        }
        reg
    }

    /// Puts `spec` in the catalog, compiling its patterns unless the catalog already holds
    /// exactly this definition. False if they cannot be compiled: the catalog keeps what it
    /// had, and the refusal is logged and reported in `reg`.
    fn catalog_spec(
        &mut self,
        spec: &JobSpec,
        worker: &str,
        now_ms: i64,
        reg: &mut Registration,
    ) -> bool {
        let current = self.catalog.get(&spec.name);
        if current.is_some_and(|c| c.entry.spec == *spec) {
            return true;
        }
        // What the worker's job-file parser checked is checked again: a registration is
        // input from the network, and notices go where the spec says.
        let checked = match spec.notify.iter().find_map(|n| n.to.problem()) {
            Some(problem) => Err(format!("notify: {problem}")),
            None => ParamRules::compile(spec).map_err(|e| e.to_string()),
        };
        let params = match checked {
            Ok(params) => params,
            Err(e) => {
                warn!(job = %spec.name, worker = %worker,
                    "job definition refused; the worker's other jobs still register: {e}");
                reg.refused.push((spec.name.clone(), e));
                return false;
            }
        };
        if let Some(previous) = current.map(|c| &c.entry.source) {
            if previous != worker {
                warn!(job = %spec.name, worker = %worker, previous = %previous,
                    "workers register different definitions of one job; the latest wins");
            }
        }
        let entry = CatalogEntry {
            spec: spec.clone(),
            source: worker.to_owned(),
            updated_at_ms: now_ms,
        };
        self.catalog
            .insert(spec.name.clone(), Cataloged { entry, params });
        reg.changed = true;
        true
    }

    /// Workers without a heartbeat for `expiry_ms`: those that had said they were leaving
    /// are forgotten, the others marked lost.
    pub fn expire(&mut self, now_ms: i64, expiry_ms: i64) -> Vec<Expired> {
        let mut expired = Vec::new();
        for w in self.workers.values_mut() {
            if w.live && now_ms - w.last_seen_ms > expiry_ms {
                w.live = false;
                expired.push(Expired {
                    name: w.name.clone(),
                    left: w.leaving,
                });
            }
        }
        for gone in expired.iter().filter(|e| e.left) {
            self.workers.remove(&gone.name);
            self.refused.remove(&gone.name);
        }
        expired
    }

    /// Marks one worker lost now (its key was revoked); false if it was not live.
    pub fn mark_lost(&mut self, name: &str) -> bool {
        match self.workers.get_mut(name) {
            Some(w) if w.live => {
                w.live = false;
                true
            }
            _ => false,
        }
    }

    pub fn worker(&self, name: &str) -> Option<&Worker> {
        self.workers.get(name)
    }

    pub fn job(&self, name: &str) -> Option<&JobSpec> {
        self.catalog.get(name).map(|c| &c.entry.spec)
    }

    /// A job and its parameter rules, compiled when it was registered.
    pub fn job_and_params(&self, name: &str) -> Option<(&JobSpec, &ParamRules)> {
        self.catalog.get(name).map(|c| (&c.entry.spec, &c.params))
    }

    pub fn catalog_entry(&self, name: &str) -> Option<&CatalogEntry> {
        self.catalog.get(name).map(|c| &c.entry)
    }

    /// Live workers that serve `job` (not leaving), in name order.
    pub fn live_workers_for<'a>(&'a self, job: &'a str) -> impl Iterator<Item = &'a Worker> + 'a {
        self.workers
            .values()
            .filter(move |w| w.live && !w.leaving && w.jobs.contains(job))
    }

    /// The names of the jobs in the catalog.
    pub fn job_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.catalog.keys().map(String::as_str)
    }

    /// Known workers by state: `live`, `leaving` (stopping, still known) and `lost` (no
    /// heartbeat within the expiry), every state named.
    pub fn count_by_state(&self) -> BTreeMap<String, u64> {
        let mut counts: BTreeMap<String, u64> = ["live", "leaving", "lost"]
            .iter()
            .map(|s| ((*s).to_owned(), 0))
            .collect();
        for w in self.workers.values() {
            let state = match (w.leaving, w.live) {
                (true, _) => "leaving",
                (false, true) => "live",
                (false, false) => "lost",
            };
            *counts.entry(state.to_owned()).or_default() += 1;
        }
        counts
    }

    pub fn live_count(&self) -> usize {
        self.workers
            .values()
            .filter(|w| w.live && !w.leaving)
            .count()
    }

    /// Forgets a worker that is lost or leaving (an operator's request).
    pub fn forget(&mut self, name: &str) -> Result<(), ForgetRefusal> {
        match self.workers.get(name) {
            None => Err(ForgetRefusal::Unknown),
            Some(w) if w.live && !w.leaving => Err(ForgetRefusal::Live),
            Some(_) => {
                self.workers.remove(name);
                self.refused.remove(name);
                Ok(())
            }
        }
    }

    pub fn worker_views(&self) -> Vec<WorkerView> {
        self.workers
            .values()
            .map(|w| WorkerView {
                name: w.name.clone(),
                jobs: w.jobs.iter().cloned().collect(),
                capabilities: w.capabilities.clone(),
                slots: w.slots,
                running: w.running,
                last_seen_ms: w.last_seen_ms,
                live: w.live && !w.leaving,
                leaving: w.leaving,
                version: w.version.clone(),
                counters: w.counters.clone(),
            })
            .collect()
    }

    pub fn job_views(&self) -> Vec<JobView> {
        self.catalog
            .values()
            .map(|Cataloged { entry: c, .. }| JobView {
                spec: c.spec.clone(),
                workers: self
                    .workers
                    .values()
                    .filter(|w| w.jobs.contains(&c.spec.name))
                    .map(|w| w.name.clone())
                    .collect(),
            })
            .collect()
    }
}

/// The counter under which the broker counts a worker's counters it left out.
const COUNTERS_REFUSED: &str = "counters_refused";

/// The counters of a heartbeat the broker keeps: well-named ones, at most
/// [`MAX_WORKER_COUNTERS`]. What it leaves out is counted under [`COUNTERS_REFUSED`], so
/// the worker's own line in `/metrics` says so (and logged when that number changes from
/// `refused_before`).
fn worker_counters(status: &WorkerStatus, refused_before: Option<&u64>) -> BTreeMap<String, u64> {
    let mut kept = BTreeMap::new();
    let mut refused = 0u64;
    for (name, value) in &status.counters {
        if is_valid_counter_name(name)
            && name != COUNTERS_REFUSED
            && kept.len() < MAX_WORKER_COUNTERS - 1
        {
            kept.insert(name.clone(), *value);
        } else {
            refused += 1;
        }
    }
    if refused > 0 {
        if refused_before != Some(&refused) {
            warn!(worker = %status.name, refused, "heartbeat counters left out (bad names or too many)");
        }
        kept.insert(COUNTERS_REFUSED.to_owned(), refused);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobz::jobfile::{Delivery, JobSpec};

    pub fn spec(name: &str) -> JobSpec {
        JobSpec {
            name: name.into(),
            description: String::new(),
            command: "true".into(),
            params: Default::default(),
            on_success: vec![],
            on_failure: vec![],
            delivery: Delivery::Broadcast,
            timeout_ms: None,
            retries: 0,
            retry_backoff_ms: 10,
            tags: vec![],
            run_as: None,
            priority: 0,
            max_concurrency: None,
            inputs: vec![],
            outputs: vec![],
            output_ttl_ms: None,
            notify: vec![],
        }
    }

    fn status(name: &str, instance: &str, jobs: &[&str]) -> WorkerStatus {
        WorkerStatus {
            name: name.into(),
            instance: instance.into(),
            jobs: jobs.iter().map(|j| spec(j)).collect(),
            capabilities: vec![],
            slots: 2,
            running: vec![],
            version: "0".into(),
            counters: Default::default(),
            leaving: false,
        }
    }

    fn with_pattern(mut spec: JobSpec, pattern: &str) -> JobSpec {
        spec.params.insert(
            "v".into(),
            jobz::jobfile::ParamSpec {
                required: true,
                pattern: pattern.into(),
            },
        );
        spec
    }

    #[test]
    fn a_heartbeat_with_an_oversized_pattern_still_registers_the_workers_other_jobs() {
        let mut r = Registry::default();
        let mut hb = status("w1", "i1", &["small"]);
        hb.jobs[0] = with_pattern(spec("small"), "^[a-z]+$");
        // Twenty of these stalled the broker for seconds on every trigger.
        hb.jobs.push(with_pattern(spec("huge"), r"^\w{100}$"));
        hb.jobs.push(with_pattern(spec("broken"), "(unclosed"));
        let reg = r.heartbeat(&hb, 0);
        let refused: Vec<&str> = reg.refused.iter().map(|(job, _)| job.as_str()).collect();
        assert_eq!(refused, ["huge", "broken"]);
        assert!(reg.refused[0].1.contains("size limit"), "{:?}", reg.refused);
        assert!(r.job("small").is_some());
        assert_eq!(r.live_workers_for("small").count(), 1);
        for refused in ["huge", "broken"] {
            assert!(
                r.job(refused).is_none(),
                "{refused} must not be in the catalog"
            );
            assert!(
                r.live_workers_for(refused).next().is_none(),
                "w1 must not be given {refused}"
            );
        }
        // The same heartbeat again: nothing compiled, nothing reported twice.
        let compiled = jobz::jobfile::patterns_compiled_on_this_thread();
        assert_eq!(r.heartbeat(&hb, 100), Registration::default());
        assert_eq!(jobz::jobfile::patterns_compiled_on_this_thread(), compiled);
        // A usable definition of the refused job registers.
        hb.jobs[1] = with_pattern(spec("huge"), r"^(?-u:\w){100}$");
        let reg = r.heartbeat(&hb, 200);
        assert!(reg.changed && reg.refused.is_empty(), "{reg:?}");
        assert_eq!(r.live_workers_for("huge").count(), 1);
    }

    #[test]
    fn a_registered_job_naming_a_malformed_notify_target_is_refused() {
        use jobz::jobfile::{Notify, NotifyOn, NotifyTarget};

        let mut r = Registry::default();
        let mut hb = status("w1", "i1", &["fine"]);
        // What no job-file parser would give, from a worker speaking the wire itself: a
        // header injected after the address, a webhook "name" that is a path.
        for (job, target) in [
            (
                "smuggler",
                NotifyTarget::Email("a@b.c\r\nBcc: all@example.com".into()),
            ),
            ("pathy", NotifyTarget::Webhook("../etc".into())),
        ] {
            let mut spec = spec(job);
            spec.notify = vec![Notify {
                to: target,
                on: NotifyOn::Always,
            }];
            hb.jobs.push(spec);
        }
        let reg = r.heartbeat(&hb, 0);
        let refused: Vec<&str> = reg.refused.iter().map(|(job, _)| job.as_str()).collect();
        assert_eq!(refused, ["smuggler", "pathy"]);
        assert!(
            reg.refused
                .iter()
                .all(|(_, why)| why.starts_with("notify: ")),
            "{reg:?}"
        );
        assert!(r.job("fine").is_some());
        assert!(r.job("smuggler").is_none() && r.job("pathy").is_none());
    }

    #[test]
    fn a_stored_definition_that_no_longer_compiles_is_dropped_on_restore() {
        let entry = |spec| CatalogEntry {
            spec,
            source: "w1".into(),
            updated_at_ms: 0,
        };
        let r = Registry::restore(
            vec![],
            vec![
                entry(with_pattern(spec("ok"), "[a-z]+")),
                entry(with_pattern(spec("huge"), r"^\w{100}$")),
            ],
            0,
        );
        assert!(r.job("ok").is_some());
        assert!(r.job("huge").is_none());
    }

    #[test]
    fn heartbeat_registers_expires_and_detects_restart() {
        let mut r = Registry::default();
        let reg = r.heartbeat(&status("a", "i1", &["x"]), 0);
        assert!(reg.became_live && reg.changed);
        assert_eq!(r.live_workers_for("x").count(), 1);
        assert_eq!(
            r.heartbeat(&status("a", "i1", &["x"]), 100),
            Registration::default()
        );
        assert_eq!(r.expire(1000, 2000), Vec::new());
        assert_eq!(
            r.expire(3000, 2000),
            vec![Expired {
                name: "a".into(),
                left: false
            }]
        );
        assert!(r.live_workers_for("x").next().is_none());
        let reg = r.heartbeat(&status("a", "i2", &["x", "y"]), 3100);
        assert!(reg.became_live);
        assert_eq!(reg.restarted_from.as_deref(), Some("i1"));
        assert!(r.job("y").is_some());
    }

    #[test]
    fn a_leaving_worker_gets_nothing_new_and_is_forgotten_when_it_expires() {
        let mut r = Registry::default();
        r.heartbeat(&status("a", "i1", &["x"]), 0);
        r.heartbeat(&status("b", "i1", &["x"]), 0);
        let mut leaving = status("a", "i1", &["x"]);
        leaving.leaving = true;
        let reg = r.heartbeat(&leaving, 100);
        assert!(reg.started_leaving && !reg.became_live);
        assert!(!r.heartbeat(&leaving, 150).started_leaving, "said once");
        let names: Vec<&str> = r.live_workers_for("x").map(|w| w.name.as_str()).collect();
        assert_eq!(names, vec!["b"], "no new work for a leaving worker");
        assert_eq!(r.live_count(), 1);
        let view = r
            .worker_views()
            .into_iter()
            .find(|v| v.name == "a")
            .unwrap();
        assert!(!view.live && view.leaving, "off the live list: {view:?}");

        // It stopped: its heartbeats expire, and it is forgotten rather than lost.
        r.heartbeat(&status("b", "i1", &["x"]), 3000);
        assert_eq!(
            r.expire(3000, 2000),
            vec![Expired {
                name: "a".into(),
                left: true
            }]
        );
        assert!(r.worker("a").is_none());

        // A restart before that: live again, given work again.
        let mut back = status("b", "i1", &["x"]);
        back.leaving = true;
        r.heartbeat(&back, 3100);
        let reg = r.heartbeat(&status("b", "i2", &["x"]), 3200);
        assert_eq!(reg.restarted_from.as_deref(), Some("i1"));
        assert_eq!(r.live_workers_for("x").count(), 1);
        assert!(!r.worker("b").unwrap().leaving);
    }

    #[test]
    fn only_a_lost_or_leaving_worker_can_be_forgotten() {
        let mut r = Registry::default();
        r.heartbeat(&status("a", "i1", &["x"]), 0);
        assert_eq!(r.forget("a"), Err(ForgetRefusal::Live));
        assert_eq!(r.forget("nobody"), Err(ForgetRefusal::Unknown));
        r.expire(5000, 2000);
        assert_eq!(r.forget("a"), Ok(()));
        assert!(r.worker("a").is_none());
        assert!(r.worker_views().is_empty());
        let mut leaving = status("b", "i1", &["x"]);
        leaving.leaving = true;
        r.heartbeat(&leaving, 0);
        assert_eq!(r.forget("b"), Ok(()), "a leaving worker may be forgotten");
    }

    #[test]
    fn a_workers_counters_are_kept_bounded_and_well_named() {
        let mut r = Registry::default();
        let mut st = status("a", "i1", &["x"]);
        st.counters = [("output_files_pruned".to_string(), 3)].into();
        r.heartbeat(&st, 0);
        let view = &r.worker_views()[0];
        assert_eq!(view.counters, st.counters);

        // Bad names, a forged `counters_refused` and too many: left out and counted.
        st.counters = (0..40).map(|i| (format!("c{i:02}"), i)).collect();
        for bad in ["Bad", "a b", "counters_refused", ""] {
            st.counters.insert(bad.into(), 7);
        }
        r.heartbeat(&st, 100);
        let counters = &r.worker_views()[0].counters;
        assert_eq!(counters.len(), MAX_WORKER_COUNTERS);
        assert_eq!(counters.get("counters_refused"), Some(&(40 + 4 - 31)));
        assert!(counters.keys().all(|k| is_valid_counter_name(k)));
    }
}
