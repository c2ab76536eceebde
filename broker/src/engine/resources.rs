//! Resources (jobspy's inputs and outputs): which exist, who holds them, who waits.
//!
//! A step of a job with `inputs:`/`outputs:` asks for all its resources at once. It gets
//! them when every input exists (written by a successful step or created by an operator,
//! and not expired) and no step writes it, and no step reads or writes any of its outputs;
//! then it holds them until it ends (across its retries: the output is mid-write). Nothing
//! is taken until all can be (no deadlock). Waiters are served first come, first served: a
//! waiter that is ready but blocked reserves its resources, so a later reader cannot pass a
//! waiting writer (no writer starvation). A waiter whose inputs do not exist yet reserves
//! nothing: the step that will write them must not wait behind it.
//!
//! Pure bookkeeping, no I/O: [`Resources`] answers which steps may start; the engine
//! journals what changed. Lineage edges (input -> job -> output) are kept with digit runs
//! collapsed (see [`collapse_digits`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use jobz::message::{ResourceHolder, ResourceView};

use crate::ids::{RunId, StepId};

/// A written resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub name: String,
    pub written_at_ms: i64,
    /// It counts as missing from then on.
    pub expires_at_ms: Option<i64>,
    /// The run whose step wrote it; `None`: created by an operator.
    pub run_id: Option<RunId>,
    /// The job that wrote it; `None`: created by an operator.
    pub job: Option<String>,
}

impl Written {
    fn exists_at(&self, now: i64) -> bool {
        self.expires_at_ms.is_none_or(|t| t > now)
    }
}

/// What one step asks for, its names filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs {
    pub run_id: RunId,
    pub job: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

impl Needs {
    /// Inputs it reads and does not also write (those it writes it holds alone).
    fn shared(&self) -> impl Iterator<Item = &String> {
        self.inputs.iter().filter(|i| !self.outputs.contains(i))
    }
}

/// One lineage edge: a resource read by a job, or written by one (digit runs collapsed).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Edge {
    Reads { resource: String, job: String },
    Writes { job: String, resource: String },
}

/// The resource table.
#[derive(Debug, Default)]
pub struct Resources {
    written: BTreeMap<String, Written>,
    readers: HashMap<String, BTreeSet<StepId>>,
    writers: HashMap<String, StepId>,
    held: HashMap<StepId, Needs>,
    /// In arrival order.
    waiting: BTreeMap<u64, (StepId, Needs)>,
    arrivals: u64,
    edges: BTreeSet<Edge>,
}

impl Resources {
    /// A table with these written resources and known edges (from the store).
    pub fn restore(written: Vec<Written>, edges: Vec<Edge>) -> Resources {
        Resources {
            written: written.into_iter().map(|w| (w.name.clone(), w)).collect(),
            edges: edges.into_iter().collect(),
            ..Resources::default()
        }
    }

    /// Whether `name` exists at `now`.
    pub fn exists(&self, name: &str, now: i64) -> bool {
        self.written.get(name).is_some_and(|w| w.exists_at(now))
    }

    /// `step` asks for `needs`: it joins the line, and the steps that may start now are
    /// returned (it among them if it got everything at once).
    pub fn request(&mut self, step: StepId, needs: Needs, now: i64) -> Vec<StepId> {
        self.arrivals += 1;
        self.waiting.insert(self.arrivals, (step, needs));
        self.grant(now)
    }

    /// `step` takes `needs` without asking: it held them before a restart (it was placed).
    pub fn hold(&mut self, step: StepId, needs: Needs) {
        self.take(&step, &needs);
        self.held.insert(step, needs);
    }

    /// What `step` holds, if it holds anything.
    pub fn needs_of(&self, step: &StepId) -> Option<&Needs> {
        self.held.get(step)
    }

    /// `step` ended: it lets go of what it held, or leaves the line. Returns the steps
    /// that may start now, and what it held (to mark its outputs written if it succeeded).
    pub fn release(&mut self, step: &StepId, now: i64) -> (Vec<StepId>, Option<Needs>) {
        let before = self.waiting.len();
        self.waiting.retain(|_, (s, _)| s != step);
        let held = self.held.remove(step);
        if let Some(needs) = &held {
            for input in needs.shared() {
                if let Some(readers) = self.readers.get_mut(input) {
                    readers.remove(step);
                    if readers.is_empty() {
                        self.readers.remove(input);
                    }
                }
            }
            for output in &needs.outputs {
                if self.writers.get(output) == Some(step) {
                    self.writers.remove(output);
                }
            }
        }
        let changed = held.is_some() || self.waiting.len() != before;
        let granted = if changed { self.grant(now) } else { Vec::new() };
        (granted, held)
    }

