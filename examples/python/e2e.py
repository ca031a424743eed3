"""End-to-end check of the client examples against a real server (run by CI).

Starts `pullstream serve` on a temp data dir with an API key (and TLS with
--tls), then drives the Python producers (unary and pipelined) and a
consumer example (Python by default, or the command given with --consumer, e.g. the Node one):

  1. a wrong API key is refused with UNAUTHENTICATED;
  2. the consumer (durable, filtered to `order.*`) gets the matching events
     in order, committing as it goes;
  3. the server restarts under it; it reconnects and resumes from its
     committed cursor: the next events arrive once each, none missing;
  4. a consumer of a stream that does not exist fails with NOT_FOUND;
  5. 1,000 events through an append pipeline are acknowledged in order
     with dense offsets; the same run again (same idempotency keys) is
     acknowledged as duplicates at the same offsets; a batch that fails
     its expected offset ends the pipeline with FAILED_PRECONDITION naming
     it.

Any difference from the expected offsets, types or status codes fails it.

    python e2e.py --server-bin ../../target/debug/pullstream [--tls] [--consumer node ../node/consumer.js]
"""

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fail(message):
    sys.exit(f"e2e FAILED: {message}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(directory):
    """A CA and a server certificate for 127.0.0.1 and localhost, with openssl."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=e2e CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "server.key", "-out", "server.csr")
    Path(directory, "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-extfile", "san.ext", "-out", "server.pem")


class Server:
    def __init__(self, binary, data_dir, port, tls_dir):
        self.args = [binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data_dir]
        if tls_dir:
            self.args += ["--tls-cert", f"{tls_dir}/server.pem", "--tls-key", f"{tls_dir}/server.key"]
        self.process = None

    def start(self):
        self.process = subprocess.Popen(self.args, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "RUST_LOG": "info"})
        for line in self.process.stderr:
            if "serving gRPC" in line:
                break
        else:
            fail(f"the server exited before serving: {self.process.wait()}")
        # Keep draining its log so it never blocks on a full pipe.
        self.drain = subprocess.Popen(["cat"], stdin=self.process.stderr, stdout=subprocess.DEVNULL)

    def stop(self):
        self.process.terminate()
        if self.process.wait(timeout=30) != 0:
            fail("the server did not shut down cleanly")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-bin", required=True)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--consumer", default=f"{shlex.quote(sys.executable)} {HERE / 'consumer.py'}",
                        help="the consumer example's command line")
    args = parser.parse_args()
    binary = str(Path(args.server_bin).resolve())

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = f"{tmp}/data"
        created = subprocess.run(
            [binary, "keys", "create", "--data-dir", data_dir, "--tenant", "acme",
             "--scope", "publish", "--scope", "subscribe"],
            check=True, capture_output=True, text=True)
        key = json.loads(created.stdout)["key"]
        tls_dir = None
        port = free_port()
        env = {**os.environ, "PULLSTREAM_API_KEY": key, "PULLSTREAM_SERVER": f"http://127.0.0.1:{port}"}
        if args.tls:
            tls_dir = tmp
            make_certs(tmp)
            env["PULLSTREAM_SERVER"] = f"https://127.0.0.1:{port}"
            env["PULLSTREAM_TLS_CA"] = f"{tmp}/ca.pem"
        server = Server(binary, data_dir, port, tls_dir)
        server.start()

        def produce(*events, expect_ok=True, environment=None):
            out = subprocess.run([sys.executable, str(HERE / "producer.py"), "orders", *events],
                                 capture_output=True, text=True, env=environment or env, timeout=60)
            if expect_ok and out.returncode != 0:
                fail(f"producer failed: {out.stderr}")
            return out

        # 1. A wrong key: the exact status code.
        wrong = produce("order.created:x", expect_ok=False,
                        environment={**env, "PULLSTREAM_API_KEY": "ps_0000000000000000_" + "0" * 64})
        if wrong.returncode == 0 or "UNAUTHENTICATED" not in wrong.stderr:
            fail(f"a wrong key was not refused with UNAUTHENTICATED: {wrong.returncode} {wrong.stderr}")

        acks = [json.loads(l) for l in produce("order.created:o1", "noise.ping", "order.paid:o1").stdout.splitlines()]
        if [a["offset"] for a in acks] != [0, 1, 2]:
            fail(f"unexpected acknowledgements {acks}")

        # 2. The consumer gets the two matching events.
        consumer = subprocess.Popen(
            shlex.split(args.consumer) + ["orders", "--consumer", "billing", "--type", "order.*", "--expect", "4"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        received = []

        def read_events(n):
            deadline = time.monotonic() + 60
            while len(received) < n:
                line = consumer.stdout.readline()
                if not line:
                    fail(f"the consumer ended early (exit {consumer.wait()}): {consumer.stderr.read()}")
                received.append(json.loads(line))
                if time.monotonic() > deadline:
                    fail("the consumer took over 60s")

        read_events(2)
        # Let its commit of the second event land before the restart.
        time.sleep(0.5)

        # 3. Restart under it, then publish more.
        server.stop()
        server.start()
        produce("noise.ping", "order.shipped:o1", "order.created:o2")
        read_events(4)
        if consumer.wait(timeout=60) != 0:
            fail(f"the consumer exited {consumer.returncode}: {consumer.stderr.read()}")
        got = [(e["offset"], e["type"], e["key"]) for e in received]
        want = [(0, "order.created", "o1"), (2, "order.paid", "o1"),
                (4, "order.shipped", "o1"), (5, "order.created", "o2")]
        if got != want:
            fail(f"the consumer received {got}, expected {want}")
        if received[1]["data"] != {"n": 2, "type": "order.paid"}:
            fail(f"payload mismatch: {received[1]}")
        stderr = consumer.stderr.read()
        if "resuming from the committed cursor" not in stderr:
            fail(f"the consumer did not report its reconnect: {stderr}")
        # Everything was committed before the restart: a server that lost
        # or ignored the cursor would have sent events again.
        if "redelivered 0" not in stderr:
            fail(f"events were delivered again after the restart: {stderr}")

        # 4. A stream that does not exist: NOT_FOUND, not a hang or a retry loop.
        missing = subprocess.run(
            shlex.split(args.consumer) + ["nope", "--consumer", "c", "--expect", "1"],
            capture_output=True, text=True, env=env, timeout=60)
        if missing.returncode == 0 or "NOT_FOUND" not in missing.stderr:
            fail(f"a missing stream did not fail with NOT_FOUND: {missing.returncode} {missing.stderr}")

        # 5. Bulk through an append pipeline: acknowledgements in order, dense;
        # a resend with the same idempotency keys writes nothing again; a
        # failing batch is named.
        def pipeline(*arguments):
            return subprocess.run([sys.executable, str(HERE / "pipeline_producer.py"), *arguments],
                                  capture_output=True, text=True, env=env, timeout=120)

        for attempt in ("first", "resend"):
            out = pipeline("bulk", "--count", "1000", "--batch", "50", "--in-flight", "4")
            if out.returncode != 0:
                fail(f"the pipeline producer failed ({attempt}): {out.stderr}")
            acks = [json.loads(l) for l in out.stdout.splitlines()]
            if [(a["sequence"], a["first_offset"], a["count"]) for a in acks] != [
                    (i + 1, i * 50, 50) for i in range(20)]:
                fail(f"unexpected pipeline acknowledgements ({attempt}): {acks}")
            if any(a["duplicate"] != (attempt == "resend") for a in acks):
                fail(f"duplicate flags wrong on the {attempt}: {acks}")
        bad = pipeline("bulk2", "--count", "100", "--batch", "10", "--expected-next-offset", "3")
        if bad.returncode == 0 or "FAILED_PRECONDITION: batch 1:" not in bad.stderr:
            fail(f"a failing pipelined batch was not named: {bad.returncode} {bad.stderr}")

        server.stop()
    print(f"e2e passed ({'TLS, ' if args.tls else ''}API key; consumer: {args.consumer})")


if __name__ == "__main__":
    main()
