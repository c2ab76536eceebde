use super::*;
use jobz::keys::{NodeIdentity, NodeKey};
use jobz::message::{Message, Role};
use jobz::seal::NodeSeal;

const NOW: i64 = 1_800_000_000_000;

struct Lab {
    _dir: tempfile::TempDir,
    keys: KeyDir,
    inbound: Inbound,
    outbound: Outbound,
    broker: PublicKey,
}

fn lab_with(auto_accept: bool) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeyDir::open(dir.path()).unwrap();
    let security = Security::Sealed(SealedConfig {
        keys: keys.clone(),
        auto_accept,
        mesh_key_lifetime: Duration::from_secs(3600),
    });
    let (inbound, outbound) = build(&security, NOW).unwrap();
    let broker = keys.broker_key().unwrap().0.public();
    Lab {
        _dir: dir,
        keys,
        inbound,
        outbound,
        broker,
    }
}

fn lab() -> Lab {
    lab_with(false)
}

impl Lab {
    fn node(&self) -> NodeSeal {
        NodeSeal::new(NodeIdentity {
            key: NodeKey::generate().unwrap(),
            brokers: vec![self.broker],
        })
    }

    fn inner(&mut self) -> &mut SealedInbound {
        match &mut self.inbound {
            Inbound::Sealed(s) => s,
            Inbound::Plain => panic!("the lab is sealed"),
        }
    }

    /// Makes the guard read the key directory now, as its tick does when it changed.
    fn reload(&mut self) {
        self.inner().reload_keys(NOW);
    }

    /// Writes what the guard holds pending to `pending/`, as its ticks do.
    fn flush_pending(&mut self) {
        while self.inner().pending.has_dirty() {
            self.inner().write_pending(NOW);
        }
    }

    fn admit(&mut self, frame: Vec<u8>, at: i64) -> Result<Envelope, Refusal> {
        self.inbound.admit(&[frame], at)
    }

    fn replies_to(&mut self, node_id: &str) -> bool {
        let topic = Topic::Node(node_id.to_owned());
        self.outbound.seal(&topic, b"JZ reply".to_vec()).is_some()
    }
}

fn hello(node: &mut NodeSeal, sender: &str, at: i64) -> Vec<u8> {
    let env = Envelope::new(
        sender,
        Message::Hello {
            role: Role::Frontend,
        },
    );
    node.seal(&envelope::encode(&env).unwrap(), at).unwrap()
}

fn remembered_sender_ids(lab: &mut Lab) -> usize {
    lab.inner().shared.reply_keys.lock().unwrap().len()
}

#[test]
fn one_key_cannot_grow_the_reply_keys_with_endless_sender_ids() {
    let mut lab = lab();
    let mut node = lab.node();
    let mut worker = lab.node();
    lab.keys.add("frontend:f1", &[node.public()]).unwrap();
    lab.keys.add("worker:w1", &[worker.public()]).unwrap();
    lab.reload();
    lab.admit(hello(&mut worker, "worker:w1", NOW), NOW)
        .unwrap();
    for i in 0..5_000 {
        let frame = hello(&mut node, &format!("frontend:f1/{i}"), NOW);
        lab.admit(frame, NOW).unwrap();
    }
    let remembered = remembered_sender_ids(&mut lab);
    assert!(
        remembered <= MAX_SENDER_IDS_PER_PRINCIPAL + 1,
        "{remembered} sender ids remembered for one key"
    );
    // Replies still reach the ids in use: the newest instance and the other principal.
    assert!(lab.replies_to("frontend:f1/4999"));
    assert!(
        lab.replies_to("worker:w1"),
        "another node's reply key was evicted"
    );
    assert!(!lab.replies_to("frontend:f1/0"));
    // A restarted frontend (new instance suffix) is answered at once.
    lab.admit(hello(&mut node, "frontend:f1/restarted", NOW), NOW)
        .unwrap();
    assert!(lab.replies_to("frontend:f1/restarted"));
    // An id too long to be a topic is not remembered (the engine refuses it).
    let long = format!("frontend:f1/{}", "x".repeat(300));
    let _ = lab.admit(hello(&mut node, &long, NOW), NOW);
    assert!(!lab.replies_to(&long));
}

#[test]
fn a_frame_sealed_while_the_key_was_pending_is_refused_after_acceptance() {
    let mut lab = lab();
    let mut node = lab.node();
    let trigger = hello(&mut node, "frontend:late/1", NOW);
    let (kind, _) = lab.admit(trigger.clone(), NOW).unwrap_err();
    assert_eq!(kind, "unknown_key");

    lab.keys.add("frontend:late", &[node.public()]).unwrap();
    lab.reload();
    let replayed = lab.admit(trigger, NOW + 1_000);
    assert!(
        replayed.is_err(),
        "a frame sent while pending was accepted when replayed after `keys accept`"
    );
    assert_eq!(replayed.unwrap_err().0, "before_acceptance");
    // The node's own frames after acceptance pass.
    let fresh = hello(&mut node, "frontend:late/1", NOW + 1_001);
    lab.admit(fresh, NOW + 1_001).unwrap();
}

