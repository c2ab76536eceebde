//! The result table: one row per figure, with the same figure of Celery + Redis and the
//! ratio where one was measured, the target it is held to (if any) and whether it met it.

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
    /// The same figure measured on Celery + Redis in the same bench run (empty if none).
    pub peer: String,
    /// jobz / Celery, printed (empty if there is no Celery figure).
    pub ratio: String,
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
            peer: String::new(),
            ratio: String::new(),
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
            target: target_text,
            met,
            ..Row::info(scenario, metric, format(value, unit))
        }
    }

    /// A duration, checked against a target in seconds.
    pub fn time(scenario: &str, metric: &str, value: Duration, target: Target) -> Row {
        Row::figure(scenario, metric, value.as_secs_f64(), Unit::Time, target)
    }

    /// A row saying a scenario could not be measured.
    pub fn failed(scenario: &str, error: &anyhow::Error) -> Row {
        Row {
            met: Some(false),
            ..Row::info(scenario, FAILED, format!("{error:#}"))
        }
    }

    /// True for the row of a scenario that could not be measured.
    pub fn is_failure(&self) -> bool {
        self.metric == FAILED
    }
}

/// The metric of a row saying a scenario could not be measured.
pub const FAILED: &str = "FAILED";

/// Where a scenario's rows go in the table: by the number its label starts with
/// (`10 backlog drain` after `9 idle latency`); labels without one (the targets) first.
pub fn section_rank(scenario: &str) -> u32 {
    let digits: String = scenario.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or(0)
}

/// Sorts rows by section ([`section_rank`]), keeping the order measured within each.
pub fn sort_by_section(rows: &mut [Row]) {
    rows.sort_by_key(|r| section_rank(&r.scenario));
}

/// `part` as a share of `whole` (0 when `whole` is not positive), and as printed:
/// `135/s vs 150/s (90%)`.
pub fn share_of(part: f64, whole: f64) -> (f64, String) {
    let share = if whole > 0.0 { part / whole } else { 0.0 };
    let text = format!(
        "{} vs {} ({:.0}%)",
        format(part, Unit::PerSec),
        format(whole, Unit::PerSec),
        share * 100.0
    );
    (share, text)
}

/// `jobz / peer` as printed in the ratio column: `0.44x`, `3.5x`.
pub fn ratio(jobz: f64, peer: f64) -> String {
    if peer <= 0.0 || !jobz.is_finite() {
        return String::new();
    }
    let r = jobz / peer;
    if r >= 10.0 {
        format!("{r:.0}x")
    } else if r >= 0.095 {
        format!("{r:.2}x")
    } else {
        format!("{r:.3}x")
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

/// Columns of the table.
const COLUMNS: usize = 7;

/// The table as aligned text, one row per line: scenario, metric, the jobz figure, the
/// Celery figure, jobz / Celery, the target, and PASS or MISS.
pub fn render(rows: &[Row]) -> String {
    let headers = [
        "scenario",
        "metric",
        "jobz",
        "Celery",
        "jobz/Celery",
        "target",
        "",
    ];
    let cells: Vec<[String; COLUMNS]> = rows
        .iter()
        .map(|r| {
            let verdict = match r.met {
                None => "",
                Some(true) => "PASS",
                Some(false) => "MISS",
            };
            [
                r.scenario.clone(),
                r.metric.clone(),
                r.value.clone(),
                r.peer.clone(),
                r.ratio.clone(),
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
    let mut line = |cols: [&str; COLUMNS]| {
        let mut text = String::new();
        for (i, (cell, w)) in cols.iter().zip(widths).enumerate() {
            // Figures are right-aligned, words left-aligned.
            if (2..=4).contains(&i) {
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
    line(std::array::from_fn(|i| rule[i].as_str()));
    let mut previous = "";
    for (row, r) in cells.iter().zip(rows) {
        // The scenario is named on its first row only.
        let scenario = if r.scenario == previous { "" } else { &row[0] };
        previous = &r.scenario;
        line(std::array::from_fn(|i| {
            if i == 0 {
                scenario
            } else {
                row[i].as_str()
            }
        }));
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
        assert!(lines[0].starts_with("scenario   metric"));
        assert!(lines[0].contains("jobz  Celery  jobz/Celery  target"));
        assert!(lines[2].starts_with("1 trigger  accepted/s"));
        assert!(lines[2].ends_with("PASS"));
        assert!(lines[3].starts_with("           p99"));
        assert!(lines[3].ends_with("MISS"));
        assert!(lines[4].starts_with("5 restart"));
        assert!(lines[4].ends_with("2000"), "{:?}", lines[4]);
    }

    #[test]
    fn celery_figures_and_ratios_line_up_right_aligned() {
        let rows = vec![
            Row {
                peer: "703/s".into(),
                ratio: ratio(245.0, 703.0),
                ..Row::figure("t", "runs/s", 245.0, Unit::PerSec, Target::AtLeast(1406.0))
            },
            Row::info("t", "idle RSS", "8.0 MiB"),
        ];
        assert_eq!(rows[0].ratio, "0.35x");
        let text = render(&rows);
        let lines: Vec<&str> = text.lines().collect();
        let celery = lines[0].find("Celery").unwrap();
        // Right-aligned under their headers: both rows end their figure at the same column.
        assert_eq!(&lines[2][celery..celery + 6], " 703/s");
        assert!(lines[2].contains("0.35x  >= 1406/s  MISS"), "{}", lines[2]);
        assert!(lines[3].trim_end().ends_with("8.0 MiB"));
    }

    #[test]
    fn ratios_keep_two_significant_figures_or_so() {
        assert_eq!(ratio(3.5, 1.0), "3.50x");
        assert_eq!(ratio(1.0, 21.9), "0.046x");
        assert_eq!(ratio(138.0, 5.0), "28x");
        assert_eq!(ratio(1.0, 0.0), "");
        assert_eq!(
            share_of(135.0, 150.0),
            (0.9, String::from("135/s vs 150/s (90%)"))
        );
        assert_eq!(share_of(1.0, 0.0).0, 0.0);
    }

    #[test]
    fn sections_sort_by_number_and_targets_come_first() {
        let mut rows = vec![
            Row::info("10 backlog drain", "a", "1"),
            Row::info("9 idle latency", "b", "2"),
            Row::info("targets", "c", "3"),
            Row::info("1 trigger", "d", "4"),
            Row::info("9 idle latency", "e", "5"),
        ];
        sort_by_section(&mut rows);
        let order: Vec<&str> = rows.iter().map(|r| r.metric.as_str()).collect();
        assert_eq!(order, ["c", "d", "b", "e", "a"]);
        assert!(Row::failed("3", &anyhow::anyhow!("x")).is_failure());
    }
}
