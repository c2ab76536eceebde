#!/usr/bin/env bash
# The one test command: formatting, lints, build, every test (unit and end-to-end).
# Exits non-zero on the first failure. CI runs it through .ci/run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

# Installs what the tests need beyond the Rust toolchain, so that a fresh machine passes as
# this one does. The partition tests make network namespaces: they need root and iproute2.
# The dashboard's browser tests drive Debian's Chromium with playwright-core (npm, below).
need_apt=()
command -v ip >/dev/null || need_apt+=(iproute2)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v npm >/dev/null || need_apt+=(nodejs npm)
if ((${#need_apt[@]})); then
    step "apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${need_apt[@]}"
fi

# playwright-core for e2e/tests/it/dashboard.rs, at the version package-lock.json pins;
# with JOBZ_REQUIRE_BROWSER=1 that test fails (instead of skipping) if it is missing.
step "npm ci in e2e/browser (playwright-core for the dashboard's browser tests)"
(cd e2e/browser && npm ci --no-audit --no-fund)
export JOBZ_REQUIRE_BROWSER=1

# The metrics test (e2e/tests/it/metrics.rs) reads /metrics back with the Python
# prometheus_client parsers (Prometheus text and OpenMetrics): a venv in the target
# directory, made once, named to the test by JOBZ_TEST_PYTHON.
pyvenv=${CARGO_TARGET_DIR:-$PWD/target}/pyvenv
if ! "$pyvenv/bin/python" -c 'import prometheus_client' 2>/dev/null; then
    step "python venv with prometheus_client ($pyvenv)"
    if ! python3 -m venv "$pyvenv" 2>/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q python3-venv
        python3 -m venv "$pyvenv"
    fi
    "$pyvenv/bin/pip" install -q 'prometheus_client>=0.20,<1'
fi
export JOBZ_TEST_PYTHON="$pyvenv/bin/python"

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo doc --workspace --no-deps (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

step "cargo build --workspace --bins"
cargo build --workspace --bins

step "cargo test --workspace --no-fail-fast"
cargo test --workspace --no-fail-fast

# ---- Bench smoke run (issue 12; README "Benchmark") ----
# The bench's quick mode on the debug binaries just built, so the bench cannot rot: it fails
# only when a scenario cannot complete. Its figures mean nothing (debug build, shared CI
# machine) and no target is checked; the figures come from bench/run.sh on release builds.
step "bench smoke run (bench --quick on the debug binaries: every scenario must complete; its figures mean nothing)"
if [[ ${JOBZ_SKIP_BENCH_SMOKE:-0} == 1 ]]; then
    echo "skipped (JOBZ_SKIP_BENCH_SMOKE=1)"
else
    debug_dir=${CARGO_TARGET_DIR:-target}/debug
    "$debug_dir/bench" --quick --no-build --bin-dir "$debug_dir"
fi
# ---- end of bench smoke run ----

# ---- Fuzzing and dependency audit (issue 6; README "Fuzzing and audit") ----
# A short run of every fuzz target (scripts/fuzz.sh installs cargo-fuzz if missing).
step "fuzzing (scripts/fuzz.sh ${JOBZ_FUZZ_SECONDS:-20}: every target, seconds each)"
if [[ ${JOBZ_SKIP_FUZZ:-0} == 1 ]]; then
    echo "skipped (JOBZ_SKIP_FUZZ=1)"
else
    bash scripts/fuzz.sh "${JOBZ_FUZZ_SECONDS:-20}"
fi

# cargo deny: licences, bans, sources, and advisories from the RustSec snapshot bundle in
# ../shared/data (fails on a finding, or without any database). The first run installs
# cargo-deny from crates.io (~7 min on 2 cores; cached in ~/.cargo/bin after).
step "dependency audit (scripts/audit.sh: cargo deny)"
if [[ ${JOBZ_SKIP_AUDIT:-0} == 1 ]]; then
    echo "skipped (JOBZ_SKIP_AUDIT=1)"
else
    bash scripts/audit.sh
fi
# ---- end of fuzzing and dependency audit ----

# The Ansible deployment, proven on four hosts made of network namespaces with their own
# sshd (it installs openssh-server and friends with apt, Ansible into a venv with pip).
step "multi-host deployment test (tests/multihost/run.sh: Ansible over SSH to 4 namespace hosts)"
if [[ ${JOBZ_SKIP_MULTIHOST:-0} == 1 ]]; then
    echo "skipped (JOBZ_SKIP_MULTIHOST=1)"
elif [[ $EUID -ne 0 ]]; then
    echo "skipped: needs root (network namespaces)"
else
    JOBZ_TEST_SEMAPHORE=1 bash tests/multihost/run.sh
fi
