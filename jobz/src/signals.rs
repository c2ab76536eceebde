//! SIGTERM and SIGINT as the shutdown trigger every binary's `run(config, shutdown)` takes.

use anyhow::Context;
use crossbeam_channel::Receiver;

/// A channel that receives `()` when SIGTERM or SIGINT arrives (a thread waits for them).
pub fn shutdown_on_signals() -> anyhow::Result<Receiver<()>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let (tx, rx) = crossbeam_channel::bounded(1);
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                tracing::info!(signal, "stop requested");
                let _ = tx.try_send(());
            }
        })
        .context("starting the signal thread")?;
    Ok(rx)
}
