//! The gRPC front end: the `EventLog` and `ApiKeys` services, and the one
//! table that maps an [`Error`] to a status, gRPC's and HTTP's.
//!
//! Every `EventLog` operation lives once in `calls` (from an authenticated
//! caller and a request message to a response or an [`Error`]); the gRPC
//! handlers here and the HTTP JSON API (`crate::http`) are shells over it.
//! Beside them: `convert` (proto messages to and from the log's types),
//! `subscription` (the per-Subscribe task), `pipeline` (the per-pipeline
//! task) and `keys` (the `ApiKeys` service).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status};

use crate::auth::{KeyRing, Principal, Scope};
use crate::engine::StorageError;
use crate::error::Error;
use crate::proto as pb;
use crate::proto::event_log_server::EventLog;

mod calls;
mod convert;
mod keys;
mod pipeline;
mod subscription;
pub use calls::{Calls, SubscriptionResponses};
pub use convert::timestamp;
pub use keys::ApiKeysService;
/// Proto conversions for API keys (shared with the CLI).
pub mod keys_proto {
    pub use super::keys::{key_to_proto, scope_of_proto, scope_to_proto};
}

/// Default and largest page for Read, and default batch for Subscribe.
const DEFAULT_PAGE: u32 = 100;
/// The largest page for Read and batch for Subscribe.
pub const MAX_PAGE: u32 = 1000;
/// The longest status message sent, in bytes.
const MAX_STATUS_MESSAGE_BYTES: usize = 2048;

/// A Read page never passes this many bytes, except that one event always
/// fits: under the 4 MiB every standard gRPC client accepts by default,
/// with room for the response's own fields.
pub const MAX_RESPONSE_BYTES: usize = (4 << 20) - (16 << 10);
/// A subscription's responses stop growing past this many bytes (at least
/// one event each): smaller than a Read page, since they queue.
const SUBSCRIBE_RESPONSE_BYTES: usize = 256 << 10;
/// Responses a subscription may have queued for a slow client before its
/// task waits: with HTTP/2 flow control this bounds a stalled subscriber's
/// memory to 4 x 256 KiB = 1 MiB (more only for single events larger than
/// that). One more slot is kept for the final status.
const SUBSCRIPTION_BUFFER: usize = 4 + 1;

/// The gRPC status code of each error: the one mapping (HTTP derives its
/// status from it in [`http_status`]).
pub fn error_code(error: &Error) -> Code {
    match error {
        Error::InvalidStreamName { .. } | Error::InvalidArgument(_) | Error::TooLarge(_) => {
            Code::InvalidArgument
        }
        Error::StreamNotFound(_)
        | Error::ConsumerNotFound { .. }
        | Error::GroupNotFound { .. }
        | Error::MemberNotFound { .. }
        | Error::KeyNotFound(_) => Code::NotFound,
        Error::ConsumerSessionEnded { .. } | Error::PipelineStopped | Error::Contended { .. } => {
            Code::Aborted
        }
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::PermissionDenied(_) => Code::PermissionDenied,
        Error::ResourceExhausted(_) | Error::DiskFull { .. } | Error::NoSpaceLeft { .. } => {
            Code::ResourceExhausted
        }
        Error::RequestTimeout(_) => Code::DeadlineExceeded,
        Error::InBatch { source, .. } => error_code(source),
        Error::StreamExists(_) | Error::IdempotencyConflict { .. } => Code::AlreadyExists,
        Error::OffsetPastHead { .. } | Error::OffsetTrimmed { .. } => Code::OutOfRange,
        Error::WrongExpectedOffset { .. } | Error::Fenced { .. } | Error::GroupActive { .. } => {
            Code::FailedPrecondition
        }
        Error::DataLoss { .. } => Code::DataLoss,
        Error::ShuttingDown | Error::StorageFailed(_) | Error::Storage(StorageError::Wal(_)) => {
            Code::Unavailable
        }
        Error::Storage(_) | Error::VerifyFailed(_) => Code::Internal,
    }
}

