//! The notices to deliver (`notify:`), journaled with the end of their run, and each
//! attempt to deliver one; the pending ones are read at start (see [`crate::notify`]).
//! A notice goes with its run when the run is pruned.

use jobz::jobfile::NotifyTarget;
use rusqlite::{params, Connection, Transaction};

use super::{Context, StoreError};
use crate::notify::{Notice, Outcome, Tried};

/// Schema 6: the table, and a partial index of the pending notices.
pub(super) const SCHEMA_V6: &str = "
    CREATE TABLE IF NOT EXISTS notices (
        id TEXT PRIMARY KEY, run_id TEXT NOT NULL, target_kind TEXT NOT NULL,
        target TEXT NOT NULL, event TEXT NOT NULL, payload TEXT NOT NULL,
        created_at INTEGER NOT NULL, attempts INTEGER NOT NULL, next_at INTEGER NOT NULL,
        delivered_at INTEGER, gave_up_at INTEGER, last_error TEXT);
    CREATE INDEX IF NOT EXISTS notices_pending ON notices (next_at)
        WHERE delivered_at IS NULL AND gave_up_at IS NULL;
    CREATE TRIGGER IF NOT EXISTS notices_follow_runs AFTER DELETE ON runs
        BEGIN DELETE FROM notices WHERE run_id = old.run_id; END;";

fn target_columns(target: &NotifyTarget) -> (&'static str, &str) {
    match target {
        NotifyTarget::Webhook(name) => ("webhook", name),
        NotifyTarget::Email(address) => ("email", address),
    }
}

/// A new notice (a second write of the same one changes nothing).
pub(super) fn insert(tx: &Transaction<'_>, n: &Notice) -> Result<(), StoreError> {
    let (kind, target) = target_columns(&n.target);
    tx.prepare_cached(
        "INSERT OR IGNORE INTO notices (id, run_id, target_kind, target, event, payload,
             created_at, attempts, next_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            n.id,
            n.run_id.as_str(),
            kind,
            target,
            n.event,
            n.payload,
            n.created_at_ms,
            n.attempts,
            n.next_at_ms
        ])
    })
    .context("writing a notice")?;
    Ok(())
}

/// An attempt: its count, what was said, and what happens next.
pub(super) fn tried(tx: &Transaction<'_>, t: &Tried) -> Result<(), StoreError> {
    let (next_at, delivered_at, gave_up_at) = match t.outcome {
        Outcome::Retry { next_at_ms } => (Some(next_at_ms), None, None),
        Outcome::Delivered => (None, Some(t.at_ms), None),
        Outcome::GaveUp => (None, None, Some(t.at_ms)),
    };
    tx.prepare_cached(
        "UPDATE notices SET attempts = ?2, next_at = COALESCE(?3, next_at),
             delivered_at = ?4, gave_up_at = ?5, last_error = ?6
         WHERE id = ?1",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            t.id,
            t.attempts,
            next_at,
            delivered_at,
            gave_up_at,
            t.error
        ])
    })
    .context("recording a notice's attempt")?;
    Ok(())
}

/// The notices still to deliver, soonest first.
pub(super) fn pending(conn: &Connection) -> Result<Vec<Notice>, StoreError> {
    const WHAT: &str = "reading the pending notices";
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, run_id, target_kind, target, event, payload, created_at, attempts, next_at
             FROM notices WHERE delivered_at IS NULL AND gave_up_at IS NULL ORDER BY next_at",
        )
        .context(WHAT)?;
    let mut rows = stmt.query([]).context(WHAT)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().context(WHAT)? {
        let kind: String = row.get(2).context(WHAT)?;
        let target: String = row.get(3).context(WHAT)?;
        let target = match kind.as_str() {
            "webhook" => NotifyTarget::Webhook(target),
            "email" => NotifyTarget::Email(target),
            other => return Err(StoreError::Corrupt(format!("notice target kind {other:?}"))),
        };
        let run_id: String = row.get(1).context(WHAT)?;
        out.push(Notice {
            id: row.get(0).context(WHAT)?,
            run_id: run_id.into(),
            target,
            event: row.get(4).context(WHAT)?,
            payload: row.get(5).context(WHAT)?,
            created_at_ms: row.get(6).context(WHAT)?,
            attempts: row.get(7).context(WHAT)?,
            next_at_ms: row.get(8).context(WHAT)?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{SqliteStore, Store};
    use super::*;
    use crate::engine::Write;

    use crate::notify::test_notice as notice;

    #[test]
    fn a_notice_is_pending_until_delivered_or_given_up() {
        let mut store = SqliteStore::in_memory().unwrap();
        store
            .apply(&[
                Write::Notice(notice("r1/0", 5)),
                Write::Notice(notice("r1/1", 3)),
                Write::Notice(notice("r1/2", 4)),
            ])
            .unwrap();
        let ids = |store: &SqliteStore| -> Vec<String> {
            store
                .pending_notices()
                .unwrap()
                .into_iter()
                .map(|n| n.id)
                .collect()
        };
        assert_eq!(ids(&store), ["r1/1", "r1/2", "r1/0"]);
        let tried = |id: &str, outcome| Tried {
            id: id.into(),
            attempts: 1,
            at_ms: 9,
            error: Some("503".into()),
            outcome,
        };
        store
            .apply(&[
                Write::NoticeTried(tried("r1/1", Outcome::Retry { next_at_ms: 10 })),
                Write::NoticeTried(tried("r1/2", Outcome::Delivered)),
                Write::NoticeTried(tried("r1/0", Outcome::GaveUp)),
            ])
            .unwrap();
        let pending = store.pending_notices().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].attempts, pending[0].next_at_ms), (1, 10));
        // A second write of a made notice does not reset it.
        store.apply(&[Write::Notice(notice("r1/1", 3))]).unwrap();
        assert_eq!(store.pending_notices().unwrap()[0].attempts, 1);
    }
}
