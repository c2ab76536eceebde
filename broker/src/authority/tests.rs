use super::*;
use jobz::message::{
    Assignment, BarrierView, CancelWork, Completion, Event, Query, Reply, ReplyBody, ScheduleView,
    TaskFinished, TaskOutcome, TaskOutput, TaskRef, TaskStarted, TaskState, TriggerRequest, Work,
    WorkerStatus,
};

const ROLES: [Role; 4] = [Role::Worker, Role::Frontend, Role::Semaphore, Role::Client];

/// The table as the issue states it, written out (not derived from [`may_send`]):
/// worker, frontend, semaphore, client.
const EXPECTED: [(&str, [bool; 4]); 18] = [
    ("Hello", [true, true, true, true]),
    ("Heartbeat", [true, false, false, false]),
    ("Trigger", [false, true, true, false]),
    ("TaskStarted", [true, false, false, false]),
    ("TaskFinished", [true, false, false, false]),
    ("TaskOutput", [true, false, false, false]),
    ("Query", [false, true, true, true]),
    ("SemaphoreStatus", [false, false, true, false]),
    ("RetryDead", [false, true, false, false]),
    ("CancelRun", [false, true, false, false]),
    ("PrioritizeRun", [false, true, false, false]),
    ("TrackRun", [false, true, false, false]),
    ("ControlResource", [false, true, false, false]),
    ("ForgetWorker", [false, true, false, false]),
    ("Reply", [false, false, false, false]),
    ("Work", [false, false, false, false]),
    ("CancelWork", [false, false, false, false]),
    ("Event", [false, false, false, false]),
];

/// A sender id of each role, as the real nodes build them.
fn sender_of(role: Role) -> &'static str {
    match role {
        Role::Worker => "worker:w1",
        Role::Frontend => "frontend:f1/0190aa",
        Role::Semaphore => "semaphore:s1/1a2b3c4d",
        Role::Client => "client:c1",
    }
}

fn task() -> TaskRef {
    TaskRef {
        task_id: "t1".into(),
        attempt: 1,
    }
}

fn status(name: &str) -> WorkerStatus {
    WorkerStatus {
        name: name.into(),
        instance: "i1".into(),
        jobs: vec![],
        capabilities: vec![],
        slots: 1,
        running: vec![],
        version: "t".into(),
        counters: Default::default(),
        leaving: false,
    }
}

fn started(worker: &str) -> TaskStarted {
    TaskStarted {
        task: task(),
        worker: worker.into(),
        instance: "i1".into(),
        started_at_ms: 0,
    }
}

fn output(worker: &str) -> TaskOutput {
    TaskOutput {
        task: task(),
        worker: worker.into(),
        offset: 0,
        bytes: 4,
        text: "out\n".into(),
        capped: false,
    }
}

fn finished(worker: &str) -> TaskFinished {
    TaskFinished {
        task: task(),
        worker: worker.into(),
        outcome: TaskOutcome::Succeeded,
        exit_code: Some(0),
        error: None,
        started_at_ms: 0,
        finished_at_ms: 0,
        output_tail: String::new(),
    }
}

fn barrier(reporter: &str) -> BarrierView {
    BarrierView {
        semaphore: "nightly".into(),
        key: "2026-11-23".into(),
        params: Default::default(),
        conditions: vec![],
        state: "waiting".into(),
        runs: vec![],
        started_run: None,
        opened_at_ms: 0,
        reporter: reporter.into(),
    }
}

fn schedule(reporter: &str) -> ScheduleView {
    ScheduleView {
        schedule: "tick".into(),
        job: "ledger".into(),
        cron: Some("@hourly".into()),
        every_ms: None,
        offset_ms: None,
        timezone: "UTC".into(),
        catch_up: "none".into(),
        next_fire_ms: None,
        last_slot_ms: None,
        last_run: None,
        pending: 0,
        settled_ms: None,
        reporter: reporter.into(),
    }
}

