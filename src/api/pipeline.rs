//! The append pipeline loop: one task per AppendPipeline call that reads
//! batches, queues each to the stream's writer behind the previous one
//! (so they keep their order and share group commits), and sends the
//! acknowledgements back in order as the batches become durable.
//!
//! Backpressure is the reading itself: while the agreed number of batches
//! or bytes is unacknowledged, the loop reads no further message, so the
//! client's HTTP/2 window fills and its sends wait. The bytes of every
//! unacknowledged batch are also held in the server-wide request budget
//! (`--max-request-bytes-in-flight`), as a unary Append's are until it is
//! answered, so pipelines cannot hold more memory than that between them.
//!
//! The first failure ends the call with that batch's status (named by its
//! sequence, [`Error::InBatch`]); the stream's writer stops the
//! pipeline's later batches ([`PipelineGate`]), so none is written.

use std::collections::VecDeque;
use std::sync::Arc;

use prost::Message;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use super::convert::{record_from_proto, timestamp};
use crate::auth::{key_lost, KeyRing, Principal};
use crate::error::Error;
use crate::log::{AppendBatch, AppendOutcome, Log, PendingAppend, PipelineGate};
use crate::proto as pb;
use pb::append_pipeline_request::Request as Inbound;
use pb::append_pipeline_response::Response as Outbound;

/// How many responses wait for a slow reader before the loop stops
/// acknowledging (and so, soon, reading).
pub(super) const PIPELINE_BUFFER: usize = 16;

/// One open pipeline and what it runs with.
pub(super) struct Pipeline {
    pub(super) log: Arc<Log>,
    pub(super) keys: Arc<KeyRing>,
    pub(super) caller: Principal,
    /// The stream's stored name.
    pub(super) stream: String,
    pub(super) max_batches: usize,
    pub(super) max_bytes: u64,
    /// The token every batch carries (empty: unfenced).
    pub(super) fencing_token: String,
    /// The server-wide request budget the unacknowledged batches hold.
    pub(super) budget: Arc<Semaphore>,
}

/// A batch sent to the writer and not yet acknowledged.
struct InFlight {
    sequence: u64,
    bytes: u64,
    pending: PendingAppend,
    /// Its share of the request budget, released with the acknowledgement.
    _held: OwnedSemaphorePermit,
}

/// Runs a pipeline until the client ends its side (OK, after the last
/// acknowledgement), a batch fails (that batch's status), the client goes
/// away, the key is revoked, or the server shuts down (UNAVAILABLE).
pub(super) async fn run_pipeline(
    pipeline: Pipeline,
    mut inbound: Streaming<pb::AppendPipelineRequest>,
    tx: mpsc::Sender<Result<pb::AppendPipelineResponse, Status>>,
    shutdown: CancellationToken,
) {
    let result = drive(&pipeline, &mut inbound, &tx, &shutdown).await;
    if let Err(error) = result {
        let _ = tx.send(Err(pipeline.caller.own_error(error).into())).await;
    }
}

async fn drive(
    pipeline: &Pipeline,
    inbound: &mut Streaming<pb::AppendPipelineRequest>,
    tx: &mpsc::Sender<Result<pb::AppendPipelineResponse, Status>>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let gate = Arc::new(PipelineGate::default());
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut bytes_in_flight = 0u64;
    let mut client_done = false;
    let key_lost = key_lost(&pipeline.keys, &pipeline.caller);
    tokio::pin!(key_lost);
    loop {
        if client_done && in_flight.is_empty() {
            return Ok(());
        }
        let room = !client_done
            && in_flight.len() < pipeline.max_batches
            && (in_flight.is_empty() || bytes_in_flight < pipeline.max_bytes);
        let turn = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Err(Error::ShuttingDown),
            error = &mut key_lost => return Err(error),
            // The oldest batch's outcome: acknowledgements go out in order.
            outcome = oldest(&mut in_flight), if !in_flight.is_empty() => Turn::Acked(outcome),
            message = inbound.message(), if room => Turn::Received(message),
        };
        match turn {
            Turn::Acked(outcome) => {
                let done = in_flight.pop_front().expect("polled the oldest");
                bytes_in_flight -= done.bytes;
                let outcome = outcome.map_err(|e| in_batch(done.sequence, e))?;
                if tx.send(Ok(ack(done.sequence, outcome))).await.is_err() {
                    // The client went away; what is queued stays queued.
                    return Ok(());
                }
            }
            Turn::Received(message) => {
                let batch = match message {
                    Ok(Some(pb::AppendPipelineRequest {
                        request: Some(Inbound::Batch(batch)),
                    })) => batch,
                    Ok(Some(_)) => {
                        return Err(Error::InvalidArgument(
                            "every message of an append pipeline after the first must be a `batch` (the pipeline is already open)".into(),
                        ))
                    }
                    Ok(None) => {
                        client_done = true;
                        continue;
                    }
                    // The client broke the call: nobody is left to answer.
                    Err(_) => return Ok(()),
                };
                let sequence = batch.sequence;
                let bytes = batch.encoded_len() as u64;
                let queued = queue(pipeline, batch, bytes, &gate).await;
                match queued {
                    Ok((pending, held)) => {
                        bytes_in_flight += bytes;
                        in_flight.push_back(InFlight {
                            sequence,
                            bytes,
                            pending,
                            _held: held,
                        });
                    }
                    Err(error) => {
                        // The batches before it still get their answers,
                        // so the client knows what was written.
                        drain(&mut in_flight, tx).await?;
                        return Err(in_batch(sequence, error));
                    }
                }
            }
        }
    }
}

