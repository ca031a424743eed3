//! TLS on our own acceptor, so that a failed handshake is logged.
//!
//! tonic's built-in TLS drops a failed handshake with a debug line that
//! names neither the peer nor, usefully, the cause: an operator whose
//! clients cannot connect sees nothing at all. Here each accepted
//! connection is handshaken in its own task (handshakes run concurrently,
//! bounded by `--max-connections` and `--handshake-timeout`), finished
//! connections are handed to the server, and every failure is logged with
//! the peer's address and what went wrong in words an operator can act on
//! ("the client sent no certificate, and --tls-client-ca requires one").
//! Failures are logged at most [`LOGGED_PER_WINDOW`] per
//! [`LOG_WINDOW`] for each kind of failure (plaintext, no client
//! certificate, …), with a count of the rest, so a scanner cannot flood
//! the log and a flood of one kind does not hide another; a connection closed before it sent a byte (a load balancer's TCP
//! check) is only a debug line.
//!
//! ALPN offers `h2` and `http/1.1`: gRPC needs HTTP/2, while the JSON API,
//! SSE and gRPC-Web also work over HTTP/1.1 (browsers, `curl --http1.1`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore};
use tokio_rustls::server::TlsStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

use super::handshake::HandshakeDeadline;
use crate::config::TlsFiles;
use crate::error::Error;

/// How many failed handshakes are logged per window; the rest are counted.
const LOGGED_PER_WINDOW: u32 = 10;
/// The window [`LOGGED_PER_WINDOW`] applies to.
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// The server's TLS settings, read and checked once at startup.
#[derive(Clone)]
pub(crate) struct TlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    timeout: Duration,
    mutual: bool,
    /// Per kind of failure.
    log: Arc<Mutex<std::collections::HashMap<&'static str, FailureLog>>>,
}

