//! The broker's views (`RunView`, `JobView`, `WorkerView`, `HealthView`) as the HTTP API
//! shows them: JSON objects with RFC 3339 times, and the plain-text run log.
//!
//! This is the one place that decides field names and formats of the API's answers.

use serde_json::{json, Map, Value};

use jobz::jobfile::Delivery;
use jobz::message::{
    AttemptView, BarrierView, DeadView, DurationStats, FeedEvent, HealthView, JobDayStats, JobView,
    LineageEdge, ResourceHolder, ResourceView, RunView, ScheduleView, StepView, WorkerView,
    STATS_BUCKETS_MS,
};

/// Epoch milliseconds as an RFC 3339 string.
pub fn time(ms: i64) -> Value {
    Value::String(jobz::format_time_ms(ms))
}

/// Optional epoch milliseconds as an RFC 3339 string or `null`.
pub fn opt_time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, time)
}

/// Milliseconds as a duration (`2s`, `1h 30m`).
fn duration(ms: i64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms.max(0) as u64)).to_string()
}

/// A run; `with_steps: false` leaves `steps` empty (run lists).
pub fn run(run: &RunView, with_steps: bool) -> Value {
    let steps = if with_steps {
        run.steps.iter().map(step).collect()
    } else {
        Vec::new()
    };
    json!({
        "run_id": run.run_id,
        "job": run.job,
        "params": run.params,
        "state": run.state.as_str(),
        "parent_runs": run.parent_runs,
        "child_runs": run.child_runs,
        "notify": run.notify.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "created_at": time(run.created_at_ms),
        "finished_at": opt_time(run.finished_at_ms),
        "priority": run.priority,
        "tags": run.tags,
        "tracked": run.tracked,
        "due_at": opt_time(run.not_before_ms),
        "depends_on": run.depends_on,
        "waiting_for": run.waiting_for,
        "reason": run.reason,
        "steps": steps,
        "attempts": run.attempts.iter().map(attempt).collect::<Vec<_>>(),
    })
}

/// An earlier or late attempt of a task.
pub fn attempt(a: &AttemptView) -> Value {
    json!({
        "task_id": a.task_id,
        "attempt": a.attempt,
        "worker": a.worker,
        "state": a.state.as_str(),
        "exit_code": a.exit_code,
        "error": a.error,
        "started_at": opt_time(a.started_at_ms),
        "finished_at": time(a.finished_at_ms),
        "late": a.late,
    })
}

/// One barrier key of a semaphore: what it has and what it waits for.
pub fn barrier(b: &BarrierView) -> Value {
    json!({
        "semaphore": b.semaphore,
        "key": b.key,
        "params": b.params,
        "state": b.state,
        "conditions": b.conditions.iter().map(|c| json!({
            "job": c.job, "have": c.have, "need": c.need,
        })).collect::<Vec<_>>(),
        "runs": b.runs,
        "started_run": b.started_run,
        "opened_at": time(b.opened_at_ms),
        "reporter": b.reporter,
    })
}

/// One schedule: when it fires next, the last slot it fired and the run that started.
pub fn schedule(s: &ScheduleView) -> Value {
    json!({
        "schedule": s.schedule,
        "job": s.job,
        "cron": s.cron,
        "every": s.every_ms.map(duration),
        "offset": s.offset_ms.map(duration),
        "timezone": s.timezone,
        "catch_up": s.catch_up,
        "next_fire": opt_time(s.next_fire_ms),
        "last_slot": opt_time(s.last_slot_ms),
        "last_run": s.last_run,
        "pending": s.pending,
        "settled": opt_time(s.settled_ms),
        "reporter": s.reporter,
    })
}

