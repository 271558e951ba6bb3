#!/usr/bin/env bash
# Same work, same machine, same run: fio's nbd engine against qemu-nbd and
# against replicatord (one node, no peer), each serving the same kind of
# backing file with the host page cache bypassed (qemu-nbd --cache=none,
# replicatord direct = true). Prints one table: row, qemu-nbd, ours, ratio.
#
#   benches/nbd-vs-qemu.sh
#
# Environment (all optional):
#   RUNTIME_S=10        seconds per fio job
#   SIZE_MIB=256        size of each backing file / export
#   BACKING=disk        disk (a file under /var/tmp), tmpfs (/dev/shm; no
#                       O_DIRECT there, so both run cached), or both
#   REPLICATORD=PATH    the daemon (default target/release/replicatord, built
#                       with cargo build --release if missing)
#   OURS=replicatord    or qemu-nbd, to check the script against itself
# Needs: qemu-nbd (qemu-utils), fio with the nbd engine, nbdinfo (libnbd-bin),
# python3.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME_S=${RUNTIME_S:-10}
SIZE_MIB=${SIZE_MIB:-256}
BACKING=${BACKING:-disk}
OURS=${OURS:-replicatord}
REPLICATORD=${REPLICATORD:-target/release/replicatord}
# How long a server gets to start answering NBD.
START_TIMEOUT_S=30
PY=/usr/bin/python3

for tool in qemu-nbd fio nbdinfo; do
    command -v "$tool" >/dev/null || { echo "install $tool (see scripts/test.sh)" >&2; exit 1; }
done
if [ "$OURS" = replicatord ] && [ ! -x "$REPLICATORD" ]; then
    cargo build --release --bin replicatord >&2
fi

work=$(mktemp -d /var/tmp/nbd-bench.XXXXXX)
server_pid=""
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work" "${shm_dir:-}"
}
trap cleanup EXIT

free_port() {
    $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_server KIND FILE PORT DIRECT(true|false)
start_server() {
    local kind=$1 file=$2 port=$3 direct=$4
    case "$kind" in
    qemu-nbd)
        local cache=writeback aio=threads
        if [ "$direct" = true ]; then cache=none; aio=io_uring; fi
        qemu-nbd -f raw --cache=$cache --aio=$aio -e 4 -t -x vm1 \
            -b 127.0.0.1 -p "$port" "$file" 2>"$work/$kind.log" &
        ;;
    replicatord)
        cat >"$work/vm1.toml" <<TOML
resource = "vm1"
secret = "bench"
direct = $direct

[nodes.alpha]
replication = "127.0.0.1:$(free_port)"
nbd = "127.0.0.1:$port"
control = "$work/alpha.sock"
disk = "$file"
meta = "$work/alpha.meta"
TOML
        "$REPLICATORD" --config "$work/vm1.toml" --node alpha 2>"$work/$kind.log" &
        ;;
    esac
    server_pid=$!
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until nbdinfo --size "nbd://127.0.0.1:$port/vm1" >/dev/null 2>&1; do
        if ! kill -0 "$server_pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
            echo "$kind did not start serving NBD:" >&2
            cat "$work/$kind.log" >&2
            exit 1
        fi
        sleep 0.1
    done
}

stop_server() {
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}

# fio_job NAME URI ARGS... -> writes $work/NAME.json
fio_job() {
    local name=$1 uri=$2
    shift 2
    fio --name="$name" --ioengine=nbd --uri="$uri" --size="${SIZE_MIB}m" \
        --time_based --runtime="$RUNTIME_S" --ramp_time=1 --norandommap \
        --output-format=json --output="$work/$name.json" "$@" >/dev/null
}

