//! Output of running steps, shipped by workers while the steps run ([`TaskOutput`]) and
//! read by log followers (`Query::TaskOutput`).
//!
//! Held in memory only: it is a view of a file that stays on the worker's host, and the
//! result's tail is what the store keeps. Bounded three ways: each attempt keeps its
//! newest [`PER_ATTEMPT_BYTES`] (older pieces are dropped; a reader sees the jump in
//! offsets), all attempts together [`TOTAL_BYTES`] (the buffers of ended attempts go first,
//! then the oldest), and an ended attempt's buffer is dropped [`KEEP_AFTER_END_MS`] after
//! its end, long enough for a follower to read its last lines.

use std::collections::{HashMap, VecDeque};

use jobz::message::{LiveOutputView, TaskOutput};

use crate::ids::TaskId;

/// Newest output kept per attempt.
pub const PER_ATTEMPT_BYTES: usize = 256 * 1024;

/// Output kept for all attempts together.
pub const TOTAL_BYTES: usize = 32 * 1024 * 1024;

/// How long an ended attempt's output stays readable.
pub const KEEP_AFTER_END_MS: i64 = 60_000;

/// Longest answer to one read (a follower asks again from `next`).
pub const MAX_READ_BYTES: usize = 256 * 1024;

/// What became of a piece a worker shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Appended.
    Appended,
    /// Appended after a gap (a piece was lost on the way).
    AppendedAfterGap,
    /// Already had it (a duplicate).
    Duplicate,
}

#[derive(Debug)]
struct Piece {
    offset: u64,
    bytes: u64,
    text: String,
}

/// What a piece is counted as against the bounds: its text and its own record, so that a
/// worker shipping many empty pieces cannot hold memory the bounds do not see.
const PIECE_OVERHEAD: usize = std::mem::size_of::<Piece>();

impl Piece {
    fn weight(&self) -> usize {
        self.text.len() + PIECE_OVERHEAD
    }
}

#[derive(Debug, Default)]
struct Buffer {
    pieces: VecDeque<Piece>,
    /// Sum of the pieces' weights.
    held: usize,
    /// The offset after the last piece.
    next: u64,
    capped: bool,
    ended_at_ms: Option<i64>,
    /// Order of creation, for eviction.
    serial: u64,
}

/// The output buffers, by task attempt.
#[derive(Debug, Default)]
pub struct LiveOutputs {
    buffers: HashMap<(TaskId, u32), Buffer>,
    held: usize,
    serial: u64,
}

impl LiveOutputs {
    /// Takes one piece of a running attempt's output (the caller checked that the attempt
    /// is current and the sender runs it).
    pub fn take(&mut self, piece: TaskOutput) -> Taken {
        let key = (
            TaskId::from(piece.task.task_id.as_str()),
            piece.task.attempt,
        );
        let serial = self.serial;
        let buffer = self.buffers.entry(key).or_insert_with(|| Buffer {
            serial,
            ..Buffer::default()
        });
        self.serial += 1;
        let end = piece.offset.saturating_add(piece.bytes);
        buffer.capped |= piece.capped;
        if end <= buffer.next {
            return Taken::Duplicate;
        }
        let taken = if piece.offset > buffer.next {
            Taken::AppendedAfterGap
        } else {
            Taken::Appended
        };
        let piece = Piece {
            offset: piece.offset,
            bytes: piece.bytes,
            text: piece.text,
        };
        buffer.next = end;
        buffer.held += piece.weight();
        self.held += piece.weight();
        buffer.pieces.push_back(piece);
        while buffer.held > PER_ATTEMPT_BYTES && buffer.pieces.len() > 1 {
            if let Some(old) = buffer.pieces.pop_front() {
                buffer.held -= old.weight();
                self.held -= old.weight();
            }
        }
        self.evict_beyond_total();
        taken
    }

    /// Whether the attempt has a buffer that still takes pieces.
    pub fn is_open(&self, task_id: &TaskId, attempt: u32) -> bool {
        self.buffers
            .get(&(task_id.clone(), attempt))
            .is_none_or(|b| b.ended_at_ms.is_none())
    }

    /// The attempt's output from `from` on (at most [`MAX_READ_BYTES`]), or `None` if none
    /// is held.
    pub fn read(&self, task_id: &TaskId, attempt: u32, from: u64) -> Option<LiveOutputView> {
        let buffer = self.buffers.get(&(task_id.clone(), attempt))?;
        let mut view = LiveOutputView {
            from: buffer.next,
            text: String::new(),
            next: buffer.next,
            capped: buffer.capped,
            finished: buffer.ended_at_ms.is_some(),
        };
        let mut first = true;
        for piece in &buffer.pieces {
            if piece.offset.saturating_add(piece.bytes) <= from {
                continue;
            }
            if !first && view.text.len() + piece.text.len() > MAX_READ_BYTES {
                view.next = piece.offset;
                view.finished = false;
                break;
            }
            if first {
                // Pieces end where readers ask from, so this is `from` unless older
                // pieces were dropped.
                view.from = piece.offset;
                first = false;
            }
            view.text.push_str(&piece.text);
        }
        Some(view)
    }

