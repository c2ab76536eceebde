//! Who may say what: every message is checked against its sender before the engine sees it.
//!
//! The sender id names a principal, `ROLE:NAME` (`worker:web1`, `frontend:front1/…`,
//! `semaphore:s1/…`: everything before the first `/`). In sealed mode the guard has already
//! proven that the frame's key is enrolled under that principal; in plain mode the sender id
//! is taken as it comes. Either way the same two rules hold here:
//! - each message type has the roles that may send it ([`may_send`]);
//! - every name inside a message that says who is speaking is the sender's own: a worker
//!   reports and registers only as itself, a semaphore reports only its own status.
//!
//! [`authorize`] is the one check, pure and called once per message by the server.

use std::fmt;

use jobz::envelope::Envelope;
use jobz::jobfile::is_valid_name;
use jobz::keys::principal_of;
use jobz::message::{Message, Role};

use crate::engine::truncate;

/// The principal a message was authorized for: the sender's role and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    role: Role,
    name: String,
}

impl Principal {
    /// The sender's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The sender's name (`web1` for `worker:web1`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", role_name(self.role), self.name)
    }
}

/// Why a message was refused; [`Refusal::reason`] is its metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The sender id is not `ROLE:NAME[/…]` with a known role and a valid name, or cannot
    /// serve as a reply topic.
    BadSender {
        /// The sender id, cut short.
        sender: String,
    },
    /// The message id is empty, too long or not printable ASCII.
    BadMessageId,
    /// The sender's role may not send this message (or a hello claims another role).
    WrongRole {
        /// Who sent it.
        principal: String,
        /// What it sent.
        message: &'static str,
    },
    /// A name inside the message is not the sender's own.
    NameMismatch {
        /// Who sent it.
        principal: String,
        /// The field that names someone else.
        field: &'static str,
        /// What that field says, cut short.
        claimed: String,
    },
}

impl Refusal {
    /// The metric label: counted as `frames_dropped_<reason>`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadSender { .. } => "bad_sender",
            Refusal::BadMessageId => "bad_message_id",
            Refusal::WrongRole { .. } => "wrong_role",
            Refusal::NameMismatch { .. } => "name_mismatch",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadSender { sender } => write!(f, "invalid sender id {sender:?}"),
            Refusal::BadMessageId => f.write_str("invalid message id"),
            Refusal::WrongRole { principal, message } => {
                write!(f, "{principal} may not send {message}")
            }
            Refusal::NameMismatch {
                principal,
                field,
                claimed,
            } => write!(f, "{principal} sent a message whose {field} is {claimed:?}"),
        }
    }
}

/// Longest message id accepted: UUIDs (36) and the semaphores' deterministic trigger ids
/// (at most 170) fit; the broker remembers trigger ids, so their size is bounded here.
pub const MAX_MESSAGE_ID_BYTES: usize = 256;

/// Longest sender id accepted (it becomes the reply topic).
pub const MAX_SENDER_BYTES: usize = 200;

/// The roles that may send `message`: the table the broker enforces.
///
/// The `client` role (a command-line or test tool) may greet and read, nothing else. It can
/// never be enrolled, so in sealed mode no frame of it reaches this table at all.
pub fn may_send(message: &Message) -> &'static [Role] {
    use Role::{Client, Frontend, Semaphore, Worker};
    match message {
        Message::Hello { .. } => &[Worker, Frontend, Semaphore, Client],
        Message::Heartbeat(_)
        | Message::TaskStarted(_)
        | Message::TaskFinished(_)
        | Message::TaskOutput(_) => &[Worker],
        Message::Trigger(_) => &[Frontend, Semaphore],
        Message::Query(_) => &[Frontend, Semaphore, Client],
        Message::SemaphoreStatus { .. } => &[Semaphore],
        Message::RetryDead { .. } => &[Frontend],
        // Run control is the HTTP API's (which checks the token's scope); semaphores only
        // trigger.
        Message::CancelRun { .. }
        | Message::PrioritizeRun { .. }
        | Message::TrackRun { .. }
        | Message::ControlResource { .. }
        | Message::ForgetWorker { .. } => &[Frontend],
        // Broker → client messages: nobody sends them to the broker. (A worker reports a
        // cancelled attempt with `TaskFinished`, outcome `cancelled`.)
        Message::Reply(_) | Message::Work(_) | Message::CancelWork(_) | Message::Event(_) => &[],
    }
}

