//! Triggering a job, successors, delivery modes, exact topics.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::harness::{steps_of, steps_of_job, str_of, wait_until, Mesh, DEADLINE};

/// Worker names of these steps, sorted.
fn workers(steps: &[Value]) -> Vec<String> {
    let mut names: Vec<String> = steps.iter().map(|s| str_of(s, "worker").into()).collect();
    names.sort();
    names
}

/// Distinct step ids of these steps.
fn step_ids(steps: &[Value]) -> BTreeSet<String> {
    steps.iter().map(|s| str_of(s, "step_id").into()).collect()
}

/// How many `started` lines each job has in a worker's log for this run.
fn starts_per_job(mesh: &Mesh, worker: &str, run_id: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in mesh.worker_log(worker, run_id) {
        if line.event == "started" {
            *counts.entry(line.job).or_insert(0) += 1;
        }
    }
    counts
}

#[test]
fn job_start_runs_import_to_success_with_visible_steps_and_worker_log() {
    let mesh = Mesh::builder()
        .worker(
            "w1",
            r#"
jobs:
  - name: import
    command: "echo importing {date} on $JOBZ_WORKER"
    params:
      date: { required: true, pattern: '^[0-9]{4}_[0-9]{2}_[0-9]{2}$' }
"#,
        )
        .start();
    mesh.wait_workers_live(1);

    let (status, accepted) = mesh.trigger("import", &[("date", "2026_11_23")]);
    assert_eq!(status, 202, "{accepted}");
    let run_id = str_of(&accepted, "run_id").to_owned();
    assert!(!run_id.is_empty(), "{accepted}");
    assert_eq!(str_of(&accepted, "job"), "import", "{accepted}");
    let status_url = str_of(&accepted, "status_url");
    assert!(status_url.contains(&run_id), "{accepted}");

    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    assert_eq!(str_of(&run, "run_id"), run_id, "{run:#}");
    assert_eq!(str_of(&run, "job"), "import", "{run:#}");
    assert_eq!(run["params"]["date"], "2026_11_23", "{run:#}");
    assert!(!str_of(&run, "created_at").is_empty(), "{run:#}");
    assert!(!str_of(&run, "finished_at").is_empty(), "{run:#}");

    let steps = steps_of(&run);
    assert_eq!(steps.len(), 1, "{run:#}");
    let step = &steps[0];
    assert_eq!(str_of(step, "job"), "import", "{step:#}");
    assert_eq!(str_of(step, "worker"), "w1", "{step:#}");
    assert_eq!(str_of(step, "state"), "succeeded", "{step:#}");
    assert_eq!(step["exit_code"], 0, "{step:#}");
    assert_eq!(step["attempt"], 1, "{step:#}");
    for field in ["step_id", "task_id", "started_at", "finished_at"] {
        assert!(!str_of(step, field).is_empty(), "no {field} in {step:#}");
    }

    // The status URL leads to the same run.
    let path = match status_url.find("/runs/") {
        Some(at) => &status_url[at..],
        None => panic!("status_url {status_url:?} does not point at /runs/"),
    };
    let (status, same) = mesh.get_json(path);
    assert_eq!(status, 200, "{same}");
    assert_eq!(str_of(&same, "run_id"), run_id);

    // The worker's own log tells the same story.
    let task_id = str_of(step, "task_id").to_owned();
    wait_until(DEADLINE, "received/started/finished in worker.log", || {
        let events: Vec<String> = mesh
            .worker_log("w1", &run_id)
            .into_iter()
            .map(|l| l.event)
            .collect();
        events.iter().any(|e| e == "received")
            && events.iter().any(|e| e == "started")
            && events.iter().any(|e| e.starts_with("finished exit=0 in "))
    });
    for line in mesh.worker_log("w1", &run_id) {
        assert_eq!(line.job, "import", "{}", line.line);
        assert_eq!(line.task, task_id, "{}", line.line);
        assert_eq!(line.step, str_of(step, "step_id"), "{}", line.line);
        assert_eq!(line.attempt, "1", "{}", line.line);
    }
}

const FAN_OUT_JOBS: &str = r#"
jobs:
  - name: a
    command: "echo a on $JOBZ_WORKER"
    on_success: [b, c]
  - name: b
    command: "echo b on $JOBZ_WORKER"
  - name: c
    command: "echo c on $JOBZ_WORKER"
  - name: la
    command: "echo la on $JOBZ_WORKER"
    on_success: l
  - name: l
    command: "echo l on $JOBZ_WORKER"
    delivery: local
"#;

