//! Closes connections that never start speaking HTTP/2.
//!
//! A client that connects and then sends nothing (or only a few bytes)
//! would otherwise hold a socket and a task forever: HTTP/2 keepalive pings
//! only start once the connection is established. TLS connections get
//! tonic's TLS handshake timeout; this covers plaintext ones, and wraps TLS
//! connections too (their handshake bytes count as the start).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::connections::ConnectionSlot;

/// The HTTP/2 connection preface is 24 bytes: a client has started
/// properly once it has sent that much.
const PREFACE_BYTES: usize = 24;

/// A TCP connection that fails its reads if its first bytes do not arrive
/// within the deadline.
pub(crate) struct HandshakeDeadline {
    inner: TcpStream,
    /// Until the preface's worth of bytes has arrived.
    deadline: Option<Pin<Box<Sleep>>>,
    received: usize,
    /// The connection's place under `--max-connections`, given back when
    /// the connection closes.
    _slot: ConnectionSlot,
}

impl HandshakeDeadline {
    pub(crate) fn new(
        inner: TcpStream,
        timeout: Duration,
        slot: ConnectionSlot,
    ) -> HandshakeDeadline {
        HandshakeDeadline {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            received: 0,
            _slot: slot,
        }
    }
}

impl AsyncRead for HandshakeDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.deadline.is_some() {
            self.received += buf.filled().len() - before;
            if self.received >= PREFACE_BYTES {
                self.deadline = None;
            } else if result.is_pending() {
                if let Some(deadline) = self.deadline.as_mut() {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client did not start its connection in time",
                        )));
                    }
                }
            }
        }
        result
    }
}

impl AsyncWrite for HandshakeDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for HandshakeDeadline {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
