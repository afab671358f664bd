"""A stand-in for the web on 127.0.0.1: an HTTPS proxy that answers as DuckDuckGo and Bing image search,
and a plain HTTP server for the image files the results point to.

The search package (`ddgs`, its own HTTP client `primp`) runs unchanged: it is pointed at this proxy
through its own setting (`DDGS_PROXY`) and trusts this server's test CA (`SSL_CERT_FILE`), exactly as it
would go through a company proxy. The proxy terminates TLS for the search hosts with a certificate from
that CA, so the real request building, vqd handshake and result parsing run against real HTTP answers.
"""
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import trustme

SEARCH_HOSTS = ["duckduckgo.com", "www.bing.com"]


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # many parallel downloads connect at once


class Web:
    """`images[path] = (content_type, bytes)` served at http://127.0.0.1:port/path, `delay[path]` seconds of
    stall half-way; `results[query] = [paths or URLs]` answered by the search hosts, `search_delay` seconds late."""

    def __init__(self, tmp_path):
        self.images, self.results, self.delay = {}, {}, {}
        self.search_delay = 0
        self.searches = []  # (host, path, query) of every search request seen through the proxy
        ca = trustme.CA()
        self.ca_file = tmp_path / "test-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*SEARCH_HOSTS).configure_cert(self.tls)
        self.tls.set_alpn_protocols(["http/1.1"])
        self.server = Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def image_url(self, path):
        return path if "://" in path else f"{self.url}/{path}"

    # What the search hosts answer -------------------------------------------------------------
    def search_answer(self, host, path, query):
        """(status, content_type, body) for a request that reached a search host through the proxy."""
        q = query.get("q", [""])[0]
        hits = [self.image_url(p) for p in self.results.get(q, [])]
        self.searches.append((host, path, q))
        time.sleep(self.search_delay)
        if host == "duckduckgo.com" and path == "/":  # the page a DuckDuckGo search token (vqd) comes from
            return 200, "text/html", b'<html><script>vqd="4-1234567890";</script></html>'
        if host == "duckduckgo.com" and path == "/i.js":
            if query.get("vqd") != ["4-1234567890"]:
                return 403, "text/plain", b"bad vqd"
            start = int(query.get("s", ["0"])[0])
            page = hits[start:start + 100]
            return 200, "application/json", json.dumps({"results": [
                {"title": f"{q} {i}", "image": u, "thumbnail": u, "url": u, "height": 40, "width": 48,
                 "source": "Bing"} for i, u in enumerate(page)]}).encode()
        if host == "www.bing.com" and path == "/images/async":
            first, count = int(query["first"][0]) - 1, int(query["count"][0])
            items = "".join(
                '<div><div class="imgpt"><a class="iusc" m=\'%s\'></a></div><div class="infopt"></div></div>'
                % json.dumps({"t": f"{q} {i}", "murl": u, "turl": u, "purl": u})
                for i, u in enumerate(hits[first:first + count]))
            return 200, "text/html", f"<html><body>{items}</body></html>".encode()
        return 404, "text/plain", b"not found"

    def _handler(self):
        web = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            host = None  # set once a CONNECT tunnel has been opened

            def log_message(self, *args):
                pass

            def reply(self, status, ctype, body):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_CONNECT(self):
                host = self.path.rsplit(":", 1)[0]
                if host not in SEARCH_HOSTS:
                    self.reply(502, "text/plain", b"this test proxy only reaches the search hosts")
                    return
                self.send_response(200, "Connection established")
                self.end_headers()
                self.wfile.flush()
                # From here on this connection is TLS to "host", with a certificate from the test CA.
                self.connection = web.tls.wrap_socket(self.connection, server_side=True)
                self.rfile = self.connection.makefile("rb", self.rbufsize)
                self.wfile = self.connection.makefile("wb", 0)
                self.host = host
                self.close_connection = False
                while not self.close_connection:
                    self.handle_one_request()

            def do_GET(self):
                url = urlparse(self.path)
                if self.host:
                    self.reply(*web.search_answer(self.host, url.path, parse_qs(url.query)))
                    return
                key = url.path.lstrip("/") + (f"?{url.query}" if url.query else "")
                if key not in web.images:
                    self.reply(404, "text/plain", b"not found")
                    return
                ctype, body = web.images[key]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2])  # a slow server stalls half-way through the image
                self.wfile.flush()
                time.sleep(web.delay.get(key, 0))
                self.wfile.write(body[len(body) // 2:])

        return Handler
