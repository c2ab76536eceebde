//! The test harness: real binaries, real sockets on 127.0.0.1, one temporary directory per
//! test, every child killed by PID on drop.
//!
//! - [`bin`] builds the workspace's binaries once per test process and finds them.
//! - [`Mesh`] is a broker, a frontend and any number of workers, each with its own
//!   directories and its own stderr file; [`MeshBuilder`] sets it up.
//! - [`Mesh::start_semaphore`] adds a `jobz-semaphore` to a running mesh and waits until it
//!   has caught up with the broker.
//! - [`http_request`] is a minimal HTTP/1.1 client over `TcpStream`, so hostile tests can
//!   send raw bytes; [`Mesh::http_get`] and [`Mesh::get_json`] wrap it.
//! - [`wait_until`] and [`wait_for`] poll every 50 ms up to a deadline: tests wait on
//!   observable events, never on a sleep.

// A toolbox: not every test binary build uses every helper.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::hash::BuildHasher;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How often a wait polls.
pub const POLL: Duration = Duration::from_millis(50);

/// The default deadline for anything a healthy mesh does in well under a second.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The workspace's binaries, all of which a mesh may start.
pub const BINARIES: [&str; 4] = [
    "jobz-broker",
    "jobz-frontend",
    "jobz-worker",
    "jobz-semaphore",
];

/// How long a worker waits between heartbeats in tests.
pub const HEARTBEAT: &str = "200ms";

// ---- Binaries ---------------------------------------------------------------------------

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives inside the workspace")
        .to_owned()
}

/// The repository root, for tests that read shipped files (`jobs.d/`, `tests/data/`).
pub fn repo_root() -> PathBuf {
    workspace_root()
}

pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Path of one of the workspace's binaries, built fresh once per test process
/// (`cargo build --workspace --bins`; set `JOBZ_E2E_NO_BUILD=1` to skip the build).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build) {
        Ok(dir) => dir.join(name),
        Err(e) => panic!("{e}"),
    }
}

fn build() -> Result<PathBuf, String> {
    if std::env::var_os("JOBZ_E2E_NO_BUILD").is_none() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(&cargo)
            .args(["build", "--workspace", "--bins"])
            .current_dir(workspace_root())
            .env("CARGO_TARGET_DIR", target_dir())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {cargo:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`cargo build --workspace --bins` failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let dir = target_dir().join("debug");
    for name in BINARIES {
        if !dir.join(name).is_file() {
            return Err(format!("{} was not built", dir.join(name).display()));
        }
    }
    Ok(dir)
}

// ---- Ports ------------------------------------------------------------------------------

/// Ports handed out in this test process, so parallel tests never share one.
static TAKEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A base port `P` such that `P .. P + count` are free on 127.0.0.1, reserved for this
/// process. Chosen below Linux's ephemeral range (32768+), so no outgoing connection's
/// local port can take one of them between this check and the bind.
pub fn free_ports(count: u16) -> u16 {
    let random = RandomState::new();
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 0..10_000u32 {
        let base = 20_000 + (random.hash_one(attempt) % 12_000) as u16;
        let ports = base..base + count;
        if ports.clone().any(|p| taken.contains(&p)) {
            continue;
        }
        if ports
            .clone()
            .all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        {
            taken.extend(ports);
            return base;
        }
    }
    panic!("no {count} consecutive free ports found on 127.0.0.1");
}

// ---- Waiting ----------------------------------------------------------------------------

/// Polls `condition` every [`POLL`] until it holds; panics after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    wait_for(timeout, what, || {
        if condition() {
            Ok(())
        } else {
            Err(String::from("condition false"))
        }
    })
}

/// Polls `probe` every [`POLL`] until it gives `Ok`; panics after `timeout` with the last
/// `Err`, which should say what was seen instead.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe() {
            Ok(value) => return value,
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        std::thread::sleep(POLL);
    }
}

// ---- HTTP -------------------------------------------------------------------------------

/// An HTTP response as read off the wire.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header names (lower-cased) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first header of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `raw` as it is to 127.0.0.1:`port` and reads one response. The request should ask
/// for `Connection: close` or the response should carry a length; reads stop at `timeout`.
pub fn http_request(port: u16, raw: &[u8], timeout: Duration) -> io::Result<HttpResponse> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    (&stream).write_all(raw)?;
    read_response(BufReader::new(stream))
}

