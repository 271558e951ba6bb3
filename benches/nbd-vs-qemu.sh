#!/usr/bin/env bash
# Same work, same machine, same run: fio's nbd engine against qemu-nbd and
# against replicatord (one node, no peer), each serving the same kind of
# backing file with the host page cache bypassed (qemu-nbd --cache=none
# --aio=io_uring, replicatord direct = true). Both servers run side by side
# and each workload runs on one then the other, alternating which goes first,
# so drifting machine load hits both alike. Prints one table: workload,
# qemu-nbd, ours, ratio ours/qemu-nbd.
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
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    rm -rf "$work" "${shm_dir:-}"
}
trap cleanup EXIT

free_port() {
    $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_server KIND SIDE FILE PORT DIRECT(true|false)
start_server() {
    local kind=$1 side=$2 file=$3 port=$4 direct=$5
    case "$kind" in
    qemu-nbd)
        local cache=writeback aio=threads
        if [ "$direct" = true ]; then cache=none; aio=io_uring; fi
        qemu-nbd -f raw --cache=$cache --aio=$aio -e 4 -t -x vm1 \
            -b 127.0.0.1 -p "$port" "$file" 2>"$work/$side.log" &
        ;;
    replicatord)
        cat >"$work/$side.toml" <<TOML
resource = "vm1"
secret = "bench"
direct = $direct

[nodes.alpha]
replication = "127.0.0.1:$(free_port)"
nbd = "127.0.0.1:$port"
control = "$work/$side.sock"
disk = "$file"
meta = "$work/$side.meta"
TOML
        "$REPLICATORD" --config "$work/$side.toml" --node alpha 2>"$work/$side.log" &
        ;;
    esac
    local pid=$!
    pids+=("$pid")
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until nbdinfo --size "nbd://127.0.0.1:$port/vm1" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
            echo "$kind did not start serving NBD:" >&2
            cat "$work/$side.log" >&2
            exit 1
        fi
        sleep 0.1
    done
}

stop_servers() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid"
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}

# fio_job SIDE NAME URI ARGS... -> writes $work/SIDE-NAME.json
fio_job() {
    local side=$1 name=$2 uri=$3
    shift 3
    fio --name="$name" --ioengine=nbd --uri="$uri" --size="${SIZE_MIB}m" \
        --time_based --runtime="$RUNTIME_S" --ramp_time=1 --norandommap \
        --output-format=json --output="$work/$side-$name.json" "$@" >/dev/null
}

# The workloads of DESIGN.md section 6: name and fio arguments.
jobs=(
    "lat --rw=randwrite --bs=4k --iodepth=1"
    "rw32 --rw=randwrite --bs=4k --iodepth=32"
    "rr32 --rw=randread --bs=4k --iodepth=32"
    "sw --rw=write --bs=1m --iodepth=16"
    "sr --rw=read --bs=1m --iodepth=16"
    "fsync --rw=randwrite --bs=4k --iodepth=1 --fsync=1"
)

# results SIDE -> $work/SIDE.results (workload<TAB>value)
results() {
    $PY - "$work" "$1" >"$work/$1.results" <<'PY'
import json, sys
work, side = sys.argv[1], sys.argv[2]
def job(name):
    with open("%s/%s-%s.json" % (work, side, name)) as f:
        j = json.load(f)["jobs"][0]
    if j["error"]:
        sys.exit("fio job %s-%s failed with error %d" % (side, name, j["error"]))
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

# bench_on LABEL DIR DIRECT
bench_on() {
    local label=$1 dir=$2 direct=$3
    declare -A uri
    local side kind port
    for side in base ours; do
        kind=qemu-nbd
        [ "$side" = ours ] && kind=$OURS
        # An allocated (non-sparse) file, as a real backing disk would be.
        dd if=/dev/zero of="$dir/$side.img" bs=1M count="$SIZE_MIB" status=none
        port=$(free_port)
        start_server "$kind" "$side" "$dir/$side.img" "$port" "$direct"
        uri[$side]="nbd://127.0.0.1:$port/vm1"
        # Write the whole export once so reads hit written data.
        fio --name=fill --ioengine=nbd --uri="${uri[$side]}" --size="${SIZE_MIB}m" \
            --rw=write --bs=1m --iodepth=16 --output-format=json \
            --output="$work/$side-fill.json" >/dev/null
    done
    local i=0 job name order
    for job in "${jobs[@]}"; do
        read -r name args <<<"$job"
        order="base ours"
        [ $((i % 2)) = 1 ] && order="ours base"
        for side in $order; do
            # shellcheck disable=SC2086 # args is a list of fio options
            fio_job "$side" "$name" "${uri[$side]}" $args
        done
        i=$((i + 1))
    done
    stop_servers
    results base
    results ours
    table "$label"
    rm -f "$work"/*.results "$work"/*.json "$dir/base.img" "$dir/ours.img"
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
