//! Who serves what: the live workers and the job catalog they registered.
//!
//! Workers register with every heartbeat; the catalog is the union of the jobs they serve.
//! A worker is live while its last heartbeat is younger than the expiry.

use std::collections::{BTreeMap, BTreeSet};

use jobz::jobfile::JobSpec;
use jobz::message::{JobView, WorkerStatus, WorkerView};
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
}

#[derive(Debug, Default)]
pub struct Registry {
    workers: BTreeMap<String, Worker>,
    catalog: BTreeMap<String, CatalogEntry>,
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
                .map(|c| (c.spec.name.clone(), c))
                .collect(),
        }
    }

    /// Records a heartbeat.
    pub fn heartbeat(&mut self, status: &WorkerStatus, now_ms: i64) -> Registration {
        let mut reg = Registration::default();
        let jobs: BTreeSet<String> = status.jobs.iter().map(|j| j.name.clone()).collect();
        match self.workers.get_mut(&status.name) {
            Some(w) => {
                reg.became_live = !w.live;
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
            }
            None => {
                info!(worker = %status.name, jobs = status.jobs.len(), "worker registered");
                reg.became_live = true;
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
                    },
                );
            }
        }
        for spec in &status.jobs {
            match self.catalog.get_mut(&spec.name) {
                Some(entry) if entry.spec == *spec => {}
                Some(entry) => {
                    if entry.source != status.name {
                        warn!(job = %spec.name, worker = %status.name, previous = %entry.source,
                            "workers register different definitions of one job; the latest wins");
                    }
                    entry.spec = spec.clone();
                    entry.source = status.name.clone();
                    entry.updated_at_ms = now_ms;
                    reg.changed = true;
                }
                None => {
                    self.catalog.insert(
                        spec.name.clone(),
                        CatalogEntry {
                            spec: spec.clone(),
                            source: status.name.clone(),
                            updated_at_ms: now_ms,
                        },
                    );
                    reg.changed = true;
                }
            }
        }
        reg
    }

    /// Marks workers without a heartbeat for `expiry_ms` as expired; returns their names.
    pub fn expire(&mut self, now_ms: i64, expiry_ms: i64) -> Vec<String> {
        let mut expired = Vec::new();
        for w in self.workers.values_mut() {
            if w.live && now_ms - w.last_seen_ms > expiry_ms {
                w.live = false;
                expired.push(w.name.clone());
            }
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
        self.catalog.get(name).map(|c| &c.spec)
    }

    pub fn catalog_entry(&self, name: &str) -> Option<&CatalogEntry> {
        self.catalog.get(name)
    }

    /// Live workers that serve `job`, in name order.
    pub fn live_workers_for(&self, job: &str) -> Vec<&Worker> {
        self.workers
            .values()
            .filter(|w| w.live && w.jobs.contains(job))
            .collect()
    }

    pub fn live_count(&self) -> usize {
        self.workers.values().filter(|w| w.live).count()
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
                live: w.live,
                version: w.version.clone(),
            })
            .collect()
    }

    pub fn job_views(&self) -> Vec<JobView> {
        self.catalog
            .values()
            .map(|c| JobView {
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
        }
    }

    #[test]
    fn heartbeat_registers_expires_and_detects_restart() {
        let mut r = Registry::default();
        let reg = r.heartbeat(&status("a", "i1", &["x"]), 0);
        assert!(reg.became_live && reg.changed);
        assert_eq!(r.live_workers_for("x").len(), 1);
        assert_eq!(
            r.heartbeat(&status("a", "i1", &["x"]), 100),
            Registration::default()
        );
        assert_eq!(r.expire(1000, 2000), Vec::<String>::new());
        assert_eq!(r.expire(3000, 2000), vec!["a".to_string()]);
        assert!(r.live_workers_for("x").is_empty());
        let reg = r.heartbeat(&status("a", "i2", &["x", "y"]), 3100);
        assert!(reg.became_live);
        assert_eq!(reg.restarted_from.as_deref(), Some("i1"));
        assert!(r.job("y").is_some());
    }
}
