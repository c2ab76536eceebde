//! Broker addresses and socket options shared by every jobz process.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::envelope::MAX_FRAME_BYTES;

/// Default base port: the broker's PUB socket; PULL is base + 1.
pub const DEFAULT_BASE_PORT: u16 = 6795;

/// High-water mark on every socket. ZeroMQ's default of 1,000 silently drops bursts on PUB.
pub const HIGH_WATER_MARK: i32 = 100_000;

/// `HOST[:BASE_PORT]`: where a broker is, or where it binds. One number moves a whole mesh:
/// PUB is at the base port, PULL at base + 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// The base port.
    pub base_port: u16,
}

impl BrokerAddr {
    /// True if the host is an IPv6 address (host names never contain a colon).
    pub fn is_ipv6(&self) -> bool {
        self.host.contains(':')
    }

    fn endpoint(&self, offset: u16) -> String {
        let host = if self.is_ipv6() {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("tcp://{host}:{}", self.base_port.saturating_add(offset))
    }

    /// The broker's PUB socket, which workers subscribe to.
    pub fn pub_endpoint(&self) -> String {
        self.endpoint(0)
    }

    /// The broker's PULL socket, which receives triggers and results.
    pub fn pull_endpoint(&self) -> String {
        self.endpoint(1)
    }

    /// True if the host is a loopback address (`127.0.0.0/8`, `::1`, or `127.x` written
    /// as an IPv4-mapped IPv6 address) or `localhost`.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.to_canonical().is_loopback())
    }
}

impl FromStr for BrokerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: missing ']'"))?;
            if !host.contains(':') {
                return Err(format!("{s:?}: only an IPv6 address goes in brackets"));
            }
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(|| {
                    format!("{s:?}: expected ':PORT' after the bracketed address")
                })?),
            };
            (host, port)
        } else if s.matches(':').count() > 1 {
            (s, None) // bare IPv6 address
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{s:?}: empty host"));
        }
        let base_port = match port {
            None => DEFAULT_BASE_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0 && p < u16::MAX - 3)
                .ok_or_else(|| format!("{s:?}: port must be 1..65531"))?,
        };
        Ok(BrokerAddr {
            host: host.to_owned(),
            base_port,
        })
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ipv6() {
            write!(f, "[{}]:{}", self.host, self.base_port)
        } else {
            write!(f, "{}:{}", self.host, self.base_port)
        }
    }
}

/// Applies the options every jobz socket needs before it binds or connects to `addr`:
/// bounded frames, explicit high-water marks, linger so that closing flushes, TCP
/// keepalive so idle firewalls do not cut us silently, capped, jittered reconnects so a
/// restarted broker is not hit by every client at once, and IPv6 for an IPv6 address.
///
/// IPv6 is on only for an IPv6 address: with it on, libzmq resolves a host name to its
/// IPv6 address first (and a bind by interface name to the interface's IPv6 address), so
/// a node given `--broker localhost` or a name with an AAAA record would stop reaching a
/// broker bound, as by default, to an IPv4 address. IPv4 stays what it was; `[::1]`,
/// `[fd00::2]` and `[::]` (which also accepts IPv4) work.
pub fn configure(socket: &zmq::Socket, addr: &BrokerAddr) -> zmq::Result<()> {
    socket.set_ipv6(addr.is_ipv6())?;
    // Frames up to 4x the limit still arrive, so the decoder can log and count them as
    // too large; beyond that libzmq drops the connection before allocating.
    socket.set_maxmsgsize(4 * MAX_FRAME_BYTES as i64)?;
    socket.set_sndhwm(HIGH_WATER_MARK)?;
    socket.set_rcvhwm(HIGH_WATER_MARK)?;
    socket.set_linger(2000)?;
    socket.set_tcp_keepalive(1)?;
    socket.set_tcp_keepalive_idle(60)?;
    socket.set_tcp_keepalive_intvl(10)?;
    socket.set_reconnect_ivl(100 + jitter_ms(200) as i32)?;
    // libzmq doubles the interval after each failed attempt: capped at a second, a node
    // is back within about a second of the broker's return, however long it was away.
    socket.set_reconnect_ivl_max(1000)?;
    Ok(())
}

