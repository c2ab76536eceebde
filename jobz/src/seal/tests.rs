use super::*;
use crate::keys::NodeKey;

const NOW: i64 = 1_800_000_000_000;

struct Mesh {
    broker_key: NodeKey,
    opener: BrokerOpener,
    sealer: BrokerSealer,
    ring: MeshRing,
    node: NodeSeal,
}

fn mesh() -> Mesh {
    let broker_key = NodeKey::generate().unwrap();
    let node = NodeSeal::new(NodeIdentity {
        key: NodeKey::generate().unwrap(),
        brokers: vec![broker_key.public()],
    });
    Mesh {
        opener: BrokerOpener::new(&broker_key),
        sealer: BrokerSealer::new(&broker_key),
        ring: MeshRing::new(NOW),
        broker_key,
        node,
    }
}

fn welcome(m: &mut Mesh, now: i64) {
    let keys = m.ring.distributable(now);
    let frame = m
        .sealer
        .seal_to(&m.node.public(), b"n me\0", b"welcome", &keys, now)
        .unwrap();
    assert_eq!(m.node.open(b"n me\0", &frame, now).unwrap(), b"welcome");
}

#[test]
fn node_to_broker_round_trip_names_the_sender() {
    let mut m = mesh();
    let frame = m.node.seal(b"JZ\0\x01hello", NOW).unwrap();
    let opened = m.opener.open(&frame, NOW, |_| true).unwrap();
    assert_eq!(opened.inner, b"JZ\0\x01hello");
    assert_eq!(opened.sender, m.node.public());
}

#[test]
fn a_replayed_frame_is_refused_within_the_window_and_stale_after() {
    let mut m = mesh();
    let frame = m.node.seal(b"trigger", NOW).unwrap();
    m.opener.open(&frame, NOW, |_| true).unwrap();
    assert_eq!(
        m.opener.open(&frame, NOW + 5, |_| true).unwrap_err(),
        OpenError::Replay
    );
    assert!(matches!(
        m.opener.open(&frame, NOW + MAX_CLOCK_SKEW_MS + 1, |_| true),
        Err(OpenError::Stale { .. })
    ));
}

#[test]
fn frames_of_strangers_do_not_fill_the_replay_memory() {
    let mut m = mesh();
    let frame = m.node.seal(b"x", NOW).unwrap();
    // Not enrolled: opened (to learn who asks), nonce not remembered.
    m.opener.open(&frame, NOW, |_| false).unwrap();
    assert!(m.opener.replay.seen.is_empty());
}

#[test]
fn every_flipped_bit_is_refused() {
    let mut m = mesh();
    let frame = m.node.seal(b"params: secret", NOW).unwrap();
    for i in 0..frame.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = frame.clone();
            bad[i] ^= bit;
            assert!(
                m.opener.open(&bad, NOW, |_| true).is_err(),
                "flip at byte {i} accepted"
            );
        }
    }
    welcome(&mut m, NOW);
    let group = m
        .sealer
        .seal_group(m.ring.current(NOW), b"j job\0", b"work", NOW)
        .unwrap();
    for i in 0..group.len() {
        let mut bad = group.clone();
        bad[i] ^= 0x04;
        assert!(m.node.open(b"j job\0", &bad, NOW).is_err(), "byte {i}");
    }
    assert_eq!(m.node.open(b"j job\0", &group, NOW).unwrap(), b"work");
}

#[test]
fn a_frame_moved_to_another_topic_is_refused() {
    let mut m = mesh();
    welcome(&mut m, NOW);
    let group = m
        .sealer
        .seal_group(m.ring.current(NOW), b"j a\0", b"work", NOW)
        .unwrap();
    // The signature does not cover the topic; the AEAD does, so the node's key fails.
    assert_eq!(
        m.node.open(b"j b\0", &group, NOW).unwrap_err(),
        OpenError::MeshKeyMismatch(m.ring.current(NOW).epoch)
    );
}

