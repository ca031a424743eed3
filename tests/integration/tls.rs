//! TLS and mutual TLS with certificates made in the test (rcgen).

use std::path::{Path, PathBuf};

use pullstream::config::{ServerConfig, TlsFiles};
use pullstream::proto::event_log_client::EventLogClient;
use pullstream::proto::{self as pb};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::common::*;

/// A CA, a server certificate for `localhost` and a client certificate,
/// as PEM files in `dir`.
pub(crate) struct Pki {
    pub(crate) ca: PathBuf,
    pub(crate) server_cert: PathBuf,
    pub(crate) server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

pub(crate) fn make_pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["worker-1".into()]);
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    Pki {
        ca: write("ca.pem", &ca_cert.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
    }
}

async fn tls_server(pki: &Pki, mutual: bool) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::for_tests(dir.path());
    config.tls = Some(TlsFiles {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: mutual.then(|| pki.ca.clone()),
    });
    TestServer::start_in(dir, config).await
}

async fn tls_client(
    server: &TestServer,
    pki: &Pki,
    with_client_cert: bool,
) -> Result<EventLogClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).unwrap()))
        .domain_name("localhost");
    if with_client_cert {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&pki.client_cert).unwrap(),
            std::fs::read(&pki.client_key).unwrap(),
        ));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(EventLogClient::new(channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_round_trip_and_the_cli_over_tls() {
    within(async {
        let pki_dir = tempfile::tempdir().unwrap();
        let pki = make_pki(pki_dir.path());
        let server = tls_server(&pki, false).await;
        let mut client = tls_client(&server, &pki, false).await.unwrap();
        client
            .append(pb::AppendRequest {
                stream: "s".into(),
                events: vec![event("t", "{}")],
                ..Default::default()
            })
            .await
            .unwrap();
        let page = client
            .read(pb::ReadRequest {
                stream: "s".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.events.len(), 1);

        // A plaintext client cannot talk to a TLS server.
        let mut plain = EventLogClient::connect(format!("http://{}", server.addr))
            .await
            .unwrap();
        assert!(plain
            .list_streams(pb::ListStreamsRequest::default())
            .await
            .is_err());

        // The CLI, with --tls-ca (run off the runtime: the server is in
        // this process).
        let url = format!("https://localhost:{}", server.addr.port());
        let ca = pki.ca.to_str().unwrap().to_string();
        let cli = |args: Vec<String>| {
            let url = url.clone();
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                crate::process::run_cli(&url, &args, None)
            })
        };
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let out = cli(args(&["tail", "s", "--limit", "1", "--tls-ca", &ca]))
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = cli(args(&["tail", "s", "--limit", "1"])).await.unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-ca"));
        // A CA that did not sign the server's certificate: reported as a
        // TLS problem with its cause, not as a server that is not running.
        let other_dir = tempfile::tempdir().unwrap();
        let other = make_pki(other_dir.path());
        let wrong = other.ca.to_str().unwrap().to_string();
        let out = cli(args(&["streams", "list", "--tls-ca", &wrong]))
            .await
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(stderr.contains("a TLS problem"), "{stderr}");
        assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
        assert!(
            !stderr.contains("is `pullstream serve` running"),
            "{stderr}"
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn mutual_tls_rejects_a_client_without_a_certificate() {
    within(async {
        let pki_dir = tempfile::tempdir().unwrap();
        let pki = make_pki(pki_dir.path());
        let server = tls_server(&pki, true).await;
        // Without a client certificate the handshake (or the first call) fails.
        let refused = match tls_client(&server, &pki, false).await {
            Err(_) => true,
            Ok(mut c) => c
                .list_streams(pb::ListStreamsRequest::default())
                .await
                .is_err(),
        };
        assert!(refused, "a client without a certificate was served");
        let mut client = tls_client(&server, &pki, true).await.unwrap();
        client
            .list_streams(pb::ListStreamsRequest::default())
            .await
            .unwrap();
        server.stop().await;
    })
    .await;
}

/// The TLS handshake follows `--handshake-timeout` (it was a fixed 10 s):
/// a client that starts a ClientHello and stalls is disconnected.
#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_after_the_handshake_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path());
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::for_tests(dir.path());
    config.handshake_timeout = std::time::Duration::from_millis(300);
    config.tls = Some(TlsFiles {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: None,
    });
    let server = TestServer::start_in(dir, config).await;
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // A TLS record header announcing a 512-byte handshake message, and
    // only 40 bytes of it: past the HTTP/2-preface check, inside TLS.
    let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00];
    hello.extend_from_slice(&[0x01; 40]);
    socket.write_all(&hello).await.unwrap();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut buf = [0u8; 64];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the stalled handshake was not closed within 5 s"
    );
}
