#!/usr/bin/env bash
# fio side by side: raw file, nbdkit, ironhorn with 1 and 3 replicas (issue 3).
# Builds the release binary (unless IRONHORN_BIN is set), then runs benches/fio_compare.py,
# which starts every server it needs, stops them all when it exits, and rewrites its section
# of benches/RESULTS.md. Settings are environment variables; see benches/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in fio nbdkit nbdinfo python3; do
    command -v "$tool" >/dev/null || { echo "fio_compare: $tool is not installed" >&2; exit 1; }
done
if [[ -z "${IRONHORN_BIN:-}" ]]; then
    cargo build --release --bin ironhorn
fi
export FIO_COMPARE_COMMAND="benches/fio_compare.sh${*:+ $*}"
exec python3 benches/fio_compare.py "$@"
