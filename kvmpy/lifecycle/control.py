"""Control of a running Machine from another process, over a Unix socket.

``kvmpy run ... --control PATH`` serves this; ``kvmpy ctl PATH COMMAND`` (or any
program) talks to it. The protocol is JSON lines: a request is one object
``{"cmd": NAME, ...}``; the answer is zero or more ``{"progress": TEXT}`` lines
followed by one ``{"ok": true, ...}`` or ``{"ok": false, "error": TEXT}``.

    status                    {"running", "paused"}
    pause / resume            stop the vCPUs where they are / let them go on
    snapshot  {"path"}        save to directory PATH (kvmpy/lifecycle/snapshot.py)
    migrate   {"to", "key"}   live-migrate to HOST:PORT where `kvmpy receive` listens; "key"
                              (optional, hex): the migration key the target was given
    stats                     {"stats": Stats.as_dict(), "text": the --stats table}
    inspect   {"vcpu", "pause"} the introspection report; a running machine is refused unless
                              "pause" is true (then it pauses for the report and goes on)
    stop                      end the run (reason "stopped")

Only the socket's owner may use it: the file is created with mode 0600, and each
connection's peer credentials (SO_PEERCRED) must show the same user id
(kvmpy/localsock.py, shared with the gdb stub).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from ..errors import KvmpyError
from ..localsock import listen_private, peer_uid

MAX_REQUEST = 64 * 1024


class ControlError(KvmpyError):
    """The control socket cannot be created or used."""


class ControlServer:
    """Serves control requests for ``machine`` on the Unix socket ``path`` in a thread."""

    #: close() waits this long for requests under way (a snapshot, a migration) to finish
    CLOSE_WAIT = 60.0

    def __init__(self, machine, path: str):
        self.machine, self.path = machine, os.fspath(path)
        self._sock = listen_private(self.path, "control socket", ControlError)
        st = os.lstat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        self._closed = False
        self._holds, self._holds_lock = 0, threading.Lock()    # pauses taken through this socket
        self._lock = threading.Lock()
        self._clients: dict[threading.Thread, socket.socket] = {}
        self._thread = threading.Thread(target=self._serve, daemon=True, name="control")
        self._thread.start()

    def close(self) -> None:
        """Stop serving and remove the socket file. Requests under way are finished first,
        so once this returns the server no longer touches the machine (it may be closed)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)
        with self._lock:
            clients = list(self._clients.items())
        for _, conn in clients:
            try:
                conn.shutdown(socket.SHUT_RD)       # idle clients see EOF; a request under way ends first
            except OSError:
                pass
        deadline = time.monotonic() + self.CLOSE_WAIT
        for t, _ in clients:
            t.join(max(0.0, deadline - time.monotonic()))
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:  # ours still, not a newer server's
                os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._client, args=(conn,), daemon=True, name="control-client")
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._clients[t] = conn
            t.start()

    def _client(self, conn: socket.socket) -> None:
        try:
            self._serve_client(conn)
        finally:
            with self._lock:
                self._clients.pop(threading.current_thread(), None)

    def _serve_client(self, conn: socket.socket) -> None:
        with conn:
            uid = peer_uid(conn)
            reply = conn.makefile("w", encoding="utf-8")
            if uid != os.getuid():
                _send(reply, {"ok": False, "error": f"user {uid} may not control this VM"})
                return
            requests = conn.makefile("rb")

            def progress(text: str) -> None:
                try:
                    _send(reply, {"progress": text})
                except OSError:         # the client went away: the command itself goes on
                    pass

            while True:
                line = requests.readline(MAX_REQUEST + 1)       # bounded: never buffer a huge line
                if not line:
                    return
                if len(line) > MAX_REQUEST:
                    _send(reply, {"ok": False, "error": "request too long"})
                    return
                request = None
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    answer = self.handle(request, progress)
                except (ValueError, TypeError, KeyError) as e:
                    answer = {"ok": False, "error": f"bad request: {e}"}
                except KvmpyError as e:
                    answer = {"ok": False, "error": _refusal(e) or str(e)}
                except Exception as e:          # every request gets an answer; the server goes on
                    answer = {"ok": False, "error": _refusal(e) or
                              f"{_cmd_name(request)} failed: {type(e).__name__}: {e}"}
                try:
                    _send(reply, answer)
                except OSError:
                    return

    def handle(self, request: dict, progress) -> dict:
        """One request -> its answer (also usable without a socket, e.g. from tests)."""
        m = self.machine
        cmd = request.get("cmd")
        if cmd == "status":
            return {"ok": True, "running": m.running, "paused": m.paused}
        if cmd == "pause":
            if not m.pause():
                return {"ok": False, "error": "the machine is not running"}
            with self._holds_lock:
                self._holds += 1
            return {"ok": True, "running": True, "paused": True}
        if cmd == "resume":
            if m.migration_lock.locked():
                return {"ok": False, "error": "a migration is under way: it pauses and resumes the machine itself"}
            with self._holds_lock:
                mine = self._holds > 0
                self._holds -= mine
            if mine or m.paused:        # ours, or one left by a migration whose outcome was unknown
                m.resume()
            return {"ok": True, "running": m.running, "paused": m.paused}
        if cmd == "snapshot":
            path = request.get("path")
            if not isinstance(path, str) or not path:
                raise ValueError("snapshot needs a path (a directory name)")
            m.snapshot(path)
            return {"ok": True, "path": os.path.abspath(path)}
        if cmd == "migrate":
            from .migration import parse_address, send
            to = request.get("to")
            if not isinstance(to, str) or not to:
                raise ValueError("migrate needs \"to\": HOST:PORT")
            host, port = parse_address(to)
            report = send(m, host, port, key=_key(request.get("key")), progress=progress)
            return {"ok": True, "report": report.as_dict(), "text": report.line()}
        if cmd == "stats":
            m.console.drain()
            stats = m.live_stats()
            return {"ok": True, "stats": stats.as_dict(), "text": str(stats)}
        if cmd == "inspect":
            vcpu = request.get("vcpu")
            vcpu = None if vcpu is None else int(vcpu)
            if request.get("pause") and m.running and not m.paused:
                from .snapshot import paused
                with paused(m):                 # a moment's pause, then the guest goes on
                    return {"ok": True, "text": m.inspect(vcpu)}
            return {"ok": True, "text": m.inspect(vcpu)}
        if cmd == "stop":
            m.request_stop("stopped")
            return {"ok": True}
        raise ValueError(f"unknown command {cmd!r} (status, pause, resume, snapshot, migrate, "
                         "stats, inspect, stop)")


