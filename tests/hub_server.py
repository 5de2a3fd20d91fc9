"""A Hugging Face Hub look-alike for tests: plain HTTP on 127.0.0.1, stdlib only.

The real `huggingface_hub` client (2.4) talks to it. Model repos (`org/name`) only, branch
`main` only; every commit keeps a whole snapshot and stays reachable by its sha (`revision=`
pinning). Routes:

* `POST /api/repos/create`: `{"url", "name", "id"}`, 409 if it exists (`exist_ok=True` is fine).
* `POST /api/validate-yaml`: accepts any README metadata (asked before committing a README.md).
* `POST /api/models/{repo}/preupload/{rev}`: every file `"regular"`, not ignored, with the git oid
  of the file already there, so the client drops unchanged files (and skips empty commits) as
  it does against the real Hub. Nothing goes through LFS or Xet.
* `POST /api/models/{repo}/commit/{rev}`: NDJSON `header`/`file` (base64)/`deletedFile`/
  `deletedFolder` lines, gzip or deflate bodies decoded; `lfsFile` is refused (400).
* `GET /api/models/{repo}[/revision/{rev}]`: `id`, `sha`, `private`, `siblings`.
* `GET /api/models/{repo}/tree/{rev}[/{path}]`: files (`oid` = git blob sha1, `size`) and
  folders, recursive or one level, in one page.
* `HEAD`/`GET /{repo}/resolve/{rev}/{path}`: bytes with `X-Repo-Commit`, quoted `ETag` and
  `Content-Length` (`Range: bytes=N-` honoured). No `X-Xet-Hash` header and no `xetHash` in
  trees, so downloads are plain HTTP although `hf_xet` is installed; no `HF_HUB_DISABLE_XET`.

Errors: 404 with `X-Error-Code` `RepoNotFound` / `RevisionNotFound` / `EntryNotFound` and body
`{"error": ...}`: the client raises `RepositoryNotFoundError` / `RevisionNotFoundError` /
`RemoteEntryNotFoundError` (an `EntryNotFoundError`). Other routes: bare 404, logged, and kept
in `FakeHub.unhandled` (except `/api/agent-harnesses`, which the client asks for once per
process to build its user agent unless `HF_HUB_DISABLE_TELEMETRY` or `HF_HUB_OFFLINE` is set:
a quiet 404, so nothing is cached under HF_HOME).

Uploads: `create_commit` with `CommitOperationAdd`/`CommitOperationDelete` works, and so does
`upload_folder`: with `hf_xet` installed it runs `_upload_pipeline.pipelined_upload`, which opens
a local `XetSession` (log files under ~/.cache/huggingface/xet/logs) but, all files being
"regular", uploads nothing through Xet; it commits in batches (about 250 files or 100 MB of
content each), so a big folder becomes several commits.

Endpoint: `huggingface_hub.constants` reads `HF_ENDPOINT` once, when `huggingface_hub` is first
imported (also through transformers, timm, datasets, peft...). Either set `HF_ENDPOINT` before
that import (conftest: `port = FakeHub.pick_free_port()`, `os.environ["HF_ENDPOINT"] =
f"http://127.0.0.1:{port}"`, later `FakeHub(port).start()`), or pass `endpoint=hub.url` to
`HfApi`, `hf_hub_download` and `snapshot_download`, or monkeypatch both
`huggingface_hub.constants.ENDPOINT` and `.HUGGINGFACE_CO_URL_TEMPLATE` (resolve URLs are built
from the template; `HfApi()` copies `ENDPOINT` when created, and the module-level
`huggingface_hub.create_commit`, `model_info`... are methods of an `HfApi()` made at import, so
they keep the import-time endpoint). `HF_HUB_OFFLINE` and `HF_HUB_CACHE` are read at import
too: monkeypatch `constants.HF_HUB_OFFLINE` / `.HF_HUB_CACHE` in a test.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import re
import socket
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple, Optional
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger(__name__)
_SHA = re.compile(r"[0-9a-f]{40}")


class Commit(NamedTuple):
    sha: str
    message: str
    files: dict[str, bytes]  # the whole snapshot: path -> bytes


class HubError(Exception):
    """Becomes an error response: `status`, header `X-Error-Code: code`, body `{"error": ...}`."""

    def __init__(self, code: Optional[str], message: str, status: int = 404,
                 headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.code, self.status, self.headers = code, status, headers or {}


def git_oid(data: bytes) -> str:
    """The git blob sha1 of `data`, as the Hub and `huggingface_hub` compute it for small files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """`with FakeHub() as hub:` serves on `hub.url` until the block ends."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.repos: dict[str, list[Commit]] = {}  # repo id -> commits, oldest first; main = last
        self.requests: list[tuple[str, str]] = []  # (method, unquoted path), every request
        self.unhandled: list[tuple[str, str]] = []  # requests no route answered
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def pick_free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeHub":
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                            daemon=True, name=f"FakeHub:{self.port}")
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- storage: also usable directly, to seed a repo without the client ----------------------
    def create_repo(self, repo_id: str) -> bool:
        """Make `repo_id` with one empty commit; False if it already exists."""
        with self._lock:
            if repo_id in self.repos:
                return False
            sha = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
            self.repos[repo_id] = [Commit(sha, "initial commit", {})]
            return True

    def commit(self, repo_id: str, added: dict[str, bytes], deleted: tuple[str, ...] = (),
               message: str = "", folders: tuple[str, ...] = ()) -> str:
        """A new commit on `main`: the last snapshot less `deleted`/`folders`, plus `added`."""
        with self._lock:
            parent = self.resolve(repo_id, "main")
            files = dict(parent.files)
            for path in deleted:
                if files.pop(path, None) is None:
                    raise HubError("EntryNotFound", f"A file with this name doesn't exist: {path}")
            for folder in folders:
                prefix = folder.rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            files.update(added)
            digest = hashlib.sha1(parent.sha.encode() + message.encode())
            for path in sorted(files):
                digest.update(f"\0{path}\0{git_oid(files[path])}".encode())
            self.repos[repo_id].append(Commit(digest.hexdigest(), message, files))
            return digest.hexdigest()

    def resolve(self, repo_id: str, revision: str = "main") -> Commit:
        """The commit `revision` (`main` or a full sha) names; HubError if there is none."""
        with self._lock:
            if repo_id not in self.repos:
                raise HubError("RepoNotFound", f"Repository {repo_id} not found")
            commits = self.repos[repo_id]
            if revision == "main":
                return commits[-1]
            for commit in commits:
                if _SHA.fullmatch(revision) and commit.sha == revision:
                    return commit
            raise HubError("RevisionNotFound", f"Invalid rev id: {revision}")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.resolve(repo_id, revision).files)

    def commits(self, repo_id: str) -> list[str]:
        """Commit shas of `repo_id`, oldest first (the initial empty commit included)."""
        with self._lock:
            return [c.sha for c in self.repos[repo_id]]

    def downloads(self, repo_id: str) -> list[str]:
        """File paths whose bytes were fetched (GET on a resolve URL) from `repo_id`, in order."""
        prefix = f"/{repo_id}/resolve/"
        with self._lock:
            return [p[len(prefix):].split("/", 1)[1] for m, p in self.requests
                    if m == "GET" and p.startswith(prefix)]


def _tree(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
    prefix = f"{folder}/" if folder else ""
    entries: dict[str, dict] = {}
    for path in sorted(p for p in files if p.startswith(prefix)):
        parts = path[len(prefix):].split("/")
        depths = range(1, len(parts)) if recursive else range(1, min(len(parts), 2))
        for depth in depths:
            sub = prefix + "/".join(parts[:depth])
            entries.setdefault(sub, {"type": "directory", "path": sub,
                                     "oid": hashlib.sha1(sub.encode()).hexdigest()})
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "path": path, "size": len(files[path]),
                             "oid": git_oid(files[path])}
    if folder and not entries:
        raise HubError("EntryNotFound", f"{folder} does not exist")
    return list(entries.values())


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet; `hub.requests` keeps the log
            pass

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_POST(self) -> None:
            self._route("POST")

        def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None,
                  json_body: bool = False) -> None:
            self.send_response(status)
            if json_body:
                self.send_header("Content-Type", "application/json")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, data: object, status: int = 200) -> None:
            self._send(status, json.dumps(data).encode(), json_body=True)

        def _body(self) -> bytes:  # the client always sends Content-Length, never chunks
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            encoding = self.headers.get("Content-Encoding", "identity").lower()
            if encoding == "gzip":
                return gzip.decompress(data)
            if encoding == "deflate":
                return zlib.decompress(data)
            return data

        def _route(self, method: str) -> None:
            parts = urlsplit(self.path)
            with hub._lock:
                hub.requests.append((method, unquote(parts.path)))
            # Split before unquoting: the client quotes revisions and tree paths with safe="".
            segs = [unquote(s) for s in parts.path.strip("/").split("/")]
            # Read the whole body first, even for a request that fails: the connection is reused.
            self.data = self._body() if method == "POST" else b""
            try:
                if segs[0] == "api":
                    self._api(method, segs[1:], parse_qs(parts.query))
                elif len(segs) >= 5 and segs[2] == "resolve" and method != "POST":
                    self._resolve("/".join(segs[:2]), segs[3], "/".join(segs[4:]))
                else:
                    raise HubError(None, "no route")
            except HubError as e:
                if e.code is None and e.status == 404:
                    log.warning("FakeHub: no route for %s %s", method, self.path)
                    with hub._lock:
                        hub.unhandled.append((method, unquote(parts.path)))
                text = str(e).encode("ascii", "replace").decode()  # headers are latin-1
                headers = {"X-Error-Code": e.code, "X-Error-Message": text} if e.code else {}
                self._send(e.status, json.dumps({"error": str(e)}).encode(),
                           {**headers, **e.headers}, json_body=True)

        def _api(self, method: str, segs: list[str], query: dict) -> None:
            if method == "POST" and segs == ["repos", "create"]:
                return self._create(json.loads(self.data or b"{}"))
            if method == "POST" and segs == ["validate-yaml"]:
                return self._json({"errors": [], "warnings": []})
            if segs == ["agent-harnesses"]:  # user-agent telemetry: a 404 keeps it off HF_HOME
                return self._json({"error": "not served"}, status=404)
            if len(segs) < 3 or segs[0] != "models":
                raise HubError(None, "no route")
            repo_id, action, args = f"{segs[1]}/{segs[2]}", segs[3:4], segs[4:]
            if method == "GET" and action in ([], ["revision"]):
                commit = hub.resolve(repo_id, args[0] if args else "main")
                return self._json({
                    "id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": False,
                    "disabled": False, "gated": False, "tags": [],
                    "siblings": [{"rfilename": p, "size": len(b), "blobId": git_oid(b)}
                                 for p, b in sorted(commit.files.items())]})
            if method == "GET" and action == ["tree"] and args:
                files = hub.resolve(repo_id, args[0]).files
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._json(_tree(files, "/".join(args[1:]).strip("/"), recursive))
            if method == "POST" and action == ["preupload"] and args:
                files = hub.resolve(repo_id, args[0]).files
                wanted = json.loads(self.data)["files"]
                return self._json({"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": git_oid(files[f["path"]]) if f["path"] in files else None}
                    for f in wanted]})
            if method == "POST" and action == ["commit"] and args:
                return self._commit(repo_id, args[0], self.data)
            raise HubError(None, "no route")

        def _create(self, data: dict) -> None:
            name, org = data.get("name", ""), data.get("organization")
            repo_id = name if "/" in name or not org else f"{org}/{name}"
            if data.get("type", "model") != "model" or repo_id.count("/") != 1:
                raise HubError(None, f"only model repos named org/name: {data}", status=400)
            body = {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id}
            if hub.create_repo(repo_id):
                return self._json(body)
            self._json({**body, "error": "You already created this model repo"}, status=409)

        def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
            head = hub.resolve(repo_id, revision)
            if revision != "main":
                raise HubError(None, "commits go to main only", status=400)
            message, added, deleted, folders = "", {}, [], []
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value.get("summary", "")
                    parent = value.get("parentCommit")
                    if parent is not None and parent != head.sha:
                        raise HubError(None, f"parent commit {parent} is not main", status=412)
                elif key == "file":
                    content = value["content"]
                    added[value["path"]] = (base64.b64decode(content)
                                            if value.get("encoding") == "base64"
                                            else content.encode())
                elif key == "deletedFile":
                    deleted.append(value["path"])
                elif key == "deletedFolder":
                    folders.append(value["path"])
                else:
                    raise HubError(None, f"unsupported commit line {key!r} (no LFS)", status=400)
            sha = hub.commit(repo_id, added, tuple(deleted), message, tuple(folders))
            self._json({"success": True, "commitOid": sha, "pullRequestUrl": None,
                        "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}"})

        def _resolve(self, repo_id: str, revision: str, path: str) -> None:
            commit = hub.resolve(repo_id, revision)
            if path not in commit.files:
                raise HubError("EntryNotFound", f"{path} not found at {revision}",
                               headers={"X-Repo-Commit": commit.sha})
            body, status = commit.files[path], 200
            headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{git_oid(body)}"',
                       "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if match and self.command == "GET" and int(match[1]) < len(body):
                start = int(match[1])
                headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                body, status = body[start:], 206
            self._send(status, body, headers)

    return Handler
