#!/usr/bin/env bash
# The multi-host test of the Ansible deployment (issue 5): a real mesh of four hosts on
# this machine, deployed by ansible-playbook over SSH.
#
#   sudo tests/multihost/run.sh          (root: it makes network namespaces)
#
# Hosts are network namespaces on a private bridge (10.251.77.0/24 by default, no default
# route: no packet leaves the subnet). Each host runs its own sshd as PID 1 of a
# PID+UTS+mount namespace and sees the machine's /etc, /var, /run and /usr/local through a
# private overlay, so what Ansible installs there (user, binaries, /etc/jobz, /var/lib/jobz,
# /var/log/jobz, pid files) stays on that host. See ../../../shared/notes/multihost.md.
#
#   core 10.251.77.11  broker + frontend      w1  10.251.77.12  worker
#   sem  10.251.77.14  semaphore              w2  10.251.77.13  worker
#   client namespace 10.251.77.20: where the test's HTTP requests come from
#
# The mesh is deployed secured, as in production: the broker with --keys (sealed frames,
# every node key made on its host and enrolled by the playbook), the frontend with API
# tokens made by `jobz-frontend token new` (the inventory holds their hashes only).
#
# Checks: first, on fresh hosts, the README's deployment walkthrough as it is written
# (walkthrough.sh: a release build, a copy of the example inventory, site.yml, curl with
# the admin token the play made, logs.yml following the run's child runs); then, on fresh
# hosts again, with the test's own inventory: deploy; systemd units verify; a second run changes nothing; every node key is
# enrolled (and none pending), keys are 0600 and owned by jobz, the broker runs sealed;
# HTTP without a token is 401, a read token on /job_start is 403; a chain across both
# workers completes and each worker host's log has it; job commands run as jobz-step and
# cannot read the worker's key, settings, log or environment; trigger.yml and logs.yml; the
# broker's notify file from the inventory (jobz_broker_notify) tells a webhook of a failure; a worker
# whose link was down during a broadcast runs its step once back; a broken job file never
# reaches a host (nor a good one changed in the same run); a changed job file changes only
# the workers, restarts nothing and is in force; rolling_restart.yml drains and restarts
# each worker; jobz_worker_step_user "" and back switches the worker between jobz and
# root; ansible-lint (production profile); with JOBZ_TEST_SEMAPHORE=1, the
# semaphore fires once. Ends with "N passed, M failed"; exits non-zero on any failure.
#
# Environment:
#   JOBZ_TEST_SEMAPHORE=1    also check that the semaphore fires exactly once
#   JOBZ_MH_BIN_DIR=DIR      use these binaries instead of building the debug ones
#   CARGO_TARGET_DIR=DIR     build the debug binaries there (and take them from DIR/debug)
#   JOBZ_MH_HOLD=1           after the first deploy, keep the mesh up until interrupted
#                            (. WORKDIR/env.sh to run ansible-playbook against it)
#   JOBZ_MH_SUBNET=A.B.C     the /24 to use (default 10.251.77)
#   JOBZ_MH_KEEP=1           keep the work directory (logs, host overlays) afterwards
#   JOBZ_MH_LINT=0           skip ansible-lint
#   JOBZ_MH_WALKTHROUGH=0    skip the README's walkthrough (and its release build)
#   JOBZ_ANSIBLE_VENV=DIR    a venv with ansible-core and ansible-lint to use
#
# Everything it starts it stops (by PID), and every namespace and the bridge it makes it
# deletes, also when it fails or is interrupted.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ANSIBLE_SRC=$ROOT/ansible

NET=${JOBZ_MH_SUBNET:-10.251.77}
BRIDGE=jzt-br0
CLIENT=jzt-client
CLIENT_IP=$NET.20
HOSTS=(core w1 w2 sem)
declare -A IP=([core]=$NET.11 [w1]=$NET.12 [w2]=$NET.13 [sem]=$NET.14)
WORKERS=(w1 w2)
FRONTEND=http://${IP[core]}:6769
# Pinned so that a new ansible-lint rule cannot fail an unchanged tree.
ANSIBLE_PINS=(ansible-core==2.19.14 ansible-lint==26.10.1)

PASSED=0
FAILED=0
FAILURES=()
declare -A UNSHARE_PID=()
WORK=""
HOLD_PID=""
TOKEN=""      # scopes read,trigger: every API call of the test and of the playbooks
READ_TOKEN="" # scope read only
CHILD_PID=""
SNOOPED="" # w2's lines of the last mh_snoop run (step_user_phase)
T0=$SECONDS

say() { printf '%s [%3ds] %s\n' "==>" $((SECONDS - T0)) "$*"; }
note() { printf '    %s\n' "$*"; }
pass() {
    PASSED=$((PASSED + 1))
    printf 'PASS: %s\n' "$1"
}
fail() {
    FAILED=$((FAILED + 1))
    FAILURES+=("$1")
    printf 'FAIL: %s\n' "$1"
    shift
    local line
    for line in "$@"; do note "$line"; done
}

summary() {
    echo
    if ((FAILED > 0)); then
        printf 'failed checks:\n'
        printf '  - %s\n' "${FAILURES[@]}"
    fi
    printf '%d passed, %d failed\n' "$PASSED" "$FAILED"
}

# --- Teardown --------------------------------------------------------------------------

netns_exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

# Kills what is left in a namespace of ours from an earlier, killed run, then deletes it.
remove_netns() {
    local ns=$1 pid
    netns_exists "$ns" || return 0
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
}

