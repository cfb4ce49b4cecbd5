#!/usr/bin/env bash
# Sets everything up and runs portcullis on its embedded default: a development CA and
# certificates, a local Temporal dev server, and the mTLS proxy in front of it.
# Extra arguments go to `portcullis dev` (for example --listen 127.0.0.1:7443 --dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked --bin portcullis
exec ./target/release/portcullis dev "$@"
