//! End-to-end tests: the real `jobz-frontend` binary against a fake broker speaking the
//! real wire protocol over ZeroMQ on loopback.

// Test code may unwrap (a panic is a failure with a backtrace); clippy.toml allows it only
// inside #[test] functions, and the harness's helpers are not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{request, request_with, FakeBroker, Frontend};
use jobz::message::{
    HealthView, Message, Query, ReplyBody, RunState, RunView, StepView, TaskState, TriggerRequest,
};
use serde_json::json;

fn run_view(state: RunState, output: &str) -> RunView {
    let finished = state.is_final();
    RunView {
        run_id: "run-1".into(),
        job: "build".into(),
        params: BTreeMap::new(),
        state,
        parent_runs: vec![],
        created_at_ms: 1_000,
        finished_at_ms: finished.then_some(2_000),
        steps: vec![StepView {
            step_id: "s1".into(),
            task_id: "t1".into(),
            job: "build".into(),
            worker: Some("w1".into()),
            state: if finished {
                TaskState::Succeeded
            } else {
                TaskState::Running
            },
            attempt: 1,
            exit_code: finished.then_some(0),
            error: None,
            started_at_ms: Some(1_000),
            finished_at_ms: finished.then_some(2_000),
            output_tail: output.into(),
        }],
        attempts: vec![],
        ..Default::default()
    }
}

/// A broker whose run `run-1` becomes final after `polls_until_final` queries for it.
fn broker(polls_until_final: u32) -> FakeBroker {
    let polls = Arc::new(AtomicU32::new(0));
    FakeBroker::start(move |m| match m {
        Message::Trigger(t) if t.job == "build" => Some(ReplyBody::Accepted {
            run_id: "run-1".into(),
        }),
        Message::Trigger(t) => Some(ReplyBody::Rejected {
            status: 404,
            error: format!("unknown job {:?}", t.job),
        }),
        // A run's end is answered at once here (as a broker with no room to hold the
        // question does): the frontend asks again until it is final.
        Message::Query(Query::Run { run_id } | Query::RunEnd { run_id, .. })
            if run_id == "run-1" =>
        {
            let n = polls.fetch_add(1, Ordering::SeqCst) + 1;
            Some(ReplyBody::Run(Some(if n >= polls_until_final {
                run_view(RunState::Succeeded, "built\n")
            } else {
                run_view(RunState::Running, "")
            })))
        }
        Message::Query(Query::Run { .. } | Query::RunEnd { .. }) => Some(ReplyBody::Run(None)),
        Message::Query(Query::Health) => Some(ReplyBody::Health(HealthView {
            version: "test".into(),
            instance: "fake".into(),
            counters: BTreeMap::from([("frames_received".into(), 3)]),
            active_runs: 1,
            live_workers: 0,
            ..Default::default()
        })),
        Message::Query(Query::Workers) => Some(ReplyBody::Workers(vec![])),
        _ => None,
    })
}

#[test]
fn job_start_is_accepted_through_the_real_wire() {
    let broker = broker(1);
    let frontend = Frontend::start(broker.base_port, &[]);
    let r = frontend.get("/job_start?job_name=build&date=2026_01_02&x=%24%28id%29");
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"run_id": "run-1", "job": "build", "status_url": "/runs/run-1"})
    );
    assert_eq!(r.header("location"), Some("/runs/run-1"));
    let triggers: Vec<TriggerRequest> = broker
        .seen()
        .into_iter()
        .filter_map(|m| match m {
            Message::Trigger(t) => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(
        triggers.len(),
        1,
        "one trigger, however often it was resent"
    );
    assert_eq!(triggers[0].params["x"], "$(id)");
    assert_eq!(triggers[0].params.len(), 2);

    let r = frontend.get("/job_start?job_name=nope");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["job"], "nope");

    let r = frontend.get("/runs/run-1");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "succeeded");
    assert_eq!(r.json()["created_at"], "1970-01-01T00:00:01.000Z");
    assert_eq!(frontend.get("/runs/other").status, 404);

    let r = frontend.get("/healthz");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["broker"]["instance"], "fake");

    let r = frontend.get("/metrics");
    let text = r.text();
    assert!(text.contains("jobz_broker_up 1\n"), "{text}");
    assert!(
        text.contains("jobz_broker_frames_received_total 3\n"),
        "{text}"
    );
    assert!(
        text.contains("jobz_frontend_http_requests_total{code=\"202\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("jobz_frontend_broker_connected 1\n"),
        "{text}"
    );
}

