"""The bench speaking the agent's protocol itself, with ovagent's own codec imported
from the bench's copy of the sources (``ovagent.core.protocol``: new_request, sign,
mac_key, send_frame/recv_frame, FrameReader; ``ovagent.core.seal``: open_sealed,
decode_secrets): single round trips (release, status) and the load generator."""

import binascii
import resource
import selectors
import socket
import sys
import time
from collections import Counter
from pathlib import Path


class Codec:
    """ovagent's protocol and seal modules and the machine key's request subkey."""

    def __init__(self, src, key_path):
        sys.path.insert(0, str(src))
        from ovagent.core import protocol, seal
        self.protocol, self.seal = protocol, seal
        self.subkey = protocol.mac_key(Path(key_path).read_bytes())

    def signed(self, op, challenge, **fields):
        """A request of *op* for the agent's *challenge*, signed with the subkey."""
        req = self.protocol.new_request(op, challenge, **fields)
        req["mac"] = self.protocol.sign(self.subkey, req)
        return req

    def open_released(self, req, frame, expect=None):
        """The secrets (name -> bytes) of a 'released' frame answering *req*: the seal
        opened with the request's subkey (seal.open_sealed checks its tag first) and
        decoded.  Raises ValueError (or seal.SealError) when it does not open, or
        holds another number of secrets than *expect*."""
        if not isinstance(frame.get("request_id"), str):
            raise ValueError("released frame without a request_id")
        sealed = binascii.a2b_base64(frame["sealed"], strict_mode=True)
        values = self.seal.decode_secrets(self.seal.open_sealed(self.subkey, req, sealed))
        if expect is not None and len(values) != expect:
            raise ValueError(f"{len(values)} secrets released, expected {expect}")
        return values

    def reply_error(self, req, frame, expect):
        """None if *frame* is a 'released' that opens with *expect* secrets, else
        what is wrong with it."""
        try:
            self.open_released(req, frame, expect)
        except self.seal.SealError:
            return "seal does not open"
        except (ValueError, KeyError, TypeError) as exc:
            return f"bad released frame: {exc}"
        return None

    def next_frame(self, sock, kind, max_size=None):
        """The next frame on a blocking socket, which must be of type *kind*."""
        frame, _ = self.protocol.recv_frame(
            sock, timeout=60, max_size=max_size or self.protocol.MAX_FRAME)
        if frame["type"] != kind:
            raise SystemExit(f"bench: agent answered {frame}")
        return frame

    def round_trip(self, sock_path, op, reply, max_size=None, **fields):
        """(request, reply frame) of one connection: hello, a signed *op* request,
        one frame of type *reply*."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(sock_path)
            req = self.signed(op, self.next_frame(sock, "hello")["challenge"], **fields)
            self.protocol.send_frame(sock, req)
            return req, self.next_frame(sock, reply, max_size)

    def request(self, sock_path, secrets=None, expect=None):
        """One release spoken directly (connect .. 'released', seal opened and its
        secrets counted); returns seconds."""
        t0 = time.perf_counter()
        req, frame = self.round_trip(sock_path, "release", "released",
                                     self.protocol.MAX_RELEASED, secrets=secrets,
                                     argv0="/bin/true")
        error = self.reply_error(req, frame, expect)
        if error:
            raise SystemExit(f"bench: {error}")
        return time.perf_counter() - t0

    def status(self, sock_path):
        """The agent's 'status' frame (a signed status request)."""
        return self.round_trip(sock_path, "status", "status")[1]


class Connection:
    """One connection of a load run: the frame being read (ovagent's FrameReader, None
    between frames), the frame type expected next, when connect() was called, the
    request sent."""

    __slots__ = ("sock", "reader", "expected", "t0", "req")

    def __init__(self, sock, t0):
        self.sock, self.t0 = sock, t0
        self.reader, self.expected, self.req = None, "hello", None

    def frames(self, data, new_reader):
        """The frames completed by *data* (bytes as received, possibly several frames
        or a part of one), each fed to a FrameReader up to its end (the reader checks
        the header; its frame() decodes the body with decode_body).  Raises
        ProtocolError."""
        done, view = [], memoryview(data)
        while view:
            if self.reader is None:
                self.reader = new_reader()
            take = self.reader.want()
            whole = self.reader.feed(view[:take])
            view = view[take:]
            if whole:
                done.append(self.reader.frame())
                self.reader = None
        return done