# Ends every host: its SSH control connections, then its sshd (PID 1 of the host's PID
# namespace: killing unshare, --kill-child, ends it and every process deployed there),
# until no process is left in its network namespace.
stop_hosts() {
    local h sock tries
    if [[ -n $WORK && -d $WORK/cp ]]; then
        for sock in "$WORK"/cp/*; do
            [[ -S $sock ]] && ssh -o ControlPath="$sock" -O exit dummy >/dev/null 2>&1
        done
    fi
    for h in "${!UNSHARE_PID[@]}"; do kill -KILL "${UNSHARE_PID[$h]}" 2>/dev/null; done
    for h in "${!UNSHARE_PID[@]}"; do { wait "${UNSHARE_PID[$h]}"; } 2>/dev/null; done
    for h in "${HOSTS[@]}"; do
        tries=50
        while netns_exists "jzt-$h" && [[ -n $(ip netns pids "jzt-$h" 2>/dev/null) ]] && ((tries-- > 0)); do
            sleep 0.1
        done
    done
}

cleanup() {
    local rc=$? h
    set +e
    trap - EXIT INT TERM
    [[ -n ${HOLD_PID:-} ]] && kill "$HOLD_PID" 2>/dev/null
    if [[ -n ${CHILD_PID:-} ]]; then
        kill -TERM "$CHILD_PID" 2>/dev/null
        wait "$CHILD_PID" 2>/dev/null
    fi
    stop_hosts
    for h in "${HOSTS[@]}"; do remove_netns "jzt-$h"; done
    remove_netns "$CLIENT"
    ip link del "$BRIDGE" 2>/dev/null
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ ${JOBZ_MH_KEEP:-0} == 1 ]]; then
            echo "kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}

# --- Set-up helpers ----------------------------------------------------------------------

need_root() {
    if ((EUID != 0)); then
        echo "tests/multihost/run.sh: needs root (network namespaces, mounts)" >&2
        exit 2
    fi
}

install_packages() {
    local missing=()
    command -v sshd >/dev/null || [[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
    command -v nc >/dev/null || missing+=(netcat-openbsd)
    command -v ping >/dev/null || missing+=(iputils-ping)
    command -v nft >/dev/null || missing+=(nftables)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v curl >/dev/null || missing+=(curl)
    command -v start-stop-daemon >/dev/null || missing+=(dpkg)
    dpkg -s python3-venv >/dev/null 2>&1 || missing+=(python3-venv)
    if ((${#missing[@]} > 0)); then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    mkdir -p /run/sshd
}

# Uses ~/.cache/jobz-ansible-venv (or JOBZ_ANSIBLE_VENV) if it has Ansible, else a venv
# under tests/multihost/.venv, made on first use.
setup_ansible() {
    local cached=${JOBZ_ANSIBLE_VENV:-$HOME/.cache/jobz-ansible-venv}
    if [[ -x $cached/bin/ansible-playbook && -x $cached/bin/ansible-lint ]]; then
        VENV=$cached
    else
        VENV=$HERE/.venv
        if [[ ! -x $VENV/bin/ansible-playbook || ! -x $VENV/bin/ansible-lint ]]; then
            say "installing ${ANSIBLE_PINS[*]} into $VENV"
            rm -rf "$VENV"
            python3 -m venv "$VENV"
            "$VENV/bin/pip" install -q --disable-pip-version-check "${ANSIBLE_PINS[@]}"
        fi
    fi
    PATH=$VENV/bin:$PATH
    export PATH
    note "$("$VENV/bin/ansible-playbook" --version | head -1) from $VENV"
}

build() {
    if [[ -n ${JOBZ_MH_BIN_DIR:-} ]]; then
        BIN=$JOBZ_MH_BIN_DIR
    else
        say "building: cargo build --workspace --bins"
        (cd "$ROOT" && cargo build --workspace --bins --quiet)
        local target=${CARGO_TARGET_DIR:-$ROOT/target}
        [[ $target == /* ]] || target=$ROOT/$target
        BIN=$target/debug
    fi
    local b
    for b in jobz-broker jobz-frontend jobz-worker jobz-step jobz-semaphore; do
        [[ -x $BIN/$b ]] || { echo "missing $BIN/$b" >&2; exit 1; }
    done
}

# A stripped copy of the binaries in the work dir: what the playbook ships (a debug build
# is ~80 MB a binary, and every run checksums each copy), safe from rebuilds meanwhile.
stage_binaries() {
    local b
    mkdir -p "$WORK/bin"
    for b in jobz-broker jobz-frontend jobz-worker jobz-step jobz-semaphore; do
        strip -o "$WORK/bin/$b" "$BIN/$b" 2>/dev/null || cp "$BIN/$b" "$WORK/bin/$b"
    done
    BIN=$WORK/bin
}

# Two API tokens made by the real `jobz-frontend token new`: the token on stdout, the
# token file line (NAME SCOPES sha256:HEX) on stderr, whose hash goes to the inventory.
make_tokens() {
    local name scopes out line hashes=""
    for name in mh-ops mh-read; do
        scopes=read,trigger
        [[ $name == mh-read ]] && scopes=read
        out=$("$BIN/jobz-frontend" token new "$name" --scopes "$scopes" 2>"$WORK/token-line")
        line=$(grep -v '^#' "$WORK/token-line" | tail -1)
        [[ $out == jobz_* && $line =~ ^$name\ $scopes\ sha256:([0-9a-f]{64})$ ]] || {
            echo "jobz-frontend token new did not give a token and its line: '$line'" >&2
            exit 1
        }
        hashes+="  - {name: $name, scopes: [${scopes//,/, }], sha256: ${BASH_REMATCH[1]}}"$'\n'
        if [[ $name == mh-ops ]]; then TOKEN=$out; else READ_TOKEN=$out; fi
    done
    rm -f "$WORK/token-line"
    TOKEN_HASHES=$hashes
}

make_network() {
    local h ns
    # Leftovers of an earlier run that was killed before its teardown, and veth ends whose
    # namespace the kernel has not finished freeing ("File exists" otherwise).
    for h in "${HOSTS[@]}"; do remove_netns "jzt-$h"; done
    remove_netns "$CLIENT"
    for h in "${HOSTS[@]}" client; do ip link del "jzt-v-$h" 2>/dev/null || true; done
    ip link del "$BRIDGE" 2>/dev/null || true
    if ip -4 addr show | grep -q "inet $NET\."; then
        echo "the subnet $NET.0/24 is in use on this machine; set JOBZ_MH_SUBNET" >&2
        exit 1
    fi
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for h in "${HOSTS[@]}" client; do
        ns=jzt-$h
        ip netns add "$ns"
        ip link add "jzt-v-$h" type veth peer name eth0 netns "$ns"
        ip link set "jzt-v-$h" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        if [[ $h == client ]]; then
            ip -n "$ns" addr add "$CLIENT_IP/24" dev eth0
        else
            ip -n "$ns" addr add "${IP[$h]}/24" dev eth0
        fi
        ip -n "$ns" link set eth0 up
    done
}

# One host: its sshd as PID 1 of new PID, UTS and mount namespaces inside its network
# namespace, with private overlays over /etc, /var, /run and /usr/local, and an empty
# private /root: SSH sessions as root must not source this machine's /root/.bashrc (here it
# runs `pyenv init`, whose rehash lock, once left stale by a killed session, made every
# Ansible module wait 60 s).
start_host() {
    local h=$1 dir=$WORK/hosts/$1 d n mounts=""
    mkdir -p "$dir/ovl"
    [[ -f $dir/ssh_host_ed25519_key ]] || ssh-keygen -q -t ed25519 -N '' -C "$h" -f "$dir/ssh_host_ed25519_key"
    for d in etc var run usr/local; do
        n=${d//\//_}
        mkdir -p "$dir/ovl/$n.upper" "$dir/ovl/$n.work"
        mounts+="mount -t overlay overlay -o lowerdir=/$d,upperdir=$dir/ovl/$n.upper,workdir=$dir/ovl/$n.work /$d && "
    done
    mkdir -p "$dir/root"
    chmod 700 "$dir/root"
    mounts+="mount --bind $dir/root /root && "
    cat >"$dir/sshd_config" <<EOF
ListenAddress ${IP[$h]}
Port 22
HostKey $dir/ssh_host_ed25519_key
PidFile none
AuthorizedKeysFile $WORK/ssh/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
    ip netns exec "jzt-$h" unshare --uts --pid --mount --kill-child --mount-proc --propagation private \
        sh -c "hostname $h && ${mounts}exec /usr/sbin/sshd -D -e -f $dir/sshd_config" \
        >"$dir/sshd.log" 2>&1 &
    UNSHARE_PID[$h]=$!
    printf '%s ' "${IP[$h]}" >>"$WORK/ssh/known_hosts"
    cut -d' ' -f1,2 "$dir/ssh_host_ed25519_key.pub" >>"$WORK/ssh/known_hosts"
}

# The PID (in this namespace) of host $1's sshd, PID 1 of that host.
host_pid() {
    local kids
    kids=$(cat "/proc/${UNSHARE_PID[$1]}/task/${UNSHARE_PID[$1]}/children" 2>/dev/null || true)
    echo "${kids%% *}"
}

# Runs a command inside host $1 (its mount, UTS, PID and network namespaces).
on_host() {
    local h=$1 pid
    shift
    pid=$(host_pid "$h")
    [[ -n $pid ]] || return 1
    nsenter -t "$pid" -m -u -p -n -- "$@"
}

wait_for_sshd() {
    local h tries
    for h in "${HOSTS[@]}"; do
        tries=100
        until nc -z -w 1 "${IP[$h]}" 22 2>/dev/null; do
            if ((--tries <= 0)) || ! kill -0 "${UNSHARE_PID[$h]}" 2>/dev/null; then
                echo "sshd of $h did not come up:" >&2
                cat "$WORK/hosts/$h/sshd.log" >&2
                exit 1
            fi
            sleep 0.1
        done
    done
}

write_ansible_config() {
    mkdir -p "$WORK/inventory/group_vars" "$WORK/cp" "$WORK/ansible-local" "$WORK/ansible-home"
    cp -r "$HERE/jobs.d" "$WORK/inventory/jobs.d"
    cat >"$WORK/inventory/hosts.ini" <<EOF
# The test mesh. Settings beyond the roles' defaults are in group_vars/ here.
[broker]
core ansible_host=${IP[core]}

[frontend]
core

[workers]
w1 ansible_host=${IP[w1]}
w2 ansible_host=${IP[w2]}

[semaphores]
sem ansible_host=${IP[sem]}
EOF
    # Inventory group_vars override the roles' defaults.
    # The webhook's secret: in the inventory (an operator's would be in Vault) and, for the
    # receiver in the client namespace, in a file.
    WEBHOOK_SECRET=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
    (umask 077 && printf '%s\n' "$WEBHOOK_SECRET" >"$WORK/webhook.secret")
    cat >"$WORK/inventory/group_vars/broker.yml" <<EOF
---
# A worker whose link is down for a few seconds stays within the expiry.
jobz_broker_worker_expiry: 60s
# The broker's notify file: one webhook, a receiver in the client namespace.
jobz_broker_notify:
  webhooks:
    mh:
      url: "http://$CLIENT_IP:8088/hook"
      secret_file: "{{ jobz_broker_notify_secrets_dir }}/mh"
jobz_broker_notify_secrets:
  mh: "$WEBHOOK_SECRET"
EOF
    cat >"$WORK/inventory/group_vars/workers.yml" <<'EOF'
---
jobz_worker_slots: 2
jobz_worker_drain_timeout: 10
EOF
    # The hashes of the test's tokens, never the tokens.
    printf -- '---\njobz_frontend_tokens:\n%s' "$TOKEN_HASHES" >"$WORK/inventory/group_vars/frontend.yml"
    # The token trigger.yml and rolling_restart.yml send, from a file as an operator would.
    (umask 077 && printf -- '---\njobz_api_token: %s\n' "$TOKEN" >"$WORK/token.yml")
    cat >"$WORK/ansible.cfg" <<EOF
[defaults]
inventory = $WORK/inventory/hosts.ini
remote_user = root
private_key_file = $WORK/ssh/id_ed25519
interpreter_python = /usr/bin/python3
host_key_checking = True
forks = 10
local_tmp = $WORK/ansible-local
remote_tmp = $WORK/ansible-remote
nocolor = True
retry_files_enabled = False

[privilege_escalation]
become = False

[ssh_connection]
pipelining = True
control_path_dir = $WORK/cp
ssh_args = -o ControlMaster=auto -o ControlPersist=120s -o UserKnownHostsFile=$WORK/ssh/known_hosts -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o BatchMode=yes
EOF
    export ANSIBLE_CONFIG=$WORK/ansible.cfg
    export ANSIBLE_HOME=$WORK/ansible-home
    export ANSIBLE_LOCAL_TEMP=$WORK/ansible-local
    export ANSIBLE_REMOTE_TEMP=$WORK/ansible-remote
    export ANSIBLE_SSH_CONTROL_PATH_DIR=$WORK/cp
    export ANSIBLE_BECOME=False
    export ANSIBLE_NOCOLOR=1
    export XDG_CACHE_HOME=$WORK/xdg-cache
    # The test hosts log in as root and have no sudo: the playbooks' `become` is a no-op.
    PLAYBOOK_ARGS=(-e "jobz_bin_dir=$BIN" -e ansible_become=false -e "@$WORK/token.yml")
}

# background LOG COMMAND...: runs COMMAND with output to LOG and waits for it; in the
# background so that an interrupt reaches the teardown at once (which then stops it).
background() {
    local log=$1 rc=0
    shift
    "$@" >"$log" 2>&1 &
    CHILD_PID=$!
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=""
    return "$rc"
}

# playbook NAME LOG [ARGS...]: runs ansible/NAME, output to $WORK/LOG; returns its status.
playbook() {
    local name=$1 log=$WORK/$2 rc=0 started=$SECONDS
    shift 2
    background "$log" ansible-playbook "${PLAYBOOK_ARGS[@]}" "$@" "$ANSIBLE_SRC/$name" || rc=$?
    note "ansible-playbook $name $*: exit $rc in $((SECONDS - started)) s (log: ${log#"$WORK"/})"
    return "$rc"
}

# recap LOG HOST FIELD: a number from the PLAY RECAP of LOG (e.g. changed).
recap() {
    sed -n "s/^$2 *:.* $3=\([0-9]*\).*/\1/p" "$1" | tail -1
}

