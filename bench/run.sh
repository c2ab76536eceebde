#!/usr/bin/env bash
# The jobz benchmark: builds the release binaries, then runs the bench against them.
# Flags go to the bench: bench/run.sh --quick, bench/run.sh --help.
# Runs about 1.5 minutes (plain mesh, then a sealed one, then the seal cost in process)
# and uses both CPUs hard: run it on a quiet machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --bins -p broker -p frontend -p worker -p bench
exec "${CARGO_TARGET_DIR:-target}/release/bench" --no-build "$@"
