"""A stand-in Hugging Face hub: local directories served as hub repositories on 127.0.0.1, for the real
`huggingface_hub` client of a process whose `HF_ENDPOINT` points at it (`hub_env`).

It answers exactly what `HfApi.repo_info`, `HfApi.list_repo_tree` and `snapshot_download` (huggingface_hub 2.x:
`hf_api.py`, `_snapshot_download.py`, `file_download.py`) ask, the way huggingface.co answers:

    GET  /api/{models|datasets}/{repo_id}[/revision/{rev}]            repo info: {"id", "sha", "siblings", ...}
    GET  /api/{models|datasets}/{repo_id}/tree/{rev}[/{path}]         [{"type": "file" | "directory", "path", "oid",
         ?recursive=true|false                                          "size", "lfs"?}, ...] (one page, no `Link`)
    HEAD/GET  /[datasets/]{repo_id}/resolve/{rev}/{path}             a git file: 200, `X-Repo-Commit`, `ETag` (its git
                                                                      blob id) and `Content-Length`; an LFS file
                                                                      (`LFS_SUFFIXES`): 302 to the "CDN" with
                                                                      `X-Linked-Etag` (sha256) and `X-Linked-Size`
    GET  http://localhost:{port}/cdn/{sha256}                         the LFS file's bytes (another host, as the CDN
                                                                      is: the client sends it no token)

The revision is `main` or the repository's commit, a hash of its files. Errors carry the hub's headers, which the
client turns into its exceptions: an unknown repository is 404 `X-Error-Code: RepoNotFound`, an unknown revision
`RevisionNotFound`, an unknown file or folder `EntryNotFound`. Anything else (an endpoint the stand-in does not
know) is a plain 404, recorded in `StandInHub.unanswered`, so a test can see that a client asked for more than this
models. Not modelled: authentication and gating, Xet storage, pagination (`Link` headers; repositories here are
far below the hub's 1000 entries a page), `Range` requests.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".gz", ".parquet", ".arrow", ".safetensors", ".bin", ".pt")
"""Files the hub keeps in LFS (its default `.gitattributes` tracks these): served through the CDN redirect."""
DATE = "2024-01-01T00:00:00.000Z"


@dataclass
class Repo:
    """One repository: its files (read once, when the hub starts) and its commit."""

    repo_id: str
    files: dict[str, bytes]
    """Path in the repository ('/'-separated) -> content."""
    sha: str = ""

    def __post_init__(self):
        listing = "".join(f"{path}\0{git_oid(data)}\n" for path, data in sorted(self.files.items()))
        self.sha = hashlib.sha1(listing.encode()).hexdigest()

    @classmethod
    def from_dir(cls, repo_id: str, root: Path) -> Repo:
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}
        return cls(repo_id, files)

    def folders(self) -> list[str]:
        return sorted({path.rsplit("/", i)[0] for path in self.files for i in range(1, path.count("/") + 1)})

    def entry(self, path: str) -> dict:
        """A file as the tree listing gives it."""
        data = self.files[path]
        out = {"type": "file", "oid": git_oid(data), "size": len(data), "path": path}
        if is_lfs(path):
            out["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return out


def git_oid(data: bytes) -> str:
    """The git blob id of `data` (what the hub gives as a file's `oid` and a git file's `ETag`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


@dataclass
class StandInHub:
    """A running stand-in: its `endpoint` (the value of `HF_ENDPOINT`) and what it was asked."""

    endpoint: str
    repos: dict[tuple[str, str], Repo]
    """(repo type, repo id) -> repository; the types are `model` and `dataset`."""
    requests: list[tuple[str, str]] = field(default_factory=list)
    """(method, path) of every request, in order of arrival."""
    unanswered: list[tuple[str, str]] = field(default_factory=list)
    """The requests no endpoint here serves."""
    fetched: list[tuple[str, str]] = field(default_factory=list)
    """(repo id, path) of every file whose bytes were sent (a git file's GET, an LFS file's GET from the CDN)."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub; every answer has a Content-Length
    hub: StandInHub

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)

    def log_message(self, *args):
        pass

    # --- routing ---------------------------------------------------------------------------------

    def _answer(self, head: bool) -> None:
        self.hub.requests.append((self.command, self.path))
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if parts[:1] == ["cdn"] and len(parts) == 2:
            return self._cdn(parts[1], head)
        if parts[:1] == ["api"] and len(parts) >= 3 and parts[1] in ("models", "datasets"):
            repo_type = parts[1].removesuffix("s")
            repo_id, rest = self._split_repo(repo_type, parts[2:])
            repo = self.hub.repos.get((repo_type, repo_id))
            if not rest or rest[0] == "revision" and len(rest) == 2:
                return self._info(repo, rest[1] if rest else "main", query, head) if repo else self._no_repo(head)
            if rest[0] == "tree" and len(rest) >= 2:
                if not repo:
                    return self._no_repo(head)
                return self._tree(repo, rest[1], "/".join(rest[2:]), query.get("recursive", "").lower() == "true",
                                  head)
        else:
            repo_type = "dataset" if parts[:1] == ["datasets"] else "model"
            repo_id, rest = self._split_repo(repo_type, parts[1:] if repo_type == "dataset" else parts)
            if rest[:1] == ["resolve"] and len(rest) >= 3:
                repo = self.hub.repos.get((repo_type, repo_id))
                return self._resolve(repo, rest[1], "/".join(rest[2:]), head) if repo else self._no_repo(head)
        self.hub.unanswered.append((self.command, self.path))
        self._send(404, {"Content-Type": "text/plain"}, b"Not Found: the stand-in hub does not serve this", head)

    def _split_repo(self, repo_type: str, parts: list[str]) -> tuple[str, list[str]]:
        """(repo id, the rest of the path): `org/name` or a bare `name`, whichever the path holds."""
        if len(parts) >= 2 and ((repo_type, "/".join(parts[:2])) in self.hub.repos
                                or parts[1] not in ("revision", "tree", "resolve")):
            return "/".join(parts[:2]), parts[2:]
        return parts[0], parts[1:]

    # --- endpoints -------------------------------------------------------------------------------

    def _info(self, repo: Repo, revision: str, query: dict, head: bool) -> None:
        if not self._known_revision(repo, revision, head):
            return
        blobs = query.get("blobs", "").lower() == "true"
        siblings = [{"rfilename": path, **({"size": len(data), "blobId": git_oid(data)} if blobs else {})}
                    for path, data in sorted(repo.files.items())]
        body = {"_id": repo.sha[:24], "id": repo.repo_id, "author": repo.repo_id.partition("/")[0] or None,
                "sha": repo.sha, "lastModified": DATE, "createdAt": DATE, "private": False, "gated": False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(len(d) for d in repo.files.values())}
        self._json(200, body, head)

    def _tree(self, repo: Repo, revision: str, folder: str, recursive: bool, head: bool) -> None:
        if not self._known_revision(repo, revision, head):
            return
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        if prefix and prefix[:-1] not in repo.folders():
            return self._error(404, "EntryNotFound", f"{folder} does not exist on \"{revision}\"", head, repo)

        def listed(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])

        entries = [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                   for f in repo.folders() if listed(f)]
        entries += [repo.entry(path) for path in sorted(repo.files) if listed(path)]
        self._json(200, entries, head)

    def _resolve(self, repo: Repo, revision: str, path: str, head: bool) -> None:
        if not self._known_revision(repo, revision, head):
            return
        if path not in repo.files:
            return self._error(404, "EntryNotFound", "Entry not found", head, repo)
        data = repo.files[path]
        if is_lfs(path):  # the hub answers an LFS file with a redirect to its CDN, naming the real file's etag and size
            sha256 = hashlib.sha256(data).hexdigest()
            port = self.server.server_address[1]
            body = f"Found. Redirecting to http://localhost:{port}/cdn/{sha256}".encode()
            return self._send(302, {"Location": f"http://localhost:{port}/cdn/{sha256}", "X-Repo-Commit": repo.sha,
                                    "ETag": f'"{git_oid(data)}"', "X-Linked-Etag": f'"{sha256}"',
                                    "X-Linked-Size": str(len(data)), "Content-Type": "text/plain"}, body, head)
        if not head:
            self.hub.fetched.append((repo.repo_id, path))
        self._send(200, {"X-Repo-Commit": repo.sha, "ETag": f'"{git_oid(data)}"', "Accept-Ranges": "bytes",
                         "Content-Type": "application/octet-stream",
                         "Content-Disposition": f'inline; filename*=UTF-8\'\'{quote(path.rsplit("/", 1)[-1])}'},
                   data, head)

    def _cdn(self, sha256: str, head: bool) -> None:
        found = next(((r.repo_id, p, d) for r in self.hub.repos.values() for p, d in r.files.items()
                      if is_lfs(p) and hashlib.sha256(d).hexdigest() == sha256), None)
        if found is None:
            return self._send(404, {"Content-Type": "text/plain"}, b"NoSuchKey", head)
        repo_id, path, data = found
        if not head:
            self.hub.fetched.append((repo_id, path))
        self._send(200, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"},
                   data, head)

    # --- answers ---------------------------------------------------------------------------------

    def _known_revision(self, repo: Repo, revision: str, head: bool) -> bool:
        if revision in ("main", repo.sha):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        return False

    def _no_repo(self, head: bool) -> None:
        self._error(404, "RepoNotFound", "Repository not found", head)

    def _error(self, status: int, code: str, message: str, head: bool, repo: Repo | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if repo is not None:  # the hub names the commit it looked in (the client caches a missing file under it)
            headers["X-Repo-Commit"] = repo.sha
        self._send(status, headers, json.dumps({"error": message}).encode(), head)

    def _json(self, status: int, body, head: bool) -> None:
        self._send(status, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(body).encode(), head)

    def _send(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))  # a HEAD says the length the GET would send
        self.end_headers()
        if not head:
            self.wfile.write(body)


@contextlib.contextmanager
def stand_in_hub(datasets: dict[str, Path] | None = None, models: dict[str, Path] | None = None,
                 ) -> Iterator[StandInHub]:
    """A stand-in hub serving each directory of `datasets` / `models` (repo id -> directory) as that repository,
    on a free port of 127.0.0.1 in a background thread, until the block ends."""
    repos = {("dataset", rid): Repo.from_dir(rid, root) for rid, root in (datasets or {}).items()}
    repos |= {("model", rid): Repo.from_dir(rid, root) for rid, root in (models or {}).items()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    hub = StandInHub(f"http://127.0.0.1:{server.server_address[1]}", repos)
    server.RequestHandlerClass = type("Handler", (_Handler,), {"hub": hub})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="stand-in-hub",
                              daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN",
                     "HUGGING_FACE_HUB_TOKEN")
"""What the suite sets (conftest: offline mode) or a developer may have (a token), that a process talking to the
stand-in must not inherit."""


def hub_env(hub: StandInHub, hf_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a process whose huggingface_hub talks to `hub`: online, no token, its own cache."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            **extra}
