//! The gRPC `EventLog` service: turns requests into log calls and log
//! results into responses. The one place that maps [`Error`] to a status.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{
    encode_key, encode_varint, encoded_len_varint, key_len, message, uint64, WireType,
};
use prost_types::Timestamp;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::auth::{key_lost, KeyRing, Principal, Scope, SubscriptionSlot};
use crate::error::Error;
use crate::log::{
    self, AppendBatch, ConsumerLease, ConsumerSettings, EventFilter, EventSlice, Log, StartAt,
    Subscription,
};
use crate::metrics::ActiveSubscription;
use crate::proto::event_log_server::EventLog;
use crate::proto::{self as pb, subscribe_request};
use crate::storage::{EventRecord, Rendering, StorageError};
use prometheus_client::metrics::counter::Counter;

mod keys;
pub use keys::ApiKeysService;
/// Proto conversions for API keys (shared with the CLI).
pub mod keys_proto {
    pub use super::keys::{key_to_proto, scope_of_proto, scope_to_proto};
}

/// Default and largest page for Read, and default batch for Subscribe.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
/// The longest status message sent, in bytes.
const MAX_STATUS_MESSAGE_BYTES: usize = 2048;

/// Responses stop growing past this many bytes (at least one event each).
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;
/// A subscription's responses stop growing past this many bytes (at least
/// one event each): smaller than a Read page, since they queue.
const SUBSCRIBE_RESPONSE_BYTES: usize = 256 << 10;
/// Responses a subscription may have queued for a slow client before its
/// task waits: with HTTP/2 flow control this bounds a stalled subscriber's
/// memory to 4 x 256 KiB = 1 MiB (more only for single events larger than
/// that). One more slot is kept for the final status.
const SUBSCRIPTION_BUFFER: usize = 4 + 1;

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        // Echoed input is cut where the message is built (`error::shown`);
        // this bounds whatever else a message holds, so no status header
        // grows past what clients accept.
        let mut message = error.to_string();
        if message.len() > MAX_STATUS_MESSAGE_BYTES {
            let mut cut = MAX_STATUS_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        match error {
            Error::InvalidStreamName { .. } | Error::InvalidArgument(_) => {
                Status::invalid_argument(message)
            }
            Error::StreamNotFound(_)
            | Error::ConsumerNotFound { .. }
            | Error::GroupNotFound { .. }
            | Error::MemberNotFound { .. } => Status::not_found(message),
            Error::ConsumerSessionEnded { .. } => Status::aborted(message),
            Error::Unauthenticated(_) => Status::unauthenticated(message),
            Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::KeyNotFound(_) => Status::not_found(message),
            Error::ResourceExhausted(_) => Status::resource_exhausted(message),
            Error::RequestTimeout(_) => Status::deadline_exceeded(message),
            Error::StreamExists(_) | Error::IdempotencyConflict { .. } => {
                Status::already_exists(message)
            }
            Error::OffsetPastHead { .. } | Error::OffsetTrimmed { .. } => {
                Status::out_of_range(message)
            }
            Error::WrongExpectedOffset { .. } => Status::failed_precondition(message),
            Error::DataLoss { .. } => Status::data_loss(message),
            Error::ShuttingDown | Error::StorageFailed(_) => Status::unavailable(message),
            Error::DiskFull { .. } => Status::resource_exhausted(message),
            Error::Storage(StorageError::Wal(_)) => Status::unavailable(message),
            Error::Storage(_) | Error::VerifyFailed(_) => Status::internal(message),
        }
    }
}

/// INVALID_ARGUMENT for a request the handlers reject before it reaches
/// the log, through the one mapping above.
pub(crate) fn invalid(message: impl Into<String>) -> Status {
    Error::InvalidArgument(message.into()).into()
}

/// Service settings.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Heartbeat period on idle subscriptions.
    pub heartbeat_interval: Duration,
}

