use super::*;
use jobz::jobfile::parse_job_file;
use std::path::Path;

/// 2030-01-01T00:00:00Z: a slot of every `every` that divides a day.
const T0: i64 = 1_893_456_000_000;
const S: i64 = 1000;

fn specs(yaml: &str) -> BTreeMap<String, ScheduleSpec> {
    parse_job_file(Path::new("t.yaml"), yaml).unwrap().schedules
}

fn every_2s(catch_up: &str, backlog: u32) -> BTreeMap<String, ScheduleSpec> {
    specs(&format!(
        "schedules:\n  - name: tick\n    job: ledger\n    every: 2s\n    catch_up: {catch_up}\n    backlog: {backlog}\n    params: {{ slot: '{{slot_unix}}' }}\n"
    ))
}

fn fired(actions: &[ScheduleAction]) -> Vec<i64> {
    actions
        .iter()
        .filter_map(|a| match a {
            ScheduleAction::Fire(f) => Some((f.slot_ms - T0) / S),
            _ => None,
        })
        .collect()
}

fn mark_of(actions: &[ScheduleAction]) -> Option<i64> {
    actions.iter().rev().find_map(|a| match a {
        ScheduleAction::Mark { mark_ms, .. } => Some(*mark_ms),
        _ => None,
    })
}

/// A process that ran from T0 (its schedule new then) to `until`, ticking every 100 ms:
/// its marks and fires, as the store would hold them.
fn ran_until(
    specs: &BTreeMap<String, ScheduleSpec>,
    until: i64,
) -> (BTreeMap<String, i64>, Vec<Fire>) {
    let mut s = Schedules::restore(BTreeMap::new(), Vec::new(), T0);
    s.set_specs(specs, T0);
    let mut t = T0;
    while t <= until {
        s.on_tick(t);
        t += 100;
    }
    let fires = s.fires.values().cloned().collect();
    (s.marks.clone(), fires)
}

#[test]
fn each_slot_fires_once_while_the_process_runs() {
    let specs = every_2s("none", 100);
    let mut s = Schedules::restore(BTreeMap::new(), Vec::new(), T0 - 500);
    assert_eq!(mark_of(&s.set_specs(&specs, T0 - 500)), Some(T0 - 500));
    let mut all = Vec::new();
    let mut t = T0 - 500;
    while t <= T0 + 10 * S {
        all.extend(fired(&s.on_tick(t)));
        t += 50;
    }
    assert_eq!(all, [0, 2, 4, 6, 8, 10]);
    let params: Vec<&str> = s.pending().map(|f| f.params["slot"].as_str()).collect();
    assert_eq!(params[0], (T0 / 1000).to_string());
    // A repeated tick at the same time decides nothing new.
    assert!(fired(&s.on_tick(T0 + 10 * S)).is_empty());
}

#[test]
fn slots_missed_while_stopped_follow_catch_up() {
    for (policy, backlog, expected) in [
        ("none", 100, vec![]),
        ("one", 100, vec![10]),
        ("all", 100, vec![6, 8, 10]),
        ("all", 2, vec![8, 10]),
    ] {
        let specs = every_2s(policy, backlog);
        // Ran until just after slot 4, stopped, back at 11 s: slots 6, 8 and 10 missed.
        let (marks, fires) = ran_until(&specs, T0 + 4 * S + 300);
        let restart = T0 + 11 * S;
        let mut s = Schedules::restore(marks, fires, restart);
        assert!(s.set_specs(&specs, restart).is_empty());
        let actions = s.on_tick(restart);
        assert_eq!(
            fired(&actions),
            expected,
            "catch_up: {policy} backlog {backlog}"
        );
        assert_eq!(mark_of(&actions), Some(restart));
        // The next slot is on time whatever the policy.
        assert_eq!(fired(&s.on_tick(T0 + 12 * S)), [12], "{policy}");
    }
}

#[test]
fn a_new_schedule_starts_from_now() {
    let specs = every_2s("all", 100);
    let mut s = Schedules::restore(BTreeMap::new(), Vec::new(), T0);
    s.set_specs(&specs, T0 + 5 * S);
    assert!(fired(&s.on_tick(T0 + 5 * S)).is_empty());
    assert_eq!(fired(&s.on_tick(T0 + 6 * S)), [6]);
}

