#!/usr/bin/env bash
# Audits the dependency tree with cargo deny (deny.toml): licences, bans and sources from
# Cargo.lock alone; then advisories (RustSec), from a snapshot of the advisory database.
# Fails on any finding, and when no database can be found.
#
#   scripts/audit.sh
#
# The advisory database, the first of:
#   JOBZ_ADVISORY_DB=PATH      a newer copy: a git bundle of github.com/rustsec/advisory-db,
#                              or a directory holding advisory-db-* (a copy of
#                              ~/.cargo/advisory-dbs; where GitHub can be reached, it is
#                              brought up to date first);
#   JOBZ_ADVISORY_BUNDLE=FILE  the snapshot the project keeps, by default
#                              ../shared/data/rustsec-advisory-db.bundle beside the
#                              repository (or beside the main checkout of a git worktree;
#                              see that directory's README.md).
# The bundle is cloned into a temporary directory and checked with --offline; the
# snapshot's date (its commit date) is printed. With no database at all the script fails,
# unless JOBZ_ALLOW_NO_ADVISORIES=1 (then it says loudly that advisories were not
# checked). Installs cargo-deny from crates.io if missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

step() { printf '\n==> %s\n' "$*"; }

# The directory name cargo deny 0.20 gives the default database (a hash of its URL); it
# names the one it wants in its error if a later version changes it.
db_name=${JOBZ_ADVISORY_DB_NAME:-advisory-db-3157b0e258782691}
# The project's snapshot, beside the repository; for a git worktree elsewhere, beside its
# main checkout.
bundle=${JOBZ_ADVISORY_BUNDLE:-}
if [[ -z $bundle ]]; then
    bundle=$root/../shared/data/rustsec-advisory-db.bundle
    common=$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
    if [[ ! -f $bundle && $common == */.git ]]; then
        beside_main=${common%/.git}/../shared/data/rustsec-advisory-db.bundle
        if [[ -f $beside_main ]]; then bundle=$beside_main; fi
    fi
fi

if ! cargo deny --version >/dev/null 2>&1; then
    step "cargo install cargo-deny --locked"
    cargo install cargo-deny --locked
fi

step "cargo deny check licenses bans sources"
cargo deny check licenses bans sources

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# Clones the bundle $1 into $scratch as cargo deny's database; prints the directory.
from_bundle() {
    git -c init.defaultBranch=main clone --quiet "$1" "$scratch/$db_name" >&2 ||
        { echo "audit: cannot clone the advisory database bundle $1" >&2; return 1; }
    printf '%s\n' "$scratch"
}

# Which database: db_dir is the db-path for cargo deny, source says where it came from.
fetch=(--offline)
if [[ -n ${JOBZ_ADVISORY_DB:-} && -f $JOBZ_ADVISORY_DB ]]; then
    db_dir=$(from_bundle "$JOBZ_ADVISORY_DB")
    source="the bundle $JOBZ_ADVISORY_DB (JOBZ_ADVISORY_DB)"
elif [[ -n ${JOBZ_ADVISORY_DB:-} ]]; then
    mkdir -p "$JOBZ_ADVISORY_DB"
    db_dir=$JOBZ_ADVISORY_DB
    if timeout 30 git ls-remote https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
        fetch=()
        source="GitHub, into $JOBZ_ADVISORY_DB (JOBZ_ADVISORY_DB)"
    elif compgen -G "$JOBZ_ADVISORY_DB/advisory-db-*" >/dev/null; then
        source="the copy in $JOBZ_ADVISORY_DB (JOBZ_ADVISORY_DB)"
    else
        echo "audit: JOBZ_ADVISORY_DB=$JOBZ_ADVISORY_DB holds no advisory-db-* and GitHub cannot be reached" >&2
        exit 1
    fi
elif [[ -f $bundle ]]; then
    db_dir=$(from_bundle "$bundle")
    source="the bundle $(realpath "$bundle")"
else
    step "cargo deny check advisories"
    echo "!!! no advisory database: no bundle at $bundle and JOBZ_ADVISORY_DB is not set"
    echo "!!! (see scripts/audit.sh; ../shared/data/README.md describes the bundle)"
    if [[ ${JOBZ_ALLOW_NO_ADVISORIES:-0} == 1 ]]; then
        echo "!!! ADVISORIES NOT CHECKED (JOBZ_ALLOW_NO_ADVISORIES=1)"
        exit 0
    fi
    exit 1
fi

# deny.toml with db-path pointing at the database (the path is a TOML basic string).
config=$scratch/deny.toml
escaped=${db_dir//\\/\\\\}
sed "/^\[advisories\]/a db-path = \"${escaped//\"/\\\"}\"" deny.toml >"$config"

# The snapshot's date: the commit date of each database copy in db_dir.
snapshot_dates() {
    local db when
    for db in "$db_dir"/advisory-db-*; do
        if when=$(git -C "$db" log -1 --format='%cd, commit %h' --date=short 2>/dev/null); then
            echo "advisory database snapshot of $when ($db)"
        else
            echo "advisory database $db: date unknown (not a git checkout)"
        fi
    done
}

step "cargo deny check advisories (database: $source)"
rc=0
if ((${#fetch[@]})); then
    snapshot_dates
    cargo deny "${fetch[@]}" --config "$config" check advisories || rc=$?
else
    cargo deny --config "$config" check advisories || rc=$?
    snapshot_dates # as fetched
fi
if ((rc != 0)); then
    echo "audit: cargo deny check advisories found problems (exit $rc)" >&2
fi
exit "$rc"