show_log_tail() {
    note "--- last lines of $1:"
    tail -n "${2:-25}" "$1" | sed 's/^/    | /'
}

# --- HTTP from the client namespace -----------------------------------------------------

# http ARGS...: curl from the client namespace with the read,trigger token.
http() { ip netns exec "$CLIENT" curl -sS --max-time "${HTTP_TIMEOUT:-70}" -H "Authorization: Bearer $TOKEN" "$@"; }
# http_status [CURL ARGS...] URL: the HTTP status only, without the test's token.
http_status() { ip netns exec "$CLIENT" curl -sS --max-time 10 -o /dev/null -w '%{http_code}' "$@"; }

# json EXPR: evaluates a Python expression over the JSON on stdin (bound to `d`).
json() { python3 -c "import json,sys; d=json.load(sys.stdin); r=($1); print(r if isinstance(r,str) else json.dumps(r))"; }

# wait_until SECONDS COMMAND...: polls every 0.5 s.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

healthy() { [[ $(http_status "$FRONTEND/healthz" 2>/dev/null) == 200 ]]; }

workers_live() {
    local live
    live=$(http -f "$FRONTEND/workers" 2>/dev/null | json "sorted(w['name'] for w in d['workers'] if w['live'])") || return 1
    [[ $live == '["w1", "w2"]' ]]
}

