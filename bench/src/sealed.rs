//! Scenario 6: a sealed mesh (every frame authenticated and encrypted) against the plain
//! one, figure by figure. Both meshes run the same counts on the same machine, one after
//! the other; the sealed one runs scenarios 2 (one run at a time), 1+2, 3 and 5.

use std::time::Duration;

use crate::report::{self, Row, Unit};
use crate::scenario::Figures;
use crate::targets;

/// The scenario's label in the table.
pub const SCENARIO: &str = "6 sealed";

/// `sealed` as a share of `plain`, held to [`targets::SEALED_THROUGHPUT_SHARE`].
fn throughput_row(metric: &str, plain: Option<f64>, sealed: Option<f64>) -> Option<Row> {
    let (share, text) = report::share_of(sealed?, plain?);
    Some(Row {
        met: Some(share >= targets::SEALED_THROUGHPUT_SHARE),
        target: format!(
            ">= {:.0}% of plain",
            targets::SEALED_THROUGHPUT_SHARE * 100.0
        ),
        ..Row::info(SCENARIO, metric, text)
    })
}

/// A sealed time next to the plain one, held to the plain figure's own target.
fn time_row(
    metric: &str,
    plain: Option<Duration>,
    sealed: Option<Duration>,
    at_most: f64,
) -> Option<Row> {
    let (plain, sealed) = (plain?.as_secs_f64(), sealed?.as_secs_f64());
    Some(Row {
        met: Some(sealed <= at_most),
        target: format!("<= {}", report::format(at_most, Unit::Time)),
        ..Row::info(
            SCENARIO,
            metric,
            format!(
                "{} vs {}",
                report::format(sealed, Unit::Time),
                report::format(plain, Unit::Time)
            ),
        )
    })
}

/// `a / b` of the sealed pass, `all` when every one did.
fn succeeded(pair: Option<(usize, usize)>) -> (String, bool) {
    match pair {
        Some((done, asked)) => (format!("{done} / {asked}"), done == asked),
        None => (String::from("?"), false),
    }
}

/// The sealed pass's rows that failed, or missed a target the plain mesh met: what
/// sealing broke. (A target both miss is the plain figure's story, told in its own row.)
pub fn new_misses(plain_rows: &[Row], sealed_rows: Vec<Row>) -> Vec<Row> {
    let plain_missed = |row: &Row| {
        plain_rows
            .iter()
            .any(|p| p.met == Some(false) && p.scenario == row.scenario && p.metric == row.metric)
    };
    sealed_rows
        .into_iter()
        .filter(|r| r.met == Some(false) && (r.is_failure() || !plain_missed(r)))
        .collect()
}

