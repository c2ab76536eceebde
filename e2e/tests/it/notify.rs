//! Notices (issue 14, acceptance 2): a job's `notify:` entries, delivered by the broker.
//! A webhook receiver here refuses the first two attempts and gets exactly one accepted,
//! signed POST per run end it subscribed to, also across a broker killed between two
//! attempts; an SMTP sink here gets the failure mail, and no mail for a success.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::harness::{str_of, Mesh, DEADLINE};

const SECRET: &str = "correct horse battery staple";

/// One POST the webhook receiver got, and what it answered.
#[derive(Debug, Clone)]
struct Post {
    delivery: String,
    event: String,
    signed_right: bool,
    body: Value,
    accepted: bool,
}

/// A webhook receiver on 127.0.0.1: refuses (503) the first `refuse` POSTs, accepts the
/// rest; reports each POST on the channel. Its thread ends with the test process.
fn webhook_receiver(refuse: usize) -> (u16, Receiver<Post>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut seen = 0;
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            seen += 1;
            if serve_post(stream, seen > refuse, &tx).is_err() {
                continue;
            }
        }
    });
    (port, rx)
}

fn serve_post(stream: TcpStream, accept: bool, tx: &Sender<Post>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(DEADLINE))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut headers = HashMap::new();
    let mut line = String::new();
    reader.read_line(&mut line)?;
    assert!(line.starts_with("POST /hook "), "{line}");
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let length: usize = headers["content-length"].parse().unwrap();
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let post = Post {
        delivery: headers.get("x-jobz-delivery").cloned().unwrap_or_default(),
        event: headers.get("x-jobz-event").cloned().unwrap_or_default(),
        signed_right: headers.get("x-jobz-signature") == Some(&format!("sha256={expected}")),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        accepted: accept,
    };
    let answer = if accept {
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    } else {
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    };
    let mut stream = stream;
    stream.write_all(answer.as_bytes())?;
    let _ = tx.send(post);
    Ok(())
}

/// A mail the SMTP sink took: its recipients and its text.
#[derive(Debug, Clone)]
struct Mail {
    to: Vec<String>,
    data: String,
}

/// The smallest SMTP server a client can deliver to (no TLS, no auth): enough to see
/// what the broker sends.
fn smtp_sink() -> (u16, Receiver<Mail>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = serve_smtp(stream, &tx);
        }
    });
    (port, rx)
}

fn serve_smtp(stream: TcpStream, tx: &Sender<Mail>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(DEADLINE))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    out.write_all(b"220 sink ESMTP\r\n")?;
    let mut to = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_ascii_uppercase();
        if command.starts_with("EHLO") || command.starts_with("HELO") {
            out.write_all(b"250 sink\r\n")?;
        } else if command.starts_with("RCPT TO:") {
            to.push(
                line.trim_end()[8..]
                    .trim()
                    .trim_matches(['<', '>'])
                    .to_owned(),
            );
            out.write_all(b"250 OK\r\n")?;
        } else if command == "DATA" {
            out.write_all(b"354 go on\r\n")?;
            let mut data = String::new();
            loop {
                line.clear();
                reader.read_line(&mut line)?;
                if line == ".\r\n" {
                    break;
                }
                data.push_str(&line);
            }
            out.write_all(b"250 queued\r\n")?;
            let _ = tx.send(Mail {
                to: std::mem::take(&mut to),
                data,
            });
        } else if command == "QUIT" {
            out.write_all(b"221 bye\r\n")?;
            return Ok(());
        } else {
            out.write_all(b"250 OK\r\n")?;
        }
    }
}

/// A notify file in `dir` whose webhooks share one secret file (holding `SECRET`): `yaml`
/// is given that file's path. Returns the notify file's path, for `--notify`.
fn write_notify_file(dir: &std::path::Path, yaml: impl FnOnce(&str) -> String) -> String {
    let secret = dir.join("hook.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let notify = dir.join("notify.yaml");
    std::fs::write(&notify, yaml(&secret.display().to_string())).unwrap();
    notify.to_string_lossy().into_owned()
}

/// A mail's Message-ID header.
fn message_id(data: &str) -> Option<String> {
    data.lines()
        .find_map(|l| l.strip_prefix("Message-ID: "))
        .map(|v| v.trim().to_owned())
}

fn next<T>(rx: &Receiver<T>, what: &str) -> T {
    rx.recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("no {what} within {DEADLINE:?}"))
}