job_served_by() { # job_served_by JOB WORKER-JSON-LIST
    local got
    got=$(http -f "$FRONTEND/jobs" 2>/dev/null | json "sorted(next((j['workers'] for j in d['jobs'] if j['name']=='$1'), []))") || return 1
    [[ $got == "$2" ]]
}

job_description_is() {
    local got
    got=$(http -f "$FRONTEND/jobs" 2>/dev/null | json "next((j.get('description') for j in d['jobs'] if j['name']=='$1'), None)") || return 1
    [[ $got == "$2" ]]
}

run_state() { http -f "$FRONTEND/runs/$1" 2>/dev/null | json "d['state']"; }
run_ended() {
    local s
    s=$(run_state "$1") || return 1
    [[ $s == succeeded || $s == failed || $s == cancelled ]]
}

# The pid recorded by jobz-ctl for service $2 on host $1.
service_pid() { on_host "$1" cat "/run/jobz/$2.pid" 2>/dev/null || echo none; }

# --- The checks --------------------------------------------------------------------------

check_deploy() {
    say "deploying: ansible-playbook site.yml (first run)"
    # The hosts have no systemd: have this run write the units anyway, to verify them.
    if playbook site.yml deploy-1.log -e jobz_systemd_units_always=true; then
        pass "site.yml deploys broker, frontend, 2 workers and the semaphore to 4 hosts"
    else
        fail "site.yml deploys the mesh"
        show_log_tail "$WORK/deploy-1.log" 40
        return 1
    fi
}

check_units() {
    local h unit units problems="" out found=""
    command -v systemd-analyze >/dev/null || { note "systemd-analyze not installed: unit check skipped"; return 0; }
    for h in "${HOSTS[@]}"; do
        units=$(on_host "$h" sh -c 'ls /etc/systemd/system/jobz-*.service')
        for unit in $units; do
            found+="$h:${unit##*/} "
            out=$(on_host "$h" systemd-analyze verify "$unit" 2>&1) || problems+="$h $unit: $out; "
            [[ -z $out ]] || problems+="$h $unit: $out; "
            on_host "$h" grep -q '^ProtectSystem=strict' "$unit" || problems+="$h $unit: not hardened; "
        done
    done
    [[ $found == "core:jobz-broker.service core:jobz-frontend.service w1:jobz-worker.service w2:jobz-worker.service sem:jobz-semaphore.service " ]] ||
        problems+="units found: $found; "
    if [[ -z $problems ]]; then
        pass "the systemd units (broker, frontend on core; worker on w1, w2; semaphore on sem) pass systemd-analyze verify and are hardened"
    else
        fail "systemd units" "$problems"
    fi
}

check_idempotent() {
    say "second run of site.yml: nothing may change"
    local h bad=""
    if ! playbook site.yml deploy-2.log; then
        fail "a second run of site.yml succeeds"
        show_log_tail "$WORK/deploy-2.log"
        return
    fi
    for h in "${HOSTS[@]}"; do
        [[ $(recap "$WORK/deploy-2.log" "$h" changed) == 0 ]] || bad+="$h:changed=$(recap "$WORK/deploy-2.log" "$h" changed) "
    done
    if [[ -z $bad ]]; then
        pass "a second run of site.yml reports changed=0 on every host"
    else
        fail "a second run of site.yml reports changed=0" "$bad" "$(grep -B1 '^changed:' "$WORK/deploy-2.log" | head -20 | tr '\n' ' ')"
    fi
}

# Every node of the inventory is enrolled by the playbook alone: accepted, nothing
# pending; each node key is the jobz user's, mode 0600; the broker runs sealed.
# A setting of the wrong type, given with -e as an operator might: the play stops at its
# first check, naming it, and no host changes.
check_bad_setting() {
    say "a worker setting of the wrong type: the play stops before any host changes"
    local h bad="" rc=0
    playbook site.yml bad-setting.log -e jobz_worker_slots=many || rc=$?
    ((rc != 0)) || bad+="the play succeeded; "
    grep -q "argument 'jobz_worker_slots' is of type str and we were unable to convert to int" "$WORK/bad-setting.log" ||
        bad+="no message naming jobz_worker_slots; "
    grep -q '^TASK \[jobz_common : Create the jobz group' "$WORK/bad-setting.log" && bad+="the install went on; "
    for h in "${HOSTS[@]}"; do
        [[ $(recap "$WORK/bad-setting.log" "$h" changed) == 0 ]] || bad+="$h changed; "
    done
    if [[ -z $bad ]]; then
        pass "jobz_worker_slots=many stops site.yml at its first check, naming the setting; no host changed"
    else
        fail "a setting of the wrong type stops the play before any change" "$bad"
        show_log_tail "$WORK/bad-setting.log"
    fi
}

# The admin token site.yml made for the operator (inventory/credentials/): a later run
# keeps it, and gives a file someone made readable to others back to its owner alone.
check_admin_token() {
    say "the admin token: kept by later runs, its mode restored"
    local file=$WORK/inventory/credentials/jobz-admin-token before problems=""
    before=$(sha256sum "$file" 2>/dev/null) || { fail "site.yml made the admin token" "no $file"; return; }
    chmod 644 "$file"
    playbook site.yml token-mode.log --limit core --tags jobz_config || problems+="the play failed; "
    [[ $(stat -c %a "$file") == 600 ]] || problems+="mode $(stat -c %a "$file"); "
    [[ $(sha256sum "$file") == "$before" ]] || problems+="the token changed; "
    [[ $(stat -c %a "$(dirname "$file")") == 700 ]] || problems+="credentials/ is not 0700; "
    if [[ -z $problems ]]; then
        pass "the admin token survives a later run unchanged, and a 0644 token file is made 0600 again"
    else
        fail "the admin token is kept, mode 0600" "$problems"
        show_log_tail "$WORK/token-mode.log"
    fi
}

check_keys() {
    say "keys: every node enrolled, none pending; node keys 0600 and jobz's; the broker sealed"
    local listed accepted pending bad="" h role mode
    listed=$(on_host core jobz-broker keys list --keys /etc/jobz/broker-keys 2>&1) || bad+="keys list failed; "
    accepted=$(awk '/^accepted:/{s=1;next} /^[a-z]+:$/{s=0} s{print $1}' <<<"$listed" | sort | tr '\n' ' ')
    pending=$(awk '/^pending:/{s=1;next} /^[a-z]+:$/{s=0} s{print $1}' <<<"$listed" | tr '\n' ' ')
    [[ $accepted == "frontend:core semaphore:sem worker:w1 worker:w2 " ]] || bad+="accepted: '$accepted'; "
    [[ -z $pending ]] || bad+="pending: '$pending'; "
    for h in core w1 w2 sem; do
        case $h in core) role=frontend ;; sem) role=semaphore ;; *) role=worker ;; esac
        mode=$(on_host "$h" stat -c '%U %a' "/etc/jobz/keys/$role.key" 2>&1)
        [[ $mode == "jobz 600" ]] || bad+="$h $role.key: $mode; "
    done
    mode=$(on_host core stat -c '%U %a' /etc/jobz/broker-keys/broker.key 2>&1)
    [[ $mode == "jobz 600" ]] || bad+="broker.key: $mode; "
    on_host core grep -q 'sealed mode: frames are authenticated and encrypted' /var/log/jobz/broker.out ||
        bad+="the broker's log does not say sealed mode; "
    if [[ -z $bad ]]; then
        pass "jobz-broker keys list: frontend:core, semaphore:sem, worker:w1, worker:w2 accepted, none pending; keys 0600 jobz; broker log: sealed mode"
    else
        fail "the playbook enrols every node key and the broker runs sealed" "$bad" "keys list: ${listed:0:600}"
    fi
}