fn read_response(mut reader: impl BufRead) -> io::Result<HttpResponse> {
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
    let mut headers = Vec::new();
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
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size_text = line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size];
            reader.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
            line.clear();
            reader.read_line(&mut line)?;
        }
    } else if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| bad(format!("bad content-length {len:?}")))?;
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Percent-encodes every byte but the unreserved ones (RFC 3986).
pub fn percent_encode(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `/job_start?job_name=JOB&k=v…`, every name and value percent-encoded.
pub fn job_start_path(job: &str, params: &[(&str, &str)]) -> String {
    let mut path = format!("/job_start?job_name={}", percent_encode(job.as_bytes()));
    for (k, v) in params {
        path.push('&');
        path.push_str(&percent_encode(k.as_bytes()));
        path.push('=');
        path.push_str(&percent_encode(v.as_bytes()));
    }
    path
}

// ---- JSON helpers -----------------------------------------------------------------------

/// `v[key]` as a string, or "" when absent or not a string.
pub fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A list that the API gives either bare or wrapped as `{"<key>": [...]}`.
pub fn list_of(v: &Value, key: &str) -> Vec<Value> {
    match v {
        Value::Array(items) => items.clone(),
        Value::Object(map) => map
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// A run's steps (one entry per task).
pub fn steps_of(run: &Value) -> Vec<Value> {
    run.get("steps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The steps of one job.
pub fn steps_of_job(run: &Value, job: &str) -> Vec<Value> {
    steps_of(run)
        .into_iter()
        .filter(|s| str_of(s, "job") == job)
        .collect()
}

// ---- Worker log -------------------------------------------------------------------------

/// One line of a `worker.log`:
/// `<time> run=<id> step=<id> task=<id> job=<job> attempt=<n> <event>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Run id.
    pub run: String,
    /// Step id.
    pub step: String,
    /// Task id.
    pub task: String,
    /// Job name.
    pub job: String,
    /// Attempt.
    pub attempt: String,
    /// The worker that wrote the line.
    pub worker: String,
    /// Everything after the fields: `received`, `finished exit=0 in 0.12s`, …
    pub event: String,
    /// The whole line.
    pub line: String,
}

/// Parses the worker-log lines that carry a run id; others are skipped.
pub fn parse_worker_log(text: &str) -> Vec<LogLine> {
    let mut lines = Vec::new();
    for line in text.lines() {
        let mut entry = LogLine {
            run: String::new(),
            step: String::new(),
            task: String::new(),
            job: String::new(),
            attempt: String::new(),
            worker: String::new(),
            event: String::new(),
            line: line.to_owned(),
        };
        let mut rest: Vec<&str> = Vec::new();
        for (i, word) in line.split(' ').enumerate() {
            if i == 0 {
                continue; // the time stamp
            }
            let field = word.split_once('=').filter(|_| rest.is_empty());
            match field {
                Some(("run", v)) => entry.run = v.to_owned(),
                Some(("step", v)) => entry.step = v.to_owned(),
                Some(("task", v)) => entry.task = v.to_owned(),
                Some(("job", v)) => entry.job = v.to_owned(),
                Some(("attempt", v)) => entry.attempt = v.to_owned(),
                Some(("worker", v)) => entry.worker = v.to_owned(),
                _ => rest.push(word),
            }
        }
        entry.event = rest.join(" ");
        if !entry.run.is_empty() {
            lines.push(entry);
        }
    }
    lines
}

// ---- Processes --------------------------------------------------------------------------

struct Proc {
    bin: PathBuf,
    args: Vec<OsString>,
    stderr: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(&mut self) {
        self.spawn_with(|_| {});
    }

    /// Starts the process, its output appended to its stderr file, after `adjust` has had
    /// its say on the command (extra environment, another user).
    fn spawn_with(&mut self, adjust: impl FnOnce(&mut Command)) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.stderr.display()));
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning a file handle"))
            .stderr(log)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("JOBZ_E2E_RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        // The operator's own settings must not leak into a test mesh.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("JOBZ_") {
                cmd.env_remove(key);
            }
        }
        adjust(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// SIGKILL by PID, then reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn status(&mut self) -> String {
        match self.child.as_mut().map(|c| c.try_wait()) {
            None => "stopped by the test".into(),
            Some(Ok(None)) => "running".into(),
            Some(Ok(Some(status))) => format!("EXITED ({status})"),
            Some(Err(e)) => format!("unknown ({e})"),
        }
    }
}

/// Sets up a [`Mesh`].
#[derive(Default)]
pub struct MeshBuilder {
    workers: Vec<(String, String, Vec<String>)>,
    broker_args: Vec<String>,
    /// Address the broker binds and everyone connects to (default 127.0.0.1).
    broker_host: Option<String>,
    /// Workers to run inside a network namespace: name → namespace.
    netns: Vec<(String, String)>,
    /// Sealed frames: the broker gets a key directory, every node a key.
    sealed: bool,
    /// Workers whose keys are not pre-accepted (they wait as pending).
    unenrolled: Vec<String>,
}

impl MeshBuilder {
    /// A worker named `name` whose `jobs.d/jobs.yaml` is `jobs_yaml`; `@DIR@` in it is
    /// replaced by the mesh's temporary directory.
    pub fn worker(self, name: &str, jobs_yaml: &str) -> Self {
        self.worker_with_args(name, jobs_yaml, &[])
    }

    /// Like [`MeshBuilder::worker`], with extra flags.
    pub fn worker_with_args(mut self, name: &str, jobs_yaml: &str, args: &[&str]) -> Self {
        self.workers.push((
            name.to_owned(),
            jobs_yaml.to_owned(),
            args.iter().map(|a| a.to_string()).collect(),
        ));
        self
    }

    /// The broker binds `host` (a local address, e.g. the host end of a test's veth pair)
    /// instead of 127.0.0.1, and every process connects to it there.
    pub fn broker_host(mut self, host: &str) -> Self {
        self.broker_host = Some(host.to_owned());
        self
    }

    /// Runs the worker `name` inside network namespace `netns` (`ip netns exec`, which
    /// execs: the PID the mesh kills is the worker's).
    pub fn worker_in_netns(mut self, name: &str, netns: &str) -> Self {
        self.netns.push((name.to_owned(), netns.to_owned()));
        self
    }

    /// Sealed mode: the broker runs with `--keys`, and the frontend and workers with keys
    /// that are pre-accepted (as Ansible would), except [`MeshBuilder::unenrolled`] ones.
    pub fn sealed(mut self) -> Self {
        self.sealed = true;
        self
    }

    /// In sealed mode, the worker `name` starts with a key the broker has not accepted.
    pub fn unenrolled(mut self, name: &str) -> Self {
        self.unenrolled.push(name.to_owned());
        self
    }

    /// Extra broker flags.
    pub fn broker_args(mut self, args: &[&str]) -> Self {
        self.broker_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Starts the broker and the frontend, waits until `/healthz` says the broker answers,
    /// then starts the workers (without waiting for them to register: see
    /// [`Mesh::wait_workers_live`]).
    pub fn start(self) -> Mesh {
        let dir = tempfile::Builder::new()
            .prefix("jobz-e2e-")
            .tempdir()
            .expect("creating a temporary directory");
        let root = dir.path().to_owned();
        let base_port = free_ports(4);
        let frontend_port = free_ports(1);
        let mut mesh = Mesh {
            dir: Some(dir),
            root: root.clone(),
            base_port,
            frontend_port,
            procs: Vec::new(),
        };
        let broker_host = self
            .broker_host
            .clone()
            .unwrap_or_else(|| "127.0.0.1".into());
        let broker_addr = format!("{broker_host}:{base_port}");
        let frontend_url = format!("http://127.0.0.1:{frontend_port}");

        let mut broker_args: Vec<OsString> = vec![
            "--bind".into(),
            broker_addr.clone().into(),
            "--state".into(),
            root.join("broker").into(),
            "--redeliver-after".into(),
            "500ms".into(),
        ];
        broker_args.extend(self.broker_args.iter().map(OsString::from));
        let mut frontend_args: Vec<OsString> = vec![
            "--listen".into(),
            format!("127.0.0.1:{frontend_port}").into(),
            "--broker".into(),
            broker_addr.clone().into(),
        ];
        if self.sealed {
            let broker_key = jobz::keys::NodeKey::generate().expect("generating a key");
            fs::create_dir_all(mesh.keys_dir()).expect("creating the key directory");
            broker_key
                .save_new(&mesh.keys_dir().join("broker.key"))
                .expect("saving the broker key");
            fs::write(mesh.broker_pub(), format!("{}\n", broker_key.public()))
                .expect("writing the broker's public key");
            broker_args.extend(["--keys".into(), mesh.keys_dir().into()]);
            let key = mesh.enroll("frontend:e2e", &root.join("frontend.key"));
            frontend_args.extend(["--name".into(), "e2e".into()]);
            frontend_args.extend(mesh.key_args(&key));
        }
        mesh.add("broker", bin("jobz-broker"), broker_args);
        mesh.add("frontend", bin("jobz-frontend"), frontend_args);
        mesh.wait_healthy();

        for (name, yaml, extra) in self.workers {
            let home = root.join(&name);
            let jobs_dir = home.join("jobs.d");
            fs::create_dir_all(&jobs_dir).expect("creating a jobs dir");
            let yaml = yaml.replace("@DIR@", &root.to_string_lossy());
            fs::write(jobs_dir.join("jobs.yaml"), yaml).expect("writing a job file");
            let mut args: Vec<OsString> = vec![
                "--broker".into(),
                broker_addr.clone().into(),
                "--name".into(),
                name.clone().into(),
                "--jobs-dir".into(),
                jobs_dir.into(),
                "--spool".into(),
                home.join("spool").into(),
                "--log-dir".into(),
                home.join("log").into(),
                "--heartbeat".into(),
                HEARTBEAT.into(),
                "--frontend".into(),
                frontend_url.clone().into(),
            ];
            if !extra.iter().any(|a| a == "--slots") {
                args.extend(["--slots".into(), "4".into()]);
            }
            if self.sealed {
                let key = home.join("node.key");
                if self.unenrolled.contains(&name) {
                    jobz::keys::NodeKey::generate()
                        .and_then(|k| k.save_new(&key))
                        .expect("saving a worker key");
                } else {
                    mesh.enroll(&format!("worker:{name}"), &key);
                }
                args.extend(mesh.key_args(&key));
            }
            args.extend(extra.iter().map(OsString::from));
            match self.netns.iter().find(|(w, _)| *w == name) {
                Some((_, ns)) => {
                    let mut wrapped: Vec<OsString> = vec![
                        "netns".into(),
                        "exec".into(),
                        ns.into(),
                        bin("jobz-worker").into(),
                    ];
                    wrapped.extend(args);
                    mesh.add(&name, PathBuf::from("ip"), wrapped);
                }
                None => mesh.add(&name, bin("jobz-worker"), args),
            }
        }
        mesh
    }
}

/// A running jobz mesh on loopback: a broker, a frontend and workers, in a temporary
/// directory. Dropping it kills every process (SIGKILL by PID) and, when the test is
/// failing, prints the tail of each process's stderr and worker log first.
pub struct Mesh {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    /// The broker's base port (PUB); PULL is `base_port + 1`.
    pub base_port: u16,
    /// The frontend's HTTP port.
    pub frontend_port: u16,
    procs: Vec<(String, Proc)>,
}

impl Mesh {
    /// A new builder.
    pub fn builder() -> MeshBuilder {
        MeshBuilder::default()
    }

    /// The mesh's temporary directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    fn add(&mut self, name: &str, bin: PathBuf, args: Vec<OsString>) {
        let mut proc = Proc {
            bin,
            args,
            stderr: self.root.join(format!("{name}.stderr")),
            child: None,
        };
        proc.spawn();
        self.procs.push((name.to_owned(), proc));
    }

    fn proc(&mut self, name: &str) -> &mut Proc {
        match self.procs.iter_mut().find(|(n, _)| n == name) {
            Some((_, p)) => p,
            None => panic!("no process named {name:?} in this mesh"),
        }
    }

    /// PID of a running process.
    pub fn pid(&mut self, name: &str) -> u32 {
        match &self.proc(name).child {
            Some(child) => child.id(),
            None => panic!("{name} is not running"),
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self, name: &str) -> bool {
        self.proc(name)
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills a process with SIGKILL and reaps it.
    pub fn kill9(&mut self, name: &str) {
        self.proc(name).kill();
    }

    /// Starts a process again with the same flags (killing it first if it still runs);
    /// its stderr file is appended to.
    pub fn restart(&mut self, name: &str) {
        let proc = self.proc(name);
        proc.kill();
        if let Ok(mut f) = fs::OpenOptions::new().append(true).open(&proc.stderr) {
            let _ = writeln!(f, "---- e2e: restarted ----");
        }
        proc.spawn();
    }

    /// Starts a `jobz-semaphore` named `name` whose `jobs.d/semaphores.yaml` is `yaml`
    /// (`@DIR@` replaced by the mesh's directory), with its state in `<dir>/<name>/state`
    /// and a status report every 200 ms, and waits until it has caught up with the broker.
    pub fn start_semaphore(&mut self, name: &str, yaml: &str) {
        let home = self.root.join(name);
        let jobs_dir = home.join("jobs.d");
        fs::create_dir_all(&jobs_dir).expect("creating a jobs dir");
        let yaml = yaml.replace("@DIR@", &self.root.to_string_lossy());
        fs::write(jobs_dir.join("semaphores.yaml"), yaml).expect("writing a job file");
        let args: Vec<OsString> = vec![
            "--broker".into(),
            format!("127.0.0.1:{}", self.base_port).into(),
            "--jobs-dir".into(),
            jobs_dir.into(),
            "--state".into(),
            home.join("state").into(),
            "--status-interval".into(),
            "200ms".into(),
        ];
        let mut args = args;
        if self.broker_pub().exists() {
            // A sealed mesh: the semaphore gets a key, accepted as `semaphore:<name>`.
            let key = home.join("node.key");
            if !key.exists() {
                self.enroll(&format!("semaphore:{name}"), &key);
            }
            args.extend(["--name".into(), name.into()]);
            args.extend(self.key_args(&key));
        }
        self.add(name, bin("jobz-semaphore"), args);
        self.wait_semaphore_ready(name, 1);
    }

    /// Waits until the semaphore `name` has said `semaphore ready` `starts` times (once per
    /// start: its stderr file is appended to across restarts).
    pub fn wait_semaphore_ready(&mut self, name: &str, starts: usize) {
        let needle = "semaphore ready";
        wait_for(DEADLINE, &format!("{name} to be ready ({starts})"), || {
            let text = self.stderr_of(name);
            let seen = text.matches(needle).count();
            if seen >= starts {
                Ok(())
            } else {
                Err(format!(
                    "{seen} times {needle:?}; tail: {}",
                    last_lines(&text, 5)
                ))
            }
        });
    }

    /// Everything a process wrote to stdout and stderr so far.
    pub fn stderr_of(&self, name: &str) -> String {
        fs::read(self.root.join(format!("{name}.stderr")))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Path of a worker's `worker.log`.
    pub fn worker_log_path(&self, worker: &str) -> PathBuf {
        self.root.join(worker).join("log").join("worker.log")
    }

    /// A worker's `worker.log` lines about one run (none if the log does not exist yet).
    pub fn worker_log(&self, worker: &str, run_id: &str) -> Vec<LogLine> {
        let text = fs::read(self.worker_log_path(worker))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        parse_worker_log(&text)
            .into_iter()
            .filter(|l| l.run == run_id)
            .collect()
    }

    /// `GET path` on the frontend: status and body. Panics if the frontend cannot be reached.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        match self.try_http_get(path) {
            Ok(r) => r,
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// `GET path` on the frontend, with connection errors as `Err`.
    pub fn try_http_get(&self, path: &str) -> io::Result<(u16, String)> {
        let raw = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.frontend_port
        );
        let response = http_request(self.frontend_port, raw.as_bytes(), DEADLINE)?;
        Ok((response.status, response.text()))
    }

    /// `GET path`, the body parsed as JSON (a body that is not JSON panics).
    pub fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.http_get(path);
        match serde_json::from_str(&body) {
            Ok(v) => (status, v),
            Err(e) => panic!("GET {path}: {status} with a body that is not JSON ({e}): {body:?}"),
        }
    }

    /// `POST path` on the frontend with an empty body and `headers` (each `Name: value`):
    /// status and JSON body (`null` when the body is not JSON).
    pub fn http_post(&self, path: &str, headers: &[&str]) -> (u16, Value) {
        let mut raw = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: 0\r\n",
            self.frontend_port
        );
        for header in headers {
            raw.push_str(header);
            raw.push_str("\r\n");
        }
        raw.push_str("\r\n");
        let response = http_request(self.frontend_port, raw.as_bytes(), DEADLINE)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let body = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        (response.status, body)
    }

    /// `GET /job_start` with these parameters: status and JSON body.
    pub fn trigger(&self, job: &str, params: &[(&str, &str)]) -> (u16, Value) {
        self.get_json(&job_start_path(job, params))
    }

    /// Triggers a job, asserts `202`, returns the run id.
    pub fn start_run(&self, job: &str, params: &[(&str, &str)]) -> String {
        let (status, body) = self.trigger(job, params);
        assert_eq!(status, 202, "job_start {job} {params:?}: {body}");
        let run_id = str_of(&body, "run_id");
        assert!(!run_id.is_empty(), "job_start {job}: no run_id in {body}");
        run_id.to_owned()
    }

    /// `GET /runs/{run_id}`, asserting 200.
    pub fn run(&self, run_id: &str) -> Value {
        let (status, body) = self.get_json(&format!("/runs/{run_id}"));
        assert_eq!(status, 200, "GET /runs/{run_id}: {body}");
        body
    }

    /// Polls `/runs/{run_id}` until the run is `succeeded`, `failed` or `cancelled`.
    pub fn wait_run_final(&self, run_id: &str) -> Value {
        self.wait_run_final_within(run_id, DEADLINE)
    }

    /// [`Mesh::wait_run_final`] with another deadline.
    pub fn wait_run_final_within(&self, run_id: &str, timeout: Duration) -> Value {
        wait_for(timeout, &format!("run {run_id} to end"), || {
            let (status, body) = self
                .try_http_get(&format!("/runs/{run_id}"))
                .map_err(|e| e.to_string())?;
            let run: Value =
                serde_json::from_str(&body).map_err(|e| format!("{status} {body:?}: {e}"))?;
            match str_of(&run, "state") {
                "succeeded" | "failed" | "cancelled" if status == 200 => Ok(run),
                _ => Err(format!("{status} {run}")),
            }
        })
    }

    /// Polls `/workers` until at least `n` workers are live; returns the live ones.
    /// A broadcast only reaches registered workers, so tests wait for this first.
    pub fn wait_workers_live(&self, n: usize) -> Vec<Value> {
        wait_for(DEADLINE, &format!("{n} live workers"), || {
            let (status, body) = self.try_http_get("/workers").map_err(|e| e.to_string())?;
            let parsed: Value =
                serde_json::from_str(&body).map_err(|e| format!("{status} {body:?}: {e}"))?;
            let live: Vec<Value> = list_of(&parsed, "workers")
                .into_iter()
                .filter(|w| w.get("live") == Some(&Value::Bool(true)))
                .collect();
            if status == 200 && live.len() >= n {
                Ok(live)
            } else {
                Err(format!("{status} {body}"))
            }
        })
    }

    fn wait_healthy(&self) {
        wait_for(
            DEADLINE,
            "the frontend's /healthz to answer 200",
            || match self.try_http_get("/healthz") {
                Ok((200, _)) => Ok(()),
                Ok((status, body)) => Err(format!("{status} {body}")),
                Err(e) => Err(e.to_string()),
            },
        )
    }

    fn print_diagnostics(&mut self) {
        eprintln!("\n======== e2e mesh in {} ========", self.root.display());
        let root = self.root.clone();
        for (name, proc) in &mut self.procs {
            eprintln!("---- {name}: {} ----", proc.status());
            eprintln!("{}", tail(&proc.stderr, 40));
            let worker_log = root.join(name.as_str()).join("log").join("worker.log");
            if worker_log.exists() {
                eprintln!("---- {name}: worker.log ----");
                eprintln!("{}", tail(&worker_log, 40));
            }
        }
        eprintln!("======== end of e2e mesh ========");
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if failing {
            self.print_diagnostics();
        }
        for (_, proc) in self.procs.iter_mut().rev() {
            proc.kill();
        }
        if failing && std::env::var_os("JOBZ_E2E_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("kept {}", dir.keep().display());
            }
        }
    }
}