#[test]
fn a_webhook_gets_one_signed_accepted_post_per_end_and_the_failure_mail_arrives() {
    let (hook_port, posts) = webhook_receiver(2);
    let (smtp_port, mails) = smtp_sink();
    let config = tempfile::tempdir().unwrap();
    let notify_arg = write_notify_file(config.path(), |secret| {
        format!(
            "webhooks:\n  hook:\n    url: http://127.0.0.1:{hook_port}/hook\n    secret_file: {secret}\n\
             smtp:\n  host: 127.0.0.1\n  port: {smtp_port}\n  tls: none\n  from: \"jobz <jobz@example.com>\"\n\
             run_url: \"https://jobs.example.com/runs/{{run_id}}\"\n"
        )
    });
    let mut mesh = Mesh::builder()
        .broker_args(&["--notify", &notify_arg])
        .worker(
            "w1",
            r#"
jobs:
  - name: doomed
    command: "echo no; exit 3"
    notify:
      - webhook: hook
        on: always
      - email: oncall@example.com
  - name: fine
    command: "true"
    notify:
      - webhook: hook
        on: always
      - email: oncall@example.com
  - name: plain
    command: "read line < @DIR@/plain.fifo"
"#,
        )
        .start();
    mesh.wait_workers_live(1);

    // A failed run: refused twice, with the broker killed after the first refusal, then
    // accepted once.
    let doomed = mesh.start_run("doomed", &[]);
    let first = next(&posts, "first webhook attempt");
    assert!(!first.accepted);
    mesh.kill9("broker");
    mesh.restart("broker");
    let mut tries = vec![first];
    while !tries.last().unwrap().accepted {
        tries.push(next(&posts, "webhook attempt"));
    }
    assert!(
        tries.len() >= 3,
        "two refusals, then the delivery: {tries:?}"
    );
    for post in &tries {
        assert_eq!(post.delivery, format!("{doomed}/0"));
        assert_eq!(post.event, "run.failed");
        assert!(post.signed_right, "signature of {post:?}");
    }
    let body = &tries.last().unwrap().body;
    assert_eq!(body["run"]["run_id"], doomed.as_str());
    assert_eq!(body["run"]["state"], "failed");
    assert_eq!(
        body["url"],
        format!("https://jobs.example.com/runs/{doomed}")
    );
    let first_mail = next(&mails, "the failure mail");
    assert_eq!(first_mail.to, ["oncall@example.com"]);
    assert!(
        first_mail.data.contains("Subject: [jobz] doomed failed"),
        "{}",
        first_mail.data
    );
    assert!(first_mail.data.contains(&doomed), "{}", first_mail.data);
    assert_eq!(
        message_id(&first_mail.data).as_deref(),
        Some(format!("<{doomed}.1@jobz>").as_str()),
        "{}",
        first_mail.data
    );

    // A succeeded run: one accepted POST, and no mail (the address asked for failures).
    let fine = mesh.start_run("fine", &[]);
    let post = next(&posts, "the success webhook");
    assert!(post.accepted && post.signed_right);
    assert_eq!(
        (post.delivery.as_str(), post.event.as_str()),
        (format!("{fine}/0").as_str(), "run.succeeded")
    );
    let run = mesh.wait_run_final(&fine);
    assert_eq!(str_of(&run, "state"), "succeeded");

    // A job with no notify: of its own, tracked with notify= while it runs: told of its end.
    let fifo = mesh.dir().join("plain.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let plain = mesh.start_run("plain", &[]);
    let (status, body) = mesh.http_post(
        &format!("/runs/{plain}/track?notify=webhook:hook,tracker@example.com"),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["notify"][0], "webhook:hook");
    std::fs::write(&fifo, "go\n").unwrap();
    let post = next(&posts, "the tracked run's webhook");
    assert!(post.accepted && post.signed_right);
    assert_eq!(
        (post.delivery.as_str(), post.event.as_str()),
        (format!("{plain}/0").as_str(), "run.succeeded")
    );
    // Delivery is at least once: the failure mail, sent while the broker was killed and
    // not yet journaled as sent, may come again (with the same Message-ID).
    let first_mail_id = message_id(&first_mail.data);
    let mail = loop {
        let mail = next(&mails, "the tracked run's mail");
        if mail.to == ["oncall@example.com"] && message_id(&mail.data) == first_mail_id {
            continue;
        }
        break mail;
    };
    assert_eq!(mail.to, ["tracker@example.com"], "{}", mail.data);
    // Nobody can be added once it has ended.
    let (status, body) = mesh.http_post(&format!("/runs/{plain}/track?notify=webhook:hook"), &[]);
    assert_eq!(status, 409, "{body}");
    // Nothing more comes: no second delivery of either end, no mail for the success.
    let quiet = Instant::now() + Duration::from_secs(3);
    while Instant::now() < quiet {
        if let Ok(extra) = posts.recv_timeout(Duration::from_millis(200)) {
            panic!("a second POST: {extra:?}");
        }
        if let Ok(extra) = mails.try_recv() {
            panic!("a mail for a success: {extra:?}");
        }
    }
}

/// `jobz-broker --check --notify FILE`, what the Ansible role validates a notify file with
/// before it replaces the broker's: 0 for a good file, 2 and the reason for a broken one
/// (a missing secret file, a webhook that is not http(s)), binding nothing.
#[test]
fn broker_check_accepts_a_good_notify_file_and_names_what_is_wrong_in_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let check = |yaml: String| {
        let file = dir.path().join("notify.yaml");
        std::fs::write(&file, yaml).unwrap();
        let out = std::process::Command::new(crate::harness::bin("jobz-broker"))
            .arg("--check")
            .arg("--notify")
            .arg(&file)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let hook = |url: &str, secret_file: &std::path::Path| {
        format!(
            "webhooks:\n  ops:\n    url: {url}\n    secret_file: {}\n",
            secret_file.display()
        )
    };

    let (code, out, _) = check(hook("https://hooks.example.com/jobz", &secret));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ok (1 webhook(s), no SMTP)"), "{out}");

    let (code, _, err) = check(hook(
        "https://hooks.example.com/jobz",
        &dir.path().join("missing.secret"),
    ));
    assert_eq!(code, Some(2));
    assert!(err.contains("secret of webhook ops"), "{err}");
    assert!(err.contains("missing.secret"), "{err}");

    let (code, _, err) = check(hook("ftp://hooks.example.com/jobz", &secret));
    assert_eq!(code, Some(2));
    assert!(err.contains("must be http:// or https://"), "{err}");

    let (code, _, err) = check("webhooks: [not, a, map]\n".to_string());
    assert_eq!(code, Some(2));
    assert!(err.contains("parsing YAML"), "{err}");
}

/// A receiver that accepts each connection and answers nothing, holding it until the
/// client gives up (reported as "closed") or the test lets go (`release`). Reports
/// "connected" for each connection.
fn hanging_receiver() -> (
    u16,
    Receiver<&'static str>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = channel();
    let release = std::sync::Arc::new(AtomicBool::new(false));
    let released = release.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (tx, released) = (tx.clone(), released.clone());
            std::thread::spawn(move || {
                let _ = tx.send("connected");
                // Short reads only so that a release is seen; the client's close ends it.
                let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
                let mut buf = [0u8; 4096];
                while !released.load(Ordering::SeqCst) {
                    match stream.read(&mut buf) {
                        Ok(0) => {
                            let _ = tx.send("closed");
                            return;
                        }
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => return,
                    }
                }
            });
        }
    });
    (port, rx, release)
}

