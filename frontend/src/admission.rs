//! Which connections a listener takes: the cap, the per-address cap, and the places held
//! for authenticated clients.
//!
//! A listener holds at most `max` connections, at most `per_address` from one IP address.
//! The last `reserved` places are for connections that have shown they are authenticated
//! (a valid token in a request, or a verified client certificate): a newcomer that arrives
//! when the other places are taken is let in *on probation*, and its first request must
//! carry a valid token; otherwise it is answered 503 and closed. So clients without a
//! token, however many, can hold at most `max - reserved` places, and a client with a token
//! gets in while any place is free. A guest connection that presents a valid token becomes
//! authenticated and frees its guest place.
//!
//! [`Admission`] is the bookkeeping, without sockets or clocks; the relay holds one per
//! listener behind a mutex and a [`Ticket`] per connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// What a connection is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Not (yet) authenticated, in the places open to anyone.
    Guest,
    /// Not (yet) authenticated, in a reserved place: its first request must authenticate.
    Probation,
    /// Has shown a valid token or client certificate.
    Authenticated,
}

/// Why a connection was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every place is taken.
    Full,
    /// Its address holds its share already.
    PerAddress,
}

impl Refused {
    /// A short reason for logs and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Full => "full",
            Refused::PerAddress => "per_address",
        }
    }
}

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once.
    pub max: usize,
    /// Most connections open at once from one IP address.
    pub per_address: usize,
    /// Places only authenticated connections may keep (0 when nothing can authenticate).
    pub reserved: usize,
}

impl Limits {
    /// Places open to connections that have not authenticated.
    pub fn guest_places(&self) -> usize {
        self.max.saturating_sub(self.reserved)
    }
}

/// The connections of one listener, counted.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    open: usize,
    guests: usize,
    by_address: HashMap<IpAddr, usize>,
}

impl Admission {
    /// No connections yet.
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            open: 0,
            guests: 0,
            by_address: HashMap::new(),
        }
    }

    /// Lets a new connection from `address` in, or says why not.
    pub fn admit(&mut self, address: IpAddr) -> Result<Class, Refused> {
        if self.open >= self.limits.max {
            return Err(Refused::Full);
        }
        let from_address = self.by_address.get(&address).copied().unwrap_or(0);
        if from_address >= self.limits.per_address {
            return Err(Refused::PerAddress);
        }
        let class = if self.guests < self.limits.guest_places() {
            self.guests += 1;
            Class::Guest
        } else {
            Class::Probation
        };
        self.open += 1;
        self.by_address.insert(address, from_address + 1);
        Ok(class)
    }

    /// A connection of `class` has authenticated; its new class.
    pub fn authenticate(&mut self, class: Class) -> Class {
        if class == Class::Guest {
            self.guests -= 1;
        }
        Class::Authenticated
    }

    /// A connection of `class` from `address` has closed.
    pub fn release(&mut self, address: IpAddr, class: Class) {
        self.open -= 1;
        if class == Class::Guest {
            self.guests -= 1;
        }
        if let Some(n) = self.by_address.get_mut(&address) {
            *n -= 1;
            if *n == 0 {
                self.by_address.remove(&address);
            }
        }
    }

    /// Connections open now, and how many of them are guests.
    pub fn counts(&self) -> (usize, usize) {
        (self.open, self.guests)
    }
}

/// One admitted connection's place; given back when dropped, however the connection ends.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Mutex<Admission>>,
    address: IpAddr,
    class: Class,
}

impl Ticket {
    /// Admits a connection from `address` into `admission`.
    pub fn take(admission: &Arc<Mutex<Admission>>, address: IpAddr) -> Result<Ticket, Refused> {
        let class = lock(admission).admit(address)?;
        Ok(Ticket {
            admission: admission.clone(),
            address,
            class,
        })
    }

    /// What the connection counts as now.
    pub fn class(&self) -> Class {
        self.class
    }

    /// The connection has shown a valid token or client certificate.
    pub fn authenticate(&mut self) {
        if self.class != Class::Authenticated {
            self.class = lock(&self.admission).authenticate(self.class);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.admission).release(self.address, self.class);
    }
}

/// The counts stay right even if a thread panicked while holding the lock: every change
/// is one step that completes before anything can panic.
fn lock(admission: &Mutex<Admission>) -> std::sync::MutexGuard<'_, Admission> {
    admission.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_address_gets_its_share_and_no_more() {
        let mut a = Admission::new(Limits {
            max: 8,
            per_address: 3,
            reserved: 0,
        });
        for _ in 0..3 {
            assert_eq!(a.admit(ip(2)), Ok(Class::Guest));
        }
        assert_eq!(a.admit(ip(2)), Err(Refused::PerAddress));
        assert_eq!(a.admit(ip(3)), Ok(Class::Guest));
        a.release(ip(2), Class::Guest);
        assert_eq!(a.admit(ip(2)), Ok(Class::Guest));
        assert_eq!(a.counts(), (4, 4));
    }

    #[test]
    fn the_reserve_is_held_for_authenticated_connections() {
        let mut a = Admission::new(Limits {
            max: 4,
            per_address: 4,
            reserved: 2,
        });
        assert_eq!(a.admit(ip(2)), Ok(Class::Guest));
        assert_eq!(a.admit(ip(3)), Ok(Class::Guest));
        // Guest places are full: newcomers come in on probation, until every place is taken.
        assert_eq!(a.admit(ip(4)), Ok(Class::Probation));
        assert_eq!(a.admit(ip(5)), Ok(Class::Probation));
        assert_eq!(a.admit(ip(6)), Err(Refused::Full));
        // A probationer that fails to authenticate leaves; one that does stays.
        a.release(ip(4), Class::Probation);
        assert_eq!(a.authenticate(Class::Probation), Class::Authenticated);
        assert_eq!(a.counts(), (3, 2));
        // A guest that authenticates frees its guest place for another guest.
        assert_eq!(a.authenticate(Class::Guest), Class::Authenticated);
        assert_eq!(a.admit(ip(7)), Ok(Class::Guest));
        assert_eq!(a.counts(), (4, 2));
        assert_eq!(a.admit(ip(8)), Err(Refused::Full));
        a.release(ip(2), Class::Authenticated);
        a.release(ip(5), Class::Authenticated);
        a.release(ip(3), Class::Guest);
        a.release(ip(7), Class::Guest);
        assert_eq!(a.counts(), (0, 0));
        assert!(a.by_address.is_empty());
    }

    #[test]
    fn tickets_give_their_place_back_when_dropped() {
        let admission = Arc::new(Mutex::new(Admission::new(Limits {
            max: 2,
            per_address: 2,
            reserved: 1,
        })));
        let mut first = Ticket::take(&admission, ip(2)).unwrap();
        assert_eq!(first.class(), Class::Guest);
        let second = Ticket::take(&admission, ip(2)).unwrap();
        assert_eq!(second.class(), Class::Probation);
        assert_eq!(Ticket::take(&admission, ip(3)).unwrap_err(), Refused::Full);
        first.authenticate();
        first.authenticate();
        assert_eq!(first.class(), Class::Authenticated);
        drop(second);
        let third = Ticket::take(&admission, ip(3)).unwrap();
        assert_eq!(third.class(), Class::Guest);
        drop((first, third));
        assert_eq!(lock(&admission).counts(), (0, 0));
    }
}
