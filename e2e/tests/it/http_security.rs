//! The frontend's HTTP security, through the real binaries: tokens and scopes, protected
//! mode, the open health listener, TLS with client certificates (checked with the real
//! `curl`), request limits and the connection cap.

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use serde_json::Value;

use crate::harness::{
    bin, free_ports, http_request, job_start_path, list_of, str_of, wait_for, HttpResponse, Mesh,
    DEADLINE,
};

const JOBS: &str = r#"
jobs:
  - name: hello
    command: 'echo hello'
  - name: doomed
    delivery: queue
    retries: 1
    retry_backoff: 100ms
    command: 'test -e @DIR@/fixed'
"#;

/// `GET path` on 127.0.0.1:`port` with extra header lines (each ending in CRLF).
fn get(port: u16, path: &str, headers: &str) -> HttpResponse {
    send(port, "GET", path, headers)
}

/// `METHOD path` (no body) on 127.0.0.1:`port` with extra header lines.
fn send(port: u16, method: &str, path: &str, headers: &str) -> HttpResponse {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}Connection: close\r\n\r\n"
    );
    http_request(port, raw.as_bytes(), DEADLINE).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

fn json(r: &HttpResponse) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()))
}

/// `jobz-frontend token new NAME --scopes SCOPES`: the token (stdout) and the file line.
fn new_token(name: &str, scopes: &str) -> (String, String) {
    let out = Command::new(bin("jobz-frontend"))
        .args(["token", "new", name, "--scopes", scopes])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "token new: {out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no token-file line in {stderr:?}"))
        .to_owned();
    assert!(token.starts_with("jobz_"), "{token}");
    (token, line)
}

/// Three tokens (read, trigger, admin) and a token file holding their hashes.
struct Tokens {
    read: String,
    trigger: String,
    admin: String,
    file: PathBuf,
}

fn tokens_in(dir: &Path) -> Tokens {
    let (read, read_line) = new_token("dashboard", "read");
    let (trigger, trigger_line) = new_token("ci", "trigger");
    let (admin, admin_line) = new_token("ops", "admin");
    let file = dir.join("tokens");
    fs::write(
        &file,
        format!("# jobz tokens\n{read_line}\n\n{trigger_line}\n{admin_line}\n"),
    )
    .unwrap();
    Tokens {
        read,
        trigger,
        admin,
        file,
    }
}