class LoadGenerator:
    """N concurrent connections, one request each, then a new connection.

    op "release" (``ov run --agent``): connect, 'hello', a signed release request
    (no fds), 'released'; the seal is opened with the request's subkey and its
    secrets counted (*expect*), so a reply that does not open is an error, not a
    request served.  op "spawn" (``ov run --agent --spawn``): connect, 'hello', a
    signed spawn request of /bin/true carrying 3 fds (/dev/null), 'started', 'exit'
    (status 0).  A selectors loop in one thread (no GIL contention); its own CPU per
    request is reported so a saturated generator shows.  Latency runs from connect()
    to the last frame's arrival (before the seal is opened)."""

    def __init__(self, bench, sock_path, op="release", secrets=None, expect=None):
        self.codec, self.path, self.op, self.expect = bench.codec, sock_path, op, expect
        protocol = self.codec.protocol
        if op == "release":
            self.fields = {"secrets": secrets, "argv0": "/bin/true"}
            self.fds, self.replies = (), ("released",)
            self.max_size = protocol.MAX_RELEASED
        elif op == "spawn":
            self.fields = {"secrets": secrets, "argv": ["/bin/true"],
                           "environ": bench.env(), "cwd": str(bench.home),
                           "umask": 0o022}
            self.fds, self.replies = (bench.devnull,) * 3, ("started", "exit")
            self.max_size = protocol.MAX_FRAME
        else:
            raise ValueError(op)
        self.after = {"hello": self.replies[0]}
        self.after.update(zip(self.replies, self.replies[1:]))

    def new_reader(self):
        return self.codec.protocol.FrameReader(self.max_size)

    def check(self, req, frame):
        """None if the last frame is a success, else an error label."""
        if self.op == "spawn":
            return None if frame.get("code") == 0 else f"exit {frame.get('code')}"
        return self.codec.reply_error(req, frame, self.expect)

    def run(self, concurrency, duration=None, count=None):
        """Keep *concurrency* connections busy until *count* were launched or for
        *duration* seconds; {'latencies', 'errors', 'elapsed', 'completed',
        'gen_cpu'}."""
        return LoadRun(self, concurrency, duration, count).measure()


class LoadRun:
    """One run of a LoadGenerator: a selectors loop over its connections."""

    def __init__(self, gen, concurrency, duration, count):
        self.gen, self.concurrency, self.count = gen, concurrency, count
        self.deadline = None if duration is None else time.perf_counter() + duration
        self.sel = selectors.DefaultSelector()
        self.conns = {}         # socket -> Connection
        self.latencies, self.errors, self.launched = [], Counter(), 0

    def want_more(self):
        if self.count is not None:
            return self.launched < self.count
        return time.perf_counter() < self.deadline

    def launch(self):
        """Open one more connection; False if connect() would block."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        t0 = time.perf_counter()
        try:
            sock.connect(self.gen.path)
        except BlockingIOError:
            self.errors["connect-eagain"] += 1
            sock.close()
            return False
        self.launched += 1
        self.conns[sock] = Connection(sock, t0)
        self.sel.register(sock, selectors.EVENT_READ)
        return True

    def fill(self):
        while len(self.conns) < self.concurrency and self.want_more():
            if not self.launch():
                break

    def finish(self, conn, error=None):
        self.sel.unregister(conn.sock)
        del self.conns[conn.sock]
        conn.sock.close()
        if error:
            self.errors[error] += 1

    def on_frame(self, conn, frame):
        """Advance one connection; False once it is finished."""
        kind = frame["type"]
        if kind == "error":
            self.finish(conn, frame.get("code"))
            return False
        if kind != conn.expected:
            self.finish(conn, f"unexpected {kind} in {conn.expected}")
            return False
        if kind == "hello":
            conn.req = self.gen.codec.signed(self.gen.op, frame["challenge"],
                                             **self.gen.fields)
            conn.sock.setblocking(True)    # one small frame: sendmsg takes it whole
            self.gen.codec.protocol.send_frame(conn.sock, conn.req, fds=self.gen.fds)
            conn.sock.setblocking(False)
        elif kind == self.gen.replies[-1]:
            elapsed = time.perf_counter() - conn.t0
            error = self.gen.check(conn.req, frame)
            if error is None:
                self.latencies.append(elapsed)
            self.finish(conn, error)
            return False
        conn.expected = self.gen.after[kind]
        return True

    def on_readable(self, conn):
        try:
            data = conn.sock.recv(1 << 20)
        except OSError as exc:
            self.finish(conn, f"recv: {exc.strerror}")
            return
        if not data:
            self.finish(conn, f"eof in {conn.expected}")
            return
        try:
            frames = conn.frames(data, self.gen.new_reader)
        except self.gen.codec.protocol.ProtocolError as exc:
            self.finish(conn, f"bad frame: {exc}")
            return
        for frame in frames:
            try:
                if not self.on_frame(conn, frame):
                    break
            except OSError as exc:
                self.finish(conn, f"send: {exc.strerror}")
                break

    def loop(self):
        while len(self.conns) < self.concurrency and self.want_more():
            if not self.launch():
                time.sleep(0.001)
        while self.conns:
            for key, _ in self.sel.select(60):
                self.on_readable(self.conns[key.fileobj])
                self.fill()
            if not self.conns and self.want_more():
                self.launch()

    def measure(self):
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        self.loop()
        elapsed = time.perf_counter() - start
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        self.sel.close()
        gen_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        return {"latencies": self.latencies, "errors": self.errors, "elapsed": elapsed,
                "completed": len(self.latencies), "gen_cpu": gen_cpu}
