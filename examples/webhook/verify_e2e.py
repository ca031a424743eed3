"""End-to-end check of `pullstream listen --forward-to` against a webhook
handler that verifies every delivery with the Standard Webhooks reference
library (`standardwebhooks`), as an existing integration would. Run by CI.

  1. `pullstream serve` on a temp data dir; events are appended over the
     HTTP JSON API (plain urllib: no client library);
  2. the handler (http.server) verifies each request's signature with
     `standardwebhooks.Webhook(secret).verify(body, headers)`, answers 500
     twice for one event, then 200;
  3. `pullstream listen` delivers: every event once with a 2xx, in order,
     the failing one retried before anything after it, every signature
     valid; the consumer's cursor (read over HTTP) ends at the head;
  4. the bridge is stopped and started again after more appends: it
     resumes after the last delivered event.

    python verify_e2e.py --server-bin ../../target/debug/pullstream
"""

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def fail(message):
    sys.exit(f"webhook e2e FAILED: {message}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Handler(BaseHTTPRequestHandler):
    received = []  # (offset, status)
    failures = {1: 2}
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            payload = Webhook(SECRET).verify(body, headers)
        except Exception as e:  # a bad signature fails the run
            with Handler.lock:
                Handler.received.append(("bad signature", str(e)))
            self.send_response(400)
            self.end_headers()
            return
        offset = payload["offset"]
        with Handler.lock:
            left = Handler.failures.get(offset, 0)
            status = 500 if left > 0 else 200
            if left > 0:
                Handler.failures[offset] = left - 1
            if headers["webhook-id"] != f"orders:{offset}":
                Handler.received.append(("bad id", headers["webhook-id"]))
            Handler.received.append((offset, status))
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args):
        pass


def http(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def delivered():
    with Handler.lock:
        return [o for o, s in Handler.received if s == 200]


def wait_for(what, done, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if done():
            return
        time.sleep(0.05)
    fail(f"timed out waiting for {what}; received {Handler.received}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server-bin", required=True)
    args = parser.parse_args()

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/webhook"

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data_dir:
        server = subprocess.Popen([args.server_bin, "serve", "--data-dir", data_dir,
                                   "--listen", f"127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bridge = None
        try:
            wait_for("the server", lambda: _up(base))
            events = [{"type": f"order.n{i}", "data": {"i": i}} for i in range(5)]
            http("POST", f"{base}/v1/streams/orders/events", {"events": events})

            def listen():
                return subprocess.Popen(
                    [args.server_bin, "listen", "orders", "--server", base, "--forward-to", hook,
                     "--consumer", "hook", "--signing-secret", SECRET, "--max-backoff", "200ms"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

            bridge = listen()
            wait_for("five deliveries", lambda: len(delivered()) >= 5)
            wait_for("the commit", lambda: http(
                "GET", f"{base}/v1/streams/orders/consumers/hook")["next_offset"] == 5)
            with Handler.lock:
                expected = [(0, 200), (1, 500), (1, 500), (1, 200), (2, 200), (3, 200), (4, 200)]
                if Handler.received != expected:
                    fail(f"deliveries {Handler.received}, expected {expected}")
            bridge.terminate()
            bridge.wait(10)

            http("POST", f"{base}/v1/streams/orders/events",
                 {"events": [{"type": "order.n5", "data": {"i": 5}}]})
            bridge = listen()
            wait_for("the sixth delivery", lambda: len(delivered()) >= 6)
            time.sleep(0.3)
            if delivered() != list(range(6)):
                fail(f"after the restart: {Handler.received}")
            print("webhook e2e OK: 6 events delivered in order, one retried twice, "
                  "every signature verified by standardwebhooks, resumed after a restart")
        finally:
            if bridge:
                bridge.terminate()
            server.terminate()
            server.wait(10)
            receiver.shutdown()


def _up(base):
    try:
        return http("GET", f"{base}/healthz")["status"] == "SERVING"
    except OSError:
        return False


if __name__ == "__main__":
    main()
