//! Whether a connection has answered every request it passed on: what the relay's
//! keep-alive idle timeout needs.
//!
//! A connection that waits for its answer (`job_start?wait=`, a followed log) is silent
//! for minutes and must not be cut; one whose answers are all out and that sends no new
//! request is idle and is closed after `--idle-timeout`. The relay tells a
//! [`ResponseTracker`] of each request head it passes on and feeds it every byte the
//! server sends back; the tracker finds where each response ends (status line and headers
//! by `httparse`, then `Content-Length`, chunked, or no body for `HEAD`, 1xx, 204 and
//! 304).
//!
//! The responses come from this process's own `tiny_http`, so they are well formed; if
//! one cannot be followed anyway, the tracker stops judging ([`ResponseTracker::lost`])
//! and the relay treats the connection as idle whenever it is silent.

use std::collections::VecDeque;

/// Longest response head or chunk-size line followed.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// Most header fields in a response head.
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a response head (or waiting for one).
    Head,
    /// This many body bytes left.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// This many bytes of chunk data left, then its CRLF.
    ChunkData(u64),
    /// The CRLF after chunk data: this many bytes of it left.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk, up to an empty line.
    Trailer,
    /// A body that ends when the server closes the connection.
    UntilClose,
    /// Lost track; never idle again.
    Lost,
}

/// Follows the responses of one connection (see the module documentation).
#[derive(Debug)]
pub struct ResponseTracker {
    /// One entry per request passed on and not answered yet: `true` for `HEAD`.
    awaiting: VecDeque<bool>,
    state: State,
    /// The head or line being read.
    line: Vec<u8>,
}

impl Default for ResponseTracker {
    fn default() -> Self {
        ResponseTracker {
            awaiting: VecDeque::new(),
            state: State::Head,
            line: Vec::new(),
        }
    }
}

impl ResponseTracker {
    /// A request head was passed to the server.
    pub fn request_passed(&mut self, is_head: bool) {
        self.awaiting.push_back(is_head);
    }

    /// True when every request passed on has been answered in full.
    pub fn idle(&self) -> bool {
        self.awaiting.is_empty() && self.state == State::Head && self.line.is_empty()
    }

    /// True when a response could not be followed.
    pub fn lost(&self) -> bool {
        self.state == State::Lost
    }

    /// Takes the bytes the server sent.
    pub fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match self.state {
                State::Lost | State::UntilClose => return,
                State::Body(left) => {
                    let n = take(&mut input, left);
                    self.state = if n == left {
                        State::Head
                    } else {
                        State::Body(left - n)
                    };
                }
                State::ChunkData(left) => {
                    let n = take(&mut input, left);
                    self.state = if n == left {
                        State::ChunkEnd(2)
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                State::ChunkEnd(left) => {
                    let n = take(&mut input, u64::from(left));
                    self.state = if n == u64::from(left) {
                        State::ChunkSize
                    } else {
                        State::ChunkEnd(left - n as u8)
                    };
                }
                State::Head | State::ChunkSize | State::Trailer => {
                    let byte = input[0];
                    input = &input[1..];
                    self.line.push(byte);
                    if self.line.len() > MAX_LINE_BYTES {
                        self.state = State::Lost;
                    } else if self.line.ends_with(b"\r\n") {
                        self.end_of_line();
                    }
                }
            }
        }
    }

    fn end_of_line(&mut self) {
        match self.state {
            State::Head if self.line.ends_with(b"\r\n\r\n") => {
                self.state = self.response_head();
                self.line.clear();
            }
            State::ChunkSize => {
                self.state = match httparse::parse_chunk_size(&self.line) {
                    Ok(httparse::Status::Complete((_, 0))) => State::Trailer,
                    Ok(httparse::Status::Complete((_, size))) => State::ChunkData(size),
                    _ => State::Lost,
                };
                self.line.clear();
            }
            State::Trailer => {
                if self.line == b"\r\n" {
                    self.state = State::Head;
                }
                self.line.clear();
            }
            _ => {}
        }
    }