#[test]
fn a_schedule_removed_and_added_back_starts_again_from_then() {
    let specs = every_2s("all", 100);
    let mut s = Schedules::restore(BTreeMap::new(), Vec::new(), T0);
    s.set_specs(&specs, T0);
    s.on_tick(T0 + 2 * S);
    let actions = s.set_specs(&BTreeMap::new(), T0 + 3 * S);
    assert_eq!(
        actions,
        [ScheduleAction::Unmark {
            schedule: "tick".into()
        }]
    );
    assert!(fired(&s.on_tick(T0 + 8 * S)).is_empty());
    // Back at 9 s: slots 4 to 8, while it was not defined, are not missed.
    assert_eq!(mark_of(&s.set_specs(&specs, T0 + 9 * S)), Some(T0 + 9 * S));
    assert!(fired(&s.on_tick(T0 + 9 * S)).is_empty());
    assert_eq!(fired(&s.on_tick(T0 + 10 * S)), [10]);
}

#[test]
fn a_long_pause_counts_as_stopped() {
    let specs = every_2s("none", 100);
    let mut s = Schedules::restore(BTreeMap::new(), Vec::new(), T0 - S);
    s.set_specs(&specs, T0 - S);
    assert_eq!(fired(&s.on_tick(T0)), [0]);
    // A 10 s gap between ticks is slowness: every slot in it fires.
    assert_eq!(fired(&s.on_tick(T0 + 10 * S)), [2, 4, 6, 8, 10]);
    // A gap over STALL_MS is a pause: its slots were missed (catch_up: none).
    let later = T0 + 10 * S + STALL_MS + 5 * S;
    assert!(fired(&s.on_tick(later)).is_empty());
    assert_eq!(fired(&s.on_tick(later + S)), [(later + S - T0) / S]);
}

#[test]
fn nothing_older_than_the_broker_remembers_is_fired() {
    let specs = every_2s("all", 10_000);
    let (marks, fires) = ran_until(&specs, T0);
    // Back after two days: only slots of the last 23 h qualify, the latest 10,000 of them.
    let restart = T0 + 48 * 3600 * S + 500;
    let mut s = Schedules::restore(marks, fires, restart);
    s.set_specs(&specs, restart);
    let slots = fired(&s.on_tick(restart));
    assert_eq!(slots.len(), 10_000);
    assert!(slots
        .iter()
        .all(|slot| T0 + slot * S >= restart - MAX_SLOT_AGE_MS));
    // A fire never accepted is given up once its slot is 23 h old.
    let mut s = Schedules::restore(BTreeMap::new(), Vec::new(), T0 - S);
    s.set_specs(&specs, T0 - S);
    s.on_tick(T0);
    assert_eq!(s.pending().count(), 1);
    let late = T0 + MAX_SLOT_AGE_MS + S;
    let actions = s.on_tick(late);
    assert!(actions.contains(&ScheduleAction::Forget {
        id: trigger_id("tick", T0)
    }));
    assert!(s.pending().all(|f| f.slot_ms > T0));
}

#[test]
fn two_processes_name_every_slot_alike() {
    let specs = every_2s("all", 100);
    let mut a = Schedules::restore(BTreeMap::new(), Vec::new(), T0 - S);
    a.set_specs(&specs, T0 - S);
    let mut b = Schedules::restore(BTreeMap::new(), Vec::new(), T0 + 3 * S);
    b.set_specs(&specs, T0 + 3 * S);
    for t in (0..20).map(|i| T0 + i * 500) {
        a.on_tick(t);
        b.on_tick(t + 37); // another clock, a little ahead
    }
    let ids = |s: &Schedules| s.pending().map(|f| f.id.clone()).collect::<Vec<_>>();
    let (a_ids, b_ids) = (ids(&a), ids(&b));
    assert_eq!(a_ids.len(), 5); // 0, 2, 4, 6, 8 s
    assert_eq!(
        b_ids,
        a_ids[2..],
        "b started at 3 s: it fires 4, 6, 8 under a's ids"
    );
    assert_eq!(a_ids[0], format!("sch-tick-{}", T0 / 1000));
}

