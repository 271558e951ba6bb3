#!/usr/bin/python3
"""NBD server conformance cases for the bad-input rows of the NBD spec.

Run with Debian's /usr/bin/python3 (it has the libnbd `nbd` module):

    nbd_cases.py CASE URI [RO_URI]

Each CASE exercises one row of reference/nbd-protocol.md section 1.8 (or one
interoperability rule) against a running server and exits 0 when the server
behaved as the spec requires, or raises/exits non-zero with a message saying
what it did instead. Cases that libnbd refuses to send use a small raw-socket
client (RawClient) that speaks fixed-newstyle negotiation and simple replies.

The URI is nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH.
"""

import errno
import os
import socket
import struct
import sys
import time
import urllib.parse

import nbd

# Every socket operation of the raw client gives up after this many seconds.
RAW_SOCKET_TIMEOUT_S = 10.0
# libnbd strict-mode flags: 0 lets us send requests a strict client would not.
STRICT_OFF = 0

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERR_BIT | 1
REP_ERR_POLICY = REP_ERR_BIT | 2

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3

INFO_EXPORT = 0


def fail(msg):
    raise AssertionError(msg)


def err_num(e):
    """The errno number of an nbd.Error (its .errno property is the name)."""
    return e.args[1] if len(e.args) > 1 else None


def expect_errno(what, want, fn, *args, **kwargs):
    """Runs fn and requires it to fail with NBD errno `want`."""
    try:
        fn(*args, **kwargs)
    except nbd.Error as e:
        if err_num(e) != want:
            fail("%s: expected %s, got %s" % (what, errno.errorcode[want], e))
        return
    fail("%s: expected %s, but the request succeeded" % (what, errno.errorcode[want]))


def export_name(uri):
    u = urllib.parse.urlparse(uri)
    return urllib.parse.unquote(u.path.lstrip("/"))


