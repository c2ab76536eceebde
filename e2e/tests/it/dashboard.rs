//! The dashboard in a real browser (issue 13, acceptance 1 and the run page of 2): the mesh
//! here, the browser side in `e2e/browser/dashboard.mjs` (headless Chromium through
//! playwright-core, installed by `scripts/test.sh` with `npm ci`). Screenshots of every page
//! go to `target/browser-artifacts/`.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{repo_root, target_dir, Mesh};

/// The whole browser session may take this long.
const SESSION: Duration = Duration::from_secs(180);

#[test]
fn the_dashboard_starts_watches_cancels_and_retries_runs_in_chromium() {
    let browser_dir = repo_root().join("e2e/browser");
    if !browser_dir.join("node_modules/playwright-core").is_dir() {
        // scripts/test.sh installs it and sets JOBZ_REQUIRE_BROWSER=1: there, missing is a failure.
        assert!(
            std::env::var_os("JOBZ_REQUIRE_BROWSER").is_none(),
            "playwright-core is not installed: run `npm ci` in e2e/browser (scripts/test.sh does)"
        );
        eprintln!("skipped: playwright-core is not installed (npm ci in e2e/browser)");
        return;
    }
    let mesh = Mesh::builder()
        .worker(
            "w1",
            r#"
jobs:
  - name: greet
    command: "echo hello {name}"
    params:
      name: { pattern: "[a-z]{1,20}", required: true }
  - name: slow
    command: "sleep 1"
  - name: ticker
    command: "for i in 1 2 3 4 5; do echo \"tick $i $(date +%s%3N)\"; sleep 1; done"
  - name: sleeper
    command: "sleep 60"
  - name: doomed
    command: "if test -e @DIR@/doomed.once; then echo fixed; else touch @DIR@/doomed.once; echo doomed; exit 3; fi"
  - name: held
    command: "read line < @DIR@/held.fifo; echo released"
"#,
        )
        .start();
    mesh.wait_workers_live(1);
    // `held` runs until the browser session writes a line here.
    let held_fifo = mesh.dir().join("held.fifo");
    let made = Command::new("mkfifo")
        .arg(&held_fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success(), "mkfifo {}", held_fifo.display());
    let artifacts = target_dir().join("browser-artifacts");
    // Screenshots of an earlier session must not stand in for this one's.
    let _ = std::fs::remove_dir_all(&artifacts);
    let mut node = Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .env(
            "JOBZ_URL",
            format!("http://127.0.0.1:{}", mesh.frontend_port),
        )
        .env("JOBZ_ARTIFACTS", &artifacts)
        .env("JOBZ_HELD_FIFO", &held_fifo)
        .stdin(Stdio::null())
        // Its own process group: Chromium and its helpers end with it.
        .process_group(0)
        .spawn()
        .expect("starting node (Node.js is needed for the browser tests)");
    let pid = node.id();
    let deadline = Instant::now() + SESSION;
    let status = loop {
        if let Some(status) = node.try_wait().expect("waiting for node") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Whatever happened, nothing of the session outlives the test.
    let _ = Command::new("kill")
        .args(["-9", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
    let _ = node.kill();
    let _ = node.wait();
    let status =
        status.unwrap_or_else(|| panic!("the browser session took longer than {SESSION:?}"));
    assert!(
        status.success(),
        "the browser session failed ({status}); screenshots in {}",
        artifacts.display()
    );
    for page in [
        "01-runs-empty",
        "03-run-succeeded",
        "05-run-live-log",
        "06-run-cancelled",
        "08-run-retried",
        "10-job-stats",
        "09-workers",
    ] {
        assert!(
            artifacts.join(format!("{page}.png")).is_file(),
            "no screenshot {page}"
        );
    }
}
