//! Scenarios 11 and 12: a broker alone (plain, journal on, `--state` on disk) driven by
//! simulated workers and a simulated frontend over raw ZeroMQ (`sim`).
//!
//! - **11 broker alone**: 16 workers of 16 slots; the frontend keeps at most one run per
//!   slot unfinished, so nothing waits. Cycles/s (trigger, dispatch, start, finish, each
//!   acknowledged) over `--broker-cycles` cycles, and the broker's CPU per cycle.
//! - **12 scale**: `--sim-workers` workers of 2 slots. First the same closed loop with
//!   nothing waiting; then every slot is held busy and `--backlog` runs are triggered, which
//!   all wait (the broker's memory is read then); then the slots are released and the
//!   frontend keeps the backlog where it is (a new trigger for every run that ends), so each
//!   cycle does the same work as before but with the backlog waiting: the two cycle rates
//!   are compared. Last, the broker is stopped with the backlog pending and started again:
//!   the time until it logs `broker started` and until it welcomes a client.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::mesh::Mesh;
use crate::procfs::{self, CpuTicks};
use crate::report::{Row, Target, Unit};
use crate::sim::{self, Counters, Sim, Window};
use crate::stats;
use crate::Config;

/// Label of scenario 11.
pub const ALONE: &str = "11 broker alone";
/// Label of scenario 12.
pub const SCALE: &str = "12 scale";

/// Simulated workers of scenario 11, and the slots of each.
pub const ALONE_WORKERS: usize = 16;
/// Slots of each simulated worker in scenario 11.
pub const ALONE_SLOTS: u32 = 16;
/// Slots of each simulated worker in scenario 12.
pub const SCALE_SLOTS: u32 = 2;

/// How long the simulation may take to register.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The closed loop runs this long before a window is timed.
const SETTLE: Duration = Duration::from_secs(1);

/// What scenarios 11 and 12 measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BrokerFigures {
    /// 11: cycles per second.
    pub alone_cycles_per_sec: Option<f64>,
    /// 12: cycles per second with nothing waiting.
    pub scale_idle_rate: Option<f64>,
    /// 12: cycles per second with the backlog waiting.
    pub scale_backlog_rate: Option<f64>,
    /// 12: runs waiting during the second rate.
    pub scale_backlog: Option<u64>,
    /// 12: broker RSS (KiB) with the backlog waiting.
    pub scale_rss_kib: Option<f64>,
    /// 12: broker start → first welcome, with the backlog pending.
    pub scale_restart: Option<Duration>,
    /// 12: simulated workers.
    pub scale_workers: Option<usize>,
}

/// CPU a process used in a window, per cycle, as a row's text.
fn cpu_per_cycle(ticks: CpuTicks, hz: u64, cycles: u64) -> String {
    let ms = procfs::ticks_to_duration(ticks.own, hz).as_secs_f64() * 1e3 / cycles.max(1) as f64;
    let system = 100.0 * ticks.system as f64 / ticks.own.max(1) as f64;
    format!("{ms:.3} ms ({system:.0}% system)")
}

/// A timed window's rows: its cycle rate and the broker's CPU per cycle, `what` saying
/// how it ran (`nothing waiting`).
fn window_rows(scenario: &str, what: &str, window: Window, broker: CpuTicks, hz: u64) -> [Row; 2] {
    [
        Row::figure(
            scenario,
            &format!("cycles/s, {what} ({} timed)", window.cycles),
            window.rate(),
            Unit::PerSec,
            Target::None,
        ),
        Row::info(
            scenario,
            &format!("broker CPU per cycle, {what}"),
            cpu_per_cycle(broker, hz, window.cycles),
        ),
    ]
}

/// A closed loop: at most `outstanding` runs unfinished; after [`SETTLE`], `cycles` timed,
/// with the broker's and the bench's CPU over the window.
fn closed_loop(
    sim: &mut Sim,
    broker_pid: u32,
    outstanding: u64,
    cycles: u64,
    deadline: Instant,
) -> anyhow::Result<(Window, CpuTicks, CpuTicks)> {
    sim.set_outstanding(outstanding);
    sim.set_limit(u64::MAX);
    std::thread::sleep(SETTLE);
    let broker_before = procfs::cpu_ticks(broker_pid)?;
    let bench_before = procfs::cpu_ticks(std::process::id())?;
    let window = sim.measure(cycles, deadline)?;
    let broker = procfs::cpu_ticks(broker_pid)?.since(broker_before);
    let bench = procfs::cpu_ticks(std::process::id())?.since(bench_before);
    Ok((window, broker, bench))
}

fn broker_pid(mesh: &Mesh) -> anyhow::Result<u32> {
    mesh.pids()
        .into_iter()
        .find(|(n, _)| n == "broker")
        .map(|(_, p)| p)
        .context("the broker is not running")
}