    /// Marks `names` written (a step succeeded, or an operator created them); returns the
    /// steps that may start now.
    pub fn write(&mut self, records: Vec<Written>, now: i64) -> Vec<StepId> {
        for record in records {
            self.written.insert(record.name.clone(), record);
        }
        self.grant(now)
    }

    /// Forgets that `name` was written (an operator cleared it). Steps holding it keep it.
    pub fn clear(&mut self, name: &str) -> bool {
        self.written.remove(name).is_some()
    }

    /// Forgets written resources that expired before `now`; returns their names.
    pub fn expire(&mut self, now: i64) -> Vec<String> {
        let gone: Vec<String> = self
            .written
            .values()
            .filter(|w| !w.exists_at(now))
            .map(|w| w.name.clone())
            .collect();
        for name in &gone {
            self.written.remove(name);
        }
        gone
    }

    /// Records the lineage of a step that got its resources; returns the edges not seen
    /// before (to journal).
    pub fn note_lineage(&mut self, needs: &Needs) -> Vec<Edge> {
        let job = needs.job.clone();
        let edges = needs
            .inputs
            .iter()
            .map(|i| Edge::Reads {
                resource: collapse_digits(i),
                job: job.clone(),
            })
            .chain(needs.outputs.iter().map(|o| Edge::Writes {
                job: job.clone(),
                resource: collapse_digits(o),
            }));
        edges.filter(|e| self.edges.insert(e.clone())).collect()
    }

    /// Every lineage edge, in order.
    pub fn edges(&self) -> impl Iterator<Item = &Edge> {
        self.edges.iter()
    }

    /// Serves the line in order: each ready waiter (its inputs exist) gets everything it
    /// asks for if no holder and no earlier ready waiter conflicts with it; otherwise it
    /// reserves what it asks for, so no later waiter passes it.
    fn grant(&mut self, now: i64) -> Vec<StepId> {
        let mut reserved_read: HashSet<String> = HashSet::new();
        let mut reserved_write: HashSet<String> = HashSet::new();
        let mut granted = Vec::new();
        for (seq, (_, needs)) in &self.waiting {
            if needs.inputs.iter().any(|i| !self.exists(i, now)) {
                continue;
            }
            let inputs_free = needs
                .shared()
                .all(|i| !self.writers.contains_key(i) && !reserved_write.contains(i));
            let outputs_free = needs.outputs.iter().all(|o| {
                !self.writers.contains_key(o)
                    && !self.readers.contains_key(o)
                    && !reserved_write.contains(o)
                    && !reserved_read.contains(o)
            });
            if inputs_free && outputs_free {
                granted.push(*seq);
            }
            // Granted or not, later waiters come after it on these.
            reserved_read.extend(needs.shared().cloned());
            reserved_write.extend(needs.outputs.iter().cloned());
        }
        let mut steps = Vec::with_capacity(granted.len());
        for seq in granted {
            if let Some((step, needs)) = self.waiting.remove(&seq) {
                self.take(&step, &needs);
                self.held.insert(step.clone(), needs);
                steps.push(step);
            }
        }
        steps
    }

    fn take(&mut self, step: &StepId, needs: &Needs) {
        for input in needs.shared() {
            self.readers
                .entry(input.clone())
                .or_default()
                .insert(step.clone());
        }
        for output in &needs.outputs {
            self.writers.insert(output.clone(), step.clone());
        }
    }

