//! A jobz mesh of real processes on loopback for the bench: a broker (state in a temporary
//! directory), a frontend and N workers, each with its own log file. A sealed mesh
//! ([`MeshConfig::sealed`]) gives the broker `--keys` and every node a key the broker has
//! already accepted, the way Ansible pre-seeds them.
//!
//! Every child is killed by PID (SIGKILL) when the [`Mesh`] is dropped, and also when the
//! bench itself gets SIGINT, SIGTERM or SIGHUP ([`install_cleanup`]): the PIDs of running
//! children are kept in a registry, and a child is removed from it only once reaped, so a
//! PID in it can never belong to someone else.

use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::fs;
use std::hash::BuildHasher;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::http;

/// How long a single HTTP request to the frontend may take before it counts as failed.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Running children (PID) and temporary directories, for the signal handler.
struct Registry {
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// On SIGINT, SIGTERM or SIGHUP: SIGKILL every running child by PID, remove the
/// temporary directories, exit 130.
pub fn install_cleanup() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("cleanup".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let reg = registry();
                eprintln!(
                    "bench: signal {signal}: killing {} children {:?}",
                    reg.pids.len(),
                    reg.pids
                );
                for pid in &reg.pids {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
                for dir in &reg.dirs {
                    let _ = fs::remove_dir_all(dir);
                }
                std::process::exit(130);
            }
        })
        .context("starting the cleanup thread")?;
    Ok(())
}

/// What a mesh is made of.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Directory holding `jobz-broker`, `jobz-frontend` and `jobz-worker`.
    pub bin_dir: PathBuf,
    /// Number of workers.
    pub workers: usize,
    /// `--slots` of each worker.
    pub slots: u32,
    /// `--heartbeat` of each worker.
    pub heartbeat: String,
    /// The job file every worker loads.
    pub jobs_yaml: String,
    /// Keep the temporary directory.
    pub keep: bool,
    /// Seal every frame: broker `--keys`, frontend and workers with pre-accepted keys.
    pub sealed: bool,
}

struct Proc {
    name: String,
    bin: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning a file handle")?)
            .stderr(log)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        // The operator's own settings must not leak into the bench mesh.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("JOBZ_") {
                cmd.env_remove(key);
            }
        }
        let mut reg = registry();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        reg.pids.push(child.id());
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL by PID, then reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            registry().pids.retain(|&p| p != child.id());
        }
    }

    /// SIGTERM by PID and wait up to `timeout` for the exit (then SIGKILL). Returns how
    /// long the process took to stop, or `None` if it had to be killed.
    fn terminate(&mut self, timeout: Duration) -> anyhow::Result<Option<Duration>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(Some(Duration::ZERO));
        };
        let pid = child.id();
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {pid} failed: {status}");
        }
        while started.elapsed() < timeout {
            if child.try_wait().context("waiting for a child")?.is_some() {
                let took = started.elapsed();
                self.child = None;
                registry().pids.retain(|&p| p != pid);
                return Ok(Some(took));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill();
        Ok(None)
    }
}

/// A running mesh. Dropping it kills every process.
pub struct Mesh {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    /// The broker's base port (PUB); PULL is `base_port + 1`.
    pub base_port: u16,
    /// The frontend's HTTP port.
    pub frontend_port: u16,
    procs: Vec<Proc>,
    worker_names: Vec<String>,
}

