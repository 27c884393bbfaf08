#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what the tests need (Dovecot,
# PostgreSQL, from Debian's packages) when it is missing, then runs every test in parallel.
#
#   scripts/test.sh [extra args for the test runner]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/test-deps.sh

# Debian puts dovecot and doveadm in /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

if cargo nextest --version >/dev/null 2>&1; then
    # One process per test: Dovecot- and PostgreSQL-backed tests run side by side, each on its
    # own port.
    cargo nextest run --locked --no-fail-fast "$@"
else
    cargo test --locked --no-fail-fast "$@"
fi
