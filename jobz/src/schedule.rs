//! When a schedule fires: cron expressions in a time zone, and fixed intervals.
//!
//! A schedule's *slots* are instants (ms since the epoch). [`Timing::next_after`] gives the
//! first slot after an instant and [`Timing::slots_in`] those in a window; both are pure.
//!
//! # Cron, as Vixie cron reads it
//! Five fields (minute, hour, day of month, month, day of week) with lists, ranges
//! (`first <= last`), steps (`*/15`, `0-30/5`; not `5/15`), month and day names (`jan`,
//! `Mon`, also in ranges), and `@yearly`/`@annually`, `@monthly`, `@weekly`, `@daily`/
//! `@midnight`, `@hourly`. Day of week 0 and 7 are Sunday. When both day fields are
//! restricted (neither starts with `*`) a day matches if *either* does, as in Vixie cron;
//! otherwise both must. Extensions of other crons (`L`, `W`, `#`, `?`, seconds, years) are
//! refused, so a crontab line means here what it meant there. An expression that can
//! never match (`0 0 30 2 *`) is refused.
//!
//! Parsing and wall-clock matching are [`croner`]'s (POSIX weekdays, the OR rule); the
//! mapping from wall-clock times to instants is ours, because it is where crons differ.
//!
//! # Daylight saving time, as Vixie cron handles it
//! A *fixed-time* expression (neither minute nor hour field starts with `*`: `30 2 * * *`,
//! `0 1-3 * * *`, `@daily`) fires once per matching wall-clock time: a time skipped by a
//! spring-forward fires at the first instant after the gap (02:30 → 03:00), a time that
//! happens twice in the autumn fires at the first of the two. A *wildcard* expression
//! (`*/15 * * * *`, `0 * * * *`, `@hourly`) follows the clock as it is: skipped times do not
//! fire and repeated ones fire again. Wall-clock times that map to the same instant fire
//! once. As in cron, an offset change of more than [`MAX_OFFSET_CHANGE_MS`] (a zone moving
//! across the date line) is a clock correction: slots around it may be skipped.
//!
//! # Intervals
//! `every: D` with `offset: O` fires at every instant `k·D + O` since the epoch (UTC), so
//! every process computes the same slots wherever and whenever it started.
//!
//! # Time zones
//! IANA names, from the copy of the time zone database compiled into the binary (jiff's
//! bundled tzdb), never the host's: two processes of one version agree on every slot.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use jiff::civil::DateTime;
use jiff::tz::{AmbiguousOffset, Offset, TimeZone, TimeZoneDatabase};
use jiff::{Timestamp, ToSpan, Zoned};

/// Offset changes larger than this are clock corrections, not daylight saving time (cron
/// uses the same three hours).
pub const MAX_OFFSET_CHANGE_MS: i64 = 3 * 3600 * 1000;

/// Shortest `every`.
pub const MIN_EVERY_MS: i64 = 1000;

/// Longest `every` (a year is what `@yearly` is for).
pub const MAX_EVERY_MS: i64 = 366 * 24 * 3600 * 1000;

/// Most wall-clock candidates one search looks at before it gives up (a safety net: a
/// minute-by-minute expression needs a few hundred per day searched).
const MAX_CANDIDATES: usize = 200_000;

/// How a schedule's slots are placed in time.
#[derive(Clone)]
pub enum Timing {
    /// A cron expression in a time zone.
    Cron(Box<CronTiming>),
    /// Every `every_ms`, at `k·every_ms + offset_ms` since the epoch.
    Every {
        /// The interval, whole seconds.
        every_ms: i64,
        /// Where in the interval, `0 <= offset_ms < every_ms`.
        offset_ms: i64,
    },
}

/// A parsed cron expression with its time zone.
#[derive(Clone)]
pub struct CronTiming {
    /// As written (a nickname stays a nickname).
    expr: String,
    cron: Cron,
    /// Minute or hour field starts with `*`: DST moves nothing (see the module docs).
    wildcard: bool,
    zone: TimeZone,
    zone_name: String,
}