#[test]
fn a_pending_frame_from_a_node_whose_clock_runs_ahead_is_refused_after_acceptance() {
    let mut lab = lab();
    let mut node = lab.node();
    // Sealed a minute ahead of the broker's clock, received while pending.
    let ahead = hello(&mut node, "frontend:fast/1", NOW + 60_000);
    assert!(lab.admit(ahead.clone(), NOW).is_err());
    lab.keys.add("frontend:fast", &[node.public()]).unwrap();
    lab.reload();
    assert_eq!(
        lab.admit(ahead, NOW + 500).unwrap_err().0,
        "before_acceptance"
    );
    let fresh = hello(&mut node, "frontend:fast/1", NOW + 60_501);
    lab.admit(fresh, NOW + 501).unwrap();
    // Once the clock window has passed, the cutoff is forgotten.
    lab.inner().cutoffs.prune(NOW + 60_001 + CUTOFF_KEPT_MS);
    assert!(lab.inner().cutoffs.not_before.is_empty());
}

#[test]
fn two_keys_asking_for_one_name_are_both_filed_as_pending() {
    let mut lab = lab();
    let (mut squatter, mut real) = (lab.node(), lab.node());
    for _ in 0..3 {
        assert!(lab
            .admit(hello(&mut squatter, "worker:w3", NOW), NOW)
            .is_err());
        assert!(lab
            .admit(hello(&mut real, "worker:w3", NOW + 1), NOW + 1)
            .is_err());
    }
    lab.flush_pending();
    let pending = lab.keys.pending().unwrap();
    let keys: Vec<PublicKey> = pending.iter().map(|p| p.key).collect();
    assert_eq!(keys.len(), 2, "{pending:?}");
    assert!(keys.contains(&squatter.public()) && keys.contains(&real.public()));
    assert!(pending.iter().all(|p| p.name == "worker:w3"));

    // Accepting one takes it out of the guard's pending set; the other stays.
    lab.keys
        .accept("w3", Some(&real.public().fingerprint()))
        .unwrap();
    lab.reload();
    lab.flush_pending();
    let left: Vec<PublicKey> = lab.keys.pending().unwrap().iter().map(|p| p.key).collect();
    assert_eq!(left, vec![squatter.public()]);
    lab.admit(hello(&mut real, "worker:w3", NOW + 2), NOW + 2)
        .unwrap();
    assert_eq!(
        lab.admit(hello(&mut squatter, "worker:w3", NOW + 2), NOW + 2)
            .unwrap_err()
            .0,
        "unknown_key"
    );
}

#[test]
fn a_rejected_key_is_not_filed_again() {
    let mut lab = lab();
    let mut node = lab.node();
    assert!(lab.admit(hello(&mut node, "worker:x", NOW), NOW).is_err());
    lab.flush_pending();
    lab.keys.reject("worker:x", None).unwrap();
    lab.reload();
    lab.flush_pending();
    assert!(lab
        .admit(hello(&mut node, "worker:x", NOW + 1), NOW + 1)
        .is_err());
    assert!(lab
        .admit(hello(&mut node, "worker:y", NOW + 2), NOW + 2)
        .is_err());
    lab.flush_pending();
    assert!(lab.keys.pending().unwrap().is_empty());
}

#[test]
fn a_flood_of_new_keys_is_written_a_bounded_number_of_files_per_tick() {
    let mut lab = lab();
    for i in 0..200 {
        let frame = hello(&mut lab.node(), &format!("worker:junk{i}"), NOW);
        assert!(lab.admit(frame, NOW).is_err());
    }
    lab.inner().write_pending(NOW);
    assert_eq!(lab.keys.pending().unwrap().len(), PENDING_WRITES_PER_TICK);
    lab.flush_pending();
    assert_eq!(lab.keys.pending().unwrap().len(), 200);
}

#[test]
fn auto_accept_takes_the_first_key_of_a_name_and_files_a_second_as_pending() {
    let mut lab = lab_with(true);
    let (mut first, mut second) = (lab.node(), lab.node());
    let early = hello(&mut first, "worker:lab1", NOW);
    assert!(
        lab.admit(early.clone(), NOW).is_err(),
        "the first frame predates acceptance"
    );
    lab.admit(hello(&mut first, "worker:lab1", NOW + 1), NOW + 1)
        .unwrap();
    assert_eq!(
        lab.admit(early, NOW + 2).unwrap_err().0,
        "before_acceptance"
    );

    assert!(lab
        .admit(hello(&mut second, "worker:lab1", NOW + 3), NOW + 3)
        .is_err());
    lab.reload();
    lab.flush_pending();
    let accepted = lab.keys.accepted().unwrap();
    assert_eq!(accepted.len(), 1);
    assert!(accepted.contains_key(&first.public()));
    let pending = lab.keys.pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].key, second.public());
}

#[test]
fn reply_keys_keep_the_most_recently_heard_ids_of_each_principal() {
    let mut keys = ReplyKeys::default();
    let (a, b) = (
        NodeKey::generate().unwrap().public(),
        NodeKey::generate().unwrap().public(),
    );
    keys.note("semaphore:s1/old", a);
    for i in 0..MAX_SENDER_IDS_PER_PRINCIPAL {
        keys.note(&format!("semaphore:s1/{i}"), a);
        keys.note("semaphore:s1/old", a); // still in use: heard again and again
    }
    keys.note("worker:w1", b);
    assert_eq!(keys.get("semaphore:s1/old"), Some(a));
    assert_eq!(
        keys.get("semaphore:s1/0"),
        None,
        "the least recently heard id went"
    );
    assert_eq!(keys.len(), MAX_SENDER_IDS_PER_PRINCIPAL + 1);
    keys.retain_keys(|k| *k == b);
    assert_eq!(keys.len(), 1);
    assert_eq!(keys.get("worker:w1"), Some(b));
}