#[test]
fn plaintext_is_not_in_the_frame() {
    let mut m = mesh();
    welcome(&mut m, NOW);
    let secret = b"date=2026_11_23-very-secret-parameter";
    let up = m.node.seal(secret, NOW).unwrap();
    let down = m
        .sealer
        .seal_group(m.ring.current(NOW), b"j a\0", secret, NOW)
        .unwrap();
    for frame in [up, down] {
        assert!(!frame.windows(8).any(|w| secret.windows(8).any(|s| s == w)));
    }
}

#[test]
fn group_frames_need_the_mesh_key_and_the_broker_signature() {
    let mut m = mesh();
    let group = m
        .sealer
        .seal_group(m.ring.current(NOW), b"j a\0", b"work", NOW)
        .unwrap();
    // Before any welcome the node holds no mesh key.
    assert!(matches!(
        m.node.open(b"j a\0", &group, NOW),
        Err(OpenError::UnknownEpoch(_))
    ));
    welcome(&mut m, NOW);
    assert_eq!(m.node.open(b"j a\0", &group, NOW).unwrap(), b"work");

    // Another holder of the mesh key (say, an enrolled worker) cannot forge the broker.
    let mut forger = BrokerSealer::new(&NodeKey::generate().unwrap());
    let forged = forger
        .seal_group(m.ring.current(NOW), b"j a\0", b"evil", NOW)
        .unwrap();
    assert!(matches!(
        m.node.open(b"j a\0", &forged, NOW),
        Err(OpenError::UntrustedSender(_))
    ));
}

#[test]
fn a_frame_for_another_node_or_broker_is_refused() {
    let mut m = mesh();
    let other = NodeKey::generate().unwrap();
    let frame = m
        .sealer
        .seal_to(&other.public(), b"n x\0", b"hi", &[], NOW)
        .unwrap();
    assert_eq!(
        m.node.open(b"n x\0", &frame, NOW).unwrap_err(),
        OpenError::NotForMe
    );
    let mut elsewhere = BrokerOpener::new(&NodeKey::generate().unwrap());
    let up = m.node.seal(b"x", NOW).unwrap();
    assert_eq!(
        elsewhere.open(&up, NOW, |_| true).unwrap_err(),
        OpenError::NotForMe
    );
    let _ = &m.broker_key;
}

#[test]
fn rotation_is_announced_before_use_and_old_keys_expire() {
    let mut m = mesh();
    welcome(&mut m, NOW);
    let first = m.ring.current(NOW).epoch;
    let next = m.ring.rotate(NOW);
    assert!(next > first);
    // Still the old key in use while the new one is announced.
    assert_eq!(m.ring.current(NOW + 1).epoch, first);
    welcome(&mut m, NOW + 1); // the node's periodic hello brings the new key
    let later = NOW + MESH_KEY_ANNOUNCE_MS;
    assert_eq!(m.ring.current(later).epoch, next);
    let group = m
        .sealer
        .seal_group(m.ring.current(later), b"j a\0", b"w", later)
        .unwrap();
    assert_eq!(m.node.open(b"j a\0", &group, later).unwrap(), b"w");
    // The superseded key is dropped after its retention.
    let much_later = later + MESH_KEY_RETAIN_MS + 1;
    let keys: Vec<u32> = m
        .ring
        .distributable(much_later)
        .iter()
        .map(|k| k.epoch)
        .collect();
    assert_eq!(keys, vec![next]);
}

#[test]
fn rotating_again_withdraws_an_announced_key() {
    let mut ring = MeshRing::new(NOW);
    let announced = ring.rotate(NOW);
    let replacement = ring.rotate(NOW + 1);
    let epochs: Vec<u32> = ring
        .distributable(NOW + 2)
        .iter()
        .map(|k| k.epoch)
        .collect();
    assert!(!epochs.contains(&announced), "{epochs:?}");
    assert!(epochs.contains(&replacement));
}

