"""The agent's event loop: one thread accepts every connection, reads its request
and writes its answer, without a thread per connection.

Before reading a byte of a new connection it checks SO_PEERCRED and takes a pidfd
(ovagent/agent/peer.py); it then sends the hello and reads the request frame as its bytes
arrive, under a deadline per connection.  Status and release requests are answered
here: they are short, and one thread holding the interpreter lock beats dozens
handing it to each other (bench/: 28 context switches per request with a thread per
connection).  A spawn request's connection moves to a thread of its own, which
supervises the command until it exits.  The loop also feeds the systemd watchdog and
handles signals: on SIGHUP it reads the policy again; on SIGTERM it stops accepting,
finishes what it has read, waits up to --drain seconds for spawned commands, then
detaches from them.
"""

import collections
import errno
import os
import selectors
import signal
import socket
import time

from .. import __version__
from ..core import protocol
from ..core.protocol import ProtocolError
from .auth import authenticate
from .peer import Peer
from .release import release
from .state import refuse_and_close
from .systemd import Notifier

DEFAULT_MAX_CLIENTS = 64
DEFAULT_DRAIN = 30.0          # seconds SIGTERM waits for requests and spawned commands
ACCEPT_PAUSE = 0.1            # seconds the listener rests after EMFILE
ACCEPT_BATCH = 16             # connections accepted per wake-up of the listener
OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class Connection:
    """One accepted connection while the loop reads its request and writes its
    answer; after the answer is queued, nothing more is read from it.

    Descriptors are received only when *takes_fds*: from a caller of the agent's own
    uid, the only one that may --spawn.  The kernel drops anyone else's, so the loop
    never closes a descriptor of theirs (closing a FUSE file waits for whoever
    serves it)."""

    def __init__(self, sock, peer, deadline, takes_fds):
        self.sock, self.peer, self.deadline = sock, peer, deadline
        self.takes_fds = takes_fds
        self.challenge = os.urandom(protocol.CHALLENGE_BYTES).hex()
        self.request_id = os.urandom(8).hex()
        self.reader = protocol.FrameReader()
        self.outgoing = bytearray(protocol.encode_frame({
            "type": "hello", "version": protocol.VERSION,
            "agent": f"ov-agent {__version__}", "challenge": self.challenge}))
        self.answered = False

    def queue(self, data):
        """The answer: written as the client reads it, then the connection closes."""
        self.outgoing += data
        self.answered = True
        self.deadline = time.monotonic() + protocol.FRAME_TIMEOUT

    def send(self):
        """Write what the client will take now; True once everything is written."""
        try:
            del self.outgoing[:self.sock.send(self.outgoing)]
        except (BlockingIOError, InterruptedError):
            pass
        return not self.outgoing

    def events(self):
        """What to wait for: writing what is queued, reading until the request is
        whole."""
        return (WRITE if self.outgoing else 0) | (0 if self.answered else READ)

    def close(self):
        self.reader.close_fds()
        self.sock.close()
        self.peer.close()


class SignalPipe:
    """SIGTERM, SIGINT and SIGHUP, as bytes on a socket the loop selects on
    (signal.set_wakeup_fd); close() restores the handlers and the wake-up fd."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.reader, self._writer = socket.socketpair()
        for end in (self.reader, self._writer):
            end.setblocking(False)
        self._previous = signal.set_wakeup_fd(self._writer.fileno(),
                                              warn_on_full_buffer=False)
        self._handlers = {signum: signal.signal(signum, lambda *_: None)
                          for signum in self.SIGNALS}

    def received(self):
        """The signals that arrived since the last call."""
        try:
            return set(self.reader.recv(64))
        except BlockingIOError:
            return set()

    def close(self):
        signal.set_wakeup_fd(self._previous)
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self.reader.close()
        self._writer.close()


class Listener:
    """The listening socket in the selector: polled, resting for a moment after the
    agent ran out of descriptors (instead of spinning; queued clients wait in the
    backlog), or withdrawn while the agent stops.  It accepts connections with
    their peers' credentials."""

    def __init__(self, sock, selector):
        self.sock, self.selector = sock, selector
        self.polled = False
        self.resting_until = None          # monotonic time

    def poll(self, on):
        if on != self.polled:
            if on:
                self.selector.register(self.sock, READ, "accept")
            else:
                self.selector.unregister(self.sock)
            self.polled = on

    def rest(self):
        self.poll(False)
        self.resting_until = time.monotonic() + ACCEPT_PAUSE

    def wake(self, now, stopping):
        if self.resting_until is not None and now >= self.resting_until:
            self.resting_until = None
            self.poll(not stopping)

    def accepted(self):
        """(socket, Peer) of each new connection, a few at a time: a queue full of
        connections to refuse empties faster, and those admitted still get their
        turn."""
        for _ in range(ACCEPT_BATCH):
            connection = self.accept() if self.polled else None
            if connection is None:
                return
            yield connection

    def accept(self):
        """(socket, Peer) of a new connection, or None: none was waiting, it is gone
        already, or the agent is out of descriptors (then the listener rests)."""
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno not in OUT_OF_DESCRIPTORS:
                raise
            self.rest()
            return None
        try:
            return sock, Peer(sock)   # SO_PEERCRED and a pidfd before reading any byte
        except Exception:             # gone already, or /proc unreadable: nobody to serve
            sock.close()
            return None


