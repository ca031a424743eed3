// gRPC-Web end to end, run by CI: Connect-ES's gRPC-Web transport (what a
// browser page uses; here its Node flavour, over HTTP/1.1) against the
// server's one port. No code generation: the service is read from the
// proto's descriptor set (`buf build -o pullstream.binpb` in proto/).
//
//   node e2e.mjs --server-bin ../../target/debug/pullstream --descriptors pullstream.binpb
//
// Starts `pullstream serve` on a temp dir, then: appends a batch, retries
// it with the same idempotency key (a duplicate at the same offsets),
// follows the stream with Subscribe (server streaming) until caught up,
// checks every offset, and checks an error's gRPC code. Exits 1 on any
// difference.

import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";

import { create, createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";

const { values: args } = parseArgs({
  options: { "server-bin": { type: "string" }, descriptors: { type: "string" } },
});

function fail(message) {
  console.error(`grpc-web e2e FAILED: ${message}`);
  process.exit(1);
}

async function freePort() {
  return new Promise((resolve) => {
    const probe = createServer().listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

const registry = createFileRegistry(
  fromBinary(FileDescriptorSetSchema, readFileSync(args.descriptors)),
);
const EventLog = registry.getService("pullstream.v1.EventLog");
const NewEvent = registry.getMessage("pullstream.v1.NewEvent");

const port = await freePort();
const dataDir = mkdtempSync(join(tmpdir(), "pullstream-grpc-web-"));
const server = spawn(args["server-bin"], ["serve", "--data-dir", dataDir, "--listen", `127.0.0.1:${port}`], {
  stdio: "ignore",
});
try {
  const transport = createGrpcWebTransport({ baseUrl: `http://127.0.0.1:${port}`, httpVersion: "1.1" });
  const client = createClient(EventLog, transport);
  let up = false;
  for (let i = 0; i < 100 && !up; i++) {
    try {
      await client.listStreams({});
      up = true;
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  if (!up) fail("the server did not come up");

  const events = ["order.created", "order.paid", "order.shipped"].map((type, i) =>
    create(NewEvent, { type, key: "ord_1", data: new TextEncoder().encode(JSON.stringify({ i })), contentType: "application/json" }),
  );
  const ack = await client.append({ stream: "web", events, idempotencyKey: "batch-1" });
  if (ack.firstOffset !== 0n || ack.count !== 3 || ack.duplicate) fail(`append: ${JSON.stringify({ ...ack, firstOffset: String(ack.firstOffset) })}`);
  const again = await client.append({ stream: "web", events, idempotencyKey: "batch-1" });
  if (!again.duplicate || again.firstOffset !== 0n) fail("the retry was not a duplicate at offset 0");

  const seen = [];
  for await (const response of client.subscribe({ stream: "web" })) {
    for (const event of response.events) seen.push([Number(event.offset), event.type]);
    if (response.caughtUp) break;
  }
  const expected = [[0, "order.created"], [1, "order.paid"], [2, "order.shipped"]];
  if (JSON.stringify(seen) !== JSON.stringify(expected)) fail(`subscribe: ${JSON.stringify(seen)}`);

  try {
    await client.getStream({ stream: "nope" });
    fail("GetStream of a missing stream succeeded");
  } catch (error) {
    const e = ConnectError.from(error);
    if (e.code !== Code.NotFound) fail(`expected NOT_FOUND, got ${Code[e.code]}: ${e.rawMessage}`);
  }
  console.log("grpc-web e2e OK: append, idempotent retry, subscribe to the head, NOT_FOUND, over HTTP/1.1");
} finally {
  server.kill("SIGTERM");
  await new Promise((r) => server.once("exit", r));
  rmSync(dataDir, { recursive: true, force: true });
}
