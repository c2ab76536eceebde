# Sourced by run.sh: the README's deployment walkthrough, run as it is written.
#
# The lines of the README's block between the `multihost: walkthrough` and `multihost: end`
# markers run on fresh hosts, from a copy of the example inventory to a triggered run and
# its log lines. What the test provides is what an operator brings: an editor that puts
# the hosts' addresses in the inventory (the names stay the example's), names that resolve
# (a private /etc/hosts), SSH access, and the run id curl printed in place of RUN_ID.
# Before logs.yml it waits until the runs started from the run (the semaphore's
# publish_site) have ended: an operator reads the log later.

# The block's lines, as a script: RUN_ID becomes the run id of curl's answer.
walkthrough_script() {
    local block=$1 line
    printf 'set -euo pipefail\n'
    while IFS= read -r line; do
        if [[ $line == *RUN_ID* ]]; then
            # shellcheck disable=SC2016 # for the script, not expanded here
            printf '%s\n' \
                'RUN_ID=$(grep -o "\"run_id\":\"[^\"]*\"" "$JOBZ_WT_LOG" | head -1 | cut -d\" -f4)' \
                'jobz_wt_family_ended "$RUN_ID"'
            line=${line//RUN_ID/\$RUN_ID}
        fi
        printf '%s\n' "$line"
    done <<<"$block"
}

# The editor: the example's addresses become the test hosts'; the names stay.
walkthrough_editor() {
    printf '#!/bin/sh\nexec sed -i'
    printf " -e 's/ansible_host=10\\\\.0\\\\.0\\\\.%s\\\\b/ansible_host=%s/'" \
        10 "${IP[core]}" 21 "${IP[w1]}" 31 "${IP[w2]}" 32 "${IP[sem]}"
    printf ' "$1"\n'
}

check_readme_walkthrough() {
    local block wt=$WORK/walkthrough rc=0 started=$SECONDS answer line state problems=""
    say "the README's deployment walkthrough, as written (release build, example inventory)"
    block=$(sed -n '/<!-- multihost: walkthrough/,/<!-- multihost: end -->/p' "$ROOT/README.md" |
        sed -n '/^```sh$/,/^```$/p' | sed '1d;$d')
    if [[ -z $block || $block != *site.yml* || $block != *RUN_ID* ]]; then
        fail "the README has the deployment walkthrough between its markers" "${block:0:300}"
        return 1
    fi
    mkdir -p "$wt/home"
    walkthrough_editor >"$wt/editor"
    chmod 755 "$wt/editor"
    # The names the example uses, as the operator's DNS would resolve them.
    {
        cat /etc/hosts
        printf '%s jobz-core.example.net\n%s db1.example.net\n%s search1.example.net\n%s search2.example.net\n' \
            "${IP[core]}" "${IP[w1]}" "${IP[w2]}" "${IP[sem]}"
    } >"$wt/hosts"
    walkthrough_script "$block" >"$wt/script.sh"
    cp "$HERE/walkthrough-wait.sh" "$wt/wait.sh"
    note "running $(grep -c . <<<"$block") lines of README.md (log: walkthrough/log)"
    # A private mount namespace for the /etc/hosts above; HOME for ~/jobz-mesh (cargo and
    # rustup keep theirs); become by su (the test hosts have no sudo); the release build
    # in the repository's own target/, where jobz_bin_dir looks by default.
    background "$wt/log" env -C "$ROOT" -u CARGO_TARGET_DIR \
        HOME="$wt/home" CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}" RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" \
        EDITOR="$wt/editor" ANSIBLE_BECOME_METHOD=su JOBZ_WT_LOG="$wt/log" \
        unshare --mount --propagation private \
        bash -c 'mount --bind "$1" /etc/hosts && . "$2" && . "$3"' \
        jobz-walkthrough "$wt/hosts" "$wt/wait.sh" "$wt/script.sh" || rc=$?
    note "walkthrough: exit $rc in $((SECONDS - started)) s"
    if ((rc != 0)); then
        fail "the README's deployment walkthrough runs as written"
        show_log_tail "$wt/log" 40
        return 1
    fi
    answer=$(grep -m1 '"run_id"' "$wt/log" || true)
    state=$(json "d.get('state', '')" <<<"$answer" 2>/dev/null || true)
    [[ $state == succeeded ]] || problems+="curl's answer is not a succeeded run: ${answer:0:300}; "
    [[ $(stat -c %a "$wt/home/jobz-mesh/credentials/jobz-admin-token" 2>/dev/null) == 600 ]] ||
        problems+="the admin token is not a file of mode 0600; "
    [[ $(stat -c %a "$wt/home/jobz-mesh/credentials" 2>/dev/null) == 700 ]] ||
        problems+="credentials/ is not mode 0700; "
    for line in 'job=import_dump attempt=1 worker=db1.example.net' \
        'job=reindex attempt=1 worker=db1.example.net' 'job=reindex attempt=1 worker=search1.example.net' \
        'job=warm_cache attempt=1 worker=search2.example.net' 'job=publish_site attempt=1'; do
        grep -q "$line.*finished" "$wt/log" || problems+="logs.yml shows no line '$line … finished'; "
    done
    if [[ -z $problems ]]; then
        pass "the README's walkthrough works as written: example inventory copied, site.yml, an admin token (0600), curl runs import_dump to success on 3 workers, logs.yml -e run= shows its lines and those of the semaphore's publish_site run"
    else
        fail "the README's walkthrough as written" "$problems"
        show_log_tail "$wt/log" 30
    fi
}

# Fresh hosts for the rest of the test: each host's sshd (PID 1 of its PID namespace, and
# with it everything the walkthrough deployed) is killed, its overlays deleted, and it
# starts again with the same SSH host key.
reset_hosts() {
    local h
    stop_hosts
    for h in "${HOSTS[@]}"; do rm -rf "$WORK/hosts/$h/ovl" "$WORK/hosts/$h/root"; done
    : >"$WORK/ssh/known_hosts"
    for h in "${HOSTS[@]}"; do start_host "$h"; done
    wait_for_sshd
}
