"""A local HTTP server speaking the part of the Hugging Face Hub's file protocol that ``huggingface_hub`` uses to
download a file (test-only: this machine cannot reach the Hub), and plain file URLs:

    HEAD|GET /{owner}/{name}/resolve/{revision}/{path}   X-Repo-Commit, ETag (the file's sha256, as the Hub sends
                                                         for LFS files), Content-Length, Accept-Ranges; Range →
                                                         206 with Content-Range; a gated repo without a valid
                                                         bearer token → 401 with X-Error-Code: GatedRepo; an unknown
                                                         repo → 401 RepoNotFound; an unknown file → 404
                                                         EntryNotFound
    HEAD|GET /files/{name}                               the same file as a plain URL (Range unless told otherwise)

``drop_after_bytes``: the next GET sends that many bytes of its body and closes the connection (a network
failure mid-download). ``link_bytes_per_s``: each GET's body is paced to that rate (a home link, not loopback). Every request is recorded (method, path, Range header) in ``requests``.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHUNK = 1 << 16


@dataclass
class HubFiles:
    files: dict[tuple[str, str, str], Path] = field(default_factory=dict)    # (repo, commit, path) → file
    plain: dict[str, Path] = field(default_factory=dict)                     # /files/{name} → file
    gated: dict[str, str] = field(default_factory=dict)                      # repo → the token that may read it
    honour_range: bool = True
    drop_after_bytes: int | None = None
    link_bytes_per_s: int | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take_drop(self) -> int | None:
        with self._lock:
            drop, self.drop_after_bytes = self.drop_after_bytes, None
            return drop


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubFiles

    def log_message(self, format: str, *args) -> None:    # quiet
        return None

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        self.hub.requests.append((self.command, self.path, self.headers.get("Range")))
        resolved = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
        if resolved:
            repo, revision, name = resolved.groups()
            token = self.hub.gated.get(repo)
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                return self._error(401, "GatedRepo", f"Access to model {repo} is restricted.")
            if not any(key[0] == repo for key in self.hub.files):
                return self._error(401, "RepoNotFound", "Repository not found")
            path = self.hub.files.get((repo, revision, name))
            if path is None:
                return self._error(404, "EntryNotFound", "Entry not found")
            self._send_file(path, body, {"X-Repo-Commit": revision, "ETag": f'"{sha256_of(path)}"'},
                            self.hub.honour_range)
            return
        plain = re.fullmatch(r"/files/(.+)", self.path)
        if plain and plain.group(1) in self.hub.plain:
            self._send_file(self.hub.plain[plain.group(1)], body, {}, self.hub.honour_range)
            return
        self._error(404, "EntryNotFound", "no such file")

    def _error(self, status: int, code: str, message: str) -> None:
        payload = f'{{"error": "{message}"}}'.encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _send_file(self, path: Path, body: bool, extra: dict[str, str], honour_range: bool) -> None:
        size = path.stat().st_size
        start = 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if wanted and honour_range:
            start = int(wanted.group(1))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(206 if start else 200)
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if not body:
            return
        drop = self.hub.take_drop()
        sent, began = 0, time.monotonic()
        with open(path, "rb") as handle:
            handle.seek(start)
            while chunk := handle.read(CHUNK):
                if drop is not None and sent + len(chunk) > drop:
                    self.wfile.write(chunk[:drop - sent])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
                if self.hub.link_bytes_per_s:
                    ahead = sent / self.hub.link_bytes_per_s - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)


class HubServer:
    """``with HubServer(files) as base_url:`` serves ``files`` on 127.0.0.1 (an ephemeral port) in a thread."""

    def __init__(self, hub: HubFiles) -> None:
        self.hub = hub
        handler = type("Handler", (_Handler,), {"hub": hub})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
