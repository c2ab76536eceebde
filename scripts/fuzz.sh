#!/usr/bin/env bash
# Fuzzes what jobz parses from outside: wire frames, job files, templates (fuzz/, cargo fuzz).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]    each target for SECONDS (default 20); all by default
#   scripts/fuzz.sh 3600                     the longer run, before a release or after parser work
#
# Runs on the stable toolchain: cargo fuzz passes nightly-only -Z flags, which
# RUSTC_BOOTSTRAP=1 allows. Installs cargo-fuzz from crates.io if it is missing.
# Exits non-zero if any target crashes, naming the crash file under fuzz/artifacts/<target>/;
# replay one with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run --codegen-units 16 <target> <file>` from the repository root.
# The corpora grow in fuzz/corpus/<target>/ (only the seed-* files are committed).
# JOBZ_FUZZ_TARGET_DIR moves the build (default fuzz/target).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

seconds=${1:-20}
shift || true
[[ $seconds =~ ^[0-9]+$ ]] || { echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2; }

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    step "cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
fi

targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo fuzz list)
fi

# The real inputs as seeds, beside the committed ones: every job file the repository ships.
mkdir -p fuzz/corpus/jobfile_parse
for f in jobs.d/*.y*ml tests/data/*.y*ml; do
    [[ -f $f ]] && cp "$f" "fuzz/corpus/jobfile_parse/real-$(basename "$f")"
done

# Build and run with the same flags, or `cargo fuzz run` rebuilds. AddressSanitizer stays
# on (unsafe-libyaml, rmp and the crypto crates have unsafe code); 16 codegen units instead
# of cargo fuzz's default 1 halve the build on a 2-core machine for slightly slower runs.
build_flags=(--sanitizer address --codegen-units 16 --target-dir "${JOBZ_FUZZ_TARGET_DIR:-fuzz/target}")
step "cargo fuzz build (${targets[*]})"
if (($# == 0)); then
    cargo fuzz build "${build_flags[@]}"
else
    for target in "${targets[@]}"; do
        cargo fuzz build "${build_flags[@]}" "$target"
    done
fi

failed=()
for target in "${targets[@]}"; do
    step "cargo fuzz run $target (${seconds}s)"
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    # Any file libFuzzer writes to artifacts/ is a crash, a leak, a timeout or an OOM.
    before=$(find "fuzz/artifacts/$target" -type f | sort)
    status=0
    # -timeout: one input running this long is a hang; -rss_limit_mb: memory per process.
    cargo fuzz run "${build_flags[@]}" "$target" -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 || status=$?
    after=$(find "fuzz/artifacts/$target" -type f | sort)
    new=$(comm -13 <(echo "$before") <(echo "$after") | sed '/^$/d')
    if ((status != 0)) || [[ -n $new ]]; then
        failed+=("$target")
        echo "FUZZ FAILURE in $target (exit $status); crash input(s):"
        echo "${new:-  (none written: see the output above)}" | sed 's/^/  /'
        echo "replay: RUSTC_BOOTSTRAP=1 cargo fuzz run ${build_flags[*]} $target <file>"
    fi
done

if ((${#failed[@]})); then
    step "fuzzing found crashes in: ${failed[*]}"
    exit 1
fi
step "fuzzing: ${#targets[@]} targets, ${seconds}s each, no crash"