/// A pseudo-random delay in `0..max_ms`, for spreading reconnects and re-registrations.
pub fn jitter_ms(max_ms: u64) -> u64 {
    if max_ms == 0 {
        return 0;
    }
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ]) % max_ms
}

/// A duration plus up to `fraction` of itself at random.
pub fn with_jitter(base: Duration, fraction: f64) -> Duration {
    let extra = (base.as_millis() as f64 * fraction) as u64;
    base + Duration::from_millis(jitter_ms(extra.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_and_optional_base_port() {
        let a: BrokerAddr = "front".parse().unwrap();
        assert_eq!((a.host.as_str(), a.base_port), ("front", 6795));
        let a: BrokerAddr = "127.0.0.1:7000".parse().unwrap();
        assert_eq!(a.pub_endpoint(), "tcp://127.0.0.1:7000");
        assert_eq!(a.pull_endpoint(), "tcp://127.0.0.1:7001");
        let a: BrokerAddr = "[::1]:7000".parse().unwrap();
        assert_eq!(a.pull_endpoint(), "tcp://[::1]:7001");
        assert!(a.is_loopback());
        assert!(a.is_ipv6());
        assert!("".parse::<BrokerAddr>().is_err());
        assert!("h:0".parse::<BrokerAddr>().is_err());
        assert!("h:x".parse::<BrokerAddr>().is_err());
        assert!("h:65535".parse::<BrokerAddr>().is_err());
    }

    #[test]
    fn ipv6_addresses_parse_bracketed_or_bare_and_garbage_after_brackets_is_refused() {
        let a: BrokerAddr = "[::1]".parse().unwrap();
        assert_eq!((a.host.as_str(), a.base_port), ("::1", DEFAULT_BASE_PORT));
        assert_eq!(a.to_string(), "[::1]:6795");
        let a: BrokerAddr = "fd00::2".parse().unwrap();
        assert_eq!(a.pub_endpoint(), "tcp://[fd00::2]:6795");
        assert!(!a.is_loopback());
        let a: BrokerAddr = "[fe80::1%eth0]:7000".parse().unwrap();
        assert_eq!(a.pull_endpoint(), "tcp://[fe80::1%eth0]:7001");
        let round: BrokerAddr = a.to_string().parse().unwrap();
        assert_eq!(round, a);
        for bad in [
            "[::1]x",
            "[::1]7000",
            "[::1]:",
            "[::1",
            "[]:7000",
            "[host]:7000",
            "[::1]:0",
        ] {
            assert!(bad.parse::<BrokerAddr>().is_err(), "{bad} parsed");
        }
        let v4: BrokerAddr = "10.0.0.1:7000".parse().unwrap();
        assert!(!v4.is_ipv6());
        let name: BrokerAddr = "broker.example:7000".parse().unwrap();
        assert!(!name.is_ipv6());
    }

    #[test]
    fn loopback_is_every_loopback_spelling_and_nothing_else() {
        for host in [
            "127.0.0.1",
            "127.9.9.9",
            "localhost",
            "::1",
            "[::1]",
            "0:0:0:0:0:0:0:1",
            "[::ffff:127.0.0.1]",
        ] {
            let a: BrokerAddr = host.parse().unwrap();
            assert!(a.is_loopback(), "{host} is loopback");
        }
        for host in [
            "0.0.0.0",
            "::",
            "[::]",
            "::ffff:10.0.0.1",
            "10.0.0.1",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "fe80::1",
        ] {
            let a: BrokerAddr = host.parse().unwrap();
            assert!(!a.is_loopback(), "{host} is not loopback");
        }
    }

    #[test]
    fn sockets_get_ipv6_for_an_ipv6_address_only() {
        let ctx = zmq::Context::new();
        let socket = ctx.socket(zmq::PUSH).unwrap();
        configure(&socket, &"[::1]:7000".parse().unwrap()).unwrap();
        assert!(socket.is_ipv6().unwrap());
        configure(&socket, &"127.0.0.1:7000".parse().unwrap()).unwrap();
        assert!(!socket.is_ipv6().unwrap());
    }
}
