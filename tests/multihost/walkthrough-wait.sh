# Sourced by the walkthrough's script (tests/multihost/walkthrough.sh), not by the README:
# waits until run $1 has started runs and every one of them has ended (at most 60 s),
# asking the frontend with the admin token ($TOKEN, set by the README's lines before).
jobz_wt_family_ended() {
    local deadline=$((SECONDS + 60)) children child state ok
    local front=http://jobz-core.example.net:6769
    while ((SECONDS < deadline)); do
        ok=1
        children=$(curl -sS -H "Authorization: Bearer $TOKEN" "$front/runs/$1" |
            python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin).get("child_runs", [])))') || ok=0
        [[ -n $children ]] || ok=0
        for child in $children; do
            state=$(curl -sS -H "Authorization: Bearer $TOKEN" "$front/runs/$child" |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])') || ok=0
            [[ $state == succeeded || $state == failed || $state == cancelled ]] || ok=0
        done
        ((ok)) && return 0
        sleep 0.5
    done
    echo "the runs started from run $1 did not all end within 60 s" >&2
    return 1
}
