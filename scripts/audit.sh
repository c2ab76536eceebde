#!/usr/bin/env bash
# Audits the dependency tree with cargo deny (deny.toml): licences, bans and sources from
# Cargo.lock alone; then advisories (RustSec), which need the advisory database.
#
#   scripts/audit.sh
#
# The database is cloned from github.com/rustsec/advisory-db. Where GitHub cannot be
# reached, point JOBZ_ADVISORY_DB at a copy: a directory filled on a connected machine by
# `JOBZ_ADVISORY_DB=DIR scripts/audit.sh` (or a copy of ~/.cargo/advisory-dbs). Without
# database, the advisories step prints "ADVISORIES NOT CHECKED" and passes, unless
# JOBZ_REQUIRE_ADVISORIES=1 (then it fails). Installs cargo-deny from crates.io if missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

if ! cargo deny --version >/dev/null 2>&1; then
    step "cargo install cargo-deny --locked"
    cargo install cargo-deny --locked
fi

step "cargo deny check licenses bans sources"
cargo deny check licenses bans sources

# Which database, if any: a given copy, GitHub, or (stale but better than none) the one a
# previous run cloned.
default_db=${CARGO_HOME:-$HOME/.cargo}/advisory-dbs
config=deny.toml
fetch=()
if [[ -n ${JOBZ_ADVISORY_DB:-} ]]; then
    mkdir -p "$JOBZ_ADVISORY_DB"
    config=$(mktemp)
    trap 'rm -f "$config"' EXIT
    # deny.toml with db-path pointing at the copy (the path is a TOML basic string).
    db_path=${JOBZ_ADVISORY_DB//\\/\\\\}
    sed "/^\[advisories\]/a db-path = \"${db_path//\"/\\\"}\"" deny.toml >"$config"
    if timeout 30 git ls-remote https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
        source="GitHub, into $JOBZ_ADVISORY_DB"
    elif compgen -G "$JOBZ_ADVISORY_DB/advisory-db-*" >/dev/null; then
        source="the copy in $JOBZ_ADVISORY_DB"
        fetch=(--offline)
    else
        source=""
    fi
elif timeout 30 git ls-remote https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
    source="GitHub"
elif compgen -G "$default_db/advisory-db-*" >/dev/null; then
    source="the copy in $default_db (GitHub unreachable: it may be stale)"
    fetch=(--offline)
else
    source=""
fi

if [[ -z $source ]]; then
    step "cargo deny check advisories"
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    echo "!!! ADVISORIES NOT CHECKED: advisory database unreachable"
    echo "!!! (github.com/rustsec/advisory-db cannot be reached and no local copy was found;"
    echo "!!!  set JOBZ_ADVISORY_DB to a copy, see scripts/audit.sh)"
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    if [[ ${JOBZ_REQUIRE_ADVISORIES:-0} == 1 ]]; then
        echo "failing: JOBZ_REQUIRE_ADVISORIES=1" >&2
        exit 1
    fi
    exit 0
fi

step "cargo deny check advisories (database: $source)"
cargo deny "${fetch[@]}" --config "$config" check advisories
