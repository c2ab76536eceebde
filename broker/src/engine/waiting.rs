//! Steps waiting for a live worker, a free slot or room under their job's
//! `max_concurrency`: one line per job, and the jobs in the order of the first step in
//! their line. A line is ordered by priority (higher first), then by arrival (first come,
//! first served among equals).
//!
//! Placement takes the first step of the first job, and after placing it the next first
//! step: each costs O(log n) however many steps wait. A job that cannot place its first
//! step stays where it is while placement moves on to the next job.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::ids::StepId;

/// Where a waiting step stands in line: the lower, the sooner. A higher priority comes
/// first; among equal priorities, steps are in the order they were made (first come,
/// first served).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// Its run's priority.
    pub priority: i32,
    /// The step's place among every step made (or restored) by this engine.
    pub arrival: u64,
}

impl Ord for Position {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .priority
            .cmp(&self.priority)
            .then(self.arrival.cmp(&other.arrival))
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The first waiting step of a job, as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub position: Position,
    pub job: String,
    pub step_id: StepId,
}

/// Waiting steps by job, each job's in line.
#[derive(Debug, Default)]
pub struct WaitingSteps {
    lines: HashMap<String, BTreeMap<Position, StepId>>,
    /// Every job with waiting steps, by the position of its first one.
    heads: BTreeSet<(Position, String)>,
    len: usize,
}

impl WaitingSteps {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether steps of `job` wait.
    pub fn has_job(&self, job: &str) -> bool {
        self.lines.contains_key(job)
    }

    /// Puts a step of `job` in line at `position`; false if that place was taken.
    pub fn insert(&mut self, job: &str, position: Position, step_id: StepId) -> bool {
        let line = self.lines.entry(job.to_owned()).or_default();
        let old_head = line.first_key_value().map(|(p, _)| *p);
        if line.contains_key(&position) {
            return false;
        }
        line.insert(position, step_id);
        self.len += 1;
        if old_head.is_none_or(|head| position < head) {
            if let Some(head) = old_head {
                self.heads.remove(&(head, job.to_owned()));
            }
            self.heads.insert((position, job.to_owned()));
        }
        true
    }

    /// Takes the step at `position` of `job` out of line.
    pub fn remove(&mut self, job: &str, position: Position) -> Option<StepId> {
        let line = self.lines.get_mut(job)?;
        let was_head = line.first_key_value().is_some_and(|(p, _)| *p == position);
        let step_id = line.remove(&position)?;
        self.len -= 1;
        if was_head {
            self.heads.remove(&(position, job.to_owned()));
            match line.first_key_value() {
                Some((next, _)) => {
                    self.heads.insert((*next, job.to_owned()));
                }
                None => {
                    self.lines.remove(job);
                }
            }
        }
        Some(step_id)
    }

    /// The first step of the first job whose first step stands after `after` (from the
    /// start if `None`): walking from one head to the next visits the jobs in the order
    /// of their first steps, and a job whose first step was just placed comes up again at
    /// its next step.
    pub fn next_head(&self, after: Option<&Head>) -> Option<Head> {
        let (position, job) = match after {
            None => self.heads.first()?,
            Some(h) => {
                let from = (h.position, h.job.clone());
                self.heads
                    .range((std::ops::Bound::Excluded(from), std::ops::Bound::Unbounded))
                    .next()?
            }
        };
        let step_id = self.lines.get(job)?.get(position)?.clone();
        Some(Head {
            position: *position,
            job: job.clone(),
            step_id,
        })
    }

