"""The test Hub (`hub_server.FakeHub`) spoken to by the real `huggingface_hub` client.

Every call passes `endpoint=server.url`, so these tests do not depend on `HF_ENDPOINT` or on
when `huggingface_hub` was imported.
"""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import (CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download,
                             snapshot_download)
from huggingface_hub import constants
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError,
                                    RevisionNotFoundError)

from hub_server import FakeHub, git_oid

BINARY = bytes(range(256)) * 4 + b"\x00\xff\x00"
FILES = {"config.json": b'{"rank": 4}', "weights.bin": BINARY,
         "sub/a.txt": b"alpha\n", "sub/deep/b.txt": b"beta\n"}


@pytest.fixture
def server(monkeypatch, tmp_path):
    # Read by huggingface_hub at import (the conftest makes it offline): patch the constants.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with FakeHub() as hub:
        yield hub
    assert not hub.unhandled, hub.unhandled


@pytest.fixture
def api(server):
    return HfApi(endpoint=server.url, token=False)


def _push(api, repo_id, files, message="upload"):
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=b) for p, b in files.items()]
    return api.create_commit(repo_id, operations=ops, commit_message=message)


def _download(server, tmp_path, repo_id, filename, revision=None):
    path = hf_hub_download(repo_id, filename, revision=revision, endpoint=server.url,
                           cache_dir=tmp_path / "cache", token=False)
    with open(path, "rb") as f:
        return f.read()


def test_create_repo_and_exist_ok(server, api):
    url = api.create_repo("org/model")
    assert url.repo_id == "org/model" and url.endpoint == server.url
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo("org/model")
    assert info.value.response.status_code == 409
    assert api.create_repo("org/model", exist_ok=True).repo_id == "org/model"
    assert list(server.repos) == ["org/model"] and len(server.commits("org/model")) == 1


def test_commits_and_pinned_download(server, api, tmp_path):
    api.create_repo("org/model")
    first = _push(api, "org/model", FILES, "first")
    assert first.oid == server.commits("org/model")[-1]
    assert first.commit_url == f"{server.url}/org/model/commit/{first.oid}"
    assert server.files("org/model") == FILES
    second = _push(api, "org/model", {"config.json": b'{"rank": 8}'}, "second")
    assert second.oid != first.oid and server.repos["org/model"][-1].message == "second"

    assert _download(server, tmp_path, "org/model", "config.json") == b'{"rank": 8}'
    assert _download(server, tmp_path, "org/model", "config.json", first.oid) == b'{"rank": 4}'
    assert _download(server, tmp_path, "org/model", "weights.bin") == BINARY
    assert _download(server, tmp_path, "org/model", "sub/deep/b.txt", first.oid) == b"beta\n"

    info = api.model_info("org/model")
    assert info.sha == second.oid and sorted(s.rfilename for s in info.siblings) == sorted(FILES)
    assert api.repo_info("org/model", revision=first.oid).sha == first.oid
    assert sorted(api.list_repo_files("org/model")) == sorted(FILES)
    top = {e.path: type(e).__name__ for e in api.list_repo_tree("org/model")}
    assert top == {"config.json": "RepoFile", "weights.bin": "RepoFile", "sub": "RepoFolder"}
    sub = [e.path for e in api.list_repo_tree("org/model", path_in_repo="sub", recursive=True)]
    assert sorted(sub) == ["sub/a.txt", "sub/deep", "sub/deep/b.txt"]
    blob = next(e for e in api.list_repo_tree("org/model") if e.path == "weights.bin")
    assert (blob.size, blob.blob_id) == (len(BINARY), git_oid(BINARY))


def test_snapshot_download_fetches_only_allowed_files(server, api, tmp_path):
    api.create_repo("org/model")
    sha = _push(api, "org/model", FILES).oid
    server.requests.clear()
    folder = snapshot_download("org/model", allow_patterns=["sub/*"], endpoint=server.url,
                               cache_dir=tmp_path / "cache", token=False)
    got = {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()}
    assert got == {"sub/a.txt", "sub/deep/b.txt"}
    assert folder.endswith(sha)
    assert sorted(server.downloads("org/model")) == ["sub/a.txt", "sub/deep/b.txt"]
    resolved = [p for m, p in server.requests if "/resolve/" in p]
    assert all("/sub/" in p for p in resolved), resolved


