//! The broker's memory of keys that asked to join: every (name, key) pair, bounded per key
//! and overall, expired when no longer seen, and mirrored to `pending/` a few files at a
//! time.
//!
//! What an attacker controls is the key and the name it claims: it can make any number of
//! both. So the bounds are per key ([`MAX_NAMES_PER_KEY`]: one key claiming many names
//! only replaces its own entries) and overall ([`MAX_PENDING`]: a new entry evicts the
//! least recently seen one). A real node greets the broker every fraction of a second
//! while it waits, so it stays among the most recently seen: a burst of any number of junk
//! hellos cannot push it out, only a sustained flood of more distinct keys than the bound
//! within each of its hello intervals (which the dropped-frame counters show).

use std::collections::{HashMap, HashSet, VecDeque};

use jobz::keys::PublicKey;

use super::PendingKey;

/// Most pending (name, key) pairs kept.
pub const MAX_PENDING: usize = 1000;
/// Most names one key may wait under (a node renamed keeps its key; more is a flood).
pub const MAX_NAMES_PER_KEY: usize = 4;
/// A pending entry not seen for this long is dropped (24 h).
pub const PENDING_EXPIRY_MS: i64 = 24 * 3600 * 1000;
/// How often a pending entry's last-seen time is written again while it keeps asking.
const RENEW_WRITE_EVERY_MS: i64 = 10 * 60 * 1000;

/// Why a pending entry deserves the operator's attention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Conflict {
    /// The name already has an accepted key: a changed key, or someone posing as the node.
    pub name_accepted: bool,
    /// Other keys are pending under the same name.
    pub other_pending: usize,
}

/// What a sighting changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sighted {
    /// A new pending entry.
    pub new: bool,
    /// Entries dropped to make room.
    pub evicted: Vec<(String, PublicKey)>,
    /// A conflict the log has not told yet about this entry.
    pub conflict: Option<Conflict>,
}

#[derive(Debug)]
struct Entry {
    first_seen_ms: i64,
    last_seen_ms: i64,
    /// The last-seen time in the file (or the time it was queued for writing).
    written_seen_ms: i64,
    /// The conflict last logged for this entry.
    told: Conflict,
}

/// Pending entries in memory; the broker's side of `pending/`.
#[derive(Debug, Default)]
pub struct PendingBook {
    entries: HashMap<(String, PublicKey), Entry>,
    names_of_key: HashMap<PublicKey, usize>,
    keys_of_name: HashMap<String, usize>,
    /// Names whose file must be written, oldest change first.
    dirty: VecDeque<String>,
    dirty_set: HashSet<String>,
}

impl PendingBook {
    /// The book as `pending/` holds it: expired entries and entries beyond the bounds
    /// (least recently seen first) are dropped, and their files queued for rewriting.
    pub fn load(mut found: Vec<PendingKey>, now_ms: i64) -> PendingBook {
        let mut book = PendingBook::default();
        // Oldest first, so the bounds drop the least recently seen.
        found.sort_by_key(|p| p.last_seen_ms);
        for p in found {
            if now_ms - p.last_seen_ms > PENDING_EXPIRY_MS {
                book.mark_dirty(&p.name);
                continue;
            }
            book.make_room(&p.key); // marks what it drops for rewriting
            book.insert(p.name, p.key, p.first_seen_ms, p.last_seen_ms);
        }
        book
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A proven key asked to join as `name` at `now_ms`; `name_accepted` says whether the
    /// name already has an accepted key.
    pub fn sight(
        &mut self,
        name: &str,
        key: &PublicKey,
        now_ms: i64,
        name_accepted: bool,
    ) -> Sighted {
        let mut sighted = Sighted::default();
        let id = (name.to_owned(), *key);
        if !self.entries.contains_key(&id) {
            sighted.evicted = self.make_room(key);
            self.insert(name.to_owned(), *key, now_ms, now_ms);
            sighted.new = true;
        }
        let other_pending = self
            .keys_of_name
            .get(name)
            .map_or(0, |n| n.saturating_sub(1));
        let mut renew = false;
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
            renew = now_ms - entry.written_seen_ms >= RENEW_WRITE_EVERY_MS;
            let now = Conflict {
                name_accepted,
                other_pending,
            };
            let worth_telling = (name_accepted && !entry.told.name_accepted)
                || (other_pending > 0 && entry.told.other_pending == 0);
            if worth_telling {
                sighted.conflict = Some(now);
            }
            entry.told = now;
        }
        if renew || sighted.new {
            self.mark_dirty(name);
        }
        sighted
    }