/// One resource: whether it exists, who wrote it, who holds it, who waits.
pub fn resource(r: &ResourceView) -> Value {
    let step = |h: &ResourceHolder| json!({ "step_id": h.step_id, "run_id": h.run_id, "job": h.job, "mode": h.mode });
    json!({
        "name": r.name,
        "exists": r.exists,
        "written_at": opt_time(r.written_at_ms),
        "expires_at": opt_time(r.expires_at_ms),
        "written_by_run": r.written_by_run,
        "written_by_job": r.written_by_job,
        "holders": r.holders.iter().map(step).collect::<Vec<_>>(),
        "waiters": r.waiters.iter().map(step).collect::<Vec<_>>(),
    })
}

/// The lineage graph as Graphviz DOT: jobs are boxes, resources ellipses, an edge for
/// each resource a job reads and each it writes. Names are quoted and escaped (a node's
/// id says what it is, so a job and a resource of the same name stay two nodes).
pub fn lineage_dot(edges: &[LineageEdge]) -> String {
    fn quoted(text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 2);
        out.push('"');
        for c in text.chars() {
            match c {
                '"' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                '\n' | '\r' => out.push(' '),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }
    let mut jobs = std::collections::BTreeSet::new();
    let mut resources = std::collections::BTreeSet::new();
    let mut lines = Vec::new();
    for edge in edges {
        let (from, to) = match edge.kind.as_str() {
            "reads" => {
                resources.insert(edge.from.as_str());
                jobs.insert(edge.to.as_str());
                (
                    format!("resource:{}", edge.from),
                    format!("job:{}", edge.to),
                )
            }
            _ => {
                jobs.insert(edge.from.as_str());
                resources.insert(edge.to.as_str());
                (
                    format!("job:{}", edge.from),
                    format!("resource:{}", edge.to),
                )
            }
        };
        lines.push(format!("  {} -> {};", quoted(&from), quoted(&to)));
    }
    let mut out = String::from("digraph jobz {\n  rankdir=LR;\n");
    for job in jobs {
        out.push_str(&format!(
            "  {} [label={}, shape=box];\n",
            quoted(&format!("job:{job}")),
            quoted(job)
        ));
    }
    for resource in resources {
        out.push_str(&format!(
            "  {} [label={}, shape=ellipse];\n",
            quoted(&format!("resource:{resource}")),
            quoted(resource)
        ));
    }
    for line in lines {
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str("}\n");
    out
}

/// A task that failed for good; `base` prefixes its `retry_url` (see `--public-url`).
pub fn dead(d: &DeadView, base: &str) -> Value {
    json!({
        "task_id": d.task_id,
        "run_id": d.run_id,
        "step_id": d.step_id,
        "job": d.job,
        "worker": d.worker,
        "params": d.params,
        "attempts": d.attempts,
        "error": d.error,
        "exit_code": d.exit_code,
        "failed_at": time(d.failed_at_ms),
        "retried_as": d.retried_as,
        "retry_url": format!("{base}/dead/{}/retry", d.task_id),
    })
}

/// One event of the feed (`GET /events`): what happened, to which run and task, and the
/// states after it.
pub fn feed_event(event: &FeedEvent) -> Value {
    let task = event.task.as_ref().map(|t| {
        json!({
            "step_id": t.step_id,
            "task_id": t.task_id,
            "job": t.job,
            "attempt": t.attempt,
            "worker": t.worker,
            "state": t.state.as_str(),
        })
    });
    json!({
        "id": event.seq,
        "kind": event.kind.as_str(),
        "at": time(event.at_ms),
        "run_id": event.run_id,
        "job": event.job,
        "run_state": event.run_state.as_str(),
        "tags": event.tags,
        "tracked": event.tracked,
        "task": task,
    })
}

/// A job's statistics per day (`GET /stats`): qless's count, mean, standard deviation and
/// histogram of wait and run times, and failures.
pub fn job_stats(job: &str, since_ms: i64, days: &[JobDayStats]) -> Value {
    let durations = |d: &DurationStats| {
        json!({
            "count": d.count,
            "mean_ms": (d.mean_ms * 10.0).round() / 10.0,
            "std_dev_ms": (d.std_dev_ms * 10.0).round() / 10.0,
            "histogram": d.histogram,
        })
    };
    let days: Vec<Value> = days
        .iter()
        .map(|d| {
            json!({
                "day": jobz::format_time_ms(d.day_ms).get(..10).unwrap_or_default(),
                "count": d.count,
                "failed": d.failed,
                "wait": durations(&d.wait),
                "run": durations(&d.run),
            })
        })
        .collect();
    json!({
        "job": job,
        "since": time(since_ms),
        "buckets_ms": STATS_BUCKETS_MS,
        "days": days,
    })
}

/// One task of a run. Its output is not included: it is served by `/runs/{id}/log`.
pub fn step(step: &StepView) -> Value {
    json!({
        "step_id": step.step_id,
        "task_id": step.task_id,
        "job": step.job,
        "worker": step.worker,
        "state": step.state.as_str(),
        "attempt": step.attempt,
        "exit_code": step.exit_code,
        "error": step.error,
        "started_at": opt_time(step.started_at_ms),
        "finished_at": opt_time(step.finished_at_ms),
    })
}

/// The lower-case name of a delivery mode, as in job files.
pub fn delivery_name(delivery: Delivery) -> &'static str {
    match delivery {
        Delivery::Broadcast => "broadcast",
        Delivery::Queue => "queue",
        Delivery::Local => "local",
    }
}

/// A job with the workers that serve it.
pub fn job(job: &JobView) -> Value {
    let spec = &job.spec;
    let params: Map<String, Value> = spec
        .params
        .iter()
        .map(|(name, p)| {
            (
                name.clone(),
                json!({ "required": p.required, "pattern": p.pattern }),
            )
        })
        .collect();
    json!({
        "name": spec.name,
        "description": spec.description,
        "command": spec.command,
        "params": params,
        "on_success": spec.on_success,
        "on_failure": spec.on_failure,
        "delivery": delivery_name(spec.delivery),
        "timeout_ms": spec.timeout_ms,
        "retries": spec.retries,
        "tags": spec.tags,
        "workers": job.workers,
    })
}

/// A worker.
pub fn worker(worker: &WorkerView) -> Value {
    json!({
        "name": worker.name,
        "jobs": worker.jobs,
        "capabilities": worker.capabilities,
        "slots": worker.slots,
        "running": worker.running,
        "last_seen": time(worker.last_seen_ms),
        "live": worker.live,
        "state": if worker.live {
            "live"
        } else if worker.leaving {
            "leaving"
        } else {
            "lost"
        },
        "version": worker.version,
        "counters": worker.counters,
    })
}

/// The broker's health, as `/healthz` reports it.
pub fn health(health: &HealthView) -> Value {
    json!({
        "version": health.version,
        "instance": health.instance,
        "active_runs": health.active_runs,
        "live_workers": health.live_workers,
        "counters": health.counters,
    })
}

/// `{"error": message}` plus extra fields.
pub fn error(message: &str, extra: &[(&str, Value)]) -> Value {
    let mut object = Map::new();
    object.insert("error".into(), Value::String(message.to_owned()));
    for (key, value) in extra {
        object.insert((*key).to_owned(), value.clone());
    }
    Value::Object(object)
}

/// The log lines of one task: each line of its output prefixed by `[<worker> <job>] `.
/// A task without a worker yet shows `-`. The last line always ends with a newline.
pub fn task_log(step: &StepView) -> String {
    prefixed_lines(step.worker.as_deref(), &step.job, &step.output_tail)
}

/// `text`'s lines, each prefixed `[worker job] `.
pub fn prefixed_lines(worker: Option<&str>, job: &str, text: &str) -> String {
    let prefix = format!("[{} {job}] ", worker.unwrap_or("-"));
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(&prefix);
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The whole run's log: every task's output in the order the tasks were created, each
/// task's earlier attempts (the tails their workers reported) before its current one.
pub fn run_log(run: &RunView) -> String {
    let mut out = String::new();
    for step in &run.steps {
        for earlier in run
            .attempts
            .iter()
            .filter(|a| a.task_id == step.task_id && a.attempt < step.attempt && !a.late)
        {
            out.push_str(&prefixed_lines(
                earlier.worker.as_deref(),
                &step.job,
                &earlier.output_tail,
            ));
        }
        out.push_str(&task_log(step));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_lineage_graph_quotes_every_name_and_keeps_jobs_apart_from_resources() {
        use jobz::message::LineageEdge;
        let edge = |from: &str, to: &str, kind: &str| LineageEdge {
            from: from.into(),
            to: to.into(),
            kind: kind.into(),
        };
        let dot = lineage_dot(&[edge("a\"b", "x", "reads"), edge("x", "x", "writes")]);
        assert!(dot.contains(r#""resource:a\"b" -> "job:x";"#), "{dot}");
        assert!(dot.contains(r#""job:x" -> "resource:x";"#), "{dot}");
        assert!(dot.contains(r#""job:x" [label="x", shape=box];"#), "{dot}");
        assert!(
            dot.contains(r#""resource:x" [label="x", shape=ellipse];"#),
            "{dot}"
        );
        assert!(dot.ends_with("}\n"));
    }

    use std::collections::BTreeMap;

    use jobz::jobfile::{JobSpec, ParamSpec};
    use jobz::message::{RunState, TaskState};

    use super::*;

    pub(crate) fn sample_step() -> StepView {
        StepView {
            step_id: "s1".into(),
            task_id: "t1".into(),
            job: "build".into(),
            worker: Some("web1".into()),
            state: TaskState::Succeeded,
            attempt: 1,
            exit_code: Some(0),
            error: None,
            started_at_ms: Some(1_000),
            finished_at_ms: Some(2_500),
            output_tail: "line one\nline two\n".into(),
        }
    }

    fn sample_run() -> RunView {
        RunView {
            run_id: "r1".into(),
            job: "build".into(),
            params: BTreeMap::from([("date".into(), "2026_01_02".into())]),
            state: RunState::Running,
            parent_runs: vec!["p0".into()],
            created_at_ms: 0,
            finished_at_ms: None,
            steps: vec![
                sample_step(),
                StepView {
                    task_id: "t2".into(),
                    worker: None,
                    state: TaskState::Pending,
                    exit_code: None,
                    started_at_ms: None,
                    finished_at_ms: None,
                    output_tail: String::new(),
                    ..sample_step()
                },
            ],
            attempts: vec![],
            ..Default::default()
        }
    }

    #[test]
    fn run_has_every_field_with_rfc3339_times() {
        let v = run(&sample_run(), true);
        assert_eq!(
            v,
            json!({
                "run_id": "r1",
                "job": "build",
                "params": {"date": "2026_01_02"},
                "state": "running",
                "parent_runs": ["p0"],
                "child_runs": [],
                "notify": [],
                "created_at": "1970-01-01T00:00:00.000Z",
                "finished_at": null,
                "priority": 0,
                "tags": [],
                "tracked": false,
                "due_at": null,
                "depends_on": [],
                "waiting_for": [],
                "reason": null,
                "steps": [
                    {
                        "step_id": "s1", "task_id": "t1", "job": "build", "worker": "web1",
                        "state": "succeeded", "attempt": 1, "exit_code": 0, "error": null,
                        "started_at": "1970-01-01T00:00:01.000Z",
                        "finished_at": "1970-01-01T00:00:02.500Z"
                    },
                    {
                        "step_id": "s1", "task_id": "t2", "job": "build", "worker": null,
                        "state": "pending", "attempt": 1, "exit_code": null, "error": null,
                        "started_at": null, "finished_at": null
                    }
                ],
                "attempts": []
            })
        );
    }

    #[test]
    fn a_held_run_shows_when_it_is_due_and_what_it_waits_for() {
        let held = RunView {
            state: jobz::message::RunState::Waiting,
            priority: -2,
            tags: vec!["etl".into()],
            tracked: true,
            not_before_ms: Some(1_500),
            depends_on: vec!["r0".into(), "r9".into()],
            waiting_for: vec!["r9".into()],
            reason: None,
            ..sample_run()
        };
        let v = run(&held, false);
        assert_eq!(v["state"], "waiting");
        assert_eq!(v["priority"], -2);
        assert_eq!(v["tags"], json!(["etl"]));
        assert_eq!(v["tracked"], true);
        assert_eq!(v["due_at"], "1970-01-01T00:00:01.500Z");
        assert_eq!(v["waiting_for"], json!(["r9"]));
    }

    #[test]
    fn run_list_entries_have_no_steps() {
        assert_eq!(run(&sample_run(), false)["steps"], json!([]));
    }

    #[test]
    fn job_shows_its_spec_and_workers() {
        let view = JobView {
            spec: JobSpec {
                name: "import".into(),
                description: "nightly".into(),
                command: "/opt/import.sh {date}".into(),
                params: BTreeMap::from([(
                    "date".into(),
                    ParamSpec {
                        required: true,
                        pattern: "^[0-9]+$".into(),
                    },
                )]),
                on_success: vec!["reindex".into()],
                on_failure: vec![],
                delivery: Delivery::Queue,
                timeout_ms: Some(60_000),
                retries: 2,
                retry_backoff_ms: 10_000,
                tags: vec!["etl".into()],
                run_as: None,
                priority: 0,
                max_concurrency: None,
                inputs: vec![],
                outputs: vec![],
                output_ttl_ms: None,
                notify: vec![],
            },
            workers: vec!["w1".into(), "w2".into()],
        };
        assert_eq!(
            job(&view),
            json!({
                "name": "import", "description": "nightly", "command": "/opt/import.sh {date}",
                "params": {"date": {"required": true, "pattern": "^[0-9]+$"}},
                "on_success": ["reindex"], "on_failure": [], "delivery": "queue",
                "timeout_ms": 60000, "retries": 2, "tags": ["etl"], "workers": ["w1", "w2"]
            })
        );
    }

    #[test]
    fn worker_shows_last_seen_as_time() {
        let view = WorkerView {
            name: "w1".into(),
            jobs: vec!["build".into()],
            capabilities: vec!["gpu".into()],
            slots: 4,
            running: 1,
            last_seen_ms: 1_700_000_000_000,
            live: true,
            version: "0.0.0".into(),
            counters: [("output_files_pruned".to_string(), 3)].into(),
            leaving: false,
        };
        assert_eq!(
            worker(&view),
            json!({
                "name": "w1", "jobs": ["build"], "capabilities": ["gpu"], "slots": 4,
                "running": 1, "last_seen": "2023-11-14T22:13:20.000Z", "live": true,
                "state": "live", "version": "0.0.0", "counters": {"output_files_pruned": 3}
            })
        );
    }

    #[test]
    fn error_object_carries_extra_fields() {
        assert_eq!(
            error("unknown job", &[("job", json!("x"))]),
            json!({"error": "unknown job", "job": "x"})
        );
    }

    #[test]
    fn log_prefixes_every_line_with_worker_and_job() {
        let mut r = sample_run();
        r.steps[1].output_tail = "no newline at end".into();
        assert_eq!(
            run_log(&r),
            "[web1 build] line one\n[web1 build] line two\n[- build] no newline at end\n"
        );
    }

    #[test]
    fn log_of_a_crlf_output_has_no_stray_carriage_returns() {
        let mut s = sample_step();
        s.output_tail = "a\r\nb\r\n".into();
        assert_eq!(task_log(&s), "[web1 build] a\n[web1 build] b\n");
    }
}
