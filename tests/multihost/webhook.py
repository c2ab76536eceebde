"""A webhook receiver for tests/multihost/run.sh: python3 webhook.py ADDR PORT SECRET_FILE OUT.

Answers every POST with 200 and appends one JSON line per POST to OUT: the X-Jobz-Event and
X-Jobz-Delivery headers, whether X-Jobz-Signature is the HMAC-SHA256 of the body under the
secret, and the run's job and state from the body.
"""

import hashlib
import hmac
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

ADDR, PORT, SECRET_FILE, OUT = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with open(SECRET_FILE, "rb") as f:
    SECRET = f.read().rstrip(b"\r\n")


class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        want = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        try:
            run = json.loads(body).get("run", {})
        except ValueError:
            run = {}
        line = {
            "path": self.path,
            "event": self.headers.get("X-Jobz-Event"),
            "delivery": self.headers.get("X-Jobz-Delivery"),
            "signed": hmac.compare_digest(want, self.headers.get("X-Jobz-Signature", "")),
            "job": run.get("job"),
            "state": run.get("state"),
            "run_id": run.get("run_id"),
        }
        with open(OUT, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


HTTPServer((ADDR, PORT), Hook).serve_forever()