/// The `EventLog` implementation.
pub struct EventLogService {
    log: Arc<Log>,
    keys: Arc<KeyRing>,
    config: ServiceConfig,
    /// Cancelled when the server shuts down: subscriptions end with UNAVAILABLE.
    shutdown: CancellationToken,
    /// Subscription tasks, so shutdown can wait for them to end.
    subscriptions: TaskTracker,
}

impl EventLogService {
    /// A service over `log`.
    pub fn new(
        log: Arc<Log>,
        keys: Arc<KeyRing>,
        config: ServiceConfig,
        shutdown: CancellationToken,
        subscriptions: TaskTracker,
    ) -> EventLogService {
        EventLogService {
            log,
            keys,
            config,
            shutdown,
            subscriptions,
        }
    }

    /// Who is calling (from the `authorization` metadata), if the key has
    /// one of `scopes`.
    fn caller<T>(&self, request: &Request<T>, scopes: &[Scope]) -> Result<Principal, Status> {
        caller(&self.keys, request, scopes)
    }
}

/// Authenticates a request and checks its key has one of `scopes`.
pub fn caller<T>(
    keys: &KeyRing,
    request: &Request<T>,
    scopes: &[Scope],
) -> Result<Principal, Status> {
    // The admission layer (server/admission.rs) authenticated the call
    // from its headers before its body was read; a service used without
    // it authenticates here.
    let principal = match request.extensions().get::<Principal>() {
        Some(principal) => principal.clone(),
        None => keys.authenticate(
            request
                .metadata()
                .get("authorization")
                .map(|v| v.to_str().unwrap_or("(not text)")),
        )?,
    };
    principal.require(scopes)?;
    keys.admit(&principal)?;
    Ok(principal)
}

/// Any scope: describing streams needs only a valid key.
const ANY_SCOPE: &[Scope] = &[Scope::Publish, Scope::Subscribe, Scope::Admin];

type SubscribeStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EventLog for EventLogService {
    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let caller = self.caller(&request, &[Scope::Publish])?;
        let request = request.into_inner();
        let stream = caller.stream(&request.stream)?;
        let batch = AppendBatch {
            events: request.events.into_iter().map(record_from_proto).collect(),
            expected_next_offset: request.expected_next_offset,
            idempotency_key: request.idempotency_key,
        };
        let outcome = self.log.append(&stream, batch).await?;
        Ok(Response::new(pb::AppendResponse {
            stream: request.stream,
            first_offset: outcome.first_offset,
            count: outcome.count,
            time: Some(timestamp(outcome.time_unix_nanos)),
            duplicate: outcome.duplicate,
        }))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let caller = self.caller(&request, &[Scope::Subscribe])?;
        let request = request.into_inner();
        let stream = caller.stream(&request.stream)?;
        let limit = page_size(request.limit, "limit")?;
        let filter = filter_from_proto(request.filter)?.unwrap_or_default();
        let version = version_from_proto(request.version)?.unwrap_or_default();
        let page = self
            .log
            .read(&stream, request.offset, limit, MAX_RESPONSE_BYTES, &filter)?;
        Ok(Response::new(pb::ReadResponse {
            events: Vec::new(),
            encoded_events: encode_events(&request.stream, &page.slices, version.as_bytes()),
            next_offset: page.next_offset,
            head_offset: page.head_offset,
        }))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<SubscribeStream>, Status> {
        let caller = self.caller(&request, &[Scope::Subscribe])?;
        let slot = self.keys.subscription_slot(&caller)?;
        let request = request.into_inner();
        let stream = caller.stream(&request.stream)?;
        let start = match request.start {
            None => StartAt::Earliest,
            Some(subscribe_request::Start::Offset(offset)) => StartAt::Offset(offset),
            Some(subscribe_request::Start::Position(p)) => match pb::StartPosition::try_from(p) {
                Ok(pb::StartPosition::Unspecified | pb::StartPosition::Earliest) => {
                    StartAt::Earliest
                }
                Ok(pb::StartPosition::Latest) => StartAt::Latest,
                Err(_) => {
                    return Err(invalid(format!(
                        "unknown start position {p}: use EARLIEST, LATEST, an offset or a time"
                    )))
                }
            },
            Some(subscribe_request::Start::Time(t)) => StartAt::Time(unix_nanos(&t)?),
        };
        let max_events = if request.max_batch_events == 0 {
            DEFAULT_PAGE as usize
        } else {
            request.max_batch_events.min(MAX_PAGE) as usize
        };
        let filter = filter_from_proto(request.filter)?;
        let version = version_from_proto(request.version)?;
        let (subscription, lease, version) = if !request.group.is_empty() {
            if !request.consumer.is_empty() {
                return Err(invalid(
                    "give either consumer or group (with member), not both",
                ));
            }
            if request.member.is_empty() {
                return Err(invalid(
                    "a group subscription needs a member id: each worker passes its own, stable one",
                ));
            }
            let subscription = self
                .log
                .subscribe_group(
                    &stream,
                    &request.group,
                    &request.member,
                    start,
                    filter.unwrap_or_default(),
                )
                .await?;
            (subscription, None, version.unwrap_or_default())
        } else if !request.member.is_empty() {
            return Err(invalid("member is only meaningful with group"));
        } else if request.consumer.is_empty() {
            let subscription = self
                .log
                .subscribe(&stream, start, filter.unwrap_or_default())?;
            (subscription, None, version.unwrap_or_default())
        } else {
            let settings = ConsumerSettings { filter, version };
            let (lease, cursor, filter, version) = self
                .log
                .open_consumer(&stream, &request.consumer, start, settings)
                .await?;
            let subscription = self
                .log
                .subscribe(&stream, StartAt::Offset(cursor), filter)?;
            (subscription, Some(lease), version)
        };
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        self.subscriptions.spawn(run_subscription(
            Delivery {
                stream: request.stream,
                subscription,
                lease,
                key: (self.keys.clone(), caller, slot),
                version: Bytes::from(version),
                max_events,
                metrics: (
                    self.log.stream_metrics(&stream)?.delivered_events,
                    ActiveSubscription::new(self.log.metrics()),
                ),
            },
            tx,
            self.config.heartbeat_interval,
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn create_stream(
        &self,
        request: Request<pb::CreateStreamRequest>,
    ) -> Result<Response<pb::CreateStreamResponse>, Status> {
        let caller = self.caller(&request, &[Scope::Publish, Scope::Admin])?;
        let request = request.into_inner();
        let retention = retention_from_proto(request.retention)?;
        let name = request.stream;
        let info = self
            .log
            .create_stream(&caller.stream(&name)?, retention)
            .await?;
        Ok(Response::new(pb::CreateStreamResponse {
            stream: Some(stream_info_to_proto(info, name)),
        }))
    }

    async fn get_stream(
        &self,
        request: Request<pb::GetStreamRequest>,
    ) -> Result<Response<pb::GetStreamResponse>, Status> {
        let caller = self.caller(&request, ANY_SCOPE)?;
        let name = request.into_inner().stream;
        let info = self.log.stream_info(&caller.stream(&name)?)?;
        Ok(Response::new(pb::GetStreamResponse {
            stream: Some(stream_info_to_proto(info, name)),
        }))
    }

    async fn list_streams(
        &self,
        request: Request<pb::ListStreamsRequest>,
    ) -> Result<Response<pb::ListStreamsResponse>, Status> {
        let caller = self.caller(&request, ANY_SCOPE)?;
        let request = request.into_inner();
        let limit = page_size(request.page_size, "page_size")?;
        // An empty token gives the tenant's prefix: its first page.
        let after = crate::auth::stored_stream_name(&caller.tenant, &request.page_token);
        // Only the caller's tenant's streams its key may use. One more than
        // asked tells whether another page exists.
        let visible = |stored: &str| caller.own_name(stored).is_some_and(|n| caller.may_use(n));
        let mut streams = self.log.list_streams(&after, limit + 1, &visible);
        let more = streams.len() > limit;
        streams.truncate(limit);
        let streams: Vec<pb::StreamInfo> = streams
            .into_iter()
            .map(|info| {
                let name = caller.own_name(&info.name).unwrap_or_default().to_string();
                stream_info_to_proto(info, name)
            })
            .collect();
        let next_page_token = match streams.last() {
            Some(last) if more => last.name.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListStreamsResponse {
            streams,
            next_page_token,
        }))
    }

    async fn delete_stream(
        &self,
        request: Request<pb::DeleteStreamRequest>,
    ) -> Result<Response<pb::DeleteStreamResponse>, Status> {
        let caller = self.caller(&request, &[Scope::Admin])?;
        let name = request.into_inner().stream;
        self.log.delete_stream(&caller.stream(&name)?).await?;
        Ok(Response::new(pb::DeleteStreamResponse {}))
    }

    async fn commit_cursor(
        &self,
        request: Request<pb::CommitCursorRequest>,
    ) -> Result<Response<pb::CommitCursorResponse>, Status> {
        let caller = self.caller(&request, &[Scope::Subscribe])?;
        let request = request.into_inner();
        let info = self
            .log
            .commit_cursor(
                &caller.stream(&request.stream)?,
                &request.consumer,
                request.next_offset,
            )
            .await?;
        Ok(Response::new(pb::CommitCursorResponse {
            consumer: Some(consumer_info_to_proto(info, request.stream)),
        }))
    }

    async fn get_consumer(
        &self,
        request: Request<pb::GetConsumerRequest>,
    ) -> Result<Response<pb::GetConsumerResponse>, Status> {
        let caller = self.caller(&request, &[Scope::Subscribe])?;
        let request = request.into_inner();
        let info = self
            .log
            .consumer_info(&caller.stream(&request.stream)?, &request.consumer)?;
        Ok(Response::new(pb::GetConsumerResponse {
            consumer: Some(consumer_info_to_proto(info, request.stream)),
        }))
    }

    async fn list_consumers(
        &self,
        request: Request<pb::ListConsumersRequest>,
    ) -> Result<Response<pb::ListConsumersResponse>, Status> {
        let caller = self.caller(&request, &[Scope::Subscribe])?;
        let name = request.into_inner().stream;
        let consumers = self.log.list_consumers(&caller.stream(&name)?)?;
        Ok(Response::new(pb::ListConsumersResponse {
            consumers: consumers
                .into_iter()
                .map(|c| consumer_info_to_proto(c, name.clone()))
                .collect(),
        }))
    }

    async fn update_stream(
        &self,
        request: Request<pb::UpdateStreamRequest>,
    ) -> Result<Response<pb::UpdateStreamResponse>, Status> {
        let caller = self.caller(&request, &[Scope::Admin])?;
        let request = request.into_inner();
        let retention = retention_from_proto(request.retention)?;
        let info = self
            .log
            .update_stream(&caller.stream(&request.stream)?, retention)
            .await?;
        Ok(Response::new(pb::UpdateStreamResponse {
            stream: Some(stream_info_to_proto(info, request.stream)),
        }))
    }

    async fn get_server_status(
        &self,
        request: Request<pb::GetServerStatusRequest>,
    ) -> Result<Response<pb::GetServerStatusResponse>, Status> {
        let caller = self.caller(&request, ANY_SCOPE)?;
        let (started, uptime) = self.log.opened();
        let visible = |stored: &str| caller.own_name(stored).is_some_and(|n| caller.may_use(n));
        let start = crate::auth::stored_stream_name(&caller.tenant, "");
        let mut streams = Vec::new();
        // A stream deleted between listing and describing is left out.
        for info in self.log.list_streams(&start, usize::MAX, &visible) {
            let (Ok(rate), Ok(consumers), Ok(damaged)) = (
                self.log.append_rate(&info.name),
                self.log.list_consumers(&info.name),
                self.log.damaged_ranges(&info.name),
            ) else {
                continue;
            };
            let name = caller.own_name(&info.name).unwrap_or_default().to_string();
            streams.push(pb::StreamStatus {
                consumers: consumers
                    .into_iter()
                    .map(|c| consumer_info_to_proto(c, name.clone()))
                    .collect(),
                stream: Some(stream_info_to_proto(info, name)),
                append_rate: rate,
                damaged: damaged
                    .into_iter()
                    .map(|(first_offset, end_offset)| pb::DamagedRange {
                        first_offset,
                        end_offset,
                    })
                    .collect(),
            });
        }
        Ok(Response::new(pb::GetServerStatusResponse {
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            start_time: Some(timestamp(started)),
            uptime: prost_types::Duration::try_from(uptime).ok(),
            streams,
            write_refusal: self.log.write_refusal().reason.unwrap_or_default(),
        }))
    }

    async fn commit_group(
        &self,
        request: Request<pb::CommitGroupRequest>,
    ) -> Result<Response<pb::CommitGroupResponse>, Status> {
        let caller = self.caller(&request, &[Scope::Subscribe])?;
        let request = request.into_inner();
        let info = self
            .log
            .commit_group(
                &caller.stream(&request.stream)?,
                &request.group,
                &request.member,
                request.next_offset,
            )
            .await?;
        Ok(Response::new(pb::CommitGroupResponse {
            group: Some(group_info_to_proto(info, request.stream)),
        }))
    }

    async fn get_group(
        &self,
        request: Request<pb::GetGroupRequest>,
    ) -> Result<Response<pb::GetGroupResponse>, Status> {
        let caller = self.caller(&request, &[Scope::Subscribe])?;
        let request = request.into_inner();
        let info = self
            .log
            .group_info(&caller.stream(&request.stream)?, &request.group)?;
        Ok(Response::new(pb::GetGroupResponse {
            group: Some(group_info_to_proto(info, request.stream)),
        }))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let caller = self.caller(&request, &[Scope::Admin])?;
        let request = request.into_inner();
        self.log
            .delete_group(&caller.stream(&request.stream)?, &request.group)
            .await?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    async fn delete_consumer(
        &self,
        request: Request<pb::DeleteConsumerRequest>,
    ) -> Result<Response<pb::DeleteConsumerResponse>, Status> {
        let caller = self.caller(&request, &[Scope::Admin])?;
        let request = request.into_inner();
        self.log
            .delete_consumer(&caller.stream(&request.stream)?, &request.consumer)
            .await?;
        Ok(Response::new(pb::DeleteConsumerResponse {}))
    }
}

/// What one subscription delivers, and how.
struct Delivery {
    /// The stream as the caller names it (events carry this name).
    stream: String,
    subscription: Subscription,
    /// The key the subscription was opened with (it ends if the key is
    /// revoked or expires), and the key's subscription slot it holds.
    key: (Arc<KeyRing>, Principal, SubscriptionSlot),
    /// Held while subscribed as a durable consumer.
    lease: Option<ConsumerLease>,
    /// The pinned payload version; empty for the default payload.
    version: Bytes,
    max_events: usize,
    /// The stream's delivered-events counter, and this subscription's
    /// place in the active count.
    metrics: (Counter, ActiveSubscription),
}

/// Resolves when the consumer lease is lost; never without one.
async fn lease_lost(lease: &Option<ConsumerLease>) -> Error {
    match lease {
        Some(lease) => lease.lost().await,
        None => std::future::pending().await,
    }
}

/// Drives one subscription: sends events as they become available, a
/// heartbeat when idle, and ends on error, client disconnect or shutdown.
///
/// With a filter, a poll may examine events and deliver none: the cursor
/// then moved without a response. Such progress goes out as a heartbeat
/// (no events, the new `next_offset`) when the cursor first reaches the
/// head (so a catching-up client learns at once that it has caught up) and
/// otherwise when the heartbeat interval passes, so a consumer of rare
/// events keeps an up-to-date cursor without a message per skipped event.
async fn run_subscription(
    delivery: Delivery,
    tx: mpsc::Sender<Result<pb::SubscribeResponse, Status>>,
    heartbeat: Duration,
    shutdown: CancellationToken,
) {
    let Delivery {
        stream,
        mut subscription,
        key: (keys, principal, _slot),
        lease,
        version,
        max_events,
        metrics: (delivered, _active),
    } = delivery;
    // A slot kept for the final status, so a client that stopped reading
    // still learns why its stream ended once it reads again (a full buffer
    // would otherwise drop it and the client would see a clean end).
    let Ok(last_word) = tx.clone().reserve_owned().await else {
        return;
    };
    // The first response goes out at once, events or not, so the client
    // knows its subscription is live.
    let mut send_now = true;
    let mut last_sent = Instant::now();
    // Whether the last response sent said "caught up".
    let mut sent_caught_up = false;
    loop {
        let before = subscription.next_offset();
        let slices = match subscription.poll(max_events, SUBSCRIBE_RESPONSE_BYTES) {
            Ok(slices) => slices,
            Err(error) => {
                let _ = last_word.send(Err(error.into()));
                return;
            }
        };
        let moved = subscription.next_offset() != before;
        let at_head = subscription.next_offset() >= subscription.head().next_offset;
        if moved
            && slices.is_empty()
            && (last_sent.elapsed() >= heartbeat || at_head && !sent_caught_up)
        {
            send_now = true;
        }
        // A group member hears of its new slots at once.
        let assignment = subscription
            .take_group_update()
            .map(|u| pb::GroupAssignment {
                generation: u.generation,
                slots: u.slots,
                revoked_slots: u.revoked,
                slot_count: log::SLOT_COUNT as u32,
            });
        if !slices.is_empty() || send_now || assignment.is_some() {
            send_now = false;
            delivered.inc_by(slices.iter().map(|s| s.len() as u64).sum());
            last_sent = Instant::now();
            let head = subscription.head();
            sent_caught_up = subscription.next_offset() >= head.next_offset;
            let response = pb::SubscribeResponse {
                assignment,
                events: Vec::new(),
                encoded_events: encode_events(&stream, &slices, &version),
                next_offset: subscription.next_offset(),
                head_offset: head.next_offset,
                caught_up: sent_caught_up,
                server_time: Some(timestamp(keys.now())),
            };
            tokio::select! {
                sent = tx.send(Ok(response)) => if sent.is_err() { return },
                _ = shutdown.cancelled() => {
                    let _ = last_word.send(Err(Error::ShuttingDown.into()));
                    return;
                }
                error = lease_lost(&lease) => {
                    let _ = last_word.send(Err(error.into()));
                    return;
                }
                error = key_lost(&keys, &principal) => {
                    let _ = last_word.send(Err(error.into()));
                    return;
                }
            }
            if !slices.is_empty() {
                continue;
            }
        }
        if moved {
            // More to examine right away; let other tasks run between
            // polls of a long filtered scan.
            tokio::task::yield_now().await;
            continue;
        }
        let idle_until = last_sent + heartbeat;
        tokio::select! {
            _ = subscription.changed() => {}
            _ = tokio::time::sleep_until(idle_until) => send_now = true,
            _ = tx.closed() => return,
            _ = shutdown.cancelled() => {
                let _ = last_word.send(Err(Error::ShuttingDown.into()));
                return;
            }
            error = lease_lost(&lease) => {
                let _ = last_word.send(Err(error.into()));
                return;
            }
            error = key_lost(&keys, &principal) => {
                let _ = last_word.send(Err(error.into()));
                return;
            }
        }
    }
}

/// A filter from the request; `None` when absent or empty.
fn filter_from_proto(filter: Option<pb::EventFilter>) -> Result<Option<EventFilter>, Status> {
    match filter {
        Some(f) if !f.types.is_empty() || !f.keys.is_empty() => {
            Ok(Some(EventFilter::new(f.types, f.keys)?))
        }
        _ => Ok(None),
    }
}

/// A payload version pin from the request; `None` when empty.
fn version_from_proto(version: String) -> Result<Option<String>, Status> {
    if version.is_empty() {
        return Ok(None);
    }
    log::validate_version_label(&version)?;
    Ok(Some(version))
}

/// Nanoseconds since the Unix epoch from a protobuf timestamp.
fn unix_nanos(t: &Timestamp) -> Result<i64, Status> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(invalid(format!(
            "invalid start time: nanos {} must be within 0..1e9",
            t.nanos
        )));
    }
    Ok(t.seconds
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(t.nanos)))
}

