"""A Hugging Face Hub stand-in on loopback: the endpoints that huggingface_hub 2.4's
``create_repo``, ``create_branch`` and ``upload_folder`` call, and nothing else.

- ``POST /api/repos/create``: 409 when the repository exists (``exist_ok`` accepts it);
- ``POST /api/models/{repo}/branch/{branch}``: a branch starting from main;
- ``POST /api/validate-yaml``: the README's front matter must be a YAML mapping;
- ``POST /api/models/{repo}/preupload/{revision}``: every file is uploaded "regular"
  (inline in the commit, base64), with the git oid of the file already there, so an
  unchanged file is skipped like on the Hub;
- ``POST /api/models/{repo}/commit/{revision}``: NDJSON, a header line then one line per
  file; ``fail_commits`` makes the next commits fail (``failure="500"`` answers 500,
  ``failure="drop"`` closes the connection without an answer).

Every request must carry ``Authorization: Bearer <token>``.
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
from urllib.parse import unquote, urlsplit

import yaml

REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubState:
    token: str
    repos: dict[str, dict[str, dict[str, bytes]]] = field(default_factory=dict)
    """repo id -> branch -> path -> content."""
    private: dict[str, bool] = field(default_factory=dict)
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
        if self.headers.get("Authorization") != f"Bearer {state.token}":
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        routes = [
            (r"/api/repos/create", self._create_repo),
            (rf"/api/models/{REPO}/branch/(?P<branch>.+)", self._create_branch),
            (r"/api/validate-yaml", self._validate_yaml),
            (rf"/api/models/{REPO}/preupload/(?P<revision>.+)", self._preupload),
            (rf"/api/models/{REPO}/commit/(?P<revision>.+)", self._commit),
        ]
        for pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match:
                with self.server.lock:
                    return handler(body, **{k: unquote(v) for k, v in match.groupdict().items()})
        self._json(404, {"error": f"no route {path}"})

    def _json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
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
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def url(self, repo: str) -> str:
        return f"{self.endpoint}/{repo}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