    /// Marks ended every attempt `is_current` no longer runs, then drops the buffers of
    /// attempts that ended more than [`KEEP_AFTER_END_MS`] ago.
    pub fn retire(&mut self, now_ms: i64, is_current: impl Fn(&TaskId, u32) -> bool) {
        for ((task_id, attempt), buffer) in &mut self.buffers {
            if buffer.ended_at_ms.is_none() && !is_current(task_id, *attempt) {
                buffer.ended_at_ms = Some(now_ms);
            }
        }
        self.prune(now_ms);
    }

    /// Drops the buffers of attempts that ended more than [`KEEP_AFTER_END_MS`] ago.
    pub fn prune(&mut self, now_ms: i64) {
        let mut freed = 0;
        self.buffers.retain(|_, b| {
            let keep = b
                .ended_at_ms
                .is_none_or(|t| now_ms.saturating_sub(t) < KEEP_AFTER_END_MS);
            if !keep {
                freed += b.held;
            }
            keep
        });
        self.held -= freed;
    }

    /// Bytes held in all.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held
    }

    fn evict_beyond_total(&mut self) {
        while self.held > TOTAL_BYTES {
            // Ended attempts first, then the oldest.
            let victim = self
                .buffers
                .iter()
                .min_by_key(|(_, b)| (b.ended_at_ms.is_none(), b.serial))
                .map(|(k, _)| k.clone());
            let Some(key) = victim else { return };
            if let Some(b) = self.buffers.remove(&key) {
                self.held -= b.held;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use jobz::message::TaskRef;

    use super::*;

    fn piece(offset: u64, text: &str) -> TaskOutput {
        TaskOutput {
            task: TaskRef {
                task_id: "t1".into(),
                attempt: 1,
            },
            worker: "w1".into(),
            offset,
            bytes: text.len() as u64,
            text: text.into(),
            capped: false,
        }
    }

    #[test]
    fn pieces_read_back_from_any_offset_and_duplicates_are_dropped() {
        let mut live = LiveOutputs::default();
        let t1 = TaskId::from("t1");
        assert!(live.read(&t1, 1, 0).is_none());
        assert_eq!(live.take(piece(0, "one\n")), Taken::Appended);
        assert_eq!(live.take(piece(4, "two\n")), Taken::Appended);
        assert_eq!(live.take(piece(4, "two\n")), Taken::Duplicate);
        let all = live.read(&t1, 1, 0).unwrap();
        assert_eq!(
            (all.from, all.text.as_str(), all.next),
            (0, "one\ntwo\n", 8)
        );
        let rest = live.read(&t1, 1, 4).unwrap();
        assert_eq!((rest.from, rest.text.as_str(), rest.next), (4, "two\n", 8));
        let none = live.read(&t1, 1, 8).unwrap();
        assert_eq!(
            (none.text.as_str(), none.next, none.finished),
            ("", 8, false)
        );
        assert_eq!(live.take(piece(20, "four\n")), Taken::AppendedAfterGap);
        let after_gap = live.read(&t1, 1, 8).unwrap();
        assert_eq!((after_gap.from, after_gap.text.as_str()), (20, "four\n"));
    }

    #[test]
    fn an_attempt_keeps_its_newest_output_and_ended_ones_go_after_a_while() {
        let mut live = LiveOutputs::default();
        let t1 = TaskId::from("t1");
        let line = "x".repeat(1023) + "\n";
        for i in 0..400u64 {
            live.take(piece(i * 1024, &line));
        }
        assert!(live.held() <= PER_ATTEMPT_BYTES);
        let view = live.read(&t1, 1, 0).unwrap();
        assert!(view.from > 0, "the oldest pieces were dropped");
        assert_eq!(view.next, 400 * 1024);
        live.retire(1_000, |_, _| false);
        assert!(!live.is_open(&t1, 1));
        assert!(live.read(&t1, 1, 0).unwrap().finished);
        live.prune(1_000 + KEEP_AFTER_END_MS - 1);
        assert!(live.read(&t1, 1, 0).is_some());
        live.prune(1_000 + KEEP_AFTER_END_MS);
        assert!(live.read(&t1, 1, 0).is_none());
        assert_eq!(live.held(), 0);
    }

    #[test]
    fn many_empty_pieces_count_against_the_bound() {
        let mut live = LiveOutputs::default();
        for offset in 0..100_000u64 {
            let mut p = piece(offset, "");
            p.bytes = 1; // one byte of output each, shipped as nothing
            live.take(p);
        }
        assert!(live.held() <= PER_ATTEMPT_BYTES);
        let kept = live.read(&TaskId::from("t1"), 1, 0).unwrap();
        assert!(kept.from > 0, "the oldest pieces were dropped");
    }

    #[test]
    fn all_attempts_together_stay_under_the_total_ended_ones_evicted_first() {
        let mut live = LiveOutputs::default();
        let big = "y".repeat(PER_ATTEMPT_BYTES);
        let mut p = piece(0, &big);
        p.task.task_id = "ended".into();
        live.take(p);
        live.retire(0, |task, _| task.as_str() != "ended");
        for i in 0..(TOTAL_BYTES / PER_ATTEMPT_BYTES) {
            let mut p = piece(0, &big);
            p.task.task_id = format!("t{i}");
            live.take(p);
        }
        assert!(live.held() <= TOTAL_BYTES);
        assert!(live.read(&TaskId::from("ended"), 1, 0).is_none());
        assert!(live.read(&TaskId::from("t1"), 1, 0).is_some());
    }
}
