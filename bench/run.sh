#!/usr/bin/env bash
# The jobz benchmark: builds the release binaries, then runs the bench against them.
# Flags go to the bench: bench/run.sh --quick, bench/run.sh --peers, bench/run.sh --help.
# The full run takes about 4.5 minutes (5.5 with --peers; see bench/README.md), --quick
# under a minute; both use both CPUs hard: run it on a quiet machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --bins -p broker -p frontend -p worker -p semaphore -p bench
exec "${CARGO_TARGET_DIR:-target}/release/bench" --no-build "$@"