    /// Drops entries not seen for [`PENDING_EXPIRY_MS`]; returns how many.
    pub fn expire(&mut self, now_ms: i64) -> usize {
        let expired: Vec<(String, PublicKey)> = self
            .entries
            .iter()
            .filter(|(_, e)| now_ms - e.last_seen_ms > PENDING_EXPIRY_MS)
            .map(|(id, _)| id.clone())
            .collect();
        for (name, key) in &expired {
            self.remove(name, key);
        }
        expired.len()
    }

    /// Drops every entry of the keys `gone` says were accepted or rejected.
    pub fn forget_keys(&mut self, gone: impl Fn(&PublicKey) -> bool) {
        let forgotten: Vec<(String, PublicKey)> = self
            .entries
            .keys()
            .filter(|(_, key)| gone(key))
            .cloned()
            .collect();
        for (name, key) in &forgotten {
            self.remove(name, key);
        }
    }

    /// Up to `max` names whose file must be written, with what it must hold now (empty:
    /// remove the file). Taking them clears them.
    pub fn take_dirty(&mut self, max: usize) -> Vec<(String, Vec<PendingKey>)> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(name) = self.dirty.pop_front() else {
                break;
            };
            self.dirty_set.remove(&name);
            let mut entries: Vec<PendingKey> = Vec::new();
            for ((n, key), entry) in self.entries.iter_mut() {
                if *n == name {
                    entry.written_seen_ms = entry.last_seen_ms;
                    entries.push(PendingKey {
                        name: name.clone(),
                        key: *key,
                        first_seen_ms: entry.first_seen_ms,
                        last_seen_ms: entry.last_seen_ms,
                    });
                }
            }
            entries.sort_by_key(|p| (p.first_seen_ms, p.key));
            out.push((name, entries));
        }
        out
    }

    /// Whether a name still waits to be written.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Queues a name's file for writing again (after a failed write).
    pub fn mark_dirty(&mut self, name: &str) {
        if self.dirty_set.insert(name.to_owned()) {
            self.dirty.push_back(name.to_owned());
        }
    }

    /// Makes room for one more entry of `key`: its own least recently seen entry if it
    /// holds its share, else the least recently seen entry of all when the book is full.
    /// What it drops is queued for rewriting.
    fn make_room(&mut self, key: &PublicKey) -> Vec<(String, PublicKey)> {
        let own = self.names_of_key.get(key).copied().unwrap_or(0) >= MAX_NAMES_PER_KEY;
        if !own && self.entries.len() < MAX_PENDING {
            return Vec::new();
        }
        let victim = self
            .entries
            .iter()
            .filter(|((_, k), _)| !own || k == key)
            .min_by_key(|((name, k), e)| (e.last_seen_ms, e.first_seen_ms, name.clone(), *k))
            .map(|(id, _)| id.clone());
        let Some((name, victim_key)) = victim else {
            return Vec::new();
        };
        self.remove(&name, &victim_key);
        vec![(name, victim_key)]
    }

    fn insert(&mut self, name: String, key: PublicKey, first_seen_ms: i64, last_seen_ms: i64) {
        *self.names_of_key.entry(key).or_default() += 1;
        *self.keys_of_name.entry(name.clone()).or_default() += 1;
        self.entries.insert(
            (name, key),
            Entry {
                first_seen_ms,
                last_seen_ms,
                written_seen_ms: last_seen_ms,
                told: Conflict::default(),
            },
        );
    }

    fn remove(&mut self, name: &str, key: &PublicKey) {
        if self.entries.remove(&(name.to_owned(), *key)).is_none() {
            return;
        }
        decrement(&mut self.names_of_key, key);
        decrement(&mut self.keys_of_name, name);
        self.mark_dirty(name);
    }
}