/// Checks one envelope: a well-formed sender id and message id, a role allowed to send the
/// message, and every name inside it the sender's own. Returns the sender's principal.
pub fn authorize(env: &Envelope) -> Result<Principal, Refusal> {
    let principal = parse_sender(&env.sender)?;
    if !is_valid_message_id(&env.id) {
        return Err(Refusal::BadMessageId);
    }
    let message = message_name(&env.body);
    let wrong_role = || Refusal::WrongRole {
        principal: principal.to_string(),
        message,
    };
    if !may_send(&env.body).contains(&principal.role) {
        return Err(wrong_role());
    }
    let must_be_own = |field: &'static str, claimed: &str, own: &str| {
        if claimed == own {
            Ok(())
        } else {
            Err(Refusal::NameMismatch {
                principal: principal.to_string(),
                field,
                claimed: truncate(claimed, 80).to_owned(),
            })
        }
    };
    match &env.body {
        Message::Hello { role } if *role != principal.role => return Err(wrong_role()),
        Message::Heartbeat(status) => must_be_own("worker name", &status.name, &principal.name)?,
        Message::TaskStarted(started) => {
            must_be_own("worker", &started.worker, &principal.name)?;
        }
        Message::TaskFinished(finished) => {
            must_be_own("worker", &finished.worker, &principal.name)?;
        }
        Message::TaskOutput(output) => {
            must_be_own("worker", &output.worker, &principal.name)?;
        }
        // The status shows which process reported each barrier and schedule: this one.
        Message::SemaphoreStatus {
            barriers,
            schedules,
        } => {
            for view in barriers {
                must_be_own("barrier reporter", &view.reporter, &env.sender)?;
            }
            for view in schedules {
                must_be_own("schedule reporter", &view.reporter, &env.sender)?;
            }
        }
        _ => {}
    }
    Ok(principal)
}

fn parse_sender(sender: &str) -> Result<Principal, Refusal> {
    let bad = || Refusal::BadSender {
        sender: truncate(sender, 80).to_owned(),
    };
    // The whole id becomes a reply topic: printable, no spaces, bounded.
    if !(1..=MAX_SENDER_BYTES).contains(&sender.len())
        || !sender.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad());
    }
    let (role, name) = principal_of(sender).split_once(':').ok_or_else(bad)?;
    let role = match role {
        "worker" => Role::Worker,
        "frontend" => Role::Frontend,
        "semaphore" => Role::Semaphore,
        "client" => Role::Client,
        _ => return Err(bad()),
    };
    if !is_valid_name(name) {
        return Err(bad());
    }
    Ok(Principal {
        role,
        name: name.to_owned(),
    })
}

fn is_valid_message_id(id: &str) -> bool {
    (1..=MAX_MESSAGE_ID_BYTES).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Worker => "worker",
        Role::Frontend => "frontend",
        Role::Semaphore => "semaphore",
        Role::Client => "client",
    }
}

/// The message type, for logs.
fn message_name(message: &Message) -> &'static str {
    match message {
        Message::Hello { .. } => "Hello",
        Message::Heartbeat(_) => "Heartbeat",
        Message::Trigger(_) => "Trigger",
        Message::TaskStarted(_) => "TaskStarted",
        Message::TaskFinished(_) => "TaskFinished",
        Message::TaskOutput(_) => "TaskOutput",
        Message::Query(_) => "Query",
        Message::SemaphoreStatus { .. } => "SemaphoreStatus",
        Message::RetryDead { .. } => "RetryDead",
        Message::CancelRun { .. } => "CancelRun",
        Message::PrioritizeRun { .. } => "PrioritizeRun",
        Message::TrackRun { .. } => "TrackRun",
        Message::ControlResource { .. } => "ControlResource",
        Message::ForgetWorker { .. } => "ForgetWorker",
        Message::Reply(_) => "Reply",
        Message::Work(_) => "Work",
        Message::CancelWork(_) => "CancelWork",
        Message::Event(_) => "Event",
    }
}

#[cfg(test)]
mod tests;