/// The HTTP status and the code name (`NOT_FOUND`, as gRPC spells it) of
/// each error, derived from [`error_code`]. HTTP says two things gRPC
/// folds together: an offset no longer retained is 410 Gone (as the
/// Durable Streams protocol has it; past the head is 400), and a full disk
/// is 507 Insufficient Storage, and a request too large is 413.
pub fn http_status(error: &Error) -> (http::StatusCode, &'static str) {
    use http::StatusCode as H;
    let source = match error {
        Error::InBatch { source, .. } => source,
        other => other,
    };
    match source {
        Error::OffsetTrimmed { .. } => return (H::GONE, "OUT_OF_RANGE"),
        Error::DiskFull { .. } | Error::NoSpaceLeft { .. } => {
            return (H::INSUFFICIENT_STORAGE, "RESOURCE_EXHAUSTED")
        }
        Error::TooLarge(_) => return (H::PAYLOAD_TOO_LARGE, "INVALID_ARGUMENT"),
        _ => {}
    }
    let code = error_code(error);
    let status = match code {
        Code::Ok => H::OK,
        Code::Cancelled => H::from_u16(499).expect("valid"),
        Code::InvalidArgument | Code::OutOfRange => H::BAD_REQUEST,
        Code::DeadlineExceeded => H::REQUEST_TIMEOUT,
        Code::NotFound => H::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => H::CONFLICT,
        Code::PermissionDenied => H::FORBIDDEN,
        Code::ResourceExhausted => H::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => H::PRECONDITION_FAILED,
        Code::Unimplemented => H::NOT_IMPLEMENTED,
        Code::Unavailable => H::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => H::UNAUTHORIZED,
        Code::Unknown | Code::Internal | Code::DataLoss => H::INTERNAL_SERVER_ERROR,
    };
    (status, crate::proto::code_name(code))
}