# run_all KIND SIDE FILE DIRECT -> $work/SIDE.results (row<TAB>value)
run_all() {
    local kind=$1 side=$2 file=$3 direct=$4
    local port
    port=$(free_port)
    start_server "$kind" "$file" "$port" "$direct"
    local uri="nbd://127.0.0.1:$port/vm1"
    # Fill the export once so reads hit allocated data on both servers.
    fio --name=fill --ioengine=nbd --uri="$uri" --size="${SIZE_MIB}m" --rw=write \
        --bs=1m --iodepth=16 --output-format=json --output="$work/fill.json" >/dev/null
    fio_job "$side-lat" "$uri" --rw=randwrite --bs=4k --iodepth=1
    fio_job "$side-rw32" "$uri" --rw=randwrite --bs=4k --iodepth=32
    fio_job "$side-rr32" "$uri" --rw=randread --bs=4k --iodepth=32
    fio_job "$side-sw" "$uri" --rw=write --bs=1m --iodepth=16
    fio_job "$side-sr" "$uri" --rw=read --bs=1m --iodepth=16
    fio_job "$side-fsync" "$uri" --rw=randwrite --bs=4k --iodepth=1 --fsync=1
    stop_server
    $PY - "$work" "$side" >"$work/$side.results" <<'PY'
import json, sys
work, kind = sys.argv[1], sys.argv[2]
def job(name):
    with open("%s/%s-%s.json" % (work, kind, name)) as f:
        j = json.load(f)["jobs"][0]
    if j["error"]:
        sys.exit("fio job %s-%s failed with error %d" % (kind, name, j["error"]))
    return j
lat = job("lat")["write"]
rows = [
    ("4k randwrite qd1 mean latency (us)", lat["lat_ns"]["mean"] / 1e3),
    ("4k randwrite qd1 p99 latency (us)", lat["clat_ns"]["percentile"]["99.000000"] / 1e3),
    ("4k randwrite qd32 (IOPS)", job("rw32")["write"]["iops"]),
    ("4k randread qd32 (IOPS)", job("rr32")["read"]["iops"]),
    ("1M seq write qd16 (MB/s)", job("sw")["write"]["bw_bytes"] / 1e6),
    ("1M seq read qd16 (MB/s)", job("sr")["read"]["bw_bytes"] / 1e6),
    ("4k write+fsync qd1 (IOPS)", job("fsync")["write"]["iops"]),
]
for name, value in rows:
    print("%s\t%.1f" % (name, value))
PY
}

# table BACKING_LABEL
table() {
    $PY - "$work/base.results" "$work/ours.results" "$1" "$OURS" <<'PY'
import sys
base = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
ours = dict(l.rstrip("\n").split("\t") for l in open(sys.argv[2]))
print("backing: %s; ours = %s" % (sys.argv[3], sys.argv[4]))
print("| %-36s | %10s | %10s | %10s |" % ("workload", "qemu-nbd", "ours", "ours/qemu"))
print("|%s|%s|%s|%s|" % ("-" * 38, "-" * 12, "-" * 12, "-" * 12))
for name, q in base:
    q, o = float(q), float(ours[name])
    ratio = o / q if q else float("nan")
    print("| %-36s | %10.1f | %10.1f | %10.2f |" % (name, q, o, ratio))
print("(latency rows: a ratio above 1 means slower; other rows: above 1 means faster)")
PY
}

bench_on() {
    local label=$1 dir=$2 direct=$3
    local side kind
    for side in base ours; do
        kind=qemu-nbd
        [ "$side" = ours ] && kind=$OURS
        local file="$dir/$side.img"
        # An allocated (non-sparse) file, as a real backing disk would be.
        dd if=/dev/zero of="$file" bs=1M count="$SIZE_MIB" status=none
        run_all "$kind" "$side" "$file" "$direct"
        rm -f "$file"
    done
    table "$label"
    rm -f "$work"/*.results
}

echo "fio nbd engine, ${RUNTIME_S}s per job, ${SIZE_MIB} MiB export, $(nproc) CPUs, $(date -u +%F)"
case "$BACKING" in
disk | both) bench_on "file under /var/tmp, O_DIRECT" "$work" true ;;
esac
case "$BACKING" in
tmpfs | both)
    shm_dir=$(mktemp -d /dev/shm/nbd-bench.XXXXXX)
    bench_on "file on tmpfs, page cache" "$shm_dir" false
    ;;
esac
