//! `jobz::seal`: opening sealed frames, as the broker (`BrokerOpener::open`, frames from
//! nodes) and as a node (`NodeSeal::open`, frames the broker publishes). Anyone who can
//! reach a socket can send one, so opening must refuse, never panic; and no change to a
//! genuine frame may open: a frame that opens after a change is a forgery.
//!
//! Input: a mode byte, then
//! - mode 0: a raw frame for the broker to open;
//! - mode 1: a topic length byte, the topic, then a raw frame for a node to open;
//! - mode 2..: a payload sealed for real (node → broker pair frame, broker → node pair
//!   frame with mesh keys, broker group frame) and then changed by the rest of the input
//!   (pairs of position, xor byte; or a truncation), then opened.
//!
//! Keys are made once per process (random): raw frames cannot authenticate anyway, and the
//! properties do not depend on which keys.
#![no_main]

use std::sync::OnceLock;

use jobz::keys::{NodeIdentity, NodeKey};
use jobz::seal::{BrokerOpener, BrokerSealer, MeshRing, NodeSeal};
use libfuzzer_sys::fuzz_target;

/// Clock of every sealer and opener: frames are always fresh unless a change moves theirs.
const NOW_MS: i64 = 1_790_000_000_000;

struct Keys {
    broker: NodeKey,
    node: NodeKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let (Ok(broker), Ok(node)) = (NodeKey::generate(), NodeKey::generate()) else {
            panic!("cannot generate keys");
        };
        Keys { broker, node }
    })
}

fn node_seal(keys: &Keys) -> NodeSeal {
    NodeSeal::new(NodeIdentity {
        key: keys.node.clone(),
        brokers: vec![keys.broker.public()],
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let keys = keys();
    match mode % 3 {
        0 => {
            let mut opener = BrokerOpener::new(&keys.broker);
            let _ = opener.open(rest, NOW_MS, |_| true);
        }
        1 => {
            let Some((&topic_len, rest)) = rest.split_first() else {
                return;
            };
            let (topic, frame) = rest.split_at((topic_len as usize).min(rest.len()));
            let _ = node_seal(keys).open(topic, frame, NOW_MS);
        }
        _ => forgery(keys, mode, rest),
    }
});

/// Seals a payload for real, applies the changes the input describes, opens the result.
fn forgery(keys: &Keys, mode: u8, rest: &[u8]) {
    // The first half is the payload, the second the changes.
    let (payload, changes) = rest.split_at(rest.len() / 2);
    let topic: &[u8] = b"job.reindex";
    let mut node = node_seal(keys);
    let mut sealer = BrokerSealer::new(&keys.broker);
    let ring = MeshRing::new(NOW_MS);
    let mesh = ring.current(NOW_MS).clone();
    let which = (mode / 3) % 3;
    let sealed = match which {
        0 => node.seal(payload, NOW_MS),
        1 => sealer.seal_to(&keys.node.public(), topic, payload, &[mesh.clone()], NOW_MS),
        _ => sealer.seal_group(&mesh, topic, payload, NOW_MS),
    };
    let Ok(genuine) = sealed else {
        return;
    };
    let mut frame = genuine.clone();
    for change in changes.chunks(3) {
        match *change {
            [0xff, cut, _] => frame.truncate(cut as usize * frame.len() / 256),
            [hi, lo, xor] => {
                let at = (usize::from(hi) << 8 | usize::from(lo)) % frame.len().max(1);
                if let Some(b) = frame.get_mut(at) {
                    *b ^= xor;
                }
            }
            _ => {}
        }
    }
    let opened = match which {
        0 => BrokerOpener::new(&keys.broker)
            .open(&frame, NOW_MS, |_| true)
            .map(|o| o.inner),
        1 => node_seal(keys).open(topic, &frame, NOW_MS),
        _ => {
            // A node learns the mesh key from a pair frame first, as in the mesh.
            let mut node = node_seal(keys);
            let Ok(hello) = sealer.seal_to(&keys.node.public(), topic, b"", &[mesh], NOW_MS) else {
                return;
            };
            if let Err(e) = node.open(topic, &hello, NOW_MS) {
                panic!("a genuine pair frame does not open: {e}");
            }
            node.open(topic, &frame, NOW_MS)
        }
    };
    match opened {
        Ok(inner) => {
            assert_eq!(frame, genuine, "a changed frame opened (forgery)");
            assert_eq!(inner, payload, "opened to another payload");
        }
        Err(e) => assert!(frame != genuine, "a genuine frame does not open: {e}"),
    }
}