/// Waits until the frontend on `port` answers `/healthz` (open without a token) with 200.
fn wait_listening(mesh: &Mesh, name: &str, port: u16) {
    wait_for(DEADLINE, &format!("{name} on port {port}"), || {
        let raw = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        match http_request(port, raw, DEADLINE) {
            Ok(r) if r.status == 200 => Ok(()),
            Ok(r) => Err(format!("{} {}", r.status, r.text())),
            Err(e) => Err(format!("{e}; stderr: {}", mesh.stderr_of(name))),
        }
    });
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

/// Starts frontend `secure` on a free port with the token file and `extra` flags, and
/// waits until it answers; returns its port.
fn start_with_tokens(mesh: &mut Mesh, tokens: &Tokens, extra: &[&str]) -> u16 {
    let port = free_ports(1);
    let listen = format!("127.0.0.1:{port}");
    let file = tokens.file.to_string_lossy().into_owned();
    let mut flags = vec!["--listen", &listen, "--tokens", &file];
    flags.extend_from_slice(extra);
    mesh.start_frontend("secure", &args(&flags));
    wait_listening(mesh, "secure", port);
    port
}

#[test]
fn tokens_gate_every_endpoint_by_scope() {
    let mut mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);
    let tokens = tokens_in(mesh.dir());

    // The file holds only hashes: no token appears in it.
    let text = fs::read_to_string(&tokens.file).unwrap();
    for token in [&tokens.read, &tokens.trigger, &tokens.admin] {
        assert!(!text.contains(token.as_str()), "plaintext token in {text}");
    }
    assert_eq!(text.matches("sha256:").count(), 3, "{text}");

    let health = free_ports(1);
    let health_listen = format!("127.0.0.1:{health}");
    let port = start_with_tokens(&mut mesh, &tokens, &["--health-listen", &health_listen]);
    let stderr = mesh.stderr_of("secure");
    assert!(stderr.contains("authenticated: tokens"), "{stderr}");

    // No token, a wrong one, or a token in the query string: 401 asking for Basic.
    let query = format!("/runs?token={}&access_token={}", tokens.admin, tokens.admin);
    for (path, headers) in [
        ("/runs", String::new()),
        ("/", String::new()),
        ("/metrics", String::new()),
        ("/events", String::new()),
        ("/stats?job=hello", String::new()),
        ("/ui/runs/x", String::new()),
        ("/job_start?job_name=hello", String::new()),
        ("/runs", bearer("jobz_not_a_token")),
        ("/runs", "Authorization: Digest x\r\n".into()),
        (query.as_str(), String::new()),
    ] {
        let r = get(port, path, &headers);
        assert_eq!(r.status, 401, "{path} {headers:?}: {}", r.text());
        assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"jobz\""));
        assert!(!str_of(&json(&r), "error").is_empty(), "{}", r.text());
    }

    // read: every view, nothing that starts anything.
    for path in [
        "/",
        "/runs",
        "/jobs",
        "/workers",
        "/dead",
        "/semaphores",
        "/metrics",
        "/stats?job=hello",
        "/ui/jobs",
    ] {
        let r = get(port, path, &bearer(&tokens.read));
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    // The dashboard's POSTs need the same scopes as their GETs.
    let start = job_start_path("hello", &[]);
    let r = send(port, "POST", &start, &bearer(&tokens.read));
    assert_eq!(r.status, 403, "{}", r.text());
    let r = send(port, "POST", "/dead/t1/retry", &bearer(&tokens.trigger));
    assert_eq!(r.status, 403, "{}", r.text());
    // Tracking is trigger's; having the broker mail or call someone on the run's end is
    // admin's (also spelt with an encoded path).
    for path in ["/runs/nope/track", "/runs/nope/%74rack"] {
        let r = send(port, "POST", path, &bearer(&tokens.trigger));
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        let notify = format!("{path}?notify=webhook:ops");
        let r = send(port, "POST", &notify, &bearer(&tokens.trigger));
        assert_eq!(r.status, 403, "{notify}: {}", r.text());
        let r = send(port, "POST", &notify, &bearer(&tokens.admin));
        assert_eq!(r.status, 404, "{notify}: {}", r.text());
    }
    let r = get(port, &job_start_path("hello", &[]), &bearer(&tokens.read));
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(
        str_of(&json(&r), "error").contains("trigger"),
        "{}",
        r.text()
    );
    assert_eq!(r.header("www-authenticate"), None);

    // A browser: HTTP Basic with the token as the password.
    let basic = base64_encode(format!("anyone:{}", tokens.read).as_bytes());
    let r = get(port, "/", &format!("Authorization: Basic {basic}\r\n"));
    assert_eq!(r.status, 200);

    // trigger: starts runs, may not read them.
    let r = get(
        port,
        &job_start_path("hello", &[]),
        &bearer(&tokens.trigger),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let run_id = str_of(&json(&r), "run_id").to_owned();
    assert_eq!(get(port, "/runs", &bearer(&tokens.trigger)).status, 403);
    let run = wait_for(DEADLINE, "the triggered run to succeed", || {
        let r = get(port, &format!("/runs/{run_id}"), &bearer(&tokens.read));
        let run = json(&r);
        match str_of(&run, "state") {
            "succeeded" => Ok(run),
            other => Err(format!("{} {other}", r.status)),
        }
    });
    assert_eq!(str_of(&run, "job"), "hello");

    // admin: re-runs a dead task; read and trigger may not.
    let entry = dead_task(port, &tokens.admin);
    let retry = str_of(&entry, "retry_url").to_owned();
    assert!(retry.ends_with("/retry"), "{entry}");
    assert_eq!(get(port, &retry, &bearer(&tokens.read)).status, 403);
    assert_eq!(get(port, &retry, &bearer(&tokens.trigger)).status, 403);
    fs::write(mesh.dir().join("fixed"), "").unwrap();
    let r = get(port, &retry, &bearer(&tokens.admin));
    assert_eq!(r.status, 202, "{}", r.text());

    // /healthz stays open on the main listener (liveness probes).
    assert_eq!(get(port, "/healthz", "").status, 200);
    // The health listener: /healthz and /metrics without a token, nothing else.
    assert_eq!(get(health, "/healthz", "").status, 200);
    let r = get(health, "/metrics", "");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("jobz_"), "{}", r.text());
    for path in ["/runs", "/", &job_start_path("hello", &[])] {
        let r = get(health, path, &bearer(&tokens.admin));
        assert_eq!(r.status, 404, "{path} on the health listener: {}", r.text());
    }
}