def connect(uri, meta=True, strict=STRICT_OFF, sr=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_request_structured_replies(sr)
    h.connect_uri(uri)
    h.set_strict_mode(strict)
    return h


def assert_alive(h, what):
    """The connection still answers a normal request after `what`."""
    try:
        h.pread(512, 0)
    except nbd.Error as e:
        fail("connection unusable after %s: %s" % (what, e.string))


def pattern(byte, n):
    return bytes([byte]) * n


# ---------------------------------------------------------------- raw client

class RawClient:
    """A minimal fixed-newstyle client for requests libnbd will not send."""

    def __init__(self, uri):
        u = urllib.parse.urlparse(uri)
        if u.scheme == "nbd+unix":
            path = urllib.parse.parse_qs(u.query)["socket"][0]
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(RAW_SOCKET_TIMEOUT_S)
            self.sock.connect(path)
        else:
            self.sock = socket.create_connection((u.hostname, u.port or 10809),
                                                 timeout=RAW_SOCKET_TIMEOUT_S)
        self.name = export_name(uri).encode()
        self.size = None

    def recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("server closed after %d of %d bytes" % (len(buf), n))
            buf += chunk
        return buf

    def greeting(self, client_flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        magic, opt_magic, hflags = struct.unpack(">QQH", self.recv_exact(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            fail("bad greeting %x %x" % (magic, opt_magic))
        if not hflags & FLAG_FIXED_NEWSTYLE:
            fail("server is not fixed-newstyle (flags %x)" % hflags)
        self.sock.sendall(struct.pack(">I", client_flags))

    def send_option(self, opt, data=b""):
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def recv_option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != OPT_REPLY_MAGIC:
            fail("bad option reply magic %x" % magic)
        return opt, rtype, self.recv_exact(length)

    def go(self):
        data = struct.pack(">I", len(self.name)) + self.name + struct.pack(">H", 0)
        self.send_option(OPT_GO, data)
        while True:
            opt, rtype, payload = self.recv_option_reply()
            if opt != OPT_GO:
                fail("reply for option %d while waiting for GO" % opt)
            if rtype == REP_INFO:
                (itype,) = struct.unpack(">H", payload[:2])
                if itype == INFO_EXPORT:
                    self.size, _flags = struct.unpack(">QH", payload[2:12])
            elif rtype == REP_ACK:
                if self.size is None:
                    fail("GO acknowledged without INFO_EXPORT")
                return
            else:
                fail("GO refused with reply type %x: %r" % (rtype, payload))

    def request(self, cmd, cookie, offset, length, payload=b"", flags=0,
                magic=REQUEST_MAGIC):
        self.sock.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)
                          + payload)

    def simple_reply(self, read_len=0):
        magic, err, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        if magic != SIMPLE_REPLY_MAGIC:
            fail("expected a simple reply, got magic %x" % magic)
        data = self.recv_exact(read_len) if err == 0 and read_len else b""
        return err, cookie, data

    def expect_closed(self, what):
        """The server closes the connection (EOF or reset) within the timeout."""
        deadline = time.monotonic() + RAW_SOCKET_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                return
            except socket.timeout:
                break
            if not chunk:
                return
            # The server may still send bytes (e.g. an error reply) before closing.
        fail("server did not close the connection after %s" % what)

    def close(self):
        self.sock.close()


# --------------------------------------------------------------------- cases

def case_write_past_end_enospc(uri):
    h = connect(uri)
    size = h.get_size()
    expect_errno("WRITE past end", errno.ENOSPC, h.pwrite, pattern(1, 4096), size)
    expect_errno("WRITE straddling end", errno.ENOSPC, h.pwrite, pattern(1, 8192), size - 4096)
    assert_alive(h, "write past end")


def case_write_zeroes_past_end_enospc(uri):
    h = connect(uri)
    size = h.get_size()
    expect_errno("WRITE_ZEROES past end", errno.ENOSPC, h.zero, 4096, size)
    assert_alive(h, "write zeroes past end")


def case_read_past_end_einval(uri):
    h = connect(uri)
    size = h.get_size()
    expect_errno("READ past end", errno.EINVAL, h.pread, 4096, size)
    expect_errno("READ straddling end", errno.EINVAL, h.pread, 8192, size - 4096)
    assert_alive(h, "read past end")


def case_trim_past_end_einval(uri):
    h = connect(uri)
    size = h.get_size()
    expect_errno("TRIM past end", errno.EINVAL, h.trim, 4096, size)
    assert_alive(h, "trim past end")


def case_block_status_past_end_einval(uri):
    h = connect(uri)
    size = h.get_size()
    expect_errno("BLOCK_STATUS past end", errno.EINVAL, h.block_status, 4096, size,
                 lambda *a: 0)
    assert_alive(h, "block status past end")


def case_unknown_command_flag_einval(uri):
    h = connect(uri)
    unknown_flag = 1 << 9  # not defined by the spec for any command
    expect_errno("READ with an unknown flag", errno.EINVAL, h.pread, 512, 0, unknown_flag)
    expect_errno("WRITE with an unknown flag", errno.EINVAL, h.pwrite, pattern(2, 512), 0,
                 unknown_flag)
    # NO_HOLE is only valid on WRITE_ZEROES.
    expect_errno("WRITE with NO_HOLE", errno.EINVAL, h.pwrite, pattern(2, 512), 0,
                 nbd.CMD_FLAG_NO_HOLE)
    assert_alive(h, "unknown command flags")


def case_block_status_without_meta_context_einval(uri):
    h = connect(uri, meta=False)
    if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        fail("base:allocation negotiated although the client did not ask for it")
    expect_errno("BLOCK_STATUS without a context", errno.EINVAL, h.block_status, 4096, 0,
                 lambda *a: 0)
    assert_alive(h, "block status without a meta context")


def case_zero_length_requests_answered_without_disconnect(uri):
    h = connect(uri)
    for what, fn in [
        ("READ", lambda: h.pread(0, 0)),
        ("WRITE", lambda: h.pwrite(b"", 0)),
        ("TRIM", lambda: h.trim(0, 0)),
        ("WRITE_ZEROES", lambda: h.zero(0, 0)),
        ("BLOCK_STATUS", lambda: h.block_status(0, 0, lambda *a: 0)),
    ]:
        try:
            fn()
        except nbd.Error as e:
            # An error reply is allowed; a dead connection is not.
            if err_num(e) in (None, 0, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE):
                fail("zero-length %s killed the connection: %s" % (what, e.string))
        assert_alive(h, "zero-length " + what)


def case_write_on_read_only_eperm(uri):
    h = connect(uri)
    if not h.is_read_only():
        fail("export not advertised read-only")
    expect_errno("WRITE on read-only", errno.EPERM, h.pwrite, pattern(3, 4096), 0)
    expect_errno("TRIM on read-only", errno.EPERM, h.trim, 4096, 0)
    expect_errno("WRITE_ZEROES on read-only", errno.EPERM, h.zero, 4096, 0)
    assert_alive(h, "writes on a read-only export")


def case_unknown_option_err_unsup_then_negotiation_continues(uri):
    c = RawClient(uri)
    c.greeting()
    c.send_option(0x7FFF0042, b"some option data the server must consume")
    opt, rtype, _ = c.recv_option_reply()
    if opt != 0x7FFF0042 or rtype != REP_ERR_UNSUP:
        fail("unknown option answered with option %x type %x, want ERR_UNSUP" % (opt, rtype))
    c.go()
    c.request(CMD_READ, 7, 0, 512)
    err, cookie, data = c.simple_reply(512)
    if err != 0 or cookie != 7 or len(data) != 512:
        fail("read after an unknown option failed: err %d cookie %d" % (err, cookie))
    c.request(CMD_DISC, 8, 0, 0)
    c.close()


def case_starttls_refused_and_negotiation_continues(uri):
    c = RawClient(uri)
    c.greeting()
    c.send_option(OPT_STARTTLS)
    opt, rtype, _ = c.recv_option_reply()
    if opt != OPT_STARTTLS or rtype not in (REP_ERR_UNSUP, REP_ERR_POLICY):
        fail("STARTTLS answered with type %x, want ERR_UNSUP or ERR_POLICY" % rtype)
    c.go()
    c.close()
    # libnbd with TLS allowed (not required) falls back to plaintext.
    h = nbd.NBD()
    h.set_tls(nbd.TLS_ALLOW)
    h.connect_uri(uri)
    if h.get_tls_negotiated():
        fail("TLS negotiated by a server that has no TLS")
    assert_alive(h, "a refused STARTTLS")


def case_list_shows_the_export(uri):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    names = []
    h.opt_list(lambda name, desc: names.append(name) or 0)
    if export_name(uri) not in names:
        fail("LIST gave %r, want it to contain %r" % (names, export_name(uri)))
    h.opt_abort()


def case_info_of_unknown_export_errors_then_known_export_works(uri):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    h.set_export_name("no-such-export")
    try:
        h.opt_info()
    except nbd.Error:
        pass
    else:
        fail("INFO of an unknown export succeeded")
    h.set_export_name(export_name(uri))
    h.opt_info()
    size = h.get_size()
    h.opt_go()
    if h.get_size() != size:
        fail("INFO and GO disagree on the size")
    assert_alive(h, "INFO of an unknown export")


def case_oversized_write_errors_and_connection_survives(uri):
    h = connect(uri)
    max_payload = h.get_block_size(nbd.SIZE_MAXIMUM)
    if max_payload != 32 << 20:
        fail("maximum payload %d, want 32 MiB" % max_payload)
    h.pwrite(pattern(4, 4096), 0)
    try:
        h.pwrite(pattern(5, 33 << 20), 0)
    except nbd.Error as e:
        if err_num(e) not in (errno.EINVAL, errno.EOVERFLOW, errno.ENOMEM):
            fail("33 MiB write failed with an unexpected error: %s" % e.string)
    else:
        fail("a 33 MiB write above the advertised maximum succeeded")
    # The payload was drained: the stream is in sync and nothing was applied.
    got = h.pread(4096, 0)
    if got != pattern(4, 4096):
        fail("oversized write was (partly) applied or the stream desynchronised")
    h.pwrite(pattern(6, 4096), 0)
    if h.pread(4096, 0) != pattern(6, 4096):
        fail("write after the oversized write did not land")


def case_structured_replies_off_still_works(uri):
    h = connect(uri, meta=False, sr=False)
    if h.get_structured_replies_negotiated():
        fail("structured replies negotiated although not requested")
    if h.can_df():
        fail("DF advertised without structured replies")
    data = os.urandom(65536)
    h.pwrite(data, 1 << 20)
    if h.pread(65536, 1 << 20) != data:
        fail("read-back mismatch with simple replies")
    expect_errno("READ past end with simple replies", errno.EINVAL, h.pread, 4096, h.get_size())
    assert_alive(h, "an error with simple replies")


def read_chunks(h, count, offset, flags=0):
    """Reads with pread_structured; returns (data, [(status, offset, len)])."""
    chunks = []

    def chunk(subbuf, off, status, error):
        chunks.append((status, off, len(subbuf)))
        return 0

    data = h.pread_structured(count, offset, chunk, flags)
    return data, sorted(chunks, key=lambda c: c[1])


def case_sparse_read_sends_holes_as_offset_hole(uri):
    h = connect(uri, meta=False)
    mib = 1 << 20
    data = os.urandom(65536)
    h.pwrite(data, mib)
    h.pwrite(pattern(7, mib), 2 * mib)
    h.trim(mib, 2 * mib)
    h.flush()
    start, count = mib - 65536, 2 * mib
    got, chunks = read_chunks(h, count, start)
    if got != pattern(0, 65536) + data + pattern(0, count - 2 * 65536):
        fail("sparse read returned wrong bytes")
    at = start
    for status, off, n in chunks:
        if off != at or n == 0:
            fail("chunks do not tile the request: %r" % chunks)
        at += n
    if at != start + count:
        fail("chunks do not cover the request: %r" % chunks)
    data_chunks = [c for c in chunks if c[0] == nbd.READ_DATA]
    hole_chunks = [c for c in chunks if c[0] == nbd.READ_HOLE]
    if not hole_chunks:
        fail("no OFFSET_HOLE chunk for never-written and trimmed ranges: %r" % chunks)
    # The hole before the data comes back as a hole (after the data a
    # server may send zeroes as data: finding where data stops can cost
    # more than sending it).
    for _, off, n in data_chunks:
        if off < mib:
            fail("the hole before the data came back as data: %r" % chunks)
    if not any(off <= mib and off + n >= mib + 65536 for _, off, n in data_chunks):
        fail("the written range did not come back as one data chunk: %r" % chunks)
    # DF: the same read in one OFFSET_DATA chunk.
    got, chunks = read_chunks(h, count, start, nbd.CMD_FLAG_DF)
    if got != pattern(0, 65536) + data + pattern(0, count - 2 * 65536):
        fail("DF read returned wrong bytes")
    if chunks != [(nbd.READ_DATA, start, count)]:
        fail("DF read was fragmented: %r" % chunks)


def case_cache_is_advertised_and_changes_nothing(uri):
    h = connect(uri, meta=False)
    if not h.can_cache():
        fail("SEND_CACHE not advertised")
    data = os.urandom(131072)
    h.pwrite(data, 4096)
    h.cache(1 << 20, 0)
    if h.pread(131072, 4096) != data:
        fail("CACHE changed what a read returns")
    expect_errno("CACHE past end", errno.EINVAL, h.cache, 4096, h.get_size())
    assert_alive(h, "CACHE")


def case_fast_zero_is_fast_or_enotsup(uri):
    h = connect(uri)
    if not h.can_fast_zero():
        fail("FAST_ZERO not advertised")
    off, n = 2 << 20, 1 << 20
    h.pwrite(pattern(7, n), off)
    try:
        h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO)
    except nbd.Error as e:
        if err_num(e) != errno.ENOTSUP:
            fail("FAST_ZERO failed with %s, only ENOTSUP is allowed" % e.string)
        if h.pread(n, off) != pattern(7, n):
            fail("a refused FAST_ZERO changed the data")
    else:
        if h.pread(n, off) != bytes(n):
            fail("FAST_ZERO succeeded but the range does not read as zeroes")
    # With NO_HOLE too, the same rule holds.
    try:
        h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    except nbd.Error as e:
        if err_num(e) != errno.ENOTSUP:
            fail("FAST_ZERO|NO_HOLE failed with %s" % e.string)
    assert_alive(h, "fast zero")


def case_multi_conn_flush_on_one_connection_visible_on_all(uri):
    hs = [connect(uri) for _ in range(3)]
    for h in hs:
        if not h.can_multi_conn():
            fail("CAN_MULTI_CONN not advertised")
    data = os.urandom(1 << 16)
    off = 3 << 20
    hs[1].pwrite(data, off)
    hs[2].flush()
    if hs[0].pread(len(data), off) != data:
        fail("write on conn 1 + flush on conn 2 not visible on conn 0")
    for h in hs:
        h.shutdown()


def case_bad_request_magic_closes_connection(uri):
    c = RawClient(uri)
    c.greeting()
    c.go()
    c.request(CMD_READ, 1, 0, 512, magic=0x12560953)
    c.expect_closed("a request with bad magic")
    c.close()
    h = connect(uri)
    assert_alive(h, "another client's bad magic")


def case_unknown_client_flags_close_connection(uri):
    c = RawClient(uri)
    c.greeting(client_flags=FLAG_FIXED_NEWSTYLE | (1 << 30))
    try:
        c.send_option(OPT_LIST)
    except (BrokenPipeError, ConnectionResetError):
        pass
    c.expect_closed("unknown client flags")
    c.close()
    h = connect(uri)
    assert_alive(h, "another client's unknown flags")


def case_truncated_write_payload_then_close_applies_nothing(uri):
    bystander = connect(uri)
    off, n = 5 << 20, 64 << 10
    before = os.urandom(n)
    bystander.pwrite(before, off)
    bystander.flush()
    c = RawClient(uri)
    c.greeting()
    c.go()
    c.request(CMD_WRITE, 9, off, n, payload=pattern(8, 1000))
    c.close()
    # The bystander keeps working and sees the old data; so does a new client.
    if bystander.pread(n, off) != before:
        fail("a truncated write was (partly) applied")
    later = connect(uri)
    later.flush()
    if later.pread(n, off) != before:
        fail("a truncated write was (partly) applied (seen by a new client)")
    bystander.pwrite(pattern(9, 4096), 0)
    if later.pread(4096, 0) != pattern(9, 4096):
        fail("the bystander's write after the truncated one is not visible")


def case_export_name_option_serves_with_and_without_zeroes(uri):
    for no_zeroes in (False, True):
        c = RawClient(uri)
        c.greeting(FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0))
        c.send_option(OPT_EXPORT_NAME, c.name)
        size, tflags = struct.unpack(">QH", c.recv_exact(10))
        if not no_zeroes and c.recv_exact(124) != bytes(124):
            fail("EXPORT_NAME reply padding is not 124 zero bytes")
        if size != connect(uri).get_size():
            fail("EXPORT_NAME gave size %d" % size)
        if not tflags & 1:
            fail("HAS_FLAGS missing from transmission flags %x" % tflags)
        c.request(CMD_READ, 3, 4096, 4096)
        err, cookie, data = c.simple_reply(4096)
        if err != 0 or cookie != 3 or len(data) != 4096:
            fail("read after EXPORT_NAME failed: err %d cookie %d" % (err, cookie))
        c.request(CMD_DISC, 4, 0, 0)
        c.expect_closed("NBD_CMD_DISC")
        c.close()


