"""A fake model hub on 127.0.0.1 that answers like Hugging Face and ModelScope, for download tests.

Usage (any test, unit or e2e):

    hub = fakehub.start({"config.json": b"{}", "model.safetensors": weights})
    os.environ["HF_ENDPOINT"] = hub.url            # huggingface_hub, passed as endpoint=
    os.environ["MODELSCOPE_ENDPOINT"] = hub.url    # modelscope
    ...
    assert hub.request_count == 0                  # e.g. after an offline run
    hub.stop()

One server speaks both protocols (they use different paths) and serves the same files under whatever repository
name it is asked for, unless `repo=` pins one. Files whose names end in `LFS_SUFFIXES` are served as LFS/large
files (ETag = sha256), the others as plain git blobs (ETag = git sha1), as the real Hugging Face does.
Faults for tests: `corrupt(path)` serves same-size wrong bytes, `cut(path)` drops the connection mid-body.
For a subprocess (e2e tests), `environment(tmp_path, hub)` gives the variables that point both hubs at `hub` (or
at a dead port) and every cache, token and config folder into tmp_path.
Only the standard library is used.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["FakeHub", "start", "environment", "git_blob_sha1", "LFS_SUFFIXES", "dead_url"]

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".model", ".bin")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what Hugging Face reports as `oid` / ETag for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def dead_url() -> str:
    """A loopback URL nothing listens on (a port bound then closed): connections are refused at once."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def environment(tmp: Path, hub: FakeHub | None = None) -> dict[str, str]:
    """Environment variables isolating a process: hubs at `hub` (None: a dead port), all state under `tmp`.

    Merge into a copy of os.environ for subprocess.run(env=...); XDG_* moves our config.toml and model cache on
    Linux (and macOS, where platformdirs honours XDG when set).
    """
    url = hub.url if hub is not None else dead_url()
    return {
        "HF_ENDPOINT": url, "MODELSCOPE_ENDPOINT": url, "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(tmp / "hf-home"), "MODELSCOPE_CACHE": str(tmp / "ms-cache"),
        "MODELSCOPE_HOME": str(tmp / "ms-home"), "XDG_CACHE_HOME": str(tmp / "xdg-cache"),
        "XDG_CONFIG_HOME": str(tmp / "xdg-config"), "TQDM_DISABLE": "1",
    }


@dataclass
class Request:
    method: str
    path: str                       # path and query, as sent
    headers: dict[str, str]         # names lower-cased ("range", "authorization")


