//! Bounds on what a client may send before `tiny_http` sees it.
//!
//! `tiny_http` 0.12 reads a request line and headers into memory with no bound at all, so
//! the guard sits where bytes enter: the relay in front of it (see [`crate::relay`]) feeds
//! every byte from the client to a [`RequestGuard`], which holds each request head back
//! until it is complete and within the limits, parses it with `httparse` (hyper's parser),
//! shows the relay what it needs of it ([`Head`]: the method, the `Authorization` header),
//! then lets the head and its body through.
//!
//! - a request line longer than [`MAX_REQUEST_LINE`] bytes (64 KiB and a little): 414;
//! - header lines totalling more than [`MAX_HEADER_BYTES`], or more than [`MAX_HEADERS`]
//!   fields: 431;
//! - a head that `httparse` cannot parse, or a line ending in a bare LF: 400;
//! - a body longer than [`MAX_BODY_BYTES`] or a malformed `Content-Length`: 413 / 400;
//! - `Transfer-Encoding` on a request: 400 (the API takes no request bodies, and a chunked
//!   body could not be bounded without decoding it).
//!
//! Lines end at CRLF only, exactly as `tiny_http` splits them (a bare LF is refused), so
//! the guard and the server never disagree about where a head ends.

use serde_json::json;

use crate::query::MAX_TARGET_BYTES;

/// Longest request line, CRLF excluded: room for the longest target the API takes
/// ([`MAX_TARGET_BYTES`], which parameter values up to tens of kilobytes rely on), a method
/// and the HTTP version.
pub const MAX_REQUEST_LINE: usize = MAX_TARGET_BYTES + 32;

/// Most bytes of header lines (CRLFs included, request line excluded) in one request.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Longest request body passed on.
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;

/// A request the guard refuses; the relay answers it and closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// What the client is told.
    pub message: String,
}

impl Refusal {
    /// A refusal with this status and message.
    pub fn new(status: u16, message: String) -> Self {
        Refusal { status, message }
    }

    /// The complete HTTP/1.1 response, closing the connection.
    pub fn response(&self) -> Vec<u8> {
        let body = json!({ "error": self.message }).to_string();
        let reason = match self.status {
            400 => "Bad Request",
            408 => "Request Timeout",
            413 => "Content Too Large",
            414 => "URI Too Long",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        };
        format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{body}",
            self.status,
            body.len()
        )
        .into_bytes()
    }
}

/// Most header fields in one request head (hyper's default too); more: 431.
pub const MAX_HEADERS: usize = 100;

/// What the relay learns of a complete request head before it is passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The method is `HEAD` (its answer has no body).
    pub is_head: bool,
    /// The first `Authorization` header, if any.
    pub authorization: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head; nothing of it has been passed on.
    Head,
    /// Passing on this many more body bytes.
    Body(u64),
}

/// Watches one connection's bytes from the client (see the module documentation).
#[derive(Debug)]
pub struct RequestGuard {
    state: State,
    /// The head read so far.
    head: Vec<u8>,
    /// Length of the request line once it is complete.
    request_line: Option<usize>,
}

impl Default for RequestGuard {
    fn default() -> Self {
        RequestGuard {
            state: State::Head,
            head: Vec::new(),
            request_line: None,
        }
    }
}

impl RequestGuard {
    /// True while part of a request head has arrived and it is not complete yet.
    pub fn head_in_progress(&self) -> bool {
        self.state == State::Head && !self.head.is_empty()
    }

