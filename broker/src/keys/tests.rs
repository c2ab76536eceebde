use super::*;

const NOW: i64 = 1_800_000_000_000;

fn key() -> PublicKey {
    NodeKey::generate().unwrap().public()
}

fn key_dir() -> (tempfile::TempDir, KeyDir) {
    let dir = tempfile::tempdir().unwrap();
    let kd = KeyDir::open(dir.path()).unwrap();
    (dir, kd)
}

fn pending(name: &str, key: PublicKey, seen_ms: i64) -> PendingKey {
    PendingKey {
        name: name.into(),
        key,
        first_seen_ms: seen_ms,
        last_seen_ms: seen_ms,
    }
}

/// Files `keys` as pending under `name`, as the broker does.
fn ask(kd: &KeyDir, name: &str, keys: &[PublicKey]) {
    let mut entries = kd.pending_of(name).unwrap();
    for (i, k) in keys.iter().enumerate() {
        entries.push(pending(name, *k, NOW + i as i64 * 1000));
    }
    kd.write_pending(name, &entries).unwrap();
}

#[test]
fn pending_accept_revoke_cycle() {
    let (_dir, kd) = key_dir();
    let k = key();
    ask(&kd, "worker:web1", &[k]);
    assert!(kd.accepted().unwrap().is_empty());

    let v0 = kd.version();
    let chosen = kd.accept("web1", None).unwrap();
    assert_eq!(chosen.name, "worker:web1");
    assert_ne!(kd.version(), v0);
    assert_eq!(
        kd.accepted().unwrap().get(&k).map(String::as_str),
        Some("worker:web1")
    );
    assert!(kd.list().unwrap().pending.is_empty(), "it left pending/");

    kd.revoke("web1", None).unwrap();
    assert!(kd.accepted().unwrap().is_empty());
    let listed = render_list(&kd.list().unwrap(), NOW);
    assert!(listed.contains("rejected:\n  worker:web1"), "{listed}");
    assert!(listed.contains(&k.fingerprint()), "{listed}");
}

#[test]
fn pending_files_keep_every_key_with_its_times_and_read_old_files() {
    let (dir, kd) = key_dir();
    let (a, b) = (key(), key());
    let entries = vec![
        pending("worker:w3", a, NOW),
        pending("worker:w3", b, NOW + 5000),
    ];
    kd.write_pending("worker:w3", &entries).unwrap();
    assert_eq!(kd.pending().unwrap(), entries);
    // Times are whole seconds on disk.
    assert_eq!(kd.pending().unwrap()[1].last_seen_ms % 1000, 0);

    // A file from before times were kept: one key and a comment.
    let old = key();
    fs::write(
        dir.path().join("pending").join("worker:old.pub"),
        format!("{old} worker:old\n"),
    )
    .unwrap();
    let found = kd.pending_of("worker:old").unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].key, old);
    assert!(found[0].last_seen_ms > 0, "the file's time stands in");

    kd.write_pending("worker:w3", &[]).unwrap();
    assert!(kd.pending_of("worker:w3").unwrap().is_empty());
    assert!(!dir.path().join("pending").join("worker:w3.pub").exists());
}

#[test]
fn an_ambiguous_name_is_refused_and_the_fingerprint_picks_the_key() {
    let (_dir, kd) = key_dir();
    let (squatter, real) = (key(), key());
    ask(&kd, "worker:w3", &[squatter, real]);

    let err = format!("{:#}", kd.accept("w3", None).unwrap_err());
    assert!(err.contains("ambiguous"), "{err}");
    assert!(
        err.contains(&squatter.fingerprint()) && err.contains(&real.fingerprint()),
        "{err}"
    );
    assert!(kd.accepted().unwrap().is_empty());
    let err = format!("{:#}", kd.reject("w3", None).unwrap_err());
    assert!(err.contains("ambiguous"), "{err}");

    // A wrong fingerprint names nothing.
    let err = format!(
        "{:#}",
        kd.accept("w3", Some("SHA256:0000000000000000"))
            .unwrap_err()
    );
    assert!(err.contains("no key of worker:w3"), "{err}");

    // The fingerprint as listed, bare hex, or the whole key all work.
    let hex = real
        .fingerprint()
        .trim_start_matches("SHA256:")
        .to_uppercase();
    let chosen = kd.accept("w3", Some(&hex)).unwrap();
    assert_eq!(chosen.keys, vec![real]);
    assert_eq!(kd.accepted().unwrap().len(), 1);
    assert!(kd.accepted().unwrap().contains_key(&real));

    // The squatter stays pending, flagged; accepting it now is refused.
    let listing = kd.list().unwrap();
    assert_eq!(listing.pending.len(), 1);
    assert_eq!(listing.pending[0].key, squatter);
    let listed = render_list(&listing, NOW);
    assert!(listed.contains("already has an accepted key"), "{listed}");
    let err = format!("{:#}", kd.accept("w3", None).unwrap_err());
    assert!(err.contains("already has an accepted key"), "{err}");

    kd.reject("w3", Some(&squatter.to_string())).unwrap();
    assert!(kd.list().unwrap().pending.is_empty());
    assert!(kd.rejected().unwrap().contains(&squatter));
    assert!(
        kd.accepted().unwrap().contains_key(&real),
        "the real key stays"
    );
}

