#!/usr/bin/env bash
# Installs what the integration test suite needs (Debian 12 / bookworm, run as root).
#
#   * dovecot-imapd  -> /usr/sbin/dovecot, /usr/bin/doveadm (tests/support/dovecot.rs)
#   * postgresql     -> /usr/lib/postgresql/<version>/bin/{initdb,postgres,pg_isready,psql}
#                       (tests/support/postgres.rs)
#
# Idempotent: when everything is present it prints nothing and exits 0 in a few
# milliseconds; `apt-get update` runs only when something is missing.
#
# The tests start their own Dovecot instances from a temp-dir config on random
# loopback ports, so the system-wide dovecot service is never needed. When this
# script installs the package it keeps the package's service from starting
# (temporary policy-rc.d) and disables it, so nothing binds 143/993. A system
# dovecot that was already installed and running before is left alone (it does
# not conflict with the test instances: separate base_dir, separate ports,
# doveadm always gets `-c <instance config>`), unless you pass
# --stop-system-dovecot, which stops and disables it as well.
#
# Likewise the tests run their own PostgreSQL clusters (initdb in temp dirs, random
# loopback ports), never the system service: when this script installs postgresql it
# keeps the service from starting and disables it, so nothing binds 5432. The
# package's default cluster (/var/lib/postgresql/<version>/main) is created by Debian
# but stays unused; as root the test clusters run as the package's `postgres` user.
# A system PostgreSQL that was already installed and running is left alone (separate
# data dirs, sockets and ports).
#
# Usage: scripts/test-deps.sh [--stop-system-dovecot]
#
# Exit status: 0 on success, non-zero with a message on stderr on failure.
set -euo pipefail

log() { printf 'test-deps: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Debian puts dovecot in /usr/sbin, which may be missing from a non-login PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

stop_system=0
case "${1:-}" in
    "") ;;
    --stop-system-dovecot) stop_system=1 ;;
    *) die "unknown argument: $1 (usage: $0 [--stop-system-dovecot])" ;;
esac

have() { command -v "$1" >/dev/null 2>&1; }

# Stops and disables the system-wide dovecot service (base_dir /run/dovecot,
# ports 143/993), now and after a reboot. Never touches test instances.
stop_system_dovecot() {
    if [ -d /run/systemd/system ] && have systemctl; then
        systemctl disable --now dovecot.service dovecot.socket >/dev/null 2>&1 || true
    elif have update-rc.d && [ -e /etc/init.d/dovecot ]; then
        update-rc.d dovecot disable >/dev/null 2>&1 || true
    fi
    if [ -s /run/dovecot/master.pid ] && kill -0 "$(cat /run/dovecot/master.pid)" 2>/dev/null; then
        log "stopping the system-wide dovecot (/run/dovecot)"
        doveadm stop >/dev/null 2>&1 || kill "$(cat /run/dovecot/master.pid)" 2>/dev/null || true
    fi
}

# Debian's PostgreSQL binaries live in /usr/lib/postgresql/<version>/bin, not on PATH.
have_postgres() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && [ -x "$d/pg_isready" ] && [ -x "$d/psql" ] && return 0
    done
    return 1
}

# Stops and disables the system-wide postgresql service (all clusters), now and
# after a reboot. Never touches test clusters.
stop_system_postgres() {
    if [ -d /run/systemd/system ] && have systemctl; then
        systemctl disable --now postgresql.service >/dev/null 2>&1 || true
    elif have update-rc.d && [ -e /etc/init.d/postgresql ]; then
        update-rc.d postgresql disable >/dev/null 2>&1 || true
        if have pg_ctlcluster && have pg_lsclusters; then
            pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
                pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
            done
        fi
    fi
}

missing_pkgs=()

if ! have dovecot || ! have doveadm; then
    missing_pkgs+=(dovecot-imapd)
fi
if ! have_postgres; then
    missing_pkgs+=(postgresql)
fi
# `nobody` owns the test mail (Dovecot refuses uid 0 for mail); Debian always has it.
getent passwd nobody >/dev/null 2>&1 || die "user 'nobody' does not exist; the Dovecot harness needs it"

if [ "${#missing_pkgs[@]}" -eq 0 ]; then
    if [ "$stop_system" -eq 1 ]; then
        [ "$(id -u)" -eq 0 ] || die "--stop-system-dovecot needs root"
        stop_system_dovecot
    fi
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "missing ${missing_pkgs[*]} and not running as root; run: sudo $0"
have apt-get || die "missing ${missing_pkgs[*]} and apt-get is not available (expected Debian 12)"

export DEBIAN_FRONTEND=noninteractive

# Keep maintainer scripts from starting services during the install (the
# standard Debian mechanism). Only install our own policy if none exists, and
# remove it again on exit.
policy=/usr/sbin/policy-rc.d
created_policy=0
cleanup() {
    if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, created by report-relay scripts/test-deps.sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    created_policy=1
fi

log "installing ${missing_pkgs[*]} ..."
# Wait for a concurrent apt/dpkg run instead of failing on its lock.
apt_opts=(-o DPkg::Lock::Timeout=300)
aptlog=$(mktemp)
if ! apt-get "${apt_opts[@]}" update -qq >"$aptlog" 2>&1; then
    cat "$aptlog" >&2; rm -f "$aptlog"
    die "apt-get update failed"
fi
if ! apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing_pkgs[@]}" >"$aptlog" 2>&1; then
    cat "$aptlog" >&2; rm -f "$aptlog"
    die "apt-get install ${missing_pkgs[*]} failed"
fi
rm -f "$aptlog"

# The packages' services must not run (and must not start at boot).
for pkg in "${missing_pkgs[@]}"; do
    case "$pkg" in
        dovecot-imapd)
            stop_system_dovecot
            have dovecot && have doveadm || die "dovecot/doveadm still not found after installing $pkg"
            log "installed: dovecot $(dovecot --version 2>/dev/null || echo '?')"
            ;;
        postgresql)
            stop_system_postgres
            have_postgres || die "initdb/postgres/pg_isready/psql still not found in /usr/lib/postgresql/*/bin after installing $pkg"
            pg=$(printf '%s\n' /usr/lib/postgresql/*/bin/postgres | sort -V | tail -n 1)
            log "installed: $("$pg" --version 2>/dev/null || echo 'postgresql ?')"
            ;;
    esac
done
