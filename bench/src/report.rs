//! The result table: one row per figure, with the target it is held to (if any) and
//! whether it met it.

use std::fmt::Write as _;
use std::time::Duration;

/// How a figure is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Things per second.
    PerSec,
    /// A latency or a span, printed in ms below 10 s and in s above.
    Time,
    /// Memory in MiB (the figure is in KiB).
    MiB,
    /// CPU seconds.
    CpuSec,
}

/// What a figure is held to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// No target: for information.
    None,
    /// The figure must be at least this.
    AtLeast(f64),
    /// The figure must be at most this.
    AtMost(f64),
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The scenario (`1 trigger`, …).
    pub scenario: String,
    /// What was measured.
    pub metric: String,
    /// The figure, printed.
    pub value: String,
    /// The target, printed (empty if none).
    pub target: String,
    /// Whether the target was met (`None`: no target).
    pub met: Option<bool>,
}

impl Row {
    /// A row with no target.
    pub fn info(scenario: &str, metric: &str, value: impl Into<String>) -> Row {
        Row {
            scenario: scenario.to_owned(),
            metric: metric.to_owned(),
            value: value.into(),
            target: String::new(),
            met: None,
        }
    }

    /// A figure in `unit` (seconds for [`Unit::Time`] and [`Unit::CpuSec`], KiB for
    /// [`Unit::MiB`]), checked against `target` in the same unit.
    pub fn figure(scenario: &str, metric: &str, value: f64, unit: Unit, target: Target) -> Row {
        let (target_text, met) = match target {
            Target::None => (String::new(), None),
            Target::AtLeast(t) => (format!(">= {}", format(t, unit)), Some(value >= t)),
            Target::AtMost(t) => (format!("<= {}", format(t, unit)), Some(value <= t)),
        };
        Row {
            scenario: scenario.to_owned(),
            metric: metric.to_owned(),
            value: format(value, unit),
            target: target_text,
            met,
        }
    }

    /// A duration, checked against a target in seconds.
    pub fn time(scenario: &str, metric: &str, value: Duration, target: Target) -> Row {
        Row::figure(scenario, metric, value.as_secs_f64(), Unit::Time, target)
    }

    /// A row saying a scenario could not be measured.
    pub fn failed(scenario: &str, error: &anyhow::Error) -> Row {
        Row {
            scenario: scenario.to_owned(),
            metric: String::from("FAILED"),
            value: format!("{error:#}"),
            target: String::new(),
            met: Some(false),
        }
    }
}

/// A figure as printed.
pub fn format(value: f64, unit: Unit) -> String {
    match unit {
        Unit::PerSec => format!("{value:.0}/s"),
        Unit::Time if value < 0.001 => format!("{:.0} µs", value * 1e6),
        Unit::Time if value < 0.1 => format!("{:.1} ms", value * 1e3),
        Unit::Time if value < 1.0 => format!("{:.0} ms", value * 1e3),
        Unit::Time => format!("{value:.2} s"),
        Unit::MiB => format!("{:.1} MiB", value / 1024.0),
        Unit::CpuSec => format!("{value:.3} s"),
    }
}

/// The table as aligned text, one row per line, with a verdict column.
pub fn render(rows: &[Row]) -> String {
    let headers = ["scenario", "metric", "value", "target", ""];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let verdict = match r.met {
                None => "",
                Some(true) => "ok",
                Some(false) => "MISS",
            };
            [
                r.scenario.clone(),
                r.metric.clone(),
                r.value.clone(),
                r.target.clone(),
                verdict.to_owned(),
            ]
        })
        .collect();
    let mut widths = headers.map(|h| h.chars().count());
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cols: [&str; 5]| {
        let mut text = String::new();
        for (i, (cell, w)) in cols.iter().zip(widths).enumerate() {
            // Figures are right-aligned, words left-aligned.
            if i == 2 {
                let _ = write!(text, "{cell:>w$}  ");
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(headers);
    let rule = widths.map(|w| "-".repeat(w));
    line([&rule[0], &rule[1], &rule[2], &rule[3], &rule[4]]);
    let mut previous = "";
    for (row, r) in cells.iter().zip(rows) {
        // The scenario is named on its first row only.
        let scenario = if r.scenario == previous { "" } else { &row[0] };
        previous = &r.scenario;
        line([scenario, &row[1], &row[2], &row[3], &row[4]]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_print_in_their_unit() {
        assert_eq!(format(1234.4, Unit::PerSec), "1234/s");
        assert_eq!(format(0.000_25, Unit::Time), "250 µs");
        assert_eq!(format(0.0123, Unit::Time), "12.3 ms");
        assert_eq!(format(0.25, Unit::Time), "250 ms");
        assert_eq!(format(2.5, Unit::Time), "2.50 s");
        assert_eq!(format(10_240.0, Unit::MiB), "10.0 MiB");
        assert_eq!(format(0.03, Unit::CpuSec), "0.030 s");
    }

    #[test]
    fn targets_are_checked_in_both_directions() {
        let r = Row::figure("1", "accepted", 600.0, Unit::PerSec, Target::AtLeast(500.0));
        assert_eq!((r.target.as_str(), r.met), (">= 500/s", Some(true)));
        let r = Row::time("1", "p99", Duration::from_millis(80), Target::AtMost(0.05));
        assert_eq!((r.target.as_str(), r.met), ("<= 50.0 ms", Some(false)));
        assert_eq!(Row::info("4", "rss", "3 MiB").met, None);
    }

    #[test]
    fn the_table_is_aligned_and_names_each_scenario_once() {
        let rows = vec![
            Row::figure(
                "1 trigger",
                "accepted/s",
                600.0,
                Unit::PerSec,
                Target::AtLeast(500.0),
            ),
            Row::time(
                "1 trigger",
                "p99",
                Duration::from_millis(80),
                Target::AtMost(0.05),
            ),
            Row::info("5 restart", "runs in store", "2000"),
        ];
        let text = render(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[2].starts_with("1 trigger  accepted/s"));
        assert!(lines[2].ends_with("ok"));
        assert!(lines[3].starts_with("           p99"));
        assert!(lines[3].ends_with("MISS"));
        assert!(lines[4].starts_with("5 restart"));
    }
}