def giving_way(connections, owner):
    """At capacity, the connection that makes room for a request of *owner* (a
    Peer.owner: a user's slice, else a unit, else a uid), or None: the oldest of
    those still sending their request from the owner that holds the most of them,
    if that is another owner holding at least two more.  So no one keeps the others
    out by holding every slot, while one alone may use them all."""
    waiting = [conn for conn in connections if not conn.answered]
    held = collections.Counter(conn.peer.owner for conn in waiting)
    if not held:
        return None
    hog, most = held.most_common(1)[0]
    if hog == owner or most < held[owner] + 2:
        return None
    return min((conn for conn in waiting if conn.peer.owner == hog),
               key=lambda conn: conn.deadline)


def answer_to(state, conn, req, subkey):
    """The encoded answer to a verified status, release or consumers request."""
    if req["op"] == "release":
        return release(state, conn.peer, req, subkey, conn.request_id)
    return protocol.encode_frame(state.status() if req["op"] == "status" else
                                 state.list_consumers(conn.peer, req))


class Server:
    def __init__(self, listener, state, spawner, *, max_clients=DEFAULT_MAX_CLIENTS,
                 drain=DEFAULT_DRAIN):
        self.state, self.spawner = state, spawner
        self.max_clients, self.drain = max_clients, drain
        self.notifier = Notifier()
        self.selector = selectors.DefaultSelector()
        self.listener = Listener(listener, self.selector)
        self.connections = set()
        self._stop_at = None                       # monotonic time of SIGTERM
        # From here to the end of serve(): a HUP sent as soon as the agent said it
        # started (or while it drains) is a reload, never the default death.
        self._signals = SignalPipe()

    # -- the loop ---------------------------------------------------------------------

    def serve(self):
        """Serve until SIGTERM or SIGINT, then drain (a clean stop: exit status 0)."""
        self.listener.sock.setblocking(False)
        self.listener.poll(True)
        self.selector.register(self._signals.reader, READ, "signal")
        status = f"serving ({self.state.keys.mode})"
        self.notifier.ready(status)
        self.state.audit.event("ready", f"ov-agent ready, {status}",
                               mode=self.state.keys.mode, scope=self.state.keys.scope)
        try:
            try:
                self._loop()
            finally:
                for conn in list(self.connections):
                    self._close(conn)
                self.selector.close()
            left = self.drain - (time.monotonic() - (self._stop_at or time.monotonic()))
            self.spawner.finish(max(0.0, left))
        finally:
            self.state.finish()                # spawns may deny until here
            self._signals.close()
        return 0

    def _loop(self):
        next_watchdog = next_summary = time.monotonic()
        while self._stop_at is None or self.connections:
            now = time.monotonic()
            if self.notifier.watchdog_interval and now >= next_watchdog:
                self.notifier.watchdog()
                next_watchdog = now + self.notifier.watchdog_interval
            if now >= next_summary:
                self.state.every_second()
                next_summary = now + 1.0
            self.listener.wake(now, stopping=self._stop_at is not None)
            for key, events in self.selector.select(self._timeout(now)):
                try:
                    self._on_event(key, events)
                except Exception as exc:   # one connection never takes the agent down
                    self._failed(key.data, exc)
            self._expire(time.monotonic())

    def _failed(self, conn, exc):
        """An unexpected error while serving: refuse that connection, keep serving."""
        if conn in self.connections:
            if conn.answered:
                self._close(conn)
            else:
                self._refuse(conn, exc)

    def _timeout(self, now):
        """Until the next deadline, end of a pause or of the drain, or watchdog ping
        (at most 1 s)."""
        moments = [now + min(1.0, self.notifier.watchdog_interval or 1.0)]
        moments += [conn.deadline for conn in self.connections]
        if self.listener.resting_until is not None:
            moments.append(self.listener.resting_until)
        if self._stop_at is not None:
            moments.append(self._stop_at + self.drain)
        return max(0.0, min(moments) - now)

    def _on_event(self, key, events):
        if key.data == "signal":
            self._on_signals()
        elif key.data == "accept":
            for sock, peer in self.listener.accepted():
                self._admit(sock, peer)
        elif key.data in self.connections:
            if events & WRITE:
                self._flush(key.data)
            if events & READ and key.data in self.connections:
                self._read(key.data)

    def _on_signals(self):
        received = self._signals.received()
        if signal.SIGHUP in received:      # systemctl reload
            self.notifier.notify(f"STATUS={self.state.reload_policy()}")
        if self._stop_at is None and received & {signal.SIGTERM, signal.SIGINT}:
            self._stop_at = time.monotonic()
            self.listener.poll(False)
            self.notifier.stopping("stopping: waiting for running requests")
            self.state.audit.event("stopping", "ov-agent stopping",
                                   running=self.state.counters["running"])

    def _expire(self, now):
        """Refuse a request that did not arrive in time; drop an answer not read in
        time, and everything once a stopping agent has drained for --drain seconds."""
        draining_over = self._stop_at is not None and now >= self._stop_at + self.drain
        for conn in [conn for conn in self.connections if conn.deadline <= now]:
            if conn.answered:
                self._close(conn)
            else:
                self._refuse(conn, protocol.timed_out())
        if draining_over:
            for conn in list(self.connections):
                self._close(conn)

    # -- one connection ---------------------------------------------------------------

    def _admit(self, sock, peer):
        """Serve a new connection, or refuse it at once (uid not served, or busy)."""
        why = self.state.admits(peer)
        code = protocol.E_PEER
        active = len(self.connections) + self.spawner.running()
        if why is None and active >= self.max_clients and \
                not self._make_room_for(peer.owner):
            self.state.count("busy")
            code, why = protocol.E_BUSY, (f"agent busy: {self.max_clients} requests "
                                          "already running")
        if why is not None:
            refuse_and_close(self.state, sock, peer, ProtocolError(code, why))
            return
        sock.setblocking(False)
        conn = Connection(sock, peer, time.monotonic() + protocol.REQUEST_TIMEOUT,
                          takes_fds=peer.uid == self.state.uid)
        self.connections.add(conn)
        self.selector.register(sock, READ | WRITE, conn)
        self._flush(conn)

    def _make_room_for(self, owner):
        """Answer 'busy' to the connection that gives way to *owner* (it may retry);
        True once its slot is free."""
        victim = giving_way(self.connections, owner)
        if victim is None:
            return False
        self.state.count("busy")
        self._refuse(victim, ProtocolError(protocol.E_BUSY, "agent busy: making room "
                                           "for another user's request; retry"))
        return victim not in self.connections

    def _read(self, conn):
        try:
            done = conn.reader.read(conn.sock, want_fds=conn.takes_fds)
        except (BlockingIOError, InterruptedError):
            return
        except ProtocolError as exc:
            self._refuse(conn, exc)
            return
        except OSError:
            self._close(conn)              # the client went away
            return
        if done is None:
            if conn.reader.data:
                self._refuse(conn, protocol.closed_inside_a_frame())
            else:
                self._close(conn)
        elif done:
            self._dispatch(conn)

    def _dispatch(self, conn):
        """Verify the whole request and answer it, or hand a spawn to a thread."""
        fds = conn.reader.take_fds()
        try:
            req, subkey = authenticate(self.state, conn.reader.frame(), conn.challenge,
                                       conn.peer)
            if req["op"] == "spawn":
                self._hand_over(conn, req, fds)
                fds = []
                return
            if fds:
                raise ProtocolError(protocol.E_BAD_REQUEST,
                                    f"a {req['op']} request carries no descriptors")
            self._answer(conn, answer_to(self.state, conn, req, subkey))
        except Exception as exc:   # one request must never take the agent down
            self._refuse(conn, exc)
        finally:
            protocol.close_fds(fds)

    def _answer(self, conn, data):
        conn.queue(data)
        self._flush(conn)

    def _refuse(self, conn, exc):
        self._answer(conn, protocol.encode_frame(self.state.refusal(
            conn.peer, exc, request_id=conn.request_id)))

    def _flush(self, conn):
        try:
            written = conn.send()
        except OSError:
            written = None             # the client went away
        if written is None or written and conn.answered:
            self._close(conn)
        else:
            self.selector.modify(conn.sock, conn.events(), conn)

    def _close(self, conn):
        self.connections.discard(conn)
        self.selector.unregister(conn.sock)
        conn.close()

    # -- spawned commands -------------------------------------------------------------

    def _hand_over(self, conn, req, fds):
        """The connection leaves the loop for the spawner's thread, which runs and
        supervises the command.  A stopping agent starts no command: it would only
        have to detach from it."""
        if self._stop_at is not None:
            raise ProtocolError(protocol.E_BUSY, "agent stopping; retry")
        self.connections.discard(conn)
        self.selector.unregister(conn.sock)
        conn.sock.setblocking(True)
        self.spawner.start(conn, req, fds)
