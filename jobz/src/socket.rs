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
    fn endpoint(&self, offset: u16) -> String {
        let host = if self.host.contains(':') {
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

    /// True if the host is a loopback address or `localhost`.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
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
            (host, after.strip_prefix(':'))
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
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.base_port)
        } else {
            write!(f, "{}:{}", self.host, self.base_port)
        }
    }
}

/// Applies the options every jobz socket needs: bounded frames, explicit high-water marks,
/// linger so that closing flushes, TCP keepalive so idle firewalls do not cut us silently,
/// and capped, jittered reconnects so a restarted broker is not hit by every client at once.
pub fn configure(socket: &zmq::Socket) -> zmq::Result<()> {
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
    socket.set_reconnect_ivl_max(5000)?;
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
        assert!("".parse::<BrokerAddr>().is_err());
        assert!("h:0".parse::<BrokerAddr>().is_err());
        assert!("h:x".parse::<BrokerAddr>().is_err());
        assert!("h:65535".parse::<BrokerAddr>().is_err());
    }
}
