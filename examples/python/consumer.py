"""Follows a stream as a durable consumer, printing each event as a JSON line.

The server keeps the consumer's cursor: after each response this consumer
commits the cursor (CommitCursor), and after a disconnect (the server
restarting, a network blip) it subscribes again and the server resumes it at
the committed cursor. Events at or below the last one handled are skipped,
so a redelivery (a crash between handling and committing) is handled once;
with --expect it reports how many it skipped.
It checks what the server sends: offsets must increase and every event must
match the type filter, otherwise it exits with status 3.

    python consumer.py orders --consumer billing --type 'order.*' --expect 10
"""

import argparse
import json
import sys
import time

import grpc

from pullstream_client import connect, pb

# Worth reconnecting: the server is restarting or unreachable.
RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}


def matches(pattern, event_type):
    """The server's type patterns: `*` is one segment, a last `>` the rest."""
    want, have = pattern.split("."), event_type.split(".")
    for i, segment in enumerate(want):
        if segment == ">" and i == len(want) - 1:
            return len(have) > i
        if i >= len(have) or (segment != "*" and have[i] != segment):
            return False
    return len(want) == len(have)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stream")
    parser.add_argument("--consumer", required=True, help="durable consumer name")
    parser.add_argument("--type", action="append", default=[], dest="types", help="type pattern (repeatable)")
    parser.add_argument("--expect", type=int, help="exit 0 after this many events")
    args = parser.parse_args()

    stub, metadata = connect()
    handled = 0
    redelivered = 0
    last_offset = -1
    backoff = 0.1
    while True:
        request = pb.SubscribeRequest(
            stream=args.stream,
            consumer=args.consumer,
            filter=pb.EventFilter(types=args.types) if args.types else None,
        )
        try:
            for response in stub.Subscribe(request, metadata=metadata):
                backoff = 0.1
                for event in response.events:
                    if event.offset <= last_offset:
                        redelivered += 1  # handled already
                        continue
                    if args.types and not any(matches(p, event.type) for p in args.types):
                        print(f"server sent {event.type} at {event.offset}, outside the filter", file=sys.stderr)
                        sys.exit(3)
                    last_offset = event.offset
                    print(json.dumps({
                        "offset": event.offset,
                        "type": event.type,
                        "key": event.key,
                        "data": json.loads(event.data or b"null"),
                    }), flush=True)
                    handled += 1
                if response.events:
                    stub.CommitCursor(
                        pb.CommitCursorRequest(
                            stream=args.stream, consumer=args.consumer, next_offset=response.next_offset
                        ),
                        metadata=metadata,
                    )
                if args.expect is not None and handled >= args.expect:
                    print(f"handled {handled}, redelivered {redelivered}", file=sys.stderr)
                    return
        except grpc.RpcError as e:
            if e.code() not in RETRY:
                print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
                sys.exit(2)
            print(f"disconnected ({e.code().name}); resuming from the committed cursor in {backoff:.1f}s",
                  file=sys.stderr, flush=True)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


if __name__ == "__main__":
    main()