/// Runs job `doomed` (with the admin token) and waits for its task in the dead list.
fn dead_task(port: u16, admin: &str) -> Value {
    let r = get(port, &job_start_path("doomed", &[]), &bearer(admin));
    assert_eq!(r.status, 202, "{}", r.text());
    let doomed = str_of(&json(&r), "run_id").to_owned();
    wait_for(DEADLINE, "the doomed task in the dead list", || {
        let dead = json(&get(port, "/dead", &bearer(admin)));
        list_of(&dead, "dead")
            .into_iter()
            .find(|d| d["run_id"] == doomed.as_str())
            .ok_or_else(|| dead.to_string())
    })
}

/// Runs the frontend with `flags` and returns its exit status and output; it must exit
/// (refuse to start) within seconds, or it is killed and the test fails.
fn run_to_exit(flags: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(bin("jobz-frontend"))
        .args(flags)
        .env_remove("JOBZ_TOKENS")
        .env_remove("JOBZ_LISTEN")
        .env_remove("JOBZ_HEALTH_LISTEN")
        .env_remove("JOBZ_INSECURE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("jobz-frontend {flags:?} started instead of refusing to");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    (status, out)
}

#[test]
fn protected_mode_refuses_a_reachable_listener_without_authentication() {
    // 0.0.0.0 is refused before anything is bound, so nothing outside can connect.
    let (status, out) = run_to_exit(&["--listen", "0.0.0.0:0", "--broker", "127.0.0.1:1"]);
    assert!(!status.success(), "{out}");
    for flag in [
        "--tokens",
        "--tls-client-ca",
        "--insecure",
        "protected mode",
    ] {
        assert!(out.contains(flag), "{flag} not in {out:?}");
    }

    // The open health listener obeys protected mode too.
    let (status, out) = run_to_exit(&[
        "--listen",
        "127.0.0.1:0",
        "--health-listen",
        "0.0.0.0:0",
        "--broker",
        "127.0.0.1:1",
    ]);
    assert!(!status.success(), "{out}");
    for needle in [
        "--health-listen",
        "protected mode",
        "--tokens",
        "--insecure",
    ] {
        assert!(out.contains(needle), "{needle} not in {out:?}");
    }

    // A malformed token file stops the start with file:line.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    fs::write(&file, "# ok\nci trigger sha256:00\n").unwrap();
    let (status, out) = run_to_exit(&[
        "--listen",
        "127.0.0.1:0",
        "--broker",
        "127.0.0.1:1",
        "--tokens",
        &file.to_string_lossy(),
    ]);
    assert!(!status.success(), "{out}");
    assert!(
        out.contains(&format!("{}:2:", file.display())),
        "no file:line in {out:?}"
    );
}

// ---- TLS --------------------------------------------------------------------------------

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    good_cert: PathBuf,
    good_key: PathBuf,
    foreign_cert: PathBuf,
    foreign_key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    (params.self_signed(&key).unwrap(), key)
}

fn leaf(
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &(rcgen::Certificate, KeyPair),
) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer.0, &issuer.1).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki(dir: &Path) -> Pki {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    };
    let mesh_ca = ca("jobz test CA");
    let other_ca = ca("someone else's CA");
    let (server_cert, server_key) = leaf(
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
        &mesh_ca,
    );
    let (good_cert, good_key) = leaf(&["client"], ExtendedKeyUsagePurpose::ClientAuth, &mesh_ca);
    let (foreign_cert, foreign_key) = leaf(
        &["intruder"],
        ExtendedKeyUsagePurpose::ClientAuth,
        &other_ca,
    );
    Pki {
        ca: write("ca.pem", &mesh_ca.0.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        good_cert: write("client.pem", &good_cert),
        good_key: write("client.key", &good_key),
        foreign_cert: write("foreign.pem", &foreign_cert),
        foreign_key: write("foreign.key", &foreign_key),
    }
}

