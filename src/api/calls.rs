//! The calls behind both front ends: each EventLog operation once, from
//! an authenticated caller and a request message to a response message or
//! an [`Error`].
//!
//! The gRPC service (`super::EventLogService`) and the HTTP JSON API
//! (`crate::http`) are thin shells over these: they authenticate from
//! their own headers, translate their own wire form, and map the error
//! through the one table in `super::status`. So every rule (scopes,
//! tenants, validation, limits, start positions, subscription slots) is
//! written once, here or below.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::convert::{
    consumer_info_to_proto, filter_from_proto, group_info_to_proto, page_size, record_from_proto,
    retention_from_proto, stream_info_to_proto, timestamp, unix_nanos, version_from_proto,
};
use super::subscription::{run_subscription, Delivery};
use super::{ServiceConfig, DEFAULT_PAGE, MAX_PAGE, MAX_RESPONSE_BYTES, SUBSCRIPTION_BUFFER};
use crate::auth::{KeyRing, Principal, Scope};
use crate::error::Error;
use crate::log::{AppendBatch, ConsumerSettings, Log, StartAt};
use crate::metrics::ActiveSubscription;
use crate::proto::encode::encode_events;
use crate::proto::{self as pb, subscribe_request};

/// Any scope: describing streams needs only a valid key.
const ANY_SCOPE: &[Scope] = &[Scope::Publish, Scope::Subscribe, Scope::Admin];

/// The responses of one subscription, ended by the error that stopped it.
pub type SubscriptionResponses = mpsc::Receiver<Result<pb::SubscribeResponse, Error>>;

