//! A minimal HTTP/1.1 client over `TcpStream`: one request per connection
//! (`Connection: close`), bodies read by `Content-Length`, chunks or end of stream. Enough
//! to drive the frontend without pulling an HTTP stack into the measurement.

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

/// A response as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "a {} answer that is not JSON: {:?}",
                self.status,
                self.text()
            )
        })
    }
}

/// `GET path` on 127.0.0.1:`port`; connecting, writing and each read stop at `timeout`.
pub fn get(port: u16, path: &str, timeout: Duration) -> io::Result<Response> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    (&stream).write_all(request.as_bytes())?;
    read_response(BufReader::new(stream))
}

/// `GET path` and its body as JSON, with the path in every error.
pub fn get_json(port: u16, path: &str, timeout: Duration) -> anyhow::Result<(u16, Value)> {
    let response = get(port, path, timeout).with_context(|| format!("GET {path}"))?;
    let value = response.json().with_context(|| format!("GET {path}"))?;
    Ok((response.status, value))
}

fn read_response(mut reader: impl BufRead) -> io::Result<Response> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a status line",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| line.starts_with("HTTP/1."))
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(bad("connection closed inside the headers".into()));
        }
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("content-length") {
                length = Some(
                    value
                        .parse()
                        .map_err(|_| bad(format!("bad content-length {value:?}")))?,
                );
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size_text = line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            line.clear();
            reader.read_line(&mut line)?;
        }
    } else if let Some(len) = length {
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_with_length_chunks_or_close() {
        let r =
            read_response(&b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}x"[..]).unwrap();
        assert_eq!((r.status, r.text().as_str()), (202, "{}"));
        let r = read_response(
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                [..],
        )
        .unwrap();
        assert_eq!(r.text(), "abcde");
        let r = read_response(&b"HTTP/1.0 503 Unavailable\r\n\r\nnope"[..]).unwrap();
        assert_eq!((r.status, r.text().as_str()), (503, "nope"));
        assert!(read_response(&b""[..]).is_err());
        assert!(read_response(&b"garbage\r\n\r\n"[..]).is_err());
    }
}
