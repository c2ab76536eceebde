//! What the journal pruned from the store (see `store::Retention`): counted, and forgotten
//! by the dead list, so `/dead` lists only what the store still holds and can retry.

use super::Engine;
use crate::ids::TaskId;

impl Engine {
    /// The store pruned `runs` finished runs, and with them `dead_tasks`. Called with
    /// nothing at start, so the counters show from the first scrape.
    pub fn note_pruned(&mut self, runs: u64, dead_tasks: &[TaskId]) {
        for (name, n) in [
            ("runs_pruned", runs),
            ("dead_tasks_pruned", dead_tasks.len() as u64),
        ] {
            *self.counters.entry(name.to_owned()).or_default() += n;
        }
        self.dead.forget(dead_tasks);
    }
}

#[cfg(test)]
mod tests {
    use jobz::envelope::Envelope;
    use jobz::message::{Message, Query, ReplyBody};

    use super::super::tests::config;
    use super::super::Snapshot;
    use super::*;
    use crate::ids::SequentialIds;
    use crate::model::Dead;

    fn dead(task: &str, at: i64) -> Dead {
        Dead {
            task_id: task.into(),
            run_id: format!("run-of-{task}").into(),
            step_id: "s".into(),
            job: "a".into(),
            worker: None,
            params: Default::default(),
            attempts: 1,
            error: None,
            exit_code: Some(1),
            failed_at_ms: at,
            retried_as: None,
        }
    }

    fn engine(dead: Vec<Dead>) -> Engine {
        let snapshot = Snapshot {
            dead,
            ..Snapshot::default()
        };
        Engine::restore(config(), snapshot, Box::new(SequentialIds::default()), 0)
    }

    /// The engine's answer to `body` from the frontend.
    fn ask(engine: &mut Engine, body: Message) -> ReplyBody {
        let env = Envelope {
            id: jobz::new_id(),
            sender: "frontend:x".into(),
            sent_at_ms: 0,
            body,
        };
        let from = crate::authority::authorize(&env).unwrap();
        let fx = engine.on_envelope(env, &from, 1_000);
        match fx.publish.into_iter().next().map(|p| p.body) {
            Some(Message::Reply(reply)) => reply.body,
            other => panic!("no reply: {other:?}"),
        }
    }

    fn listed(engine: &mut Engine) -> Vec<String> {
        match ask(engine, Message::Query(Query::Dead { limit: 100 })) {
            ReplyBody::Dead(views) => views.into_iter().map(|d| d.task_id).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pruned_dead_tasks_are_neither_listed_nor_retried_and_are_counted() {
        let mut engine = engine(vec![dead("d1", 1), dead("d2", 2), dead("d3", 3)]);
        engine.note_pruned(0, &[]);
        let counters = engine.health().counters;
        assert_eq!(counters.get("runs_pruned"), Some(&0));
        assert_eq!(counters.get("dead_tasks_pruned"), Some(&0));

        engine.note_pruned(7, &["d1".into(), "d3".into(), "unknown".into()]);
        assert_eq!(listed(&mut engine), ["d2"]);
        let retry = ask(
            &mut engine,
            Message::RetryDead {
                task_id: "d1".into(),
            },
        );
        assert!(
            matches!(retry, ReplyBody::Rejected { status: 404, .. }),
            "{retry:?}"
        );
        let counters = engine.health().counters;
        assert_eq!(counters.get("runs_pruned"), Some(&7));
        assert_eq!(counters.get("dead_tasks_pruned"), Some(&3));
    }
}
