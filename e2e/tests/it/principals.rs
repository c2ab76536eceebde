//! Issue 10, item 2: a message counts only from the role allowed to send it, and every
//! name inside it is the sender's own. Each scenario the review found runs against a sealed
//! mesh (an extra key enrolled under its own name, speaking sealed ZeroMQ) and a plain one
//! (the same sender ids, unsealed).

use std::time::Duration;

use jobz::client::{Client, ClientConfig};
use jobz::jobfile::JobSpec;
use jobz::keys::{NodeIdentity, NodeKey};
use jobz::message::{Message, Role, TaskFinished, TaskOutcome, TaskRef, WorkerStatus};
use serde_json::Value;

use crate::harness::*;

/// A task that holds until the test creates `@DIR@/release`, so it is running while the
/// test forges reports about it.
const HOLD_JOB: &str = r#"
jobs:
  - name: hold
    command: "touch @DIR@/hold.started; while [ ! -e @DIR@/release ]; do sleep 0.05; done; echo done >> @DIR@/ledger"
"#;

/// The pattern of the real `echo` jobs.
const LETTERS: &str = "[a-z]+";

/// `echo`, whose parameter `pattern` must match; each worker writes its own name beside
/// the value.
fn echo_job(worker: &str, pattern: &str) -> String {
    format!(
        r#"
jobs:
  - name: echo
    params:
      msg: {{ required: true, pattern: "{pattern}" }}
    command: "printf '{worker} %s\n' {{msg}} >> @DIR@/ledger"
"#
    )
}

fn ledger(mesh: &Mesh) -> String {
    std::fs::read_to_string(mesh.dir().join("ledger")).unwrap_or_default()
}

/// A node of this test process speaking for `node_id` (`role:name[/suffix]`) with the role
/// `role`. On a sealed mesh its key is enrolled first as `role:name`, as an attacker who
/// holds some accepted key would be. Waits until the broker has welcomed it.
fn raw_node(mesh: &Mesh, node_id: &str, role: Role) -> Client {
    let broker = format!("127.0.0.1:{}", mesh.base_port).parse().unwrap();
    let mut config = ClientConfig::new(broker, node_id.to_owned(), role);
    if mesh.broker_pub().exists() {
        let principal = jobz::keys::principal_of(node_id);
        let key_path = mesh
            .dir()
            .join(format!("{}.key", principal.replace(':', "_")));
        mesh.enroll(principal, &key_path);
        config.identity = Some(NodeIdentity {
            key: NodeKey::load(&key_path).unwrap(),
            brokers: jobz::keys::read_public_keys(&mesh.broker_pub()).unwrap(),
        });
    }
    let client = Client::start(config).unwrap();
    assert!(
        client.wait_connected(Duration::from_secs(10)),
        "{node_id} was not welcomed"
    );
    client
}

/// A worker registration naming `name`, serving `jobs`.
fn registration(name: &str, jobs: Vec<JobSpec>) -> Message {
    Message::Heartbeat(WorkerStatus {
        name: name.into(),
        instance: "forged".into(),
        jobs,
        capabilities: vec![],
        slots: 4,
        running: vec![],
        version: "forged".into(),
        counters: Default::default(),
        leaving: false,
    })
}

/// `echo` as [`echo_job`] defines it, parsed as a worker would register it.
fn echo_spec(worker: &str, pattern: &str) -> JobSpec {
    let yaml = echo_job(worker, pattern);
    let mut set = jobz::jobfile::parse_job_file(std::path::Path::new("forged.yaml"), &yaml)
        .expect("the test's own job file parses");
    set.jobs.remove("echo").expect("echo is in it")
}

/// Sends `forged` from `node` and waits until the broker has either refused it (the
/// counter `frames_dropped_<reason>` went up) or let it take effect (`took_effect`).
fn send_and_settle(
    mesh: &Mesh,
    node: &Client,
    forged: Message,
    reason: &str,
    mut took_effect: impl FnMut() -> bool,
) {
    let counter = format!("frames_dropped_{reason}");
    let before = mesh.broker_counter(&counter);
    node.send(forged);
    wait_until(
        DEADLINE,
        &format!("the forged message to be refused or applied ({counter})"),
        || mesh.broker_counter(&counter) > before || took_effect(),
    );
}

/// Starts `hold` on w1 and waits until its command runs; returns the run id and its task.
fn start_held_run(mesh: &Mesh) -> (String, TaskRef) {
    mesh.wait_workers_live(1);
    let run_id = mesh.start_run("hold", &[]);
    let started = mesh.dir().join("hold.started");
    wait_until(DEADLINE, "the held task to start", || started.exists());
    let step = wait_for(DEADLINE, "the broker to see the task running", || {
        let run = mesh.run(&run_id);
        match steps_of(&run).into_iter().next() {
            Some(s) if str_of(&s, "state") == "running" => Ok(s),
            other => Err(format!("{other:?}")),
        }
    });
    let task = TaskRef {
        task_id: str_of(&step, "task_id").to_owned(),
        attempt: step["attempt"].as_u64().unwrap() as u32,
    };
    (run_id, task)
}

