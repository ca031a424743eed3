//! The gRPC `EventLog` service: turns requests into log calls and log
//! results into responses. The one place that maps [`Error`] to a status.
//!
//! Here: the handlers and the status mapping. Beside them: `convert`
//! (proto messages to and from the log's types), `encode` (stored events
//! straight to response bytes), `subscription` (the per-Subscribe task)
//! and `keys` (the `ApiKeys` service).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::auth::{KeyRing, Principal, Scope};
use crate::engine::StorageError;
use crate::error::Error;
use crate::log::{AppendBatch, ConsumerSettings, Log, StartAt};
use crate::metrics::ActiveSubscription;
use crate::proto::event_log_server::EventLog;
use crate::proto::{self as pb, subscribe_request};

mod convert;
mod keys;
mod pipeline;
mod subscription;
use crate::proto::encode::encode_events;
pub use convert::timestamp;
use convert::{
    consumer_info_to_proto, filter_from_proto, group_info_to_proto, page_size, record_from_proto,
    retention_from_proto, stream_info_to_proto, unix_nanos, version_from_proto,
};
pub use keys::ApiKeysService;
use subscription::{run_subscription, Delivery};
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
            Error::InBatch { source, .. } => Status::new(Status::from(*source).code(), message),
            Error::PipelineStopped => Status::aborted(message),
            Error::StreamExists(_) | Error::IdempotencyConflict { .. } => {
                Status::already_exists(message)
            }
            Error::OffsetPastHead { .. } | Error::OffsetTrimmed { .. } => {
                Status::out_of_range(message)
            }
            Error::WrongExpectedOffset { .. } | Error::Fenced { .. } => {
                Status::failed_precondition(message)
            }
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
    /// Most unacknowledged batches per append pipeline.
    pub max_pipeline_batches: u32,
    /// Most unacknowledged bytes of batches per append pipeline.
    pub max_pipeline_bytes: u64,
    /// The server-wide budget of request bytes held at once (shared with
    /// admission): unacknowledged pipelined batches hold their bytes in it.
    pub request_budget: Arc<tokio::sync::Semaphore>,
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

type PipelineStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::AppendPipelineResponse, Status>> + Send>>;

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
            fencing_token: request.fencing_token,
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

    type AppendPipelineStream = PipelineStream;

    async fn append_pipeline(
        &self,
        request: Request<tonic::Streaming<pb::AppendPipelineRequest>>,
    ) -> Result<Response<PipelineStream>, Status> {
        let caller = self.caller(&request, &[Scope::Publish])?;
        let mut inbound = request.into_inner();
        let open = match inbound.message().await? {
            Some(pb::AppendPipelineRequest {
                request: Some(pb::append_pipeline_request::Request::Open(open)),
            }) => open,
            Some(_) => {
                return Err(invalid(
                    "the first message of an append pipeline must be `open` (a PipelineOpen naming the stream)",
                ))
            }
            None => {
                return Err(invalid(
                    "the append pipeline ended before its `open` message",
                ))
            }
        };
        let stream = caller.stream(&open.stream)?;
        let max_batches = match open.max_in_flight_batches {
            0 => self.config.max_pipeline_batches,
            n => n.min(self.config.max_pipeline_batches),
        };
        let max_bytes = match open.max_in_flight_bytes {
            0 => self.config.max_pipeline_bytes,
            n => n.min(self.config.max_pipeline_bytes),
        };
        let (tx, rx) = mpsc::channel(pipeline::PIPELINE_BUFFER);
        let opened = pb::AppendPipelineResponse {
            response: Some(pb::append_pipeline_response::Response::Opened(
                pb::PipelineOpened {
                    stream: open.stream,
                    max_in_flight_batches: max_batches,
                    max_in_flight_bytes: max_bytes,
                },
            )),
        };
        tx.try_send(Ok(opened)).expect("an empty channel has room");
        self.subscriptions.spawn(pipeline::run_pipeline(
            pipeline::Pipeline {
                log: self.log.clone(),
                keys: self.keys.clone(),
                caller,
                stream,
                max_batches: max_batches as usize,
                max_bytes,
                fencing_token: open.fencing_token,
                budget: self.config.request_budget.clone(),
            },
            inbound,
            tx,
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn set_fence(
        &self,
        request: Request<pb::SetFenceRequest>,
    ) -> Result<Response<pb::SetFenceResponse>, Status> {
        let caller = self.caller(&request, &[Scope::Publish])?;
        let request = request.into_inner();
        let stream = caller.stream(&request.stream)?;
        self.log
            .set_fence(&stream, request.token.clone(), request.expected_token)
            .await?;
        Ok(Response::new(pb::SetFenceResponse {
            stream: request.stream,
            token: request.token,
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
            encoded_events: encode_events(
                &request.stream,
                page.slices
                    .iter()
                    .map(|s| (s.chunk.time_unix_nanos, s.events())),
                version.as_bytes(),
            ),
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