/// A webhook that hangs holds up only its own notices: the broker tells another webhook
/// of the same run's end while its attempt at the hanging one is still open (one at a
/// time per destination, several destinations at once).
#[test]
fn a_webhook_that_hangs_holds_up_only_its_own_notices() {
    let (slow_port, slow, release) = hanging_receiver();
    let (fast_port, posts) = webhook_receiver(0);
    let config = tempfile::tempdir().unwrap();
    let notify_arg = write_notify_file(config.path(), |s| {
        format!(
            "webhooks:\n  slow:\n    url: http://127.0.0.1:{slow_port}/hook\n    secret_file: {s}\n\
             \x20 fast:\n    url: http://127.0.0.1:{fast_port}/hook\n    secret_file: {s}\n"
        )
    });
    let mesh = Mesh::builder()
        .broker_args(&["--notify", &notify_arg])
        .worker(
            "w1",
            r#"
jobs:
  - name: told_twice
    command: "true"
    notify:
      - webhook: slow
        on: always
      - webhook: fast
        on: always
"#,
        )
        .start();
    mesh.wait_workers_live(1);

    let run = mesh.start_run("told_twice", &[]);
    assert_eq!(next(&slow, "the slow webhook's connection"), "connected");
    let post = next(&posts, "the fast webhook's POST");
    assert!(post.accepted && post.signed_right, "{post:?}");
    assert_eq!(post.body["run"]["run_id"], run.as_str());
    assert_eq!(post.event, "run.succeeded");
    assert!(
        slow.try_recv().is_err(),
        "the fast webhook was told only once the slow one's attempt had ended"
    );
    // Let go of the slow connection: the broker's attempt there fails and is retried
    // later; the mesh stops without waiting for its timeout.
    release.store(true, std::sync::atomic::Ordering::SeqCst);
}
