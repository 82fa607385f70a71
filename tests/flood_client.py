"""A cheap HTTP flood for the access tests, run as its own process.

One keep-alive connection, the request's bytes built once, answers read by Content-Length (or
chunked): a few microseconds of Python per request, so on a shared machine the flood's own CPU
stays small, as a remote sender's would be, and the figures show what the server spends.

    python tests/flood_client.py URL TOKEN STOP_FILE PER_S BODY_JSON

``PER_S`` 0: as fast as the answers come (closed loop); otherwise a fixed pace (open loop).
Stops when STOP_FILE exists, after 60 s or 20,000 requests; prints one JSON line: the status
codes, the Retry-After values of the 429s, and its own CPU seconds.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from urllib.parse import urlsplit

MAX_REQUESTS = 20_000
MAX_SECONDS = 60.0


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


def main() -> None:
    url, token, stop_file, per_s, body = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5].encode()
    u = urlsplit(url)
    request = (f"POST /v1/classify HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    conn = Connection(u.hostname, u.port)
    codes: list[int] = []
    retry: list[int] = []
    gap = 1.0 / per_s if per_s > 0 else 0.0
    start = due = time.monotonic()
    for _ in range(MAX_REQUESTS):
        if time.monotonic() - start > MAX_SECONDS or os.path.exists(stop_file):
            break
        if gap:
            due += gap
            time.sleep(max(0.0, due - time.monotonic()))
        status, headers, payload = conn.exchange(request)
        codes.append(status)
        if status == 429:
            assert json.loads(payload)["error"]["type"] == "rate_limited", payload
            retry.append(int(headers["retry-after"]))
    print(json.dumps({"codes": codes, "retry": retry, "cpu_s": time.process_time()}))


if __name__ == "__main__":
    main()
