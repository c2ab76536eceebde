//! A mesh on IPv6 loopback (issue 10, item 12): the broker binds `[::1]`, every node
//! connects there, and protected mode counts `::1` as loopback but not `::`.

use crate::harness::*;

/// True if this machine has the IPv6 loopback address.
fn has_ipv6_loopback() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|t| {
        t.lines()
            .any(|l| l.starts_with("00000000000000000000000000000001"))
    })
}

/// Before the fix the broker could not bind `[::1]` ("No such device": ZMQ_IPV6 was never
/// set), nor could a node connect there.
#[test]
fn a_plain_mesh_runs_a_job_on_ipv6_loopback() {
    if !has_ipv6_loopback() {
        eprintln!("SKIPPED: this machine has no IPv6 loopback (::1 is not in /proc/net/if_inet6)");
        return;
    }
    // Plain frames, no --insecure: `::1` is loopback, so protected mode allows it.
    let mesh = Mesh::builder()
        .broker_host("[::1]")
        .worker("w1", ECHO_JOB)
        .start();
    mesh.wait_workers_live(1);
    let run_id = mesh.start_run("echo", &[("msg", "over-ipv6")]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    let ledger = std::fs::read_to_string(mesh.dir().join("ledger")).unwrap_or_default();
    assert_eq!(ledger, "over-ipv6\n");
    assert!(
        mesh.stderr_of("broker").contains("tcp://[::1]:"),
        "{}",
        mesh.stderr_of("broker")
    );
}

#[test]
fn a_plain_broker_refuses_the_ipv6_any_address_without_keys() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_ports(2);
    for bind in [format!("[::]:{port}"), format!("[::ffff:10.0.0.1]:{port}")] {
        let out = std::process::Command::new(bin("jobz-broker"))
            .args(["--bind", &bind, "--state"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bind} was bound without keys");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--keys") && stderr.contains("--insecure"),
            "{bind}: {stderr}"
        );
    }
}