fn consumer_info_to_proto(info: log::ConsumerInfo, stream: String) -> pb::ConsumerInfo {
    let filter = (!info.types.is_empty() || !info.keys.is_empty()).then_some(pb::EventFilter {
        types: info.types,
        keys: info.keys,
    });
    pb::ConsumerInfo {
        stream,
        name: info.name,
        next_offset: info.next_offset,
        lag: info.lag,
        last_commit_time: (info.last_commit_unix_nanos != 0)
            .then(|| timestamp(info.last_commit_unix_nanos)),
        created_time: Some(timestamp(info.created_unix_nanos)),
        filter,
        version: info.version,
        active: info.active,
        cursor_trimmed: info.cursor_trimmed,
    }
}

fn group_info_to_proto(info: log::GroupInfo, stream: String) -> pb::GroupInfo {
    let head = info.head;
    pb::GroupInfo {
        stream,
        name: info.name,
        members: info
            .members
            .into_iter()
            .map(|m| pb::GroupMember {
                member: m.member,
                slots: m.slots,
                committed_offset: m.committed,
                lag: head.saturating_sub(m.committed),
                delivered_offset: m.delivered,
            })
            .collect(),
        low_watermark: info.low_watermark,
        head_offset: head,
        slot_count: log::SLOT_COUNT as u32,
        created_time: Some(timestamp(info.created_unix_nanos)),
        generation: info.generation,
    }
}

