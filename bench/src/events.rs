//! Exact times of what happens in the mesh, on the bench's own clock:
//!
//! - [`EventWatch`]: the broker's completion events (`Event::TaskFinished` on the topic
//!   `e <job>`), read off its PUB socket by a SUB socket of the bench. The broker publishes
//!   one when a task ends for good, after the commit that records it (and, for the last
//!   task of a run, the run's end): the moment a run has durably succeeded.
//! - [`FifoLines`]: lines written into a named pipe by a job's command (`echo $JOBZ_RUN_ID
//!   > started.fifo`, shell built-ins only, no extra process): the moment the command runs.
//!
//! Both hand `(Instant, item)` pairs to an [`Arrivals`], which the scenarios wait on. The
//! event watch reads plain frames only: on a sealed mesh it sees nothing (the scenarios that
//! use it run on the plain mesh).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use jobz::message::{Completion, Event, Message};
use jobz::topic::Topic;

/// Items received so far and the channel more come on; the waiting side of a watch.
pub struct Arrivals<T> {
    rx: Receiver<(Instant, T)>,
    seen: Vec<(Instant, T)>,
}

impl<T> Arrivals<T> {
    /// Arrivals fed by `rx`.
    pub fn new(rx: Receiver<(Instant, T)>) -> Arrivals<T> {
        Arrivals {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits until an item for which `wanted` is true has arrived (or had arrived), removes
    /// it and returns it with the time it arrived; `None` at `deadline`.
    pub fn wait_for(
        &mut self,
        deadline: Instant,
        wanted: impl Fn(&T) -> bool,
    ) -> Option<(Instant, T)> {
        if let Some(i) = self.seen.iter().position(|(_, item)| wanted(item)) {
            return Some(self.seen.remove(i));
        }
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.rx.recv_timeout(left) {
                Ok((at, item)) if wanted(&item) => return Some((at, item)),
                Ok(other) => self.seen.push(other),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// The next item not yet taken, waiting until `deadline` for one.
    pub fn next(&mut self, deadline: Instant) -> Option<(Instant, T)> {
        if !self.seen.is_empty() {
            return Some(self.seen.remove(0));
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        self.rx.recv_timeout(left).ok()
    }

    /// Forgets everything received so far.
    pub fn clear(&mut self) {
        self.seen.clear();
        while self.rx.try_recv().is_ok() {}
    }
}

/// A SUB socket on the broker's PUB socket, subscribed to the completion events of some
/// jobs; its thread stamps each event as it arrives. Stops when dropped.
pub struct EventWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventWatch {
    /// Subscribes to the events of `jobs` on the broker at 127.0.0.1:`base_port`. Like any
    /// subscriber it misses what is published before the subscription reaches the broker:
    /// callers wait for a first event of their own before they measure.
    pub fn start(
        base_port: u16,
        jobs: &[&str],
    ) -> anyhow::Result<(EventWatch, Arrivals<Completion>)> {
        let ctx = zmq::Context::new();
        let sub = ctx.socket(zmq::SUB).context("creating a SUB socket")?;
        sub.set_rcvhwm(jobz::socket::HIGH_WATER_MARK)
            .context("setting the SUB high-water mark")?;
        sub.set_linger(0).context("setting linger")?;
        for job in jobs {
            sub.set_subscribe(&Topic::Events((*job).to_owned()).to_bytes())
                .context("subscribing to completion events")?;
        }
        sub.connect(&format!("tcp://127.0.0.1:{base_port}"))
            .context("connecting to the broker's PUB socket")?;
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-events".into())
            .spawn(move || {
                // The context must outlive the socket: both live in this thread.
                let _ctx = ctx;
                read_events(&sub, &tx, &stopping);
            })
            .context("starting the event thread")?;
        Ok((
            EventWatch {
                stop,
                thread: Some(thread),
            },
            Arrivals::new(rx),
        ))
    }
}

fn read_events(sub: &zmq::Socket, tx: &Sender<(Instant, Completion)>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match sub.poll(zmq::POLLIN, 50) {
            Ok(0) | Err(zmq::Error::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                eprintln!("bench: polling the event socket failed: {e}");
                return;
            }
        }
        while let Ok(frames) = sub.recv_multipart(zmq::DONTWAIT) {
            let at = Instant::now();
            if let Some(completion) = completion_of(&frames) {
                if tx.send((at, completion)).is_err() {
                    return;
                }
            }
        }
    }
}

/// The completion in a `[topic, frame]` publication, if it is one (anything else, a
/// sealed frame included, is skipped).
pub fn completion_of(frames: &[Vec<u8>]) -> Option<Completion> {
    let [topic, frame] = frames else {
        return None;
    };
    matches!(Topic::parse(topic)?, Topic::Events(_)).then_some(())?;
    match jobz::envelope::decode(frame).ok()?.body {
        Message::Event(Event::TaskFinished(completion)) => Some(completion),
        _ => None,
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A named pipe the bench reads line by line; its thread stamps each line as it arrives.
/// The bench holds it open for reading *and* writing, so a writer never blocks on opening
/// it and the reader never sees its end. Stops when dropped.
pub struct FifoLines {
    path: PathBuf,
    writer: File,
    thread: Option<JoinHandle<()>>,
}

/// The line [`FifoLines`] writes into its own pipe to stop its thread.
const STOP_LINE: &str = "\u{1}bench-stop";

impl FifoLines {
    /// Makes the named pipe `path` and starts reading it.
    pub fn start(path: &Path) -> anyhow::Result<(FifoLines, Arrivals<String>)> {
        let file = open_fifo(path)?;
        let writer = file.try_clone().context("cloning the pipe's handle")?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("bench-fifo".into())
            .spawn(move || {
                for line in BufReader::new(file).lines() {
                    let at = Instant::now();
                    let Ok(line) = line else { return };
                    if line == STOP_LINE || tx.send((at, line.trim().to_owned())).is_err() {
                        return;
                    }
                }
            })
            .context("starting the pipe reader")?;
        Ok((
            FifoLines {
                path: path.to_owned(),
                writer,
                thread: Some(thread),
            },
            Arrivals::new(rx),
        ))
    }

    /// The pipe's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FifoLines {
    fn drop(&mut self) {
        if writeln!(self.writer, "{STOP_LINE}").is_ok() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Makes the named pipe `path` (`mkfifo`) and opens it for reading and writing: an open
/// that never blocks, and that lets every process blocked opening it for reading go on.
pub fn open_fifo(path: &Path) -> anyhow::Result<File> {
    if !path.exists() {
        let status = Command::new("mkfifo")
            .arg(path)
            .status()
            .context("running mkfifo")?;
        if !status.success() {
            bail!("mkfifo {} failed: {status}", path.display());
        }
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening the named pipe {}", path.display()))
}

/// How long the scenarios wait for one event or line before they call it lost.
pub const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use jobz::envelope::Envelope;
    use jobz::message::{TaskRef, TaskState};

    #[test]
    fn arrivals_hand_out_the_wanted_item_and_keep_the_others() {
        let (tx, rx) = mpsc::channel();
        let mut arrivals = Arrivals::new(rx);
        let t0 = Instant::now();
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            tx.send((t0 + Duration::from_millis(i as u64), name.to_owned()))
                .unwrap();
        }
        let soon = Instant::now() + Duration::from_millis(50);
        let at = |found: Option<(Instant, String)>| found.map(|(at, _)| at);
        assert_eq!(
            at(arrivals.wait_for(soon, |s| s == "b")),
            Some(t0 + Duration::from_millis(1))
        );
        // `a` was read past on the way and is still there; `b` is gone.
        assert_eq!(at(arrivals.wait_for(soon, |s| s == "a")), Some(t0));
        assert_eq!(arrivals.wait_for(soon, |s| s == "b"), None);
        assert_eq!(arrivals.next(soon).map(|(_, s)| s).as_deref(), Some("c"));
        assert!(arrivals.next(soon).is_none());
    }

    #[test]
    fn a_completion_is_read_from_its_publication_and_nothing_else_is() {
        let completion = Completion {
            run_id: "r1".into(),
            step_id: "s1".into(),
            task: TaskRef {
                task_id: "t1".into(),
                attempt: 1,
            },
            job: "bench_mark".into(),
            worker: "w1".into(),
            params: Default::default(),
            state: TaskState::Succeeded,
            finished_at_ms: 1,
            fanout: 1,
        };
        let frame = |body| jobz::envelope::encode(&Envelope::new("broker", body)).unwrap();
        let topic = Topic::Events("bench_mark".into()).to_bytes();
        let event = frame(Message::Event(Event::TaskFinished(completion.clone())));
        assert_eq!(
            completion_of(&[topic.clone(), event.clone()]),
            Some(completion)
        );
        let hello = frame(Message::Hello {
            role: jobz::message::Role::Client,
        });
        assert_eq!(completion_of(&[topic.clone(), hello]), None);
        assert_eq!(completion_of(&[topic.clone(), b"JS sealed".to_vec()]), None);
        assert_eq!(
            completion_of(&[b"j bench_mark\0".to_vec(), event.clone()]),
            None
        );
        assert_eq!(completion_of(&[event]), None);
    }

    #[test]
    fn lines_written_into_the_pipe_arrive_stamped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("started.fifo");
        let (fifo, mut lines) = FifoLines::start(&path).unwrap();
        // A writer as the job's shell is: open, write one line, close.
        let before = Instant::now();
        std::fs::write(fifo.path(), "run-1\n").unwrap();
        let (at, _) = lines
            .wait_for(Instant::now() + Duration::from_secs(5), |l| l == "run-1")
            .unwrap();
        assert!(at >= before);
        drop(fifo); // stops its thread
    }
}