    /// The state after the complete response head in `self.line`.
    fn response_head(&mut self) -> State {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(_)) = response.parse(&self.line) else {
            return State::Lost;
        };
        let Some(code) = response.code else {
            return State::Lost;
        };
        match code {
            // Upgrades are never served here.
            101 => return State::Lost,
            // Interim: the final answer follows.
            100..=199 => return State::Head,
            _ => {}
        }
        let Some(is_head) = self.awaiting.pop_front() else {
            // An answer to nothing that was passed on.
            return State::Lost;
        };
        if is_head || code == 204 || code == 304 {
            return State::Head;
        }
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
        };
        if let Some(coding) = header("transfer-encoding") {
            return if coding == "chunked" {
                State::ChunkSize
            } else {
                State::Lost
            };
        }
        match header("content-length").map(|v| v.parse::<u64>()) {
            None => State::UntilClose,
            Some(Ok(0)) => State::Head,
            Some(Ok(length)) => State::Body(length),
            Some(Err(_)) => State::Lost,
        }
    }
}

/// Takes up to `left` bytes off the front of `input`; how many it took.
fn take(input: &mut &[u8], left: u64) -> u64 {
    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
    *input = &input[n..];
    n as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fed(requests: &[bool], chunks: &[&[u8]]) -> ResponseTracker {
        let mut t = ResponseTracker::default();
        for &is_head in requests {
            t.request_passed(is_head);
        }
        for chunk in chunks {
            t.feed(chunk);
        }
        t
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

    #[test]
    fn a_fresh_connection_is_idle_and_a_passed_request_is_not() {
        assert!(ResponseTracker::default().idle());
        assert!(!fed(&[false], &[]).idle());
    }

    #[test]
    fn content_length_responses_end_after_their_body_in_any_split() {
        for split in 0..OK.len() {
            let t = fed(&[false], &[&OK[..split], &OK[split..]]);
            assert!(t.idle(), "split at {split}");
        }
        assert!(!fed(&[false], &[&OK[..OK.len() - 1]]).idle());
        // Pipelined: two requests, the first answer alone leaves the second awaited.
        assert!(!fed(&[false, false], &[OK]).idle());
        assert!(fed(&[false, false], &[&[OK, OK].concat()]).idle());
    }

    #[test]
    fn head_answers_and_204_and_304_have_no_body() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n";
        assert!(fed(&[true], &[head]).idle());
        assert!(!fed(&[false], &[head]).idle());
        for status in ["204 No Content", "304 Not Modified"] {
            let raw = format!("HTTP/1.1 {status}\r\nContent-Length: 9\r\n\r\n");
            assert!(fed(&[false], &[raw.as_bytes()]).idle(), "{status}");
        }
    }

    #[test]
    fn chunked_streams_end_at_the_last_chunk_and_its_trailer() {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let body = b"5\r\nhello\r\na;ext=1\r\n0123456789\r\n0\r\n\r\n";
        let whole = [&head[..], &body[..]].concat();
        for split in 0..whole.len() {
            let t = fed(&[false], &[&whole[..split], &whole[split..]]);
            assert!(t.idle(), "split at {split}");
        }
        // A silent stream (a followed log between tasks) is not idle.
        let t = fed(&[false], &[head, b"5\r\nhello\r\n"]);
        assert!(!t.idle() && !t.lost());
        let trailer = [&head[..], b"0\r\nX-T: 1\r\n\r\n"].concat();
        assert!(fed(&[false], &[&trailer]).idle());
    }

    #[test]
    fn interim_answers_wait_for_the_final_one() {
        let t = fed(&[false], &[b"HTTP/1.1 100 Continue\r\n\r\n"]);
        assert!(!t.idle());
        let t = fed(&[false], &[b"HTTP/1.1 100 Continue\r\n\r\n", OK]);
        assert!(t.idle());
    }

    #[test]
    fn what_cannot_be_followed_is_never_idle() {
        for raw in [
            &b"garbage\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let t = fed(&[false], &[raw]);
            assert!(!t.idle(), "{raw:?}");
            assert!(t.lost(), "{raw:?}");
        }
        // An answer nobody asked for.
        assert!(fed(&[], &[OK]).lost());
        // A body without a length runs until the server closes.
        let t = fed(&[false], &[b"HTTP/1.0 200 OK\r\n\r\nbody", OK]);
        assert!(!t.idle());
        let endless = vec![b'x'; MAX_LINE_BYTES + 1];
        assert!(fed(&[false], &[&endless]).lost());
    }
}