    /// Takes bytes from the client and appends to `out` what may be passed on now. Each
    /// complete head is shown to `admit` first, which may refuse it. On a refusal, `out`
    /// holds everything before the refused request; nothing after it may be passed on.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        admit: &mut dyn FnMut(&Head) -> Result<(), Refusal>,
    ) -> Result<(), Refusal> {
        while !input.is_empty() {
            match self.state {
                State::Body(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    let left = left - n as u64;
                    if left == 0 {
                        self.state = State::Head;
                    } else {
                        self.state = State::Body(left);
                    }
                }
                State::Head => {
                    let byte = input[0];
                    input = &input[1..];
                    self.head.push(byte);
                    if byte == b'\n' {
                        self.end_of_line(out, admit)?;
                    } else {
                        self.check_sizes()?;
                    }
                }
            }
        }
        Ok(())
    }

    fn check_sizes(&self) -> Result<(), Refusal> {
        match self.request_line {
            None => {
                // The line so far, without its CRLF or a CR that may start one.
                let len = if self.head.ends_with(b"\r\n") {
                    self.head.len() - 2
                } else {
                    self.head.len() - usize::from(self.head.ends_with(b"\r"))
                };
                if len > MAX_REQUEST_LINE {
                    return Err(Refusal::new(
                        414,
                        format!(
                            "request line of more than {MAX_REQUEST_LINE} bytes exceeds the \
                             limit of {MAX_REQUEST_LINE}"
                        ),
                    ));
                }
            }
            Some(request_line) => {
                let headers = self.head.len() - request_line - 2;
                if headers > MAX_HEADER_BYTES {
                    return Err(Refusal::new(
                        431,
                        format!(
                            "request headers of more than {MAX_HEADER_BYTES} bytes exceed the \
                             limit of {MAX_HEADER_BYTES}"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A LF arrived. Lines end at CRLF only, as `tiny_http` splits them: a bare LF is
    /// refused, so that the guard and the server never disagree about where a head ends.
    fn end_of_line(
        &mut self,
        out: &mut Vec<u8>,
        admit: &mut dyn FnMut(&Head) -> Result<(), Refusal>,
    ) -> Result<(), Refusal> {
        let n = self.head.len();
        if n < 2 || self.head[n - 2] != b'\r' {
            return Err(Refusal::new(
                400,
                "a line of the request head ends in a bare LF; lines end in CRLF".into(),
            ));
        }
        self.check_sizes()?;
        if self.request_line.is_none() {
            self.request_line = Some(n - 2);
            return Ok(());
        }
        if !self.head.ends_with(b"\r\n\r\n") {
            return Ok(());
        }
        // The blank line: the head is complete.
        let (head, body) = self.read_head()?;
        admit(&head)?;
        out.append(&mut self.head);
        *self = RequestGuard::default();
        if body > 0 {
            self.state = State::Body(body);
        }
        Ok(())
    }

    /// Parses the complete head: what the relay needs, and the length of the body.
    fn read_head(&self) -> Result<(Head, u64), Refusal> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut fields);
        match request.parse(&self.head) {
            Ok(httparse::Status::Complete(_)) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Refusal::new(
                    431,
                    format!("more than {MAX_HEADERS} header fields"),
                ))
            }
            Ok(httparse::Status::Partial) | Err(_) => {
                return Err(Refusal::new(400, "malformed request head".into()))
            }
        }
        let mut content_length = None;
        let mut authorization = None;
        for field in request.headers.iter() {
            let value = String::from_utf8_lossy(field.value).trim().to_owned();
            if field.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(Refusal::new(
                    400,
                    "Transfer-Encoding on a request is not supported: this API takes no \
                     request bodies"
                        .into(),
                ));
            } else if field.name.eq_ignore_ascii_case("content-length") {
                let length = value
                    .parse::<u64>()
                    .ok()
                    .filter(|_| !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| Refusal::new(400, format!("bad Content-Length {value:?}")))?;
                if content_length.is_some() {
                    return Err(Refusal::new(400, "Content-Length given twice".into()));
                }
                if length > MAX_BODY_BYTES {
                    return Err(Refusal::new(
                        413,
                        format!(
                            "request body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}"
                        ),
                    ));
                }
                content_length = Some(length);
            } else if field.name.eq_ignore_ascii_case("authorization") && authorization.is_none() {
                authorization = Some(value);
            }
        }
        let head = Head {
            is_head: request.method == Some("HEAD"),
            authorization,
        };
        Ok((head, content_length.unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(_: &Head) -> Result<(), Refusal> {
        Ok(())
    }

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, Result<(), Refusal>) {
        let mut guard = RequestGuard::default();
        let mut out = Vec::new();
        for chunk in chunks {
            if let Err(e) = guard.feed(chunk, &mut out, &mut pass) {
                return (out, Err(e));
            }
        }
        (out, Ok(()))
    }

    #[test]
    fn heads_pass_whole_and_only_when_complete() {
        let req = b"GET /runs HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut guard = RequestGuard::default();
        let mut out = Vec::new();
        guard.feed(&req[..10], &mut out, &mut pass).unwrap();
        assert!(out.is_empty());
        assert!(guard.head_in_progress());
        guard.feed(&req[10..], &mut out, &mut pass).unwrap();
        assert_eq!(out, req);
        assert!(!guard.head_in_progress());
        // Pipelined requests, byte by byte.
        let two = [&req[..], &req[..]].concat();
        let bytes: Vec<&[u8]> = two.chunks(1).collect();
        let (out, result) = run(&bytes);
        assert_eq!((out, result), (two.clone(), Ok(())));
    }

    #[test]
    fn bodies_with_a_length_pass_and_the_next_head_is_checked() {
        let raw = b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n";
        let (out, result) = run(&[raw]);
        assert_eq!((out.as_slice(), result), (&raw[..], Ok(())));
        let raw = b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhe";
        let (out, _) = run(&[raw]);
        assert_eq!(out, raw);
    }

    #[test]
    fn the_longest_request_line_passes_and_one_byte_more_is_414() {
        let line = |len: usize| {
            let path = "a".repeat(len - "GET / HTTP/1.1".len());
            format!("GET /{path} HTTP/1.1\r\n\r\n")
        };
        let ok = line(MAX_REQUEST_LINE);
        assert_eq!(run(&[ok.as_bytes()]).1, Ok(()));
        let (out, result) = run(&[line(MAX_REQUEST_LINE + 1).as_bytes()]);
        assert!(out.is_empty());
        let refusal = result.unwrap_err();
        assert_eq!(refusal.status, 414);
        assert!(refusal.message.contains("exceeds"));
        // Refused without waiting for the end of the line.
        let endless = vec![b'a'; MAX_REQUEST_LINE * 4];
        // A 64 KiB target fits.
        let target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_TARGET_BYTES - 1));
        assert_eq!(run(&[target.as_bytes()]).1, Ok(()));
        assert_eq!(run(&[&endless]).1.unwrap_err().status, 414);
        // A bare LF does not end a line (tiny_http would not end it either).
        let lf = format!("GET /{} HTTP/1.1\n", "a".repeat(MAX_REQUEST_LINE));
        assert_eq!(run(&[lf.as_bytes()]).1.unwrap_err().status, 414);
    }

    #[test]
    fn headers_over_16_kib_are_431_and_earlier_requests_still_pass() {
        let first = b"GET /healthz HTTP/1.1\r\n\r\n";
        let big = format!(
            "GET / HTTP/1.1\r\nX-A: {}\r\nX-B: {}\r\n\r\n",
            "a".repeat(MAX_HEADER_BYTES / 2),
            "b".repeat(MAX_HEADER_BYTES / 2)
        );
        let (out, result) = run(&[first, big.as_bytes()]);
        assert_eq!(out, first);
        assert_eq!(result.unwrap_err().status, 431);
        let many: String = (0..2000).map(|i| format!("X-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(run(&[raw.as_bytes()]).1.unwrap_err().status, 431);
        let fits = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "v".repeat(16_000));
        assert_eq!(run(&[fits.as_bytes()]).1, Ok(()));
    }

    #[test]
    fn unboundable_bodies_are_refused() {
        let cases: [(&[u8], u16); 4] = [
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\ncontent-length: 99999999999\r\n\r\n",
                413,
            ),
        ];
        for (raw, status) in cases {
            let (out, result) = run(&[raw]);
            assert!(out.is_empty());
            assert_eq!(result.unwrap_err().status, status, "{raw:?}");
        }
        let response = Refusal::new(414, "x".into()).response();
        let text = String::from_utf8(response).unwrap();
        assert!(text.starts_with("HTTP/1.1 414 URI Too Long\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"error\":\"x\"}"));
    }

    #[test]
    fn bare_lf_and_unparseable_heads_are_400_and_too_many_fields_431() {
        for raw in [
            &b"GET / HTTP/1.1\nHost: x\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\n\r\n",
            b"GET / HTTP/1.1\r\n\n",
            b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
        ] {
            let (out, result) = run(&[raw]);
            assert!(out.is_empty(), "{raw:?}");
            assert_eq!(result.unwrap_err().status, 400, "{raw:?}");
        }
        let fields: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{fields}\r\n");
        assert_eq!(run(&[raw.as_bytes()]).1.unwrap_err().status, 431);
    }

    #[test]
    fn each_head_is_shown_to_the_relay_which_may_refuse_it() {
        let first = b"HEAD /runs HTTP/1.1\r\nauthorization: Bearer t1\r\nAuthorization: x\r\n\r\n";
        let second = b"GET / HTTP/1.1\r\n\r\n";
        let mut seen = Vec::new();
        let mut guard = RequestGuard::default();
        let mut out = Vec::new();
        let mut admit = |head: &Head| {
            seen.push(head.clone());
            if seen.len() == 2 {
                Err(Refusal::new(503, "busy".into()))
            } else {
                Ok(())
            }
        };
        let input = [&first[..], &second[..]].concat();
        let refusal = guard.feed(&input, &mut out, &mut admit).unwrap_err();
        assert_eq!(refusal.status, 503);
        assert_eq!(out, first, "the refused head is not passed on");
        assert_eq!(
            seen,
            [
                Head {
                    is_head: true,
                    authorization: Some("Bearer t1".into())
                },
                Head {
                    is_head: false,
                    authorization: None
                }
            ]
        );
    }
}
