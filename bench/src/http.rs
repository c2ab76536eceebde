//! A minimal HTTP/1.1 client over `TcpStream`: one request per connection
//! (`Connection: close`, [`get`]) or many on one kept-alive connection ([`Connection`]);
//! bodies read by `Content-Length`, chunks or end of stream. Enough to drive the frontend
//! without pulling an HTTP stack into the measurement.

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
    /// The server said `Connection: close` (or answered HTTP/1.0): the connection is done.
    pub closes: bool,
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

/// A kept-alive connection to 127.0.0.1:`port`: requests go one after the other on the
/// same TCP connection, which is opened at the first request and again after the server
/// closed it or a request failed. A failed request is never sent again (`/job_start` is not
/// idempotent): the error goes to the caller.
#[derive(Debug)]
pub struct Connection {
    port: u16,
    timeout: Duration,
    stream: Option<BufReader<TcpStream>>,
    /// TCP connections opened so far.
    pub connects: usize,
}

impl Connection {
    /// A connection that opens at its first request.
    pub fn new(port: u16, timeout: Duration) -> Connection {
        Connection {
            port,
            timeout,
            stream: None,
            connects: 0,
        }
    }

    /// Opens the TCP connection now (so that the first request's time leaves it out).
    pub fn open(&mut self) -> io::Result<()> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(("127.0.0.1", self.port))?;
            stream.set_read_timeout(Some(self.timeout))?;
            stream.set_write_timeout(Some(self.timeout))?;
            stream.set_nodelay(true)?;
            self.connects += 1;
            self.stream = Some(BufReader::new(stream));
        }
        Ok(())
    }

    /// `GET path` on this connection.
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        self.open()?;
        let Some(reader) = self.stream.as_mut() else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "no connection"));
        };
        let port = self.port;
        let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        let answer = reader
            .get_mut()
            .write_all(request.as_bytes())
            .and_then(|()| read_response(&mut *reader));
        match answer {
            Ok(response) => {
                if response.closes {
                    self.stream = None;
                }
                Ok(response)
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }

    /// `GET path` and its body as JSON, with the path in every error.
    pub fn get_json(&mut self, path: &str) -> anyhow::Result<(u16, Value)> {
        let response = self.get(path).with_context(|| format!("GET {path}"))?;
        let value = response.json().with_context(|| format!("GET {path}"))?;
        Ok((response.status, value))
    }
}

/// `n` kept-alive connections, opened one after the other, each answering a `/healthz`
/// before the next opens. The frontend's HTTP server (tiny_http 0.12) runs each connection
/// on a pooled thread for as long as it lives; connections that arrive together can leave
/// one queued behind the others until one of them closes (the 10 s idle timeout). Opened
/// this way, each has its thread before the next arrives.
pub fn warmed(port: u16, n: usize, timeout: Duration) -> anyhow::Result<Vec<Connection>> {
    (0..n)
        .map(|_| {
            let mut conn = Connection::new(port, timeout);
            let answer = conn
                .get("/healthz")
                .context("opening a kept-alive connection")?;
            if answer.status != 200 {
                anyhow::bail!("/healthz answered {} on a new connection", answer.status);
            }
            Ok(conn)
        })
        .collect()
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
    let mut closes = line.starts_with("HTTP/1.0");
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
            if name.eq_ignore_ascii_case("connection") {
                closes = value.eq_ignore_ascii_case("close");
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
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
                // The trailers, if any, and the empty line that ends the body.
                loop {
                    line.clear();
                    if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                        break;
                    }
                }
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
        // No length: the body ends with the connection.
        reader.read_to_end(&mut body)?;
        closes = true;
    }
    Ok(Response {
        status,
        body,
        closes,
    })
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

    #[test]
    fn a_kept_alive_response_stops_at_its_length_and_the_next_follows() {
        let two = b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}\
                    HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx";
        let mut reader = &two[..];
        let first = read_response(&mut reader).unwrap();
        assert_eq!((first.status, first.closes), (202, false));
        let second = read_response(&mut reader).unwrap();
        assert_eq!((second.status, second.text().as_str()), (200, "x"));
        assert!(second.closes, "Connection: close ends the connection");
        let old = read_response(&b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"[..]).unwrap();
        assert!(old.closes, "HTTP/1.0 closes unless told otherwise");
        let unbounded = read_response(&b"HTTP/1.1 200 OK\r\n\r\nrest"[..]).unwrap();
        assert!(
            unbounded.closes,
            "a body read to the end closes the connection"
        );
    }

    #[test]
    fn a_connection_serves_many_requests_and_reopens_after_a_close() {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // A server that answers two requests per connection, the second with a close.
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                for i in 0..2 {
                    let mut line = String::new();
                    loop {
                        line.clear();
                        reader.read_line(&mut line).unwrap();
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let close = if i == 1 { "Connection: close\r\n" } else { "" };
                    write!(
                        &stream,
                        "HTTP/1.1 200 OK\r\n{close}Content-Length: 1\r\n\r\n{i}"
                    )
                    .unwrap();
                }
            }
        });
        let mut conn = Connection::new(port, Duration::from_secs(5));
        let bodies: Vec<String> = (0..4).map(|_| conn.get("/x").unwrap().text()).collect();
        assert_eq!(bodies, ["0", "1", "0", "1"]);
        assert_eq!(conn.connects, 2);
        server.join().unwrap();
    }
}