/// A retention policy from its protobuf form (unset keeps everything).
fn retention_from_proto(policy: Option<pb::RetentionPolicy>) -> Result<log::Retention, Status> {
    let Some(policy) = policy else {
        return Ok(log::Retention::default());
    };
    let max_age_nanos = match policy.max_age {
        None => 0,
        Some(age) => Duration::try_from(age)
            .map_err(|_| {
                invalid("retention max_age must be a positive duration (or unset for no age limit)")
            })?
            .as_nanos()
            .try_into()
            .unwrap_or(u64::MAX),
    };
    Ok(log::Retention {
        max_age_nanos,
        max_events: policy.max_events,
        max_bytes: policy.max_bytes,
    })
}

/// The protobuf form of a retention policy (unset when it keeps everything).
fn retention_to_proto(retention: log::Retention) -> Option<pb::RetentionPolicy> {
    (!retention.keeps_everything()).then(|| pb::RetentionPolicy {
        max_age: (retention.max_age_nanos > 0)
            .then(|| {
                Duration::from_nanos(retention.max_age_nanos)
                    .try_into()
                    .ok()
            })
            .flatten(),
        max_events: retention.max_events,
        max_bytes: retention.max_bytes,
    })
}

fn page_size(requested: u32, field: &str) -> Result<usize, Status> {
    match requested {
        0 => Ok(DEFAULT_PAGE as usize),
        n if n <= MAX_PAGE => Ok(n as usize),
        n => Err(invalid(format!(
            "{field} {n} is too large: the most is {MAX_PAGE}"
        ))),
    }
}

