//! What every jobz binary shares: the wire protocol, the job-file model, template
//! rendering and the socket set-up.
//!
//! # Layout
//! - [`message`]: every message of the protocol, one variant each; start reading here.
//! - [`envelope`]: the frame format (magic, protocol version, MessagePack) and its limits.
//! - [`topic`]: exact PUB/SUB topics (no prefix matches).
//! - [`jobfile`]: `jobs.d` files: parsing both formats, validation, the reloading loader.
//! - [`schedule`]: when schedules fire: cron in a time zone (Vixie rules), intervals.
//! - [`template`]: `{param}` rendering, shell-quoted for commands.
//! - [`socket`]: broker addresses and the socket options every process uses.
//! - [`keys`]: node key pairs and public-key files, enrolment names.
//! - [`seal`]: sealed frames (authenticated encryption, replay refusal, mesh keys).
//! - [`client`]: the link a worker, semaphore or frontend keeps to the broker.
//! - [`logging`]: the `--log-file`/`--log-format` flags.
//! - [`signals`]: SIGTERM/SIGINT as a shutdown channel.
#![deny(missing_docs)]

pub mod client;
pub mod envelope;
pub mod jobfile;
pub mod keys;
pub mod logging;
pub mod message;
pub mod schedule;
pub mod seal;
pub mod signals;
pub mod socket;
pub mod template;
pub mod topic;

/// The version every jobz binary reports (`--version`, heartbeats, `/healthz`): the
/// workspace's version and, as build metadata, the commit it was built from
/// (`0.9.0+g1a2b3c4d5e`; `+unknown` outside a git checkout).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("JOBZ_COMMIT"));

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A new unique, time-ordered id (UUIDv7, hyphenated).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Formats epoch milliseconds as RFC 3339 UTC, e.g. `2026-11-23T10:00:00.123Z`.
pub fn format_time_ms(ms: i64) -> String {
    // RFC 3339 has four-digit years (humantime panics past 9999): a time that came from a
    // peer's clock is clamped to the range it can be written in, never a panic.
    const LAST_MS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.clamp(0, LAST_MS) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses an RFC 3339 time with its offset (`2026-11-23T10:00:00Z`,
/// `2026-11-23T11:00:00.5+01:00`) into epoch milliseconds. A time without an offset is
/// refused: whose local time it meant would be a guess.
pub fn parse_time_ms(text: &str) -> Result<i64, String> {
    let bad = |why: &str| format!("{text:?} is not an RFC 3339 time ({why})");
    let bytes = text.as_bytes();
    let (base, offset_min) = if let Some(base) = text.strip_suffix(['Z', 'z']) {
        (base, 0)
    } else if bytes.len() > 6
        && matches!(bytes[bytes.len() - 6], b'+' | b'-')
        && bytes[bytes.len() - 3] == b':'
    {
        let (base, offset) = text.split_at(text.len() - 6);
        let number = |s: &str| {
            s.parse::<i64>()
                .ok()
                .filter(|_| s.bytes().all(|b| b.is_ascii_digit()))
        };
        let (Some(hours), Some(minutes)) = (number(&offset[1..3]), number(&offset[4..6])) else {
            return Err(bad("bad offset"));
        };
        if hours > 23 || minutes > 59 {
            return Err(bad("bad offset"));
        }
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        (base, sign * (hours * 60 + minutes))
    } else {
        return Err(bad("it needs an offset: Z or ±HH:MM"));
    };
    let utc = humantime::parse_rfc3339(&format!("{base}Z")).map_err(|e| bad(&e.to_string()))?;
    let ms = utc
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad("before 1970"))?
        .as_millis();
    let ms = i64::try_from(ms).map_err(|_| bad("too far away"))?;
    Ok(ms - offset_min * 60_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_with_offsets_parse_to_the_same_instant() {
        let utc = parse_time_ms("2026-11-23T10:00:00Z").unwrap();
        assert_eq!(format_time_ms(utc), "2026-11-23T10:00:00.000Z");
        assert_eq!(parse_time_ms("2026-11-23T11:00:00+01:00"), Ok(utc));
        assert_eq!(parse_time_ms("2026-11-23T04:30:00-05:30"), Ok(utc));
        assert_eq!(parse_time_ms("2026-11-23T10:00:00.250z"), Ok(utc + 250));
        for bad in [
            "2026-11-23T10:00:00",
            "2026-11-23 10:00:00Z",
            "2026-11-23T10:00:00+1:00",
            "2026-11-23T10:00:00+24:00",
            "2026-11-23T10:00:00+aa:00",
            "2026-13-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "tomorrow",
            "",
            "+01:00",
        ] {
            assert!(parse_time_ms(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_time_from_a_peer_is_written_whatever_its_value() {
        // A worker reports its own clock: any i64 must format, never panic.
        assert_eq!(format_time_ms(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_time_ms(i64::MIN), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time_ms(-1), "1970-01-01T00:00:00.000Z");
    }
}