impl fmt::Debug for Timing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timing({self})")
    }
}

impl fmt::Display for Timing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Timing::Cron(c) => write!(f, "cron {:?} in {}", c.expr, c.zone_name),
            Timing::Every {
                every_ms,
                offset_ms,
            } => {
                write!(f, "every {}", format_ms(*every_ms))?;
                if *offset_ms > 0 {
                    write!(f, " + {}", format_ms(*offset_ms))?;
                }
                Ok(())
            }
        }
    }
}

/// Two timings are equal when they were written the same way.
impl PartialEq for Timing {
    fn eq(&self, other: &Timing) -> bool {
        match (self, other) {
            (Timing::Cron(a), Timing::Cron(b)) => a.expr == b.expr && a.zone_name == b.zone_name,
            (
                Timing::Every {
                    every_ms: a,
                    offset_ms: ao,
                },
                Timing::Every {
                    every_ms: b,
                    offset_ms: bo,
                },
            ) => a == b && ao == bo,
            _ => false,
        }
    }
}

/// Looks up an IANA time zone in the bundled database.
pub fn time_zone(name: &str) -> Result<TimeZone, String> {
    TimeZoneDatabase::bundled()
        .get(name)
        .map_err(|_| format!("unknown time zone {name:?} (an IANA name such as Europe/Berlin)"))
}

impl Timing {
    /// A cron expression (see the module docs) in the IANA time zone `zone`.
    pub fn cron(expr: &str, zone: &str) -> Result<Timing, String> {
        let zone_tz = time_zone(zone)?;
        let expr = expr.trim();
        let (fields, wildcard) = expand(expr)?;
        let parts: Vec<&str> = fields.split_whitespace().collect();
        // Vixie ANDs the day fields when either starts with `*` (even `*/2`), ORs them
        // otherwise; croner ORs unless told, and treats only a bare `*` as unrestricted.
        let and_days = parts[2].starts_with('*') || parts[4].starts_with('*');
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .dom_and_dow(and_days)
            .build()
            .parse(&fields)
            .map_err(|e| format!("cron {expr:?}: {e}"))?;
        // Never matching is a mistake worth saying at load (croner searches to year 5000).
        let reference = DateTime::constant(2000, 1, 1, 0, 0, 0, 0);
        if cron.find_next_occurrence(&reference, false).is_err() {
            return Err(format!("cron {expr:?} never matches a date"));
        }
        Ok(Timing::Cron(Box::new(CronTiming {
            expr: expr.to_owned(),
            cron,
            wildcard,
            zone: zone_tz,
            zone_name: zone.to_owned(),
        })))
    }

    /// Every `every_ms` (whole seconds, at least [`MIN_EVERY_MS`]) at `offset_ms` into it.
    pub fn every(every_ms: i64, offset_ms: i64) -> Result<Timing, String> {
        if !(MIN_EVERY_MS..=MAX_EVERY_MS).contains(&every_ms) || every_ms % 1000 != 0 {
            return Err(format!(
                "every {} must be whole seconds, from 1s to 366 days",
                format_ms(every_ms)
            ));
        }
        if !(0..every_ms).contains(&offset_ms) || offset_ms % 1000 != 0 {
            return Err(format!(
                "offset {} must be whole seconds, less than every ({})",
                format_ms(offset_ms),
                format_ms(every_ms)
            ));
        }
        Ok(Timing::Every {
            every_ms,
            offset_ms,
        })
    }

    /// The cron expression as written, if this is one.
    pub fn cron_expr(&self) -> Option<&str> {
        match self {
            Timing::Cron(c) => Some(&c.expr),
            Timing::Every { .. } => None,
        }
    }

    /// `(every_ms, offset_ms)`, if this is an interval.
    pub fn interval(&self) -> Option<(i64, i64)> {
        match self {
            Timing::Every {
                every_ms,
                offset_ms,
            } => Some((*every_ms, *offset_ms)),
            Timing::Cron(_) => None,
        }
    }