fn record_from_proto(event: pb::NewEvent) -> EventRecord {
    // Sorted, so equal maps give equal records (and idempotency fingerprints).
    let mut metadata: Vec<(Bytes, Bytes)> = event
        .metadata
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    metadata.sort_unstable();
    let mut renderings: Vec<Rendering> = event
        .versions
        .into_iter()
        .map(|(label, v)| Rendering {
            label: label.into(),
            content_type: v.content_type.into(),
            data: v.data.into(),
        })
        .collect();
    renderings.sort_unstable();
    EventRecord {
        event_type: event.r#type.into(),
        key: event.key.into(),
        content_type: event.content_type.into(),
        data: event.data.into(),
        metadata,
        renderings,
    }
}

/// Encodes events as `events` entries (field 1) of a response, straight
/// from stored records: no `Event` struct, no per-event strings. With a
/// `version` pin, each event carries its rendering for that version.
fn encode_events(stream: &str, slices: &[EventSlice], version: &[u8]) -> Bytes {
    let mut buf = BytesMut::new();
    for slice in slices {
        let time = timestamp(slice.chunk.time_unix_nanos);
        for (offset, record) in slice.events() {
            let (data, content_type, label): (&[u8], &[u8], &[u8]) =
                match record.rendering_for(version) {
                    Some(r) if !r.content_type.is_empty() => (&r.data, &r.content_type, &r.label),
                    Some(r) => (&r.data, &record.content_type, &r.label),
                    None => (&record.data, &record.content_type, b""),
                };
            let metadata_len: usize = record
                .metadata
                .iter()
                .map(|(k, v)| {
                    let entry = str_len(1, k) + str_len(2, v);
                    key_len(7) + encoded_len_varint(entry as u64) + entry
                })
                .sum();
            let body = str_len(1, stream)
                + if offset != 0 {
                    uint64::encoded_len(2, &offset)
                } else {
                    0
                }
                + str_len(3, &record.event_type)
                + str_len(4, &record.key)
                + str_len(5, data)
                + str_len(6, content_type)
                + metadata_len
                + message::encoded_len(8, &time)
                + str_len(9, label);
            buf.reserve(key_len(1) + encoded_len_varint(body as u64) + body);
            encode_key(1, WireType::LengthDelimited, &mut buf);
            encode_varint(body as u64, &mut buf);
            put_str(1, stream, &mut buf);
            if offset != 0 {
                uint64::encode(2, &offset, &mut buf);
            }
            put_str(3, &record.event_type, &mut buf);
            put_str(4, &record.key, &mut buf);
            put_str(5, data, &mut buf);
            put_str(6, content_type, &mut buf);
            for (k, v) in &record.metadata {
                encode_key(7, WireType::LengthDelimited, &mut buf);
                encode_varint((str_len(1, k) + str_len(2, v)) as u64, &mut buf);
                put_str(1, k, &mut buf);
                put_str(2, v, &mut buf);
            }
            message::encode(8, &time, &mut buf);
            put_str(9, label, &mut buf);
        }
    }
    buf.freeze()
}

/// The size of a length-delimited field (omitted when empty, as proto3 does).
fn str_len(tag: u32, value: impl AsRef<[u8]>) -> usize {
    let len = value.as_ref().len();
    if len == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }
}

fn put_str(tag: u32, value: impl AsRef<[u8]>, buf: &mut BytesMut) {
    let value = value.as_ref();
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.put_slice(value);
    }
}

/// A stream description, under the caller's name for the stream.
fn stream_info_to_proto(info: log::StreamInfo, name: String) -> pb::StreamInfo {
    pb::StreamInfo {
        event_count: info.next_offset - info.first_offset,
        name,
        first_offset: info.first_offset,
        next_offset: info.next_offset,
        approximate_bytes: info.approximate_bytes,
        created_time: Some(timestamp(info.created_unix_nanos)),
        retention: retention_to_proto(info.retention),
    }
}

/// A protobuf timestamp from nanoseconds since the Unix epoch.
pub fn timestamp(unix_nanos: i64) -> Timestamp {
    Timestamp {
        seconds: unix_nanos.div_euclid(1_000_000_000),
        nanos: unix_nanos.rem_euclid(1_000_000_000) as i32,
    }
}
