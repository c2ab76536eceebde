#!/usr/bin/env bash
# A whole jobz mesh on this machine, on 127.0.0.1 only: a broker, the HTTP frontend, two
# workers (demo-a, demo-b) serving jobs.d/, and the semaphore. Runs the demo pipeline once.
#
#   scripts/demo.sh          (re)start the demo and trigger `import` for today
#   scripts/demo.sh stop     stop the demo's processes (only the PIDs it recorded)
#   scripts/demo.sh status   show which of them run
#
# State and logs go under ./.demo/ (git-ignored). Builds the debug binaries (the same ones
# the tests use, so no second full build). Ports: JOBZ_DEMO_BASE_PORT (broker, default 6795
# and 6796) and JOBZ_DEMO_HTTP_PORT (frontend, default 6769).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
DEMO=$ROOT/.demo
BASE_PORT=${JOBZ_DEMO_BASE_PORT:-6795}
HTTP_PORT=${JOBZ_DEMO_HTTP_PORT:-6769}
BROKER=127.0.0.1:$BASE_PORT
FRONTEND=http://127.0.0.1:$HTTP_PORT
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
BIN=$TARGET/debug
PROCS=(broker frontend demo-a demo-b semaphore)

# The PID recorded for a process, if it still runs one of our binaries.
live_pid() {
    local file=$DEMO/$1.pid pid
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *jobz-* ]] || return 1
    echo "$pid"
}

stop() {
    local name pid waited
    local -a pids=()
    for name in "${PROCS[@]}"; do
        if pid=$(live_pid "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    # Give each a chance to finish or hand back its work, then insist.
    for pid in "${pids[@]}"; do
        waited=0
        while kill -0 "$pid" 2>/dev/null && ((waited < 100)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "$DEMO"/*.pid
    ((${#pids[@]} == 0)) || echo "stopped ${#pids[@]} demo process(es)"
}

status() {
    local name pid
    for name in "${PROCS[@]}"; do
        if pid=$(live_pid "$name"); then
            echo "$name: running (pid $pid)"
        else
            echo "$name: not running"
        fi
    done
}

# start NAME BINARY ARGS...: runs it in the background, output to .demo/NAME.log.
start() {
    local name=$1 bin=$2
    shift 2
    nohup "$BIN/$bin" "$@" </dev/null >>"$DEMO/$name.log" 2>&1 &
    echo $! >"$DEMO/$name.pid"
}

# wait_for SECONDS WHAT COMMAND...: polls COMMAND every 0.2 s until a deadline; gives up at
# once if a mesh process has died (its log says why).
wait_for() {
    local seconds=$1 what=$2 deadline name
    shift 2
    deadline=$((SECONDS + seconds))
    until "$@"; do
        for name in broker frontend demo-a demo-b; do
            if ! live_pid "$name" >/dev/null; then
                echo "demo: $name exited while waiting for $what; its log ($DEMO/$name.log) ends:" >&2
                tail -n 5 "$DEMO/$name.log" >&2 || true
                exit 1
            fi
        done
        if ((SECONDS >= deadline)); then
            echo "demo: timed out waiting for $what; the logs are in $DEMO/" >&2
            tail -n 5 "$DEMO"/*.log >&2 || true
            exit 1
        fi
        sleep 0.2
    done
}

healthy() { curl -fsS -m 3 -o /dev/null "$FRONTEND/healthz" 2>/dev/null; }

live_workers() {
    curl -fsS "$FRONTEND/workers" 2>/dev/null | grep -o '"live": *true' | wc -l
}

two_workers_live() { (($(live_workers) >= 2)); }

pretty() {
    if command -v jq >/dev/null; then jq .; else cat; echo; fi
}

case ${1:-start} in
stop)
    stop
    exit 0
    ;;
status)
    status
    exit 0
    ;;
start) ;;
*)
    echo "usage: $0 [start|stop|status]" >&2
    exit 2
    ;;
esac

command -v curl >/dev/null || { echo "demo: curl is needed" >&2; exit 1; }
mkdir -p "$DEMO"
stop

echo "==> building (debug): cargo build --workspace --bins"
cargo build --workspace --bins

mkdir -p "$DEMO/broker" "$DEMO/semaphore"
for w in demo-a demo-b; do mkdir -p "$DEMO/$w/spool" "$DEMO/$w/log"; done

echo "==> starting broker, frontend, workers and semaphore"
start broker jobz-broker --bind "$BROKER" --state "$DEMO/broker"
start frontend jobz-frontend --listen "127.0.0.1:$HTTP_PORT" --broker "$BROKER"
for w in demo-a demo-b; do
    start "$w" jobz-worker --broker "$BROKER" --name "$w" --jobs-dir "$ROOT/jobs.d" \
        --spool "$DEMO/$w/spool" --log-dir "$DEMO/$w/log" --frontend "$FRONTEND"
done
start semaphore jobz-semaphore --broker "$BROKER" --jobs-dir "$ROOT/jobs.d" \
    --state "$DEMO/semaphore"

wait_for 30 "the frontend and broker ($FRONTEND/healthz)" healthy
wait_for 30 "two live workers ($FRONTEND/workers)" two_workers_live
live_pid semaphore >/dev/null || echo "note: the semaphore is not running (see $DEMO/semaphore.log)"

DATE=$(date +%Y_%m_%d)
echo "==> GET $FRONTEND/job_start?job_name=import&date=$DATE&wait=60"
if ! curl -sS "$FRONTEND/job_start?job_name=import&date=$DATE&wait=60" | pretty; then
    echo "demo: job_start failed; see $DEMO/frontend.log" >&2
fi

cat <<EOF

The demo mesh is running.
  dashboard:     $FRONTEND/
  runs:          $FRONTEND/runs
  workers:       $FRONTEND/workers
  schedules:     $FRONTEND/schedules  (nightly_import, 02:30 Berlin time)
  resources:     $FRONTEND/resources  (lineage: curl -s '$FRONTEND/graph?format=dot' | dot -Tsvg > flow.svg)
  worker logs:   tail -f $DEMO/demo-a/log/worker.log $DEMO/demo-b/log/worker.log
  step outputs:  $DEMO/demo-a/log/runs/ and $DEMO/demo-b/log/runs/
  process logs:  $DEMO/*.log
  failure path:  curl '$FRONTEND/job_start?job_name=import_broken&date=$DATE&wait=60'
  stop:          scripts/demo.sh stop
EOF