/// Lets the held task end and returns the final run.
fn release(mesh: &Mesh, run_id: &str) -> Value {
    std::fs::write(mesh.dir().join("release"), "").unwrap();
    mesh.wait_run_final(run_id)
}

/// The workers a run's tasks were placed on.
fn placed_on(run: &Value) -> Vec<String> {
    steps_of(run)
        .iter()
        .map(|s| str_of(s, "worker").to_owned())
        .collect()
}

fn state_of(mesh: &Mesh, run_id: &str) -> String {
    str_of(&mesh.run(run_id), "state").to_owned()
}

// ---- A semaphore's key reports a worker's task finished ----------------------------------

fn a_semaphore_cannot_finish_a_workers_running_task(mesh: Mesh) {
    let (run_id, task) = start_held_run(&mesh);
    let semaphore = raw_node(&mesh, "semaphore:evil/1", Role::Semaphore);
    let forged = Message::TaskFinished(TaskFinished {
        task: task.clone(),
        worker: "w1".into(),
        outcome: TaskOutcome::Succeeded,
        exit_code: Some(0),
        error: None,
        started_at_ms: jobz::now_ms(),
        finished_at_ms: jobz::now_ms(),
        output_tail: "forged".into(),
    });
    send_and_settle(&mesh, &semaphore, forged, "wrong_role", || {
        state_of(&mesh, &run_id) != "running"
    });
    let run = mesh.run(&run_id);
    assert_eq!(
        str_of(&run, "state"),
        "running",
        "a semaphore's TaskFinished ended w1's running task: {run:#}"
    );
    assert_eq!(ledger(&mesh), "", "the command has not finished yet");

    let run = release(&mesh, &run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    let step = &steps_of(&run)[0];
    assert_eq!(str_of(step, "worker"), "w1", "{run:#}");
    assert_ne!(str_of(step, "output_tail"), "forged", "{run:#}");
    assert_eq!(ledger(&mesh), "done\n");
}

#[test]
fn a_semaphore_key_cannot_finish_a_workers_running_task_sealed() {
    let mesh = Mesh::builder().sealed().worker("w1", HOLD_JOB).start();
    a_semaphore_cannot_finish_a_workers_running_task(mesh);
}

#[test]
fn a_semaphore_sender_cannot_finish_a_workers_running_task_plain() {
    let mesh = Mesh::builder().worker("w1", HOLD_JOB).start();
    a_semaphore_cannot_finish_a_workers_running_task(mesh);
}

// ---- Another worker's key beats in w1's name ----------------------------------------------

fn a_heartbeat_naming_another_worker_leaves_it_alone(mesh: Mesh) {
    let (run_id, task) = start_held_run(&mesh);
    let mallory = raw_node(&mesh, "worker:mallory", Role::Worker);
    // A new instance id and no jobs: were it believed, w1 would have "restarted" (its
    // running attempt lost) and stopped serving `hold`.
    send_and_settle(
        &mesh,
        &mallory,
        registration("w1", vec![]),
        "name_mismatch",
        || {
            let run = mesh.run(&run_id);
            str_of(&run, "state") != "running"
                || steps_of(&run)[0]["attempt"].as_u64() != Some(task.attempt as u64)
        },
    );
    let run = mesh.run(&run_id);
    assert_eq!(
        str_of(&run, "state"),
        "running",
        "a heartbeat in w1's name from another key touched w1's running attempt: {run:#}"
    );
    let (_, workers) = mesh.get_json("/workers");
    let w1 = list_of(&workers, "workers")
        .into_iter()
        .find(|w| str_of(w, "name") == "w1")
        .unwrap();
    assert_eq!(w1["jobs"], serde_json::json!(["hold"]), "{workers:#}");
    assert!(
        !list_of(&workers, "workers")
            .iter()
            .any(|w| str_of(w, "name") == "mallory"),
        "{workers:#}"
    );

    let run = release(&mesh, &run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    assert_eq!(steps_of(&run)[0]["attempt"], 1, "{run:#}");
    assert!(list_of(&run, "attempts").is_empty(), "{run:#}");
}

#[test]
fn a_heartbeat_naming_w1_from_another_key_leaves_w1_alone_sealed() {
    let mesh = Mesh::builder().sealed().worker("w1", HOLD_JOB).start();
    a_heartbeat_naming_another_worker_leaves_it_alone(mesh);
}

#[test]
fn a_heartbeat_naming_w1_from_another_sender_leaves_w1_alone_plain() {
    let mesh = Mesh::builder().worker("w1", HOLD_JOB).start();
    a_heartbeat_naming_another_worker_leaves_it_alone(mesh);
}

// ---- A non-worker registers as a worker ---------------------------------------------------

fn a_non_worker_cannot_register_or_get_runs(mesh: Mesh) {
    mesh.wait_workers_live(1);
    let intruder = raw_node(&mesh, "frontend:intruder/1", Role::Frontend);
    let listed = |name: &str| {
        let (_, workers) = mesh.get_json("/workers");
        list_of(&workers, "workers")
            .iter()
            .any(|w| str_of(w, "name") == name)
    };
    let forged = registration("fake", vec![echo_spec("fake", ".*")]);
    send_and_settle(&mesh, &intruder, forged, "wrong_role", || listed("fake"));
    assert!(!listed("fake"), "a frontend's key registered a worker");

    // The catalog still holds w1's definition: the forged `.*` pattern did not replace it.
    // (No letter at all, so even an unanchored `[a-z]+` refuses it.)
    let (status, body) = mesh.trigger("echo", &[("msg", "42 !")]);
    assert_eq!(status, 400, "the forged pattern was taken: {body}");
    let run_id = mesh.start_run("echo", &[("msg", "real")]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    assert_eq!(
        placed_on(&run),
        ["w1"],
        "a run was placed on a fake worker: {run:#}"
    );
}

#[test]
fn a_frontend_key_cannot_register_a_worker_or_get_runs_sealed() {
    let mesh = Mesh::builder()
        .sealed()
        .worker("w1", &echo_job("w1", LETTERS))
        .start();
    a_non_worker_cannot_register_or_get_runs(mesh);
}

#[test]
fn a_frontend_sender_cannot_register_a_worker_or_get_runs_plain() {
    let mesh = Mesh::builder()
        .worker("w1", &echo_job("w1", LETTERS))
        .start();
    a_non_worker_cannot_register_or_get_runs(mesh);
}

// ---- A revoked worker revived by another key ----------------------------------------------

#[test]
fn a_revoked_worker_is_not_revived_by_a_heartbeat_from_another_key() {
    let mesh = Mesh::builder()
        .sealed()
        .worker("w1", &echo_job("w1", LETTERS))
        .worker("w2", &echo_job("w2", LETTERS))
        .start();
    mesh.wait_workers_live(2);
    let mallory = raw_node(&mesh, "worker:mallory", Role::Worker);

    mesh.broker_keys(&["revoke", "worker:w2"]);
    wait_until(DEADLINE, "the revoked w2 to be lost", || {
        mesh.worker_live("w2") == Some(false)
    });
    let echo = echo_spec("w2", LETTERS);
    send_and_settle(
        &mesh,
        &mallory,
        registration("w2", vec![echo]),
        "name_mismatch",
        || mesh.worker_live("w2") == Some(true),
    );
    assert_eq!(
        mesh.worker_live("w2"),
        Some(false),
        "a heartbeat in w2's name from mallory's key revived the revoked w2"
    );

    let run_id = mesh.start_run("echo", &[("msg", "after")]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    assert_eq!(
        placed_on(&run),
        ["w1"],
        "the revoked w2 was given new work: {run:#}"
    );
    assert_eq!(ledger(&mesh), "w1 after\n", "the revoked w2 ran new work");
}

// ---- Nothing legitimate is refused ---------------------------------------------------------

/// The refusal counters of the authority.
const REFUSALS: [&str; 4] = [
    "frames_dropped_bad_sender",
    "frames_dropped_bad_message_id",
    "frames_dropped_wrong_role",
    "frames_dropped_name_mismatch",
];

fn real_nodes_speak_within_their_roles(sealed: bool) {
    let jobs = r#"
jobs:
  - name: k
    command: "true"
    params:
      date: { required: true }
  - name: publish
    command: "true"
    params:
      date: { required: true }
"#;
    let builder = Mesh::builder().worker("w1", jobs);
    let mut mesh = if sealed { builder.sealed() } else { builder }.start();
    mesh.start_semaphore(
        "sem",
        r#"
semaphores:
  - name: after_k
    wait_for: [{ job: k, count: all }]
    key: "{date}"
    then: publish
"#,
    );
    mesh.wait_workers_live(1);
    let run_id = mesh.start_run("k", &[("date", "2026_11_23")]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    // The semaphore triggered `publish` and reports its barrier: its trigger, queries and
    // status all passed; the frontend's queries and the worker's reports too.
    let barrier = wait_for(
        DEADLINE,
        "the semaphore to report its fired barrier",
        || {
            let (_, body) = mesh.get_json("/semaphores");
            list_of(&body, "semaphores")
                .into_iter()
                .find(|b| str_of(b, "state") == "fired")
                .ok_or_else(|| body.to_string())
        },
    );
    assert_eq!(str_of(&barrier, "key"), "2026_11_23", "{barrier:#}");
    wait_for(DEADLINE, "the semaphore's `publish` run to succeed", || {
        let (_, runs) = mesh.get_json("/runs?job=publish");
        match list_of(&runs, "runs").first() {
            Some(r) if str_of(r, "state") == "succeeded" => Ok(()),
            _ => Err(runs.to_string()),
        }
    });
    let (status, dead) = mesh.get_json("/dead");
    assert_eq!(status, 200, "{dead}");
    for counter in REFUSALS {
        assert_eq!(mesh.broker_counter(counter), 0, "{counter}");
    }
}

#[test]
fn real_nodes_are_never_refused_sealed() {
    real_nodes_speak_within_their_roles(true);
}

#[test]
fn real_nodes_are_never_refused_plain() {
    real_nodes_speak_within_their_roles(false);
}
