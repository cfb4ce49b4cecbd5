#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the whole suite: formatting, lints, unit tests
# and the integration tests against a real Temporal server and real clients.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== cargo fmt" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test" >&2
# Integration tests start real Temporal dev servers; two at a time suits a 2-core machine.
cargo test --locked --lib --bins --tests -- --test-threads 2
