"""Bulk-appends COUNT events to a stream through one AppendPipeline, keeping
up to --in-flight batches unacknowledged, and prints each batch's
acknowledgement as a JSON line (in the order the batches were sent).

    python pipeline_producer.py bulk --count 10000 --batch 100 --in-flight 8

The first message opens the pipeline; then batches go out while fewer than
the agreed number are unacknowledged (the server stops reading past that),
and each acknowledgement makes room for the next. A failed batch ends the
call with its status (the message names the batch: "batch N: ..."), and no
later batch is written: resend from there with the same idempotency keys.
"""

import argparse
import json
import sys
import threading

import grpc

from pullstream_client import open_channel, pb, pb_grpc


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stream")
    parser.add_argument("--count", type=int, default=1000, help="events to append")
    parser.add_argument("--batch", type=int, default=100, help="events per batch")
    parser.add_argument("--in-flight", type=int, default=8, help="unacknowledged batches at most")
    parser.add_argument("--expected-next-offset", type=int,
                        help="the stream's head before the first batch (each batch then expects the end of the one before)")
    args = parser.parse_args()

    # One permit per batch in flight: the request generator waits for a
    # permit before each batch, and each acknowledgement returns one.
    room = threading.Semaphore(args.in_flight)
    failed = threading.Event()

    def requests():
        yield pb.AppendPipelineRequest(open=pb.PipelineOpen(
            stream=args.stream, max_in_flight_batches=args.in_flight))
        expected = args.expected_next_offset
        for sequence, first in enumerate(range(0, args.count, args.batch), start=1):
            room.acquire()
            if failed.is_set():
                return
            events = [
                pb.NewEvent(type="bulk.item", key=f"k{n % 16}",
                            data=json.dumps({"n": n}).encode(), content_type="application/json")
                for n in range(first, min(first + args.batch, args.count))
            ]
            batch = pb.PipelineBatch(sequence=sequence, events=events,
                                     idempotency_key=f"{args.stream}-{first}")
            if expected is not None:
                batch.expected_next_offset = expected
                expected += len(events)
            yield pb.AppendPipelineRequest(batch=batch)

    error = None
    channel, metadata = open_channel()
    with channel:
        responses = pb_grpc.EventLogStub(channel).AppendPipeline(requests(), metadata=metadata)
        try:
            for response in responses:
                if response.HasField("opened"):
                    continue
                ack = response.ack
                room.release()
                print(json.dumps({"sequence": ack.sequence, "first_offset": ack.first_offset,
                                  "count": ack.count, "duplicate": ack.duplicate}), flush=True)
        except grpc.RpcError as e:
            error = f"{e.code().name}: {e.details()}"
        # Stop the request generator (it may be waiting for room), and drop
        # the call here rather than when the interpreter shuts down: gRPC's
        # request thread may still hold the call's lock then, and collecting
        # the call would wait for it forever.
        failed.set()
        room.release(args.in_flight)
        del responses
    if error:
        # The status code name first, so scripts can check it.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
