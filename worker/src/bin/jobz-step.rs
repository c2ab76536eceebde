//! `jobz-step`: the step supervisor alone (see `worker::supervisor`), a small binary the
//! worker starts once, when it is installed beside it, to start every step's command.

use std::ffi::OsStr;

fn main() {
    let mut args = std::env::args_os();
    match args.nth(1) {
        // Same arguments as `jobz-worker --supervise-steps …`, the flag included.
        Some(flag) if flag == OsStr::new(worker::supervisor::FLAG) => {
            worker::supervisor::main(args.collect())
        }
        // What the deployment checks, as for every jobz binary.
        Some(flag) if flag == OsStr::new("--version") => {
            println!("jobz-step {}", jobz::VERSION);
        }
        _ => {
            eprintln!(
                "jobz-step: started by jobz-worker ({} …), not by hand",
                worker::supervisor::FLAG
            );
            std::process::exit(worker::supervisor::EXIT_SUPERVISOR_FAILED);
        }
    }
}
