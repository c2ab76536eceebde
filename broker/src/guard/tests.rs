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
        self.inner().reload_keys();
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