/// One message of every type, its names filled in as `sender` would fill them honestly.
fn every_message(sender: &str, role: Role) -> Vec<Message> {
    let name = principal_of(sender).split_once(':').unwrap().1;
    vec![
        Message::Hello { role },
        Message::Heartbeat(status(name)),
        Message::Trigger(TriggerRequest {
            job: "a".into(),
            ..Default::default()
        }),
        Message::TaskStarted(started(name)),
        Message::TaskFinished(finished(name)),
        Message::TaskOutput(output(name)),
        Message::Query(Query::Health),
        Message::SemaphoreStatus {
            barriers: vec![barrier(sender)],
            schedules: vec![schedule(sender)],
        },
        Message::RetryDead {
            task_id: "t1".into(),
        },
        Message::CancelRun {
            run_id: "r1".into(),
            force: true,
        },
        Message::PrioritizeRun {
            run_id: "r1".into(),
            priority: 5,
        },
        Message::TrackRun {
            run_id: "r1".into(),
            tracked: true,
            notify: vec![],
        },
        Message::ControlResource {
            name: "db".into(),
            action: jobz::message::ResourceAction::Create,
        },
        Message::ForgetWorker { name: "w9".into() },
        Message::Reply(Reply {
            in_reply_to: "m1".into(),
            body: ReplyBody::Ack,
        }),
        Message::Work(Work {
            run_id: "r1".into(),
            step_id: "s1".into(),
            job: "a".into(),
            params: Default::default(),
            assignments: vec![],
        }),
        Message::CancelWork(CancelWork {
            run_id: "r1".into(),
            step_id: "s1".into(),
            job: "a".into(),
            assignments: vec![Assignment {
                worker: name.into(),
                task: task(),
            }],
        }),
        Message::Event(Event::TaskFinished(Completion {
            run_id: "r1".into(),
            step_id: "s1".into(),
            task: task(),
            job: "a".into(),
            worker: name.into(),
            params: Default::default(),
            state: TaskState::Succeeded,
            finished_at_ms: 0,
            fanout: 1,
        })),
    ]
}

fn envelope(sender: &str, body: Message) -> Envelope {
    Envelope {
        id: jobz::new_id(),
        sender: sender.into(),
        sent_at_ms: 0,
        body,
    }
}

#[test]
fn every_message_type_is_accepted_from_exactly_the_roles_allowed_to_send_it() {
    for (column, role) in ROLES.into_iter().enumerate() {
        let sender = sender_of(role);
        let messages = every_message(sender, role);
        let names: Vec<&str> = messages.iter().map(message_name).collect();
        let expected_names: Vec<&str> = EXPECTED.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, expected_names, "one sample per message type");
        for (message, (name, allowed)) in messages.into_iter().zip(EXPECTED) {
            let result = authorize(&envelope(sender, message));
            if allowed[column] {
                let principal = result.unwrap_or_else(|r| panic!("{name} from {sender}: {r}"));
                assert_eq!(principal.role(), role);
                assert_eq!(principal.to_string(), principal_of(sender));
            } else {
                match result {
                    Err(Refusal::WrongRole { .. }) => {}
                    other => panic!("{name} from {sender} must be wrong_role, got {other:?}"),
                }
            }
        }
    }
}

#[test]
fn a_worker_reports_and_registers_only_under_its_own_name() {
    let forged = [
        ("worker name", Message::Heartbeat(status("w2"))),
        ("worker", Message::TaskStarted(started("w2"))),
        ("worker", Message::TaskFinished(finished("w2"))),
        ("worker", Message::TaskOutput(output("w2"))),
        // A prefix or suffix of the own name is another name.
        ("worker name", Message::Heartbeat(status("w"))),
        ("worker", Message::TaskFinished(finished("w1 "))),
        ("worker", Message::TaskFinished(finished(""))),
    ];
    for (field, message) in forged {
        let refusal = authorize(&envelope("worker:w1", message)).unwrap_err();
        assert_eq!(refusal.reason(), "name_mismatch", "{refusal}");
        assert!(
            matches!(&refusal, Refusal::NameMismatch { field: f, principal, .. } if *f == field && principal == "worker:w1"),
            "{refusal:?}"
        );
    }
    // The principal is what counts, not the whole sender id.
    assert!(authorize(&envelope("worker:w1/2", Message::Heartbeat(status("w1")))).is_ok());
}

