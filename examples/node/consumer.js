// A Pullstream durable consumer in Node.js, with @grpc/grpc-js and
// @grpc/proto-loader: the proto is loaded at run time, nothing is generated.
//
// Same behaviour and output as ../python/consumer.py: follows a stream as a
// durable consumer, prints each event as a JSON line, commits the cursor
// after each response, and after a disconnect subscribes again, so the
// server resumes it at the committed cursor. Events at or below the last one
// handled are skipped (a redelivery is handled once). It checks what the
// server sends: offsets must increase and types must match the filter
// (exit 3 otherwise).
//
//   node consumer.js orders --consumer billing --type 'order.*' --expect 10
//
// Environment, as for the pullstream CLI: PULLSTREAM_SERVER (http:// or
// https://HOST:PORT), PULLSTREAM_API_KEY, PULLSTREAM_TLS_CA.

"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.join(__dirname, "..", "..", "proto");
const RETRY = new Set([grpc.status.UNAVAILABLE, grpc.status.CANCELLED, grpc.status.UNKNOWN]);

function parseArgs(argv) {
  const args = { stream: null, consumer: null, types: [], expect: null };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--consumer") args.consumer = argv[++i];
    else if (arg === "--type") args.types.push(argv[++i]);
    else if (arg === "--expect") args.expect = Number(argv[++i]);
    else if (!args.stream) args.stream = arg;
    else usage(`unexpected argument ${arg}`);
  }
  if (!args.stream || !args.consumer) usage("a stream and --consumer are required");
  return args;
}

function usage(message) {
  console.error(`${message}\nusage: node consumer.js STREAM --consumer NAME [--type PATTERN]... [--expect N]`);
  process.exit(64);
}

// The server's type patterns: `*` is one segment, a last `>` the rest.
function matches(pattern, type) {
  const want = pattern.split(".");
  const have = type.split(".");
  for (let i = 0; i < want.length; i++) {
    if (want[i] === ">" && i === want.length - 1) return have.length > i;
    if (i >= have.length || (want[i] !== "*" && want[i] !== have[i])) return false;
  }
  return want.length === have.length;
}

function connect() {
  const definition = protoLoader.loadSync("pullstream/v1/pullstream.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: Number,
    defaults: true,
  });
  const pb = grpc.loadPackageDefinition(definition).pullstream.v1;
  const server = process.env.PULLSTREAM_SERVER || "http://127.0.0.1:50051";
  let credentials;
  let target;
  if (server.startsWith("https://")) {
    target = server.slice("https://".length);
    const ca = process.env.PULLSTREAM_TLS_CA;
    credentials = grpc.credentials.createSsl(ca ? fs.readFileSync(ca) : null);
  } else {
    target = server.replace(/^http:\/\//, "");
    credentials = grpc.credentials.createInsecure();
  }
  const metadata = new grpc.Metadata();
  if (process.env.PULLSTREAM_API_KEY) {
    metadata.set("authorization", `Bearer ${process.env.PULLSTREAM_API_KEY}`);
  }
  return { client: new pb.EventLog(target, credentials), metadata };
}

function commit(client, metadata, request) {
  return new Promise((resolve, reject) =>
    client.CommitCursor(request, metadata, (error) => (error ? reject(error) : resolve())));
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const { client, metadata } = connect();
  let handled = 0;
  let redelivered = 0;
  let lastOffset = -1;
  let backoff = 100;
  for (;;) {
    const request = {
      stream: args.stream,
      consumer: args.consumer,
      filter: args.types.length ? { types: args.types } : null,
    };
    const call = client.Subscribe(request, metadata);
    try {
      for await (const response of call) {
        backoff = 100;
        for (const event of response.events) {
          if (event.offset <= lastOffset) {
            redelivered++; // handled already
            continue;
          }
          if (args.types.length && !args.types.some((p) => matches(p, event.type))) {
            console.error(`server sent ${event.type} at ${event.offset}, outside the filter`);
            process.exit(3);
          }
          lastOffset = event.offset;
          const data = event.data.length ? JSON.parse(event.data.toString()) : null;
          console.log(JSON.stringify({ offset: event.offset, type: event.type, key: event.key, data }));
          handled++;
        }
        if (response.events.length) {
          await commit(client, metadata, {
            stream: args.stream,
            consumer: args.consumer,
            next_offset: response.next_offset,
          });
        }
        if (args.expect !== null && handled >= args.expect) {
          console.error(`handled ${handled}, redelivered ${redelivered}`);
          call.cancel();
          client.close();
          return;
        }
      }
    } catch (error) {
      if (error.code === undefined || !RETRY.has(error.code)) {
        const name = Object.keys(grpc.status).find((k) => grpc.status[k] === error.code) || "ERROR";
        console.error(`error: ${name}: ${error.details || error.message}`);
        process.exit(2);
      }
      const name = Object.keys(grpc.status).find((k) => grpc.status[k] === error.code);
      console.error(`disconnected (${name}); resuming from the committed cursor in ${(backoff / 1000).toFixed(1)}s`);
      await new Promise((resolve) => setTimeout(resolve, backoff));
      backoff = Math.min(backoff * 2, 5000);
    }
  }
}

main();
