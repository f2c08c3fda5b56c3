"""A loopback TCP proxy that adds latency to every HTTP request and counts them, for benchmarks and tests.

Real object stores answer in 20-100 ms; moto on loopback answers in under one.
Put this proxy between a job and the S3 endpoint (``AWS_ENDPOINT_URL_S3`` =
:attr:`LatencyProxy.url`) and every request waits ``latency_s`` before it is
forwarded, as over a real network. It also counts requests by method and the
most requests in flight at once, which is how the tests prove that reads are
concurrent and that a manifest costs no HEAD per object.

HTTP/1.1 without pipelining sends one request at a time per connection, and a
client writes a request's head in one go, so a chunk from the client that
starts with a method name is taken as a new request. Good enough for S3
clients (botocore, pyarrow); not a general HTTP parser.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import threading

_METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ")


class LatencyProxy:
    """Forward ``127.0.0.1:<port>`` to ``target`` (``host:port``), ``latency_s`` added to each request.

    Use as a context manager, or :meth:`start` / :meth:`stop`. :attr:`requests`
    counts requests per method (``GET``, ``HEAD``...), :attr:`targets` per
    method and path; :attr:`max_in_flight` is the most requests seen waiting for
    their response at once.
    """

    def __init__(self, target: str, *, latency_s: float = 0.03) -> None:
        host, port = target.replace("http://", "").rstrip("/").rsplit(":", 1)
        self.target = (host, int(port))
        self.latency_s = latency_s
        self.requests: collections.Counter[str] = collections.Counter()
        # (method, path without the query): which objects were read, and how often.
        self.targets: collections.Counter[tuple[str, str]] = collections.Counter()
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="latency-proxy", daemon=True)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LatencyProxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, sock=self._sock), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> "LatencyProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.targets.clear()
            self.max_in_flight = self.in_flight

    def _begin(self, request_line: bytes) -> None:
        method, target = (request_line.split(b" ") + [b""])[:2]
        with self._lock:
            self.requests[method.decode()] += 1
            self.targets[method.decode(), target.decode(errors="replace").split("?", 1)[0]] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        waiting = [0]  # this connection's requests still waiting for the first byte of their response

        async def upstream() -> None:
            while chunk := await client_r.read(65536):
                if chunk.startswith(_METHODS):
                    self._begin(chunk.split(b"\r\n", 1)[0])
                    waiting[0] += 1
                    await asyncio.sleep(self.latency_s)
                server_w.write(chunk)
                await server_w.drain()
            server_w.close()

        async def downstream() -> None:
            while chunk := await server_r.read(65536):
                if waiting[0]:
                    waiting[0] -= 1
                    self._end()
                client_w.write(chunk)
                await client_w.drain()
            client_w.close()

        try:
            await asyncio.gather(upstream(), downstream())
        except (ConnectionError, OSError):
            pass
        finally:
            for _ in range(waiting[0]):
                self._end()
            for w in (client_w, server_w):
                w.close()