/// `curl` over HTTPS: exit code, HTTP status (`000` when there was none) and stderr.
fn curl(pki: &Pki, port: u16, path: &str, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
        ])
        .arg("--cacert")
        .arg(&pki.ca)
        .args(extra)
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .stdin(Stdio::null())
        .output()
        .expect("running curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tls_requires_a_client_certificate_from_the_configured_ca() {
    let mut mesh = Mesh::builder().start();
    let pki = pki(mesh.dir());
    let tokens = tokens_in(mesh.dir());
    let port = free_ports(1);
    let path = |p: &PathBuf| p.to_string_lossy().into_owned();
    mesh.start_frontend(
        "tls",
        &args(&[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--tls-cert",
            &path(&pki.server_cert),
            "--tls-key",
            &path(&pki.server_key),
            "--tls-client-ca",
            &path(&pki.ca),
            "--tokens",
            &path(&tokens.file),
        ]),
    );
    let good = [
        "--cert",
        &path(&pki.good_cert),
        "--key",
        &path(&pki.good_key),
    ]
    .map(str::to_owned);
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    wait_for(DEADLINE, "the TLS frontend to answer", || {
        match curl(&pki, port, "/healthz", &good) {
            (0, status, _) if status == "200" => Ok(()),
            (code, status, err) => Err(format!(
                "curl {code} {status} {err}; {}",
                mesh.stderr_of("tls")
            )),
        }
    });
    let stderr = mesh.stderr_of("tls");
    assert!(
        stderr.contains("client certificates and tokens"),
        "{stderr}"
    );

    // A good certificate gets HTTP; tokens still apply on top.
    let (code, status, err) = curl(&pki, port, "/runs", &good);
    assert_eq!((code, status.as_str()), (0, "401"), "{err}");
    let auth = format!("Authorization: Bearer {}", tokens.read);
    let mut with_token = good.clone();
    with_token.extend(["-H", auth.as_str()]);
    let (code, status, err) = curl(&pki, port, "/runs", &with_token);
    assert_eq!((code, status.as_str()), (0, "200"), "{err}");

    // A certificate from another CA, or none: refused in the handshake, no HTTP at all.
    let foreign = [
        "--cert".to_owned(),
        path(&pki.foreign_cert),
        "--key".to_owned(),
        path(&pki.foreign_key),
        "-H".to_owned(),
        auth.clone(),
    ];
    let foreign: Vec<&str> = foreign.iter().map(String::as_str).collect();
    for (what, extra) in [
        ("a foreign-CA certificate", foreign),
        ("no certificate", vec!["-H", auth.as_str()]),
    ] {
        let (code, status, err) = curl(&pki, port, "/runs", &extra);
        assert!(
            [35, 56, 58].contains(&code),
            "{what}: curl exit {code}, status {status}, {err}"
        );
        assert_eq!(status, "000", "{what}: an HTTP status came back: {err}");
    }

    // Plain HTTP on the TLS port gets no HTTP answer.
    let raw = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    if let Ok(r) = http_request(port, raw, Duration::from_secs(10)) {
        panic!("plain HTTP on the TLS port answered {}", r.status);
    }
    assert!(mesh.is_running("tls"));
}

// ---- Limits -----------------------------------------------------------------------------

