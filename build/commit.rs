// Shared by the build scripts of `jobz` and `jobz-cli` (`include!`d): sets `JOBZ_COMMIT`
// to the commit the binaries are built from (`git rev-parse --short=10 HEAD`), or
// `unknown` outside a git checkout, so that `--version` says which tree a binary is.

fn set_commit_env() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let commit = git(&["rev-parse", "--short=10", "HEAD"])
        .filter(|c| c.bytes().all(|b| b.is_ascii_hexdigit()))
        .map_or_else(|| "unknown".to_owned(), |c| format!("g{c}"));
    println!("cargo:rustc-env=JOBZ_COMMIT={commit}");
    // A new commit or checkout rebuilds; nothing else does.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        for file in ["HEAD", "packed-refs", "refs/heads"] {
            println!("cargo:rerun-if-changed={dir}/{file}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