    /// The time zone slots are rendered in (UTC for `every`).
    pub fn zone(&self) -> TimeZone {
        match self {
            Timing::Cron(c) => c.zone.clone(),
            Timing::Every { .. } => TimeZone::UTC,
        }
    }

    /// The time zone's IANA name (`UTC` for `every`).
    pub fn zone_name(&self) -> &str {
        match self {
            Timing::Cron(c) => &c.zone_name,
            Timing::Every { .. } => "UTC",
        }
    }

    /// The first slot strictly after `after_ms`, or `None` if there is none (the search
    /// gave up, or past year 5000).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self {
            Timing::Every {
                every_ms,
                offset_ms,
            } => {
                let k = (after_ms - offset_ms).div_euclid(*every_ms) + 1;
                k.checked_mul(*every_ms)?.checked_add(*offset_ms)
            }
            Timing::Cron(c) => c.next_after(after_ms),
        }
    }

    /// The slots in `(after_ms, until_ms]`: how many, and the latest `keep` of them in
    /// ascending order. The window should be bounded (a day, say) for cron timings, which
    /// enumerate it.
    pub fn slots_in(&self, after_ms: i64, until_ms: i64, keep: usize) -> Slots {
        if until_ms <= after_ms {
            return Slots::default();
        }
        match self {
            Timing::Every {
                every_ms,
                offset_ms,
            } => {
                let first_k = (after_ms - offset_ms).div_euclid(*every_ms) + 1;
                let last_k = (until_ms - offset_ms).div_euclid(*every_ms);
                if last_k < first_k {
                    return Slots::default();
                }
                let total = (last_k - first_k + 1) as u64;
                let kept = keep.min(total as usize) as i64;
                let from_k = last_k + 1 - kept;
                Slots {
                    total,
                    latest: (from_k..=last_k)
                        .map(|k| k * every_ms + offset_ms)
                        .collect(),
                }
            }
            Timing::Cron(c) => {
                let all = c.slots_in(after_ms, until_ms);
                let total = all.len() as u64;
                let skip = all.len().saturating_sub(keep);
                Slots {
                    total,
                    latest: all[skip..].to_vec(),
                }
            }
        }
    }

    /// `slot_ms` as a time in the schedule's zone.
    pub fn zoned(&self, slot_ms: i64) -> Option<Zoned> {
        let ts = Timestamp::from_millisecond(slot_ms).ok()?;
        Some(ts.to_zoned(self.zone()))
    }
}

/// What [`Timing::slots_in`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Slots {
    /// Slots in the window.
    pub total: u64,
    /// The latest of them (at most `keep`), ascending.
    pub latest: Vec<i64>,
}

impl CronTiming {
    /// The instants a matching wall-clock time `civil` fires at: none, one or (a wildcard
    /// expression in a repeated hour) two.
    fn instants(&self, civil: DateTime) -> Vec<i64> {
        let ms = |offset: Offset| offset.to_timestamp(civil).ok().map(|t| t.as_millisecond());
        match self.zone.to_ambiguous_timestamp(civil).offset() {
            AmbiguousOffset::Unambiguous { offset } => ms(offset).into_iter().collect(),
            AmbiguousOffset::Gap { after, .. } => {
                if self.wildcard {
                    return Vec::new();
                }
                // The first instant after the gap: the transition that follows the
                // earliest reading of `civil`.
                let Some(earliest) = after.to_timestamp(civil).ok() else {
                    return Vec::new();
                };
                self.zone
                    .following(earliest)
                    .next()
                    .map(|t| t.timestamp().as_millisecond())
                    .into_iter()
                    .collect()
            }
            AmbiguousOffset::Fold { before, after } => {
                let mut both: Vec<i64> = [ms(before), ms(after)].into_iter().flatten().collect();
                both.sort_unstable();
                if !self.wildcard {
                    both.truncate(1);
                }
                both
            }
        }
    }