#[test]
fn oversized_heads_get_414_and_431_and_the_connection_cap_holds() {
    let mut mesh = Mesh::builder().start();
    // The head limits are checked on the mesh's own frontend: a refused connection lingers
    // a moment after its answer, so on a frontend capped at two places a third request in
    // quick succession could find no place.
    let port = mesh.frontend_port;

    // The request line may hold the API's longest target (64 KiB), not a byte more.
    let long = format!("/runs/{}", "a".repeat(65 * 1024));
    let r = get(port, &long, "");
    assert_eq!(r.status, 414, "{}", r.text());
    assert!(
        str_of(&json(&r), "error").contains("exceeds"),
        "{}",
        r.text()
    );
    let fits = format!("/runs/{}", "a".repeat(60 * 1024));
    assert_eq!(get(port, &fits, "").status, 404, "a 60 KiB target is fine");
    let endless = format!("GET /{}", "a".repeat(1024 * 1024));
    let r = http_request(port, endless.as_bytes(), DEADLINE).unwrap();
    assert_eq!(r.status, 414, "a 1 MiB line without an end");

    let junk = format!("X-Junk: {}\r\n", "j".repeat(17 * 1024));
    let r = get(port, "/healthz", &junk);
    assert_eq!(r.status, 431, "{}", r.text());
    let many: String = (0..1000)
        .map(|i| format!("X-H{i}: 0123456789\r\n"))
        .collect();
    assert_eq!(get(port, "/healthz", &many).status, 431);

    let port = free_ports(1);
    mesh.start_frontend(
        "capped",
        &args(&[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--max-connections",
            "2",
        ]),
    );
    wait_listening(&mesh, "capped", port);
    // Two idle keep-alive connections fill the cap; a third is closed without an answer.
    let first = wait_for(DEADLINE, "a first kept-alive connection", || {
        keep_alive(port)
    });
    let second = wait_for(DEADLINE, "a second kept-alive connection", || {
        keep_alive(port)
    });
    let mut third = TcpStream::connect(("127.0.0.1", port)).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    match third.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the third connection was not closed: {other:?}"),
    }
    // Freeing a place lets the next client in.
    drop(first);
    wait_listening(&mesh, "capped", port);
    drop(second);
    assert!(mesh.is_running("capped"));
}

/// A connection that got an answer to `GET /healthz` and stays open (HTTP/1.1 keep-alive),
/// so it holds one of the frontend's connection places.
fn keep_alive(port: u16) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    held(stream)
}

/// `stream` once it got a 200 to `GET /healthz` (keep-alive), or what happened instead.
fn held(mut stream: TcpStream) -> Result<TcpStream, String> {
    match exchange(&mut stream, "/healthz", "") {
        Ok((200, _)) => Ok(stream),
        Ok((status, body)) => Err(format!("{status} {body}")),
        Err(e) => Err(e),
    }
}

/// One keep-alive request on `stream` and its answer (status and body), which must carry a
/// Content-Length; the connection stays open.
fn exchange(stream: &mut TcpStream, path: &str, headers: &str) -> Result<(u16, String), String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            // Seen once in a full run (another test's SIGSTOP/SIGCONT of a child): retry.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        if n == 0 {
            return Err(format!("closed after {:?}", String::from_utf8_lossy(&seen)));
        }
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
            if body.len() >= length {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("no status in {head:?}"))?;
                return Ok((status, body.to_owned()));
            }
        }
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---- One parse decides the route and its scope -------------------------------------------

/// `GET target` with a read token, as raw bytes: the target goes on the wire exactly as
/// written (absolute-form, encoded letters, dot segments).
fn read_get(port: u16, target: &str, token: &str) -> HttpResponse {
    get(port, target, &bearer(token))
}

