#!/usr/bin/python3
"""A write workload that logs every acknowledged write, and its checker.

Run with Debian's /usr/bin/python3 (it has the libnbd `nbd` module):

    acked_writer.py write URI LOG FIRST_BLOCK BLOCKS SEED
    acked_writer.py check URI LOG

write: visits the 4 KiB blocks FIRST_BLOCK .. FIRST_BLOCK+BLOCKS-1 once each,
in an order shuffled by SEED, with up to QUEUE_DEPTH writes in flight; every
fourth write carries FUA. Each block gets a unique pattern (magic, seed,
block number repeated). As soon as the server acknowledges a write, the line
"BLOCK SEED" is appended to LOG and flushed to the OS. Exits 0 when every
block was written, EXIT_CONNECTION_LOST when the server went away (the
expected end when the test kills it).

check: reads every block named in LOG and exits 0 if each holds the pattern
of its logged write, else prints the blocks that do not and exits 1.
"""

import random
import struct
import sys

import nbd

BLOCK_BYTES = 4096
QUEUE_DEPTH = 8
EXIT_CONNECTION_LOST = 3
MAGIC = b"REPLACKD"


def pattern(seed, block):
    record = struct.pack("<8sQQQ", MAGIC, seed, block, 0)
    return record * (BLOCK_BYTES // len(record))


def write(uri, log_path, first, count, seed):
    order = list(range(first, first + count))
    random.Random(seed).shuffle(order)
    h = nbd.NBD()
    h.connect_uri(uri)
    inflight = {}
    written = 0
    with open(log_path, "a", buffering=1) as log:
        try:
            pending = iter(enumerate(order))
            done = False
            while not done or inflight:
                while not done and len(inflight) < QUEUE_DEPTH:
                    item = next(pending, None)
                    if item is None:
                        done = True
                        break
                    i, block = item
                    buf = nbd.Buffer.from_bytearray(bytearray(pattern(seed, block)))
                    flags = nbd.CMD_FLAG_FUA if i % 4 == 3 else 0
                    cookie = h.aio_pwrite(buf, block * BLOCK_BYTES, flags=flags)
                    inflight[cookie] = (block, buf)
                if not inflight:
                    break
                h.poll(-1)
                for cookie in list(inflight):
                    if h.aio_command_completed(cookie):
                        block, _ = inflight.pop(cookie)
                        log.write(f"{block} {seed}\n")
                        log.flush()
                        written += 1
        except nbd.Error as e:
            print(f"connection lost after {written} acknowledged writes: {e}", file=sys.stderr)
            sys.exit(EXIT_CONNECTION_LOST)
    h.shutdown()
    print(f"wrote {written} blocks")


def check(uri, log_path):
    entries = []
    with open(log_path) as log:
        for line in log:
            block, seed = line.split()
            entries.append((int(block), int(seed)))
    h = nbd.NBD()
    h.connect_uri(uri)
    bad = []
    for block, seed in entries:
        got = h.pread(BLOCK_BYTES, block * BLOCK_BYTES)
        if got != pattern(seed, block):
            bad.append(block)
    h.shutdown()
    if bad:
        print(f"{len(bad)} of {len(entries)} acknowledged writes are missing: blocks {bad[:20]}")
        sys.exit(1)
    print(f"all {len(entries)} acknowledged writes are there")


def main():
    if len(sys.argv) == 7 and sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif len(sys.argv) == 4 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
