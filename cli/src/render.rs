//! Human tables from the frontend's JSON.

use serde_json::Value;

/// A cell: strings as they are, `null` as `-`, lists joined by commas.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.replace(['\n', '\t'], " "),
        Value::Array(items) if items.is_empty() => "-".to_owned(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(v)))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// Rows under headers, each column as wide as its widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(cell);
            let pad = widths
                .get(i)
                .copied()
                .unwrap_or(0)
                .saturating_sub(cell.chars().count());
            if i + 1 < widths.len() {
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(&mut headers.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

fn cells(item: &Value, keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| cell(&item[*k])).collect()
}

fn list<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value[key].as_array().map_or(&[], Vec::as_slice)
}

/// `GET /runs`.
pub fn runs(body: &Value) -> String {
    let keys = [
        "run_id",
        "job",
        "state",
        "created_at",
        "finished_at",
        "tags",
    ];
    let rows: Vec<Vec<String>> = list(body, "runs").iter().map(|r| cells(r, &keys)).collect();
    table(
        &["RUN", "JOB", "STATE", "CREATED", "FINISHED", "TAGS"],
        &rows,
    )
}

/// `GET /runs/{id}`: the run, then one line per task.
pub fn run(run: &Value) -> String {
    let mut out = format!(
        "run {}  job {}  {}\ncreated {}  finished {}\nparams {}\n",
        cell(&run["run_id"]),
        cell(&run["job"]),
        cell(&run["state"]),
        cell(&run["created_at"]),
        cell(&run["finished_at"]),
        cell(&run["params"]),
    );
    if let Some(error) = run["error"].as_str().filter(|e| !e.is_empty()) {
        out.push_str(&format!("error {error}\n"));
    }
    let keys = [
        "job",
        "worker",
        "state",
        "attempt",
        "exit_code",
        "started_at",
        "finished_at",
        "error",
    ];
    let rows: Vec<Vec<String>> = list(run, "steps").iter().map(|s| cells(s, &keys)).collect();
    if !rows.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &[
                "JOB", "WORKER", "STATE", "ATTEMPT", "EXIT", "STARTED", "FINISHED", "ERROR",
            ],
            &rows,
        ));
    }
    out
}

/// `GET /workers`.
pub fn workers(body: &Value) -> String {
    let keys = [
        "name",
        "state",
        "slots",
        "running",
        "last_seen",
        "version",
        "jobs",
    ];
    let rows: Vec<Vec<String>> = list(body, "workers")
        .iter()
        .map(|w| cells(w, &keys))
        .collect();
    table(
        &[
            "WORKER",
            "STATE",
            "SLOTS",
            "RUNNING",
            "LAST SEEN",
            "VERSION",
            "JOBS",
        ],
        &rows,
    )
}

/// `GET /jobs`.
pub fn jobs(body: &Value) -> String {
    let rows: Vec<Vec<String>> = list(body, "jobs")
        .iter()
        .map(|j| {
            let params = j["params"]
                .as_object()
                .map(|p| p.keys().cloned().collect::<Vec<_>>().join(","))
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "-".into());
            vec![
                cell(&j["name"]),
                cell(&j["delivery"]),
                params,
                cell(&j["workers"]),
                cell(&j["description"]),
            ]
        })
        .collect();
    table(
        &["JOB", "DELIVERY", "PARAMS", "WORKERS", "DESCRIPTION"],
        &rows,
    )
}

/// `GET /dead`.
pub fn dead(body: &Value) -> String {
    let keys = [
        "task_id",
        "job",
        "worker",
        "failed_at",
        "retried_as",
        "error",
    ];
    let rows: Vec<Vec<String>> = list(body, "dead").iter().map(|d| cells(d, &keys)).collect();
    table(
        &["TASK", "JOB", "WORKER", "FAILED", "RETRIED AS", "ERROR"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn columns_line_up_and_lines_end_without_blanks() {
        let text = table(
            &["A", "LONGER"],
            &[
                vec!["x".into(), "1".into()],
                vec!["wide cell".into(), "".into()],
            ],
        );
        assert_eq!(text, "A          LONGER\nx          1\nwide cell\n");
    }

    #[test]
    fn cells_show_nulls_lists_and_maps_plainly() {
        assert_eq!(cell(&json!(null)), "-");
        assert_eq!(cell(&json!(["a", "b"])), "a,b");
        assert_eq!(cell(&json!([])), "-");
        assert_eq!(cell(&json!({"date": "2026_11_23"})), "date=2026_11_23");
        assert_eq!(cell(&json!(3)), "3");
        assert_eq!(cell(&json!("two\nlines")), "two lines");
    }

    #[test]
    fn a_run_shows_its_steps() {
        let run = json!({
            "run_id": "r1", "job": "import", "state": "failed", "params": {"date": "d"},
            "created_at": "t0", "finished_at": "t1",
            "steps": [{"job": "import", "worker": "w1", "state": "failed", "attempt": 1,
                       "exit_code": 3, "started_at": "t0", "finished_at": "t1", "error": null}]
        });
        let text = super::run(&run);
        assert!(text.starts_with("run r1  job import  failed\n"), "{text}");
        assert!(text.contains("params date=d\n"), "{text}");
        assert!(text.contains("\nimport  w1      failed"), "{text}");
    }
}