#[test]
fn a_read_token_cannot_trigger_or_retry_through_a_disguised_target() {
    let mut mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);
    let tokens = tokens_in(mesh.dir());
    let port = start_with_tokens(&mut mesh, &tokens, &[]);

    // A dead task to aim the retries at.
    let entry = dead_task(port, &tokens.admin);
    let task = str_of(&entry, "task_id").to_owned();

    // Each names /job_start to a router that percent-decodes and takes absolute-form
    // targets: the scope must be judged on the same reading (403), or the target refused.
    let q = "?job_name=hello";
    let triggers: Vec<(String, u16)> = vec![
        (format!("/job%5Fstart{q}"), 403),
        (format!("/%6Aob_start{q}"), 403),
        (format!("/job_star%74{q}"), 403),
        (format!("/%6a%6f%62%5f%73%74%61%72%74{q}"), 403),
        (format!("http://x/job_start{q}"), 403),
        (format!("HTTP://x/job_start{q}"), 403),
        (format!("https://x:1/job%5Fstart{q}"), 403),
        (format!("http://x/job_start/{q}"), 403),
        (format!("/job_start/{q}"), 403),
        (format!("//job_start{q}"), 400),
        (format!("/./job_start{q}"), 400),
        (format!("/runs/../job_start{q}"), 400),
        (format!("/healthz/%2e%2e/job_start{q}"), 400),
        (format!("/x%2F..%2Fjob_start{q}"), 400),
        ("/job_start%3Fjob_name=hello".to_owned(), 404),
        (format!("/job_start#/healthz{q}"), 400),
        (format!("http://x{q}/job_start"), 200),
    ];
    // The same for /dead/{task}/retry, which needs admin.
    let retries: Vec<(String, u16)> = vec![
        (format!("/dead/{task}/%72etry"), 403),
        (format!("/dead/{task}/retr%79"), 403),
        (format!("/%64ead/{task}/retry"), 403),
        (format!("/dead/{task}/retry/"), 403),
        (format!("http://x/dead/{task}/retry"), 403),
        (format!("http://x/dead/{task}/%52etry"), 404),
        (format!("/dead/{task}/./retry"), 400),
        (format!("/dead/{task}/x/../retry"), 400),
        (format!("/dead/{task}%2Fretry"), 400),
        (format!("/dead//{task}/retry"), 400),
    ];
    let mut wrong = Vec::new();
    for (target, expected) in triggers.iter().chain(&retries) {
        let r = read_get(port, target, &tokens.read);
        if r.status != *expected {
            wrong.push(format!("{target}: {} {}", r.status, r.text()));
        }
    }
    // Nothing ran and nothing was retried, whatever the answers said.
    let runs = json(&get(port, "/runs?job=hello", &bearer(&tokens.admin)));
    let hello_runs = list_of(&runs, "runs");
    let runs = json(&get(port, "/runs?job=doomed", &bearer(&tokens.admin)));
    let doomed_runs = list_of(&runs, "runs");
    let dead = json(&get(port, "/dead", &bearer(&tokens.admin)));
    let still_dead = list_of(&dead, "dead")
        .into_iter()
        .find(|d| d["task_id"] == task.as_str());
    assert!(
        wrong.is_empty() && hello_runs.is_empty() && doomed_runs.len() == 1,
        "disguised targets got through a read token: {wrong:#?}\nruns of hello: \
         {hello_runs:?}\nruns of doomed: {doomed_runs:?}"
    );
    let still_dead = still_dead.expect("the dead task is still listed");
    assert!(still_dead["retried_as"].is_null(), "{still_dead}");

    // The real thing still works for the tokens that hold the scope.
    let r = get(port, &format!("/job%5Fstart{q}"), &bearer(&tokens.trigger));
    assert_eq!(r.status, 202, "{}", r.text());
    let r = get(
        port,
        &format!("/dead/{task}/%72etry"),
        &bearer(&tokens.admin),
    );
    assert_eq!(r.status, 202, "{}", r.text());
}

// ---- Connection exhaustion -----------------------------------------------------------------

/// Starts frontend `name` on a free port with `flags`, and with `env` (settings given the
/// way a unit file would, `JOBZ_…=value`); waits until it answers; returns its port.
fn start_with_env(mesh: &mut Mesh, name: &str, env: &[&str], flags: &[&str]) -> u16 {
    let port = free_ports(1);
    let listen = format!("127.0.0.1:{port}");
    let broker = format!("127.0.0.1:{}", mesh.base_port);
    let frontend = bin("jobz-frontend");
    let mut all: Vec<OsString> = env.iter().map(OsString::from).collect();
    all.push(frontend.into_os_string());
    all.extend(args(&["--broker", &broker, "--listen", &listen]));
    all.extend(args(flags));
    mesh.start_process(name, PathBuf::from("/usr/bin/env"), all);
    wait_listening(mesh, name, port);
    port
}

/// Waits (up to 10 s, the read timeout) for the frontend to close `stream`; how long it
/// took, or what came instead.
fn closed_within(stream: &mut TcpStream) -> Result<Duration, String> {
    let started = std::time::Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => Ok(started.elapsed()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(started.elapsed()),
        Ok(n) => Err(format!("got {:?}", String::from_utf8_lossy(&buf[..n]))),
        Err(e) => Err(format!("still open after {:?}: {e}", started.elapsed())),
    }
}

const SLOW_JOBS: &str = r#"
jobs:
  - name: slow
    command: 'sleep 2; echo done'
"#;

