//! Writes real encoded envelopes as seeds for the `envelope_decode` fuzz target:
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example envelope_seeds -- fuzz/corpus/envelope_decode
//! ```
//!
//! The seeds are committed (a few hundred bytes each); rerun this when the wire format
//! changes so the fuzzer starts from frames the current code accepts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use jobz::envelope::{encode, Envelope};
use jobz::message::{
    Assignment, Message, Role, TaskFinished, TaskOutcome, TaskRef, TriggerRequest, Work,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: envelope_seeds DIR")?);
    std::fs::create_dir_all(&dir)?;
    let params = BTreeMap::from([("date".to_owned(), "2026_11_23".to_owned())]);
    let task = TaskRef {
        task_id: "0190a1b2-task".to_owned(),
        attempt: 1,
    };
    let bodies = [
        ("hello", Message::Hello { role: Role::Worker }),
        (
            "trigger",
            Message::Trigger(TriggerRequest {
                job: "import_category_dump".to_owned(),
                params: params.clone(),
                parent_runs: vec!["0190a1b2-run".to_owned()],
            }),
        ),
        (
            "work",
            Message::Work(Work {
                run_id: "0190a1b2-run".to_owned(),
                step_id: "0190a1b2-step".to_owned(),
                job: "reindex".to_owned(),
                params,
                assignments: vec![Assignment {
                    worker: "search1".to_owned(),
                    task: task.clone(),
                }],
            }),
        ),
        (
            "finished",
            Message::TaskFinished(TaskFinished {
                task,
                worker: "search1".to_owned(),
                outcome: TaskOutcome::Failed,
                exit_code: Some(2),
                error: Some("exit status 2".to_owned()),
                started_at_ms: 1_790_000_000_000,
                finished_at_ms: 1_790_000_001_234,
                output_tail: "line 1\nline 2\n".to_owned(),
            }),
        ),
        (
            "retry_dead",
            Message::RetryDead {
                task_id: "0190a1b2-task".to_owned(),
            },
        ),
    ];
    for (name, body) in bodies {
        let frame = encode(&Envelope::new("worker:search1", body))?;
        std::fs::write(dir.join(format!("seed-{name}")), frame)?;
    }
    Ok(())
}
