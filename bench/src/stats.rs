//! Arithmetic on measurements: percentiles, rates, and the broker's RFC 3339 times.

use std::time::Duration;

/// Percentiles of a set of durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Samples.
    pub count: usize,
    /// Median (nearest rank).
    pub p50: Duration,
    /// 99th percentile (nearest rank).
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
}

/// p50, p99 and max of `samples`; `None` when there are none.
pub fn summarize(samples: &[Duration]) -> Option<Summary> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    Some(Summary {
        count: sorted.len(),
        p50: percentile(&sorted, 50.0)?,
        p99: percentile(&sorted, 99.0)?,
        max: *sorted.last()?,
    })
}

/// The nearest-rank `p`th percentile of an ascending slice: the smallest sample with at
/// least `p` % of the samples at or below it.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// `count` per second over `span`; 0 for an empty span.
pub fn rate(count: usize, span: Duration) -> f64 {
    let secs = span.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// Milliseconds since the Unix epoch of an RFC 3339 time as the API writes it
/// (`2026-11-23T10:00:01.234Z`).
pub fn parse_time_ms(text: &str) -> Option<i64> {
    let time = humantime::parse_rfc3339(text).ok()?;
    let since = time.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

/// A non-negative span between two epoch-millisecond times.
pub fn span_ms(from: i64, to: i64) -> Duration {
    Duration::from_millis(u64::try_from(to.saturating_sub(from)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).rev().map(ms).collect();
        let s = summarize(&samples).unwrap();
        assert_eq!(
            (s.count, s.p50, s.p99, s.max),
            (100, ms(50), ms(99), ms(100))
        );
        let one = summarize(&[ms(7)]).unwrap();
        assert_eq!((one.p50, one.p99, one.max), (ms(7), ms(7), ms(7)));
        assert_eq!(summarize(&[]), None);
        assert_eq!(percentile(&[ms(1), ms(2)], 0.0), Some(ms(1)));
    }

    #[test]
    fn rates_and_spans() {
        assert_eq!(rate(2000, Duration::from_secs(4)), 500.0);
        assert_eq!(rate(10, Duration::ZERO), 0.0);
        assert_eq!(span_ms(1_000, 1_250), ms(250));
        assert_eq!(span_ms(1_250, 1_000), Duration::ZERO);
    }

    #[test]
    fn api_times_parse_to_epoch_millis() {
        assert_eq!(parse_time_ms("1970-01-01T00:00:02.500Z"), Some(2_500));
        assert_eq!(
            parse_time_ms("2026-11-23T10:00:01.234Z"),
            Some(1_795_428_001_234)
        );
        assert_eq!(parse_time_ms("yesterday"), None);
    }
}