def case_export_name_of_unknown_export_closes(uri):
    c = RawClient(uri)
    c.greeting()
    c.send_option(OPT_EXPORT_NAME, b"no-such-export")
    c.expect_closed("EXPORT_NAME of an unknown export")
    c.close()
    assert_alive(connect(uri), "another client's unknown EXPORT_NAME")


def case_abort_option_is_acknowledged(uri):
    c = RawClient(uri)
    c.greeting()
    c.send_option(OPT_ABORT)
    try:
        opt, rtype, _ = c.recv_option_reply()
    except EOFError:
        return  # the spec lets clients tolerate a close without the ACK
    if opt != OPT_ABORT or rtype != REP_ACK:
        fail("ABORT answered with type %x, want ACK" % rtype)
    c.expect_closed("NBD_OPT_ABORT")
    c.close()


def case_disc_after_pipelined_writes_applies_them(uri):
    c = RawClient(uri)
    c.greeting()
    c.go()
    off, n, count = 6 << 20, 64 << 10, 8
    blocks = [os.urandom(n) for _ in range(count)]
    # Pipeline the writes and DISC without reading any reply first.
    for i, data in enumerate(blocks):
        c.request(CMD_WRITE, 100 + i, off + i * n, n, payload=data)
    c.request(CMD_DISC, 200, 0, 0)
    # The server MUST handle every outstanding request; it may or may not
    # still send their replies (qemu-nbd does not). Any reply sent must be
    # a success for one of our cookies, and the connection must then close.
    cookies = set()
    while True:
        try:
            err, cookie, _ = c.simple_reply()
        except (EOFError, ConnectionResetError):
            break
        if err != 0 or cookie not in range(100, 100 + count) or cookie in cookies:
            fail("unexpected reply to a pipelined write: cookie %d error %d" % (cookie, err))
        cookies.add(cookie)
    c.close()
    h = connect(uri)
    if h.pread(count * n, off) != b"".join(blocks):
        fail("writes sent before DISC were not all applied")


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


def main():
    if sys.argv[1:] == ["--list"]:
        print("\n".join(sorted(CASES)))
        return 0
    if len(sys.argv) != 3 or sys.argv[1] not in CASES:
        sys.stderr.write("usage: %s CASE URI | --list\ncases: %s\n"
                         % (sys.argv[0], " ".join(sorted(CASES))))
        return 2
    CASES[sys.argv[1]](sys.argv[2])
    print("ok", sys.argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