#[test]
fn wait_answers_200_when_the_run_ends() {
    let broker = broker(3);
    let frontend = Frontend::start(broker.base_port, &[]);
    let started = Instant::now();
    let r = frontend.get("/job_start?job_name=build&wait=20");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "succeeded");
    assert_eq!(r.json()["steps"][0]["exit_code"], 0);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn wait_answers_202_when_it_runs_out() {
    let broker = broker(u32::MAX);
    let frontend = Frontend::start(broker.base_port, &[]);
    let started = Instant::now();
    let r = frontend.get("/job_start?job_name=build&wait=0.5");
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["run_id"], "run-1");
    assert!(started.elapsed() >= Duration::from_millis(500));
}

#[test]
fn follow_streams_the_log_until_the_run_ends() {
    let broker = broker(3);
    let frontend = Frontend::start(broker.base_port, &[]);
    let r = frontend.get("/runs/run-1/log?follow=1");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.text(), "[w1 build] built\n");
    // The connection-per-request client above closed; the server still answers.
    assert_eq!(frontend.get("/runs/run-1/log").text(), "[w1 build] built\n");
}

#[test]
fn broker_down_means_503_after_the_request_timeout() {
    // Nothing listens on this base port.
    let frontend = Frontend::start(harness::free_port(), &["--request-timeout", "300ms"]);
    let started = Instant::now();
    let r = frontend.get("/job_start?job_name=build");
    assert_eq!(r.status, 503);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .starts_with("broker unreachable"));
    assert!(started.elapsed() < Duration::from_secs(3));
    let r = frontend.get("/healthz");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["status"], "unavailable");
    assert!(frontend
        .get("/metrics")
        .text()
        .contains("jobz_broker_up 0\n"));
    // What needs no broker still works.
    let r = frontend.get("/");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
}

#[test]
fn http_edge_cases_through_the_real_server() {
    let broker = broker(1);
    let frontend = Frontend::start(broker.base_port, &[]);
    // /job_start takes GET and POST (the dashboard's); HEAD never starts anything.
    let r = request(frontend.port, "HEAD", "/job_start?job_name=build");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, POST"));
    // A POST from another site's page is refused before anything starts.
    let r = request_with(
        frontend.port,
        "POST",
        "/job_start?job_name=build",
        &["Sec-Fetch-Site: cross-site"],
    );
    assert_eq!(r.status, 403);
    let r = request(frontend.port, "GET", "/runs/run-1/cancel");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    let r = request(frontend.port, "DELETE", "/runs/run-1");
    assert_eq!(r.status, 405);

    let r = request(frontend.port, "HEAD", "/runs/run-1");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    let r = request(frontend.port, "HEAD", "/job_start?job_name=build");
    assert_eq!(r.status, 405);

    let long = format!("/job_start?job_name=build&v={}", "a".repeat(70_000));
    let r = frontend.get(&long);
    assert_eq!(r.status, 414);
    assert!(r.json()["error"].as_str().unwrap().contains("exceeds"));

    for target in [
        "/job_start?job_name=build&d=%ff%fe",
        "/job_start?job_name=build&d=%zz",
        "/job_start?job_name=build&d=1&d=2",
        "/job_start?job_name=build&wait=forever",
    ] {
        assert_eq!(frontend.get(target).status, 400, "{target}");
    }
    let r = frontend.get("/nope");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "no such endpoint");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    // None of the refused requests reached the broker as a trigger.
    assert!(!broker
        .seen()
        .iter()
        .any(|m| matches!(m, Message::Trigger(_))));
}

#[test]
fn sigterm_stops_the_frontend_cleanly() {
    let broker = broker(1);
    let frontend = Frontend::start(broker.base_port, &[]);
    assert_eq!(frontend.get("/healthz").status, 200);
    assert!(frontend.pid() > 0);
    assert!(frontend.terminate(), "exit status after SIGTERM");
}

#[test]
fn bad_flags_exit_non_zero_with_a_reason() {
    for args in [
        &["--threads", "0"][..],
        &["--request-timeout", "soon"],
        &["--listen", "nowhere"],
        &["--broker", "host:0"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_jobz-frontend"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error"), "{args:?}: {stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_jobz-frontend"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("jobz-frontend "));
}
