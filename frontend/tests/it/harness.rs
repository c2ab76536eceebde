//! Test fixtures: a fake broker on real ZeroMQ sockets, the real `jobz-frontend` binary on
//! free loopback ports, and a small HTTP client. Everything stops on drop.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use jobz::envelope::{self, Envelope};
use jobz::message::{Message, Reply, ReplyBody};
use jobz::topic::Topic;

/// Waits until `check` holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on loopback (free when asked; good enough for tests).
/// A free port on 127.0.0.1 that no other test of this process was given: the kernel
/// may hand a just-released port to the next `bind(0)`, and tests run in parallel.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A base port whose next port is free too.
fn free_base_port() -> u16 {
    for _ in 0..100 {
        let base = free_port();
        if base < 60000
            && TcpListener::bind(("127.0.0.1", base + 1)).is_ok()
            && TcpListener::bind(("127.0.0.1", base)).is_ok()
        {
            return base;
        }
    }
    panic!("no two consecutive free ports");
}

type Answer = dyn Fn(&Message) -> Option<ReplyBody> + Send + Sync;

/// A broker that speaks the wire protocol and answers from a closure (`None`: no answer).
/// `Hello` is always welcomed.
pub struct FakeBroker {
    pub base_port: u16,
    pub seen: Arc<Mutex<Vec<Message>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeBroker {
    pub fn start(answer: impl Fn(&Message) -> Option<ReplyBody> + Send + Sync + 'static) -> Self {
        let base_port = free_base_port();
        let ctx = zmq::Context::new();
        let publisher = ctx.socket(zmq::PUB).unwrap();
        let pull = ctx.socket(zmq::PULL).unwrap();
        publisher.set_linger(0).unwrap();
        pull.set_linger(0).unwrap();
        publisher
            .bind(&format!("tcp://127.0.0.1:{base_port}"))
            .unwrap();
        pull.bind(&format!("tcp://127.0.0.1:{}", base_port + 1))
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let answer: Box<Answer> = Box::new(answer);
        let thread = {
            let seen = seen.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if pull.poll(zmq::POLLIN, 20).unwrap_or(0) == 0 {
                        continue;
                    }
                    let Ok(frame) = pull.recv_bytes(0) else {
                        continue;
                    };
                    let Ok(env) = envelope::decode(&frame) else {
                        continue;
                    };
                    let body = match &env.body {
                        Message::Hello { .. } => Some(ReplyBody::Welcome {
                            broker_instance: "fake".into(),
                        }),
                        other => {
                            seen.lock().unwrap().push(other.clone());
                            answer(other)
                        }
                    };
                    if let Some(body) = body {
                        let reply = Envelope::new(
                            "broker",
                            Message::Reply(Reply {
                                in_reply_to: env.id.clone(),
                                body,
                            }),
                        );
                        let topic = Topic::Node(env.sender.clone()).to_bytes();
                        let frame = envelope::encode(&reply).unwrap();
                        publisher.send_multipart([topic, frame], 0).unwrap();
                    }
                }
            })
        };
        FakeBroker {
            base_port,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn seen(&self) -> Vec<Message> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The real `jobz-frontend` binary, killed on drop.
pub struct Frontend {
    pub port: u16,
    child: Child,
}

impl Frontend {
    /// Starts the frontend against `broker_base_port` and waits until it answers HTTP.
    pub fn start(broker_base_port: u16, extra: &[&str]) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_jobz-frontend"))
            .arg("--broker")
            .arg(format!("127.0.0.1:{broker_base_port}"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(extra)
            .env_remove("JOBZ_BROKER")
            .env_remove("JOBZ_LISTEN")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let frontend = Frontend { port, child };
        // A connection whose two ends are the same address is TCP's self-connect (the port
        // is from the ephemeral range), not the frontend listening: CI once saw the
        // request after such a "ready" refused.
        assert!(
            wait_until(Duration::from_secs(10), || {
                TcpStream::connect(("127.0.0.1", port))
                    .is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
            }),
            "frontend did not start listening"
        );
        frontend
    }

    pub fn get(&self, target: &str) -> Response {
        request(self.port, "GET", target)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit; returns whether it exited successfully.
    pub fn terminate(mut self) -> bool {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
        let mut status = None;
        wait_until(Duration::from_secs(10), || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.is_some_and(|s| s.success())
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response, body de-chunked.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        assert_eq!(self.header("content-type"), Some("application/json"));
        serde_json::from_slice(&self.body).unwrap()
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }
}

/// One request on a fresh connection (`Connection: close`).
pub fn request(port: u16, method: &str, target: &str) -> Response {
    request_with(port, method, target, &[])
}

/// One request with extra header lines, on a fresh connection (`Connection: close`).
pub fn request_with(port: u16, method: &str, target: &str, headers: &[&str]) -> Response {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    stream.flush().unwrap();
    read_response(BufReader::new(stream), method == "HEAD")
}

fn read_response(mut reader: impl BufRead, head_only: bool) -> Response {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if head_only {
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = find("content-length") {
        body = vec![0; len.parse().unwrap()];
        reader.read_exact(&mut body).unwrap();
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    Response {
        status,
        headers,
        body,
    }
}
