#!/usr/bin/env bash
# Same work, same machine, same run: fio's nbd engine against qemu-nbd,
# against replicatord alone (one node, no peer) and against replicatord
# with a connected peer (two nodes on this machine, protocol C, the fio
# client on the primary), each serving the same kind of backing file with
# the host page cache bypassed on disk (qemu-nbd --cache=none
# --aio=io_uring, replicatord direct = true). All servers run side by side
# and each workload runs on each of them in rotating order, so drifting
# machine load hits all alike. Prints one table: workload, qemu-nbd, alone,
# replicated, and the ratios to qemu-nbd. Below it, the CPU each server
# used per I/O in each job (user+system time of its processes, read from
# /proc while fio measures; the pair's primary and secondary apart), fio's
# own, and how busy the machine's CPUs were: whether a row was bound by
# CPU or by waiting.
#
# On disk, also the raw disk: fio itself (io_uring, O_DIRECT) on a file in
# the same directory as the backing files, same size, same 4k randwrite qd32
# and 1M seq write qd16 jobs, taking its turn in the same rotation. Both
# replicas write to that one disk, so issue 4's disk goal is replicated >=
# 0.9 x half the raw figure; a second table sets the two against each other,
# with fio on two such files at once (per file: what each replica can get of
# the shared disk with no software in the way) beside them.
#
# Then the resync row: both nodes connected over RESYNC_MIB exports, the
# secondary disconnects, RESYNC_MIB of data is written on the primary, the
# secondary reconnects, and the time until both report Established with
# nothing out of sync is set against `nbdcopy` of the same data between two
# qemu-nbd exports. And the peak RSS (VmHWM) of every server process.
#
# Then the one-node servers again with their CPUs fixed (PINNED_JOBS): once
# with the server on the last CPU and fio on the first ("apart"), once with
# both on the first ("shared"), qemu-nbd and replicatord alike. Unpinned,
# where the scheduler puts a server relative to its client (and to the
# CPU taking the disk's interrupts) moves a row as much as the server does:
# on the 2-CPU test VM 4k random reads at depth 32 do 63-72k IOPS apart and
# 40-50k on one CPU, with either server, and a depth-1 write takes 70-160 us
# depending on the placement alone. So an unpinned row compares placements
# as much as servers; the pinned rows compare the servers.

# Last, the goals of issues 2 and 4, each with the ratio measured in this run
# and met or not met.
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
#   REPLCTL=PATH        its control tool (default: next to REPLICATORD)
#   OURS=replicatord    or qemu-nbd, to check the script against itself
#                       (then the replicated column and resync are skipped)
#   REPLICATED=1        0 skips the replicated column, the raw disk and the
#                       resync row
#   RESYNC_MIB=1024     out-of-sync data for the resync row
#   PINNED_JOBS="lat rw32 rr32 sw sr fsync"
#                       the one-node jobs run again with fixed CPUs; empty
#                       skips them (so does a 1-CPU machine)
# Needs: qemu-nbd (qemu-utils), fio with the nbd engine, nbdinfo (libnbd-bin),
# python3.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME_S=${RUNTIME_S:-10}
SIZE_MIB=${SIZE_MIB:-256}
BACKING=${BACKING:-disk}
OURS=${OURS:-replicatord}
REPLICATORD=${REPLICATORD:-target/release/replicatord}
REPLCTL=${REPLCTL:-$(dirname "$REPLICATORD")/replctl}
REPLICATED=${REPLICATED:-1}
RESYNC_MIB=${RESYNC_MIB:-1024}
PINNED_JOBS=${PINNED_JOBS-lat rw32 rr32 sw sr fsync}
[ "$OURS" = replicatord ] || REPLICATED=0
# How long the two nodes get to connect, sync and promote; and a resync.
STATE_TIMEOUT_S=60
RESYNC_TIMEOUT_S=900
# How long a server gets to start answering NBD.
START_TIMEOUT_S=30
PY=/usr/bin/python3

for tool in qemu-nbd fio nbdinfo nbdcopy; do
    command -v "$tool" >/dev/null || { echo "install $tool (see scripts/test.sh)" >&2; exit 1; }
done
if [ "$OURS" = replicatord ] && { [ ! -x "$REPLICATORD" ] || [ ! -x "$REPLCTL" ]; }; then
    cargo build --release --bin replicatord --bin replctl >&2
fi

work=$(mktemp -d /var/tmp/nbd-bench.XXXXXX)
pids=()
# The server process(es) of each side, for the peak RSS rows.
declare -A side_pids
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
    side_pids[$side]=$pid
    wait_nbd "$kind" "$side" "$port" "$pid"
}

