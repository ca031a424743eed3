"""Publishes events to a stream, one per TYPE[:KEY] argument, in one atomic
Append, and prints the acknowledgement of each as a JSON line.

    python producer.py orders order.created:o1 noise.ping order.paid:o1
"""

import argparse
import json
import sys

import grpc

from pullstream_client import connect, pb


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stream")
    parser.add_argument("events", nargs="+", metavar="TYPE[:KEY]")
    args = parser.parse_args()

    events = []
    for n, spec in enumerate(args.events):
        event_type, _, key = spec.partition(":")
        data = json.dumps({"n": n, "type": event_type}).encode()
        events.append(
            pb.NewEvent(type=event_type, key=key, data=data, content_type="application/json")
        )
    stub, metadata = connect()
    try:
        ack = stub.Append(pb.AppendRequest(stream=args.stream, events=events), metadata=metadata)
    except grpc.RpcError as e:
        # The status code name first, so scripts can check it.
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(2)
    for i, event in enumerate(events):
        print(json.dumps({"offset": ack.first_offset + i, "type": event.type, "key": event.key}))


if __name__ == "__main__":
    main()
