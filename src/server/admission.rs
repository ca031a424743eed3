//! Admission: what a pullstream call must pass before the server holds any
//! of its body.
//!
//! tonic buffers and decodes a whole request message before a handler
//! runs, so a key checked in the handler is checked too late: a client
//! without one could make the server buffer `--max-batch-bytes` per stream,
//! on as many streams as it liked. This tower layer sits in front of the
//! `EventLog` and `ApiKeys` services and, from the request's headers alone:
//!
//! - authenticates the key ([`KeyRing::authenticate`]) and answers
//!   UNAUTHENTICATED at once otherwise, without reading the body; the
//!   [`Principal`] travels to the handler in the request's extensions, so
//!   the key is looked up once per call;
//!
//! then wraps the body so that, as it streams in,
//!
//! - each message's length (from its 5-byte gRPC frame header) is checked
//!   against the limit before any of it is buffered: INVALID_ARGUMENT
//!   naming the limit and the flag that raises it (tonic's own check, kept
//!   as a backstop, would say OUT_OF_RANGE, which clients read as a cursor
//!   bound);
//! - the message's bytes are reserved in a server-wide budget
//!   (`--max-request-bytes-in-flight`), held until the call's response is
//!   ready: RESOURCE_EXHAUSTED when the budget is spent;
//! - the body must be complete within `--request-body-timeout`
//!   (DEADLINE_EXCEEDED), so a slow sender cannot hold its reservation;
//!   an append pipeline's body is long-lived, so there a message under way
//!   must keep arriving (no gap longer than the timeout), while the
//!   pipeline may idle between messages.
//!
//! Health and reflection stay open (load balancers and grpcurl call them
//! without keys); their messages are capped small where they are added.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::body::Body;
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

use crate::auth::KeyRing;
use crate::error::Error;

/// The services whose calls need a key. Key management's messages are
/// small, so its limit is [`Limits::small_message_bytes`].
const EVENT_LOG: &str = "/pullstream.v1.EventLog/";
/// The one call whose body is a long-lived stream of messages.
const APPEND_PIPELINE: &str = "/pullstream.v1.EventLog/AppendPipeline";
const API_KEYS: &str = "/pullstream.v1.ApiKeys/";

/// A gRPC message frame starts with a compression flag and a 4-byte
/// big-endian length.
const FRAME_HEADER_BYTES: usize = 5;

/// What admission enforces; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// The largest `EventLog` request message, frame header excluded.
    pub max_message_bytes: usize,
    /// The flag that raises `max_message_bytes`, for the error message.
    pub max_message_flag: &'static str,
    /// The largest `ApiKeys` request message (a fixed limit).
    pub small_message_bytes: usize,
    /// Bytes of request messages the server holds at once, all calls.
    pub bytes_in_flight: usize,
    /// How long a request's body may take to arrive.
    pub body_timeout: Duration,
}

struct Shared {
    keys: Arc<KeyRing>,
    limits: Limits,
    budget: Arc<Semaphore>,
}

/// The layer; see the module docs.
#[derive(Clone)]
pub(crate) struct AdmissionLayer {
    shared: Arc<Shared>,
}