/// The last `n` lines of a text.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---- Processes outside the mesh ---------------------------------------------------------

/// True if `pid` exists and is not a zombie (a killed orphan may stay a zombie where PID 1
/// does not reap).
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => match stat.rsplit_once(')') {
            Some((_, rest)) => !matches!(rest.trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => false,
    }
}

/// Kills `pid` with SIGKILL if it is still alive and its command line contains `expect`
/// (so a recycled PID is left alone). For cleaning up after a failed test.
pub fn kill_if_alive(pid: u32, expect: &str) {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if pid_alive(pid) && String::from_utf8_lossy(&cmdline).contains(expect) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

#[test]
fn worker_log_lines_parse() {
    let lines = parse_worker_log(
        "2026-11-23T10:00:00.123Z run=r1 step=s1 task=t1 job=import attempt=1 finished exit=0 in 0.12s\n\
         garbage\n\
         2026-11-23T10:00:00.124Z run=r2 step=s2 task=t2 job=x attempt=2 failed: no such job\n",
    );
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0].run, "r1");
    assert_eq!(lines[0].job, "import");
    assert_eq!(lines[0].event, "finished exit=0 in 0.12s");
    assert_eq!(lines[1].attempt, "2");
    assert_eq!(lines[1].event, "failed: no such job");
}