    /// What `GET /resources` shows: every resource written, held or waited for, by name.
    pub fn views(&self, now: i64) -> Vec<ResourceView> {
        let mut names: BTreeSet<&str> = self.written.keys().map(String::as_str).collect();
        names.extend(self.readers.keys().map(String::as_str));
        names.extend(self.writers.keys().map(String::as_str));
        for (_, needs) in self.waiting.values() {
            names.extend(needs.inputs.iter().map(String::as_str));
            names.extend(needs.outputs.iter().map(String::as_str));
        }
        let holder = |step: &StepId, mode: &str| {
            let needs = self.held.get(step).or_else(|| {
                self.waiting
                    .values()
                    .find(|(s, _)| s == step)
                    .map(|(_, n)| n)
            });
            ResourceHolder {
                step_id: step.to_string(),
                run_id: needs.map(|n| n.run_id.to_string()).unwrap_or_default(),
                job: needs.map(|n| n.job.clone()).unwrap_or_default(),
                mode: mode.to_owned(),
            }
        };
        names
            .into_iter()
            .map(|name| {
                let written = self.written.get(name);
                let mut holders: Vec<ResourceHolder> = Vec::new();
                if let Some(step) = self.writers.get(name) {
                    holders.push(holder(step, "write"));
                }
                for step in self.readers.get(name).into_iter().flatten() {
                    holders.push(holder(step, "read"));
                }
                let waiters = self
                    .waiting
                    .values()
                    .filter_map(|(step, needs)| {
                        if needs.outputs.iter().any(|o| o == name) {
                            Some(holder(step, "write"))
                        } else if needs.inputs.iter().any(|i| i == name) {
                            Some(holder(step, "read"))
                        } else {
                            None
                        }
                    })
                    .collect();
                ResourceView {
                    name: name.to_owned(),
                    exists: written.is_some_and(|w| w.exists_at(now)),
                    written_at_ms: written.map(|w| w.written_at_ms),
                    expires_at_ms: written.and_then(|w| w.expires_at_ms),
                    written_by_run: written.and_then(|w| w.run_id.as_ref().map(|r| r.to_string())),
                    written_by_job: written.and_then(|w| w.job.clone()),
                    holders,
                    waiters,
                }
            })
            .collect()
    }

    /// Why `step` waits, for its run's view: the inputs missing, else the resources held
    /// or reserved by others.
    pub fn waiting_reason(&self, step: &StepId, now: i64) -> Option<String> {
        let (_, needs) = self.waiting.values().find(|(s, _)| s == step)?;
        let missing: Vec<&str> = needs
            .inputs
            .iter()
            .filter(|i| !self.exists(i, now))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Some(format!("waits for inputs to exist: {}", missing.join(", ")));
        }
        let names: Vec<&str> = needs
            .inputs
            .iter()
            .chain(&needs.outputs)
            .map(String::as_str)
            .collect();
        Some(format!("waits for resources in use: {}", names.join(", ")))
    }
}