impl AdmissionLayer {
    /// `budget` holds `limits.bytes_in_flight` permits (shared with the
    /// append pipelines, which hold their unacknowledged batches in it).
    pub(crate) fn new(
        keys: Arc<KeyRing>,
        budget: Arc<Semaphore>,
        limits: Limits,
    ) -> AdmissionLayer {
        AdmissionLayer {
            shared: Arc::new(Shared {
                keys,
                budget,
                limits,
            }),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service the layer wraps around tonic's routes.
#[derive(Clone)]
pub(crate) struct Admission<S> {
    inner: S,
    shared: Arc<Shared>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for Admission<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone that was made ready is the one to call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path();
        let (max_message_bytes, raised_by) = if path.starts_with(EVENT_LOG) {
            let limits = &self.shared.limits;
            (limits.max_message_bytes, Some(limits.max_message_flag))
        } else if path.starts_with(API_KEYS) {
            (self.shared.limits.small_message_bytes, None)
        } else {
            return Box::pin(inner.call(request));
        };
        let authorization = request
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or("(not text)"));
        let principal = match self.shared.keys.authenticate(authorization) {
            Ok(principal) => principal,
            Err(e) => {
                let status = Status::from(e);
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        let streaming = path == APPEND_PIPELINE;
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(principal);
        let held = Arc::new(Mutex::new(None));
        let body = Body::new(Admitted {
            inner: body,
            shared: self.shared.clone(),
            held: held.clone(),
            max_message_bytes,
            raised_by,
            header: [0; FRAME_HEADER_BYTES],
            header_len: 0,
            remaining: 0,
            // A pipeline may idle between messages; each message, once
            // begun, must arrive in time. Any other body must arrive whole.
            deadline: (!streaming)
                .then(|| Box::pin(tokio::time::sleep(self.shared.limits.body_timeout))),
            streaming,
            done: false,
        });
        let call = inner.call(http::Request::from_parts(parts, body));
        Box::pin(async move {
            let response = call.await;
            // The reservation covers the decoded request too, which lives
            // until the handler has answered.
            drop(held);
            response
        })
    }
}

/// A request body checked as it streams in; see the module docs.
struct Admitted {
    inner: Body,
    shared: Arc<Shared>,
    /// The current message's reservation, shared with the call so that it
    /// outlives the body (tonic drops the body once it has decoded).
    held: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    /// This call's largest message, and the flag that raises it, if any.
    max_message_bytes: usize,
    raised_by: Option<&'static str>,
    header: [u8; FRAME_HEADER_BYTES],
    header_len: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
    /// When the body (or, streaming, the message under way) is late.
    deadline: Option<Pin<Box<Sleep>>>,
    /// The append pipeline's body: the deadline runs per message.
    streaming: bool,
    done: bool,
}

impl Admitted {
    /// Follows the message frames through one chunk of body data.
    fn check(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                continue;
            }
            let n = (FRAME_HEADER_BYTES - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len < FRAME_HEADER_BYTES {
                break;
            }
            self.header_len = 0;
            let length = u32::from_be_bytes(self.header[1..].try_into().expect("4 bytes")) as usize;
            self.admit(length)?;
            self.remaining = length;
        }
        Ok(())
    }

    /// Checks a message's declared length and reserves it in the budget.
    fn admit(&mut self, length: usize) -> Result<(), Status> {
        let limits = &self.shared.limits;
        if length > self.max_message_bytes {
            let raise = match self.raised_by {
                Some(flag) => format!("the server's {flag} plus framing"),
                None => "a fixed limit for this service".to_string(),
            };
            return Err(Status::from(Error::TooLarge(format!(
                "request message of {length} bytes exceeds the largest accepted, {} bytes ({raise})",
                self.max_message_bytes
            ))));
        }
        let mut held = self.held.lock().expect("admission lock");
        // One message at a time: the previous one has been decoded.
        *held = None;
        let permit = self
            .shared
            .budget
            .clone()
            .try_acquire_many_owned(length as u32)
            .map_err(|_| {
                Status::from(Error::ResourceExhausted(format!(
                    "the server is already holding {} bytes of requests \
                     (--max-request-bytes-in-flight); retry with backoff",
                    limits.bytes_in_flight
                )))
            })?;
        *held = Some(permit);
        Ok(())
    }
}

impl http_body::Body for Admitted {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let frame = match polled {
            Poll::Pending => {
                let late = match self.deadline.as_mut() {
                    Some(deadline) => deadline.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if late {
                    self.done = true;
                    let timeout = self.shared.limits.body_timeout;
                    return Poll::Ready(Some(Err(Status::from(Error::RequestTimeout(format!(
                        "the request's body did not arrive within {} (--request-body-timeout)",
                        humantime::format_duration(timeout)
                    ))))));
                }
                return Poll::Pending;
            }
            Poll::Ready(None) => {
                self.done = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(status))) => return Poll::Ready(Some(Err(status))),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            let data = data.clone();
            if let Err(status) = self.check(&data) {
                self.done = true;
                return Poll::Ready(Some(Err(status)));
            }
            if self.streaming {
                // Mid-message, the rest must keep coming: the deadline
                // runs from the last data received (not from the message's
                // start, since the pipeline itself stops reading while its
                // batches are unacknowledged). Between messages, none.
                let mid_message = self.header_len > 0 || self.remaining > 0;
                let timeout = self.shared.limits.body_timeout;
                match (mid_message, self.deadline.as_mut()) {
                    (true, Some(deadline)) => deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + timeout),
                    (true, None) => self.deadline = Some(Box::pin(tokio::time::sleep(timeout))),
                    (false, _) => self.deadline = None,
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
