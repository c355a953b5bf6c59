"""The API: answers JSON on $PORT. Standard library only."""
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTANCE = os.environ.get("BERTH_INSTANCE", "api")
GREETING = os.environ.get("GREETING", "hello")
count = 0


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        global count
        if self.path == "/health":
            body = b"ok"
        else:
            count += 1
            body = json.dumps({"greeting": GREETING, "instance": INSTANCE, "served": count}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        if self.path != "/health":
            print(f"{self.command} {self.path} -> {args[1]}", flush=True)


port = int(os.environ["PORT"])
print(f"{INSTANCE} listening on :{port}", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