/// Scenario 11: rows, and the cycle rate.
pub fn alone(config: &Config, hz: u64, figures: &mut BrokerFigures) -> anyhow::Result<Vec<Row>> {
    let mut mesh = Mesh::start_broker_alone(&config.bin_dir, config.keep)?;
    if config.keep {
        println!("broker-alone directory (kept): {}", mesh.root().display());
    }
    let s = ALONE;
    let result = (|| -> anyhow::Result<Vec<Row>> {
        let mut sim = Sim::start(mesh.base_port, ALONE_WORKERS, ALONE_SLOTS, READY_TIMEOUT)?;
        let pid = broker_pid(&mesh)?;
        let deadline = Instant::now() + config.scenario_timeout;
        let cycles = config.broker_cycles as u64;
        let slots = sim.total_slots();
        let (window, broker, bench) = closed_loop(&mut sim, pid, slots, cycles, deadline)?;
        let counters = sim.counters.clone();
        sim.stop()?;
        let mut rows = vec![Row::info(
            s,
            "simulated workers x slots, runs unfinished at most",
            format!(
                "{ALONE_WORKERS} x {ALONE_SLOTS}, {}",
                ALONE_WORKERS as u64 * u64::from(ALONE_SLOTS)
            ),
        )];
        figures.alone_cycles_per_sec = Some(window.rate());
        rows.push(Row::figure(
            s,
            &format!(
                "cycles/s (trigger, dispatch, start, finish; {} timed)",
                window.cycles
            ),
            window.rate(),
            Unit::PerSec,
            Target::None,
        ));
        rows.push(Row::info(
            s,
            "broker CPU per cycle",
            cpu_per_cycle(broker, hz, window.cycles),
        ));
        rows.push(Row::info(
            s,
            "bench (simulation) CPU per cycle",
            cpu_per_cycle(bench, hz, window.cycles),
        ));
        rows.push(Row::figure(
            s,
            "broker RSS after",
            procfs::rss_kib(pid)? as f64,
            Unit::MiB,
            Target::None,
        ));
        rows.extend(rejections(s, &counters));
        Ok(rows)
    })();
    if result.is_err() {
        eprintln!("{}", mesh.diagnostics(20));
    }
    // The broker is stopped before the next scenario (SIGKILL on drop).
    let _ = mesh.terminate("broker", Duration::from_secs(5));
    result
}

/// A row if the broker refused triggers or sent frames the bench could not read.
fn rejections(scenario: &str, counters: &Counters) -> Option<Row> {
    let rejected = Sim::get(&counters.rejected);
    let bad = Sim::get(&counters.bad_frames);
    (rejected + bad > 0).then(|| Row {
        met: Some(false),
        target: String::from("0"),
        ..Row::info(
            scenario,
            "triggers rejected, frames unreadable",
            format!("{rejected}, {bad}"),
        )
    })
}

/// Scenario 12: rows, and the figures of the targets section.
pub fn scale(config: &Config, hz: u64, figures: &mut BrokerFigures) -> anyhow::Result<Vec<Row>> {
    let mut mesh = Mesh::start_broker_alone(&config.bin_dir, config.keep)?;
    if config.keep {
        println!("scale directory (kept): {}", mesh.root().display());
    }
    let mut rows = Vec::new();
    let result = scale_on(&mut mesh, config, hz, figures, &mut rows);
    if let Err(e) = result {
        eprintln!("{}", mesh.diagnostics(20));
        rows.push(Row::failed(SCALE, &e));
    }
    let _ = mesh.terminate("broker", Duration::from_secs(30));
    Ok(rows)
}

