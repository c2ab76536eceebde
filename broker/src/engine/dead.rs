//! The dead list: tasks that failed for good, the newest of them held in memory for
//! listing and retrying (the store keeps them all).

use std::collections::{BTreeMap, VecDeque};

use crate::ids::TaskId;
use crate::model::Dead;

/// Dead tasks held in memory (older ones stay in the store).
const REMEMBERED_DEAD: usize = 10_000;

/// The newest dead tasks, by task and in the order they died.
#[derive(Debug, Default)]
pub(super) struct DeadList {
    by_task: BTreeMap<TaskId, Dead>,
    order: VecDeque<TaskId>,
}

impl DeadList {
    /// The list as the store left it (any order).
    pub fn restore(mut dead: Vec<Dead>) -> DeadList {
        dead.sort_by_key(|d| d.failed_at_ms);
        let mut list = DeadList::default();
        for d in dead {
            list.remember(d);
        }
        list
    }

    /// Dead tasks held.
    pub fn len(&self) -> usize {
        self.by_task.len()
    }

    /// Adds a dead task, or replaces it (a retry records the run it became); forgets the
    /// oldest beyond the bound.
    pub fn remember(&mut self, dead: Dead) {
        if self
            .by_task
            .insert(dead.task_id.clone(), dead.clone())
            .is_none()
        {
            self.order.push_back(dead.task_id);
        }
        while self.order.len() > REMEMBERED_DEAD {
            if let Some(old) = self.order.pop_front() {
                self.by_task.remove(&old);
            }
        }
    }

    /// Forgets dead tasks the store pruned with their runs, so the list never shows what
    /// a restarted broker would not.
    pub fn forget(&mut self, task_ids: &[TaskId]) {
        let before = self.by_task.len();
        for id in task_ids {
            self.by_task.remove(id);
        }
        if self.by_task.len() != before {
            let by_task = &self.by_task;
            self.order.retain(|id| by_task.contains_key(id));
        }
    }

    pub fn get(&self, task_id: &TaskId) -> Option<&Dead> {
        self.by_task.get(task_id)
    }

    /// The newest first.
    pub fn newest(&self) -> impl Iterator<Item = &Dead> {
        self.order
            .iter()
            .rev()
            .filter_map(|id| self.by_task.get(id))
    }
}
