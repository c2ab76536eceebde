//! Schedules (issue 11): a `schedules:` entry served by two semaphore processes fires each
//! slot once, through a `kill -9` of one of them; slots missed while both were stopped
//! follow `catch_up`; `GET /schedules` shows the next and last slot and the run it started.
//!
//! Every scheduled run appends `<schedule> <slot>` to a ledger (the slot in Unix seconds,
//! rendered by the schedule as `{slot_unix}`), so the books are kept by the jobs
//! themselves.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::harness::{list_of, str_of, wait_for, Mesh};

/// The job every schedule here starts: it appends its schedule and slot to the ledger.
const LEDGER_WORKER: &str = r#"
jobs:
  - name: tick
    params:
      sched: { required: true }
      slot: { required: true, pattern: '^[0-9]{10}$' }
    command: "printf '%s %s\n' {sched} {slot} >> @DIR@/ledger"
    delivery: queue
"#;

/// Seconds since the epoch, now.
fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The ledger: every slot written per schedule, in the order written.
fn ledger(dir: &Path) -> BTreeMap<String, Vec<i64>> {
    let text = fs::read_to_string(dir.join("ledger")).unwrap_or_default();
    let mut slots: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for line in text.lines() {
        let (sched, slot) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad ledger line {line:?}"));
        let slot = slot
            .parse()
            .unwrap_or_else(|_| panic!("bad slot in {line:?}"));
        slots.entry(sched.to_owned()).or_default().push(slot);
    }
    slots
}

/// Waits until the ledger holds a slot of `sched` at or after `slot`.
fn wait_slot(mesh: &Mesh, sched: &str, slot: i64) {
    wait_for(
        Duration::from_secs(30),
        &format!("{sched} to fire the slot {slot}"),
        || {
            let seen = ledger(mesh.dir()).remove(sched).unwrap_or_default();
            match seen.iter().max() {
                Some(last) if *last >= slot => Ok(()),
                last => Err(format!("latest {last:?}")),
            }
        },
    );
}

/// The schedules `GET /schedules` lists.
fn schedules(mesh: &Mesh) -> Vec<Value> {
    let (status, body) = mesh.get_json("/schedules");
    assert_eq!(status, 200, "GET /schedules: {body}");
    list_of(&body, "schedules")
}

/// Blocks until the wall clock reaches `at` (Unix seconds). The slots are instants of the
/// wall clock, so this is what the scenario is about, not a stand-in for an event.
fn sleep_until(at: f64) {
    let wait = at - now_s();
    if wait > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(wait));
    }
}

#[test]
fn an_every_2s_schedule_on_two_semaphores_fires_each_slot_once_through_a_kill_9() {
    let mut mesh = Mesh::builder().worker("w1", LEDGER_WORKER).start();
    mesh.wait_workers_live(1);
    let yaml = r#"
schedules:
  - name: pair
    job: tick
    every: 2s
    params: { sched: pair, slot: '{slot_unix}' }
"#;
    mesh.start_semaphore("sem-a", yaml);
    mesh.start_semaphore("sem-b", yaml);
    // From the next slot on, both processes serve the schedule.
    let first = (now_s() as i64 / 2 + 1) * 2;
    let last = first + 20;
    wait_slot(&mesh, "pair", first + 6);
    mesh.kill9("sem-a");
    eprintln!("sem-a killed at {:.3}", now_s());
    wait_slot(&mesh, "pair", first + 12);
    // Back with the default catch_up: none; the slots sem-b fired meanwhile stay once.
    mesh.restart("sem-a");
    mesh.wait_semaphore_ready("sem-a", 2);
    wait_slot(&mesh, "pair", last);

    let slots = ledger(mesh.dir()).remove("pair").unwrap_or_default();
    let mut seen = slots.clone();
    seen.sort_unstable();
    let distinct = seen.len();
    seen.dedup();
    assert_eq!(distinct, seen.len(), "a slot fired twice: {slots:?}");
    let window: Vec<i64> = seen
        .iter()
        .copied()
        .filter(|s| (first..=last).contains(s))
        .collect();
    let expected: Vec<i64> = (first..=last).step_by(2).collect();
    assert_eq!(
        window, expected,
        "every slot once while sem-b ran: {slots:?}"
    );
    // Both processes sent the slots they both served; the broker started each once.
    let duplicates = mesh.broker_counter("duplicate_triggers");
    assert!(
        duplicates >= 3,
        "only {duplicates} duplicate triggers: was sem-a firing?"
    );

    // GET /schedules: one entry, its next slot ahead, its last slot with the run it started.
    let listed = schedules(&mesh);
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let pair = &listed[0];
    assert_eq!(str_of(pair, "schedule"), "pair");
    assert_eq!(str_of(pair, "job"), "tick");
    assert_eq!(str_of(pair, "every"), "2s");
    assert_eq!(str_of(pair, "timezone"), "UTC");
    assert_eq!(str_of(pair, "catch_up"), "none");
    assert!(pair["cron"].is_null(), "{pair}");
    let (next, last_slot) = (str_of(pair, "next_fire"), str_of(pair, "last_slot"));
    assert!(next > last_slot, "{pair}");
    let run_id = wait_for(Duration::from_secs(10), "the last slot's run", || {
        let listed = schedules(&mesh);
        match listed[0]["last_run"].as_str() {
            Some(run) => Ok((run.to_owned(), str_of(&listed[0], "last_slot").to_owned())),
            None => Err(listed[0].to_string()),
        }
    });
    let run = mesh.run(&run_id.0);
    let slot: i64 = str_of(&run["params"], "slot").parse().unwrap();
    assert_eq!(
        jobz::format_time_ms(slot * 1000),
        run_id.1,
        "the run listed is the last slot's: {run}"
    );
}