@dataclass
class FakeHub:
    """A running fake hub. `url` is the endpoint; `requests` lists every request received, in order."""

    files: dict[str, bytes]
    repo: str | None = None
    commit: str = COMMIT
    delay: float = 0.0              # seconds to wait before every answer (a slow hub)
    requests: list[Request] = field(default_factory=list)
    _faults: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def file_requests(self, path: str) -> list[Request]:
        """The GET requests that downloaded `path` (either protocol)."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and _requested_file(r.path) == path]

    def corrupt(self, path: str, times: int = 1) -> None:
        """Serve `path` with the right size but wrong bytes for the next `times` downloads."""
        self._add_fault(path, "corrupt", times, 0)

    def cut(self, path: str, after: int, times: int = 1) -> None:
        """Drop the connection after `after` body bytes for the next `times` downloads of `path`."""
        self._add_fault(path, "cut", times, after)

    def _add_fault(self, path: str, kind: str, times: int, arg: int) -> None:
        with self._lock:
            self._faults.setdefault(path, []).extend([(kind, arg)] * times)

    def _take_fault(self, path: str) -> tuple[str, int] | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.pop(0) if queue else None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start(files: dict[str, bytes], *, repo: str | None = None, delay: float = 0.0) -> FakeHub:
    """Start a fake hub serving `files` ({repo path: bytes}) on a free 127.0.0.1 port, in a daemon thread."""
    hub = FakeHub(files=dict(files), repo=repo, delay=delay)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub._server = server
    threading.Thread(target=server.serve_forever, name="fakehub", daemon=True).start()
    return hub


def _requested_file(path_and_query: str) -> str | None:
    """Which repo file a download URL asks for (Hugging Face resolve/ or ModelScope FilePath=), if any."""
    parts = urlsplit(path_and_query)
    path = unquote(parts.path)
    if "/resolve/" in path:
        return path.split("/resolve/", 1)[1].split("/", 1)[1]
    query = parse_qs(parts.query)
    if path.endswith("/repo") and "FilePath" in query:
        return query["FilePath"][0]
    return None


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._dispatch(body=False)

        def do_GET(self) -> None:
            self._dispatch(body=True)

        # ---------------------------------------------------------------------------------------- routing
        def _dispatch(self, body: bool) -> None:
            with hub._lock:
                hub.requests.append(Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            if hub.delay:
                time.sleep(hub.delay)
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            segments = path.strip("/").split("/")
            if path.startswith("/api/v1/models/") and len(segments) >= 6:
                repo = "/".join(segments[3:5])
                if not self._known(repo):
                    return self._json(404, {"Code": 404, "Success": False, "Message": "not found"}, body)
                if segments[5:] == ["repo", "files"]:
                    return self._json(200, self._modelscope_listing(), body)
                if segments[5:] == ["repo"] and "FilePath" in query:
                    return self._file(query["FilePath"], body, modelscope=True)
            elif path.startswith("/api/models/") and len(segments) >= 5:
                repo = "/".join(segments[2:4])
                if not self._known(repo):
                    return self._json(404, {"error": "Repository not found"}, body)
                if segments[4] == "revision":
                    siblings = [{"rfilename": name} for name in sorted(hub.files)]
                    return self._json(200, {"id": repo, "sha": hub.commit, "siblings": siblings}, body)
                if segments[4] == "tree":
                    return self._json(200, self._hf_tree(), body)
            elif "/resolve/" in path:
                repo = path.split("/resolve/", 1)[0].strip("/")
                if self._known(repo):
                    return self._file(_requested_file(self.path) or "", body, modelscope=False)
            self._json(404, {"error": "not found"}, body)

        def _known(self, repo: str) -> bool:
            return hub.repo is None or repo == hub.repo

        # ---------------------------------------------------------------------------------------- answers
        def _hf_tree(self) -> list[dict]:
            entries = []
            for name, data in sorted(hub.files.items()):
                entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            return entries

        def _modelscope_listing(self) -> dict:
            files = [
                {"Name": name.rsplit("/", 1)[-1], "Path": name, "Type": "blob", "Size": len(data),
                 "Sha256": hashlib.sha256(data).hexdigest(), "Revision": hub.commit}
                for name, data in sorted(hub.files.items())
            ]
            return {"Code": 200, "Success": True, "Data": {"Files": files}}

        def _json(self, status: int, payload: object, body: bool) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _file(self, name: str, body: bool, modelscope: bool) -> None:
            if name not in hub.files:
                return self._json(404, {"error": "Entry not found"}, body)
            data = hub.files[name]
            etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_blob_sha1(data)
            fault = hub._take_fault(name) if body else None
            if fault and fault[0] == "corrupt":
                data = bytes(b ^ 0xFF for b in data)   # same size, every byte wrong
            start = 0
            ranged = self.headers.get("Range", "")
            if ranged.startswith("bytes=") and ranged[6:].split("-")[0].isdigit():
                start = min(int(ranged[6:].split("-")[0]), len(data))
            chunk = data[start:]
            self.send_response(206 if start else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(chunk)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            if not modelscope:
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", hub.commit)
            self.end_headers()
            if not body:
                return
            if fault and fault[0] == "cut":
                self.wfile.write(chunk[: fault[1]])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(chunk)

    return Handler