#[test]
fn unsealed_and_garbage_frames_are_errors_not_panics() {
    let mut m = mesh();
    assert_eq!(
        m.opener.open(b"JZ\0\x01xx", NOW, |_| true).unwrap_err(),
        OpenError::Unsealed
    );
    let frame = m.node.seal(b"abc", NOW).unwrap();
    for cut in 0..frame.len() {
        assert!(m.opener.open(&frame[..cut], NOW, |_| true).is_err());
        assert!(m.node.open(b"", &frame[..cut], NOW).is_err());
    }
}

#[test]
fn a_node_switches_to_the_next_trusted_broker_key() {
    let old = NodeKey::generate().unwrap();
    let new = NodeKey::generate().unwrap();
    let mut node = NodeSeal::new(NodeIdentity {
        key: NodeKey::generate().unwrap(),
        brokers: vec![old.public(), new.public()],
    });
    let mut new_broker = BrokerOpener::new(&new);
    let frame = node.seal(b"hello", NOW).unwrap();
    assert_eq!(
        new_broker.open(&frame, NOW, |_| true).unwrap_err(),
        OpenError::NotForMe
    );
    node.try_next_broker_key();
    let frame = node.seal(b"hello", NOW).unwrap();
    assert!(new_broker.open(&frame, NOW, |_| true).is_ok());
}

fn nonce(i: u32) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..4].copy_from_slice(&i.to_be_bytes());
    n
}

#[test]
fn a_full_nonce_memory_does_not_forget_unexpired_nonces() {
    let flooder = NodeKey::generate().unwrap().public();
    let mut guard = ReplayGuard::new(100, 1_000);
    for i in 0..100 {
        guard.admit(flooder, nonce(i), NOW).unwrap();
    }
    // Over its quota: the flooding key's frame is refused, its old nonces kept.
    assert_eq!(
        guard.admit(flooder, nonce(100), NOW + 1),
        Err(OpenError::OverQuota)
    );
    assert!(
        guard.is_replay(&nonce(0)),
        "the first nonce was forgotten while still inside the clock window"
    );
    // Once the window has passed, its quota is free again.
    let later = NOW + 2 * MAX_CLOCK_SKEW_MS + 1001;
    guard.admit(flooder, nonce(100), later).unwrap();
    assert!(!guard.is_replay(&nonce(0)));
}

#[test]
fn a_flooding_key_cannot_crowd_the_others_out_of_a_full_nonce_memory() {
    let keys: Vec<PublicKey> = (0..3)
        .map(|_| NodeKey::generate().unwrap().public())
        .collect();
    let mut guard = ReplayGuard::new(1_000, 1_000);
    let mut next = 0u32;
    let mut send = |guard: &mut ReplayGuard, key: PublicKey| {
        next += 1;
        guard.admit(key, nonce(next), NOW)
    };
    // Two keys fill the memory between them.
    while send(&mut guard, keys[0]).is_ok() {}
    for _ in 0..10 {
        send(&mut guard, keys[1]).unwrap();
    }
    assert_eq!(send(&mut guard, keys[0]), Err(OpenError::OverQuota));
    // A quiet key still gets its fair share; the flooder stays refused.
    for _ in 0..300 {
        send(&mut guard, keys[2]).unwrap();
    }
    assert_eq!(send(&mut guard, keys[0]), Err(OpenError::OverQuota));
    assert!(guard.seen.len() <= 2 * 1_000);
    assert!(
        guard.is_replay(&nonce(1)),
        "no unexpired nonce was forgotten"
    );
}

#[test]
fn the_broker_drops_the_frames_of_a_key_over_its_nonce_quota() {
    let mut m = mesh();
    m.opener.replay = ReplayGuard::new(3, 100);
    for i in 0..3 {
        let frame = m.node.seal(b"heartbeat", NOW + i).unwrap();
        m.opener.open(&frame, NOW + i, |_| true).unwrap();
    }
    let frame = m.node.seal(b"heartbeat", NOW + 3).unwrap();
    assert_eq!(
        m.opener.open(&frame, NOW + 3, |_| true).unwrap_err(),
        OpenError::OverQuota
    );
    assert_eq!(OpenError::OverQuota.reason(), "nonce_quota");
}