fn decrement<K, Q>(counts: &mut HashMap<K, usize>, key: &Q)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobz::keys::NodeKey;

    const NOW: i64 = 1_800_000_000_000;

    fn key() -> PublicKey {
        NodeKey::generate().unwrap().public()
    }

    fn names_in(book: &PendingBook) -> HashSet<String> {
        book.entries.keys().map(|(n, _)| n.clone()).collect()
    }

    #[test]
    fn every_key_asking_for_a_name_is_kept_and_the_second_is_a_conflict() {
        let mut book = PendingBook::default();
        let (squatter, real) = (key(), key());
        let first = book.sight("worker:w3", &squatter, NOW, false);
        assert!(first.new);
        assert_eq!(first.conflict, None);
        let second = book.sight("worker:w3", &real, NOW + 1, false);
        assert!(second.new);
        assert_eq!(
            second.conflict,
            Some(Conflict {
                name_accepted: false,
                other_pending: 1
            })
        );
        assert_eq!(book.len(), 2);
        // Told once per entry, not per frame.
        assert_eq!(
            book.sight("worker:w3", &real, NOW + 2, false).conflict,
            None
        );
        // The first one learns of the conflict at its next hello.
        assert!(book
            .sight("worker:w3", &squatter, NOW + 3, false)
            .conflict
            .is_some());
        // A name that gets an accepted key is told again.
        let accepted = book.sight("worker:w3", &squatter, NOW + 4, true);
        assert_eq!(accepted.conflict.map(|c| c.name_accepted), Some(true));
        let written = book.take_dirty(10);
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].1.len(), 2, "both keys are in worker:w3's file");
    }

    #[test]
    fn one_key_claiming_many_names_only_replaces_its_own_entries() {
        let mut book = PendingBook::default();
        let real = key();
        book.sight("worker:real", &real, NOW, false);
        let flooder = key();
        for i in 0..10_000 {
            book.sight(&format!("worker:n{i}"), &flooder, NOW + 1 + i, false);
        }
        assert_eq!(book.len(), MAX_NAMES_PER_KEY + 1);
        assert!(names_in(&book).contains("worker:real"));
        // The flooder keeps its most recent names.
        assert!(names_in(&book).contains("worker:n9999"));
        assert!(!names_in(&book).contains("worker:n0"));
    }

    #[test]
    fn a_flood_of_new_keys_evicts_the_least_recently_seen_not_a_host_that_keeps_asking() {
        let mut book = PendingBook::default();
        let real = key();
        let mut now = NOW;
        book.sight("worker:real", &real, now, false);
        // 5,000 junk keys; the real host greets again after every 500 of them.
        for i in 0..5_000 {
            now += 1;
            if i % 500 == 0 {
                book.sight("worker:real", &real, now, false);
            }
            let sighted = book.sight(&format!("worker:junk{i}"), &key(), now, false);
            assert!(sighted.new);
            assert!(sighted.evicted.iter().all(|(n, _)| n != "worker:real"));
        }
        assert_eq!(book.len(), MAX_PENDING);
        assert!(names_in(&book).contains("worker:real"));
        // A new host after the flood is in, at the expense of the oldest junk.
        let late = book.sight("worker:late", &key(), now + 1, false);
        assert!(late.new);
        assert_eq!(late.evicted.len(), 1);
        assert!(late.evicted[0].0.starts_with("worker:junk"));
        assert!(names_in(&book).contains("worker:late"));
    }

    #[test]
    fn entries_expire_unless_seen_again_and_renewals_are_written_now_and_then() {
        let mut book = PendingBook::default();
        let (stays, goes) = (key(), key());
        book.sight("worker:stays", &stays, NOW, false);
        book.sight("worker:goes", &goes, NOW, false);
        assert_eq!(book.take_dirty(10).len(), 2);
        // Seen again soon: nothing to write.
        book.sight("worker:stays", &stays, NOW + 1000, false);
        assert!(!book.has_dirty());
        // Seen again after the renewal period: its last-seen time is written.
        let later = NOW + RENEW_WRITE_EVERY_MS;
        book.sight("worker:stays", &stays, later, false);
        let written = book.take_dirty(10);
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].1[0].last_seen_ms, later);

        assert_eq!(book.expire(NOW + PENDING_EXPIRY_MS), 0);
        assert_eq!(book.expire(NOW + PENDING_EXPIRY_MS + 1), 1);
        assert!(names_in(&book).contains("worker:stays"));
        let written = book.take_dirty(10);
        assert_eq!(written, vec![("worker:goes".to_owned(), vec![])]);
    }

    #[test]
    fn loading_applies_expiry_and_bounds_and_forgetting_rewrites_the_file() {
        let k = key();
        let found = vec![
            PendingKey {
                name: "worker:old".into(),
                key: key(),
                first_seen_ms: NOW - PENDING_EXPIRY_MS - 10,
                last_seen_ms: NOW - PENDING_EXPIRY_MS - 1,
            },
            PendingKey {
                name: "worker:fresh".into(),
                key: k,
                first_seen_ms: NOW - 10,
                last_seen_ms: NOW - 1,
            },
        ];
        let mut book = PendingBook::load(found, NOW);
        assert_eq!(book.len(), 1);
        assert_eq!(book.take_dirty(10), vec![("worker:old".to_owned(), vec![])]);
        book.forget_keys(|key| *key == k);
        assert!(book.is_empty());
        assert_eq!(
            book.take_dirty(10),
            vec![("worker:fresh".to_owned(), vec![])]
        );
    }
}