#[test]
fn http_responses_parse_with_length_chunks_or_close() {
    let r =
        read_response(&b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}extra"[..]).unwrap();
    assert_eq!((r.status, r.text().as_str()), (202, "{}"));
    let r = read_response(
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"[..],
    )
    .unwrap();
    assert_eq!(r.text(), "abcde");
    let r = read_response(&b"HTTP/1.0 404 Not Found\r\n\r\nnope"[..]).unwrap();
    assert_eq!((r.status, r.text().as_str()), (404, "nope"));
    assert!(read_response(&b""[..]).is_err());
    assert!(read_response(&b"garbage\r\n\r\n"[..]).is_err());
}

#[test]
fn percent_encoding_leaves_only_unreserved_bytes() {
    assert_eq!(percent_encode(b"a b&c=d/~"), "a%20b%26c%3Dd%2F~");
    assert_eq!(
        job_start_path("import", &[("date", "2026_11_23")]),
        "/job_start?job_name=import&date=2026_11_23"
    );
}

// ---- Keys (sealed meshes) ------------------------------------------------------------------

impl Mesh {
    /// The broker's key directory (sealed meshes).
    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }

    /// The file with the broker's public key, given to every node as `--broker-key`.
    pub fn broker_pub(&self) -> PathBuf {
        self.root.join("broker.pub")
    }

    /// Makes a node key at `path` and accepts it as `principal`, as Ansible pre-seeds keys.
    pub fn enroll(&self, principal: &str, path: &Path) -> PathBuf {
        let key = jobz::keys::NodeKey::generate().expect("generating a key");
        key.save_new(path).expect("saving a node key");
        let accepted = self.keys_dir().join("accepted");
        fs::create_dir_all(&accepted).expect("creating accepted/");
        fs::write(
            accepted.join(format!("{principal}.pub")),
            format!("{}\n", key.public()),
        )
        .expect("accepting a key");
        path.to_owned()
    }

    /// `--key PATH --broker-key BROKER_PUB`.
    pub fn key_args(&self, key: &Path) -> Vec<OsString> {
        vec![
            "--key".into(),
            key.into(),
            "--broker-key".into(),
            self.broker_pub().into(),
        ]
    }

    /// Runs `jobz-broker keys ARGS… --keys <dir>` and returns its standard output.
    pub fn broker_keys(&self, args: &[&str]) -> String {
        let out = Command::new(bin("jobz-broker"))
            .arg("keys")
            .args(args)
            .arg("--keys")
            .arg(self.keys_dir())
            .output()
            .expect("running jobz-broker keys");
        assert!(
            out.status.success(),
            "jobz-broker keys {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts one more process `name` (killed with the mesh), output in `<dir>/<name>.stderr`.
    pub fn start_process(&mut self, name: &str, program: PathBuf, args: Vec<OsString>) {
        self.add(name, program, args);
    }
}

// ---- More frontends ---------------------------------------------------------------------

impl Mesh {
    /// Starts one more `jobz-frontend` named `name` on this mesh's broker, with `args` (its
    /// `--listen` among them), its output in `<dir>/<name>.stderr`, killed with the mesh.
    /// Does not wait for it to listen.
    pub fn start_frontend(&mut self, name: &str, args: &[OsString]) {
        let mut all: Vec<OsString> = vec![
            "--broker".into(),
            format!("127.0.0.1:{}", self.base_port).into(),
        ];
        all.extend(args.iter().cloned());
        self.add(name, bin("jobz-frontend"), all);
    }
}

// ---- Workers with another user or environment (hygiene tests) ----------------------------

impl Mesh {
    /// Starts process `name` again with the same flags, with `env` added to its
    /// environment and, if `user` is given, as that `(uid, gid)` with no supplementary
    /// groups (the test must be root for that). A later [`Mesh::restart`] drops both.
    pub fn restart_with(&mut self, name: &str, user: Option<(u32, u32)>, env: &[(&str, &str)]) {
        use std::os::unix::process::CommandExt;
        let proc = self.proc(name);
        proc.kill();
        proc.spawn_with(|cmd| {
            cmd.envs(env.iter().copied());
            if let Some((uid, gid)) = user {
                // std clears the supplementary groups when a root parent sets a uid.
                cmd.uid(uid).gid(gid);
            }
        });
    }
}

/// Every path under `dir` (recursively, symlinks not followed), relative to it.
pub fn list_tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(at) = todo.pop() {
        let Ok(entries) = fs::read_dir(&at) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(path.clone());
            }
            if let Ok(relative) = path.strip_prefix(dir) {
                found.insert(relative.to_owned());
            }
        }
    }
    found
}

