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

# The end-to-end suites that run a second time with the relay's state on PostgreSQL (a server
# of each test's own) instead of SQLite: tests/support/stack.rs reads RELAY_TEST_STATE.
E2E_ON_POSTGRES=(--test relay_e2e --test flood --test registration --test oauth2_mailbox
    --test ingest_e2e --test recipient_commands --test delivery_log --test delivery_options
    --test admin_alerts)

status=0
if cargo nextest --version >/dev/null 2>&1; then
    # One process per test: Dovecot- and PostgreSQL-backed tests run side by side, each on its
    # own port.
    cargo nextest run --locked --no-fail-fast "$@" || status=$?
    echo "== the end-to-end tests again, with the state on PostgreSQL"
    RELAY_TEST_STATE=postgres cargo nextest run --locked --no-fail-fast "${E2E_ON_POSTGRES[@]}" "$@" \
        || status=$?
else
    cargo test --locked --no-fail-fast "$@" || status=$?
    RELAY_TEST_STATE=postgres cargo test --locked --no-fail-fast "${E2E_ON_POSTGRES[@]}" "$@" \
        || status=$?
fi
exit "$status"
