//! A jobz mesh of real processes on loopback for the bench: a broker (state in a temporary
//! directory), a frontend, N workers and optionally a semaphore, each with its own log file
//! (or a broker alone, [`Mesh::start_broker_alone`], for simulated workers). A sealed mesh
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

/// Running children (PID), process groups of children that lead one (the peers' drivers)
/// and temporary directories, for the signal handler.
struct Registry {
    pids: Vec<u32>,
    groups: Vec<u32>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    groups: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// On SIGINT, SIGTERM or SIGHUP: SIGKILL every running child by PID, SIGTERM (then, a
/// second later, SIGKILL) every process group the bench started, remove the temporary
/// directories, exit 130.
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
                // A driver stops its own servers and workers on SIGTERM.
                for group in &reg.groups {
                    signal_group(*group, "-TERM");
                }
                if !reg.groups.is_empty() {
                    std::thread::sleep(Duration::from_secs(1));
                }
                for group in &reg.groups {
                    signal_group(*group, "-KILL");
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
    /// The job file every worker loads; `@DIR@` stands for the mesh's directory.
    pub jobs_yaml: String,
    /// The semaphores file of a `jobz-semaphore` to start (plain mesh only), if any.
    pub semaphores_yaml: Option<String>,
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

    /// The exit status, if the process has ended.
    /// A process found ended is reaped and forgotten (its PID may be reused).
    fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait().context("waiting for a child")?;
        if status.is_some() {
            let pid = child.id();
            self.child = None;
            registry().pids.retain(|&p| p != pid);
        }
        Ok(status)
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
        let mut binaries = vec!["jobz-broker", "jobz-frontend", "jobz-worker"];
        if config.semaphores_yaml.is_some() {
            binaries.push("jobz-semaphore");
        }
        check_binaries(&config.bin_dir, &binaries)?;
        let mut mesh = Mesh::empty(config.keep)?;
        let root = mesh.root.clone();
        let base_port = mesh.base_port;
        let frontend_port = mesh.frontend_port;
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
            let yaml = config.jobs_yaml.replace("@DIR@", &root.to_string_lossy());
            fs::write(jobs_dir.join("bench.yaml"), yaml).context("writing the job file")?;
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
        if let (Some(yaml), false) = (&config.semaphores_yaml, config.sealed) {
            let home = root.join("semaphore");
            let jobs_dir = home.join("jobs.d");
            fs::create_dir_all(&jobs_dir)
                .with_context(|| format!("creating {}", jobs_dir.display()))?;
            fs::write(jobs_dir.join("semaphores.yaml"), yaml)
                .context("writing the semaphores file")?;
            let args: Vec<OsString> = vec![
                "--broker".into(),
                broker_addr.clone().into(),
                "--jobs-dir".into(),
                jobs_dir.into(),
                "--state".into(),
                home.join("state").into(),
            ];
            mesh.add(SEMAPHORE, config.bin_dir.join("jobz-semaphore"), args)?;
            mesh.wait_logged(SEMAPHORE, "semaphore ready", Duration::from_secs(30))?;
        }
        Ok(mesh)
    }

    /// A broker alone (plain, `--state` in a temporary directory), for simulated workers:
    /// ready once it has logged `broker started`.
    pub fn start_broker_alone(bin_dir: &Path, keep: bool) -> anyhow::Result<Mesh> {
        check_binaries(bin_dir, &["jobz-broker"])?;
        let mut mesh = Mesh::empty(keep)?;
        let args: Vec<OsString> = vec![
            "--bind".into(),
            format!("127.0.0.1:{}", mesh.base_port).into(),
            "--state".into(),
            mesh.root.join("broker").into(),
        ];
        mesh.add("broker", bin_dir.join("jobz-broker"), args)?;
        mesh.wait_logged("broker", "broker started", Duration::from_secs(30))?;
        Ok(mesh)
    }

    /// A frontend (plain) beside a broker started alone, on the mesh's frontend port; ready
    /// once `/healthz` answers.
    pub fn start_frontend(&mut self, bin_dir: &Path) -> anyhow::Result<()> {
        check_binaries(bin_dir, &["jobz-frontend"])?;
        let args: Vec<OsString> = vec![
            "--listen".into(),
            format!("127.0.0.1:{}", self.frontend_port).into(),
            "--broker".into(),
            format!("127.0.0.1:{}", self.base_port).into(),
            "--name".into(),
            "bench".into(),
        ];
        self.add("frontend", bin_dir.join("jobz-frontend"), args)?;
        self.wait_healthy(Duration::from_secs(30))?;
        Ok(())
    }

    /// A mesh with no process yet: its directory and free ports.
    fn empty(keep: bool) -> anyhow::Result<Mesh> {
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
            root,
            base_port,
            frontend_port,
            procs: Vec::new(),
            worker_names: Vec::new(),
        };
        if keep {
            if let Some(dir) = mesh.dir.take() {
                let kept = dir.keep();
                registry().dirs.retain(|d| d != &kept);
            }
        }
        Ok(mesh)
    }

    /// Waits until the log of `name` holds `needle`.
    pub fn wait_logged(
        &mut self,
        name: &str,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.log_of(name).contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.proc(name)?.exited()? {
                bail!("{name} exited ({status}):\n{}", self.diagnostics(10));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "{name} did not log {needle:?} within {timeout:?}:\n{}",
            self.diagnostics(10)
        )
    }

    /// The mesh's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Names of the workers (`w1` …).
    pub fn worker_names(&self) -> &[String] {
        &self.worker_names
    }

    /// Every process's name and PID, broker and frontend first (the semaphore last).
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

/// Sends `signal` (`-TERM`) to every process of the group `group` (its leader's PID).
fn signal_group(group: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{group}")])
        .stderr(Stdio::null())
        .status();
}

/// A child that leads its own process group (`Command::process_group(0)`): a peer's
/// driver with the servers and workers it starts. Stopping it, dropping it, or a signal to
/// the bench sends the whole group SIGTERM, then SIGKILL.
pub struct GroupChild {
    child: Option<Child>,
}

/// Spawns `cmd`, which must have been given `process_group(0)`, and registers its group.
pub fn spawn_group(cmd: &mut Command) -> anyhow::Result<GroupChild> {
    let mut reg = registry();
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    reg.groups.push(child.id());
    Ok(GroupChild { child: Some(child) })
}

impl GroupChild {
    /// The exit status of the group's leader, if it has ended (then it is forgotten).
    pub fn try_wait(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait().context("waiting for a child")?;
        if status.is_some() {
            let group = child.id();
            self.child = None;
            registry().groups.retain(|&g| g != group);
        }
        Ok(status)
    }

    /// SIGTERM to the group, up to 10 s for the leader to end, then SIGKILL to the group.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = child.id();
        signal_group(group, "-TERM");
        // The leader is not reaped before the group's SIGKILL: while it is a zombie its PID,
        // the group's id, cannot be someone else's.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) && !crate::procfs::is_zombie(group) {
            std::thread::sleep(Duration::from_millis(50));
        }
        signal_group(group, "-KILL");
        let _ = child.wait();
        registry().groups.retain(|&g| g != group);
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The name of the semaphore process in a mesh.
pub const SEMAPHORE: &str = "semaphore";

fn check_binaries(bin_dir: &Path, names: &[&str]) -> anyhow::Result<()> {
    for name in names {
        let path = bin_dir.join(name);
        if !path.is_file() {
            bail!(
                "{} does not exist: build the binaries first (bench/run.sh does)",
                path.display()
            );
        }
    }
    Ok(())
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
