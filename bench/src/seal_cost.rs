//! Scenario 7: what sealing costs per frame, in process (no mesh, no sockets), with the
//! mesh's own code: `jobz::seal`.
//!
//! - **pair** (every frame a node sends the broker): `NodeSeal::seal` then
//!   `BrokerOpener::open`: X25519-derived key (cached per peer), XChaCha20-Poly1305, the
//!   replay memory.
//! - **group** (every job or event the broker publishes): `BrokerSealer::seal_group` then
//!   `NodeSeal::open`: XChaCha20-Poly1305 under the mesh key plus an Ed25519 signature and
//!   its check. The node first gets the mesh key in a welcome, as on the wire.
//!
//! Frames are sealed in batches and then opened, each half timed on its own, until a time
//! budget is spent; the figure is the mean per frame.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use jobz::keys::{NodeIdentity, NodeKey};
use jobz::seal::{BrokerOpener, BrokerSealer, MeshRing, NodeSeal};

use crate::report::{self, Row, Unit};

/// A typical frame: a trigger or a step result with a few parameters.
pub const SMALL_FRAME: usize = 300;
/// A large frame: a step's captured output near its limit.
pub const LARGE_FRAME: usize = 64 * 1024;
/// Frames sealed before they are opened (the memory held is this times the frame size).
const BATCH: usize = 64;
/// The topic group frames go out on (it is authenticated along with the frame).
const TOPIC: &[u8] = b"j bench_queue\0";

/// Which way a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Node → broker.
    Pair,
    /// Broker → every node.
    Group,
}

/// The mean cost of sealing and of opening one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    /// Frames sealed and opened.
    pub frames: usize,
    /// Mean time to seal one.
    pub seal: Duration,
    /// Mean time to open one.
    pub open: Duration,
}

impl Cost {
    /// From totals over `frames` frames.
    pub fn from_totals(frames: usize, seal: Duration, open: Duration) -> Cost {
        let n = u32::try_from(frames.max(1)).unwrap_or(u32::MAX);
        Cost {
            frames,
            seal: seal / n,
            open: open / n,
        }
    }

    /// Frames sealed and opened per second, one after the other on one core.
    pub fn per_sec(&self) -> f64 {
        let each = (self.seal + self.open).as_secs_f64();
        if each > 0.0 {
            1.0 / each
        } else {
            0.0
        }
    }

    /// `12.3 µs (seal 6.1 + open 6.2 µs), 81,300 frames/s`.
    pub fn describe(&self) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        format!(
            "{} µs/frame (seal {} + open {}), {}",
            micros(us(self.seal + self.open)),
            micros(us(self.seal)),
            micros(us(self.open)),
            report::format(self.per_sec(), Unit::PerSec)
        )
    }
}

/// Microseconds with a precision that suits their size.
fn micros(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.2}")
    } else if us < 100.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

/// A broker and one enrolled node holding the current mesh key.
struct Pair {
    node: NodeSeal,
    opener: BrokerOpener,
    sealer: BrokerSealer,
    ring: MeshRing,
}

impl Pair {
    fn new(now_ms: i64) -> anyhow::Result<Pair> {
        let broker = NodeKey::generate()?;
        let mut pair = Pair {
            node: NodeSeal::new(NodeIdentity {
                key: NodeKey::generate()?,
                brokers: vec![broker.public()],
            }),
            opener: BrokerOpener::new(&broker),
            sealer: BrokerSealer::new(&broker),
            ring: MeshRing::new(now_ms),
        };
        // The welcome to the node's hello carries the mesh keys.
        let keys = pair.ring.distributable(now_ms);
        let welcome = pair
            .sealer
            .seal_to(&pair.node.public(), b"n bench\0", b"welcome", &keys, now_ms)
            .context("sealing a welcome")?;
        pair.node
            .open(b"n bench\0", &welcome, now_ms)
            .context("opening the welcome")?;
        anyhow::ensure!(pair.node.has_mesh_keys(), "the welcome gave no mesh key");
        Ok(pair)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Seals and opens `size`-byte frames in `mode` for about `budget`; every opened frame is
/// checked against the original.
pub fn measure(mode: Mode, size: usize, budget: Duration) -> anyhow::Result<Cost> {
    let now = now_ms();
    let mut pair = Pair::new(now)?;
    let inner: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let (mut frames, mut seal_time, mut open_time) = (0, Duration::ZERO, Duration::ZERO);
    let started = Instant::now();
    while started.elapsed() < budget || frames == 0 {
        let t = Instant::now();
        let sealed: Vec<Vec<u8>> = (0..BATCH)
            .map(|_| match mode {
                Mode::Pair => pair.node.seal(&inner, now),
                Mode::Group => {
                    let key = pair.ring.current(now).clone();
                    pair.sealer.seal_group(&key, TOPIC, &inner, now)
                }
            })
            .collect::<Result<_, _>>()
            .context("sealing")?;
        seal_time += t.elapsed();
        let t = Instant::now();
        for frame in &sealed {
            let opened = match mode {
                Mode::Pair => pair.opener.open(frame, now, |_| true).map(|o| o.inner),
                Mode::Group => pair.node.open(TOPIC, frame, now),
            }
            .context("opening")?;
            anyhow::ensure!(opened.len() == size, "opened a frame of the wrong size");
        }
        open_time += t.elapsed();
        frames += BATCH;
    }
    Ok(Cost::from_totals(frames, seal_time, open_time))
}

/// The rows of scenario 7: pair and group mode, a typical and a large frame, `budget` each.
pub fn rows(budget: Duration) -> Vec<Row> {
    let s = "7 seal cost";
    let mut rows = Vec::new();
    for (mode, name) in [
        (Mode::Pair, "pair (node -> broker)"),
        (Mode::Group, "group (broker -> nodes)"),
    ] {
        for size in [SMALL_FRAME, LARGE_FRAME] {
            let size_text = if size >= 1024 {
                format!("{} KiB", size / 1024)
            } else {
                format!("{size} B")
            };
            let metric = format!("{name}, {size_text} frame: seal+open");
            rows.push(match measure(mode, size, budget) {
                Ok(cost) => Row::info(s, &metric, cost.describe()),
                Err(e) => Row::failed(s, &e.context(metric)),
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_means_per_frame() {
        let c = Cost::from_totals(1_000, Duration::from_millis(4), Duration::from_millis(6));
        assert_eq!(
            (c.seal, c.open),
            (Duration::from_micros(4), Duration::from_micros(6))
        );
        assert_eq!(c.per_sec().round(), 100_000.0);
        assert_eq!(
            c.describe(),
            "10.0 µs/frame (seal 4.00 + open 6.00), 100000/s"
        );
        assert_eq!(
            Cost::from_totals(0, Duration::ZERO, Duration::ZERO).per_sec(),
            0.0
        );
    }

    #[test]
    fn every_mode_round_trips() {
        for mode in [Mode::Pair, Mode::Group] {
            let cost = measure(mode, SMALL_FRAME, Duration::ZERO).unwrap();
            assert_eq!(cost.frames, BATCH);
        }
    }
}