# The frontend listens on the network with tokens: no token is 401, a token without the
# trigger scope is 403 on /job_start; /healthz stays open.
check_http_auth() {
    say "HTTP from the client namespace: no token 401, read token on /job_start 403"
    local none wrong read_trigger read_views health
    none=$(http_status "$FRONTEND/runs")
    wrong=$(http_status -H "Authorization: Bearer jobz_not-a-token" "$FRONTEND/job_start?job_name=mh_bcast&tag=auth1")
    read_trigger=$(http_status -H "Authorization: Bearer $READ_TOKEN" "$FRONTEND/job_start?job_name=mh_bcast&tag=auth1")
    read_views=$(http_status -H "Authorization: Bearer $READ_TOKEN" "$FRONTEND/runs")
    health=$(http_status "$FRONTEND/healthz")
    if [[ $none == 401 && $wrong == 401 && $read_trigger == 403 && $read_views == 200 && $health == 200 ]]; then
        pass "no token: 401; unknown token: 401; read token: /job_start 403, /runs 200; /healthz open (200)"
    else
        fail "the frontend requires tokens with the right scope" \
            "no token $none (want 401), unknown $wrong (401), read on /job_start $read_trigger (403), read on /runs $read_views (200), /healthz $health (200)"
    fi
}

check_mesh_up() {
    say "waiting for the mesh: frontend healthy, w1 and w2 live, per-host template jobs served"
    if wait_until 30 healthy && wait_until 30 workers_live &&
        wait_until 10 job_served_by mh_where_w1 '["w1"]' && wait_until 10 job_served_by mh_where_w2 '["w2"]'; then
        pass "from the client namespace: frontend healthy, w1 and w2 live, mh_where_<host> served only by its host"
    else
        fail "the mesh comes up" "workers: $(http "$FRONTEND/workers" 2>&1 | head -c 600)" \
            "jobs: $(http "$FRONTEND/jobs" 2>&1 | head -c 600)"
        return 1
    fi
}

check_chain() {
    say "a chain across both worker hosts: mh_start -> mh_each (broadcast) -> mh_done (local)"
    local answer state each done_
    answer=$(http "$FRONTEND/job_start?job_name=mh_start&tag=chain1&wait=60") || true
    CHAIN_RUN=$(json "d.get('run_id', '')" <<<"$answer" 2>/dev/null || true)
    state=$(json "d.get('state', '')" <<<"$answer" 2>/dev/null || true)
    each=$(json "sorted(s['worker'] for s in d.get('steps', []) if s['job']=='mh_each' and s['state']=='succeeded')" <<<"$answer" 2>/dev/null || true)
    done_=$(json "sorted(s['worker'] for s in d.get('steps', []) if s['job']=='mh_done' and s['state']=='succeeded')" <<<"$answer" 2>/dev/null || true)
    if [[ $state == succeeded && $each == '["w1", "w2"]' && $done_ == '["w1", "w2"]' ]]; then
        pass "curl /job_start from the client namespace: the chain ran on w1 and w2 and succeeded (run $CHAIN_RUN)"
    else
        fail "a chain across both worker hosts completes" "state=$state mh_each on $each, mh_done on $done_" "answer: ${answer:0:800}"
    fi
}

check_worker_logs() {
    say "each worker host's worker.log, read inside the host, has the run"
    local h lines bad=""
    [[ -n ${CHAIN_RUN:-} ]] || { fail "worker logs have the run" "no run id from the chain check"; return; }
    for h in "${WORKERS[@]}"; do
        lines=$(on_host "$h" grep -F "run=$CHAIN_RUN" /var/log/jobz/worker.log 2>&1 || true)
        if ! grep -q 'job=mh_each .*finished exit=0' <<<"$lines" || ! grep -q 'job=mh_done .*finished exit=0' <<<"$lines"; then
            bad+="$h: $(head -c 400 <<<"$lines"); "
        fi
    done
    if [[ -z $bad ]]; then
        pass "/var/log/jobz/worker.log on w1 and on w2 has mh_each and mh_done of the run, finished exit=0"
    else
        fail "worker logs have the run" "$bad"
    fi
}

# Job commands run as jobz-step (jobz_worker_step_user), the worker as root: a command
# reaches its working directory by its path, and nothing of the worker's: its key, its
# settings, its log, its process's environment (mh_snoop, jobs.d/groups/workers/hygiene.yaml).
check_step_user() {
    say "job commands run as jobz-step: their directory is theirs, the worker's key, settings, log and environment are not"
    local answer run state logtext h pid owner groups bad=""
    answer=$(http "$FRONTEND/job_start?job_name=mh_snoop&wait=60") || true
    run=$(json "d.get('run_id', '')" <<<"$answer" 2>/dev/null || true)
    state=$(json "d.get('state', '')" <<<"$answer" 2>/dev/null || true)
    logtext=$(http "$FRONTEND/runs/$run/log" 2>&1 || true)
    [[ $state == succeeded ]] || bad+="run $run: state $state; "
    for h in "${WORKERS[@]}"; do
        pid=$(service_pid "$h" worker)
        owner=$(on_host "$h" stat -c %U "/proc/$pid" 2>&1)
        [[ $owner == root ]] || bad+="$h: the worker runs as $owner, not root; "
        groups=$(on_host "$h" id -Gn jobz-step 2>&1)
        [[ " $groups " != *" jobz "* ]] || bad+="$h: jobz-step is in group jobz ($groups); "
        on_host "$h" grep -qx 'User=root' /etc/systemd/system/jobz-worker.service ||
            bad+="$h: the worker's unit does not say User=root; "
        on_host "$h" grep -q '^CapabilityBoundingSet=CAP_SETUID ' /etc/systemd/system/jobz-worker.service ||
            bad+="$h: the worker's unit does not bound its capabilities; "
        grep -qx "\[$h mh_snoop\] user=jobz-step" <<<"$logtext" || bad+="$h: the command did not run as jobz-step; "
        grep -qx "\[$h mh_snoop\] workdir=ok" <<<"$logtext" || bad+="$h: the command could not reach its directory by its path; "
        grep -qx "\[$h mh_snoop\] worker=$pid" <<<"$logtext" || bad+="$h: the command did not find its worker (pid $pid); "
        [[ $(grep -c "^\[$h mh_snoop\] refused " <<<"$logtext") == 4 ]] || bad+="$h: not 4 reads refused; "
    done
    if grep -q '\] READ ' <<<"$logtext"; then bad+="read: $(grep '\] READ ' <<<"$logtext" | tr '\n' ' '); "; fi
    if [[ -z $bad ]]; then
        pass "mh_snoop on w1 and w2 ran as jobz-step (the worker as root, capabilities bounded), reached its directory by its path, and could not read worker.key, worker.env, worker.log nor the worker's /proc environ"
    else
        fail "job commands run as the step user and reach nothing of the worker's" "$bad" "log: ${logtext:0:1200}"
    fi
}