#[test]
fn idle_connections_are_closed_but_waiting_ones_are_not() {
    let mut mesh = Mesh::builder().worker("w1", SLOW_JOBS).start();
    mesh.wait_workers_live(1);
    let port = start_with_env(
        &mut mesh,
        "idle",
        &["JOBZ_IDLE_TIMEOUT=1s", "JOBZ_HEADER_TIMEOUT=1s"],
        &[],
    );

    // One request answered, then silence: closed after the idle timeout.
    let mut idle = keep_alive(port).unwrap();
    let took = closed_within(&mut idle).expect("an idle keep-alive connection is closed");
    assert!(took >= Duration::from_millis(700), "closed after {took:?}");
    // A connection that never sends a request is closed too.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    closed_within(&mut silent).expect("a connection without a request is closed");
    // A head that never ends (slowloris) is cut after the header timeout, although bytes
    // keep coming for a while.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    slow.write_all(b"st: x\r\n").unwrap();
    closed_within(&mut slow).expect("a request head that never ends is cut");

    // Waiting for an answer is not idle: wait= and a followed log outlast the timeout.
    let mut waiting = keep_alive(port).unwrap();
    let (status, body) = exchange(&mut waiting, "/job_start?job_name=slow&wait=30", "")
        .expect("job_start?wait= answered on a kept-alive connection");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"succeeded\""), "{body}");
    let r = get(port, &job_start_path("slow", &[]), "");
    assert_eq!(r.status, 202, "{}", r.text());
    let run_id = str_of(&json(&r), "run_id").to_owned();
    let r = get(port, &format!("/runs/{run_id}/log?follow=1"), "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("done"),
        "the stream was cut: {:?}",
        r.text()
    );
    // The same kept-alive connection is idle again and closed.
    closed_within(&mut waiting).expect("idle again after its answer");
    let metrics = get(port, "/metrics", "").text();
    assert!(
        metrics.contains("jobz_frontend_connections_closed_total{reason=\"idle\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("jobz_frontend_connections_closed_total{reason=\"header_timeout\"}"),
        "{metrics}"
    );
}

/// A TCP connection to 127.0.0.1:`port` from the loopback address 127.0.0.`source`.
fn connect_from(source: u8, port: u16) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, source], 0)).into())?;
    socket.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    Ok(socket.into())
}

/// Opens up to `tries` kept-alive connections from 127.0.0.`source`; those it holds.
fn hold_from(source: u8, port: u16, tries: usize) -> Vec<TcpStream> {
    (0..tries)
        .filter_map(|_| held(connect_from(source, port).ok()?).ok())
        .collect()
}

/// `GET path` (Connection: close) from 127.0.0.`source` with extra header lines; returns
/// once the frontend has closed the connection too, so its place is (all but) free.
fn get_from(source: u8, port: u16, path: &str, headers: &str) -> Result<(u16, String), String> {
    let mut stream = connect_from(source, port).map_err(|e| e.to_string())?;
    let answer = exchange(
        &mut stream,
        path,
        &format!("{headers}Connection: close\r\n"),
    )?;
    closed_within(&mut stream)?;
    Ok(answer)
}

/// [`get_from`] until it gets `status` (a place freed a moment ago may not be free yet).
fn eventually_from(source: u8, port: u16, path: &str, headers: &str, status: u16) -> String {
    wait_for(
        DEADLINE,
        &format!("{status} for {path} from 127.0.0.{source}"),
        || match get_from(source, port, path, headers) {
            Ok((got, body)) if got == status => Ok(body),
            other => Err(format!("{other:?}")),
        },
    )
}