def test_missing_file_repo_and_revision(server, api, tmp_path):
    api.create_repo("org/model")
    sha = _push(api, "org/model", FILES).oid
    with pytest.raises(EntryNotFoundError):
        _download(server, tmp_path, "org/model", "nope.txt")
    with pytest.raises(RepositoryNotFoundError):
        _download(server, tmp_path, "org/absent", "config.json")
    with pytest.raises(RevisionNotFoundError):
        _download(server, tmp_path, "org/model", "config.json", "v2")
    with pytest.raises(RevisionNotFoundError):
        _download(server, tmp_path, "org/model", "config.json", "0" * 40)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/absent")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("org/model", revision="v2", endpoint=server.url,
                          cache_dir=tmp_path / "cache", token=False)
    with pytest.raises(RepositoryNotFoundError):
        _push(api, "org/absent", {"a": b"a"})
    assert server.commits("org/model")[-1] == sha


def test_upload_folder_delete_and_unchanged_files(server, api, tmp_path):
    folder = tmp_path / "upload"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlibrary_name: halrp-adapt\n---\n# card\n")
    (folder / "sub" / "w.bin").write_bytes(BINARY)
    api.create_repo("org/folder")
    first = api.upload_folder(repo_id="org/folder", folder_path=folder, commit_message="folder")
    assert set(server.files("org/folder")) == {"README.md", "sub/w.bin"}
    assert server.files("org/folder")["sub/w.bin"] == BINARY

    # Unchanged files are left out of the commit, and nothing changed means no commit.
    again = api.upload_folder(repo_id="org/folder", folder_path=folder)
    assert again.oid == first.oid and len(server.commits("org/folder")) == 2

    deleted = api.create_commit("org/folder", commit_message="rm", operations=[
        CommitOperationDelete(path_in_repo="sub/"),
        CommitOperationAdd(path_in_repo="new.txt", path_or_fileobj=b"new")])
    assert set(server.files("org/folder")) == {"README.md", "new.txt"}
    assert set(server.files("org/folder", first.oid)) == {"README.md", "sub/w.bin"}
    assert deleted.oid == server.commits("org/folder")[-1]


def test_unknown_route_is_a_logged_404(server, caplog):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{server.url}/api/datasets/org/data")
    assert info.value.code == 404 and "error" in json.loads(info.value.read())
    assert server.unhandled == [("GET", "/api/datasets/org/data")]
    assert "no route" in caplog.text
    server.unhandled.clear()


def test_raw_protocol_gzip_commit_and_range(server):
    """What the client does not exercise: gzip request bodies, ranged GETs, HEAD on a 404."""
    server.create_repo("org/raw")
    lines = [{"key": "header", "value": {"summary": "raw"}},
             {"key": "file", "value": {"path": "x.txt", "content": "aGVsbG8=",
                                       "encoding": "base64"}}]
    body = gzip.compress(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    request = urllib.request.Request(
        f"{server.url}/api/models/org/raw/commit/main", data=body, method="POST",
        headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"})
    sha = json.loads(urllib.request.urlopen(request).read())["commitOid"]
    assert server.files("org/raw", sha) == {"x.txt": b"hello"}
    ranged = urllib.request.Request(f"{server.url}/org/raw/resolve/{sha}/x.txt",
                                    headers={"Range": "bytes=2-"})
    with urllib.request.urlopen(ranged) as response:
        assert (response.status, response.read()) == (206, b"llo")
        assert response.headers["X-Repo-Commit"] == sha and "X-Xet-Hash" not in response.headers
    head = urllib.request.Request(f"{server.url}/org/raw/resolve/main/y.txt", method="HEAD")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(head)
    assert info.value.headers["X-Error-Code"] == "EntryNotFound"
    assert info.value.headers["X-Repo-Commit"] == sha
