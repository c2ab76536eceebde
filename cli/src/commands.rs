//! Each command: its requests, what it prints, and its exit code.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::args::{Cli, Command};
use crate::client::{segment, Answer, Client, Failure};
use crate::{exit, render};

/// The longest single `wait=` the frontend takes; a longer wait asks again with the same
/// idempotency key (the same run).
const WAIT_CHUNK_SECS: f64 = 3600.0;

/// A trigger that found the frontend unreachable or its broker down is sent again this
/// many times, a second apart (with its idempotency key: never a second run).
const TRIGGER_ATTEMPTS: u32 = 3;

/// Runs `cli`'s command against `client`, printing to `out`; returns the exit code.
pub fn run(cli: &Cli, client: &Client, out: &mut dyn Write) -> Result<i32, Failure> {
    let json = cli.json;
    match &cli.command {
        Command::Start {
            job,
            params,
            wait,
            priority,
            delay,
            at,
            depends,
            tags,
            idempotency_key,
        } => {
            let mut query = vec![("job_name".to_owned(), job.clone())];
            for param in params {
                let (name, value) = param.split_once('=').ok_or_else(|| {
                    Failure::refused(format!("parameter {param:?}: give NAME=VALUE"))
                })?;
                if name.is_empty() {
                    return Err(Failure::refused(format!("parameter {param:?}: no name")));
                }
                query.push((name.to_owned(), value.to_owned()));
            }
            let option = |name: &str, value: Option<String>| value.map(|v| (name.to_owned(), v));
            query.extend(option("priority", priority.map(|p| p.to_string())));
            query.extend(option("delay", delay.clone()));
            query.extend(option("at", at.clone()));
            if !depends.is_empty() {
                query.push(("depends".to_owned(), depends.join(",")));
            }
            if !tags.is_empty() {
                query.push(("tags".to_owned(), tags.join(",")));
            }
            let key = idempotency_key.clone().unwrap_or_else(fresh_key);
            query.push(("idempotency_key".to_owned(), key));
            start(client, query, *wait, json, out)
        }
        Command::Runs {
            job,
            state,
            tag,
            limit,
        } => {
            let mut query: Vec<(&str, String)> = Vec::new();
            query.extend(job.clone().map(|v| ("job", v)));
            query.extend(state.clone().map(|v| ("state", v)));
            query.extend(tag.clone().map(|v| ("tag", v)));
            query.extend(limit.map(|v| ("limit", v.to_string())));
            let body = ok_json(client.get("/runs", &query)?)?;
            print(out, json, &body, render::runs)
        }
        Command::Show { run } => {
            let body = ok_json(client.get::<&str>(&format!("/runs/{}", segment(run)), &[])?)?;
            print(out, json, &body, render::run)
        }
        Command::Log { run, follow } => {
            let query: Vec<(&str, String)> = if *follow {
                vec![("follow", "1".to_owned())]
            } else {
                Vec::new()
            };
            client.stream(&format!("/runs/{}/log", segment(run)), &query, out)?;
            Ok(exit::OK)
        }
        Command::Retry { task } => {
            let answer = client.get::<&str>(&format!("/dead/{}/retry", segment(task)), &[])?;
            let body = ok_json(answer)?;
            print(out, json, &body, |b| {
                format!("run {} started\n", render::cell(&b["run_id"]))
            })
        }
        Command::Dead => {
            let body = ok_json(client.get::<&str>("/dead", &[])?)?;
            print(out, json, &body, render::dead)
        }
        Command::Cancel { run, force } => {
            let query: Vec<(&str, String)> = if *force {
                vec![("force", "1".to_owned())]
            } else {
                Vec::new()
            };
            let body = ok_json(client.post(&format!("/runs/{}/cancel", segment(run)), &query)?)?;
            print(out, json, &body, |b| {
                format!(
                    "run {} {}\n",
                    render::cell(&b["run_id"]),
                    render::cell(&b["state"])
                )
            })
        }
        Command::Workers => {
            let body = ok_json(client.get::<&str>("/workers", &[])?)?;
            print(out, json, &body, render::workers)
        }
        Command::Jobs => {
            let body = ok_json(client.get::<&str>("/jobs", &[])?)?;
            print(out, json, &body, render::jobs)
        }
    }
}