#[test]
fn slots_missed_while_both_semaphores_were_stopped_follow_catch_up() {
    let mut mesh = Mesh::builder().worker("w1", LEDGER_WORKER).start();
    mesh.wait_workers_live(1);
    let mut yaml = String::from("schedules:\n");
    for policy in ["none", "one", "all"] {
        yaml.push_str(&format!(
            "  - name: catch_{policy}\n    job: tick\n    every: 1s\n    catch_up: {policy}\n    params: {{ sched: catch_{policy}, slot: '{{slot_unix}}' }}\n"
        ));
    }
    mesh.start_semaphore("sem-a", &yaml);
    mesh.start_semaphore("sem-b", &yaml);
    let running = now_s() as i64 + 2;
    for policy in ["none", "one", "all"] {
        wait_slot(&mesh, &format!("catch_{policy}"), running);
    }
    // Stop both a little after a slot, once it has surely been decided: nothing runs from
    // here on, so the next three slots are missed.
    sleep_until(now_s().floor() + 1.3);
    mesh.kill9("sem-a");
    mesh.kill9("sem-b");
    let stopped = now_s();
    let missed: Vec<i64> = (1..=3).map(|i| stopped.floor() as i64 + i).collect();
    sleep_until(missed[2] as f64 + 0.1);
    mesh.restart("sem-a");
    mesh.wait_semaphore_ready("sem-a", 2);
    let back = missed[2] + 1;
    for policy in ["none", "one", "all"] {
        wait_slot(&mesh, &format!("catch_{policy}"), back + 1);
    }

    // The restarted process says what it found; if it started late the count is off and
    // the rest would not mean much.
    let log = mesh.stderr_of("sem-a");
    let after_restart = log.rsplit("---- e2e: restarted ----").next().unwrap_or("");
    for policy in ["none", "one", "all"] {
        let line = after_restart
            .lines()
            .find(|l| l.contains("slots missed") && l.contains(&format!("catch_{policy} ")))
            .unwrap_or_else(|| {
                panic!("no missed slots logged for catch_{policy}:\n{after_restart}")
            });
        assert!(line.contains("missed=3"), "{line}");
    }
    // sem-b comes back too, with the same catch_up: what sem-a served meanwhile is not
    // missed (sem-a reported it through the broker), so sem-b catches up on nothing.
    mesh.restart("sem-b");
    mesh.wait_semaphore_ready("sem-b", 2);
    let sem_b_back = now_s() as i64 + 1;
    wait_slot(&mesh, "catch_all", sem_b_back + 1);
    let log = mesh.stderr_of("sem-b");
    let after_restart = log.rsplit("---- e2e: restarted ----").next().unwrap_or("");
    assert!(
        after_restart.contains("another semaphore process served this schedule"),
        "sem-b did not learn what sem-a served:\n{after_restart}"
    );
    for line in after_restart.lines().filter(|l| l.contains("slots missed")) {
        // At most the slot of the status report in flight when sem-b asked.
        assert!(
            line.contains("missed=1 ") || line.contains("missed=0 "),
            "sem-b caught up on slots sem-a had served: {line}"
        );
    }

    let slots = ledger(mesh.dir());
    for (policy, expected) in [
        ("none", vec![]),
        ("one", vec![missed[2]]),
        ("all", missed.clone()),
    ] {
        let fired = &slots[&format!("catch_{policy}")];
        // The runs of one catch-up run side by side: their lines come in any order.
        let mut in_gap: Vec<i64> = fired
            .iter()
            .copied()
            .filter(|s| missed.contains(s))
            .collect();
        in_gap.sort_unstable();
        assert_eq!(in_gap, expected, "catch_up: {policy}; ledger {fired:?}");
        let mut sorted = fired.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            fired.len(),
            "catch_up: {policy} fired a slot twice: {fired:?}"
        );
        // The process is back: the slots after the restart fire whatever the policy.
        assert!(
            fired.contains(&back) && fired.contains(&(back + 1)),
            "{policy}: {fired:?}"
        );
    }
}
