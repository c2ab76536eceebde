//! `jobz-step`: the step leader alone (see `worker::leader`), a small binary the worker
//! starts under every step instead of its own, larger one, when it is installed beside it.

use std::ffi::OsStr;

fn main() {
    let mut args = std::env::args_os();
    match args.nth(1) {
        // Same arguments as `jobz-worker --lead-step …`, the flag included.
        Some(flag) if flag == OsStr::new(worker::leader::FLAG) => {
            worker::leader::main(args.collect())
        }
        // What the deployment checks, as for every jobz binary.
        Some(flag) if flag == OsStr::new("--version") => {
            println!("jobz-step {}", env!("CARGO_PKG_VERSION"));
        }
        _ => {
            eprintln!(
                "jobz-step: started by jobz-worker under each step ({} …), not by hand",
                worker::leader::FLAG
            );
            std::process::exit(worker::leader::EXIT_LEADER_FAILED);
        }
    }
}