#[test]
fn an_opened_frame_tells_when_it_was_sealed() {
    let mut m = mesh();
    let frame = m.node.seal(b"x", NOW - 5_000).unwrap();
    assert_eq!(
        m.opener.open(&frame, NOW, |_| true).unwrap().sent_at_ms,
        NOW - 5_000
    );
}

// ---- A ring kept across broker restarts ---------------------------------------------------

const HOUR_MS: i64 = 3_600_000;
const MAX_IN_USE: i64 = HOUR_MS + MESH_KEY_ANNOUNCE_MS;

fn epochs(ring: &mut MeshRing, now: i64) -> Vec<u32> {
    ring.distributable(now).iter().map(|k| k.epoch).collect()
}

#[test]
fn a_restarted_broker_keeps_its_mesh_key_so_nodes_read_on_without_a_hello() {
    let mut m = mesh();
    welcome(&mut m, NOW);
    let in_use = m.ring.current(NOW).epoch;
    let text = m.ring.to_text();
    let later = NOW + 5_000;
    let restored = MeshRing::restore(&text, later, MAX_IN_USE).unwrap();
    assert_eq!(restored.kept, Some(in_use));
    let mut ring = restored.ring;
    assert_eq!(ring.current(later).epoch, in_use);
    let group = m
        .sealer
        .seal_group(ring.current(later), b"j a\0", b"work", later)
        .unwrap();
    assert_eq!(m.node.open(b"j a\0", &group, later).unwrap(), b"work");
    // A new key is announced at once and used after the announcement, like any rotation.
    let announced = restored.announced.unwrap();
    assert!(announced > in_use);
    assert_eq!(epochs(&mut ring, later), vec![in_use, announced]);
    assert_eq!(ring.current(later + MESH_KEY_ANNOUNCE_MS).epoch, announced);
}

#[test]
fn a_restored_ring_withdraws_the_key_announced_before_the_restart() {
    // After a revocation seen while down, the revoked node may hold the announced key.
    let mut ring = MeshRing::new(NOW);
    let old = ring.current(NOW).epoch;
    let announced_before = ring.rotate(NOW);
    let restored = MeshRing::restore(&ring.to_text(), NOW + 1_000, MAX_IN_USE).unwrap();
    let mut ring = restored.ring;
    let now_held = epochs(&mut ring, NOW + 1_000);
    assert!(!now_held.contains(&announced_before), "{now_held:?}");
    assert_eq!(now_held, vec![old, restored.announced.unwrap()]);
}

#[test]
fn a_ring_kept_too_long_or_dated_ahead_starts_afresh_with_higher_epochs() {
    let mut ring = MeshRing::new(NOW);
    ring.rotate(NOW);
    let text = ring.to_text();
    let last = ring.last_epoch;
    // The key in use has served its lifetime (and an announcement) by now.
    let late = NOW + MAX_IN_USE + MESH_KEY_ANNOUNCE_MS + 1;
    let restored = MeshRing::restore(&text, late, MAX_IN_USE).unwrap();
    assert_eq!(restored.kept, None);
    let mut fresh = restored.ring;
    assert!(epochs(&mut fresh, late).iter().all(|e| *e > last));
    // A clock set back an hour: every saved key claims to start in the future.
    let early = NOW - HOUR_MS;
    let restored = MeshRing::restore(&text, early, MAX_IN_USE).unwrap();
    assert_eq!(restored.kept, None);
    let mut fresh = restored.ring;
    assert!(epochs(&mut fresh, early).iter().all(|e| *e > last));
}

