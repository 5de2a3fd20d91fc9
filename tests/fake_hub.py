"""A small Hugging Face Hub for tests, on 127.0.0.1, spoken to by the real `huggingface_hub`.

Model repos only. README metadata is accepted as is (`/api/validate-yaml`). Uploads: `create_repo`, then `create_commit` with files sent inline
("regular" upload mode, base64 in the NDJSON commit). Downloads: `hf_hub_download` and
`snapshot_download` (revision info, recursive tree, HEAD/GET on resolve URLs with
`X-Repo-Commit`, `ETag`, `Content-Length`; no Xet headers, so the client downloads over plain
HTTP). Every commit stays reachable by its sha, so `revision=` pinning works. `requests` logs
every request as (method, path).

`huggingface_hub` reads `HF_ENDPOINT` when it is imported: set it before that import (the
tests' conftest does), or pass `endpoint=` to the client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit


class FakeHub:
    """`with FakeHub(port) as hub:` serves until the block ends; `hub.url` is its endpoint."""

    def __init__(self, port: int = 0) -> None:
        self.repos: dict[str, list[tuple[str, dict[str, bytes]]]] = {}  # repo -> commits
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def pick_free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeHub":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def downloads(self, repo_id: str) -> list[str]:
        """Paths of the files whose bytes were fetched (GET on a resolve URL) from a repo."""
        prefix = f"/{repo_id}/resolve/"
        return [path[len(prefix):].split("/", 1)[1] for method, path in self.requests
                if method == "GET" and path.startswith(prefix)]

    # ---- storage -----------------------------------------------------------------------------
    def create(self, repo_id: str) -> bool:
        with self._lock:
            if repo_id in self.repos:
                return False
            self.repos[repo_id] = [(_sha(repo_id.encode()), {})]
            return True

    def commit(self, repo_id: str, added: dict[str, bytes], deleted: list[str]) -> str:
        with self._lock:
            _, files = self.repos[repo_id][-1]
            files = {p: b for p, b in files.items() if p not in deleted}
            files.update(added)
            digest = hashlib.sha1(repr(sorted((p, _sha(b)) for p, b in files.items())).encode()
                                  + str(len(self.repos[repo_id])).encode()).hexdigest()
            self.repos[repo_id].append((digest, files))
            return digest

    def snapshot(self, repo_id: str, revision: str) -> Optional[tuple[str, dict[str, bytes]]]:
        commits = self.repos[repo_id]
        if revision == "main":
            return commits[-1]
        return next((c for c in commits if c[0] == revision), None)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None,
                  head: bool = False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, data: object, headers: Optional[dict] = None) -> None:
            self._send(status, json.dumps(data).encode(),
                       {"Content-Type": "application/json", **(headers or {})})

        def _error(self, code: str, message: str, head: bool = False) -> None:
            self._send(404, json.dumps({"error": message}).encode(),
                       {"X-Error-Code": code, "X-Error-Message": message,
                        "Content-Type": "application/json"}, head=head)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _route(self, method: str) -> None:
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            with hub._lock:
                hub.requests.append((method, path))
            query = parse_qs(parts.query)
            if method == "POST" and path == "/api/repos/create":
                data = json.loads(self._body() or b"{}")
                repo_id = data["name"] if "/" in data["name"] else \
                    f"{data.get('organization') or 'user'}/{data['name']}"
                status = 200 if hub.create(repo_id) else 409
                return self._json(status, {"url": f"{hub.url}/{repo_id}", "name": repo_id,
                                           "id": repo_id})
            if method == "POST" and path == "/api/validate-yaml":
                # The client checks a README's metadata before committing it; accept it, but
                # record it so tests can look at what was sent.
                json.loads(self._body() or b"{}")
                return self._json(200, {"errors": [], "warnings": []})
            if path.startswith("/api/models/"):
                return self._api(method, path[len("/api/models/"):], query)
            if "/resolve/" in path:
                repo_id, _, rest = path.lstrip("/").partition("/resolve/")
                revision, _, file_path = rest.partition("/")
                return self._resolve(method, repo_id, revision, file_path)
            self._error("EntryNotFound", f"no route for {method} {path}")

        def _api(self, method: str, rest: str, query: dict) -> None:
            segments = rest.split("/")
            repo_id, action, args = "/".join(segments[:2]), segments[2:3], segments[3:]
            if repo_id not in hub.repos:
                return self._error("RepoNotFound", f"repository {repo_id} not found")
            action = action[0] if action else "revision"
            revision = args[0] if args else "main"
            if method == "POST" and action == "preupload":
                files = json.loads(self._body())["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                   "shouldIgnore": False} for f in files]})
            if method == "POST" and action == "commit":
                added, deleted = {}, []
                for line in self._body().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        value = item["value"]
                        added[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] in ("deletedFile", "deletedFolder"):
                        deleted.append(item["value"]["path"])
                sha = hub.commit(repo_id, added, deleted)
                return self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}",
                                        "commitOid": sha, "pullRequestUrl": None})
            snapshot = hub.snapshot(repo_id, unquote(revision))
            if snapshot is None:
                return self._error("RevisionNotFound", f"revision {revision} not found")
            sha, files = snapshot
            if action == "revision":
                return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha,
                                        "private": False,
                                        "siblings": [{"rfilename": p} for p in sorted(files)]})
            if action == "tree":
                folder = "/".join(args[1:]).strip("/")
                recursive = query.get("recursive", ["false"])[0] == "true"
                return self._json(200, _tree(files, folder, recursive))
            self._error("EntryNotFound", f"no API action {action}")

        def _resolve(self, method: str, repo_id: str, revision: str, file_path: str) -> None:
            head = method == "HEAD"
            if repo_id not in hub.repos:
                return self._error("RepoNotFound", f"repository {repo_id} not found", head)
            snapshot = hub.snapshot(repo_id, revision)
            if snapshot is None:
                return self._error("RevisionNotFound", f"revision {revision} not found", head)
            sha, files = snapshot
            if file_path not in files:
                self.send_response(404)
                for key, value in (("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", sha),
                                   ("Content-Length", "0")):
                    self.send_header(key, value)
                return self.end_headers()
            body = files[file_path]
            self._send(200, body, {"X-Repo-Commit": sha, "ETag": f'"{_sha(body)}"',
                                   "Content-Type": "application/octet-stream"}, head=head)

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_POST(self) -> None:
            self._route("POST")

    return Handler


def _tree(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
    prefix = f"{folder}/" if folder else ""
    entries: dict[str, dict] = {}
    for path, body in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            sub = prefix + "/".join(parts[:depth])
            if recursive or depth == 1:
                entries.setdefault(sub, {"type": "directory", "path": sub,
                                         "oid": _sha(sub.encode())})
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "path": path, "size": len(body), "oid": _sha(body)}
    return list(entries.values())
