//! The frontend's view of the broker: "send this request, give me the reply".
//!
//! Handlers talk to the broker only through the [`Broker`] trait, so the routing and the
//! waiting logic are tested with a fake and no sockets. The real implementation is
//! [`jobz::client::Client`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use crossbeam_channel::Receiver;
use jobz::client::{Client, ClientError};
use jobz::message::{Message, ReplyBody};

/// Where the reply to a request arrives.
pub type ReplyReceiver = Receiver<Result<ReplyBody, ClientError>>;

/// State of the link to the broker, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// The broker has welcomed this node.
    pub connected: bool,
    /// Requests resent after no reply.
    pub resends: u64,
    /// Frames from the broker that were dropped.
    pub dropped_frames: u64,
}

/// Something that answers broker requests.
pub trait Broker: Send + Sync {
    /// Sends a request; its reply, or `ClientError::Timeout` after `timeout`, arrives on
    /// the returned channel.
    fn request_async(&self, body: Message, timeout: Duration) -> ReplyReceiver;

    /// Sends a request and waits for its reply.
    fn request(&self, body: Message, timeout: Duration) -> Result<ReplyBody, ClientError> {
        self.request_async(body, timeout)
            .recv()
            .unwrap_or(Err(ClientError::Closed))
    }

    /// The link's state, if there is a link.
    fn link_status(&self) -> Option<LinkStatus> {
        None
    }

    /// Waits up to `timeout` until the broker has welcomed this node at least once.
    fn wait_connected(&self, _timeout: Duration) -> bool {
        true
    }
}

impl Broker for Client {
    fn request_async(&self, body: Message, timeout: Duration) -> ReplyReceiver {
        Client::request_async(self, body, timeout)
    }

    fn link_status(&self) -> Option<LinkStatus> {
        Some(LinkStatus {
            connected: self.is_connected(),
            resends: self.stats().resends.load(Ordering::Relaxed),
            dropped_frames: self.stats().dropped_frames.load(Ordering::Relaxed),
        })
    }

    fn wait_connected(&self, timeout: Duration) -> bool {
        Client::wait_connected(self, timeout)
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A broker that answers from a closure, for tests.

    use std::sync::Mutex;

    use super::*;

    type Answer = dyn Fn(&Message) -> Result<ReplyBody, ClientError> + Send + Sync;

    /// Answers every request at once with what the closure says, and records requests.
    pub struct FakeBroker {
        answer: Box<Answer>,
        /// What `wait_connected` says.
        pub connected: bool,
        /// Every request received, in order.
        pub seen: Mutex<Vec<Message>>,
    }

    impl FakeBroker {
        pub fn new(
            answer: impl Fn(&Message) -> Result<ReplyBody, ClientError> + Send + Sync + 'static,
        ) -> Self {
            FakeBroker {
                answer: Box::new(answer),
                connected: true,
                seen: Mutex::new(Vec::new()),
            }
        }

        /// A broker that never answers in time.
        pub fn down() -> Self {
            Self::new(|_| Err(ClientError::Timeout(Duration::from_secs(5))))
        }

        pub fn seen(&self) -> Vec<Message> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl Broker for FakeBroker {
        fn request_async(&self, body: Message, _timeout: Duration) -> ReplyReceiver {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let _ = tx.send((self.answer)(&body));
            self.seen.lock().unwrap().push(body);
            rx
        }

        fn wait_connected(&self, _timeout: Duration) -> bool {
            self.connected
        }
    }
}