#[test]
fn broadcast_runs_once_per_worker_and_successors_run_once_per_step() {
    let mesh = Mesh::builder()
        .worker("w1", FAN_OUT_JOBS)
        .worker("w2", FAN_OUT_JOBS)
        .start();
    mesh.wait_workers_live(2);
    let both = vec!["w1".to_string(), "w2".to_string()];

    // Broadcast, then two broadcast successors.
    let run_id = mesh.start_run("a", &[]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    let a = steps_of_job(&run, "a");
    assert_eq!(workers(&a), both, "one `a` task per worker: {run:#}");
    assert_eq!(step_ids(&a).len(), 1, "`a` is one step: {run:#}");
    for job in ["b", "c"] {
        let tasks = steps_of_job(&run, job);
        assert_eq!(
            step_ids(&tasks).len(),
            1,
            "`{job}` starts once, after the whole `a` step: {run:#}"
        );
        assert_eq!(workers(&tasks), both, "`{job}` is broadcast: {run:#}");
    }
    assert_eq!(steps_of(&run).len(), 6, "{run:#}");
    for s in steps_of(&run) {
        assert_eq!(str_of(&s, "state"), "succeeded", "{s:#}");
        assert_eq!(s["exit_code"], 0, "{s:#}");
    }
    // And each worker ran each job exactly once.
    for w in ["w1", "w2"] {
        wait_until(DEADLINE, &format!("{w}'s log to show a, b and c"), || {
            starts_per_job(&mesh, w, &run_id).len() == 3
        });
        let starts = starts_per_job(&mesh, w, &run_id);
        assert_eq!(
            starts,
            BTreeMap::from([("a".into(), 1), ("b".into(), 1), ("c".into(), 1)]),
            "{w}"
        );
    }

    // A local successor runs on the worker of each predecessor task, after it.
    let run_id = mesh.start_run("la", &[]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    let la = steps_of_job(&run, "la");
    let l = steps_of_job(&run, "l");
    assert_eq!(workers(&la), both, "{run:#}");
    assert_eq!(workers(&l), both, "one `l` task per `la` task: {run:#}");
    assert_eq!(steps_of(&run).len(), 4, "{run:#}");
    for local in &l {
        let worker = str_of(local, "worker");
        let before = la
            .iter()
            .find(|p| str_of(p, "worker") == worker)
            .expect("an `la` task on the same worker");
        let (finished, started) = (str_of(before, "finished_at"), str_of(local, "started_at"));
        if finished.len() == started.len() {
            assert!(
                started >= finished,
                "`l` on {worker} started before its `la` finished: {run:#}"
            );
        }
    }
}

#[test]
fn failing_command_reaches_on_failure_and_run_fails() {
    let mesh = Mesh::builder()
        .worker(
            "w1",
            r#"
jobs:
  - name: boom
    command: "echo about to fail; exit 3"
    on_success: never
    on_failure: [cleanup]
  - name: cleanup
    command: "echo cleaning up after $JOBZ_RUN_ID"
  - name: never
    command: "echo this must not run"
"#,
        )
        .start();
    mesh.wait_workers_live(1);

    let run_id = mesh.start_run("boom", &[]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "failed", "{run:#}");
    let boom = steps_of_job(&run, "boom");
    assert_eq!(boom.len(), 1, "{run:#}");
    assert_eq!(str_of(&boom[0], "state"), "failed", "{run:#}");
    assert_eq!(boom[0]["exit_code"], 3, "{run:#}");
    let cleanup = steps_of_job(&run, "cleanup");
    assert_eq!(cleanup.len(), 1, "on_failure runs once: {run:#}");
    assert_eq!(str_of(&cleanup[0], "state"), "succeeded", "{run:#}");
    assert!(
        steps_of_job(&run, "never").is_empty(),
        "on_success must not run: {run:#}"
    );
    wait_until(DEADLINE, "`failed exit=3` in worker.log", || {
        mesh.worker_log("w1", &run_id)
            .iter()
            .any(|l| l.job == "boom" && l.event.starts_with("failed exit=3"))
    });
}

#[test]
fn exact_topics_job_named_prefix_does_not_fire_longer_job() {
    let mesh = Mesh::builder()
        .worker(
            "short",
            "jobs:\n  - name: import\n    command: \"echo import\"\n",
        )
        .worker(
            "long",
            "jobs:\n  - name: import_category_dump\n    command: \"echo dump\"\n",
        )
        .start();
    mesh.wait_workers_live(2);

    let long_run = mesh.start_run("import_category_dump", &[]);
    let run = mesh.wait_run_final(&long_run);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    assert_eq!(
        workers(&steps_of(&run)),
        vec!["long".to_string()],
        "{run:#}"
    );

    let short_run = mesh.start_run("import", &[]);
    let run = mesh.wait_run_final(&short_run);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    assert_eq!(
        workers(&steps_of(&run)),
        vec!["short".to_string()],
        "{run:#}"
    );

    // Each worker's log has finished its own run; neither saw the other's.
    for (worker, own) in [("long", &long_run), ("short", &short_run)] {
        wait_until(DEADLINE, &format!("{worker} to log its run"), || {
            mesh.worker_log(worker, own)
                .iter()
                .any(|l| l.event.starts_with("finished"))
        });
    }
    assert_eq!(
        mesh.worker_log("short", &long_run),
        vec![],
        "the `import` worker saw work for `import_category_dump`"
    );
    assert_eq!(
        mesh.worker_log("long", &short_run),
        vec![],
        "the `import_category_dump` worker saw work for `import`"
    );
}

/// Regression: a successor that does not declare the run's parameters was refused by its
/// worker ("undeclared parameter"), although SPEC says the run's params flow on.
#[test]
fn run_params_flow_on_to_successors_that_do_not_declare_them() {
    let mesh = Mesh::builder()
        .worker(
            "w1",
            r#"
jobs:
  - name: first
    command: "echo {date}"
    params:
      date: { required: true, pattern: '^[0-9]{4}_[0-9]{2}_[0-9]{2}$' }
    on_success: second
  - name: second
    command: 'printf %s "$JOBZ_PARAM_DATE" > @DIR@/second.out'
"#,
        )
        .start();
    mesh.wait_workers_live(1);
    let run_id = mesh.start_run("first", &[("date", "2026_11_23")]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    let out = std::fs::read_to_string(mesh.dir().join("second.out")).unwrap();
    assert_eq!(out, "2026_11_23");
}
