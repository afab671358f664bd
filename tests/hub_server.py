"""A stand-in for the Hugging Face Hub on 127.0.0.1 (`HF_ENDPOINT`): the endpoints `huggingface_hub` calls to check a
token, create a repo and upload a folder, answered from memory, so that a push runs for real, offline.

Every file is taken as a regular git file (no LFS, no Xet): the client then sends each file's bytes in its commit.
"""
import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client gone mid-answer (a test interrupted it): nothing for this stand-in to report


class Hub:
    """`tokens[token] = (user, role)`, role 'write' or 'read' (another token is refused: 401); `orgs[user]`: their
    organisations; `repos[(type, id)] = {path: bytes}`, type 'model' or 'space'; `refuse[(what, id)] = status`
    answers a 'create' or a 'commit' of that repo with that error; with `hold` set, a commit waits until `release`
    is (`holding` is set meanwhile). `requests`: (method, path) of every request."""

    def __init__(self):
        self.tokens, self.orgs, self.repos, self.refuse, self.requests = {}, {}, {}, {}, []
        self.sdks = {}  # repo id -> the Space SDK its latest create request named
        self.hold, self.holding, self.release = False, threading.Event(), threading.Event()
        self.server = Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def env(self, token):
        """What a process needs to push here with `token`."""
        return {"HF_ENDPOINT": self.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

    def answer(self, method, path, query, token, body):
        """(status, JSON-able body) for one request."""
        user = self.tokens.get(token)
        if user is None:
            return 401, {"error": "Invalid credentials in Authorization header"}
        name, role = user
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": name, "orgs": [{"name": o} for o in self.orgs.get(name, [])],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}}
        if method == "POST" and path == "/api/validate-yaml":  # a README's front matter, checked before a commit
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            kind, repo_id = payload.get("type") or "model", f"{payload['organization']}/{payload['name']}"
            if role != "write":
                return 403, {"error": "You don't have the rights to create a repo"}
            if ("create", repo_id) in self.refuse:
                return self.refuse[("create", repo_id)], {"error": "refused by the test"}
            self.sdks[repo_id] = payload.get("sdk")
            if (kind, repo_id) in self.repos:
                return 409, {"error": "You already created this repo", "url": self.repo_url(kind, repo_id)}
            self.repos[(kind, repo_id)] = {}
            return 200, {"url": self.repo_url(kind, repo_id)}
        parts = path.split("/")  # /api/{type}s/{namespace}/{name}/{action}/{revision}
        if len(parts) < 7 or parts[1] != "api" or parts[2] not in ("models", "spaces"):
            return 404, {"error": f"no such endpoint: {method} {path}"}
        kind, repo_id, action = parts[2][:-1], f"{parts[3]}/{parts[4]}", parts[5]
        files = self.repos.get((kind, repo_id))
        if files is None:
            return 404, {"error": "Repository not found"}
        if method == "GET" and action == "tree":
            return 200, [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                         for p, b in sorted(files.items())]
        if method == "POST" and action == "preupload":
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in json.loads(body)["files"]]}
        if method == "POST" and action == "commit":
            if self.hold:
                self.holding.set()
                self.release.wait(120)
            if ("commit", repo_id) in self.refuse:
                return self.refuse[("commit", repo_id)], {"error": "refused by the test"}
            if role != "write":
                return 403, {"error": "You don't have the rights to write to this repo"}
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    files.pop(item["value"]["path"], None)
                elif item["key"] != "header":
                    return 400, {"error": f"this stand-in takes no {item['key']}"}
            oid = hashlib.sha1(json.dumps(sorted(files)).encode()).hexdigest()
            return 200, {"commitUrl": f"{self.repo_url(kind, repo_id)}/commit/{oid}", "commitOid": oid}
        return 404, {"error": f"no such endpoint: {method} {path}"}

    def repo_url(self, kind, repo_id):
        return f"{self.url}/{'spaces/' if kind == 'space' else ''}{repo_id}"

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self, method):
                url = urlparse(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                hub.requests.append((method, unquote(url.path)))
                status, answer = hub.answer(method, unquote(url.path), url.query, token, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 404 and "Repository" in answer.get("error", ""):
                    self.send_header("X-Error-Code", "RepoNotFound")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.handle_one("GET")

            def do_POST(self):
                self.handle_one("POST")

        return Handler
