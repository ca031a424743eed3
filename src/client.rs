//! Connecting to a Pullstream server: the endpoint (with TLS), the API-key
//! header, and the typed gRPC clients.
//!
//! The CLI's client commands and the benchmark both talk to a server, and
//! neither should depend on the other to do it: this module is the one
//! place that knows how a program reaches a server. (A full client library,
//! with reconnect-and-resume subscriptions, is for the structure issue to
//! grow from here.)

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::api_keys_client::ApiKeysClient;
use crate::proto::event_log_client::EventLogClient;

/// A client of the `EventLog` service.
pub type Client = EventLogClient<InterceptedService<Channel, ApiKeyHeader>>;

/// A client of the `ApiKeys` service.
pub type KeysClient = ApiKeysClient<InterceptedService<Channel, ApiKeyHeader>>;

/// Where the server is and how to authenticate to it. The error messages
/// name the CLI's flags, which carry the same names as these fields.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// The server URL (`http://` or `https://`).
    pub server: String,
    /// The API key, if the server needs one.
    pub api_key: Option<String>,
    /// PEM CA to verify the server's certificate with (`https://`).
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

/// Adds `authorization: Bearer <key>` to every call, when a key is given.
#[derive(Clone)]
pub struct ApiKeyHeader(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for ApiKeyHeader {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl ApiKeyHeader {
    /// The header for `key` (none when `None`).
    pub fn new(key: Option<&str>) -> anyhow::Result<ApiKeyHeader> {
        Ok(ApiKeyHeader(match key {
            None => None,
            Some(key) => Some(format!("Bearer {}", key.trim()).parse().map_err(|_| {
                anyhow::anyhow!("the API key has characters a header cannot carry")
            })?),
        }))
    }
}

impl ConnectOptions {
    /// The endpoint these options describe; fails on settings that no
    /// retry can fix (a bad URL, missing or unreadable TLS files).
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let mut endpoint = Endpoint::from_shared(self.server.clone())
            .map_err(|e| anyhow::anyhow!("invalid --server URL {:?}: {e}", self.server))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if self.server.starts_with("https://") {
            endpoint = endpoint
                .tls_config(self.tls()?)
                .map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
        } else if self.tls_ca.is_some() || self.tls_cert.is_some() {
            anyhow::bail!("--tls-ca/--tls-cert need an https:// server URL");
        }
        Ok(endpoint)
    }

    /// The TLS settings from `tls_ca`, `tls_cert` and `tls_key`.
    fn tls(&self) -> anyhow::Result<ClientTlsConfig> {
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
        };
        let Some(ca) = &self.tls_ca else {
            anyhow::bail!(
                "an https:// server needs --tls-ca (the PEM CA that signed its certificate)"
            );
        };
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls = tls.identity(Identity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            ));
        }
        Ok(tls)
    }

    /// A connection with the header to send on it, with an error that
    /// says what to check.
    pub async fn channel(&self) -> anyhow::Result<(Channel, ApiKeyHeader)> {
        let header = ApiKeyHeader::new(self.api_key.as_deref())?;
        let channel = self.endpoint()?.connect().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the server at {}: {e} (is `pullstream serve` running? set --server or PULLSTREAM_SERVER)",
                self.server
            )
        })?;
        Ok((channel, header))
    }

    /// A connected `EventLog` client (responses of any size accepted).
    pub async fn event_log(&self) -> anyhow::Result<Client> {
        let (channel, header) = self.channel().await?;
        Ok(EventLogClient::with_interceptor(channel, header).max_decoding_message_size(usize::MAX))
    }

    /// A connected `ApiKeys` client.
    pub async fn api_keys(&self) -> anyhow::Result<KeysClient> {
        let (channel, header) = self.channel().await?;
        Ok(ApiKeysClient::with_interceptor(channel, header))
    }
}
