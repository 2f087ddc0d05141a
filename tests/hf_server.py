"""A tiny Hugging Face Hub look-alike on 127.0.0.1 for the Hub tests.

It answers ``HEAD``/``GET /{owner}/{name}/resolve/{revision}/{filename}`` the way
``huggingface_hub.hf_hub_download`` (2.x) needs: ``X-Repo-Commit``, ``ETag`` and
``Content-Length`` on success; 404 with ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound``
/ ``EntryNotFound`` otherwise (see ``huggingface_hub.utils._http.hf_raise_for_status``). Each
revision is a local folder; its commit hash is derived from the repo and revision names, and the
hash itself is accepted as a revision. Every request is recorded in ``requests``. A repo listed
in ``failing`` answers every request with that HTTP status (a Hub outage: 500, 503, ...).

Example:
    with HubServer({"org/tiny": {"main": folder}}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        hf_hub_download("org/tiny", "config.json", cache_dir=...)
        assert ("GET", "org/tiny", "main", "config.json") in hub.requests
"""

from __future__ import annotations

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


def commit_of(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


class HubServer:
    def __init__(self, repos: dict[str, dict[str, str]], failing: dict[str, int] | None = None):
        self.repos = repos
        self.failing = failing or {}
        self.requests: list[tuple[str, str, str, str]] = []
        self.auth: list[str | None] = []  # the Authorization header of each request
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802 (http.server's naming)
                server._answer(self, body=False)

            def do_GET(self):  # noqa: N802
                server._answer(self, body=True)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       daemon=True)  # poll often: fast shutdown

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def gets(self) -> list[str]:
        """File names fetched with GET, in order."""
        with self._lock:
            return [f for method, _, _, f in self.requests if method == "GET"]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.auth.clear()

    def _find(self, repo_id: str, revision: str) -> tuple[str, str] | None:
        for name, folder in self.repos[repo_id].items():
            commit = commit_of(repo_id, name)
            if revision in (name, commit):
                return folder, commit
        return None

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        parts = unquote(h.path.split("?")[0]).lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, "RepoNotFound", "")
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        with self._lock:
            self.requests.append((h.command, repo_id, revision, filename))
            self.auth.append(h.headers.get("Authorization"))
        if repo_id in self.failing:
            return self._error(h, self.failing[repo_id], "", "")
        if repo_id not in self.repos:
            return self._error(h, 404, "RepoNotFound", "")
        found = self._find(repo_id, revision)
        if found is None:
            return self._error(h, 404, "RevisionNotFound", "")
        folder, commit = found
        path = os.path.join(folder, filename)
        if ".." in filename or not os.path.isfile(path):
            return self._error(h, 404, "EntryNotFound", commit)
        with open(path, "rb") as f:
            data = f.read()
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", commit)
        h.end_headers()
        if body:
            h.wfile.write(data)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, commit: str) -> None:
        message = f"{code}: {h.path}".encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
            h.send_header("X-Error-Message", code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Length", str(len(message)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(message)
