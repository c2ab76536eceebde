#!/usr/bin/env bash
# Where the CPU goes: runs one bench scenario on the release binaries under a system-wide
# `perf record` (software clock, so it works where hardware counters do not) and prints,
# per process kind (broker, frontend, worker, step supervisor, sh, bench), its share of
# the samples, kernel vs user time, and its hottest symbols and libraries.
#
#   bench/profile.sh                  # scenario 8 (keep-alive throughput), 6,000 runs
#   bench/profile.sh broker-alone     # scenario 11 (the broker alone, simulated workers)
#   bench/profile.sh scale            # scenario 12: the broker alone, in its closed loop
#                                     # with nothing waiting, then with the backlog waiting
#   bench/profile.sh keep-alive --keep   # keep perf.data and the report in a directory
#
# Needs `perf` (Debian's linux-perf) and python3; run it as root on a quiet machine. The
# figures are shares of samples, not times: compare them within one report.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

scenario=${1:-keep-alive}
keep=${2:-}
command -v perf >/dev/null || { echo "profile.sh: perf is not installed (apt-get install linux-perf)" >&2; exit 2; }

mesh_parts=idle,latency,sequential,burst,keep-alive,broadcast,restart,drain,sealed
case "$scenario" in
keep-alive)
    skip=${mesh_parts/keep-alive,/},seal-cost,broker-alone,scale
    extra=(--keepalive-runs "${JOBZ_PROFILE_RUNS:-6000}" --plain)
    ;;
broker-alone)
    skip=mesh,seal-cost,scale
    extra=(--broker-cycles "${JOBZ_PROFILE_CYCLES:-60000}")
    ;;
scale)
    skip=mesh,seal-cost,broker-alone
    extra=(--scale-cycles "${JOBZ_PROFILE_CYCLES:-40000}")
    ;;
*)
    echo "profile.sh: unknown scenario '$scenario' (keep-alive, broker-alone or scale)" >&2
    exit 2
    ;;
esac

cargo build --release --bins -p broker -p frontend -p worker -p semaphore -p bench
bin="${CARGO_TARGET_DIR:-target}/release"
out=$(mktemp -d /tmp/jobz-profile.XXXXXX)
if [[ $keep != --keep ]]; then
    trap 'rm -rf "$out"' EXIT
fi

report() { # perf.data -> report on stdout
    perf script -i "$1" --show-task-events -F pid,tid,comm,ip,sym,dso 2>/dev/null >"${1%.data}.txt"
    python3 bench/profile_report.py "${1%.data}.txt"
}

if [[ $scenario == scale ]]; then
    # Only the broker, only in the two closed loops (the bench says on stderr when each
    # phase starts): the cost of a cycle without and with the backlog waiting.
    phase() { # name: start recording the newest broker into $out/<name>.data
        perf record -g -e cpu-clock -F 1999 -p "$(pgrep -n -x jobz-broker)" \
            -o "$out/$1.data" >/dev/null 2>&1 &
        echo $! >"$out/perf.pid"
    }
    stop() { [[ -s $out/perf.pid ]] && kill -INT "$(cat "$out/perf.pid")" && sleep 1; : >"$out/perf.pid"; }
    "$bin/bench" --no-build --skip "$skip" "${extra[@]}" 2>&1 >"$out/bench.txt" |
        while IFS= read -r line; do
            echo "$line" >>"$out/bench.log"
            case $line in
            *"closed loop, nothing waiting"*) phase none-waiting ;;
            *"runs into the backlog"*) stop ;;
            *"closed loop with the backlog waiting"*) phase backlog-waiting ;;
            *"restarting the broker"*) stop ;;
            esac
        done
    grep -E "cycles/s|CPU per cycle" "$out/bench.txt" || true
    for name in none-waiting backlog-waiting; do
        echo
        echo "######## broker, closed loop, $name"
        report "$out/$name.data" | tee "$out/report-$name.txt"
    done
else
    # The bench must not be profiled while it builds; perf follows the whole machine from
    # here until the bench ends (-a), children included.
    perf record -a -g -e cpu-clock -F 1999 -o "$out/perf.data" -- \
        "$bin/bench" --no-build --skip "$skip" "${extra[@]}" >"$out/bench.txt" 2>"$out/bench.log"
    grep -E "runs/s|cycles/s|CPU per" "$out/bench.txt" || true
    report "$out/perf.data" | tee "$out/report.txt"
fi
if [[ $keep == --keep ]]; then
    echo "kept: $out (perf.data, samples.txt, report.txt, bench.txt)"
fi