# snoop_on HOST: the lines of HOST's step of a new mh_snoop run (prefix removed).
snoop_on() {
    local answer run
    answer=$(http "$FRONTEND/job_start?job_name=mh_snoop&wait=60") || true
    run=$(json "d.get('run_id', '')" <<<"$answer" 2>/dev/null || true)
    http "$FRONTEND/runs/$run/log" 2>&1 | sed -n "s/^\[$1 mh_snoop\] //p"
}

# worker_procs HOST: "USER PID" of every jobz-worker process on HOST that is a service
# (its parent is the host's PID 1), one a line.
worker_procs() {
    on_host "$1" ps -eo user=,pid=,ppid=,comm= | awk '$4 == "jobz-worker" && $3 == 1 {print $1, $2}'
}

# step_user_phase NAME LOG OWNER [ARGS...]: site.yml --limit w2 ARGS, then w2 must have one
# worker process, OWNER's, and be live; w2's lines of a new mh_snoop run go to SNOOPED.
# Problems are added to the caller's `bad`; returns 1 if the playbook failed.
step_user_phase() {
    local name=$1 log=$2 owner=$3 procs
    shift 3
    if ! playbook site.yml "$log" --limit w2 "$@"; then
        fail "site.yml on w2 ($name)" && show_log_tail "$WORK/$log"
        return 1
    fi
    procs=$(worker_procs w2)
    [[ $procs =~ ^$owner\ [0-9]+$ ]] || bad+="$name: worker processes '$procs' (want one, $owner's); "
    wait_until 30 workers_live || bad+="$name: w2 is not live; "
    SNOOPED=$(snoop_on w2)
}

# jobz_worker_step_user "" on w2, then back: the worker changes user (one process, never
# two), takes back its spool, and the job commands' user follows.
check_step_user_switch() {
    say "jobz_worker_step_user \"\" on w2, then back: the worker switches between jobz and root"
    local bad="" off
    step_user_phase off step-user-off.log jobz -e jobz_worker_step_user= || return
    off=$SNOOPED
    grep -qx 'user=jobz' <<<"$off" || bad+="off: the command did not run as jobz; "
    grep -qx 'workdir=ok' <<<"$off" || bad+="off: no working directory; "
    grep -q '^refused /proc/.*/environ$' <<<"$off" || bad+="off: the command read its worker's environ (jobz, not dumpable); "
    step_user_phase on step-user-on.log root || return
    grep -qx 'user=jobz-step' <<<"$SNOOPED" || bad+="on: the command did not run as jobz-step; "
    [[ $(grep -c '^refused ' <<<"$SNOOPED") == 4 ]] || bad+="on: not 4 reads refused; "
    if [[ -z $bad ]]; then
        pass "jobz_worker_step_user \"\" on w2: one worker, jobz's, commands as jobz (worker's environ still refused); back: one worker, root's, commands as jobz-step"
    else
        fail "the worker switches between jobz and root with jobz_worker_step_user" "$bad" \
            "w2's mh_snoop, off: $(tr '\n' ' ' <<<"$off")" "on: $(tr '\n' ' ' <<<"$SNOOPED")"
    fi
}

# The number of mh_after runs for tag chain1 (the semaphore's `then`).
count_after() {
    http -f "$FRONTEND/runs?job=mh_after&limit=1000" |
        json "len([r for r in d['runs'] if r.get('params', {}).get('tag')=='chain1'])"
}
semaphore_fired() { (($(count_after 2>/dev/null || echo 0) >= 1)); }

check_semaphore() {
    if [[ ${JOBZ_TEST_SEMAPHORE:-0} != 1 ]]; then
        note "semaphore check skipped (set JOBZ_TEST_SEMAPHORE=1 once semaphore counting exists)"
        return
    fi
    say "the semaphore fires once: one mh_after run for tag chain1"
    local count
    wait_until 30 semaphore_fired || true
    sleep 5 # a second firing would show by now
    count=$(count_after 2>/dev/null || echo "?")
    if [[ $count == 1 ]]; then
        pass "the semaphore mh_all_done fired exactly once (one mh_after run)"
    else
        fail "the semaphore fires once" "mh_after runs for tag chain1: $count"
    fi
}

# A failing job with `notify:`: the broker, given its notify file and the secret by the
# role (jobz_broker_notify, jobz_broker_notify_secrets), posts the failure, signed, to a
# receiver in the client namespace.
check_notify() {
    say "a failing job with notify: the broker posts it to the inventory's webhook, signed"
    local out=$WORK/webhook.jsonl pid answer run got problems=""
    : >"$out"
    ip netns exec "$CLIENT" python3 "$HERE/webhook.py" "$CLIENT_IP" 8088 "$WORK/webhook.secret" "$out" \
        >"$WORK/webhook.log" 2>&1 &
    pid=$!
    if ! wait_until 10 ip netns exec "$CLIENT" nc -z "$CLIENT_IP" 8088; then
        fail "the webhook receiver listens" "$(cat "$WORK/webhook.log")"
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        return
    fi
    answer=$(http "$FRONTEND/job_start?job_name=mh_notified&wait=30") || true
    run=$(json "d.get('run_id', '')" <<<"$answer" 2>/dev/null || true)
    [[ -n $run ]] && wait_until 30 grep -qF "\"run_id\": \"$run\"" "$out"
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    got=$(grep -F "\"run_id\": \"$run\"" "$out" | head -1)
    [[ -n $run && -n $got ]] || problems+="no POST for run '$run' (answer: ${answer:0:200}); "
    if [[ -n $got ]]; then
        [[ $(json "[d['path'], d['event'], d['signed'], d['job'], d['state']]" <<<"$got") == \
            '["/hook", "run.failed", true, "mh_notified", "failed"]' ]] || problems+="the POST: $got; "
    fi
    [[ $(on_host core stat -c '%U:%G %a' /etc/jobz/notify.yaml /etc/jobz/notify-secrets/mh | sort -u) == "root:jobz 640" ]] ||
        problems+="notify.yaml and its secret are not root:jobz 0640; "
    if [[ -z $problems ]]; then
        pass "mh_notified failed and the broker posted run.failed for run $run to the inventory's webhook, signed with its secret; notify.yaml and the secret are root:jobz 0640"
    else
        fail "the broker tells the inventory's webhook of a failure" "$problems"
    fi

    # A broken notify file, pushed with --tags jobz_config: jobz-broker --check refuses it,
    # the broker's file stays as it was and the broker is not restarted.
    local before pid_before rc=0
    problems=""
    before=$(on_host core sha256sum /etc/jobz/notify.yaml)
    pid_before=$(service_pid core broker)
    playbook site.yml notify-broken.log --limit core --tags jobz_config \
        -e '{"jobz_broker_notify": {"webhooks": {"mh": {"url": "ftp://10.251.77.20/hook", "secret_file": "/etc/jobz/notify-secrets/mh"}}}}' ||
        rc=$?
    ((rc != 0)) || problems+="the play succeeded; "
    grep -q "must be http:// or https://" "$WORK/notify-broken.log" || problems+="no reason from jobz-broker --check; "
    [[ $(on_host core sha256sum /etc/jobz/notify.yaml) == "$before" ]] || problems+="notify.yaml changed; "
    [[ $(service_pid core broker) == "$pid_before" ]] || problems+="the broker restarted; "
    if [[ -z $problems ]]; then
        pass "a broken notify file (--tags jobz_config) fails the play with jobz-broker --check's reason; the broker's file and process stay"
    else
        fail "a broken notify file is refused before it reaches the broker" "$problems"
        show_log_tail "$WORK/notify-broken.log"
    fi
}

