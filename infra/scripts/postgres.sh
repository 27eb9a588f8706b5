#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on loopback for the team servers (MLflow, Prefect), as the
# integration tests and a one-machine trial use it. Not a production database: durability is
# traded for speed (fsync off), and it lives in the folder it is given.
#
#   infra/scripts/postgres.sh install                    # Debian's package, if missing (root)
#   infra/scripts/postgres.sh start DIR [PORT] [DB ...]  # initdb if new, start, create DBs
#   infra/scripts/postgres.sh stop DIR                   # fast shutdown (data kept)
#   infra/scripts/postgres.sh status DIR                 # exit 0 when running
#
# Exit codes: 0 done, 1 error, 2 usage, 3 not running (status), 4 PostgreSQL missing and not
# installable here (not root, or no apt-get).
#
# `start` installs PostgreSQL first if needed, creates the cluster in DIR on first use, starts
# it on 127.0.0.1:PORT (default 5432) and creates the login role $SYNTHDX_PG_USER (default
# synthdx, password $SYNTHDX_PG_PASSWORD, default synthdx) owning the databases DB ...
# (default: mlflow prefect). Everything is idempotent: running it again on a running cluster
# only adds what is missing. The superuser is reachable only through the Unix socket in DIR,
# by the system user that owns the cluster (postgres when run as root: PostgreSQL refuses to
# run as root); the role above connects over TCP with its password:
#   postgresql://synthdx:synthdx@127.0.0.1:PORT/mlflow
# Binaries: $PG_BINDIR, else the newest /usr/lib/postgresql/*/bin, else `pg_config --bindir`,
# else initdb on PATH.
set -euo pipefail

ROLE=${SYNTHDX_PG_USER:-synthdx}
PASSWORD=${SYNTHDX_PG_PASSWORD:-synthdx}

die() { echo "postgres.sh: error: $*" >&2; exit 1; }
# Exit code 4: PostgreSQL is missing and cannot be installed here (a caller may skip).
missing() { echo "postgres.sh: error: $*" >&2; exit 4; }
say() { echo "postgres.sh: $*" >&2; }

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

find_bindir() {
    local dir
    if [[ -n ${PG_BINDIR:-} ]]; then
        [[ -x $PG_BINDIR/initdb ]] || die "PG_BINDIR=$PG_BINDIR has no initdb"
        echo "$PG_BINDIR"; return 0
    fi
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $dir && -x $dir/initdb ]]; then echo "$dir"; return 0; fi
    if command -v pg_config >/dev/null 2>&1; then
        dir=$(pg_config --bindir 2>/dev/null || true)
        if [[ -n $dir && -x $dir/initdb ]]; then echo "$dir"; return 0; fi
    fi
    if command -v initdb >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v initdb)")"; return 0
    fi
    return 1
}

install_postgres() {
    if find_bindir >/dev/null; then
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || missing "PostgreSQL is not installed and this is not root: run" \
        "'apt-get install -y postgresql' as root (or set PG_BINDIR to its bin folder)"
    command -v apt-get >/dev/null 2>&1 || missing "PostgreSQL is not installed and there is no" \
        "apt-get here: install PostgreSQL and set PG_BINDIR to its bin folder"
    say "installing Debian's postgresql package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null \
        || die "apt-get install postgresql failed"
    find_bindir >/dev/null || die "postgresql installed but no initdb found under" \
        "/usr/lib/postgresql/*/bin"
}

# as_owner CMD ...: run CMD as the cluster's system user (postgres when we are root).
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

prepare_dir() {
    local dir=$1
    if [[ $(id -u) -eq 0 ]]; then
        getent passwd postgres >/dev/null || die "no 'postgres' system user (Debian's" \
            "package creates it): PostgreSQL refuses to run as root"
        command -v runuser >/dev/null 2>&1 || die "runuser (util-linux) is needed to run" \
            "PostgreSQL as the postgres user"
        mkdir -p "$dir"
        chown postgres: "$dir"
    else
        mkdir -p "$dir"
    fi
    chmod 700 "$dir"
    as_owner test -w "$dir" -a -x "$dir" || die "$dir: the $(owner_name) user cannot write" \
        "there: every folder above it must be searchable by that user (chmod o+x)"
}

owner_name() { if [[ $(id -u) -eq 0 ]]; then echo postgres; else id -un; fi; }

running_port() {  # the port of the postmaster running on DIR, or nothing
    local dir=$1 bindir=$2
    if as_owner "$bindir/pg_ctl" status -D "$dir" >/dev/null 2>&1; then
        sed -n 4p "$dir/postmaster.pid"
    fi
}

psql_admin() {  # psql as the superuser over the socket in DIR; SQL on stdin
    local dir=$1 port=$2 bindir=$3; shift 3
    as_owner "$bindir/psql" -h "$dir" -p "$port" -d postgres -X -q -v ON_ERROR_STOP=1 "$@"
}

