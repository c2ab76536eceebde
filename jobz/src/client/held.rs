//! Group frames held back until the mesh key they are sealed under arrives.
//!
//! A node meets a frame under an epoch it does not hold when the broker started a new
//! ring (a restart with no key kept) or the node missed an announcement. The frame is
//! authentic (the broker's signature was checked before the epoch was looked up), so
//! rather than drop it and wait for the broker to publish it again, the link asks for the
//! key at once and opens the frame when the answer brings it. Bounded in frames, bytes and
//! time: what does not fit or waits too long is dropped and counted, and the broker's
//! redelivery covers it as before.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most frames held at once.
pub const MAX_HELD_FRAMES: usize = 256;
/// Most bytes held at once.
pub const MAX_HELD_BYTES: usize = 8 * 1024 * 1024;
/// How long a frame waits for its key; after that the broker publishes work again anyway.
pub const HOLD_FOR: Duration = Duration::from_secs(5);

/// Why a frame was not held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotHeld {
    /// The same frame is already held (a replay on the wire).
    Duplicate,
    /// No room left.
    Full,
}

struct Held {
    epoch: u32,
    topic: Vec<u8>,
    frame: Vec<u8>,
    since: Instant,
}

/// Frames waiting for their mesh key, oldest first.
#[derive(Default)]
pub struct HeldFrames {
    frames: VecDeque<Held>,
    bytes: usize,
}

impl HeldFrames {
    /// Holds `frame` (published on `topic` under `epoch`) until its key arrives.
    pub fn hold(
        &mut self,
        epoch: u32,
        topic: &[u8],
        frame: &[u8],
        now: Instant,
    ) -> Result<(), NotHeld> {
        let size = topic.len() + frame.len();
        if self.frames.len() >= MAX_HELD_FRAMES || self.bytes + size > MAX_HELD_BYTES {
            return Err(NotHeld::Full);
        }
        if self.frames.iter().any(|h| h.frame == frame) {
            return Err(NotHeld::Duplicate);
        }
        self.bytes += size;
        self.frames.push_back(Held {
            epoch,
            topic: topic.to_vec(),
            frame: frame.to_vec(),
            since: now,
        });
        Ok(())
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Takes out, in arrival order, the frames whose epoch `holds` now says is known.
    pub fn release(&mut self, holds: impl Fn(u32) -> bool) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut ready = Vec::new();
        let mut waiting = VecDeque::with_capacity(self.frames.len());
        for held in self.frames.drain(..) {
            if holds(held.epoch) {
                self.bytes -= held.topic.len() + held.frame.len();
                ready.push((held.topic, held.frame));
            } else {
                waiting.push_back(held);
            }
        }
        self.frames = waiting;
        ready
    }

    /// Drops the frames that have waited [`HOLD_FOR`]; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut expired = 0;
        while let Some(oldest) = self.frames.front() {
            if now.saturating_duration_since(oldest.since) < HOLD_FOR {
                break;
            }
            self.bytes -= oldest.topic.len() + oldest.frame.len();
            self.frames.pop_front();
            expired += 1;
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_out_in_order_once_their_key_is_held() {
        let now = Instant::now();
        let mut held = HeldFrames::default();
        held.hold(7, b"j a\0", b"first", now).unwrap();
        held.hold(8, b"j a\0", b"other epoch", now).unwrap();
        held.hold(7, b"e a\0", b"second", now).unwrap();
        assert!(held.release(|_| false).is_empty());
        let ready = held.release(|e| e == 7);
        assert_eq!(
            ready,
            vec![
                (b"j a\0".to_vec(), b"first".to_vec()),
                (b"e a\0".to_vec(), b"second".to_vec())
            ]
        );
        assert_eq!(held.release(|_| true).len(), 1);
        assert!(held.is_empty());
        assert_eq!(held.bytes, 0);
    }

    #[test]
    fn a_replayed_frame_is_held_once() {
        let now = Instant::now();
        let mut held = HeldFrames::default();
        held.hold(7, b"t", b"frame", now).unwrap();
        assert_eq!(held.hold(7, b"t", b"frame", now), Err(NotHeld::Duplicate));
        assert_eq!(held.release(|_| true).len(), 1);
    }

    #[test]
    fn a_flood_is_bounded_in_frames_and_bytes_and_waits_only_so_long() {
        let now = Instant::now();
        let mut held = HeldFrames::default();
        for n in 0..MAX_HELD_FRAMES {
            held.hold(1, b"t", &n.to_be_bytes(), now).unwrap();
        }
        assert_eq!(held.hold(1, b"t", b"one more", now), Err(NotHeld::Full));
        assert_eq!(held.expire(now + HOLD_FOR - Duration::from_millis(1)), 0);
        assert_eq!(held.expire(now + HOLD_FOR), MAX_HELD_FRAMES);
        assert!(held.is_empty());
        let big = vec![0u8; MAX_HELD_BYTES / 2];
        held.hold(1, b"t", &big, now).unwrap();
        assert_eq!(held.hold(2, b"t", &big, now), Err(NotHeld::Full));
        held.expire(now + HOLD_FOR);
        assert_eq!(held.bytes, 0);
    }
}
