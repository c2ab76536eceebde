//! The broker's ids, and where new ones come from.
//!
//! [`RunId`], [`StepId`] and [`TaskId`] keep the three kinds of id apart in the engine and
//! its records; the wire messages and the store carry them as plain strings, converted at
//! that boundary.
//!
//! The engine makes an id for every run, step and task it creates. It asks an
//! [`IdSource`] it was given, as it is given the time: in production UUIDv7 ([`Uuid7Ids`],
//! time-ordered and unique across restarts), in tests a counter ([`SequentialIds`]), so a
//! sequence of events replays to exactly the same decisions.

use std::fmt;
use std::sync::Arc;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                $name(Arc::from(id))
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                $name(Arc::from(id))
            }
        }

        /// Compared with the text it was made from (a wire field, a test's literal).
        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &*self.0 == other.as_str()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }
    };
}

id_type!(
    /// A run: everything one trigger set off.
    RunId
);
id_type!(
    /// A step: one job started within a run.
    StepId
);
id_type!(
    /// A task: one step on one worker.
    TaskId
);

/// Makes the ids of new runs, steps and tasks.
pub trait IdSource: Send {
    /// A new id, never handed out before in this state directory: at most 64 ASCII letters,
    /// digits and `-` (what [`crate::engine::is_valid_id`] accepts). Ids made later sort
    /// after ids made earlier.
    fn next_id(&mut self) -> String;

    fn run_id(&mut self) -> RunId {
        RunId::from(self.next_id())
    }

    fn step_id(&mut self) -> StepId {
        StepId::from(self.next_id())
    }

    fn task_id(&mut self) -> TaskId {
        TaskId::from(self.next_id())
    }
}

/// Production ids: UUIDv7, hyphenated (time-ordered, unique without coordination).
#[derive(Debug, Default)]
pub struct Uuid7Ids;

impl IdSource for Uuid7Ids {
    fn next_id(&mut self) -> String {
        jobz::new_id()
    }
}

/// Ids from a counter, shaped like UUIDs so they sort in the order they were made: for
/// tests and replays, where the same events must make the same ids.
#[derive(Debug, Default)]
pub struct SequentialIds {
    made: u64,
}

impl SequentialIds {
    /// A source whose first id follows `made` earlier ones (to resume a replay).
    pub fn after(made: u64) -> SequentialIds {
        SequentialIds { made }
    }
}

impl IdSource for SequentialIds {
    fn next_id(&mut self) -> String {
        self.made += 1;
        format!("00000000-0000-7000-8000-{:012x}", self.made)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_are_valid_and_sort_in_the_order_they_were_made() {
        let mut ids = SequentialIds::default();
        let made: Vec<String> = (0..300).map(|_| ids.next_id()).collect();
        assert!(made.iter().all(|id| crate::engine::is_valid_id(id)));
        assert!(made.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(SequentialIds::after(299).next_id(), made[299]);
    }

    #[test]
    fn uuid7_ids_are_valid_and_distinct() {
        let mut ids = Uuid7Ids;
        let (a, b) = (ids.next_id(), ids.next_id());
        assert!(crate::engine::is_valid_id(&a) && a != b);
    }
}
