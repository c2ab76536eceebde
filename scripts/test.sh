#!/usr/bin/env bash
# The one test command: formatting, lints, build, every test (unit and end-to-end).
# Exits non-zero on the first failure. CI runs it through .ci/run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

# Installs: nothing yet. Whatever the tests need beyond the Rust toolchain (apt or pip
# packages) is installed here, so that a fresh machine passes as this one does.

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build --workspace --bins"
cargo build --workspace --bins

step "cargo test --workspace --no-fail-fast"
cargo test --workspace --no-fail-fast
