"""A Hugging Face Hub stand-in on loopback: the endpoints that huggingface_hub 2.4's
``create_repo``, ``create_branch`` and ``upload_folder`` call, and those its downloads call.

- ``POST /api/repos/create``: 409 when the repository exists (``exist_ok`` accepts it);
- ``POST /api/models/{repo}/branch/{branch}``: a branch starting from main;
- ``POST /api/validate-yaml``: the README's front matter must be a YAML mapping;
- ``POST /api/models/{repo}/preupload/{revision}``: every file is uploaded "regular"
  (inline in the commit, base64), with the git oid of the file already there, so an
  unchanged file is skipped like on the Hub;
- ``POST /api/models/{repo}/commit/{revision}``: NDJSON, a header line then one line per
  file; ``fail_commits`` makes the next commits fail (``failure="500"`` answers 500,
  ``failure="drop"`` closes the connection without an answer).

Every upload request must carry ``Authorization: Bearer <token>``.

Downloads, as ``snapshot_download``, ``hf_hub_download`` and ``HfFileSystem`` (``datasets``) read
them from the Hub, for model repositories and dataset repositories (``datasets/`` in the path):

- ``GET /api/{models,datasets}?author={owner}``: the owner's repositories (private ones with the token);
- ``GET /api/{models,datasets}/{repo}[/revision/{revision}]``: the repository's info, with the
  commit ``sha`` the revision resolves to and its files (``siblings``);
- ``GET /api/{models,datasets}/{repo}/tree/{revision}[/{path}]``: the files (and, unless
  ``recursive``, the folders) under ``path``, with their git oid, size and LFS pointer;
- ``POST /api/{models,datasets}/{repo}/paths-info/{revision}``: the same for the given paths;
- ``HEAD``/``GET /[datasets/]{repo}/resolve/{revision}/{path}``: a small file directly (``ETag``:
  its git oid, ``X-Repo-Commit``, ``Content-Length``); an LFS file (safetensors, parquet, arrow)
  as a 302 to ``/lfs/{sha256}`` on ``localhost``, a host other than the endpoint's, as the Hub
  redirects to its CDN, with ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``; ``/lfs/``
  honours ``Range: bytes=N-`` (a resumed download), and ``cut_downloads`` breaks downloads off.

Errors carry the Hub's ``X-Error-Code`` headers: a repository that does not exist, or is private
and the request has no token, is ``RepoNotFound`` (401 without a token, 404 with one); a gated
one without a token ``GatedRepo``; an unknown revision ``RevisionNotFound``; a missing file
``EntryNotFound``. A branch's commit is a hash of its files; :meth:`HubServer.publish` also
keeps every published commit, so an old commit stays readable after the branch moves on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO = r"(?P<repo>[^/]+/[^/]+)"
KIND = r"(?P<kind>models|datasets)"
LFS_SUFFIXES = (".safetensors", ".parquet", ".arrow", ".bin")
"""Files stored in git LFS, as the Hub's default .gitattributes has it."""


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def commit_of(files: dict[str, bytes]) -> str:
    """The commit hash a branch holding ``files`` resolves to."""
    listing = "".join(f"{path}\0{git_oid(data)}\n" for path, data in sorted(files.items()))
    return hashlib.sha1(listing.encode()).hexdigest()


def repo_key(kind: str, repo: str) -> str:
    """The key of ``HubState.repos``: the model id, or ``datasets/`` and the dataset id."""
    return repo if kind in ("model", "models") else f"datasets/{repo}"