impl Mesh {
    /// Starts the broker and the frontend, waits for `/healthz`, starts the workers and
    /// waits until all of them are live.
    pub fn start(config: &MeshConfig) -> anyhow::Result<Mesh> {
        for name in ["jobz-broker", "jobz-frontend", "jobz-worker"] {
            let path = config.bin_dir.join(name);
            if !path.is_file() {
                bail!(
                    "{} does not exist: build the binaries first (bench/run.sh does)",
                    path.display()
                );
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("jobz-bench-")
            .tempdir()
            .context("creating a temporary directory")?;
        let root = dir.path().to_owned();
        registry().dirs.push(root.clone());
        let base_port = free_ports(4, &[])?;
        let frontend_port = free_ports(1, &[base_port])?;
        let mut mesh = Mesh {
            dir: Some(dir),
            root: root.clone(),
            base_port,
            frontend_port,
            procs: Vec::new(),
            worker_names: Vec::new(),
        };
        if config.keep {
            if let Some(dir) = mesh.dir.take() {
                let kept = dir.keep();
                registry().dirs.retain(|d| d != &kept);
            }
        }
        let broker_addr = format!("127.0.0.1:{base_port}");
        let frontend_url = format!("http://127.0.0.1:{frontend_port}");
        let keys = if config.sealed {
            Some(Keys::create(&root)?)
        } else {
            None
        };
        let mut broker_args: Vec<OsString> = vec![
            "--bind".into(),
            broker_addr.clone().into(),
            "--state".into(),
            root.join("broker").into(),
        ];
        let mut frontend_args: Vec<OsString> = vec![
            "--listen".into(),
            format!("127.0.0.1:{frontend_port}").into(),
            "--broker".into(),
            broker_addr.clone().into(),
            "--name".into(),
            "bench".into(),
            // Every bench client connects from 127.0.0.1: lift the per-address cap (32) to
            // the whole connection cap so `--clients` up to 64 are all served.
            "--max-connections-per-address".into(),
            "256".into(),
        ];
        if let Some(keys) = &keys {
            broker_args.extend(["--keys".into(), keys.dir.clone().into()]);
            let key = keys.enroll("frontend:bench", &root.join("frontend.key"))?;
            frontend_args.extend(keys.node_args(key));
        }
        mesh.add("broker", config.bin_dir.join("jobz-broker"), broker_args)?;
        mesh.add(
            "frontend",
            config.bin_dir.join("jobz-frontend"),
            frontend_args,
        )?;
        mesh.wait_healthy(Duration::from_secs(30))?;
        for i in 1..=config.workers {
            let name = format!("w{i}");
            let home = root.join(&name);
            let jobs_dir = home.join("jobs.d");
            fs::create_dir_all(&jobs_dir)
                .with_context(|| format!("creating {}", jobs_dir.display()))?;
            fs::write(jobs_dir.join("bench.yaml"), &config.jobs_yaml)
                .context("writing the job file")?;
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
                config.heartbeat.clone().into(),
                "--slots".into(),
                config.slots.to_string().into(),
                "--frontend".into(),
                frontend_url.clone().into(),
            ];
            if let Some(keys) = &keys {
                let key = keys.enroll(&format!("worker:{name}"), &home.join("node.key"))?;
                args.extend(keys.node_args(key));
            }
            mesh.add(&name, config.bin_dir.join("jobz-worker"), args)?;
            mesh.worker_names.push(name);
        }
        mesh.wait_workers_live(config.workers, Duration::from_secs(30))?;
        Ok(mesh)
    }

    /// The mesh's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Names of the workers (`w1` …).
    pub fn worker_names(&self) -> &[String] {
        &self.worker_names
    }

    /// Every process's name and PID, broker and frontend first.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.pid()?)))
            .collect()
    }

    fn add(&mut self, name: &str, bin: PathBuf, args: Vec<OsString>) -> anyhow::Result<()> {
        let mut proc = Proc {
            name: name.to_owned(),
            bin,
            args,
            log: self.root.join(format!("{name}.log")),
            child: None,
        };
        proc.spawn()?;
        self.procs.push(proc);
        Ok(())
    }

    fn proc(&mut self, name: &str) -> anyhow::Result<&mut Proc> {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no process named {name:?}"))
    }

    /// Stops a process with SIGTERM (SIGKILL after `timeout`); how long it took to exit,
    /// `None` if it had to be killed.
    pub fn terminate(&mut self, name: &str, timeout: Duration) -> anyhow::Result<Option<Duration>> {
        self.proc(name)?.terminate(timeout)
    }