check_operator_playbooks() {
    say "trigger.yml and logs.yml"
    local run
    if playbook trigger.yml trigger.log -e job=mh_where_w2 -e wait=30 -e jobz_api_from=localhost; then
        run=$(sed -n 's/.*"run_id": "\([^"]*\)".*/\1/p' "$WORK/trigger.log" | head -1)
        if [[ -n $run ]] && playbook logs.yml logs.log -e "run=$run" &&
            grep -q "run=$run .*job=mh_where_w2 .*finished exit=0" "$WORK/logs.log"; then
            pass "trigger.yml ran mh_where_w2 (run $run); logs.yml shows its lines from w2's worker.log"
        else
            fail "logs.yml shows a run's lines" "run=$run"
            show_log_tail "$WORK/logs.log"
        fi
    else
        fail "trigger.yml starts a job and waits for it"
        show_log_tail "$WORK/trigger.log"
    fi
}

check_outage() {
    say "w2's link down, a broadcast triggered, the link up after 5 s: the step runs on w2"
    local answer run state tasks lines
    ip link set jzt-v-w2 down
    answer=$(http "$FRONTEND/job_start?job_name=mh_bcast&tag=outage1") || true
    run=$(json "d.get('run_id', '')" <<<"$answer" 2>/dev/null || true)
    sleep 5
    ip link set jzt-v-w2 up
    if [[ -z $run ]]; then
        fail "a broadcast during w2's outage is accepted" "answer: $answer"
        return
    fi
    wait_until 60 run_ended "$run" || true
    answer=$(http "$FRONTEND/runs/$run" 2>&1 || true)
    state=$(json "d.get('state', '')" <<<"$answer" 2>/dev/null || true)
    tasks=$(json "sorted(s['worker'] + ':' + s['state'] for s in d.get('steps', []))" <<<"$answer" 2>/dev/null || true)
    lines=$(on_host w2 grep -F "run=$run" /var/log/jobz/worker.log 2>&1 || true)
    if [[ $state == succeeded && $tasks == '["w1:succeeded", "w2:succeeded"]' ]] && grep -q 'finished exit=0' <<<"$lines"; then
        pass "a broadcast triggered while w2's link was down ran on w2 once it came back (run $run)"
    else
        fail "a broadcast reaches a worker whose link was down for 5 s" "run $run: state=$state tasks=$tasks" \
            "w2 worker.log: ${lines:0:500}" "run: ${answer:0:800}"
    fi
}

# The pids of every service on every host ("broker/frontend/worker/semaphore" per host).
all_pids() {
    local h
    for h in "${HOSTS[@]}"; do
        printf '%s=%s/%s/%s/%s ' "$h" "$(service_pid "$h" broker)" "$(service_pid "$h" frontend)" \
            "$(service_pid "$h" worker)" "$(service_pid "$h" semaphore)"
    done
}

# One run with a broken job file and a changed one: nothing of it reaches a host (the
# whole staged jobs.d is validated). Then the broken file goes, and the next run changes
# the workers only, restarts nothing, and the new definition is in force.
check_job_files() {
    say "a broken job file beside a changed one: the play fails, neither reaches a host"
    local jobs=$WORK/inventory/jobs.d/groups/workers h bad="" rc=0 pids answer run logtext
    pids=$(all_pids)
    printf 'jobs:\n  - name: mh_broken\n    command: [unclosed\n' >"$jobs/broken.yaml"
    sed -i 's/v1/v2/g' "$jobs/changing.yaml"
    playbook site.yml deploy-3.log --limit workers || rc=$?
    ((rc != 0)) || bad+="the playbook succeeded; "
    for h in w1 w2; do
        [[ $(recap "$WORK/deploy-3.log" "$h" failed) == 1 ]] || bad+="$h did not fail; "
        on_host "$h" test -e /etc/jobz/jobs.d/broken.yaml && bad+="broken.yaml reached $h; "
        on_host "$h" grep -q v1 /etc/jobz/jobs.d/changing.yaml || bad+="changing.yaml on $h is not v1; "
    done
    grep -q 'did not find expected' "$WORK/deploy-3.log" || bad+="the check's reason is not in the output; "
    workers_live || bad+="the workers are not live; "
    job_description_is mh_version "definition v1" || bad+="mh_version is not v1 any more; "
    if [[ -z $bad ]]; then
        pass "jobz-worker --check failed the play on w1 and w2; their jobs.d kept the good files, the workers kept serving"
    else
        fail "a broken job file never reaches a host" "$bad"
        show_log_tail "$WORK/deploy-3.log"
    fi

    say "the broken file removed, pushed with --tags jobz_jobs: only the workers change, nothing restarts, v2 is in force"
    rm -f "$jobs/broken.yaml"
    bad=""
    if ! playbook site.yml deploy-4.log --tags jobz_jobs; then
        fail "site.yml after the job file change"
        show_log_tail "$WORK/deploy-4.log"
        return
    fi
    for h in w1 w2; do
        (($(recap "$WORK/deploy-4.log" "$h" changed) > 0)) || bad+="$h did not change; "
    done
    for h in core sem; do
        [[ $(recap "$WORK/deploy-4.log" "$h" changed) == 0 ]] || bad+="$h changed; "
    done
    [[ $(all_pids) == "$pids" ]] || bad+="a service restarted: $pids -> $(all_pids); "
    if [[ -z $bad ]]; then
        pass "the job file change (--tags jobz_jobs) changed w1 and w2 only (core, sem: changed=0) and restarted no service"
    else
        fail "a job file change changes only the workers" "$bad"
    fi
    if wait_until 15 job_description_is mh_version "definition v2"; then
        answer=$(http "$FRONTEND/job_start?job_name=mh_version&wait=30") || true
        run=$(json "d.get('run_id', '')" <<<"$answer" 2>/dev/null || true)
        logtext=$(http "$FRONTEND/runs/$run/log" 2>&1 || true)
        if grep -q "mh_version v2" <<<"$logtext"; then
            pass "GET /jobs shows the new definition and a run of it prints v2"
        else
            fail "the changed job runs its new command" "log of run $run: ${logtext:0:400}"
        fi
    else
        fail "GET /jobs shows the changed definition" "$(http "$FRONTEND/jobs" 2>&1 | head -c 800)"
    fi
}

