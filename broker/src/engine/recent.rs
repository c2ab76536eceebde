//! A map that keeps only its newest entries: what the engine remembers of recent triggers
//! and recent run endings, bounded so that memory does not grow with history.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Up to `capacity` entries; adding one beyond forgets the oldest.
#[derive(Debug)]
pub(super) struct Recent<K, V> {
    capacity: usize,
    values: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K: Clone + Eq + Hash, V> Recent<K, V> {
    pub fn new(capacity: usize) -> Self {
        Recent {
            capacity: capacity.max(1),
            values: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Adds an entry, or replaces its value (it keeps its age).
    pub fn remember(&mut self, key: K, value: V) {
        if self.values.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.values.remove(&old);
            }
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.values.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_entry_goes_first_and_a_replaced_one_keeps_its_age() {
        let mut recent = Recent::new(2);
        recent.remember("a", 1);
        recent.remember("b", 2);
        recent.remember("a", 3);
        recent.remember("c", 4);
        assert_eq!(
            (recent.get(&"a"), recent.get(&"b"), recent.get(&"c")),
            (None, Some(&2), Some(&4))
        );
    }
}
