//! PUB/SUB topics, made exact.
//!
//! ZeroMQ subscriptions match by prefix: subscribing to `import` would also deliver
//! `import_category_dump` (the original jobz bug). Every topic is therefore a kind byte,
//! the name, and a terminating NUL, which no name may contain; the prefix then only matches
//! the exact name. Receivers check again with [`Topic::parse`] before acting.

use std::fmt;

/// A topic on the broker's PUB socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Work for a job, received by the workers that serve it.
    Job(String),
    /// Replies to one node, by node id.
    Node(String),
    /// Completion events of a job, received by semaphores.
    Events(String),
    /// The broker's feed of run and task changes ([`Topic::feed`]), received by frontends.
    Feed(String),
}

impl Topic {
    /// The one feed topic: every run's changes (`f runs`).
    pub fn feed() -> Topic {
        Topic::Feed("runs".into())
    }

    fn kind(&self) -> u8 {
        match self {
            Topic::Job(_) => b'j',
            Topic::Node(_) => b'n',
            Topic::Events(_) => b'e',
            Topic::Feed(_) => b'f',
        }
    }

    fn name(&self) -> &str {
        match self {
            Topic::Job(n) | Topic::Node(n) | Topic::Events(n) | Topic::Feed(n) => n,
        }
    }

    /// The topic frame, also the exact subscription prefix.
    pub fn to_bytes(&self) -> Vec<u8> {
        let name = self.name().as_bytes();
        let mut bytes = Vec::with_capacity(name.len() + 3);
        bytes.push(self.kind());
        bytes.push(b' ');
        bytes.extend_from_slice(name);
        bytes.push(0);
        bytes
    }

    /// Parses a received topic frame; `None` for anything not produced by [`Topic::to_bytes`].
    pub fn parse(frame: &[u8]) -> Option<Topic> {
        let (&kind, rest) = frame.split_first()?;
        let rest = rest.strip_prefix(b" ")?;
        let name = rest.strip_suffix(&[0])?;
        if name.contains(&0) {
            return None;
        }
        let name = std::str::from_utf8(name).ok()?.to_owned();
        match kind {
            b'j' => Some(Topic::Job(name)),
            b'n' => Some(Topic::Node(name)),
            b'e' => Some(Topic::Events(name)),
            b'f' => Some(Topic::Feed(name)),
            _ => None,
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind() as char, self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for t in [
            Topic::Job("import".into()),
            Topic::Node("worker:web1".into()),
            Topic::Events("a.b-c".into()),
            Topic::feed(),
        ] {
            assert_eq!(Topic::parse(&t.to_bytes()), Some(t));
        }
    }

    #[test]
    fn a_job_topic_is_not_a_prefix_of_a_longer_job_topic() {
        let short = Topic::Job("import".into()).to_bytes();
        let long = Topic::Job("import_category_dump".into()).to_bytes();
        assert!(!long.starts_with(&short));
    }

    #[test]
    fn foreign_frames_are_not_topics() {
        assert_eq!(Topic::parse(b""), None);
        assert_eq!(Topic::parse(b"j import"), None);
        assert_eq!(Topic::parse(b"x import\0"), None);
        assert_eq!(Topic::parse(b"j im\0port\0"), None);
        assert_eq!(Topic::parse(b"j \xff\0"), None);
    }
}