/// An error's message, bounded: echoed input is cut where the message is
/// built (`error::shown`); this bounds whatever else a message holds, so
/// no status header grows past what clients accept.
pub fn error_message(error: &Error) -> String {
    let mut message = error.to_string();
    if message.len() > MAX_STATUS_MESSAGE_BYTES {
        let mut cut = MAX_STATUS_MESSAGE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        Status::new(error_code(&error), error_message(&error))
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

/// The `EventLog` gRPC service: a shell over [`Calls`].
pub struct EventLogService {
    calls: Arc<Calls>,
}

impl EventLogService {
    /// The gRPC service over `calls` (shared with the HTTP API).
    pub fn new(calls: Arc<Calls>) -> EventLogService {
        EventLogService { calls }
    }
}

impl Calls {
    /// Who is calling: the principal admission (`server/admission.rs`)
    /// authenticated from the call's headers before its body was read, or,
    /// for a service used without it, from the `authorization` metadata.
    fn principal<T>(&self, request: &Request<T>) -> Result<Principal, Error> {
        match request.extensions().get::<Principal>() {
            Some(principal) => Ok(principal.clone()),
            None => self.keys.authenticate(
                request
                    .metadata()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap_or("(not text)")),
            ),
        }
    }
}

/// Authenticates a request and checks its key has one of `scopes` (the
/// `ApiKeys` service's calls).
pub fn caller<T>(
    keys: &KeyRing,
    request: &Request<T>,
    scopes: &[Scope],
) -> Result<Principal, Status> {
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
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls.append(caller, request.into_inner()).await?,
        ))
    }

    async fn set_fence(
        &self,
        request: Request<pb::SetFenceRequest>,
    ) -> Result<Response<pb::SetFenceResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls.set_fence(caller, request.into_inner()).await?,
        ))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls.read(caller, request.into_inner()).await?,
        ))
    }

    async fn create_stream(
        &self,
        request: Request<pb::CreateStreamRequest>,
    ) -> Result<Response<pb::CreateStreamResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls
                .create_stream(caller, request.into_inner())
                .await?,
        ))
    }

    async fn get_stream(
        &self,
        request: Request<pb::GetStreamRequest>,
    ) -> Result<Response<pb::GetStreamResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls.get_stream(caller, request.into_inner()).await?,
        ))
    }

    async fn list_streams(
        &self,
        request: Request<pb::ListStreamsRequest>,
    ) -> Result<Response<pb::ListStreamsResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls
                .list_streams(caller, request.into_inner())
                .await?,
        ))
    }

    async fn delete_stream(
        &self,
        request: Request<pb::DeleteStreamRequest>,
    ) -> Result<Response<pb::DeleteStreamResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls
                .delete_stream(caller, request.into_inner())
                .await?,
        ))
    }

    async fn commit_cursor(
        &self,
        request: Request<pb::CommitCursorRequest>,
    ) -> Result<Response<pb::CommitCursorResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls
                .commit_cursor(caller, request.into_inner())
                .await?,
        ))
    }

    async fn get_consumer(
        &self,
        request: Request<pb::GetConsumerRequest>,
    ) -> Result<Response<pb::GetConsumerResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls
                .get_consumer(caller, request.into_inner())
                .await?,
        ))
    }

    async fn list_consumers(
        &self,
        request: Request<pb::ListConsumersRequest>,
    ) -> Result<Response<pb::ListConsumersResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls
                .list_consumers(caller, request.into_inner())
                .await?,
        ))
    }

    async fn update_stream(
        &self,
        request: Request<pb::UpdateStreamRequest>,
    ) -> Result<Response<pb::UpdateStreamResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls
                .update_stream(caller, request.into_inner())
                .await?,
        ))
    }

    async fn get_server_status(
        &self,
        request: Request<pb::GetServerStatusRequest>,
    ) -> Result<Response<pb::GetServerStatusResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls
                .get_server_status(caller, request.into_inner())
                .await?,
        ))
    }

    async fn commit_group(
        &self,
        request: Request<pb::CommitGroupRequest>,
    ) -> Result<Response<pb::CommitGroupResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls
                .commit_group(caller, request.into_inner())
                .await?,
        ))
    }

    async fn get_group(
        &self,
        request: Request<pb::GetGroupRequest>,
    ) -> Result<Response<pb::GetGroupResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls.get_group(caller, request.into_inner()).await?,
        ))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls
                .delete_group(caller, request.into_inner())
                .await?,
        ))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls.list_groups(caller, request.into_inner()).await?,
        ))
    }

    async fn reset_group(
        &self,
        request: Request<pb::ResetGroupRequest>,
    ) -> Result<Response<pb::ResetGroupResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls.reset_group(caller, request.into_inner()).await?,
        ))
    }

    async fn delete_consumer(
        &self,
        request: Request<pb::DeleteConsumerRequest>,
    ) -> Result<Response<pb::DeleteConsumerResponse>, Status> {
        let caller = self.calls.principal(&request)?;
        Ok(Response::new(
            self.calls
                .delete_consumer(caller, request.into_inner())
                .await?,
        ))
    }

    type AppendPipelineStream = PipelineStream;

    async fn append_pipeline(
        &self,
        request: Request<tonic::Streaming<pb::AppendPipelineRequest>>,
    ) -> Result<Response<PipelineStream>, Status> {
        let caller = self.calls.principal(&request)?;
        let caller = self.calls.authorize(caller, &[Scope::Publish])?;
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
            0 => self.calls.config.max_pipeline_batches,
            n => n.min(self.calls.config.max_pipeline_batches),
        };
        let max_bytes = match open.max_in_flight_bytes {
            0 => self.calls.config.max_pipeline_bytes,
            n => n.min(self.calls.config.max_pipeline_bytes),
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
        self.calls.subscriptions.spawn(pipeline::run_pipeline(
            pipeline::Pipeline {
                log: self.calls.log.clone(),
                keys: self.calls.keys.clone(),
                caller,
                stream,
                max_batches: max_batches as usize,
                max_bytes,
                fencing_token: open.fencing_token,
                budget: self.calls.config.request_budget.clone(),
            },
            inbound,
            tx,
            self.calls.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<SubscribeStream>, Status> {
        let caller = self.calls.principal(&request)?;
        let responses = self.calls.subscribe(caller, request.into_inner()).await?;
        Ok(Response::new(Box::pin(
            ReceiverStream::new(responses).map(|r| r.map_err(Status::from)),
        )))
    }
}
