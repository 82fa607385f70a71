"""A cheap HTTP flood for the access tests, run as its own process.

One keep-alive connection, the request's bytes built once, answers read by Content-Length (or
chunked): a few microseconds of Python per request, so on a shared machine the flood's own CPU
stays small, as a remote sender's would be, and the figures show what the server spends.

    python tests/flood_client.py URL TOKEN STOP_FILE PER_S BODY_JSON

``PER_S`` 0: one connection, the next request as soon as the answer comes (closed loop).
Otherwise an open loop: a request every 1/PER_S seconds whether or not earlier ones were
answered, each on an idle keep-alive connection (up to :data:`MAX_CONNECTIONS` open; a send
that finds none idle is counted as skipped). Stops when STOP_FILE exists, after 60 s or 20,000
requests; prints one JSON line: the status codes, the Retry-After values of the 429s, the
skipped sends and its own CPU seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from urllib.parse import urlsplit

MAX_REQUESTS = 20_000
MAX_SECONDS = 60.0
MAX_CONNECTIONS = 64


class Connection:
    def __init__(self, host: str, port: int):
        self.addr = (host, port)
        self.sock = socket.create_connection(self.addr, timeout=30)
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(request)
        status = int(self._line().split()[1])
        headers: dict[str, str] = {}
        while line := self._line():
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int(self._line().split(b";")[0], 16):
                body += self._take(size)
                self._take(2)
            self._line()  # the blank line after the last chunk
        else:
            body = self._take(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.sock.close()
            self.sock, self.buf = socket.create_connection(self.addr, timeout=30), b""
        return status, headers, body


def _record(status: int, headers: dict[str, str], payload: bytes, codes: list[int], retry: list[int]) -> None:
    codes.append(status)
    if status == 429:
        assert json.loads(payload)["error"]["type"] == "rate_limited", payload
        retry.append(int(headers["retry-after"]))


def closed_loop(host: str, port: int, request: bytes, stop_file: str, codes: list[int], retry: list[int]) -> None:
    conn = Connection(host, port)
    start = time.monotonic()
    for _ in range(MAX_REQUESTS):
        if time.monotonic() - start > MAX_SECONDS or os.path.exists(stop_file):
            break
        _record(*conn.exchange(request), codes, retry)


async def open_loop(host: str, port: int, request: bytes, stop_file: str, per_s: float,
                    codes: list[int], retry: list[int]) -> int:
    """Sends at ``per_s`` on idle connections; returns how many sends found none idle."""
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened, skipped, tasks = 0, 0, set()

    async def one(conn):
        reader, writer = conn
        writer.write(request)
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        payload = await reader.readexactly(int(headers.get("content-length", "0")))
        _record(status, headers, payload, codes, retry)
        if headers.get("connection", "").lower() == "close":
            writer.close()
            nonlocal opened
            opened -= 1
        else:
            idle.append(conn)

    start = due = time.monotonic()
    for _ in range(MAX_REQUESTS):
        if time.monotonic() - start > MAX_SECONDS or os.path.exists(stop_file):
            break
        due += 1.0 / per_s
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        if idle:
            conn = idle.pop()
        elif opened < MAX_CONNECTIONS:
            conn = await asyncio.open_connection(host, port)
            opened += 1
        else:
            skipped += 1
            continue
        task = asyncio.create_task(one(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    return skipped


def main() -> None:
    url, token, stop_file, per_s, body = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5].encode()
    u = urlsplit(url)
    request = (f"POST /v1/classify HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    codes: list[int] = []
    retry: list[int] = []
    skipped = 0
    if per_s > 0:
        skipped = asyncio.run(open_loop(u.hostname, u.port, request, stop_file, per_s, codes, retry))
    else:
        closed_loop(u.hostname, u.port, request, stop_file, codes, retry)
    print(json.dumps({"codes": codes, "retry": retry, "skipped": skipped, "cpu_s": time.process_time()}))


if __name__ == "__main__":
    main()