# wait_nbd KIND SIDE PORT PID: until the export answers (or fail with its log)
wait_nbd() {
    local kind=$1 side=$2 port=$3 pid=$4
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until nbdinfo --size "nbd://127.0.0.1:$port/vm1" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
            echo "$kind did not start serving NBD:" >&2
            cat "$work/$side"*.log >&2
            exit 1
        fi
        sleep 0.1
    done
}

# field CONFIG NODE KEY: one field of `replctl status --json`
field() {
    "$REPLCTL" --config "$1" --node "$2" status --json |
        $PY -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$3"
}

# wait_state CONFIG NODE WHAT PYTHON-EXPR-ON-s [TIMEOUT_S]: poll the status
wait_state() {
    local config=$1 node=$2 what=$3 expr=$4 limit=${5:-$STATE_TIMEOUT_S}
    local deadline=$((SECONDS + limit))
    until "$REPLCTL" --config "$config" --node "$node" status --json 2>/dev/null |
        $PY -c "import json, sys; s = json.load(sys.stdin); sys.exit(0 if ($expr) else 1)" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then
            echo "$node: $what: not reached in ${limit}s" >&2
            "$REPLCTL" --config "$config" --node "$node" status --json >&2 || true
            cat "$work"/*.log >&2
            exit 1
        fi
        sleep 0.05
    done
}

# start_pair SIDE FILE PORT DIRECT: alpha (Primary, NBD on PORT, disk FILE)
# and bravo (disk FILE with -peer before .img) as one protocol-C resource,
# fresh disks marked in sync (new-current-uuid --clear-bitmap).
start_pair() {
    local side=$1 file=$2 port=$3 direct=$4
    local peer=${file%.img}-peer.img config="$work/$side.toml"
    cat >"$config" <<TOML
resource = "vm1"
protocol = "C"
secret = "bench"
direct = $direct

[nodes.alpha]
replication = "127.0.0.1:$(free_port)"
nbd = "127.0.0.1:$port"
control = "$work/$side-alpha.sock"
disk = "$file"
meta = "$work/$side-alpha.meta"

[nodes.bravo]
replication = "127.0.0.1:$(free_port)"
nbd = "127.0.0.1:$(free_port)"
control = "$work/$side-bravo.sock"
disk = "$peer"
meta = "$work/$side-bravo.meta"
TOML
    local node pid
    side_pids[$side]=""
    for node in alpha bravo; do
        # Fresh metadata for fresh disks (a previous pass may have left some).
        rm -f "$work/$side-$node.meta"
        "$REPLCTL" --config "$config" --node $node create-md >/dev/null
        "$REPLICATORD" --config "$config" --node $node 2>"$work/$side-$node.log" &
        pid=$!
        pids+=("$pid")
        side_pids[$side]="${side_pids[$side]} $pid"
        side_pids[$side-$node]=$pid
    done
    wait_state "$config" alpha "connected" 's["connection"] == "Connected"'
    "$REPLCTL" --config "$config" --node alpha new-current-uuid --clear-bitmap >/dev/null
    wait_state "$config" alpha "both UpToDate" \
        's["disk"] == "UpToDate" and s["peer_disk"] == "UpToDate" and s["replication"] == "Established"'
    "$REPLCTL" --config "$config" --node alpha primary >/dev/null
    wait_nbd "replicatord pair" "$side" "$port" "${side_pids[$side-alpha]}"
}

# peak_rss_mib PID...: sum of VmHWM of the processes, in MiB
peak_rss_mib() {
    local pid total=0 kb
    for pid in "$@"; do
        kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
        total=$((total + kb))
    done
    echo "$((total / 1024))"
}

stop_servers() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid"
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}

# fio_on TARGET ARGS...: fio on an NBD export (TARGET nbd://...) with the nbd
# engine, or on a file (the raw disk) with io_uring and O_DIRECT
fio_on() {
    local target=$1
    shift
    case "$target" in
    nbd://*) fio --ioengine=nbd --uri="$target" "$@" ;;
    *) fio --ioengine=io_uring --direct=1 --filename="$target" "$@" ;;
    esac
}

# fio_job SIDE NAME TARGET ARGS... -> writes $work/SIDE-NAME.json
fio_job() {
    local side=$1 name=$2 target=$3
    shift 3
    if [ "$side" = raw2 ]; then
        # TARGET is two files: one job on each at once, reported as one.
        local a=${target% *} b=${target#* }
        fio --ioengine=io_uring --direct=1 --size="${SIZE_MIB}m" \
            --time_based --runtime="$RUNTIME_S" --ramp_time=1 --norandommap \
            --group_reporting --output-format=json --output="$work/$side-$name.json" "$@" \
            --name="$name-a" --filename="$a" --name="$name-b" --filename="$b" >/dev/null
        return
    fi
    # The CPU the side's server(s) use while fio measures: from the end of
    # the ramp second to the end of the job.
    local window=""
    if [ -n "${side_pids[$side]:-}" ]; then
        (
            sleep 1
            cpu_ticks "$side" >"$work/$side-$name.cpu0"
        ) &
        window=$!
    fi
    fio_on "$target" --name="$name" --size="${SIZE_MIB}m" \
        --time_based --runtime="$RUNTIME_S" --ramp_time=1 --norandommap \
        --output-format=json --output="$work/$side-$name.json" "$@" >/dev/null
    if [ -n "$window" ]; then
        wait "$window"
        cpu_ticks "$side" >"$work/$side-$name.cpu1"
    fi
}

# cpu_ticks SIDE: the machine's busy and total CPU ticks (/proc/stat: all
# but idle and iowait), then the user+system ticks of each of the side's
# server processes (all their threads), in side_pids order
cpu_ticks() {
    local pid line
    line=$(awk '/^cpu / {t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t}' /proc/stat)
    for pid in ${side_pids[$1]}; do
        line="$line $(awk '{print $14 + $15}' "/proc/$pid/stat")"
    done
    echo "$line"
}

# The workloads of DESIGN.md section 6: name and fio arguments.
jobs=(
    "lat --rw=randwrite --bs=4k --iodepth=1 --lat_percentiles=1"
    "rw32 --rw=randwrite --bs=4k --iodepth=32"
    "rr32 --rw=randread --bs=4k --iodepth=32"
    "sw --rw=write --bs=1m --iodepth=16"
    "sr --rw=read --bs=1m --iodepth=16"
    "fsync --rw=randwrite --bs=4k --iodepth=1 --fsync=1"
)

# The jobs the raw disk runs: those of issue 4's disk goal.
raw_jobs="rw32 sw"

# results SIDE [JOB...] -> $work/SIDE.results (workload<TAB>value), the rows
# of all jobs or of the JOBs given
results() {
    $PY - "$work" "$@" >"$work/$1.results" <<'PY'
import json, sys
work, side, only = sys.argv[1], sys.argv[2], sys.argv[3:]
def job(name):
    with open("%s/%s-%s.json" % (work, side, name)) as f:
        j = json.load(f)["jobs"][0]
    if j["error"]:
        sys.exit("fio job %s-%s failed with error %d" % (side, name, j["error"]))
    return j
# workload, job, value of the job's json
rows = [
    ("4k randwrite qd1 mean latency (us)", "lat", lambda j: j["write"]["lat_ns"]["mean"] / 1e3),
    ("4k randwrite qd1 p99 latency (us)", "lat",
     lambda j: j["write"]["lat_ns"]["percentile"]["99.000000"] / 1e3),
    ("4k randwrite qd32 (IOPS)", "rw32", lambda j: j["write"]["iops"]),
    ("4k randread qd32 (IOPS)", "rr32", lambda j: j["read"]["iops"]),
    ("1M seq write qd16 (MB/s)", "sw", lambda j: j["write"]["bw_bytes"] / 1e6),
    ("1M seq read qd16 (MB/s)", "sr", lambda j: j["read"]["bw_bytes"] / 1e6),
    ("4k write+fsync qd1 (IOPS)", "fsync", lambda j: j["write"]["iops"]),
]
# raw2 ran two jobs reported as one: its figures are per file (half the total).
per = 2 if side == "raw2" else 1
for name, name_of_job, value in rows:
    if not only or name_of_job in only:
        print("%s\t%.1f" % (name, value(job(name_of_job)) / per))
PY
}

# table BACKING_LABEL SIDE...: one column per side, ratios to the first
table() {
    local label=$1
    shift
    $PY - "$work" "$label" "$OURS" "$@" <<'PY'
import sys
work, label, ours_kind, sides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
names = {"base": "qemu-nbd", "ours": "alone" if ours_kind == "replicatord" else ours_kind,
         "repl": "replicated"}
cols = [dict(l.rstrip("\n").split("\t") for l in open("%s/%s.results" % (work, s))) for s in sides]
rows = [l.rstrip("\n").split("\t")[0] for l in open("%s/%s.results" % (work, sides[0]))]
print("backing: %s; alone = %s without a peer; replicated = primary of two nodes, protocol C"
      % (label, ours_kind))
head = "| %-36s |" % "workload" + "".join(" %10s |" % names[s] for s in sides)
short = {"ours": names["ours"][:5], "repl": "repl"}
head += "".join(" %10s |" % ("%s/qemu" % short[s]) for s in sides[1:])
print(head)
print("|" + "-" * 38 + "|" + "|".join("-" * 12 for _ in range(2 * len(sides) - 1)) + "|")
for name in rows:
    vals = [float(c[name]) for c in cols]
    line = "| %-36s |" % name + "".join(" %10.1f |" % v for v in vals)
    line += "".join(" %10.2f |" % (v / vals[0] if vals[0] else float("nan")) for v in vals[1:])
    print(line)
print("(latency rows: a ratio above 1 means slower; other rows: above 1 means faster)")
PY
}

# raw_table LABEL: issue 4's disk goal, the replicated column against half
# the raw disk
raw_table() {
    $PY - "$work" "$1" <<'PY'
import sys
work, label = sys.argv[1], sys.argv[2]
def load(side):
    return dict(l.rstrip("\n").split("\t") for l in open("%s/%s.results" % (work, side)))
raw, raw2, repl, base = load("raw"), load("raw2"), load("repl"), load("base")
print("backing: %s; raw = fio on a file in the same directory (io_uring, O_DIRECT, same job);"
      " both replicas share this disk: goal replicated >= 0.9 x raw/2;"
      " 2 files = fio on two such files at once, per file (what each replica gets of the disk"
      " with no software in the way); qemu-nbd = the unreplicated export of the table above"
      " (what the NBD hop alone leaves of the disk)" % label)
print("| %-36s | %10s | %10s | %10s | %12s | %10s | %12s | %13s | %8s |"
      % ("workload", "raw", "raw/2", "2 files", "qemu/(raw/2)", "replicated", "repl/(raw/2)",
         "repl/2 files", "goal"))
print("|%s|%s|%s|%s|%s|%s|%s|%s|%s|"
      % ("-" * 38, "-" * 12, "-" * 12, "-" * 12, "-" * 14, "-" * 12, "-" * 14, "-" * 15, "-" * 10))
nan = float("nan")
for name in raw:
    r, half, two, rep = float(raw[name]), float(raw[name]) / 2, float(raw2[name]), float(repl[name])
    ratio = rep / half if half else nan
    print("| %-36s | %10.1f | %10.1f | %10.1f | %12.2f | %10.1f | %12.2f | %13.2f | %8s |"
          % (name, r, half, two, float(base[name]) / half if half else nan, rep, ratio,
             rep / two if two else nan, "met" if ratio >= 0.9 else "not met"))
PY
}

# cpu_table LABEL SIDE...: CPU time of the servers per I/O for every job,
# from the windows fio_job kept, and how busy the machine was meanwhile
cpu_table() {
    local label=$1
    shift
    local job names=""
    for job in "${jobs[@]}"; do names="$names ${job%% *}"; done
    $PY - "$work" "$label" "$(getconf CLK_TCK)" "$OURS" "$names" "$@" <<'PY'
import json, os, sys
work, label, tck, ours_kind = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
jobs, sides = sys.argv[5].split(), sys.argv[6:]
names = {"base": "qemu-nbd", "ours": "alone" if ours_kind == "replicatord" else ours_kind,
         "repl": "replicated"}

def window(side, job):
    # (server us per I/O per process, machine busy share, fio us per I/O)
    a, b = ("%s/%s-%s.cpu%d" % (work, side, job, i) for i in (0, 1))
    if not (os.path.exists(a) and os.path.exists(b)):
        return None
    x, y = ([int(v) for v in open(f).read().split()] for f in (a, b))
    d = [q - p for p, q in zip(x, y)]
    with open("%s/%s-%s.json" % (work, side, job)) as f:
        j = json.load(f)["jobs"][0]
    ios = j["read"]["total_ios"] + j["write"]["total_ios"]
    if not ios or not d[1]:
        return None
    per = [t * 1e6 / tck / ios for t in d[2:]]
    fio = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] * 1e3 / ios
    return per, d[0] / d[1], fio

print("backing: %s; server CPU = user+system time of the server process(es) per I/O, in us"
      " (replicated: primary + secondary); fio = the client's own; busy = share of all %d CPUs"
      " not idle, kernel workers and interrupts included" % (label, os.cpu_count()))
short = {"base": "qemu", "ours": "alone", "repl": "repl"}
head = ["job"] + ["%s us/IO" % names[s] for s in sides] + \
       ["fio us/IO (%s)" % "/".join(short[s] for s in sides)] + ["busy %s" % short[s] for s in sides]
rows = []
for job in jobs:
    w = [window(s, job) for s in sides]
    if all(x is None for x in w):
        continue
    cells = [job]
    for x in w:
        cells.append("-" if x is None else " + ".join("%.1f" % v for v in x[0]))
    cells.append(" / ".join("-" if x is None else "%.1f" % x[2] for x in w))
    for x in w:
        cells.append("-" if x is None else "%.0f%%" % (100 * x[1]))
    rows.append(cells)
width = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
for r in [head, None] + rows:
    if r is None:
        print("|" + "|".join("-" * (x + 2) for x in width) + "|")
    else:
        print("| " + " | ".join(c.rjust(width[i]) if i else c.ljust(width[i])
                                for i, c in enumerate(r)) + " |")
PY
}

# pin SIDE CPUS: every thread of the side's server process(es) on CPUS
pin() {
    local pid
    for pid in ${side_pids[$1]}; do
        taskset -a -p -c "$2" "$pid" >/dev/null
    done
}

# pinned_pass: (inside bench_on) the PINNED_JOBS on qemu-nbd and alone, with
# the server on the last CPU and fio on CPU 0, then both on CPU 0; every CPU
# again afterwards
pinned_pass() {
    local last=$(($(nproc) - 1)) place server_cpu side job name args
    for place in apart shared; do
        if [ $place = apart ]; then server_cpu=$last; else server_cpu=0; fi
        pin base "$server_cpu"
        pin ours "$server_cpu"
        for job in "${jobs[@]}"; do
            read -r name args <<<"$job"
            [[ " $PINNED_JOBS " == *" $name "* ]] || continue
            for side in base ours; do
                # shellcheck disable=SC2086 # args is a list of fio options
                fio_job "$side-$place" "$name" "${uri[$side]}" $args --cpus_allowed=0
            done
        done
    done
    pin base "0-$last"
    pin ours "0-$last"
}

# pinned_table LABEL: the pinned rows, qemu-nbd against alone per placement
pinned_table() {
    $PY - "$work" "$1" "$(nproc)" <<'PY'
import sys
work, label, ncpu = sys.argv[1], sys.argv[2], int(sys.argv[3])
def load(side):
    return dict(l.rstrip("\n").split("\t") for l in open("%s/%s.results" % (work, side)))
print("backing: %s; the same servers with fixed CPUs: apart = server on CPU %d, fio on CPU 0;"
      " shared = both on CPU 0" % (label, ncpu - 1))
print("| %-36s | %10s | %10s | %10s |" % ("workload, placement", "qemu-nbd", "alone", "alone/qemu"))
print("|%s|%s|%s|%s|" % ("-" * 38, "-" * 12, "-" * 12, "-" * 12))
for place in ("apart", "shared"):
    base, ours = load("base-" + place), load("ours-" + place)
    for name in base:
        b, o = float(base[name]), float(ours[name])
        print("| %-36s | %10.1f | %10.1f | %10.2f |" % ("%s, %s" % (name, place), b, o, o / b if b else float("nan")))
PY
}

# bench_on KEY LABEL DIR DIRECT: KEY (disk or tmpfs) names the numbers kept
# in $work/summary for the goals
bench_on() {
    local key=$1 label=$2 dir=$3 direct=$4
    declare -A uri
    local side kind port sides="base ours" raw=0
    if [ "$REPLICATED" = 1 ]; then sides="base ours repl"; fi
    # The raw disk, for issue 4's disk goal (it needs the replicated column).
    if [ "$direct" = true ] && [ "$REPLICATED" = 1 ]; then raw=1; fi
    for side in $sides; do
        port=$(free_port)
        # Allocated (non-sparse) files, as a real backing disk would be.
        dd if=/dev/zero of="$dir/$side.img" bs=1M count="$SIZE_MIB" status=none
        case "$side" in
        base) start_server qemu-nbd "$side" "$dir/$side.img" "$port" "$direct" ;;
        ours) start_server "$OURS" "$side" "$dir/$side.img" "$port" "$direct" ;;
        repl)
            dd if=/dev/zero of="$dir/$side-peer.img" bs=1M count="$SIZE_MIB" status=none
            start_pair "$side" "$dir/$side.img" "$port" "$direct"
            ;;
        esac
        uri[$side]="nbd://127.0.0.1:$port/vm1"
        # Write the whole export once so reads hit written data.
        fio --name=fill --ioengine=nbd --uri="${uri[$side]}" --size="${SIZE_MIB}m" \
            --rw=write --bs=1m --iodepth=16 --output-format=json \
            --output="$work/$side-fill.json" >/dev/null
    done
    if [ $raw = 1 ]; then
        dd if=/dev/zero of="$dir/raw.img" bs=1M count="$SIZE_MIB" status=none
        uri[raw]="$dir/raw.img"
        # Written once through O_DIRECT, as the exports' files were.
        fio_on "${uri[raw]}" --name=fill --size="${SIZE_MIB}m" --rw=write --bs=1m \
            --iodepth=16 --output-format=json --output="$work/raw-fill.json" >/dev/null
        # And two such files, written to at once (as the two replicas do).
        for f in raw2a raw2b; do
            dd if=/dev/zero of="$dir/$f.img" bs=1M count="$SIZE_MIB" status=none
            fio_on "$dir/$f.img" --name=fill --size="${SIZE_MIB}m" --rw=write --bs=1m \
                --iodepth=16 --output-format=json --output="$work/$f-fill.json" >/dev/null
        done
        uri[raw2]="$dir/raw2a.img $dir/raw2b.img"
    fi
    local i=0 job name order list n
    for job in "${jobs[@]}"; do
        read -r name args <<<"$job"
        # shellcheck disable=SC2206 # sides is a list of words
        list=($sides)
        if [ $raw = 1 ] && [[ " $raw_jobs " == *" $name "* ]]; then list+=(raw raw2); fi
        n=${#list[@]}
        # Rotate which side goes first.
        order=""
        for ((k = 0; k < n; k++)); do order="$order ${list[$(((i + k) % n))]}"; done
        for side in $order; do
            # shellcheck disable=SC2086 # args is a list of fio options
            fio_job "$side" "$name" "${uri[$side]}" $args
        done
        i=$((i + 1))
    done
    local pinned_sides=""
    if [ -n "$PINNED_JOBS" ] && [ "$(nproc)" -ge 2 ]; then
        pinned_pass
        pinned_sides="base-apart ours-apart base-shared ours-shared"
    fi
    local rss_rows=()
    for side in $sides; do
        # shellcheck disable=SC2086 # one or two pids
        rss_rows+=("$side $(peak_rss_mib ${side_pids[$side]})")
    done
    stop_servers
    for side in $sides; do results "$side"; done
    # shellcheck disable=SC2086 # PINNED_JOBS is a list of words
    for side in $pinned_sides; do results "$side" $PINNED_JOBS; done
    if [ $raw = 1 ]; then
        # shellcheck disable=SC2086 # raw_jobs is a list of words
        results raw $raw_jobs
        # shellcheck disable=SC2086 # raw_jobs is a list of words
        results raw2 $raw_jobs
    fi
    # shellcheck disable=SC2086 # sides is a list of words
    table "$label" $sides
    echo "peak RSS (VmHWM) after the fio jobs, MiB:" \
        "$(printf '%s; ' "${rss_rows[@]}")(repl = primary + secondary)"
    echo
    # shellcheck disable=SC2086 # sides is a list of words
    cpu_table "$label" $sides
    echo
    if [ $raw = 1 ]; then
        raw_table "$label"
        echo
    fi
    if [ -n "$pinned_sides" ]; then
        pinned_table "$label"
        echo
    fi
    local kept="$sides $pinned_sides"
    if [ $raw = 1 ]; then kept="$kept raw"; fi
    mkdir -p "$work/summary"
    for side in $kept; do
        cp "$work/$side.results" "$work/summary/$key-$side.results"
    done
    rm -f "$work"/*.results "$work"/*.json "$work"/*.cpu[01] "$dir"/*.img
}

# resync_on KEY LABEL DIR DIRECT: time to resync RESYNC_MIB of out-of-sync
# data against nbdcopy of the same data between two qemu-nbd exports; the two
# times are kept in $work/summary/KEY-resync for the goals.
resync_on() {
    local key=$1 label=$2 dir=$3 direct=$4
    local config="$work/resync.toml" port t0 t1 oos
    port=$(free_port)
    dd if=/dev/zero of="$dir/resync.img" bs=1M count="$RESYNC_MIB" status=none
    dd if=/dev/zero of="$dir/resync-peer.img" bs=1M count="$RESYNC_MIB" status=none
    start_pair resync "$dir/resync.img" "$port" "$direct"
    "$REPLCTL" --config "$config" --node bravo disconnect >/dev/null
    wait_state "$config" alpha "sees bravo gone" 's["connection"] != "Connected"'
    # Random-looking data (fio's buffers), the whole export.
    fio --name=dirty --ioengine=nbd --uri="nbd://127.0.0.1:$port/vm1" \
        --size="${RESYNC_MIB}m" --rw=write --bs=1m --iodepth=16 \
        --output-format=json --output="$work/dirty.json" >/dev/null
    oos=$(field "$config" alpha out_of_sync_bytes)
    t0=$EPOCHREALTIME
    "$REPLCTL" --config "$config" --node bravo connect >/dev/null
    wait_state "$config" alpha "resync done" \
        's["replication"] == "Established" and s["out_of_sync_bytes"] == 0 and s["peer_disk"] == "UpToDate"' \
        "$RESYNC_TIMEOUT_S"
    t1=$EPOCHREALTIME
    local sent rss_a rss_b
    sent=$(field "$config" alpha resync_transferred_bytes)
    rss_a=$(peak_rss_mib "${side_pids[resync-alpha]}")
    rss_b=$(peak_rss_mib "${side_pids[resync-bravo]}")
    stop_servers
    # The same data through nbdcopy: alpha's replica as the source.
    dd if=/dev/zero of="$dir/copy.img" bs=1M count="$RESYNC_MIB" status=none
    local src dst c0 c1
    src=$(free_port)
    dst=$(free_port)
    start_server qemu-nbd copysrc "$dir/resync.img" "$src" "$direct"
    start_server qemu-nbd copydst "$dir/copy.img" "$dst" "$direct"
    c0=$EPOCHREALTIME
    nbdcopy "nbd://127.0.0.1:$src/vm1" "nbd://127.0.0.1:$dst/vm1"
    c1=$EPOCHREALTIME
    local rss_q
    rss_q=$(peak_rss_mib "${side_pids[copysrc]}" "${side_pids[copydst]}")
    stop_servers
    cmp -s "$dir/copy.img" "$dir/resync.img" || { echo "nbdcopy copy differs" >&2; exit 1; }
    mkdir -p "$work/summary"
    $PY - "$label" "$RESYNC_MIB" "$oos" "$sent" "$t0" "$t1" "$c0" "$c1" "$rss_a" "$rss_b" "$rss_q" \
        "$work/summary/$key-resync" <<'PY'
import sys
label, mib, oos, sent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0, t1, c0, c1 = map(float, sys.argv[5:9])
rss_a, rss_b, rss_q = sys.argv[9:12]
r, c = t1 - t0, c1 - c0
with open(sys.argv[12], "w") as f:
    f.write("nbdcopy\t%f\nresync\t%f\n" % (c, r))
print("backing: %s; %d MiB out of sync (%d bytes marked, %d sent by the resync)" % (label, mib, oos, sent))
print("| %-36s | %10s | %10s | %10s |" % ("", "nbdcopy", "resync", "resync/nbdcopy"))
print("|%s|%s|%s|%s|" % ("-" * 38, "-" * 12, "-" * 12, "-" * 16))
print("| %-36s | %10.2f | %10.2f | %14.2f |" % ("%d MiB (s)" % mib, c, r, r / c))
print("| %-36s | %10.1f | %10.1f | %14.2f |" % ("rate (MiB/s)", mib / c, mib / r, c / r))
print("peak RSS (VmHWM), MiB: resync primary %s, secondary %s; the two qemu-nbd for nbdcopy %s" % (rss_a, rss_b, rss_q))
PY
    echo
    rm -f "$work"/*.json "$dir"/*.img
}

# goals: the goals of issues 2 and 4, judged from the numbers this run kept
# in $work/summary
goals() {
    $PY - "$work/summary" "$OURS" "$REPLICATED" "$BACKING" "$RESYNC_MIB" <<'PY'
import os, sys
d, ours_kind, replicated, backing, resync_mib = sys.argv[1:6]
resync_mib = int(resync_mib)
LAT = "4k randwrite qd1 mean latency (us)"
IOPS = "4k randwrite qd32 (IOPS)"
SW = "1M seq write qd16 (MB/s)"

def load(name):
    p = "%s/%s" % (d, name)
    if not os.path.exists(p):
        return None
    return {k: float(v) for k, v in (l.rstrip("\n").split("\t") for l in open(p))}

def verdict(ok):
    return "met" if ok else "not met"

rows = []  # goal, backing, measured, met?
for key in ("disk", "tmpfs"):
    base, ours, repl, raw = (load("%s-%s.results" % (key, s)) for s in ("base", "ours", "repl", "raw"))
    resync = load("%s-resync" % key)
    if base is None:
        rows.append(("all goals", key, "not run (BACKING=%s)" % backing, "-"))
        continue
    # Issue 2: alone at least as good as qemu-nbd on every row (latency: lower).
    goal = "issue 2: alone >= qemu-nbd on every row"
    if ours_kind != "replicatord":
        rows.append((goal, key, "not judged (OURS=%s)" % ours_kind, "-"))
    else:
        ratio = {n: ours[n] / base[n] for n in base}
        good = {n: (1 / r if "latency" in n else r) for n, r in ratio.items()}
        short = [n for n in base if good[n] < 1]
        if short:
            measured = "alone/qemu-nbd: " + ", ".join("%s %.2fx" % (n, ratio[n]) for n in short)
        else:
            worst = min(good, key=good.get)
            measured = "alone/qemu-nbd, worst row: %s %.2fx" % (worst, ratio[worst])
        rows.append((goal, key, measured, verdict(not short)))
        pinned = {p: (load("%s-base-%s.results" % (key, p)), load("%s-ours-%s.results" % (key, p)))
                  for p in ("apart", "shared")}
        if all(b is not None for b, _ in pinned.values()):
            # Per placement: the rows short of qemu-nbd, else the worst row.
            good, measured = True, []
            for p, (b, o) in pinned.items():
                ratio = {n: o[n] / b[n] for n in b}
                g = {n: (1 / r if "latency" in n else r) for n, r in ratio.items()}
                short = [n for n in b if g[n] < 1]
                good = good and not short
                shown = short or [min(g, key=g.get)]
                measured.append("%s: %s%s" % (p, "" if short else "worst ",
                                              ", ".join("%s %.2fx" % (n, ratio[n]) for n in shown)))
            rows.append(("issue 2, fixed CPUs: alone >= qemu-nbd", key, "; ".join(measured),
                         verdict(good)))
    if repl is None:
        why = "OURS=%s" % ours_kind if ours_kind != "replicatord" else "REPLICATED=%s" % replicated
        rows.append(("issue 4: all", key, "not run (%s)" % why, "-"))
        continue
    r = repl[LAT] / base[LAT]
    rows.append(("issue 4: replicated qd1 mean latency <= 1.3x qemu-nbd", key,
                 "%.2fx (%.1f / %.1f us)" % (r, repl[LAT], base[LAT]), verdict(r <= 1.3)))
    for name, what in ((IOPS, "qd32 IOPS"), (SW, "1M write")):
        if key == "disk":
            half = raw[name] / 2
            r = repl[name] / half
            rows.append(("issue 4: replicated %s >= 0.9x raw disk/2" % what, key,
                         "%.2fx (%.1f / %.1f)" % (r, repl[name], half), verdict(r >= 0.9)))
        else:
            r = repl[name] / base[name]
            rows.append(("issue 4: replicated %s >= 0.8x qemu-nbd" % what, key,
                         "%.2fx (%.1f / %.1f)" % (r, repl[name], base[name]), verdict(r >= 0.8)))
    r = resync["resync"] / resync["nbdcopy"]
    note = "" if resync_mib == 1024 else "; %d MiB, not 1 GiB" % resync_mib
    rows.append(("issue 4: 1 GiB resync <= 1.1x nbdcopy", key,
                 "%.2fx (%.2f / %.2f s%s)" % (r, resync["resync"], resync["nbdcopy"], note),
                 verdict(r <= 1.1)))

head = ("goal", "backing", "measured", "met?")
w = [max(len(row[i]) for row in rows + [head]) for i in range(4)]
print("goals of issues 2 and 4, from the numbers of this run:")
print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |")
print("|" + "|".join("-" * (x + 2) for x in w) + "|")
for row in rows:
    print("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(row)) + " |")
PY
}

echo "fio nbd engine, ${RUNTIME_S}s per job, ${SIZE_MIB} MiB export, $(nproc) CPUs, $(date -u +%F)"
case "$BACKING" in
disk | both)
    bench_on disk "file under /var/tmp, O_DIRECT" "$work" true
    if [ "$REPLICATED" = 1 ]; then resync_on disk "file under /var/tmp, O_DIRECT" "$work" true; fi
    ;;
esac
case "$BACKING" in
tmpfs | both)
    shm_dir=$(mktemp -d /dev/shm/nbd-bench.XXXXXX)
    bench_on tmpfs "file on tmpfs, page cache" "$shm_dir" false
    if [ "$REPLICATED" = 1 ]; then resync_on tmpfs "file on tmpfs, page cache" "$shm_dir" false; fi
    ;;
esac
goals
