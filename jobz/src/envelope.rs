//! The frame format: a fixed header, then one MessagePack-encoded [`Envelope`].
//!
//! Every frame starts with the magic bytes `JZ` and the protocol version (big-endian `u16`),
//! so a peer speaking another version is recognised before anything is deserialised.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::message::Message;

/// Version of the wire protocol; checked on every frame.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest frame any jobz socket accepts (also set as `ZMQ_MAXMSGSIZE`).
pub const MAX_FRAME_BYTES: usize = 1 << 20;

const MAGIC: [u8; 2] = *b"JZ";
const HEADER_LEN: usize = 4;

/// Identifies one message; resends reuse it so the receiver can drop duplicates.
pub type MessageId = String;

/// One message on the wire, with who sent it and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per message (a UUIDv7); a resend keeps the id.
    pub id: MessageId,
    /// Node id of the sender, e.g. `worker:web1` or `frontend:3f2a…`.
    pub sender: String,
    /// Sender's clock, milliseconds since the Unix epoch.
    pub sent_at_ms: i64,
    /// What the message says.
    pub body: Message,
}

impl Envelope {
    /// A new envelope with a fresh id, stamped now.
    pub fn new(sender: &str, body: Message) -> Self {
        Envelope {
            id: crate::new_id(),
            sender: sender.to_owned(),
            sent_at_ms: crate::now_ms(),
            body,
        }
    }
}

/// Why a frame could not be decoded. Every variant means: log it, count it, drop the frame.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// The frame is larger than [`MAX_FRAME_BYTES`].
    #[error("frame of {size} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge {
        /// Size of the refused frame.
        size: usize,
    },
    /// The frame does not start with the jobz magic bytes.
    #[error("not a jobz frame ({size} bytes, bad magic)")]
    BadMagic {
        /// Size of the refused frame.
        size: usize,
    },
    /// A peer speaks another protocol version.
    #[error("protocol version {found} is not supported (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// Version found in the header.
        found: u16,
    },
    /// The body is not a valid envelope.
    #[error("malformed envelope: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
}

/// Why a message could not be encoded.
#[derive(Debug, Error)]
pub enum EncodeError {
    /// Serialisation failed (should not happen for well-formed messages).
    #[error("cannot encode message: {0}")]
    Serialize(#[from] rmp_serde::encode::Error),
    /// The encoded message would exceed [`MAX_FRAME_BYTES`].
    #[error("encoded message of {size} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge {
        /// Size the frame would have had.
        size: usize,
    },
}

/// Encodes an envelope into one frame.
pub fn encode(envelope: &Envelope) -> Result<Vec<u8>, EncodeError> {
    let mut frame = Vec::with_capacity(256);
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    // Named fields: a newer peer may add optional fields without breaking this one.
    rmp_serde::encode::write_named(&mut frame, envelope)?;
    if frame.len() > MAX_FRAME_BYTES {
        return Err(EncodeError::TooLarge { size: frame.len() });
    }
    Ok(frame)
}

/// Decodes one frame, checking size, magic and protocol version first.
pub fn decode(frame: &[u8]) -> Result<Envelope, DecodeError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge { size: frame.len() });
    }
    if frame.len() < HEADER_LEN || frame[..2] != MAGIC {
        return Err(DecodeError::BadMagic { size: frame.len() });
    }
    let version = u16::from_be_bytes([frame[2], frame[3]]);
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: version });
    }
    Ok(rmp_serde::from_slice(&frame[HEADER_LEN..])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Message, Role};

    fn hello() -> Envelope {
        Envelope::new("worker:a", Message::Hello { role: Role::Worker })
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let env = hello();
        let frame = encode(&env).unwrap();
        assert_eq!(decode(&frame).unwrap(), env);
    }

    #[test]
    fn other_protocol_version_is_refused() {
        let mut frame = encode(&hello()).unwrap();
        frame[3] = frame[3].wrapping_add(1);
        assert!(matches!(
            decode(&frame),
            Err(DecodeError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        assert!(matches!(decode(b""), Err(DecodeError::BadMagic { .. })));
        assert!(matches!(
            decode(b"hello world"),
            Err(DecodeError::BadMagic { .. })
        ));
        let frame = encode(&hello()).unwrap();
        for cut in 0..frame.len() {
            assert!(
                decode(&frame[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        let mut flipped = frame.clone();
        for i in 4..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = decode(&flipped); // must not panic
            flipped[i] ^= 0xff;
        }
    }

    #[test]
    fn a_heartbeat_from_a_worker_without_counters_still_decodes() {
        /// `WorkerStatus` as workers before the counters sent it.
        #[derive(serde::Serialize)]
        struct OldStatus {
            name: String,
            instance: String,
            jobs: Vec<crate::jobfile::JobSpec>,
            slots: u32,
            version: String,
        }
        #[derive(serde::Serialize)]
        enum OldMessage {
            Heartbeat(OldStatus),
        }
        #[derive(serde::Serialize)]
        struct OldEnvelope {
            id: String,
            sender: String,
            sent_at_ms: i64,
            body: OldMessage,
        }
        let old = OldEnvelope {
            id: "m1".into(),
            sender: "worker:a".into(),
            sent_at_ms: 1,
            body: OldMessage::Heartbeat(OldStatus {
                name: "a".into(),
                instance: "i".into(),
                jobs: vec![],
                slots: 2,
                version: "0.1".into(),
            }),
        };
        let mut frame = Vec::from(MAGIC);
        frame.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        rmp_serde::encode::write_named(&mut frame, &old).unwrap();
        match decode(&frame).unwrap().body {
            Message::Heartbeat(status) => {
                assert_eq!((status.name.as_str(), status.slots), ("a", 2));
                assert!(status.counters.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn counter_names_are_metric_names() {
        use crate::message::is_valid_counter_name;
        for good in ["output_files_pruned", "a", "x1_2"] {
            assert!(is_valid_counter_name(good), "{good}");
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "1a",
            "_a",
            "A",
            "a-b",
            "a b",
            "a{x=\"1\"}",
            "é",
            long.as_str(),
        ] {
            assert!(!is_valid_counter_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_parsing() {
        let frame = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(decode(&frame), Err(DecodeError::TooLarge { .. })));
    }
}