/// The rows comparing a sealed mesh's figures with a plain one's; `sealed_misses` (see
/// [`new_misses`]) are shown here too.
pub fn rows(plain: &Figures, sealed: &Figures, sealed_misses: Vec<Row>) -> Vec<Row> {
    let mut rows = Vec::new();
    let (queue, queue_ok) = succeeded(sealed.runs_succeeded);
    let (broadcast, broadcast_ok) = succeeded(sealed.broadcast_succeeded);
    rows.push(Row {
        met: Some(queue_ok && broadcast_ok),
        target: String::from("all"),
        ..Row::info(
            SCENARIO,
            "sealed runs succeeded: queue, broadcast",
            format!("{queue}, {broadcast}"),
        )
    });
    rows.extend(throughput_row(
        "accepted/s, sealed vs plain",
        plain.accepted_per_sec,
        sealed.accepted_per_sec,
    ));
    rows.extend(throughput_row(
        "runs/s, sealed vs plain",
        plain.runs_per_sec,
        sealed.runs_per_sec,
    ));
    rows.extend(throughput_row(
        "broadcast tasks/s, sealed vs plain",
        plain.broadcast_tasks_per_sec,
        sealed.broadcast_tasks_per_sec,
    ));
    rows.extend(time_row(
        "idle mesh, 1 run at a time: trigger->succeeded p50, sealed vs plain",
        plain.single_run_p50,
        sealed.single_run_p50,
        targets::SINGLE_RUN_P50,
    ));
    if let (Some(p), Some(s)) = (plain.cpu_ms_per_run, sealed.cpu_ms_per_run) {
        // The load-independent read of the throughput target: on a CPU-bound host,
        // throughput goes as 1 / CPU per run, whatever else the machine is doing.
        let (p_all, s_all): (f64, f64) = (p.iter().sum(), s.iter().sum());
        let most = 1.0 / targets::SEALED_THROUGHPUT_SHARE;
        rows.push(Row {
            met: Some(p_all > 0.0 && s_all <= p_all * most),
            target: format!("<= {:.0}% of plain", most * 100.0),
            ..Row::info(
                SCENARIO,
                "CPU per run, all processes and children: sealed vs plain",
                format!(
                    "{s_all:.2} vs {p_all:.2} ms ({:.0}%)",
                    if p_all > 0.0 {
                        s_all / p_all * 100.0
                    } else {
                        0.0
                    }
                ),
            )
        });
        for (i, who) in ["broker", "frontend", "workers themselves"]
            .into_iter()
            .enumerate()
        {
            let change = if p[i] > 0.0 {
                format!(" ({:+.0}%)", (s[i] / p[i] - 1.0) * 100.0)
            } else {
                String::new()
            };
            rows.push(Row::info(
                SCENARIO,
                &format!("CPU per run, {who}: sealed vs plain"),
                format!("{:.2} vs {:.2} ms{change}", s[i], p[i]),
            ));
        }
    }
    rows.extend(time_row(
        "broker restart: start -> /healthz 200, sealed vs plain",
        plain.restart_healthy,
        sealed.restart_healthy,
        targets::RESTART_HEALTHY,
    ));
    for mut row in sealed_misses {
        row.metric = format!("sealed pass: {} {}", row.scenario, row.metric);
        row.scenario = SCENARIO.to_owned();
        rows.push(row);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_throughput_is_held_to_a_share_of_plain() {
        let plain = Figures {
            runs_per_sec: Some(150.0),
            accepted_per_sec: Some(400.0),
            runs_succeeded: Some((2000, 2000)),
            broadcast_succeeded: Some((200, 200)),
            cpu_ms_per_run: Some([1.0, 0.5, 2.0, 4.0]),
            ..Figures::default()
        };
        let sealed = Figures {
            runs_per_sec: Some(135.0),
            accepted_per_sec: Some(300.0),
            cpu_ms_per_run: Some([1.5, 0.5, 2.0, 4.0]),
            ..plain
        };
        let rows = rows(&plain, &sealed, vec![]);
        let find = |m: &str| rows.iter().find(|r| r.metric.starts_with(m)).unwrap();
        let r = find("runs/s");
        assert_eq!(
            (r.value.as_str(), r.met),
            ("135/s vs 150/s (90%)", Some(true))
        );
        assert_eq!(r.target, ">= 80% of plain");
        assert_eq!(find("accepted/s").met, Some(false)); // 75 %
        assert_eq!(find("sealed runs succeeded").met, Some(true));
        assert_eq!(find("CPU per run, broker").value, "1.50 vs 1.00 ms (+50%)");
        let all = find("CPU per run, all");
        assert_eq!(all.value, "8.00 vs 7.50 ms (107%)");
        assert_eq!(
            (all.target.as_str(), all.met),
            ("<= 125% of plain", Some(true))
        );
        // No broadcast figures: no row rather than a made-up one.
        assert!(rows.iter().all(|r| !r.metric.starts_with("broadcast")));
    }

    #[test]
    fn only_misses_that_sealing_caused_are_carried_over() {
        let miss = |metric: &str| Row {
            met: Some(false),
            ..Row::info("1 trigger", metric, "x")
        };
        let ok = |metric: &str| Row {
            met: Some(true),
            ..Row::info("1 trigger", metric, "x")
        };
        let plain = [miss("accepted/s"), ok("202 latency p50"), miss("FAILED")];
        let sealed = vec![
            miss("accepted/s"),
            miss("202 latency p50"),
            ok("202 Accepted"),
            miss("FAILED"),
        ];
        let kept: Vec<String> = new_misses(&plain, sealed)
            .into_iter()
            .map(|r| r.metric)
            .collect();
        assert_eq!(kept, ["202 latency p50", "FAILED"]);
    }

    #[test]
    fn misses_of_the_sealed_pass_are_shown_under_scenario_6() {
        let miss = Row::failed("3 broadcast", &anyhow::anyhow!("boom"));
        let rows = rows(&Figures::default(), &Figures::default(), vec![miss]);
        let last = rows.last().unwrap();
        assert_eq!(last.scenario, SCENARIO);
        assert_eq!(last.metric, "sealed pass: 3 broadcast FAILED");
        // Nothing measured: the success row says so and misses.
        assert_eq!(rows[0].met, Some(false));
    }
}