# Both workers run a 4 s step (mh_slow) when the rolling restart begins: each must drain
# (finish it) before it stops, so the run succeeds; each restarted worker must be back in
# /workers before the next goes, and the mesh must work afterwards.
check_rolling_restart() {
    say "rolling_restart.yml while a 4 s broadcast runs: each worker drains, comes back, then the next"
    local before1 before2 after1 after2 answer slow state tasks
    before1=$(service_pid w1 worker)
    before2=$(service_pid w2 worker)
    answer=$(http "$FRONTEND/job_start?job_name=mh_slow&tag=drain1") || true
    slow=$(json "d.get('run_id', '')" <<<"$answer" 2>/dev/null || true)
    sleep 1
    if ! playbook rolling_restart.yml rolling.log -e jobz_api_from=localhost; then
        fail "rolling_restart.yml succeeds"
        show_log_tail "$WORK/rolling.log"
        return
    fi
    after1=$(service_pid w1 worker)
    after2=$(service_pid w2 worker)
    wait_until 30 run_ended "$slow" || true
    answer=$(http "$FRONTEND/runs/$slow" 2>&1 || true)
    state=$(json "d.get('state', '')" <<<"$answer" 2>/dev/null || true)
    tasks=$(json "sorted(s['worker'] + ':' + s['state'] for s in d.get('steps', []))" <<<"$answer" 2>/dev/null || true)
    if [[ $after1 != "$before1" && $after2 != "$before2" && $after1 != none && $after2 != none &&
        $(grep -c 'ok: \[w[12] -> localhost\]' "$WORK/rolling.log") == 4 &&
        $state == succeeded && $tasks == '["w1:succeeded", "w2:succeeded"]' ]]; then
        pass "rolling_restart.yml restarted w1 then w2 (pids $before1->$after1, $before2->$after2); both drained: the 4 s step running on them succeeded"
    else
        fail "rolling_restart.yml drains and restarts each worker" "w1 $before1->$after1 w2 $before2->$after2" \
            "mh_slow run $slow: state=$state tasks=$tasks"
        show_log_tail "$WORK/rolling.log"
        return
    fi
    answer=$(http "$FRONTEND/job_start?job_name=mh_bcast&tag=rolled&wait=30") || true
    state=$(json "d.get('state', '')" <<<"$answer" 2>/dev/null || true)
    if [[ $state == succeeded ]]; then
        pass "after the rolling restart a broadcast succeeds on both workers"
    else
        fail "a broadcast after the rolling restart succeeds" "${answer:0:600}"
    fi
}

check_lint() {
    if [[ ${JOBZ_MH_LINT:-1} == 0 ]]; then
        note "ansible-lint skipped (JOBZ_MH_LINT=0)"
        return
    fi
    say "ansible-lint (production profile)"
    local rc=0 started=$SECONDS
    background "$WORK/lint.log" env -C "$ANSIBLE_SRC" ansible-lint --profile production || rc=$?
    note "ansible-lint: exit $rc in $((SECONDS - started)) s"
    if ((rc == 0)); then
        pass "ansible-lint passes at the production profile"
    else
        fail "ansible-lint at the production profile"
        show_log_tail "$WORK/lint.log" 40
    fi
}

# JOBZ_MH_HOLD=1: keep the deployed mesh up for a look around until interrupted.
hold() {
    {
        printf 'export %s=%q\n' ANSIBLE_CONFIG "$ANSIBLE_CONFIG" ANSIBLE_HOME "$ANSIBLE_HOME" \
            ANSIBLE_LOCAL_TEMP "$ANSIBLE_LOCAL_TEMP" ANSIBLE_REMOTE_TEMP "$ANSIBLE_REMOTE_TEMP" \
            ANSIBLE_SSH_CONTROL_PATH_DIR "$ANSIBLE_SSH_CONTROL_PATH_DIR" ANSIBLE_BECOME False \
            ANSIBLE_NOCOLOR 1 XDG_CACHE_HOME "$XDG_CACHE_HOME" PATH "$PATH"
        printf 'JOBZ_MH_PLAYBOOK_ARGS=(%s)\n' "$(printf '%q ' "${PLAYBOOK_ARGS[@]}")"
        printf 'JOBZ_MH_TOKEN=%q # curl -H "Authorization: Bearer $JOBZ_MH_TOKEN" ...\n' "$TOKEN"
        for h in "${HOSTS[@]}"; do printf 'JOBZ_MH_HOST_PID_%s=%s\n' "$h" "$(host_pid "$h")"; done
    } >"$WORK/env.sh"
    say "holding the mesh (JOBZ_MH_HOLD=1): . $WORK/env.sh; interrupt this script to tear down"
    sleep infinity &
    HOLD_PID=$!
    wait "$HOLD_PID"
}

# The README's walkthrough (check_readme_walkthrough) and fresh hosts after it (reset_hosts).
# shellcheck source=tests/multihost/walkthrough.sh
. "$HERE/walkthrough.sh"

# --- Main ------------------------------------------------------------------------------

need_root
exec 9>/run/jobz-multihost.lock
flock -n 9 || { echo "another tests/multihost/run.sh is running" >&2; exit 1; }
install_packages
setup_ansible
build
T0=$SECONDS
trap cleanup EXIT
trap 'exit 130' INT TERM
WORK=$(mktemp -d /tmp/jobz-multihost.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/ssh" "$WORK/hosts"
stage_binaries
make_tokens
ssh-keygen -q -t ed25519 -N '' -C jobz-multihost -f "$WORK/ssh/id_ed25519"
cp "$WORK/ssh/id_ed25519.pub" "$WORK/ssh/authorized_keys"
: >"$WORK/ssh/known_hosts"

say "network: bridge $BRIDGE $NET.1/24, hosts ${HOSTS[*]} and the client namespace"
make_network
for h in "${HOSTS[@]}"; do start_host "$h"; done
wait_for_sshd
write_ansible_config

# Each check reports its own failure; none may stop the others (or the teardown).
set +e
if [[ ${JOBZ_MH_WALKTHROUGH:-1} != 0 ]]; then
    check_readme_walkthrough
    say "fresh hosts for the test's own inventory"
    reset_hosts
fi
if check_deploy; then
    if [[ ${JOBZ_MH_HOLD:-0} == 1 ]]; then
        hold
    fi
    check_units
    check_idempotent
    check_bad_setting
    check_admin_token
    if check_mesh_up; then
        check_keys
        check_http_auth
        check_chain
        check_worker_logs
        check_step_user
        check_semaphore
        check_operator_playbooks
        check_notify
        check_outage
        check_job_files
        check_rolling_restart
        check_step_user_switch
    fi
fi
check_lint
say "done"
summary
((FAILED == 0))
