//! Shipping a running step's output to the broker while it runs, for log followers.
//!
//! The step supervisor writes the output to its file; every worker tick reads what the
//! file gained since the last piece ([`OutputShipper::pieces`]) and sends it as
//! [`TaskOutput`] messages: at most [`TASK_OUTPUT_CHUNK_BYTES`] each, [`PIECES_PER_TICK`] a
//! tick per step (a step printing without pause cannot flood the link), and no more than
//! [`TASK_OUTPUT_LIVE_CAP`] an attempt (the file keeps everything; the result's tail ends
//! the story). A piece never ends inside a UTF-8 character unless the output ends there.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use jobz::message::{TaskOutput, TaskRef, TASK_OUTPUT_CHUNK_BYTES, TASK_OUTPUT_LIVE_CAP};

/// Most pieces shipped per step per tick.
pub const PIECES_PER_TICK: usize = 4;

/// Where one running attempt's output stands.
#[derive(Debug)]
pub struct OutputShipper {
    path: PathBuf,
    /// Offset in the file where this attempt's output begins.
    base: u64,
    /// Bytes of this attempt's output shipped so far.
    shipped: u64,
    capped: bool,
    file: Option<File>,
}

impl OutputShipper {
    /// A shipper for the output in `path` from byte `base` on.
    pub fn new(path: PathBuf, base: u64) -> Self {
        OutputShipper {
            path,
            base,
            shipped: 0,
            capped: false,
            file: None,
        }
    }

    /// Whether anything was shipped: then the rest is shipped before the result, so a
    /// follower reads the whole output live.
    pub fn has_shipped(&self) -> bool {
        self.shipped > 0
    }

    /// The pieces the file gained since the last call: at most `max_pieces`, all of it when
    /// `ended` (the step is over: a character cut at the end is shipped as it is).
    pub fn pieces(
        &mut self,
        task: &TaskRef,
        worker: &str,
        max_pieces: usize,
        ended: bool,
    ) -> io::Result<Vec<TaskOutput>> {
        let mut pieces = Vec::new();
        if self.capped {
            return Ok(pieces);
        }
        let file = match &self.file {
            Some(file) => file,
            None => self.file.insert(File::open(&self.path)?),
        };
        let len = file.metadata()?.len().saturating_sub(self.base);
        while pieces.len() < max_pieces && self.shipped < len {
            let room = TASK_OUTPUT_LIVE_CAP - self.shipped;
            let want = (len - self.shipped)
                .min(TASK_OUTPUT_CHUNK_BYTES as u64)
                .min(room);
            let mut buf = vec![0; want as usize];
            let read = file.read_at(&mut buf, self.base + self.shipped)?;
            buf.truncate(read);
            if buf.is_empty() {
                break;
            }
            let whole = self.shipped + buf.len() as u64 == len;
            let cut = if ended && whole {
                buf.len()
            } else {
                char_boundary(&buf)
            };
            if cut == 0 {
                break; // half a character: wait for the rest
            }
            buf.truncate(cut);
            let offset = self.shipped;
            self.shipped += cut as u64;
            self.capped = self.shipped >= TASK_OUTPUT_LIVE_CAP;
            pieces.push(TaskOutput {
                task: task.clone(),
                worker: worker.to_owned(),
                offset,
                bytes: cut as u64,
                text: String::from_utf8_lossy(&buf).into_owned(),
                capped: self.capped,
            });
            if self.capped {
                break;
            }
        }
        Ok(pieces)
    }
}

/// How much of `buf` to ship so that it does not end inside a UTF-8 character: all of it
/// unless its last bytes start a character that is not complete yet. Invalid bytes are
/// shipped (they become U+FFFD).
fn char_boundary(buf: &[u8]) -> usize {
    match std::str::from_utf8(buf) {
        Ok(_) => buf.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => {
            // Invalid somewhere: keep the end's incomplete character back all the same.
            let tail_start = buf.len().saturating_sub(3);
            (tail_start..buf.len())
                .find(|&i| {
                    buf[i] >= 0xC0
                        && std::str::from_utf8(&buf[i..]).is_err_and(|e| e.error_len().is_none())
                })
                .unwrap_or(buf.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn task() -> TaskRef {
        TaskRef {
            task_id: "t1".into(),
            attempt: 1,
        }
    }

    #[test]
    fn ships_what_the_file_gains_from_the_attempts_start_holding_back_half_characters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        let mut file = File::create(&path).unwrap();
        file.write_all(b"earlier attempt\n").unwrap();
        let mut shipper = OutputShipper::new(path.clone(), 16);
        assert!(shipper.pieces(&task(), "w1", 4, false).unwrap().is_empty());
        file.write_all("one\nt\u{e9}".as_bytes()).unwrap();
        file.write_all(&[0xE2, 0x82]).unwrap(); // the first two bytes of '€'
        let first = shipper.pieces(&task(), "w1", 4, false).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].offset, first[0].bytes), (0, 7));
        assert_eq!(first[0].text, "one\nt\u{e9}");
        assert!(shipper.has_shipped());
        file.write_all(&[0xAC]).unwrap();
        file.write_all(b"\n").unwrap();
        let second = shipper.pieces(&task(), "w1", 4, false).unwrap();
        assert_eq!(
            (second[0].offset, second[0].text.as_str()),
            (7, "\u{20ac}\n")
        );
        file.write_all(&[0xE2]).unwrap();
        assert!(shipper.pieces(&task(), "w1", 4, false).unwrap().is_empty());
        let last = shipper.pieces(&task(), "w1", 4, true).unwrap();
        assert_eq!((last[0].offset, last[0].bytes), (11, 1));
        assert_eq!(last[0].text, "\u{fffd}");
    }

    #[test]
    fn stops_at_the_live_cap_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        std::fs::write(&path, vec![b'x'; TASK_OUTPUT_LIVE_CAP as usize + 10]).unwrap();
        let mut shipper = OutputShipper::new(path, 0);
        let mut all = Vec::new();
        loop {
            let pieces = shipper
                .pieces(&task(), "w1", PIECES_PER_TICK, false)
                .unwrap();
            if pieces.is_empty() {
                break;
            }
            assert!(pieces.len() <= PIECES_PER_TICK);
            all.extend(pieces);
        }
        let shipped: u64 = all.iter().map(|p| p.bytes).sum();
        assert_eq!(shipped, TASK_OUTPUT_LIVE_CAP);
        assert!(all
            .iter()
            .all(|p| p.bytes <= TASK_OUTPUT_CHUNK_BYTES as u64));
        assert!(all.last().unwrap().capped);
        assert!(all[..all.len() - 1].iter().all(|p| !p.capped));
    }

    #[test]
    fn keeps_back_only_an_incomplete_character_at_the_end() {
        assert_eq!(char_boundary(b"abc"), 3);
        assert_eq!(char_boundary(&[b'a', 0xE2, 0x82]), 1);
        assert_eq!(char_boundary(&[0xFF, b'a', 0xE2]), 2);
        assert_eq!(char_boundary(&[0xFF, b'a']), 2);
    }
}
