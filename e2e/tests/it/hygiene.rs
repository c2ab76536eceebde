//! Job-execution hygiene on a real mesh: what a step's environment holds, the cap on its
//! output, `run_as`, and that hostile values never make the worker write outside its log
//! and spool directories.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{list_tree, steps_of, str_of, Mesh};

/// `PATH` of every step unless `--env-allow PATH` (worker::runner::SAFE_PATH).
const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The only step of a finished run.
fn only_step(run: &serde_json::Value) -> serde_json::Value {
    let steps = steps_of(run);
    assert_eq!(steps.len(), 1, "{run:#}");
    steps[0].clone()
}

/// The output files a worker kept for a run.
fn output_files(mesh: &Mesh, worker: &str, run_id: &str) -> Vec<PathBuf> {
    let dir = mesh.dir().join(worker).join("log/runs").join(run_id);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn running_as_root() -> bool {
    // /proc/self belongs to the effective user of the process looking at it.
    std::fs::metadata("/proc/self").ok().map(|m| m.uid()) == Some(0)
}

/// (uid, gid) of `nobody`, if the host has it.
fn nobody() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "nobody"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// Lets other users reach the mesh's directory (a temporary directory is 0700) and makes
/// `<mesh>/out`, writable by anyone, for steps that run as another user.
fn open_for_other_users(mesh: &Mesh) -> PathBuf {
    std::fs::set_permissions(mesh.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = mesh.dir().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    out
}

/// Restarts worker `name` as `(uid, gid)`, owning its own directories, with `env` added to
/// its environment (the test must be root).
fn restart_as(mesh: &mut Mesh, name: &str, (uid, gid): (u32, u32), env: &[(&str, &str)]) {
    mesh.kill9(name);
    let home = mesh.dir().join(name);
    let chown = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(&home)
        .status()
        .unwrap();
    assert!(chown.success());
    mesh.restart_with(name, Some((uid, gid)), env);
}

/// What a hostile step tries against its worker, written as `sh SNOOP OUT KEY`: it finds
/// the worker through its process tree (the parent of its step supervisor, the process whose
/// first argument is `--supervise-steps`), records the pid, tries to read the worker's
/// environment, open files and memory map, the supervisor's environment and memory map
/// (it carries other steps' variables), and the key file KEY, each with its exit status;
/// and, as a control, has a child read the step's own environment.
const SNOOP: &str = r#"out=$1 key=$2
p=$$ worker= supervisor=
while [ "$p" -gt 1 ]; do
    parent=$(awk '/^PPid:/ {print $2}' "/proc/$p/status")
    if [ "$(tr '\0' '\n' <"/proc/$p/cmdline" | sed -n 2p)" = --supervise-steps ]; then
        worker=$parent supervisor=$p
        break
    fi
    p=$parent
done
echo "$worker" >"$out/worker_pid"
cat "/proc/$worker/environ" >"$out/environ" 2>&1; echo $? >"$out/environ.rc"
ls "/proc/$worker/fd" >"$out/fd" 2>&1; echo $? >"$out/fd.rc"
cat "/proc/$worker/maps" >"$out/maps" 2>&1; echo $? >"$out/maps.rc"
cat "/proc/$supervisor/environ" >"$out/sup_environ" 2>&1; echo $? >"$out/sup_environ.rc"
cat "/proc/$supervisor/maps" >"$out/sup_maps" 2>&1; echo $? >"$out/sup_maps.rc"
cat "$key" >"$out/key" 2>&1; echo $? >"$out/key.rc"
cat "/proc/$$/environ" >"$out/own_environ"
"#;

/// The file `name` the snoop script wrote into `out`.
fn snooped(out: &Path, name: &str) -> String {
    std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Runs the snoop script (see [`SNOOP`]) as job `snoop` and checks that the step found its
/// worker and could read nothing of it, while its own processes stay readable to it.
fn assert_the_step_cannot_read_its_worker(mesh: &mut Mesh, out: &Path) {
    let run_id = mesh.start_run("snoop", &[]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    let pid = mesh.pid("w1");
    assert_eq!(
        snooped(out, "worker_pid").trim(),
        pid.to_string(),
        "the step did not find its worker through its process tree"
    );
    let environ = snooped(out, "environ");
    assert!(
        !environ.contains("s3cret"),
        "the step read the worker's environment: {:?}…",
        environ.chars().take(200).collect::<String>()
    );
    assert_ne!(snooped(out, "environ.rc").trim(), "0", "{environ:?}");
    assert!(environ.contains("Permission denied"), "{environ:?}");
    let fd = snooped(out, "fd");
    assert_ne!(snooped(out, "fd.rc").trim(), "0", "open files listed: {fd}");
    let maps = snooped(out, "maps");
    assert_ne!(
        snooped(out, "maps.rc").trim(),
        "0",
        "memory map read: {maps}"
    );
    for what in ["sup_environ", "sup_maps"] {
        assert_ne!(
            snooped(out, &format!("{what}.rc")).trim(),
            "0",
            "the step read its supervisor's {what}: {}",
            snooped(out, what)
        );
    }
    // The step itself is not affected: a child of its shell reads the shell's environment
    // (exec makes the step's processes dumpable again).
    let own = snooped(out, "own_environ");
    assert!(own.contains("JOBZ_JOB=snoop"), "{own:?}");
}

/// A mesh with one worker serving the `snoop` job (the script in `<dir>/snoop.sh`, output
/// in `<dir>/out`), with `args`; `sealed` gives the worker its key, `<dir>/w1/node.key`,
/// which the script tries to read.
fn snoop_mesh(sealed: bool, args: &[&str]) -> (Mesh, PathBuf) {
    let mut builder = Mesh::builder().worker_with_args(
        "w1",
        r#"
jobs:
  - name: snoop
    command: "sh @DIR@/snoop.sh @DIR@/out @DIR@/w1/node.key"
"#,
        args,
    );
    if sealed {
        builder = builder.sealed();
    }
    let mesh = builder.start();
    let out = open_for_other_users(&mesh);
    std::fs::write(mesh.dir().join("snoop.sh"), SNOOP).unwrap();
    (mesh, out)
}

#[test]
fn a_step_as_the_workers_own_user_cannot_read_the_workers_environment_or_memory() {
    let (mut mesh, out) = snoop_mesh(false, &[]);
    let secret = [("HYGIENE_SECRET", "s3cret")];
    if running_as_root() {
        // Root may read any process: the worker runs as nobody, and its step with it.
        let Some(nobody) = nobody() else {
            eprintln!("skipped: this host has no user `nobody`");
            return;
        };
        restart_as(&mut mesh, "w1", nobody, &secret);
    } else {
        mesh.restart_with("w1", None, &secret);
    }
    mesh.wait_workers_live(1);
    assert_the_step_cannot_read_its_worker(&mut mesh, &out);
}

#[test]
fn a_step_run_as_another_user_cannot_read_the_workers_key_or_environment() {
    if !running_as_root() {
        eprintln!("skipped: run_as needs the test to run as root");
        return;
    }
    if nobody().is_none() {
        eprintln!("skipped: this host has no user `nobody`");
        return;
    }
    let (mut mesh, out) = snoop_mesh(true, &["--default-run-as", "nobody"]);
    mesh.restart_with("w1", None, &[("HYGIENE_SECRET", "s3cret")]);
    mesh.wait_workers_live(1);
    assert!(mesh.dir().join("w1/node.key").is_file());
    assert_the_step_cannot_read_its_worker(&mut mesh, &out);
    let key = snooped(&out, "key");
    assert!(!key.contains("jobz-secret-key"), "the step read the key");
    assert_ne!(snooped(&out, "key.rc").trim(), "0", "{key:?}");
    assert!(key.contains("Permission denied"), "{key:?}");
}

#[test]
fn steps_see_only_the_allow_listed_environment() {
    let mut mesh = Mesh::builder()
        .worker_with_args(
            "w1",
            r#"
jobs:
  - name: dump_env
    command: "env > @DIR@/env.out"
    params:
      date: { required: true }
"#,
            &["--env-allow", "HYGIENE_FOO"],
        )
        .start();
    // The worker's environment holds secrets and an allowed variable.
    mesh.restart_with(
        "w1",
        None,
        &[
            ("HYGIENE_FOO", "passed"),
            ("HYGIENE_SECRET", "s3cret"),
            ("AWS_SECRET_ACCESS_KEY", "s3cret"),
            ("JOBZ_SECRET_TEST", "s3cret"),
            ("PATH", "/s3cret/bin:/usr/bin:/bin"),
        ],
    );
    mesh.wait_workers_live(1);

    let run_id = mesh.start_run("dump_env", &[("date", "2026_01_02")]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");

    let text = std::fs::read_to_string(mesh.dir().join("env.out")).unwrap();
    assert!(!text.contains("s3cret"), "a secret leaked:\n{text}");
    let env: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let allowed = [
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LC_ALL",
        "TZ",
        "HYGIENE_FOO",
        "JOBZ_RUN_ID",
        "JOBZ_STEP_ID",
        "JOBZ_TASK_ID",
        "JOBZ_JOB",
        "JOBZ_WORKER",
        "JOBZ_ATTEMPT",
        "JOBZ_FRONTEND",
        "JOBZ_PARAM_DATE",
        // Set by /bin/sh itself.
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
    ];
    for name in env.keys() {
        assert!(allowed.contains(name), "{name} reached the step:\n{text}");
    }
    assert_eq!(env.get("HYGIENE_FOO"), Some(&"passed"), "{text}");
    assert_eq!(env.get("PATH"), Some(&SAFE_PATH), "{text}");
    assert_eq!(env.get("JOBZ_RUN_ID"), Some(&run_id.as_str()), "{text}");
    assert_eq!(env.get("JOBZ_JOB"), Some(&"dump_env"), "{text}");
    assert_eq!(env.get("JOBZ_WORKER"), Some(&"w1"), "{text}");
    assert_eq!(env.get("JOBZ_PARAM_DATE"), Some(&"2026_01_02"), "{text}");
    assert!(env.contains_key("JOBZ_FRONTEND"), "{text}");
    for absent in ["RUST_LOG", "NO_COLOR", "HYGIENE_SECRET", "JOBZ_SECRET_TEST"] {
        assert!(
            !env.contains_key(absent),
            "{absent} reached the step:\n{text}"
        );
    }
}

#[test]
fn output_beyond_the_cap_is_cut_marked_and_reported_while_the_step_runs_on() {
    let mesh = Mesh::builder()
        .worker_with_args(
            "w1",
            // 100,000 bytes, ten times the cap; then proof that the writer was not stopped.
            r#"
jobs:
  - name: chatty
    command: "head -c 100000 /dev/zero | tr '\\0' x; echo \"tr=$?\" > @DIR@/chatty.status"
"#,
            &["--max-step-output", "10000"],
        )
        .start();
    mesh.wait_workers_live(1);

    let run_id = mesh.start_run("chatty", &[]);
    let run = mesh.wait_run_final(&run_id);
    let marker = "[jobz: output truncated after 10000 bytes]\n";
    // The exit status decides: the step succeeded, and says its output was cut.
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    let step = only_step(&run);
    assert_eq!(step["exit_code"], 0, "{step:#}");
    assert_eq!(
        str_of(&step, "error"),
        "output truncated after 10000 bytes",
        "{step:#}"
    );
    let status = std::fs::read_to_string(mesh.dir().join("chatty.status")).unwrap();
    assert_eq!(
        status.trim(),
        "tr=0",
        "the writer must neither block nor get SIGPIPE"
    );

    let files = output_files(&mesh, "w1", &run_id);
    assert_eq!(files.len(), 1, "{files:?}");
    let kept = std::fs::read(&files[0]).unwrap();
    assert!(
        kept.len() <= 10_000 + 1 + marker.len(),
        "{} bytes",
        kept.len()
    );
    assert!(kept.ends_with(marker.as_bytes()), "no marker at the end");
    assert!(kept[..10_000].iter().all(|&b| b == b'x'));

    let finished: Vec<String> = mesh
        .worker_log("w1", &run_id)
        .into_iter()
        .map(|l| l.event)
        .filter(|e| e.starts_with("finished"))
        .collect();
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert!(
        finished[0].ends_with("; output truncated after 10000 bytes"),
        "{finished:?}"
    );
    // The run's log (from the result's tail) ends with the marker too.
    let (code, log) = mesh.http_get(&format!("/runs/{run_id}/log"));
    assert_eq!(code, 200, "{log}");
    assert!(log.contains(marker.trim_end()), "{log}");
}

#[test]
fn hostile_parameter_values_write_nothing_outside_the_log_and_spool_dirs() {
    let mesh = Mesh::builder()
        .worker(
            "w1",
            r#"
jobs:
  - name: hostile
    command: "echo {date} {where}"
"#,
        )
        .start();
    mesh.wait_workers_live(1);
    let root = mesh.dir().to_owned();
    let parent = root.parent().unwrap().to_owned();
    let escapes = [
        parent.join("jobz-hygiene-escape"),
        PathBuf::from("/tmp/jobz-hygiene-escape-abs"),
        PathBuf::from("/etc/jobz-hygiene-escape"),
    ];
    for path in &escapes {
        assert!(!path.exists(), "{} exists before the test", path.display());
    }
    let before = list_tree(&root);

    // The default pattern lets `.`, `/` through: these values are legal parameters.
    let run_id = mesh.start_run(
        "hostile",
        &[
            ("date", "../../jobz-hygiene-escape"),
            (
                "where",
                "/tmp/jobz-hygiene-escape-abs/../../etc/jobz-hygiene-escape",
            ),
        ],
    );
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    let step = only_step(&run);

    let after = list_tree(&root);
    let allowed = [
        Path::new("w1/log"),
        Path::new("w1/spool"),
        Path::new("broker"),
    ];
    for new in after.difference(&before) {
        assert!(
            allowed.iter().any(|dir| new.starts_with(dir)),
            "{} was written outside the worker's log and spool dirs",
            new.display()
        );
    }
    for path in &escapes {
        assert!(!path.exists(), "{} was created", path.display());
    }
    // The output went where it belongs, under a name made of ids only.
    let files = output_files(&mesh, "w1", &run_id);
    let expected = format!("hostile.{}.1.log", str_of(&step, "task_id"));
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(
        files[0].file_name().unwrap().to_str(),
        Some(expected.as_str())
    );
    let output = std::fs::read_to_string(&files[0]).unwrap();
    assert_eq!(
        output,
        "../../jobz-hygiene-escape /tmp/jobz-hygiene-escape-abs/../../etc/jobz-hygiene-escape\n"
    );
}

#[test]
fn a_root_worker_runs_a_step_as_its_run_as_user_or_the_default() {
    if !running_as_root() {
        eprintln!("skipped: run_as needs the test to run as root");
        return;
    }
    let Some((uid, gid)) = nobody() else {
        eprintln!("skipped: this host has no user `nobody`");
        return;
    };
    let mesh = Mesh::builder()
        .worker_with_args(
            "w1",
            r#"
jobs:
  - name: as_nobody
    command: "id -u > @DIR@/out/as_nobody; id -G >> @DIR@/out/as_nobody; echo \"$HOME $USER $LOGNAME\" >> @DIR@/out/as_nobody; touch ./mine && echo cwd-writable >> @DIR@/out/as_nobody"
    run_as: nobody
  - name: as_default
    command: "id -u > @DIR@/out/as_default"
  - name: as_root
    command: "id -u > @DIR@/out/as_root"
    run_as: root
"#,
            &["--default-run-as", "nobody"],
        )
        .start();
    let out = open_for_other_users(&mesh);
    mesh.wait_workers_live(1);

    for job in ["as_nobody", "as_default", "as_root"] {
        let run_id = mesh.start_run(job, &[]);
        let run = mesh.wait_run_final(&run_id);
        assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    }
    let as_nobody = std::fs::read_to_string(out.join("as_nobody")).unwrap();
    let lines: Vec<&str> = as_nobody.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&uid.to_string().as_str()),
        "{as_nobody}"
    );
    // Only nobody's own groups: none of root's are kept.
    let groups: Vec<u32> = lines[1]
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    assert!(groups.contains(&gid) && !groups.contains(&0), "{as_nobody}");
    assert!(lines[2].ends_with(" nobody nobody"), "{as_nobody}");
    assert_eq!(lines.get(3), Some(&"cwd-writable"), "{as_nobody}");
    let as_default = std::fs::read_to_string(out.join("as_default")).unwrap();
    assert_eq!(
        as_default.trim(),
        uid.to_string(),
        "--default-run-as applies"
    );
    let as_root = std::fs::read_to_string(out.join("as_root")).unwrap();
    assert_eq!(as_root.trim(), "0", "run_as wins over --default-run-as");
}

#[test]
fn a_worker_that_is_not_root_refuses_a_step_for_another_user() {
    if !running_as_root() {
        eprintln!("skipped: starting a worker as another user needs the test to run as root");
        return;
    }
    let Some((uid, gid)) = nobody() else {
        eprintln!("skipped: this host has no user `nobody`");
        return;
    };
    let mut mesh = Mesh::builder()
        .worker(
            "w1",
            r#"
jobs:
  - name: as_root
    command: "touch @DIR@/out/ran"
    run_as: root
"#,
        )
        .start();
    let out = open_for_other_users(&mesh);
    // The same worker again, as nobody, owning its own directories.
    restart_as(&mut mesh, "w1", (uid, gid), &[]);
    mesh.wait_workers_live(1);

    let run_id = mesh.start_run("as_root", &[]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "failed", "{run:#}");
    let step = only_step(&run);
    let error = str_of(&step, "error");
    assert!(
        error.contains("not root") && error.contains("not run"),
        "{step:#}"
    );
    assert!(
        !out.join("ran").exists(),
        "the step ran (as the worker's user)"
    );
    let failed: Vec<String> = mesh
        .worker_log("w1", &run_id)
        .into_iter()
        .map(|l| l.event)
        .filter(|e| e.starts_with("failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
}