#[test]
fn one_address_holding_every_place_does_not_lock_out_other_clients() {
    let mut mesh = Mesh::builder().start();
    let tokens = tokens_in(mesh.dir());
    let file = tokens.file.to_string_lossy().into_owned();
    // 8 places: 3 per address, 2 of them only for clients with a token.
    let port = start_with_env(
        &mut mesh,
        "capped",
        &[
            "JOBZ_MAX_CONNECTIONS_PER_ADDRESS=3",
            "JOBZ_RESERVED_CONNECTIONS=2",
            "JOBZ_IDLE_TIMEOUT=60s",
        ],
        &["--tokens", &file, "--max-connections", "8"],
    );
    let read = bearer(&tokens.read);

    // One address opens as many idle connections as it can and keeps them.
    let first = hold_from(2, port, 10);
    // Everybody else is still served: a client with a token, and one without.
    let with_token = get_from(1, port, "/runs", &read);
    let without = get_from(3, port, "/healthz", "");
    assert_eq!(
        (
            with_token.as_ref().map(|r| r.0),
            without.as_ref().map(|r| r.0)
        ),
        (Ok(200), Ok(200)),
        "locked out while 127.0.0.2 holds {} connections: {with_token:?} {without:?}",
        first.len()
    );
    assert_eq!(first.len(), 3, "one address holds its share, no more");

    // Two more addresses take the rest of the places open to anyone.
    let second = hold_from(3, port, 10);
    assert_eq!(second.len(), 3);
    // The reserve: a client without a token gets 503 there; one with a token is served.
    let body = eventually_from(4, port, "/healthz", "", 503);
    assert!(body.contains("valid token"), "{body}");
    eventually_from(5, port, "/runs", &read, 200);
    eventually_from(6, port, "/runs", &read, 200);
    // A guest that shows a token becomes authenticated and frees its guest place.
    let mut guest = second.into_iter().next().unwrap();
    assert_eq!(exchange(&mut guest, "/runs", &read).unwrap().0, 200);
    eventually_from(7, port, "/healthz", "", 200);

    let metrics = eventually_from(1, port, "/metrics", &read, 200);
    for reason in ["per_address", "reserved"] {
        let line = format!("jobz_frontend_connections_closed_total{{reason=\"{reason}\"}}");
        assert!(metrics.contains(&line), "{line} not in {metrics}");
    }
    drop((first, guest));
    assert!(mesh.is_running("capped"));
}

/// `jobz-frontend token list --tokens FILE`.
fn token_list(file: &Path) -> std::process::Output {
    Command::new(bin("jobz-frontend"))
        .args(["token", "list", "--tokens"])
        .arg(file)
        .output()
        .unwrap()
}

/// A token removed from the file is refused within a couple of seconds, one added is
/// accepted, and a file broken by a bad edit leaves the tokens in force: revocation needs
/// no restart. `token list` shows names and scopes, never tokens.
#[test]
fn the_token_file_is_reread_when_it_changes_and_a_bad_edit_keeps_the_tokens() {
    let mut mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);
    let tokens = tokens_in(mesh.dir());
    let port = start_with_tokens(&mut mesh, &tokens, &[]);
    assert_eq!(get(port, "/runs", &bearer(&tokens.read)).status, 200);

    let listed = token_list(&tokens.file);
    assert!(listed.status.success());
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert_eq!(listed, "ci trigger\ndashboard read\nops admin\n");
    for token in [&tokens.read, &tokens.trigger, &tokens.admin] {
        assert!(!listed.contains(token.as_str()));
    }

    // Revoke `dashboard`, add `grafana`.
    let text = fs::read_to_string(&tokens.file).unwrap();
    let (grafana, grafana_line) = new_token("grafana", "read");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("dashboard "))
        .collect();
    fs::write(
        &tokens.file,
        format!("{}\n{grafana_line}\n", kept.join("\n")),
    )
    .unwrap();
    wait_for(DEADLINE, "the revoked token to be refused", || {
        match get(port, "/runs", &bearer(&tokens.read)).status {
            401 => Ok(()),
            other => Err(format!("still {other}")),
        }
    });
    assert_eq!(get(port, "/runs", &bearer(&grafana)).status, 200);
    assert_eq!(get(port, "/runs", &bearer(&tokens.admin)).status, 200);

    // A broken edit: the tokens in force stay, and the log says why.
    fs::write(&tokens.file, "grafana read not-a-hash\n").unwrap();
    wait_for(DEADLINE, "the broken token file to be logged", || {
        // The file is looked at when a request needs the tokens.
        assert_eq!(get(port, "/runs", &bearer(&grafana)).status, 200);
        let stderr = mesh.stderr_of("secure");
        if stderr.contains("keeping the tokens in force") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert_eq!(get(port, "/runs", &bearer(&grafana)).status, 200);
    assert_eq!(get(port, "/runs", &bearer(&tokens.read)).status, 401);

    let broken = token_list(&tokens.file);
    assert_eq!(broken.status.code(), Some(1));
    let why = String::from_utf8_lossy(&broken.stderr).into_owned();
    assert!(why.contains(":1: "), "names the line: {why}");
}