#[test]
fn a_superseded_key_past_its_retention_is_not_restored() {
    let mut ring = MeshRing::new(NOW);
    let old = ring.current(NOW).epoch;
    let next = ring.rotate(NOW);
    let superseded_at = NOW + MESH_KEY_ANNOUNCE_MS;
    let text = ring.to_text();
    let within = superseded_at + MESH_KEY_RETAIN_MS - 1_000;
    let mut kept = MeshRing::restore(&text, within, MAX_IN_USE).unwrap().ring;
    assert!(epochs(&mut kept, within).contains(&old));
    let past = superseded_at + MESH_KEY_RETAIN_MS + 1_000;
    let restored = MeshRing::restore(&text, past, MAX_IN_USE).unwrap();
    assert_eq!(restored.kept, Some(next));
    let mut kept = restored.ring;
    assert!(!epochs(&mut kept, past).contains(&old));
}

#[test]
fn damaged_ring_texts_are_errors_not_panics() {
    let mut ring = MeshRing::new(NOW);
    ring.rotate(NOW);
    let text = ring.to_text();
    for cut in 0..text.len() {
        let _ = MeshRing::restore(&text[..cut], NOW, MAX_IN_USE);
    }
    let key = STANDARD.encode([7u8; 32]);
    let short = STANDARD.encode([7u8; 31]);
    let bad = [
        String::new(),
        "# only a comment\n".to_owned(),
        "jobz-mesh-ring v2 last_epoch=5\n".to_owned(),
        "jobz-mesh-ring v1 last_epoch=x\n".to_owned(),
        format!("jobz-mesh-ring v1 last_epoch=5\nkey 6 {NOW} {key}\n"),
        format!("jobz-mesh-ring v1 last_epoch=5\nkey 3 {NOW} {key}\nkey 2 {NOW} {key}\n"),
        format!(
            "jobz-mesh-ring v1 last_epoch=5\nkey 2 {NOW} {key}\nkey 3 {} {key}\n",
            NOW - 1
        ),
        format!("jobz-mesh-ring v1 last_epoch=5\nkey 3 {NOW} {short}\n"),
        format!("jobz-mesh-ring v1 last_epoch=5\nkey 3 {NOW} not-base64!\n"),
        format!("jobz-mesh-ring v1 last_epoch=5\nkey 3 {NOW}\n"),
        format!("jobz-mesh-ring v1 last_epoch=5\nmesh 3 {NOW} {key}\n"),
        format!(
            "jobz-mesh-ring v1 last_epoch=99\n{}",
            (1..=17)
                .map(|e| format!("key {e} {NOW} {key}\n"))
                .collect::<String>()
        ),
    ];
    for text in bad {
        assert!(
            MeshRing::restore(&text, NOW, MAX_IN_USE).is_err(),
            "accepted {text:?}"
        );
    }
    // A ring with no key left is fine: it starts afresh.
    let empty = MeshRing::restore("jobz-mesh-ring v1 last_epoch=5\n", NOW, MAX_IN_USE).unwrap();
    assert_eq!(empty.kept, None);
}

#[test]
fn a_key_reusing_an_epoch_number_is_told_apart_from_a_missing_one() {
    // A broker that lost its ring and started again within the same second.
    let mut m = mesh();
    welcome(&mut m, NOW);
    let restarted = MeshRing::new(NOW);
    let epoch = restarted.current(NOW).epoch;
    assert_eq!(epoch, m.ring.current(NOW).epoch, "same second, same number");
    let work = m
        .sealer
        .seal_group(restarted.current(NOW), b"j a\0", b"work", NOW)
        .unwrap();
    assert_eq!(
        m.node.open(b"j a\0", &work, NOW).unwrap_err(),
        OpenError::MeshKeyMismatch(epoch)
    );
    // The restarted broker's next pair frame brings its key; the same frame then opens.
    m.ring = restarted;
    welcome(&mut m, NOW);
    assert_eq!(m.node.open(b"j a\0", &work, NOW).unwrap(), b"work");
}