// ---- Broker counters and worker liveness ---------------------------------------------------

impl Mesh {
    /// A broker counter by the broker's own name (`retries`, `frames_dropped_replay`,
    /// `frames_dropped` for all reasons, `runs{state="…"}` for the gauge), read from the
    /// family `/metrics` shows it in. Every one is there from the start: a missing one
    /// fails the test (a renamed family, not a zero).
    pub fn broker_counter(&self, name: &str) -> u64 {
        let (status, text) = self.http_get("/metrics");
        assert_eq!(status, 200, "{text}");
        let value = |sample: &str| {
            let prefix = format!("{sample} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let found = if name == "frames_dropped" {
            let samples: Vec<u64> = text
                .lines()
                .filter(|l| l.starts_with("jobz_broker_frames_dropped_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
                .collect();
            (!samples.is_empty()).then(|| samples.iter().sum())
        } else if let Some(reason) = name.strip_prefix("frames_dropped_") {
            value(&format!(
                "jobz_broker_frames_dropped_total{{reason=\"{reason}\"}}"
            ))
        } else if name.starts_with("runs{") {
            value(&format!("jobz_broker_{name}"))
        } else {
            value(&format!("jobz_broker_{name}_total"))
        };
        found.unwrap_or_else(|| panic!("no broker counter {name} in /metrics:\n{text}"))
    }

    /// A sample of `/metrics`, by its name with labels (`jobz_worker_x{worker="w1"}`), if
    /// it is there.
    pub fn metric(&self, sample: &str) -> Option<u64> {
        let (status, text) = self.http_get("/metrics");
        assert_eq!(status, 200, "{text}");
        let prefix = format!("{sample} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Whether `/workers` shows the worker `name` live; `None` if it is not listed.
    pub fn worker_live(&self, name: &str) -> Option<bool> {
        let (_, workers) = self.get_json("/workers");
        list_of(&workers, "workers")
            .iter()
            .find(|w| str_of(w, "name") == name)
            .map(|w| w["live"].as_bool() == Some(true))
    }
}

/// A job file with one job, `echo`, whose step appends its `msg` to `<dir>/ledger`.
pub const ECHO_JOB: &str = r#"
jobs:
  - name: echo
    params:
      msg: { required: true }
    command: "printf '%s\n' {msg} >> @DIR@/ledger"
"#;

// ---- Flags changed between starts (restart tests) ------------------------------------------

impl Mesh {
    /// Gives process `name` `flag VALUE` from its next start on: the flag's value is
    /// replaced if it has one, else the flag is appended. The running process is untouched.
    pub fn set_flag(&mut self, name: &str, flag: &str, value: &str) {
        let args = &mut self.proc(name).args;
        match args.iter().position(|a| a == flag) {
            Some(at) if at + 1 < args.len() => args[at + 1] = value.into(),
            _ => args.extend([flag.into(), value.into()]),
        }
    }
}
