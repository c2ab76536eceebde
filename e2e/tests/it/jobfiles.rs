//! Job files: the shipped ones and the compatibility fixtures still parse, and what a file
//! declares holds on a real mesh.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use jobz::jobfile::{parse_job_file, Delivery, JobSet, JobSpec, DEFAULT_PARAM_PATTERN};
use jobz::template::Template;

use crate::harness::{bin, list_of, repo_root, str_of, Mesh};

fn parse(path: &Path) -> JobSet {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_job_file(path, &text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn original_jobz_job_db_still_parses() {
    let set = parse(&repo_root().join("tests/data/original-jobz-jobdb.yml"));
    assert_eq!(set.jobs.len(), 4);
    let sync = &set.jobs["bfd_category_sync"];
    assert_eq!(sync.on_success, vec!["bfd_category_dump"]);
    assert_eq!(sync.on_failure, vec!["notify_failure"]);
    assert_eq!(sync.delivery, Delivery::Broadcast);
    // `{date}` is declared implicitly: required, default pattern.
    assert!(sync.params["date"].required);
    assert_eq!(sync.params["date"].pattern, DEFAULT_PARAM_PATTERN);
    let last = &set.jobs["import_category_dump"];
    assert!(last.on_success.is_empty());
    // The quote ends before the placeholder: still one argument, as the original meant.
    let notify = Template::parse(&set.jobs["notify_failure"].command).unwrap();
    let value = |date: &str| BTreeMap::from([("date".to_string(), date.to_string())]);
    assert_eq!(
        notify.render_shell(&value("a b")).unwrap(),
        "/usr/local/bin/notify --channel etl \"jobz step failed on \"'a b'"
    );
}

#[test]
fn jobz_v1_spec_example_still_parses() {
    let set = parse(&repo_root().join("tests/data/jobz-v1-jobs.yaml"));
    let job = &set.jobs["import_category_dump"];
    assert_eq!(job.on_success, vec!["reindex_search"]);
    assert_eq!(job.on_failure, vec!["alert_ops"]);
    assert_eq!(job.timeout_ms, Some(30 * 60 * 1000));
    assert_eq!(job.retries, 3);
    assert_eq!(
        job.params["date"].pattern,
        "^[0-9]{4}_[0-9]{2}_[0-9]{2}$".to_string()
    );
    let sem = &set.semaphores["all_reindexed"];
    assert_eq!(sem.then, vec!["publish_site"]);
    assert_eq!(sem.wait_for[0].count, Some(10));
}

#[test]
fn every_file_in_jobs_d_parses_and_names_only_known_successors() {
    let dir = repo_root().join("jobs.d");
    let mut all: BTreeMap<String, JobSpec> = BTreeMap::new();
    let mut schedules = Vec::new();
    let mut files = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        files += 1;
        let set = parse(&path);
        schedules.extend(set.schedules.into_values());
        for (name, job) in set.jobs {
            assert!(
                all.insert(name.clone(), job).is_none(),
                "{name} defined twice"
            );
        }
    }
    assert!(files > 0, "no job files in {}", dir.display());
    for job in all.values() {
        for next in job.successors() {
            assert!(
                all.contains_key(next),
                "{} names unknown successor {next}",
                job.name
            );
        }
    }

    // The demo pipeline that scripts/demo.sh triggers.
    let import = &all["import"];
    assert_eq!(import.on_success, vec!["reindex", "notify"]);
    assert_eq!(
        import.params["date"].pattern,
        "^[0-9]{4}_[0-9]{2}_[0-9]{2}$".to_string()
    );
    assert_eq!(all["reindex"].delivery, Delivery::Broadcast);
    assert_eq!(all["reindex"].on_success, vec!["warm_cache"]);
    assert_eq!(all["warm_cache"].delivery, Delivery::Local);
    assert_eq!(all["import_broken"].on_failure, vec!["alert_ops"]);

    // Every schedule starts a known job with parameters that job accepts.
    assert!(!schedules.is_empty(), "no example schedule in jobs.d");
    for schedule in &schedules {
        let job = all.get(&schedule.job).unwrap_or_else(|| {
            panic!(
                "schedule {} starts unknown job {}",
                schedule.name, schedule.job
            )
        });
        let slot = schedule.timing.next_after(jobz::now_ms()).unwrap();
        let params = schedule.params_for(slot).unwrap();
        let rules = jobz::jobfile::ParamRules::compile(job).unwrap();
        rules
            .validate_params(&params)
            .unwrap_or_else(|e| panic!("schedule {}: {params:?}: {e}", schedule.name));
    }
}

/// A pattern written without anchors, as job authors do: `[a-z]+`.
const UNANCHORED_PATTERN_JOB: &str = r#"
jobs:
  - name: lowercase_only
    command: "printf '%s\\n' {v} >> @DIR@/ran"
    params:
      v: { required: true, pattern: '[a-z]+' }
"#;

#[test]
fn an_unanchored_pattern_refuses_a_value_that_only_contains_a_match() {
    let mesh = Mesh::builder().worker("w1", UNANCHORED_PATTERN_JOB).start();
    mesh.wait_workers_live(1);
    let canary = mesh.dir().join("canary");
    let hostile = [
        "a ../../etc/passwd $(id) ';".to_string(),
        format!("abc; touch {}", canary.display()),
        format!("$(touch {})abc", canary.display()),
        "abc\n".to_string(),
        "ABC abc".to_string(),
    ];
    for value in &hostile {
        let (status, body) = mesh.trigger("lowercase_only", &[("v", value)]);
        assert_eq!(status, 400, "{value:?}: {body}");
        assert!(
            str_of(&body, "error").contains("does not match"),
            "{value:?}: {body}"
        );
    }
    // The job itself works: the one run there is, is the good value's.
    let run_id = mesh.start_run("lowercase_only", &[("v", "abc")]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run}");
    let (status, runs) = mesh.get_json("/runs?job=lowercase_only&limit=100");
    assert_eq!(status, 200, "{runs}");
    assert_eq!(
        list_of(&runs, "runs").len(),
        1,
        "only the good value ran: {runs}"
    );
    let ran = fs::read_to_string(mesh.dir().join("ran")).unwrap();
    assert_eq!(ran, "abc\n");
    assert!(!canary.exists(), "a hostile value reached a shell");
}

#[test]
fn worker_check_names_the_file_and_line_of_a_placeholder_inside_quotes() {
    let dir = tempfile::tempdir().unwrap();
    // The original jobz style: the value was pasted in, so authors quoted it.
    fs::write(
        dir.path().join("notify.yaml"),
        "jobs:\n  - name: fine\n    command: echo {date} 'ok'\n  - name: notify\n    command: notify --text \"failed on {date}\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("jobz-worker"))
        .arg("--check")
        .arg("--jobs-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let file = dir.path().join("notify.yaml");
    let expected = format!(
        "error {}:5: job \"notify\": command: placeholder {{date}} is inside double quotes: drop the quotes",
        file.display()
    );
    assert!(stdout.contains(&expected), "{stdout}");
}