@dataclass
class HubState:
    token: str
    repos: dict[str, dict[str, dict[str, bytes]]] = field(default_factory=dict)
    """repo id -> branch -> path -> content."""
    private: dict[str, bool] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)
    """Repository keys readable only with the token."""
    history: dict[str, dict[str, dict[str, bytes]]] = field(default_factory=dict)
    """repo key -> commit -> path -> content: the commits :meth:`HubServer.publish` made."""
    cut_downloads: int = 0
    """How many of the next LFS downloads break off: the full Content-Length is announced, then
    ``cut_after`` bytes are sent and the connection is closed."""
    cut_after: int = 0
    calls: list[str] = field(default_factory=list)
    """``METHOD path`` of every request, in order."""
    fail_commits: int = 0
    failure: Literal["500", "drop"] = "500"
    commits: int = 0


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        state = self.server.state
        state.calls.append(f"POST {path}")
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self._route([(rf"/api/{KIND}/{REPO}/paths-info/(?P<revision>[^/]+)", self._paths_info)], path, body):
            return  # a download call: the token is optional
        if self.headers.get("Authorization") != f"Bearer {state.token}":
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        routes = [
            (r"/api/repos/create", self._create_repo),
            (rf"/api/models/{REPO}/branch/(?P<branch>.+)", self._create_branch),
            (r"/api/validate-yaml", self._validate_yaml),
            (rf"/api/models/{REPO}/preupload/(?P<revision>.+)", self._preupload),
            (rf"/api/models/{REPO}/commit/(?P<revision>.+)", self._commit),
        ]
        if not self._route(routes, path, body):
            self._json(404, {"error": f"no route {path}"})

    def _route(self, routes: list[tuple[str, Any]], path: str, *leading: Any) -> bool:
        """Call the handler of the first route ``path`` matches, under the lock, with ``leading`` and
        the route's groups as arguments; False when none matches."""
        for pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match:
                arguments = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with self.server.lock:
                    handler(*leading, **arguments)
                return True
        return False

    def _json(
        self,
        status: int,
        payload: Any,
        send_body: bool = True,
        code: str | None = None,
        message: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer ``payload`` as JSON, with the Hub's ``X-Error-Code`` and ``X-Error-Message`` when given."""
        extra = {"Content-Type": "application/json", **(headers or {})}
        if code is not None:
            extra["X-Error-Code"] = code
        if message is not None or code is not None:
            extra["X-Error-Message"] = message or payload.get("error", "")
        self._send(status, json.dumps(payload).encode(), send_body, extra)

    def do_HEAD(self) -> None:
        self._download(send_body=False)

    def do_GET(self) -> None:
        self._download(send_body=True)

    def _download(self, send_body: bool) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        self.server.state.calls.append(f"{self.command} {path}")
        routes = [
            (rf"/api/{KIND}", self._listing),
            (rf"/api/{KIND}/{REPO}(/revision/(?P<revision>[^/]+))?", self._info),
            (rf"/api/{KIND}/{REPO}/tree/(?P<revision>[^/]+)(/(?P<folder>.+))?", self._tree),
            (rf"/(?P<kind>datasets/)?{REPO}/resolve/(?P<revision>[^/]+)/(?P<file>.+)", self._resolve),
            (r"/lfs/(?P<sha256>[0-9a-f]{64})", self._lfs),
        ]
        if not self._route(routes, path, send_body, query):
            self._json(404, {"error": f"no route {path}"}, send_body)

    def _refusal(self, key: str, repo: str, send_body: bool) -> bool:
        """Answer for a repository this request may not read, as the Hub does; True if it answered."""
        state = self.server.state
        authorization = self.headers.get("Authorization")
        if authorization is not None and authorization != f"Bearer {state.token}":
            self._json(
                401, {"error": "Invalid credentials"}, send_body, message="Invalid credentials in Authorization header"
            )
            return True
        if key not in state.repos or (state.private.get(key) and authorization is None):
            status = 404 if authorization else 401
            self._json(status, {"error": "Repository not found"}, send_body, code="RepoNotFound")
            return True
        if key in state.gated and authorization is None:
            error = f"Access to {repo} is restricted. You must have access to it and be authenticated to access it."
            self._json(401, {"error": error}, send_body, code="GatedRepo")
            return True
        return False

    def _files_at(self, key: str, revision: str, send_body: bool) -> tuple[str, dict[str, bytes]] | None:
        """The commit ``revision`` (a branch or a commit) resolves to and its files; None once answered 404."""
        state = self.server.state
        files = state.repos[key].get(revision)
        if files is not None:
            return commit_of(files), files
        if revision in state.history.get(key, {}):
            return revision, state.history[key][revision]
        self._json(404, {"error": f"Invalid rev id: {revision}"}, send_body, code="RevisionNotFound")
        return None

    def _info(self, send_body: bool, query: dict, kind: str, repo: str, revision: str = "main") -> None:
        key = repo_key(kind, repo)
        if self._refusal(key, repo, send_body):
            return
        resolved = self._files_at(key, revision, send_body)
        if resolved is None:
            return
        commit, files = resolved
        state = self.server.state
        info = {
            "id": repo,
            "sha": commit,
            "private": bool(state.private.get(key)),
            "gated": "auto" if key in state.gated else False,
            "siblings": [{"rfilename": name} for name in sorted(files)],
        }
        self._json(200, info, send_body)

    def _listing(self, send_body: bool, query: dict, kind: str) -> None:
        """The repositories of ``author`` that the request may read (``list_models``, ``list_datasets``)."""
        state = self.server.state
        author = query.get("author", [""])[0]
        authorized = self.headers.get("Authorization") == f"Bearer {state.token}"
        prefix = "" if kind == "models" else "datasets/"
        found = [
            {"id": key[len(prefix) :]}
            for key in sorted(state.repos)
            if key.startswith(f"{prefix}{author}/") and (authorized or not state.private.get(key))
        ]
        self._json(200, found, send_body)

    def _entry(self, name: str, data: bytes) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": git_oid(data), "size": len(data), "path": name}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _tree(self, send_body: bool, query: dict, kind: str, repo: str, revision: str, folder: str = "") -> None:
        key = repo_key(kind, repo)
        if self._refusal(key, repo, send_body):
            return
        resolved = self._files_at(key, revision, send_body)
        if resolved is None:
            return
        files = resolved[1]
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries: dict[str, dict[str, Any]] = {}
        for name, data in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if recursive or "/" not in rest:
                entries[name] = self._entry(name, data)
            else:
                sub = prefix + rest.split("/")[0]
                entries[sub] = {"type": "directory", "oid": git_oid(sub.encode()), "size": 0, "path": sub}
        if prefix and not entries:
            return self._json(404, {"error": f"{folder} does not exist"}, send_body, code="EntryNotFound")
        self._json(200, list(entries.values()), send_body)

    def _paths_info(self, body: bytes, kind: str, repo: str, revision: str) -> None:
        key = repo_key(kind, repo)
        if self._refusal(key, repo, True):
            return
        resolved = self._files_at(key, revision, True)
        if resolved is None:
            return
        files = resolved[1]
        fields = parse_qs(body.decode()) if not body.startswith(b"{") else json.loads(body)
        answer = []
        for wanted in fields.get("paths", []):
            wanted = wanted.strip("/")
            if wanted in files:
                answer.append(self._entry(wanted, files[wanted]))
            elif any(name.startswith(f"{wanted}/") for name in files):
                answer.append({"type": "directory", "oid": git_oid(wanted.encode()), "size": 0, "path": wanted})
        self._json(200, answer, True)

    def _resolve(self, send_body: bool, query: dict, repo: str, revision: str, file: str, kind: str = "") -> None:
        key = repo_key("datasets" if kind else "models", repo)
        if self._refusal(key, repo, send_body):
            return
        resolved = self._files_at(key, revision, send_body)
        if resolved is None:
            return
        commit, files = resolved
        if file not in files:
            headers = {"X-Repo-Commit": commit}
            return self._json(404, {"error": "Entry not found"}, send_body, code="EntryNotFound", headers=headers)
        data = files[file]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_oid(data)}"'}
        if file.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            self.server.blobs[sha256] = data
            headers |= {
                "Location": f"{self.server.cdn}/lfs/{sha256}",
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(data)),
            }
            return self._send(302, b"", send_body, headers)
        self._send(200, data, send_body, headers)

    def _lfs(self, send_body: bool, query: dict, sha256: str) -> None:
        data = self.server.blobs.get(sha256)
        if data is None:
            return self._json(404, {"error": "no such object"}, send_body)
        status, start = 200, 0
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if ranged:
            status, start = 206, int(ranged.group(1))
        headers = {"ETag": f'"{sha256}"'}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        state = self.server.state
        if send_body and state.cut_downloads > 0:
            state.cut_downloads -= 1
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(data) - start)}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data[start : start + state.cut_after])
            self.close_connection = True
            return
        self._send(status, data[start:], send_body, headers)

    def _send(self, status: int, data: bytes, send_body: bool, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def _branch(self, repo: str, revision: str) -> dict[str, bytes] | None:
        return self.server.state.repos.get(repo, {}).get(revision)

    def _create_repo(self, body: bytes) -> None:
        request = json.loads(body)
        repo = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
        state = self.server.state
        if repo in state.repos:
            return self._json(409, {"error": "You already created this model repo", "url": self.server.url(repo)})
        state.repos[repo] = {"main": {}}
        state.private[repo] = request.get("visibility") == "private"
        self._json(200, {"url": self.server.url(repo)})

    def _create_branch(self, body: bytes, repo: str, branch: str) -> None:
        branches = self.server.state.repos.get(repo)
        if branches is None:
            return self._json(404, {"error": "Repository not found"})
        if branch in branches:
            return self._json(409, {"error": "Reference already exists"})
        branches[branch] = dict(branches["main"])
        self._json(200, {})

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        parts = content.split("---\n")
        metadata = yaml.safe_load(parts[1]) if content.startswith("---\n") and len(parts) > 2 else None
        if not isinstance(metadata, dict):
            return self._json(400, {"errors": [{"message": "README.md has no YAML metadata block"}]})
        self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, body: bytes, repo: str, revision: str) -> None:
        files = self._branch(repo, revision)
        if files is None:
            return self._json(404, {"error": "Repository or revision not found"})
        answer = [
            {
                "path": item["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_oid(files[item["path"]]) if item["path"] in files else None,
            }
            for item in json.loads(body)["files"]
        ]
        self._json(200, {"files": answer})

    def _commit(self, body: bytes, repo: str, revision: str) -> None:
        state = self.server.state
        files = self._branch(repo, revision)
        if files is None:
            return self._json(404, {"error": "Repository or revision not found"})
        if state.fail_commits > 0:
            state.fail_commits -= 1
            if state.failure == "drop":
                self.close_connection = True
                return
            return self._json(500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"})
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                assert item["value"]["encoding"] == "base64"
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] != "header":
                return self._json(400, {"error": f"unsupported commit operation {item['key']}"})
        state.commits += 1
        oid = hashlib.sha1(f"{repo}@{revision}#{state.commits}".encode()).hexdigest()
        self._json(200, {"commitUrl": f"{self.server.url(repo)}/commit/{oid}", "commitOid": oid})


class HubServer(ThreadingHTTPServer):
    """The server on 127.0.0.1 and a free port, serving from a thread while in a ``with``."""

    daemon_threads = True

    def __init__(self, token: str) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.state = HubState(token=token)
        self.lock = threading.Lock()
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.cdn = f"http://localhost:{self.server_address[1]}"
        """The same server under another host name: the LFS redirects' target, as the Hub's CDN."""
        self.blobs: dict[str, bytes] = {}
        """sha256 -> content of the LFS files resolved so far (what ``/lfs/`` serves)."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def url(self, repo: str) -> str:
        return f"{self.endpoint}/{repo}"

    def publish(
        self,
        repo: str,
        files: dict[str, bytes],
        kind: str = "model",
        branch: str = "main",
        private: bool = False,
        gated: bool = False,
    ) -> str:
        """Make ``files`` the content of ``branch`` of the ``kind`` repository ``repo`` (created when
        missing); return the commit, which stays readable after the branch moves on."""
        key = repo_key(kind, repo)
        with self.lock:
            self.state.repos.setdefault(key, {})[branch] = dict(files)
            self.state.private[key] = private
            if gated:
                self.state.gated.add(key)
            commit = commit_of(files)
            self.state.history.setdefault(key, {})[commit] = dict(files)
        return commit

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