    /// Where `step_id` stands in the line of `job`, if it is there (for checks).
    #[cfg(test)]
    pub fn holds(&self, job: &str, position: Position, step_id: &StepId) -> bool {
        let line = self.lines.get(job);
        line.and_then(|l| l.get(&position)) == Some(step_id)
            && line
                .and_then(|l| l.first_key_value())
                .is_some_and(|(first, _)| self.heads.contains(&(*first, job.to_owned())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(arrival: u64) -> Position {
        Position {
            priority: 0,
            arrival,
        }
    }

    fn walk(waiting: &WaitingSteps) -> Vec<(u64, String)> {
        let mut seen = Vec::new();
        let mut cursor = None;
        while let Some(head) = waiting.next_head(cursor.as_ref()) {
            seen.push((head.position.arrival, head.job.clone()));
            cursor = Some(head);
        }
        seen
    }

    #[test]
    fn jobs_come_up_in_the_order_of_their_first_waiting_step() {
        let mut w = WaitingSteps::default();
        for (arrival, job) in [(5, "b"), (2, "a"), (9, "a"), (7, "c"), (3, "b")] {
            assert!(w.insert(job, at(arrival), StepId::from(format!("s{arrival}"))));
        }
        assert!(!w.insert("a", at(2), "dup".into()), "one step a place");
        assert_eq!(w.len(), 5);
        let jobs = |v: Vec<(u64, String)>| {
            v.into_iter()
                .map(|(a, j)| format!("{j}{a}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(jobs(walk(&w)), ["a2", "b3", "c7"]);
        // The first of `a` placed: `a` comes up again at its next step, after `c`.
        assert_eq!(w.remove("a", at(2)), Some("s2".into()));
        assert_eq!(jobs(walk(&w)), ["b3", "c7", "a9"]);
        // A step out of the middle of a line leaves its head alone.
        assert_eq!(w.remove("b", at(5)), Some("s5".into()));
        assert_eq!(jobs(walk(&w)), ["b3", "c7", "a9"]);
        for (job, arrival) in [("b", 3), ("c", 7), ("a", 9)] {
            assert!(w.remove(job, at(arrival)).is_some());
        }
        assert!(w.is_empty() && !w.has_job("a") && w.next_head(None).is_none());
        assert_eq!(w.remove("a", at(9)), None);
    }

    #[test]
    fn a_walk_that_places_the_head_meets_the_next_step_of_the_same_job() {
        let mut w = WaitingSteps::default();
        for arrival in 1..=3 {
            w.insert("a", at(arrival), StepId::from(format!("s{arrival}")));
        }
        w.insert("b", at(2_000), "b1".into());
        let mut placed = Vec::new();
        let mut cursor = None;
        while let Some(head) = w.next_head(cursor.as_ref()) {
            if head.job == "a" {
                w.remove(&head.job, head.position);
                placed.push(head.step_id.to_string());
            }
            cursor = Some(head);
        }
        assert_eq!(placed, ["s1", "s2", "s3"]);
        assert_eq!(walk(&w), [(2_000, "b".to_string())]);
    }

    #[test]
    fn a_higher_priority_stands_before_every_lower_one_and_equals_keep_their_order() {
        let mut w = WaitingSteps::default();
        let at = |priority, arrival| Position { priority, arrival };
        for (priority, arrival, job) in [
            (0, 1, "a"),
            (5, 2, "b"),
            (0, 3, "a"),
            (5, 4, "a"),
            (-1, 5, "c"),
        ] {
            assert!(w.insert(
                job,
                at(priority, arrival),
                StepId::from(format!("s{arrival}"))
            ));
        }
        // Job b's head (priority 5, arrival 2) before a's (5, 4): equal priority, earlier
        // first; c's (-1) last.
        let heads: Vec<String> = {
            let mut seen = Vec::new();
            let mut cursor = None;
            while let Some(head) = w.next_head(cursor.as_ref()) {
                seen.push(head.step_id.to_string());
                cursor = Some(head);
            }
            seen
        };
        assert_eq!(heads, ["s2", "s4", "s5"]);
        // Draining a's line gives its steps in priority, then arrival, order.
        let mut drained = Vec::new();
        while let Some(head) = w.next_head(None).filter(|h| h.job == "a" || w.has_job("a")) {
            if head.job != "a" {
                w.remove(&head.job, head.position);
                continue;
            }
            drained.push(head.step_id.to_string());
            w.remove(&head.job, head.position);
        }
        assert_eq!(drained, ["s4", "s1", "s3"]);
    }
}