/// Checks a batch and queues it to the stream's writer, holding its bytes
/// in the request budget until it is acknowledged.
async fn queue(
    pipeline: &Pipeline,
    batch: pb::PipelineBatch,
    bytes: u64,
    gate: &Arc<PipelineGate>,
) -> Result<(PendingAppend, OwnedSemaphorePermit), Error> {
    let held = reserve(pipeline, bytes)?;
    pipeline.keys.admit(&pipeline.caller)?;
    let batch = AppendBatch {
        events: batch.events.into_iter().map(record_from_proto).collect(),
        expected_next_offset: batch.expected_next_offset,
        idempotency_key: batch.idempotency_key,
        fencing_token: pipeline.fencing_token.clone(),
    };
    let pending = pipeline
        .log
        .append_pipelined(&pipeline.stream, batch, gate)
        .await?;
    Ok((pending, held))
}

/// Answers every batch in flight, in order: the first that failed is the
/// pipeline's error.
async fn drain(
    in_flight: &mut VecDeque<InFlight>,
    tx: &mpsc::Sender<Result<pb::AppendPipelineResponse, Status>>,
) -> Result<(), Error> {
    while let Some(done) = in_flight.pop_front() {
        let outcome = done.pending.await.map_err(|e| in_batch(done.sequence, e))?;
        let _ = tx.send(Ok(ack(done.sequence, outcome))).await;
    }
    Ok(())
}

/// What one turn of the loop brought.
enum Turn {
    /// The oldest batch's outcome.
    Acked(Result<AppendOutcome, Error>),
    /// The client's next message (`None`: it ended its side).
    Received(Result<Option<pb::AppendPipelineRequest>, Status>),
}

/// The oldest batch's outcome (only polled while there is one).
async fn oldest(in_flight: &mut VecDeque<InFlight>) -> Result<AppendOutcome, Error> {
    let first = in_flight.front_mut().expect("a batch in flight");
    (&mut first.pending).await
}

/// Reserves a batch's bytes in the request budget: a full budget is
/// RESOURCE_EXHAUSTED, as for a unary Append (this loop is the one that
/// would free it, by acknowledging, so it cannot wait for it).
fn reserve(pipeline: &Pipeline, bytes: u64) -> Result<OwnedSemaphorePermit, Error> {
    let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
    pipeline
        .budget
        .clone()
        .try_acquire_many_owned(permits)
        .map_err(|_| {
            Error::ResourceExhausted(
                "the server is already holding its most bytes of requests \
                 (--max-request-bytes-in-flight); retry with backoff"
                    .into(),
            )
        })
}

fn in_batch(sequence: u64, error: Error) -> Error {
    Error::InBatch {
        sequence,
        source: Box::new(error),
    }
}

fn ack(sequence: u64, outcome: AppendOutcome) -> pb::AppendPipelineResponse {
    pb::AppendPipelineResponse {
        response: Some(Outbound::Ack(pb::PipelineAck {
            sequence,
            first_offset: outcome.first_offset,
            count: outcome.count,
            time: Some(timestamp(outcome.time_unix_nanos)),
            duplicate: outcome.duplicate,
        })),
    }
}