def _key(text) -> bytes | None:
    """A migrate request's "key": hex text (never echoed in an error), or absent."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError("\"key\" is the migration key in hex")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError("\"key\" is the migration key in hex") from None
    from .channel import check_key
    return check_key(key)


def _refusal(error: BaseException) -> str | None:
    """The sandbox's one line if ``error`` is (or was caused by) a refused system call."""
    from ..vmm.confine import refusal_message
    return refusal_message(error)


def _cmd_name(request) -> str:
    return str(request.get("cmd")) if isinstance(request, dict) else "request"


def _send(stream, obj: dict) -> None:
    stream.write(json.dumps(obj) + "\n")
    stream.flush()


def request(socket_path: str, cmd: str, progress=None, timeout: float | None = None, **args) -> dict:
    """Send one request to the control socket at ``socket_path``; returns the final answer.
    ``progress(text)`` sees the progress lines. Raises ControlError if it cannot talk."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(socket_path)
    except OSError as e:
        sock.close()
        raise ControlError(f"cannot connect to the control socket {socket_path}: {e.strerror or e}") from None
    with sock:
        try:
            sock.sendall((json.dumps({"cmd": cmd, **args}) + "\n").encode())
            for line in sock.makefile("r", encoding="utf-8"):
                answer = json.loads(line)
                if not isinstance(answer, dict):
                    raise ValueError("an answer is a JSON object")
                if "progress" in answer:
                    if progress is not None:
                        progress(answer["progress"])
                    continue
                return answer
        except socket.timeout:
            raise ControlError(f"the VM behind {socket_path} did not answer within {timeout} s") from None
        except OSError as e:
            raise ControlError(f"talking to the control socket {socket_path}: {e.strerror or e}") from None
        except ValueError as e:
            raise ControlError(f"the VM behind {socket_path} answered garbage: {e}") from None
    raise ControlError(f"the VM behind {socket_path} closed the connection without answering")
