"""A fault-injecting HTTP proxy for S3 tests: 127.0.0.1:<port> in front of the moto server.

Clients use the proxy's URL as their S3 endpoint. Requests are numbered in arrival order and
`schedule(n)` decides each one's fate, deterministically:

    "ok"     forward to moto, return its answer
    "503"    answer 503 SlowDown without forwarding (the request never reaches moto)
    "reset"  read the request, then reset the connection (TCP RST) without forwarding
    "delay"  forward, then hold the answer for `delay_s` before sending it
    "cut"    forward a GET, send the status, headers and half the body, then reset the connection
             (a download broken mid-stream); other requests are forwarded as "ok"

Faults are injected before the request reaches moto, as a throttling or restarting front end
would, so a retry is always safe; `delay` is the slow-response case (a client whose request
timeout is shorter than `delay_s` times out and retries).
"""

from __future__ import annotations

import http.client
import http.server
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlparse

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


def every(period: int, offset: int, fault: str) -> Callable[[int], str | None]:
    """A schedule term: `fault` for requests n with n % period == offset."""
    return lambda n: fault if n % period == offset else None


def combine(*terms: Callable[[int], str | None]) -> Callable[[int], str]:
    """The first term that names a fault wins; "ok" otherwise."""

    def schedule(n: int) -> str:
        for t in terms:
            if (f := t(n)) is not None:
                return f
        return "ok"

    return schedule


class FaultProxy:
    """Run with `with FaultProxy(upstream, schedule) as proxy:`; `proxy.url` is the endpoint and
    `proxy.seen` counts what was injected."""

    def __init__(self, upstream: str, schedule: Callable[[int], str], delay_s: float = 1.5):
        self.upstream = urlparse(upstream).netloc
        self.schedule = schedule
        self.delay_s = delay_s
        self.seen: Counter = Counter()
        self._n = 0
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def next_fault(self) -> str:
        with self._lock:
            n, self._n = self._n, self._n + 1
        fault = self.schedule(n)
        self.seen[fault] += 1
        return fault

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # a client that gave up on a slow answer closed its socket: expected here


def _read_body(rfile, headers) -> bytes:
    """The request body exactly as sent (chunked bodies kept chunked, trailers included)."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        out = bytearray()
        while True:
            line = rfile.readline()
            out += line
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = rfile.readline()
                    out += line
                    if line in (b"\r\n", b"\n", b""):
                        return bytes(out)
            out += rfile.read(size + 2)  # data + CRLF
    return rfile.read(int(headers.get("Content-Length") or 0))


def _handler(proxy: FaultProxy):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet test logs
            pass

        def _handle(self):
            body = _read_body(self.rfile, self.headers)
            fault = proxy.next_fault()
            if fault == "reset":
                # SO_LINGER 0: close sends RST, the client sees "connection reset by peer".
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()
                return
            if fault == "503":
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
            finally:
                conn.close()
            if fault == "delay":
                time.sleep(proxy.delay_s)
            self.send_response(reply.status, reply.reason)
            for k, v in reply.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            if self.command == "HEAD":
                length = reply.getheader("Content-Length")
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if fault == "cut":
                if self.command == "GET" and len(data) >= 2:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.close_connection = True
                    self.connection.close()
                    return
                with proxy._lock:  # nothing to cut: it was an ordinary answer
                    proxy.seen["cut"] -= 1
                    proxy.seen["ok"] += 1
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    return Handler