#[test]
fn only_the_latest_accepted_fire_is_kept_and_shown() {
    let specs = every_2s("none", 100);
    let mut s = Schedules::restore(BTreeMap::new(), Vec::new(), T0 - S);
    s.set_specs(&specs, T0 - S);
    s.on_tick(T0 + 4 * S);
    let ids: Vec<String> = s.pending().map(|f| f.id.clone()).collect();
    assert_eq!(ids.len(), 3);
    // Accepted out of order: the latest slot's run is what the view shows.
    assert_eq!(s.on_accepted(&ids[2], "run-c").len(), 1);
    let actions = s.on_accepted(&ids[0], "run-a");
    assert!(actions.contains(&ScheduleAction::Forget { id: ids[0].clone() }));
    assert!(
        s.on_accepted(&ids[2], "run-c").is_empty(),
        "a repeat is a no-op"
    );
    assert!(s.on_accepted("sch-unknown-1", "run-x").is_empty());
    let view = &s.views("semaphore:s1/ab")[0];
    assert_eq!(view.schedule, "tick");
    assert_eq!(view.every_ms, Some(2000));
    assert_eq!(view.cron, None);
    assert_eq!(view.timezone, "UTC");
    assert_eq!(view.last_slot_ms, Some(T0 + 4 * S));
    assert_eq!(view.last_run.as_deref(), Some("run-c"));
    assert_eq!(view.pending, 1);
    assert_eq!(view.next_fire_ms, Some(T0 + 6 * S));
    assert_eq!(view.reporter, "semaphore:s1/ab");
    // Slot 2 is still pending: settled up to just before it.
    assert_eq!(view.settled_ms, Some(T0 + 2 * S - 1));
    let pending = s.pending().next().unwrap().id.clone();
    s.on_accepted(&pending, "run-b");
    assert_eq!(s.views("me")[0].settled_ms, Some(T0 + 4 * S));
}

#[test]
fn trigger_ids_fit_the_broker() {
    let longest = "n".repeat(128);
    let id = trigger_id(&longest, i64::MAX);
    assert!(id.len() <= 256, "{}", id.len());
    assert_eq!(trigger_id("a-1", 5_000), "sch-a-1-5");
}

#[test]
fn slots_another_process_served_are_not_caught_up() {
    let specs = every_2s("all", 100);
    let (marks, fires) = ran_until(&specs, T0 + 4 * S + 300);
    let restart = T0 + 11 * S;
    let peer = |settled_ms: Option<i64>, reporter: &str| ScheduleView {
        schedule: "tick".into(),
        job: "ledger".into(),
        cron: None,
        every_ms: Some(2000),
        offset_ms: Some(0),
        timezone: "UTC".into(),
        catch_up: "all".into(),
        next_fire_ms: None,
        last_slot_ms: settled_ms,
        last_run: None,
        pending: 0,
        settled_ms,
        reporter: reporter.into(),
    };
    let own = "semaphore:s1/me";
    let mut s = Schedules::restore(marks.clone(), fires.clone(), restart);
    s.set_specs(&specs, restart);
    // Reports that prove nothing: its own, one with nothing settled, one from the future.
    let unproven = [
        peer(Some(T0 + 10 * S), own),
        peer(None, "semaphore:s2/b"),
        peer(Some(restart + S), "semaphore:s2/b"),
    ];
    assert!(s.note_peers(&unproven, own, restart).is_empty());
    assert_eq!(fired(&s.on_tick(restart)), [6, 8, 10]);

    // Another process settled everything up to slot 8: only 10 is missed.
    let mut s = Schedules::restore(marks, fires, restart);
    s.set_specs(&specs, restart);
    let served = [peer(Some(T0 + 8 * S), "semaphore:s2/b")];
    assert_eq!(
        mark_of(&s.note_peers(&served, own, restart)),
        Some(T0 + 8 * S)
    );
    assert_eq!(fired(&s.on_tick(restart)), [10]);
}