    /// The wall-clock time at `ms` in this zone.
    fn civil(&self, ms: i64) -> Option<DateTime> {
        Some(self.zone.to_datetime(Timestamp::from_millisecond(ms).ok()?))
    }

    fn next_after(&self, after_ms: i64) -> Option<i64> {
        // Wall-clock order and instant order differ by at most an offset change, so start
        // that far back and stop once candidates are that far past the best instant found.
        let shift = (MAX_OFFSET_CHANGE_MS / 1000).seconds();
        let start = self.civil(after_ms)?.checked_sub(shift).ok()?;
        let mut best: Option<(i64, DateTime)> = None;
        for civil in self.cron.iter_after(start).take(MAX_CANDIDATES) {
            if let Some((_, best_civil)) = best {
                if civil > best_civil.checked_add(shift).ok()? {
                    break;
                }
            }
            for instant in self.instants(civil) {
                if instant > after_ms && best.is_none_or(|(b, _)| instant < b) {
                    best = Some((instant, self.civil(instant)?));
                }
            }
        }
        best.map(|(instant, _)| instant)
    }

    fn slots_in(&self, after_ms: i64, until_ms: i64) -> Vec<i64> {
        let shift = (MAX_OFFSET_CHANGE_MS / 1000).seconds();
        let (Some(from), Some(to)) = (self.civil(after_ms), self.civil(until_ms)) else {
            return Vec::new();
        };
        let (Ok(start), Ok(end)) = (from.checked_sub(shift), to.checked_add(shift)) else {
            return Vec::new();
        };
        let mut slots: Vec<i64> = self
            .cron
            .iter_after(start)
            .take(MAX_CANDIDATES)
            .take_while(|civil| *civil <= end)
            .flat_map(|civil| self.instants(civil))
            .filter(|ms| (after_ms + 1..=until_ms).contains(ms))
            .collect();
        slots.sort_unstable();
        slots.dedup();
        slots
    }
}

/// Expands a nickname and checks the POSIX syntax of the five fields. Returns the fields
/// and whether the expression is a wildcard one (minute or hour starts with `*`).
fn expand(expr: &str) -> Result<(String, bool), String> {
    if let Some(nick) = expr.strip_prefix('@') {
        let (fields, wildcard) = match nick {
            "yearly" | "annually" => ("0 0 1 1 *", false),
            "monthly" => ("0 0 1 * *", false),
            "weekly" => ("0 0 * * 0", false),
            "daily" | "midnight" => ("0 0 * * *", false),
            "hourly" => ("0 * * * *", true),
            "reboot" => return Err("@reboot has no meaning for a schedule".into()),
            _ => {
                return Err(format!(
                "unknown nickname {expr:?} (@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)"
            ))
            }
        };
        return Ok((fields.to_owned(), wildcard));
    }
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!(
            "cron {expr:?} must have five fields (minute hour day-of-month month day-of-week), not {}",
            fields.len()
        ));
    }
    const FIELDS: [(&str, u32, u32, &[&str]); 5] = [
        ("minute", 0, 59, &[]),
        ("hour", 0, 23, &[]),
        ("day of month", 1, 31, &[]),
        ("month", 1, 12, &MONTHS),
        ("day of week", 0, 7, &DAYS),
    ];
    for (field, (what, low, high, names)) in fields.iter().zip(FIELDS) {
        check_field(field, low, high, names)
            .map_err(|e| format!("cron {expr:?}: {what} {field:?}: {e}"))?;
    }
    let wildcard = fields[0].starts_with('*') || fields[1].starts_with('*');
    Ok((fields.join(" "), wildcard))
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// `list = range {"," range}`, `range = "*" | value | value "-" value`, each optionally
/// `"/" step`, but a single value takes no step (as in cron).
fn check_field(field: &str, low: u32, high: u32, names: &[&str]) -> Result<(), String> {
    let value = |v: &str| -> Result<u32, String> {
        if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
            let n: u32 = v.parse().map_err(|_| format!("{v:?} is too large"))?;
            if (low..=high).contains(&n) {
                return Ok(n);
            }
            return Err(format!("{n} is outside {low}-{high}"));
        }
        let lower = v.to_ascii_lowercase();
        match names.iter().position(|n| *n == lower) {
            Some(i) => Ok(i as u32 + low),
            None if names.is_empty() => Err(format!("{v:?} is not a number")),
            None => Err(format!(
                "{v:?} is not a number or a name ({})",
                names.join(", ")
            )),
        }
    };
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        let single = match range.split_once('-') {
            _ if range == "*" => false,
            Some((first, last)) => {
                let (first, last) = (value(first)?, value(last)?);
                if first > last {
                    return Err(format!("range {range:?} runs backwards"));
                }
                false
            }
            None if range.is_empty() => return Err("an empty list item".into()),
            None => {
                value(range)?;
                true
            }
        };
        if let Some(step) = step {
            if single {
                return Err(format!(
                    "a step needs `*` or a range (`*/{step}`, `{range}-{high}/{step}`)"
                ));
            }
            match step.parse::<u32>() {
                Ok(n) if n >= 1 && step.bytes().all(|b| b.is_ascii_digit()) => {}
                _ => return Err(format!("step {step:?} must be a whole number from 1")),
            }
        }
    }
    Ok(())
}