#[test]
fn a_semaphore_reports_only_barriers_it_reports_itself() {
    let own = "semaphore:s1/aaaa";
    let ok = Message::SemaphoreStatus {
        barriers: vec![barrier(own), barrier(own)],
        schedules: vec![schedule(own)],
    };
    assert!(authorize(&envelope(own, ok)).is_ok());
    for other in ["semaphore:s1/bbbb", "semaphore:s2/aaaa", ""] {
        let forged = Message::SemaphoreStatus {
            barriers: vec![barrier(own), barrier(other)],
            schedules: vec![],
        };
        let refusal = authorize(&envelope(own, forged)).unwrap_err();
        assert_eq!(refusal.reason(), "name_mismatch", "{other:?}: {refusal}");
        let forged = Message::SemaphoreStatus {
            barriers: vec![barrier(own)],
            schedules: vec![schedule(own), schedule(other)],
        };
        let refusal = authorize(&envelope(own, forged)).unwrap_err();
        assert_eq!(refusal.reason(), "name_mismatch", "{other:?}: {refusal}");
        assert!(
            refusal.to_string().contains("schedule reporter"),
            "{refusal}"
        );
    }
}

#[test]
fn only_a_semaphore_may_report_schedules() {
    for sender in ["worker:w1", "frontend:f1/x", "client:c1"] {
        let status = Message::SemaphoreStatus {
            barriers: vec![],
            schedules: vec![schedule(sender)],
        };
        let refusal = authorize(&envelope(sender, status)).unwrap_err();
        assert_eq!(refusal.reason(), "wrong_role", "{sender}: {refusal}");
    }
}

#[test]
fn a_hello_must_claim_the_senders_own_role() {
    for sender_role in ROLES {
        for claimed in ROLES {
            let result = authorize(&envelope(
                sender_of(sender_role),
                Message::Hello { role: claimed },
            ));
            if sender_role == claimed {
                assert!(result.is_ok(), "{sender_role:?}");
            } else {
                assert_eq!(
                    result.unwrap_err().reason(),
                    "wrong_role",
                    "{sender_role:?} claiming {claimed:?}"
                );
            }
        }
    }
}

#[test]
fn malformed_sender_ids_and_message_ids_are_refused() {
    let hello = || Message::Hello { role: Role::Worker };
    let long_name = format!("worker:{}", "a".repeat(129));
    let long_id = format!("worker:w1/{}", "a".repeat(200));
    for sender in [
        "",
        "w1",
        "worker",
        "worker:",
        ":w1",
        "broker",
        "admin:w1",
        "Worker:w1",
        "worker:w 1",
        "worker:w1\0",
        "worker:w\u{e9}",
        "worker:a:b",
        "worker:/x",
        long_name.as_str(),
        long_id.as_str(),
    ] {
        let refusal = authorize(&envelope(sender, hello())).unwrap_err();
        assert_eq!(refusal.reason(), "bad_sender", "{sender:?}");
    }
    for id in [
        String::new(),
        "a b".into(),
        "x".repeat(MAX_MESSAGE_ID_BYTES + 1),
    ] {
        let mut env = envelope("worker:w1", hello());
        env.id = id;
        assert_eq!(authorize(&env).unwrap_err().reason(), "bad_message_id");
    }
    // The longest trigger id a semaphore makes fits.
    let mut env = envelope(
        "semaphore:s1/x",
        Message::Hello {
            role: Role::Semaphore,
        },
    );
    env.id = format!("sem-{}-timeout-{:032x}", "s".repeat(128), u128::MAX);
    assert!(authorize(&env).is_ok());
}

#[test]
fn refusals_name_the_sender_and_what_it_claimed_briefly() {
    let forged = Message::TaskFinished(finished(&"x".repeat(10_000)));
    let refusal = authorize(&envelope("worker:w1", forged)).unwrap_err();
    let text = refusal.to_string();
    assert!(
        text.starts_with("worker:w1 sent a message whose worker is"),
        "{text}"
    );
    assert!(text.len() < 200, "{text}");
    let refusal =
        authorize(&envelope("frontend:f1/x", Message::Heartbeat(status("f1")))).unwrap_err();
    assert_eq!(refusal.to_string(), "frontend:f1 may not send Heartbeat");
}
