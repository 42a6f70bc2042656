"""The stand-in kubelet's read-only HTTP endpoint for container logs, as the API server reaches a
real kubelet for `pods/log` (`kubectl logs`): GET /containerLogs/<namespace>/<pod>/<container>
with `follow`, `tailLines` and `limitBytes`. The API emulator proxies `pods/log` here, after
finding the pod's node and the node's kubelet port in the Node object the stand-in registers.

A container that has not started answers 400 with the kubelet's words ("... is waiting to start:
ContainerCreating"); a followed log ends when its container has ended and all of it was sent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse


@dataclass(frozen=True)
class LogSource:
    """What the kubelet knows of one container's log: where it is and whether it still grows."""

    path: Path
    running: Callable[[], bool]


#: (namespace, pod, container) -> the log, or the kubelet's reason it has none (a str).
Lookup = Callable[[str, str, str], "LogSource | str"]


def tail_bytes(data: bytes, lines: int) -> bytes:
    """The last `lines` lines of `data` (a final line without its newline counts)."""
    if lines <= 0:
        return b""
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


class LogServer:
    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.serve(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="kubelet-logs")

    def start(self) -> LogServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        parts = [p for p in url.path.split("/") if p]
        if len(parts) != 4 or parts[0] != "containerLogs":
            return self._error(h, 404, "404 page not found")
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if q.get("previous") in ("true", "1"):
            return self._error(h, 400, f'previous terminated container "{parts[3]}" in pod "{parts[2]}" not found')
        found = self.lookup(parts[1], parts[2], parts[3])
        if isinstance(found, str):
            return self._error(h, 400, found)
        data = found.path.read_bytes() if found.path.is_file() else b""
        if "tailLines" in q:
            data = tail_bytes(data, int(q["tailLines"]))
        limit = int(q["limitBytes"]) if "limitBytes" in q else None
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.end_headers()
        sent = self._send(h, data, limit, 0)
        if q.get("follow") in ("true", "1"):
            self._follow(h, found, limit, sent)

    def _follow(self, h: BaseHTTPRequestHandler, src: LogSource, limit: int | None, sent: int) -> None:
        """New output as it comes, until the container has ended and its log is read to the end."""
        offset = src.path.stat().st_size if src.path.is_file() else 0
        while limit is None or sent < limit:
            running = src.running()
            with open(src.path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            try:
                sent = self._send(h, chunk, limit, sent)
            except OSError:
                return  # the client went away
            if not chunk and not running:
                return
            if not chunk:
                time.sleep(0.2)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, data: bytes, limit: int | None, sent: int) -> int:
        if limit is not None:
            data = data[: max(limit - sent, 0)]
        if data:
            h.wfile.write(data)
            h.wfile.flush()
        return sent + len(data)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, code: int, message: str) -> None:
        body = message.encode()
        h.send_response(code)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
