#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit and integration tests (the real binary
# against real clients), and the crash tests built with failpoints.
# Slow soak and benchmark runs are not part of this; see benches/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
# Enough proptest cases to matter, few enough for CI's 2 cores.
export PROPTEST_CASES="${PROPTEST_CASES:-64}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p ironhorn-replica --all-targets --features failpoints -- -D warnings
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast
cargo test -p ironhorn-replica --features failpoints --test crash
# The web UI end to end: headless Chromium against a real `up` cluster (tests/ui/README.md).
timeout 1200 npm --prefix tests/ui test