impl TlsAcceptor {
    /// Reads `--tls-cert`, `--tls-key` and `--tls-client-ca`; a client has
    /// `timeout` to finish its handshake (`--handshake-timeout`).
    pub(crate) fn from_files(files: &TlsFiles, timeout: Duration) -> Result<TlsAcceptor, Error> {
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                Error::InvalidArgument(format!("cannot read {flag} {}: {e}", path.display()))
            })
        };
        let certificates = |flag: &str, path: &std::path::Path| {
            let pem = read(flag, path)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    Error::InvalidArgument(format!(
                        "{flag} {} is not a PEM certificate file: {e}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{flag} {} holds no certificate (expected a PEM file with a \
                     \"BEGIN CERTIFICATE\" block)",
                    path.display()
                )));
            }
            Ok(certs)
        };
        let chain = certificates("--tls-cert", &files.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&read("--tls-key", &files.key)?).map_err(|e| {
            Error::InvalidArgument(format!(
                "--tls-key {} holds no private key in PEM form (PKCS#8, PKCS#1 or SEC1): {e}",
                files.key.display()
            ))
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::InvalidArgument(format!("TLS settings: {e}")))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for certificate in certificates("--tls-client-ca", path)? {
                    roots.add(certificate).map_err(|e| {
                        Error::InvalidArgument(format!("--tls-client-ca {}: {e}", path.display()))
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| {
                            Error::InvalidArgument(format!(
                                "--tls-client-ca {}: {e}",
                                path.display()
                            ))
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            Error::InvalidArgument(format!(
                "--tls-cert {} and --tls-key {} do not make a usable identity: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            timeout,
            mutual: files.client_ca.is_some(),
            log: Arc::new(Mutex::new(std::collections::HashMap::new())),
        })
    }

    /// Handshakes each connection of `incoming` in its own task and yields
    /// the finished ones; failures are logged (see the module docs). The
    /// stream ends when `incoming` does; dropping it stops accepting.
    pub(crate) fn accept_all(
        self,
        incoming: impl Stream<Item = io::Result<HandshakeDeadline>> + Send + 'static,
    ) -> impl Stream<Item = io::Result<ServerConnection>> + Send + 'static {
        // Small: the server takes connections as soon as they are ready.
        let (ready, connections) = mpsc::channel(16);
        tokio::spawn(async move {
            tokio::pin!(incoming);
            loop {
                let next = tokio::select! {
                    // The server stopped accepting (shutdown): release the
                    // listener now, not at the next connection.
                    _ = ready.closed() => return,
                    next = incoming.next() => next,
                };
                match next {
                    None => return,
                    Some(Err(e)) => {
                        if ready.send(Err(e)).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(tcp)) => {
                        let (this, ready) = (self.clone(), ready.clone());
                        tokio::spawn(async move {
                            if let Some(tls) = this.handshake(tcp).await {
                                let _ = ready.send(Ok(ServerConnection::Tls(Box::new(tls)))).await;
                            }
                        });
                    }
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(connections)
    }

    /// One handshake, logged when it fails.
    async fn handshake(&self, tcp: HandshakeDeadline) -> Option<TlsStream<HandshakeDeadline>> {
        let peer = tcp.connect_info().remote_addr();
        let result = tokio::time::timeout(self.timeout, self.acceptor.accept(tcp)).await;
        let failure = match result {
            Ok(Ok(tls)) => return Some(tls),
            Ok(Err(e)) => Failure::from_io(&e, self.mutual),
            Err(_) => Failure::Logged(
                "timeout",
                format!(
                    "the client did not finish the TLS handshake within --handshake-timeout ({:?})",
                    self.timeout
                ),
            ),
        };
        match failure {
            Failure::Quiet(reason) => debug!(peer = %shown(peer), %reason, "TLS handshake failed"),
            Failure::Logged(kind, reason) => self
                .log
                .lock()
                .expect("not poisoned")
                .entry(kind)
                .or_default()
                .record(peer, &reason),
        }
        None
    }
}

/// What a failed handshake is worth telling the operator.
enum Failure {
    /// Worth a warning: its kind (each kind is rate-limited on its own, so
    /// a flood of one does not hide another) and the reason.
    Logged(&'static str, String),
    /// Routine (a TCP check that closed at once): a debug line.
    Quiet(String),
}

impl Failure {
    fn from_io(e: &io::Error, mutual: bool) -> Failure {
        let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
            return match e.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe => {
                    Failure::Quiet(format!("the client closed the connection: {e}"))
                }
                _ => Failure::Logged("other", e.to_string()),
            };
        };
        let (kind, reason) = match tls {
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => (
                "plaintext",
                format!("the client does not speak TLS ({tls}): it is probably using http:// against this TLS port; it should use https://"),
            ),
            rustls::Error::NoCertificatesPresented => (
                "no client certificate",
                "the client sent no certificate, and --tls-client-ca requires one".to_string(),
            ),
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
                if mutual =>
            {
                (
                    "client certificate refused",
                    "the client's certificate is not signed by the CA in --tls-client-ca".to_string(),
                )
            }
            rustls::Error::InvalidCertificate(why) if mutual => (
                "client certificate refused",
                format!("the client's certificate was refused: {why}"),
            ),
            rustls::Error::AlertReceived(alert) => (
                "server certificate refused",
                format!(
                    "the client refused the server's certificate (TLS alert {alert:?}): give the client \
                     the CA that signed --tls-cert (e.g. --tls-ca), and check the name it connects to \
                     is in the certificate"
                ),
            ),
            rustls::Error::NoApplicationProtocol => (
                "alpn",
                "the client offered neither h2 nor http/1.1 in ALPN".to_string(),
            ),
            other => ("other", other.to_string()),
        };
        Failure::Logged(kind, reason)
    }
}

/// Rate-limits the failure warnings; see the module docs.
#[derive(Default)]
struct FailureLog {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl FailureLog {
    fn record(&mut self, peer: Option<SocketAddr>, reason: &str) {
        let now = Instant::now();
        if self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= LOG_WINDOW)
        {
            if self.suppressed > 0 {
                warn!(
                    count = self.suppressed,
                    "{} more TLS handshakes failed in the last {:?} (not logged one by one)",
                    self.suppressed,
                    LOG_WINDOW
                );
            }
            *self = FailureLog {
                window_start: Some(now),
                logged: 0,
                suppressed: 0,
            };
        }
        if self.logged < LOGGED_PER_WINDOW {
            self.logged += 1;
            warn!(peer = %shown(peer), %reason, "TLS handshake failed");
        } else {
            self.suppressed += 1;
        }
    }
}

/// A client connection, plaintext or TLS: the one type the server serves.
pub(crate) enum ServerConnection {
    Plain(HandshakeDeadline),
    Tls(Box<TlsStream<HandshakeDeadline>>),
}

impl Connected for ServerConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            ServerConnection::Plain(tcp) => tcp.connect_info(),
            ServerConnection::Tls(tls) => tls.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for ServerConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerConnection::Plain(io) => Pin::new(io).poll_read(cx, buf),
            ServerConnection::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerConnection::Plain(io) => Pin::new(io).poll_write(cx, buf),
            ServerConnection::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerConnection::Plain(io) => Pin::new(io).poll_flush(cx),
            ServerConnection::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerConnection::Plain(io) => Pin::new(io).poll_shutdown(cx),
            ServerConnection::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerConnection::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            ServerConnection::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerConnection::Plain(io) => io.is_write_vectored(),
            ServerConnection::Tls(io) => io.is_write_vectored(),
        }
    }
}

/// A peer address for the log.
fn shown(peer: Option<SocketAddr>) -> String {
    peer.map_or_else(|| "unknown".to_string(), |p| p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_handshakes_are_logged_a_few_per_window_and_the_rest_counted() {
        let mut log = FailureLog::default();
        for _ in 0..(LOGGED_PER_WINDOW + 5) {
            log.record(None, "reason");
        }
        assert_eq!(log.logged, LOGGED_PER_WINDOW);
        assert_eq!(log.suppressed, 5);
        // A new window: the count is reported and starts again.
        log.window_start = Some(Instant::now() - LOG_WINDOW);
        log.record(None, "reason");
        assert_eq!((log.logged, log.suppressed), (1, 0));
    }
}