fn scale_on(
    mesh: &mut Mesh,
    config: &Config,
    hz: u64,
    figures: &mut BrokerFigures,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let s = SCALE;
    let workers = config.sim_workers;
    let backlog = config.backlog as u64;
    let cycles = config.scale_cycles as u64;
    eprintln!("bench: scenario 12: {workers} simulated workers registering");
    let started = Instant::now();
    let mut sim = Sim::start(mesh.base_port, workers, SCALE_SLOTS, READY_TIMEOUT)?;
    figures.scale_workers = Some(workers);
    rows.push(Row::info(
        s,
        &format!("simulated workers (x {SCALE_SLOTS} slots) registered"),
        format!(
            "{workers} in {}",
            crate::report::format(started.elapsed().as_secs_f64(), Unit::Time)
        ),
    ));
    let pid = broker_pid(mesh)?;
    let slots = sim.total_slots();

    eprintln!("bench: scenario 12: closed loop, nothing waiting");
    let deadline = Instant::now() + config.scenario_timeout;
    let (idle, broker_idle, _) = closed_loop(&mut sim, pid, slots, cycles, deadline)?;
    figures.scale_idle_rate = Some(idle.rate());
    rows.extend(window_rows(s, "nothing waiting", idle, broker_idle, hz));

    // Hold every slot, then fill the backlog.
    eprintln!("bench: scenario 12: {backlog} runs into the backlog");
    sim.set_hold(true);
    sim.set_limit(Sim::get(&sim.counters.triggers_sent));
    let settle_deadline = Instant::now() + config.scenario_timeout;
    // Whatever was in flight has finished or is held before the backlog is counted.
    loop {
        let sent = Sim::get(&sim.counters.triggers_sent);
        let done = Sim::get(&sim.counters.finished)
            + Sim::get(&sim.counters.held)
            + Sim::get(&sim.counters.rejected);
        if done >= sent {
            break;
        }
        sim.check_threads()?;
        if Instant::now() >= settle_deadline {
            anyhow::bail!("runs in flight did not settle: {done} of {sent}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let accepted_before = Sim::get(&sim.counters.accepted);
    let build_started = Instant::now();
    sim.set_outstanding(u64::MAX);
    sim.set_limit(Sim::get(&sim.counters.triggers_sent) + slots + backlog);
    // A larger backlog takes longer to build: four scenario timeouts.
    let build_deadline = build_started + config.scenario_timeout * 4;
    sim.wait_until(
        |c| &c.accepted,
        accepted_before + slots + backlog,
        build_deadline,
        "runs accepted into the backlog",
    )?;
    let built = build_started.elapsed();
    sim.wait_until(|c| &c.held, slots, build_deadline, "slots held")?;
    rows.push(Row::info(
        s,
        "backlog built (every slot held busy)",
        format!(
            "{backlog} runs in {:.1} s ({:.0}/s accepted)",
            built.as_secs_f64(),
            stats::rate((slots + backlog) as usize, built)
        ),
    ));
    let rss = procfs::rss_kib(pid)? as f64;
    figures.scale_rss_kib = Some(rss);
    figures.scale_backlog = Some(backlog);
    rows.push(Row::figure(
        s,
        &format!("broker RSS with {backlog} runs waiting"),
        rss,
        Unit::MiB,
        Target::None,
    ));

    // Release: the same closed loop, the backlog kept where it is.
    eprintln!("bench: scenario 12: closed loop with the backlog waiting");
    sim.set_hold(false);
    let deadline = Instant::now() + config.scenario_timeout;
    let (busy, broker_busy, _) = closed_loop(&mut sim, pid, slots + backlog, cycles, deadline)?;
    figures.scale_backlog_rate = Some(busy.rate());
    let waiting = format!("{backlog} waiting");
    rows.extend(window_rows(s, &waiting, busy, broker_busy, hz));
    let counters = sim.counters.clone();
    sim.stop()?;
    rows.extend(rejections(s, &counters));

    // Restart with the backlog pending.
    eprintln!("bench: scenario 12: restarting the broker with the backlog pending");
    let starts_before = mesh.log_of("broker").matches("broker started").count();
    match mesh.terminate("broker", Duration::from_secs(120))? {
        Some(took) => rows.push(Row::time(
            s,
            "SIGTERM -> exit, backlog pending",
            took,
            Target::None,
        )),
        None => rows.push(Row {
            met: Some(false),
            ..Row::info(
                s,
                "SIGTERM -> exit, backlog pending",
                "no exit in 120 s: killed",
            )
        }),
    }
    let restarted = Instant::now();
    mesh.restart("broker")?;
    // The probe greets from its own thread while the log is watched here.
    let (port, timeout) = (mesh.base_port, config.scenario_timeout);
    let probe = std::thread::spawn(move || {
        sim::time_to_welcome(port, timeout).map(|_| restarted.elapsed())
    });
    let logged_deadline = Instant::now() + config.scenario_timeout;
    let logged = loop {
        if mesh.log_of("broker").matches("broker started").count() > starts_before {
            break Some(restarted.elapsed());
        }
        if Instant::now() >= logged_deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let welcome = probe
        .join()
        .map_err(|_| anyhow::anyhow!("the welcome probe panicked"))??;
    let logged = logged.context("the restarted broker did not log `broker started`")?;
    figures.scale_restart = Some(welcome);
    rows.push(Row::time(
        s,
        "restart: start -> `broker started` logged",
        logged,
        Target::None,
    ));
    rows.push(Row::time(
        s,
        "restart: start -> first welcome to a client",
        welcome,
        Target::None,
    ));
    let pid = broker_pid(mesh)?;
    rows.push(Row::figure(
        s,
        "broker RSS after the restart",
        procfs::rss_kib(pid)? as f64,
        Unit::MiB,
        Target::None,
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_per_cycle_is_milliseconds_with_the_system_share() {
        let ticks = CpuTicks {
            own: 100,
            system: 25,
            children: 0,
        };
        // 100 ticks at 100 Hz = 1 s over 2,000 cycles.
        assert_eq!(cpu_per_cycle(ticks, 100, 2000), "0.500 ms (25% system)");
        assert_eq!(
            cpu_per_cycle(CpuTicks::default(), 100, 0),
            "0.000 ms (0% system)"
        );
    }
}