#[test]
fn list_shows_each_pending_key_with_its_fingerprint_and_the_conflict() {
    let (_dir, kd) = key_dir();
    let (a, b) = (key(), key());
    ask(&kd, "worker:w3", &[a, b]);
    let listed = render_list(&kd.list().unwrap(), NOW + 65_000);
    let pending: Vec<&str> = listed
        .lines()
        .skip_while(|l| *l != "pending:")
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .collect();
    assert_eq!(pending.len(), 2, "{listed}");
    assert!(
        pending[0].trim_start().starts_with("worker:w3 "),
        "{listed}"
    );
    assert!(pending[0].contains(&a.fingerprint()) && pending[1].contains(&b.fingerprint()));
    assert!(pending[0].contains("seen 1m 5s ago"), "{listed}");
    assert!(
        pending
            .iter()
            .all(|l| l.contains("2 keys ask for this name")),
        "{listed}"
    );
}

#[test]
fn revoking_one_key_of_a_rotation_keeps_the_other_and_rejected_wins() {
    let (_dir, kd) = key_dir();
    let (old, new) = (key(), key());
    kd.add("worker:w1", &[old, new]).unwrap();
    assert_eq!(kd.accepted().unwrap().len(), 2);
    let err = format!("{:#}", kd.revoke("w1", Some("SHA256:ffff")).unwrap_err());
    assert!(err.contains("no key of worker:w1"), "{err}");
    kd.revoke("w1", Some(&old.fingerprint())).unwrap();
    let accepted = kd.accepted().unwrap();
    assert_eq!(accepted.len(), 1);
    assert!(accepted.contains_key(&new));
    // A key written back into accepted/ by hand stays refused while it is in rejected/.
    kd.write_keys(KeyState::Accepted, "worker:w1", &[old, new])
        .unwrap();
    assert!(!kd.accepted().unwrap().contains_key(&old));
    // Accepting a rejected key again, by its full name, takes it out of rejected/.
    kd.revoke("worker:w1", None).unwrap();
    assert!(kd.accepted().unwrap().is_empty());
    let err = format!("{:#}", kd.accept("worker:w1", None).unwrap_err());
    assert!(err.contains("ambiguous"), "two rejected keys: {err}");
    kd.accept("worker:w1", Some(&new.fingerprint())).unwrap();
    assert_eq!(
        kd.accepted().unwrap().keys().collect::<Vec<_>>(),
        vec![&new]
    );
    assert!(!kd.rejected().unwrap().contains(&new));
}

#[test]
fn add_preseeds_and_bad_names_are_refused() {
    let (_dir, kd) = key_dir();
    let (a, b) = (key(), key());
    kd.add("frontend:front1", &[a, b]).unwrap();
    let accepted = kd.accepted().unwrap();
    assert_eq!(accepted.len(), 2, "both keys of a rotation are accepted");
    for bad in ["../x", "worker:../../etc", "web1", "worker:a/b"] {
        assert!(kd.add(bad, &[a]).is_err(), "{bad}");
        assert!(
            kd.write_pending(bad, &[pending(bad, a, NOW)]).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn a_key_accepted_under_two_names_is_refused() {
    let (_dir, kd) = key_dir();
    let k = key();
    kd.add("worker:a", &[k]).unwrap();
    kd.add("worker:b", &[k]).unwrap();
    assert!(kd.accepted().unwrap().is_empty());
    // And `keys accept` will not make that happen.
    let (_dir2, kd2) = key_dir();
    kd2.add("worker:a", &[k]).unwrap();
    ask(&kd2, "worker:b", &[k]);
    // Listed nowhere as pending: the key is accepted already.
    assert!(kd2.list().unwrap().pending.is_empty());
}

#[test]
fn ambiguous_short_names_need_the_role() {
    let (_dir, kd) = key_dir();
    ask(&kd, "worker:h1", &[key()]);
    ask(&kd, "frontend:h1", &[key()]);
    let err = format!("{:#}", kd.accept("h1", None).unwrap_err());
    assert!(
        err.contains("ambiguous") && err.contains("ROLE:NAME"),
        "{err}"
    );
}

#[test]
fn commands_need_an_existing_key_directory() {
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("typo");
    let err = format!("{:#}", KeyDir::existing(&wrong).unwrap_err());
    assert!(err.contains("no key directory"), "{err}");
    assert!(!wrong.exists());
    // An empty directory that is not one is refused too (`--keys /etc`).
    let err = format!("{:#}", KeyDir::existing(dir.path()).unwrap_err());
    assert!(err.contains("no key directory"), "{err}");
    assert!(fs::read_dir(dir.path()).unwrap().count() == 0);
    // One with only accepted/ (pre-seeded) is a key directory: missing parts read empty.
    fs::create_dir(dir.path().join("accepted")).unwrap();
    let kd = KeyDir::existing(dir.path()).unwrap();
    assert_eq!(kd.list().unwrap(), Listing::default());
}