/// A resource name with each run of digits (and the `-`/`_` joining them) made `*`:
/// `reporting.events.2026_11_23` and `reporting.events.2026-11-24` are both
/// `reporting.events.*`, so lineage names the flow, not each day's copy.
pub fn collapse_digits(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            // Digits, and separators between digits, are one run.
            while let Some(&next) = chars.peek() {
                let joins = matches!(next, '-' | '_') && {
                    let mut ahead = chars.clone();
                    ahead.next();
                    ahead.peek().is_some_and(|d| d.is_ascii_digit())
                };
                if next.is_ascii_digit() || joins {
                    chars.next();
                } else {
                    break;
                }
            }
            out.push('*');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(inputs: &[&str], outputs: &[&str]) -> Needs {
        Needs {
            run_id: "r".into(),
            job: "j".into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn written(name: &str, expires: Option<i64>) -> Written {
        Written {
            name: name.into(),
            written_at_ms: 0,
            expires_at_ms: expires,
            run_id: None,
            job: None,
        }
    }

    fn step(id: &str) -> StepId {
        StepId::from(id)
    }

    #[test]
    fn two_writers_of_one_output_never_hold_it_together() {
        let mut r = Resources::default();
        assert_eq!(
            r.request(step("w1"), needs(&[], &["out"]), 0),
            vec![step("w1")]
        );
        assert!(r.request(step("w2"), needs(&[], &["out"]), 0).is_empty());
        let (granted, held) = r.release(&step("w1"), 0);
        assert_eq!(granted, vec![step("w2")]);
        assert_eq!(held.unwrap().outputs, vec!["out".to_string()]);
    }

    #[test]
    fn a_reader_waits_for_a_missing_input_and_starts_when_it_is_written() {
        let mut r = Resources::default();
        assert!(r.request(step("reader"), needs(&["in"], &[]), 0).is_empty());
        assert_eq!(
            r.waiting_reason(&step("reader"), 0).unwrap(),
            "waits for inputs to exist: in"
        );
        // The writer of the input is not held behind the reader that waits for it.
        assert_eq!(
            r.request(step("writer"), needs(&[], &["in"]), 0),
            vec![step("writer")]
        );
        let (granted, _) = r.release(&step("writer"), 0);
        assert!(
            granted.is_empty(),
            "a failed writer leaves the input missing"
        );
        assert_eq!(r.write(vec![written("in", None)], 0), vec![step("reader")]);
    }

    #[test]
    fn readers_share_an_input_and_a_later_reader_does_not_pass_a_waiting_writer() {
        let mut r = Resources::restore(vec![written("x", None)], vec![]);
        assert_eq!(
            r.request(step("r1"), needs(&["x"], &[]), 0),
            vec![step("r1")]
        );
        assert_eq!(
            r.request(step("r2"), needs(&["x"], &[]), 0),
            vec![step("r2")]
        );
        assert!(r.request(step("w"), needs(&[], &["x"]), 0).is_empty());
        assert!(
            r.request(step("r3"), needs(&["x"], &[]), 0).is_empty(),
            "r3 came after the waiting writer"
        );
        assert!(r.release(&step("r1"), 0).0.is_empty());
        assert_eq!(r.release(&step("r2"), 0).0, vec![step("w")]);
        assert_eq!(r.release(&step("w"), 0).0, vec![step("r3")]);
    }

    #[test]
    fn all_or_nothing_no_lock_is_taken_while_one_is_missing() {
        let mut r = Resources::restore(vec![written("a", None)], vec![]);
        // Holds b; asks a (free) and b (held by itself? no: by another).
        assert_eq!(
            r.request(step("holder"), needs(&[], &["b"]), 0),
            vec![step("holder")]
        );
        assert!(r
            .request(step("both"), needs(&[], &["a", "b"]), 0)
            .is_empty());
        // `a` was not taken: a reader of a behind `both` waits (reservation), but a holder
        // count shows no writer on a.
        assert!(!r.writers.contains_key("a"));
        assert_eq!(r.release(&step("holder"), 0).0, vec![step("both")]);
    }

    #[test]
    fn a_waiter_that_leaves_the_line_lets_the_next_one_start() {
        let mut r = Resources::restore(vec![written("x", None)], vec![]);
        assert_eq!(
            r.request(step("r1"), needs(&["x"], &[]), 0),
            vec![step("r1")]
        );
        assert!(r.request(step("w"), needs(&[], &["x"]), 0).is_empty());
        assert!(r.request(step("r2"), needs(&["x"], &[]), 0).is_empty());
        // The writer is cancelled while it waits: r2 no longer waits behind it.
        assert_eq!(r.release(&step("w"), 0).0, vec![step("r2")]);
    }

    #[test]
    fn an_expired_output_is_missing_again() {
        let mut r = Resources::restore(vec![written("x", Some(100))], vec![]);
        assert!(r.exists("x", 99));
        assert!(r.request(step("late"), needs(&["x"], &[]), 100).is_empty());
        assert_eq!(r.expire(100), vec!["x".to_string()]);
        assert!(!r.exists("x", 0));
    }

    #[test]
    fn lineage_collapses_digit_runs_and_records_each_edge_once() {
        assert_eq!(
            collapse_digits("reporting.events.2026_11_23"),
            "reporting.events.*"
        );
        assert_eq!(
            collapse_digits("reporting.events.2026-11-24"),
            "reporting.events.*"
        );
        assert_eq!(collapse_digits("shard3.part_12.v2"), "shard*.part_*.v*");
        assert_eq!(collapse_digits("no_digits-here"), "no_digits-here");
        let mut r = Resources::default();
        let n = |day: &str| Needs {
            run_id: "r".into(),
            job: "agg".into(),
            inputs: vec![format!("raw.{day}")],
            outputs: vec![format!("daily.{day}")],
        };
        assert_eq!(r.note_lineage(&n("2026_11_23")).len(), 2);
        assert!(
            r.note_lineage(&n("2026_11_24")).is_empty(),
            "same flow, another day"
        );
    }
}
