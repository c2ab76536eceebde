//! Issue 10, enrolment as an attacker tries it: a key squatting a name before the real
//! node, a flood of hellos from new keys, a frame sent while pending and replayed after
//! `keys accept`, and a mistyped `--keys`. Real broker and CLI; the nodes are clients of
//! this test process (the same hello code the binaries run) or raw sealed frames on a
//! PUSH socket.

use std::process::{Command, Output};
use std::time::Duration;

use jobz::client::{Client, ClientConfig};
use jobz::envelope::{self, Envelope};
use jobz::keys::{NodeIdentity, NodeKey, PublicKey};
use jobz::message::{Message, Role};
use jobz::seal::NodeSeal;

use crate::harness::*;
use crate::mesh_security::{echo_trigger, ledger};

/// Runs `jobz-broker keys ARGS… --keys <dir>` whatever its exit status.
fn keys_command(mesh: &Mesh, args: &[&str]) -> Output {
    Command::new(bin("jobz-broker"))
        .arg("keys")
        .args(args)
        .arg("--keys")
        .arg(mesh.keys_dir())
        .output()
        .expect("running jobz-broker keys")
}

/// The lines of one section (`accepted`, `pending`, `rejected`) of `keys list`.
fn listed(mesh: &Mesh, section: &str) -> Vec<String> {
    let list = mesh.broker_keys(&["list"]);
    let header = format!("{section}:");
    list.lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// `key` with the broker key the mesh's nodes trust.
fn identity(mesh: &Mesh, key: NodeKey) -> NodeIdentity {
    NodeIdentity {
        key,
        brokers: jobz::keys::read_public_keys(&mesh.broker_pub()).unwrap(),
    }
}

/// A node of this test process with `key`, saying hello as `node_id`.
fn node_client(mesh: &Mesh, node_id: &str, role: Role, key: NodeKey) -> Client {
    let mut config = ClientConfig::new(
        format!("127.0.0.1:{}", mesh.base_port).parse().unwrap(),
        node_id.into(),
        role,
    );
    config.identity = Some(identity(mesh, key));
    Client::start(config).unwrap()
}

/// A node of this test process with a key no one accepted, and that key.
fn unenrolled_node(mesh: &Mesh, node_id: &str, role: Role) -> (Client, PublicKey) {
    let key = NodeKey::generate().unwrap();
    let public = key.public();
    (node_client(mesh, node_id, role, key), public)
}

/// A raw PUSH socket to the broker's PULL port.
fn pull_socket(mesh: &Mesh, ctx: &zmq::Context) -> zmq::Socket {
    let push = ctx.socket(zmq::PUSH).unwrap();
    push.connect(&format!("tcp://127.0.0.1:{}", mesh.base_port + 1))
        .unwrap();
    push
}

/// `message` from `sender`, sealed by `node` now.
fn sealed(node: &mut NodeSeal, sender: &str, message: Message) -> Vec<u8> {
    let frame = envelope::encode(&Envelope::new(sender, message)).unwrap();
    node.seal(&frame, jobz::now_ms()).unwrap()
}

fn new_node_seal(mesh: &Mesh) -> NodeSeal {
    NodeSeal::new(identity(mesh, NodeKey::generate().unwrap()))
}

#[test]
fn a_squatted_name_is_ambiguous_until_the_operator_picks_the_fingerprint() {
    let mesh = Mesh::builder().sealed().start();
    // The attacker says hello as worker:w3 first; the real w3 comes second.
    let (attacker, attacker_key) = unenrolled_node(&mesh, "worker:w3", Role::Worker);
    let attacker_print = attacker_key.fingerprint();
    wait_until(Duration::from_secs(10), "the squatter is pending", || {
        listed(&mesh, "pending")
            .iter()
            .any(|l| l.contains(&attacker_print))
    });
    let (real, real_key) = unenrolled_node(&mesh, "worker:w3", Role::Worker);
    let real_print = real_key.fingerprint();
    wait_until(Duration::from_secs(10), "both keys are pending", || {
        let pending = listed(&mesh, "pending");
        [&attacker_print, &real_print].iter().all(|p| {
            pending
                .iter()
                .any(|l| l.starts_with("worker:w3") && l.contains(*p))
        })
    });
    wait_until(
        Duration::from_secs(5),
        "the broker warns of the conflict",
        || {
            mesh.stderr_of("broker")
                .contains("another key asks to join under a name that has a pending key")
        },
    );

    // Accepting by name alone is refused, naming both fingerprints.
    let refused = keys_command(&mesh, &["accept", "w3"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "accepted an ambiguous name: {stderr}"
    );
    assert!(stderr.contains("ambiguous"), "{stderr}");
    assert!(
        stderr.contains(&attacker_print) && stderr.contains(&real_print),
        "{stderr}"
    );
    let w3_accepted = || -> Vec<String> {
        listed(&mesh, "accepted")
            .into_iter()
            .filter(|l| l.starts_with("worker:w3 "))
            .collect()
    };
    assert!(w3_accepted().is_empty(), "a key was accepted");

    // The fingerprint picks the real key; only that one is enrolled.
    assert_eq!(
        mesh.broker_keys(&["accept", "w3", "--fingerprint", &real_print])
            .trim(),
        "accepted worker:w3"
    );
    assert!(
        real.wait_connected(Duration::from_secs(10)),
        "the accepted key was not welcomed"
    );
    let accepted = w3_accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert!(accepted[0].contains(&real_print), "{accepted:?}");
    assert!(!accepted[0].contains(&attacker_print), "{accepted:?}");
    // The squatter stays pending, flagged, and refused.
    let pending = listed(&mesh, "pending");
    assert!(
        pending
            .iter()
            .any(|l| l.contains(&attacker_print) && l.contains("already has an accepted key")),
        "{pending:?}"
    );
    let refused_before = mesh.broker_counter("frames_dropped_unknown_key");
    wait_until(
        Duration::from_secs(5),
        "the squatter is still refused",
        || mesh.broker_counter("frames_dropped_unknown_key") > refused_before,
    );
    assert!(!attacker.is_connected(), "the squatter was welcomed");

    // And it can be rejected by fingerprint, which leaves the real key alone.
    mesh.broker_keys(&["reject", "worker:w3", "--fingerprint", &attacker_print]);
    assert!(listed(&mesh, "pending").is_empty());
    assert!(listed(&mesh, "rejected")[0].contains(&attacker_print));
    assert!(w3_accepted()[0].contains(&real_print));
    attacker.shutdown();
    real.shutdown();
}

#[test]
fn a_thousand_junk_hellos_do_not_lock_out_a_real_new_host() {
    let mesh = Mesh::builder().sealed().start();
    let ctx = zmq::Context::new();
    let push = pull_socket(&mesh, &ctx);
    let refused_before = mesh.broker_counter("frames_dropped_unknown_key");
    // One key under 200 names, then 800 keys of their own.
    let mut greedy = new_node_seal(&mesh);
    let greedy_print = greedy.public().fingerprint();
    for i in 0..200 {
        let name = format!("worker:greedy{i}");
        let hello = Message::Hello { role: Role::Worker };
        push.send(sealed(&mut greedy, &name, hello), 0).unwrap();
    }
    for i in 0..800 {
        let hello = Message::Hello { role: Role::Worker };
        let frame = sealed(&mut new_node_seal(&mesh), &format!("worker:junk{i}"), hello);
        push.send(frame, 0).unwrap();
    }
    wait_until(
        Duration::from_secs(20),
        "the junk hellos are refused",
        || mesh.broker_counter("frames_dropped_unknown_key") >= refused_before + 1000,
    );

    let (host, _) = unenrolled_node(&mesh, "worker:late", Role::Worker);
    wait_until(Duration::from_secs(10), "the new host is pending", || {
        listed(&mesh, "pending")
            .iter()
            .any(|l| l.starts_with("worker:late "))
    });
    let pending = listed(&mesh, "pending");
    let of_greedy = pending.iter().filter(|l| l.contains(&greedy_print)).count();
    assert!(
        (1..=4).contains(&of_greedy),
        "one key holds {of_greedy} pending entries"
    );
    assert!(pending.len() <= 1000, "{} pending entries", pending.len());

    assert_eq!(
        mesh.broker_keys(&["accept", "late"]).trim(),
        "accepted worker:late"
    );
    assert!(
        host.wait_connected(Duration::from_secs(10)),
        "the accepted host was not welcomed"
    );
    host.shutdown();
}

#[test]
fn a_trigger_sent_while_pending_and_replayed_after_acceptance_is_refused() {
    let mesh = Mesh::builder().sealed().worker("w1", ECHO_JOB).start();
    mesh.wait_workers_live(1);
    let ctx = zmq::Context::new();
    let push = pull_socket(&mesh, &ctx);
    let key = NodeKey::generate().unwrap();
    let mut node = NodeSeal::new(identity(&mesh, key.clone()));

    // Sent while the key is unknown: dropped, and the key is filed as pending.
    let trigger = sealed(&mut node, "frontend:late/1", echo_trigger("pending"));
    let refused_before = mesh.broker_counter("frames_dropped_unknown_key");
    push.send(&trigger, 0).unwrap();
    wait_until(Duration::from_secs(10), "the trigger is refused", || {
        mesh.broker_counter("frames_dropped_unknown_key") > refused_before
    });
    wait_until(Duration::from_secs(10), "the key is pending", || {
        listed(&mesh, "pending")
            .iter()
            .any(|l| l.starts_with("frontend:late "))
    });
    assert_eq!(
        mesh.broker_keys(&["accept", "frontend:late"]).trim(),
        "accepted frontend:late"
    );

    // The broker knows the key now: a second link with the same key is welcomed.
    let client = node_client(&mesh, "frontend:late/2", Role::Frontend, key);
    assert!(
        client.wait_connected(Duration::from_secs(10)),
        "the accepted key was not welcomed"
    );
    // …then the captured trigger is played again.
    let dropped_before = mesh.broker_counter("frames_dropped");
    push.send(&trigger, 0).unwrap();
    wait_until(Duration::from_secs(10), "the replay is handled", || {
        mesh.broker_counter("frames_dropped") > dropped_before || {
            let (_, runs) = mesh.get_json("/runs");
            !list_of(&runs, "runs").is_empty()
        }
    });
    let (_, runs) = mesh.get_json("/runs");
    assert!(
        list_of(&runs, "runs").is_empty(),
        "a trigger sealed while its key was pending ran after `keys accept`: {runs:#}"
    );
    assert!(mesh.broker_counter("frames_dropped_before_acceptance") > 0);
    assert_eq!(ledger(&mesh), "");
    client.shutdown();
}

#[test]
fn keys_commands_on_a_missing_directory_fail_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("typo").join("broker-keys");
    for args in [
        &["list"][..],
        &["accept", "worker:w1"],
        &["reject", "worker:w1"],
        &["revoke", "worker:w1"],
    ] {
        let out = Command::new(bin("jobz-broker"))
            .arg("keys")
            .args(args)
            .arg("--keys")
            .arg(&wrong)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "keys {args:?} succeeded: {stderr}");
        assert!(
            stderr.contains("no key directory") && stderr.contains(&*wrong.to_string_lossy()),
            "keys {args:?}: {stderr}"
        );
        assert!(!dir.path().join("typo").exists(), "keys {args:?} made it");
    }
}