/// `1s`, `2h 30m`: how durations are shown.
fn format_ms(ms: i64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms.max(0) as u64)).to_string()
}

// ---- Parameters from the slot -----------------------------------------------------------

/// The placeholders a schedule's parameter values may hold.
pub const SLOT_PLACEHOLDERS: &str =
    "{slot} (RFC 3339 in the schedule's zone), {slot_date} (YYYY-MM-DD), {slot_unix} (seconds), {slot:FORMAT} (strftime)";

/// Renders one parameter value of a schedule for the slot `slot` (in the schedule's zone):
/// `{slot}`, `{slot_date}`, `{slot_unix}`, `{slot:FORMAT}` (strftime, e.g. `%Y_%m_%d`),
/// `{{` and `}}` for literal braces; anything else between braces is an error.
pub fn render_slot_value(template: &str, slot: &Zoned) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(at) = rest.find(['{', '}']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push('{');
            rest = after;
            continue;
        }
        if let Some(after) = tail.strip_prefix("}}") {
            out.push('}');
            rest = after;
            continue;
        }
        if tail.starts_with('}') {
            return Err(format!(
                "unmatched '}}' in {template:?} (write }}}} for a brace)"
            ));
        }
        let Some(end) = tail.find('}') else {
            return Err(format!("unclosed '{{' in {template:?}"));
        };
        let name = &tail[1..end];
        match name {
            "slot" => out.push_str(&slot.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string()),
            "slot_date" => out.push_str(&slot.strftime("%Y-%m-%d").to_string()),
            "slot_unix" => out.push_str(&slot.timestamp().as_second().to_string()),
            _ => match name.strip_prefix("slot:") {
                Some(format) if !format.is_empty() => {
                    let text = jiff::fmt::strtime::format(format, slot)
                        .map_err(|e| format!("{{slot:{format}}}: {e}"))?;
                    out.push_str(&text);
                }
                _ => {
                    return Err(format!(
                        "unknown placeholder {{{name}}}; a schedule knows {SLOT_PLACEHOLDERS}"
                    ))
                }
            },
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Renders every parameter of a schedule for `slot`.
pub fn render_slot_params(
    templates: &BTreeMap<String, String>,
    slot: &Zoned,
) -> Result<BTreeMap<String, String>, String> {
    templates
        .iter()
        .map(|(name, template)| {
            render_slot_value(template, slot)
                .map(|value| (name.clone(), value))
                .map_err(|e| format!("param {name:?}: {e}"))
        })
        .collect()
}

/// Parses `2026-03-29T01:00:00Z`-style instants, for tests and tools.
pub fn parse_instant_ms(text: &str) -> Option<i64> {
    Timestamp::from_str(text).ok().map(|t| t.as_millisecond())
}

#[cfg(test)]
mod tests;