/// INVALID_ARGUMENT for a request rejected before it reaches the log.
fn bad(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// The operations, over one log and key ring; see the module docs.
pub struct Calls {
    pub(super) log: Arc<Log>,
    pub(super) keys: Arc<KeyRing>,
    pub(super) config: ServiceConfig,
    /// Cancelled when the server shuts down: subscriptions end with UNAVAILABLE.
    pub(super) shutdown: CancellationToken,
    /// Subscription and pipeline tasks, so shutdown can wait for them to end.
    pub(super) subscriptions: TaskTracker,
}

impl Calls {
    /// The calls over `log`.
    pub fn new(
        log: Arc<Log>,
        keys: Arc<KeyRing>,
        config: ServiceConfig,
        shutdown: CancellationToken,
        subscriptions: TaskTracker,
    ) -> Calls {
        Calls {
            log,
            keys,
            config,
            shutdown,
            subscriptions,
        }
    }

    /// The key ring callers authenticate against.
    pub fn keys(&self) -> &Arc<KeyRing> {
        &self.keys
    }

    /// The log the calls operate on.
    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    /// The service settings (heartbeat interval, pipeline limits, the
    /// request budget).
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// Resolves when the server starts shutting down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    // Each call below answers errors in the caller's own stream names
    // (`orders`, not the stored `acme/orders`): the public method wraps
    // the `_inner` one that does the work.

    /// Checks the caller's key has one of `scopes` and is within its rate.
    pub(super) fn authorize(
        &self,
        caller: Principal,
        scopes: &[Scope],
    ) -> Result<Principal, Error> {
        caller.require(scopes)?;
        self.keys.admit(&caller)?;
        Ok(caller)
    }

    /// Appends a batch (Append).
    pub async fn append(
        &self,
        caller: Principal,
        request: pb::AppendRequest,
    ) -> Result<pb::AppendResponse, Error> {
        let view = caller.clone();
        self.append_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn append_inner(
        &self,
        caller: Principal,
        request: pb::AppendRequest,
    ) -> Result<pb::AppendResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Publish])?;
        let stream = caller.stream(&request.stream)?;
        let batch = AppendBatch {
            events: request.events.into_iter().map(record_from_proto).collect(),
            expected_next_offset: request.expected_next_offset,
            idempotency_key: request.idempotency_key,
            fencing_token: request.fencing_token,
        };
        let outcome = self.log.append(&stream, batch).await?;
        Ok(pb::AppendResponse {
            stream: request.stream,
            first_offset: outcome.first_offset,
            count: outcome.count,
            time: Some(timestamp(outcome.time_unix_nanos)),
            duplicate: outcome.duplicate,
        })
    }

    /// Sets or clears a stream's fencing token (SetFence).
    pub async fn set_fence(
        &self,
        caller: Principal,
        request: pb::SetFenceRequest,
    ) -> Result<pb::SetFenceResponse, Error> {
        let view = caller.clone();
        self.set_fence_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn set_fence_inner(
        &self,
        caller: Principal,
        request: pb::SetFenceRequest,
    ) -> Result<pb::SetFenceResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Publish])?;
        let stream = caller.stream(&request.stream)?;
        self.log
            .set_fence(&stream, request.token.clone(), request.expected_token)
            .await?;
        Ok(pb::SetFenceResponse {
            stream: request.stream,
            token: request.token,
        })
    }

    /// Reads one page of events (Read).
    pub async fn read(
        &self,
        caller: Principal,
        request: pb::ReadRequest,
    ) -> Result<pb::ReadResponse, Error> {
        let view = caller.clone();
        self.read_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn read_inner(
        &self,
        caller: Principal,
        request: pb::ReadRequest,
    ) -> Result<pb::ReadResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Subscribe])?;
        let stream = caller.stream(&request.stream)?;
        let limit = page_size(request.limit, "limit")?;
        let filter = filter_from_proto(request.filter)?.unwrap_or_default();
        let version = version_from_proto(request.version)?.unwrap_or_default();
        let page = self
            .log
            .read(&stream, request.offset, limit, MAX_RESPONSE_BYTES, &filter)?;
        Ok(pb::ReadResponse {
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
        })
    }

    /// Opens a subscription (Subscribe): its task sends responses into the returned channel and ends it with the error that stopped it.
    pub async fn subscribe(
        &self,
        caller: Principal,
        request: pb::SubscribeRequest,
    ) -> Result<SubscriptionResponses, Error> {
        let view = caller.clone();
        self.subscribe_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn subscribe_inner(
        &self,
        caller: Principal,
        request: pb::SubscribeRequest,
    ) -> Result<SubscriptionResponses, Error> {
        let caller = self.authorize(caller, &[Scope::Subscribe])?;
        let slot = self.keys.subscription_slot(&caller)?;
        let stream = caller.stream(&request.stream)?;
        let start = match request.start {
            None => StartAt::Earliest,
            Some(subscribe_request::Start::Offset(offset)) => StartAt::Offset(offset),
            Some(subscribe_request::Start::Position(p)) => start_position(p)?,
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
                return Err(bad("give either consumer or group (with member), not both"));
            }
            if request.member.is_empty() {
                return Err(bad(
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
            return Err(bad("member is only meaningful with group"));
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
        Ok(rx)
    }

    /// Creates a stream (CreateStream).
    pub async fn create_stream(
        &self,
        caller: Principal,
        request: pb::CreateStreamRequest,
    ) -> Result<pb::CreateStreamResponse, Error> {
        let view = caller.clone();
        self.create_stream_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn create_stream_inner(
        &self,
        caller: Principal,
        request: pb::CreateStreamRequest,
    ) -> Result<pb::CreateStreamResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Publish, Scope::Admin])?;
        let retention = retention_from_proto(request.retention)?;
        let name = request.stream;
        let info = self
            .log
            .create_stream(&caller.stream(&name)?, retention)
            .await?;
        Ok(pb::CreateStreamResponse {
            stream: Some(stream_info_to_proto(info, name)),
        })
    }

    /// Describes a stream (GetStream).
    pub async fn get_stream(
        &self,
        caller: Principal,
        request: pb::GetStreamRequest,
    ) -> Result<pb::GetStreamResponse, Error> {
        let view = caller.clone();
        self.get_stream_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn get_stream_inner(
        &self,
        caller: Principal,
        request: pb::GetStreamRequest,
    ) -> Result<pb::GetStreamResponse, Error> {
        let caller = self.authorize(caller, ANY_SCOPE)?;
        let name = request.stream;
        let info = self.log.stream_info(&caller.stream(&name)?)?;
        Ok(pb::GetStreamResponse {
            stream: Some(stream_info_to_proto(info, name)),
        })
    }

    /// Lists the caller's streams a page at a time (ListStreams).
    pub async fn list_streams(
        &self,
        caller: Principal,
        request: pb::ListStreamsRequest,
    ) -> Result<pb::ListStreamsResponse, Error> {
        let view = caller.clone();
        self.list_streams_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn list_streams_inner(
        &self,
        caller: Principal,
        request: pb::ListStreamsRequest,
    ) -> Result<pb::ListStreamsResponse, Error> {
        let caller = self.authorize(caller, ANY_SCOPE)?;
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
        Ok(pb::ListStreamsResponse {
            streams,
            next_page_token,
        })
    }

    /// Deletes a stream and everything in it (DeleteStream).
    pub async fn delete_stream(
        &self,
        caller: Principal,
        request: pb::DeleteStreamRequest,
    ) -> Result<pb::DeleteStreamResponse, Error> {
        let view = caller.clone();
        self.delete_stream_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn delete_stream_inner(
        &self,
        caller: Principal,
        request: pb::DeleteStreamRequest,
    ) -> Result<pb::DeleteStreamResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Admin])?;
        let name = request.stream;
        self.log.delete_stream(&caller.stream(&name)?).await?;
        Ok(pb::DeleteStreamResponse {})
    }

    /// Saves a durable consumer's cursor (CommitCursor).
    pub async fn commit_cursor(
        &self,
        caller: Principal,
        request: pb::CommitCursorRequest,
    ) -> Result<pb::CommitCursorResponse, Error> {
        let view = caller.clone();
        self.commit_cursor_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn commit_cursor_inner(
        &self,
        caller: Principal,
        request: pb::CommitCursorRequest,
    ) -> Result<pb::CommitCursorResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Subscribe])?;
        let to = match &request.time {
            Some(t) => StartAt::Time(unix_nanos(t)?),
            None => StartAt::Offset(request.next_offset),
        };
        let clear = crate::log::ClearSettings {
            filter: request.clear_filter,
            version: request.clear_version,
        };
        let info = self
            .log
            .commit_cursor(
                &caller.stream(&request.stream)?,
                &request.consumer,
                to,
                clear,
            )
            .await?;
        Ok(pb::CommitCursorResponse {
            consumer: Some(consumer_info_to_proto(info, request.stream)),
        })
    }

    /// Describes a durable consumer (GetConsumer).
    pub async fn get_consumer(
        &self,
        caller: Principal,
        request: pb::GetConsumerRequest,
    ) -> Result<pb::GetConsumerResponse, Error> {
        let view = caller.clone();
        self.get_consumer_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn get_consumer_inner(
        &self,
        caller: Principal,
        request: pb::GetConsumerRequest,
    ) -> Result<pb::GetConsumerResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Subscribe])?;
        let info = self
            .log
            .consumer_info(&caller.stream(&request.stream)?, &request.consumer)?;
        Ok(pb::GetConsumerResponse {
            consumer: Some(consumer_info_to_proto(info, request.stream)),
        })
    }

    /// Lists a stream's durable consumers (ListConsumers).
    pub async fn list_consumers(
        &self,
        caller: Principal,
        request: pb::ListConsumersRequest,
    ) -> Result<pb::ListConsumersResponse, Error> {
        let view = caller.clone();
        self.list_consumers_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn list_consumers_inner(
        &self,
        caller: Principal,
        request: pb::ListConsumersRequest,
    ) -> Result<pb::ListConsumersResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Subscribe])?;
        let limit = page_size(request.page_size, "page_size")?;
        let name = request.stream;
        let mut consumers =
            self.log
                .list_consumers(&caller.stream(&name)?, &request.page_token, limit + 1)?;
        let more = consumers.len() > limit;
        consumers.truncate(limit);
        let next_page_token = match consumers.last() {
            Some(last) if more => last.name.clone(),
            _ => String::new(),
        };
        Ok(pb::ListConsumersResponse {
            consumers: consumers
                .into_iter()
                .map(|c| consumer_info_to_proto(c, name.clone()))
                .collect(),
            next_page_token,
        })
    }

    /// Changes a stream's retention (UpdateStream).
    pub async fn update_stream(
        &self,
        caller: Principal,
        request: pb::UpdateStreamRequest,
    ) -> Result<pb::UpdateStreamResponse, Error> {
        let view = caller.clone();
        self.update_stream_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn update_stream_inner(
        &self,
        caller: Principal,
        request: pb::UpdateStreamRequest,
    ) -> Result<pb::UpdateStreamResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Admin])?;
        let retention = retention_from_proto(request.retention)?;
        let info = self
            .log
            .update_stream(&caller.stream(&request.stream)?, retention)
            .await?;
        Ok(pb::UpdateStreamResponse {
            stream: Some(stream_info_to_proto(info, request.stream)),
        })
    }

    /// Describes the server and the caller's streams (GetServerStatus).
    pub async fn get_server_status(
        &self,
        caller: Principal,
        request: pb::GetServerStatusRequest,
    ) -> Result<pb::GetServerStatusResponse, Error> {
        let view = caller.clone();
        self.get_server_status_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn get_server_status_inner(
        &self,
        caller: Principal,
        _request: pb::GetServerStatusRequest,
    ) -> Result<pb::GetServerStatusResponse, Error> {
        let caller = self.authorize(caller, ANY_SCOPE)?;
        let (started, uptime) = self.log.opened();
        let visible = |stored: &str| caller.own_name(stored).is_some_and(|n| caller.may_use(n));
        let start = crate::auth::stored_stream_name(&caller.tenant, "");
        let mut streams = Vec::new();
        // A stream deleted between listing and describing is left out.
        for info in self.log.list_streams(&start, usize::MAX, &visible) {
            let (Ok(rate), Ok(consumers), Ok(damaged)) = (
                self.log.append_rate(&info.name),
                self.log.list_consumers(&info.name, "", usize::MAX),
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
        Ok(pb::GetServerStatusResponse {
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            start_time: Some(timestamp(started)),
            uptime: prost_types::Duration::try_from(uptime).ok(),
            streams,
            write_refusal: self.log.write_refusal().reason.unwrap_or_default(),
            scopes: caller
                .scopes()
                .iter()
                .map(|&s| super::keys::scope_to_proto(s) as i32)
                .collect(),
            api_key_id: caller.key_id.clone().unwrap_or_default(),
            tenant: caller.tenant.clone(),
            limits: Some(self.limits()),
        })
    }

    /// The server's limits, as GetServerStatus reports them.
    fn limits(&self) -> pb::ServerLimits {
        let log = self.log.config();
        pb::ServerLimits {
            max_event_bytes: log.max_event_bytes as u64,
            max_batch_events: log.max_batch_events as u32,
            max_batch_bytes: log.max_batch_bytes as u64,
            heartbeat_interval: prost_types::Duration::try_from(self.config.heartbeat_interval)
                .ok(),
            idempotency_window: prost_types::Duration::try_from(log.idempotency_window).ok(),
            max_pipeline_batches: self.config.max_pipeline_batches,
            max_pipeline_bytes: self.config.max_pipeline_bytes,
        }
    }

    /// Saves a group member's progress (CommitGroup).
    pub async fn commit_group(
        &self,
        caller: Principal,
        request: pb::CommitGroupRequest,
    ) -> Result<pb::CommitGroupResponse, Error> {
        let view = caller.clone();
        self.commit_group_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn commit_group_inner(
        &self,
        caller: Principal,
        request: pb::CommitGroupRequest,
    ) -> Result<pb::CommitGroupResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Subscribe])?;
        let info = self
            .log
            .commit_group(
                &caller.stream(&request.stream)?,
                &request.group,
                &request.member,
                request.next_offset,
            )
            .await?;
        Ok(pb::CommitGroupResponse {
            group: Some(group_info_to_proto(info, request.stream)),
        })
    }

    /// Describes a consumer group (GetGroup).
    pub async fn get_group(
        &self,
        caller: Principal,
        request: pb::GetGroupRequest,
    ) -> Result<pb::GetGroupResponse, Error> {
        let view = caller.clone();
        self.get_group_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn get_group_inner(
        &self,
        caller: Principal,
        request: pb::GetGroupRequest,
    ) -> Result<pb::GetGroupResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Subscribe])?;
        let info = self
            .log
            .group_info(&caller.stream(&request.stream)?, &request.group)?;
        Ok(pb::GetGroupResponse {
            group: Some(group_info_to_proto(info, request.stream)),
        })
    }

    /// Lists a stream's consumer groups (ListGroups).
    pub async fn list_groups(
        &self,
        caller: Principal,
        request: pb::ListGroupsRequest,
    ) -> Result<pb::ListGroupsResponse, Error> {
        let view = caller.clone();
        self.list_groups_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn list_groups_inner(
        &self,
        caller: Principal,
        request: pb::ListGroupsRequest,
    ) -> Result<pb::ListGroupsResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Subscribe])?;
        let limit = page_size(request.page_size, "page_size")?;
        let mut groups = self.log.list_groups(
            &caller.stream(&request.stream)?,
            &request.page_token,
            limit + 1,
        )?;
        let more = groups.len() > limit;
        groups.truncate(limit);
        let next_page_token = match groups.last() {
            Some(last) if more => last.name.clone(),
            _ => String::new(),
        };
        Ok(pb::ListGroupsResponse {
            groups: groups
                .into_iter()
                .map(|g| group_info_to_proto(g, request.stream.clone()))
                .collect(),
            next_page_token,
        })
    }

    /// Moves every slot of an idle group (ResetGroup).
    pub async fn reset_group(
        &self,
        caller: Principal,
        request: pb::ResetGroupRequest,
    ) -> Result<pb::ResetGroupResponse, Error> {
        let view = caller.clone();
        self.reset_group_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn reset_group_inner(
        &self,
        caller: Principal,
        request: pb::ResetGroupRequest,
    ) -> Result<pb::ResetGroupResponse, Error> {
        use pb::reset_group_request::To;
        let caller = self.authorize(caller, &[Scope::Subscribe])?;
        let to = match request.to {
            None => {
                return Err(bad(
                    "give where to reset the group to: an offset, a time or a position",
                ))
            }
            Some(To::Offset(offset)) => StartAt::Offset(offset),
            Some(To::Time(t)) => StartAt::Time(unix_nanos(&t)?),
            Some(To::Position(p)) => start_position(p)?,
        };
        let info = self
            .log
            .reset_group(&caller.stream(&request.stream)?, &request.group, to)
            .await?;
        Ok(pb::ResetGroupResponse {
            group: Some(group_info_to_proto(info, request.stream)),
        })
    }

    /// Deletes a consumer group (DeleteGroup).
    pub async fn delete_group(
        &self,
        caller: Principal,
        request: pb::DeleteGroupRequest,
    ) -> Result<pb::DeleteGroupResponse, Error> {
        let view = caller.clone();
        self.delete_group_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn delete_group_inner(
        &self,
        caller: Principal,
        request: pb::DeleteGroupRequest,
    ) -> Result<pb::DeleteGroupResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Admin])?;
        self.log
            .delete_group(&caller.stream(&request.stream)?, &request.group)
            .await?;
        Ok(pb::DeleteGroupResponse {})
    }

    /// Deletes a durable consumer (DeleteConsumer).
    pub async fn delete_consumer(
        &self,
        caller: Principal,
        request: pb::DeleteConsumerRequest,
    ) -> Result<pb::DeleteConsumerResponse, Error> {
        let view = caller.clone();
        self.delete_consumer_inner(caller, request)
            .await
            .map_err(|e| view.own_error(e))
    }

    async fn delete_consumer_inner(
        &self,
        caller: Principal,
        request: pb::DeleteConsumerRequest,
    ) -> Result<pb::DeleteConsumerResponse, Error> {
        let caller = self.authorize(caller, &[Scope::Admin])?;
        self.log
            .delete_consumer(&caller.stream(&request.stream)?, &request.consumer)
            .await?;
        Ok(pb::DeleteConsumerResponse {})
    }
}

/// A StartPosition enum value as a start.
fn start_position(p: i32) -> Result<StartAt, Error> {
    match pb::StartPosition::try_from(p) {
        Ok(pb::StartPosition::Unspecified | pb::StartPosition::Earliest) => Ok(StartAt::Earliest),
        Ok(pb::StartPosition::Latest) => Ok(StartAt::Latest),
        Err(_) => Err(bad(format!(
            "unknown start position {p}: use EARLIEST, LATEST, an offset or a time"
        ))),
    }
}