    /// Starts a stopped process again with the same flags; its log is appended to.
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let proc = self.proc(name)?;
        proc.kill();
        proc.spawn()
    }

    /// Everything a process wrote so far.
    pub fn log_of(&self, name: &str) -> String {
        fs::read(self.root.join(format!("{name}.log")))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `GET path` on the frontend.
    pub fn get(&self, path: &str) -> anyhow::Result<http::Response> {
        http::get(self.frontend_port, path, HTTP_TIMEOUT).with_context(|| format!("GET {path}"))
    }

    /// `GET path` on the frontend, the body as JSON.
    pub fn get_json(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        http::get_json(self.frontend_port, path, HTTP_TIMEOUT)
    }

    /// Polls `/healthz` every 10 ms until it answers 200.
    pub fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < timeout {
            match http::get(self.frontend_port, "/healthz", timeout) {
                Ok(r) if r.status == 200 => return Ok(started.elapsed()),
                Ok(r) => last = format!("{} {}", r.status, r.text()),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("/healthz not 200 within {timeout:?}; last: {last}")
    }

    /// Polls `/workers` until `n` workers are live.
    pub fn wait_workers_live(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < timeout {
            match self.get_json("/workers") {
                Ok((200, body)) => {
                    let live = body
                        .get("workers")
                        .and_then(Value::as_array)
                        .map_or(0, |ws| {
                            ws.iter()
                                .filter(|w| w.get("live") == Some(&Value::Bool(true)))
                                .count()
                        });
                    if live >= n {
                        return Ok(());
                    }
                    last = format!("{live} live");
                }
                Ok((status, body)) => last = format!("{status} {body}"),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{n} workers not live within {timeout:?}; last: {last}")
    }

    /// The last lines of every process's log, for an error report.
    pub fn diagnostics(&self, lines: usize) -> String {
        let mut out = format!("mesh directory: {}\n", self.root.display());
        for proc in &self.procs {
            let text = self.log_of(&proc.name);
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("---- {} ----\n", proc.name));
            for line in &all[all.len().saturating_sub(lines)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// The keys of a sealed mesh: the broker's key directory (`broker.key`, `accepted/`) and the
/// file with its public key that every node trusts.
struct Keys {
    /// The broker's `--keys` directory.
    dir: PathBuf,
    /// The broker's public key, given to every node as `--broker-key`.
    broker_pub: PathBuf,
}

impl Keys {
    /// Makes the broker's key in `root/keys/broker.key` (its public half goes beside it).
    fn create(root: &Path) -> anyhow::Result<Keys> {
        let dir = root.join("keys");
        fs::create_dir_all(dir.join("accepted"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let broker_key = dir.join("broker.key");
        jobz::keys::NodeKey::generate()?.save_new(&broker_key)?;
        Ok(Keys {
            broker_pub: jobz::keys::public_path_for(&broker_key),
            dir,
        })
    }

    /// Makes a node key at `path` and accepts it as `principal` (`worker:w1`), as Ansible
    /// pre-seeds keys: the node is enrolled before it first says hello.
    fn enroll(&self, principal: &str, path: &Path) -> anyhow::Result<PathBuf> {
        let key = jobz::keys::NodeKey::generate()?;
        key.save_new(path)?;
        let accepted = self.dir.join("accepted").join(format!("{principal}.pub"));
        fs::write(&accepted, format!("{}\n", key.public()))
            .with_context(|| format!("writing {}", accepted.display()))?;
        Ok(path.to_owned())
    }

    /// `--key KEY --broker-key BROKER_PUB`.
    fn node_args(&self, key: PathBuf) -> [OsString; 4] {
        [
            "--key".into(),
            key.into(),
            "--broker-key".into(),
            self.broker_pub.clone().into(),
        ]
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for proc in self.procs.iter_mut().rev() {
            proc.kill();
        }
        registry().dirs.retain(|d| d != &self.root);
    }
}

/// A base port `P` such that `P .. P + count` are free on 127.0.0.1 and none is in
/// `avoid .. avoid + 4`. Chosen below Linux's ephemeral range (32768+), so no outgoing
/// connection's local port takes one between this check and the bind.
fn free_ports(count: u16, avoid: &[u16]) -> anyhow::Result<u16> {
    let random = RandomState::new();
    for attempt in 0..10_000u32 {
        let base = 20_000 + (random.hash_one(attempt) % 12_000) as u16;
        let ports = base..base + count;
        if ports
            .clone()
            .any(|p| avoid.iter().any(|&a| (a..a + 4).contains(&p)))
        {
            continue;
        }
        if ports
            .clone()
            .all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        {
            return Ok(base);
        }
    }
    bail!("no {count} consecutive free ports found on 127.0.0.1")
}