/// `jobz start`: the trigger, sent again while unreachable; with a wait, asked again (same
/// key, same run) until the run ends or the wait runs out.
fn start(
    client: &Client,
    mut query: Vec<(String, String)>,
    wait: Option<Option<f64>>,
    json: bool,
    out: &mut dyn Write,
) -> Result<i32, Failure> {
    let deadline = match wait {
        Some(Some(secs)) if !(secs.is_finite() && secs >= 0.0) => {
            return Err(Failure::refused(format!("--wait {secs}: give seconds")));
        }
        Some(Some(secs)) => Some(Instant::now() + Duration::from_secs_f64(secs)),
        _ => None,
    };
    query.push(("wait".to_owned(), String::new()));
    loop {
        let chunk = match (wait, deadline) {
            (None, _) => 0.0,
            (Some(_), Some(deadline)) => deadline
                .saturating_duration_since(Instant::now())
                .as_secs_f64()
                .min(WAIT_CHUNK_SECS),
            (Some(_), None) => WAIT_CHUNK_SECS,
        };
        if let Some(last) = query.last_mut() {
            last.1 = format!("{chunk:.3}");
        }
        let answer = trigger(client, &query)?;
        let body = ok_json(answer.clone())?;
        let ended = answer.status == 200;
        let timed_out = wait.is_some() && !ended && deadline.is_some_and(|d| Instant::now() >= d);
        if wait.is_some() && !ended && !timed_out {
            continue; // the same key: the same run, waited for again
        }
        if json {
            writeln_json(out, &body)?;
        } else if ended {
            write_text(out, &render::run(&body))?;
        } else {
            write_text(
                out,
                &format!(
                    "run {} accepted ({})\n",
                    render::cell(&body["run_id"]),
                    render::cell(&body["job"])
                ),
            )?;
        }
        return Ok(match (ended, body["state"].as_str()) {
            (true, Some("succeeded")) => exit::OK,
            (true, _) => exit::RUN_FAILED,
            (false, _) if wait.is_some() => exit::STILL_RUNNING,
            (false, _) => exit::OK,
        });
    }
}

/// One trigger, sent again (same key) while the frontend is unreachable or its broker is.
fn trigger(client: &Client, query: &[(String, String)]) -> Result<Answer, Failure> {
    let mut attempt = 1;
    loop {
        let result = client.get("/job_start", query);
        let retry = match &result {
            Err(f) => f.code == exit::UNAVAILABLE,
            Ok(a) => a.status == 503,
        };
        if !retry || attempt >= TRIGGER_ATTEMPTS {
            return result;
        }
        attempt += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A 2xx answer's JSON, or the failure its status stands for.
fn ok_json(answer: Answer) -> Result<Value, Failure> {
    if !(200..300).contains(&answer.status) {
        return Err(Failure::from_status(answer.status, &answer.body));
    }
    serde_json::from_str(&answer.body).map_err(|e| {
        Failure::unavailable(format!(
            "the frontend answered {} with no JSON: {e}",
            answer.status
        ))
    })
}

fn print(
    out: &mut dyn Write,
    json: bool,
    body: &Value,
    human: impl Fn(&Value) -> String,
) -> Result<i32, Failure> {
    if json {
        writeln_json(out, body)?;
    } else {
        write_text(out, &human(body))?;
    }
    Ok(exit::OK)
}

fn writeln_json(out: &mut dyn Write, body: &Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(body).unwrap_or_else(|_| body.to_string());
    write_text(out, &format!("{text}\n"))
}

fn write_text(out: &mut dyn Write, text: &str) -> Result<(), Failure> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::unavailable(format!("writing the output: {e}")))
}

/// A key for one `jobz start`: unique enough across hosts and processes (time, pid, and
/// the address of a fresh allocation), and valid for the frontend.
fn fresh_key() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let marker = Box::new(0u8);
    format!(
        "jobz-cli-{nanos:x}-{:x}-{:x}",
        std::process::id(),
        &*marker as *const u8 as usize
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_keys_differ_and_are_valid_idempotency_keys() {
        let (a, b) = (fresh_key(), fresh_key());
        assert_ne!(a, b);
        for key in [a, b] {
            assert!(key.len() <= 128);
            assert!(key
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._:@/+=-".contains(&c)));
        }
    }

    #[test]
    fn a_non_2xx_answer_is_a_failure_with_its_code() {
        let answer = Answer {
            status: 404,
            body: r#"{"error":"unknown job \"x\""}"#.into(),
        };
        let failure = ok_json(answer).unwrap_err();
        assert_eq!(failure.code, exit::REFUSED);
        assert!(failure.message.contains("unknown job"), "{failure:?}");
    }
}
