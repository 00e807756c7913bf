"""An HTTP proxy in front of the tests' S3 server that counts what is uploaded: the bytes of
every part sent, and which parts ended in a completed upload, so that a test can tell how
many bytes were sent more than once."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Set, Tuple
from urllib.parse import parse_qs, urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "expect"}


class CountingProxy:
    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self._host, self._port = u.hostname or "127.0.0.1", u.port or 80
        self._lock = threading.Lock()
        self.part_bytes = 0
        # (object path, upload id) → part number → size of its last upload
        self._parts: Dict[Tuple[str, str], Dict[int, int]] = {}
        self._completed: Set[Tuple[str, str]] = set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                proxy._forward(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def completed_part_bytes(self) -> int:
        """Bytes of the parts that make up the uploads completed through the proxy."""
        with self._lock:
            return sum(sum(self._parts.get(u, {}).values()) for u in self._completed)

    def _forward(self, h: BaseHTTPRequestHandler) -> None:
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        conn = http.client.HTTPConnection(self._host, self._port, timeout=120)
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:
            h.close_connection = True
            return
        finally:
            conn.close()
        u = urlsplit(h.path)
        q = parse_qs(u.query, keep_blank_values=True)
        upload = q.get("uploadId", [""])[0]
        if resp.status == 200 and upload:
            with self._lock:
                if h.command == "PUT" and "partNumber" in q and "x-amz-copy-source" not in {k.lower() for k in headers}:
                    self.part_bytes += len(body)
                    self._parts.setdefault((u.path, upload), {})[int(q["partNumber"][0])] = len(body)
                elif h.command == "POST" and b"<Error>" not in data:
                    self._completed.add((u.path, upload))
        try:
            h.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and k.lower() != "content-length":
                    h.send_header(k, v)
            length = str(len(data)) if h.command != "HEAD" else resp.getheader("Content-Length", "0")
            h.send_header("Content-Length", length)
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True  # the client is gone (a killed worker)