start() {
    [[ $# -ge 1 ]] || usage
    local dir port bindir current
    dir=$(realpath -m "$1"); port=${2:-5432}; shift $(( $# >= 2 ? 2 : 1 ))
    local dbs=("$@"); [[ ${#dbs[@]} -gt 0 ]] || dbs=(mlflow prefect)
    [[ $port =~ ^[0-9]+$ ]] && (( port > 0 && port < 65536 )) || die "bad port '$port'"
    for db in "${dbs[@]}" "$ROLE"; do
        [[ $db =~ ^[a-z_][a-z0-9_]*$ ]] || die "bad name '$db' (lower-case letters, digits, _)"
    done
    # The socket lives in DIR; Unix socket paths are limited to 107 bytes.
    (( ${#dir} + 20 < 107 )) || die "$dir: path too long for PostgreSQL's Unix socket" \
        "(${#dir} characters; use a shorter folder)"
    # Checked before anything changes hands: a folder with other files is left alone.
    if [[ -d $dir && ! -f $dir/PG_VERSION && -n $(ls -A "$dir") ]]; then
        die "$dir is not empty and not a PostgreSQL cluster"
    fi
    install_postgres
    bindir=$(find_bindir)
    prepare_dir "$dir"

    if [[ ! -f $dir/PG_VERSION ]]; then
        say "creating a cluster in $dir ($("$bindir/postgres" --version))"
        local log
        log=$(mktemp)
        as_owner "$bindir/initdb" -D "$dir" --auth-local=peer --auth-host=scram-sha-256 \
            --encoding=UTF8 --no-locale >"$log" 2>&1 \
            || { cat "$log" >&2; rm -f "$log"; die "initdb failed in $dir"; }
        rm -f "$log"
        cat >>"$dir/postgresql.conf" <<CONF
# postgres.sh: throwaway cluster on loopback; durability traded for speed.
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
CONF
    fi

    current=$(running_port "$dir" "$bindir")
    if [[ -n $current ]]; then
        [[ $current == "$port" ]] || die "the cluster in $dir already runs on port $current," \
            "not $port (stop it first: $0 stop $dir)"
        say "already running on 127.0.0.1:$port"
    else
        if ! as_owner "$bindir/pg_ctl" start -D "$dir" -l "$dir/server.log" -w -t 60 \
                -o "-p $port" >/dev/null; then
            tail -n 20 "$dir/server.log" >&2 || true
            die "PostgreSQL did not start on 127.0.0.1:$port (log: $dir/server.log)"
        fi
        say "started on 127.0.0.1:$port (log: $dir/server.log)"
    fi

    {
        echo "SELECT format('CREATE ROLE %I LOGIN', :'role')"
        echo "  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \\gexec"
        echo "SELECT format('ALTER ROLE %I PASSWORD %L', :'role', :'pw') \\gexec"
        for db in "${dbs[@]}"; do
            echo "SELECT format('CREATE DATABASE %I OWNER %I', '$db', :'role')"
            echo "  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$db') \\gexec"
        done
    } | psql_admin "$dir" "$port" "$bindir" -v role="$ROLE" -v pw="$PASSWORD" \
        || die "could not create role $ROLE and databases ${dbs[*]}"
    say "ready: postgresql://$ROLE:***@127.0.0.1:$port/{$(IFS=,; echo "${dbs[*]}")}"
}

stop() {
    [[ $# -eq 1 ]] || usage
    local dir bindir
    dir=$(realpath -m "$1")
    bindir=$(find_bindir) || die "PostgreSQL is not installed"
    [[ -f $dir/PG_VERSION ]] || die "$dir is not a PostgreSQL cluster"
    if [[ -z $(running_port "$dir" "$bindir") ]]; then
        say "not running ($dir)"; return 0
    fi
    as_owner "$bindir/pg_ctl" stop -D "$dir" -m fast -w -t 60 >/dev/null \
        || die "PostgreSQL in $dir did not stop (log: $dir/server.log)"
    say "stopped ($dir)"
}

status() {
    [[ $# -eq 1 ]] || usage
    local dir bindir port
    dir=$(realpath -m "$1")
    bindir=$(find_bindir) || die "PostgreSQL is not installed"
    port=$(running_port "$dir" "$bindir")
    [[ -n $port ]] || { say "not running ($dir)"; return 3; }
    say "running on 127.0.0.1:$port ($dir)"
}

case ${1:-} in
    install) install_postgres; say "PostgreSQL binaries: $(find_bindir)" ;;
    start) shift; start "$@" ;;
    stop) shift; stop "$@" ;;
    status) shift; status "$@" ;;
    *) usage ;;
esac
