#!/usr/bin/env bash
# Instructions qmpmux executes (user space, callgrind) per proxied command
# and per event delivered to each client: counts, not times, so they do not
# move with the machine's load. Each figure is the difference of two runs of
# different lengths, so start-up and shutdown cancel out.
#
#   bash benches/callgrind.sh            # needs valgrind, python3, QEMU
#
# Not part of `cargo bench --bench compare` (which compares times against
# QEMU used directly); this one is for changes to qmpmux's own hot paths.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in valgrind callgrind_annotate python3 qemu-system-x86_64; do
    command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is required" >&2; exit 1; }
done
cargo build --profile profiling --quiet
bin="$PWD/target/profiling/qmpmux"
dir=$(mktemp -d)
trap 'pkill -f "$dir/" 2>/dev/null || true; rm -rf "$dir"' EXIT
ulimit -n 4096

cat > "$dir/qmpmux.toml" <<EOF
log_level = "warn"
control_socket = ""
threads = 1
[[vm]]
name = "m"
upstream = "$dir/q.sock"
listen = "$dir/m.sock"
EOF

cat > "$dir/load.py" <<'EOF'
# seq N: one client, N sequential query-status.
# fan N: 500 idle clients, N stop/cont rounds from another (2 events each).
import socket, sys, time
path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def client():
    for _ in range(200):
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(path); break
        except OSError:
            time.sleep(0.1)
    f = s.makefile("rwb")
    f.readline(); f.write(b'{"execute":"qmp_capabilities"}\n'); f.flush(); f.readline()
    return s, f
if mode == "seq":
    s, f = client()
    for i in range(n):
        f.write(b'{"execute":"query-status","id":%d}\n' % i); f.flush(); f.readline()
else:
    idle = []
    for _ in range(500):
        s, _f = client(); s.setblocking(False); idle.append(s)
    def drain():
        for s in idle:
            try:
                while s.recv(65536): pass
            except BlockingIOError:
                pass
    s, f = client()
    for _ in range(n):
        for cmd in (b"stop", b"cont"):
            f.write(b'{"execute":"%s"}\n' % cmd); f.flush()
            while b"return" not in f.readline(): pass
        time.sleep(0.02); drain()
    time.sleep(0.3); drain()
EOF

# Total instructions of one daemon life under `load.py MODE N`.
run() {
    rm -f "$dir"/*.sock "$dir/callgrind.out"
    qemu-system-x86_64 -M none -nodefaults -display none \
        -qmp "unix:$dir/q.sock,server=on,wait=off" >/dev/null 2>&1 &
    local qemu=$!
    while [ ! -S "$dir/q.sock" ]; do sleep 0.05; done
    valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
        "$bin" --config "$dir/qmpmux.toml" >"$dir/daemon.log" 2>&1 &
    local daemon=$!
    python3 "$dir/load.py" "$dir/m.sock" "$1" "$2"
    kill -TERM "$daemon"; wait "$daemon" || true
    kill "$qemu"; wait "$qemu" 2>/dev/null || true
    callgrind_annotate "$dir/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}

a=$(run seq 500); b=$(run seq 2500)
echo "per sequential command (query-status, 1 client): $(( (b - a) / 2000 )) instructions"
a=$(run fan 10); b=$(run fan 60)
echo "per event per client (500 idle clients):         $(( (b - a) / (100 * 500) )) instructions"
