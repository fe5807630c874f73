# Helpers the benchmark scripts share; sourced after `cd` to the repository.
#
#   bench_setup NAME   builds the release binary unless IRONHORN_BIN is set (BIN), makes a
#                      scratch directory /tmp/ih-NAME.XXXXXX (W) that is removed at exit
#                      unless BENCH_KEEP=1, and kills every pid in PIDS at exit.
#   port               a free TCP port on 127.0.0.1
#   wait_port PORT     waits up to 10 s until 127.0.0.1:PORT accepts
#   now                seconds since the epoch, with nanoseconds

bench_setup() {
    [ -n "${IRONHORN_BIN:-}" ] || cargo build --release -q
    BIN=${IRONHORN_BIN:-$PWD/target/release/ironhorn}
    W=$(mktemp -d "/tmp/ih-$1.XXXXXX")
    PIDS=()
    trap bench_cleanup EXIT
}

bench_cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${BENCH_KEEP:-}" ]; then echo "kept $W"; else rm -rf "$W"; fi
}

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
now() { date +%s.%N; }
