//! `pullstream certs create`: a development certificate authority with a
//! server and a client certificate, the way `mkcert` makes them, so TLS
//! and mutual TLS can be tried without an `openssl` recipe (whose usual
//! one-liner makes a CN-only certificate that modern clients reject: no
//! subject alternative name).
//!
//! The files are PEM, private keys 0600. They are for development and
//! tests: a production server takes its certificate from the
//! organisation's CA, through the same `--tls-cert`/`--tls-key` flags.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Arguments of `pullstream certs`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  \
    pullstream certs create --out ./certs --host localhost --host events.internal\n  \
    pullstream serve --tls-cert certs/server.pem --tls-key certs/server.key --tls-client-ca certs/ca.pem\n  \
    pullstream status --server https://localhost:50051 --tls-ca certs/ca.pem \\\n      \
    --tls-cert certs/client.pem --tls-key certs/client.key")]
pub struct CertsArgs {
    #[command(flatten)]
    output: super::output::OutputArgs,
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CertsCommand {
    /// Make a development CA (ca.pem, ca.key), a server certificate
    /// (server.pem, server.key) and a client certificate (client.pem,
    /// client.key) in --out
    Create {
        /// The directory to write into (created if missing)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A name or IP address the server certificate is valid for (repeatable) [default: localhost, 127.0.0.1, ::1]
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// The client certificate's name (what the server's log shows for it)
        #[arg(long, default_value = "pullstream-client", value_name = "NAME")]
        client_name: String,
        /// How long the certificates are valid
        #[arg(long, default_value = "365d", value_name = "DURATION")]
        valid_for: crate::config::HumanDuration,
        /// Overwrite files that already exist
        #[arg(long)]
        force: bool,
    },
}

/// The files `certs create` writes, in the order it lists them.
const FILES: [(&str, &str); 6] = [
    (
        "ca.pem",
        "the CA certificate: clients' --tls-ca, the server's --tls-client-ca",
    ),
    (
        "ca.key",
        "the CA's private key (keep it; it signs nothing else here)",
    ),
    ("server.pem", "the server's --tls-cert"),
    ("server.key", "the server's --tls-key"),
    ("client.pem", "a client's --tls-cert (mutual TLS)"),
    ("client.key", "a client's --tls-key (mutual TLS)"),
];

/// Runs `pullstream certs`.
pub async fn run(args: CertsArgs) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Create {
            out,
            hosts,
            client_name,
            valid_for,
            force,
        } => {
            let hosts = if hosts.is_empty() {
                vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
            } else {
                hosts
            };
            create(&out, &hosts, &client_name, valid_for.0, force, args.output)
        }
    }
}

fn create(
    out: &Path,
    hosts: &[String],
    client_name: &str,
    valid_for: Duration,
    force: bool,
    output: super::output::OutputArgs,
) -> anyhow::Result<()> {
    if !force {
        if let Some((name, _)) = FILES.iter().find(|(name, _)| out.join(name).exists()) {
            anyhow::bail!(
                "{} already exists: pass --force to overwrite, or another --out",
                out.join(name).display()
            );
        }
    }
    let pems = make(hosts, client_name, valid_for)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut files = Vec::new();
    for ((name, what), pem) in FILES.iter().zip(&pems) {
        let path = out.join(name);
        write_file(&path, pem, name.ends_with(".key"))
            .with_context(|| format!("writing {}", path.display()))?;
        if !output.json {
            println!("{:<40}  {what}", path.display().to_string());
        }
        files.push(serde_json::json!({ "path": path, "holds": what }));
    }
    if output.json {
        println!("{}", serde_json::json!({ "files": files, "hosts": hosts }));
    }
    eprintln!(
        "The server certificate is valid for {}; clients must name one of these (an IP address or a host name) in --server.",
        hosts.join(", ")
    );
    Ok(())
}

/// The six PEM texts, in the order of [`FILES`].
fn make(hosts: &[String], client_name: &str, valid_for: Duration) -> anyhow::Result<[String; 6]> {
    // From a day ago (clocks differ) to `valid_for` from now.
    let now = SystemTime::now();
    let date = |(y, m, d): (i32, u8, u8)| rcgen::date_time_ymd(y, m, d);
    let not_before = date(ymd(now - Duration::from_secs(86_400)));
    let not_after = date(ymd(now + valid_for.max(Duration::from_secs(86_400))));
    let mut ca = CertificateParams::new(Vec::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "Pullstream development CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |names: Vec<String>, common_name: &str, usage: ExtendedKeyUsagePurpose| {
        let mut params = CertificateParams::new(names)
            .with_context(|| format!("invalid --host in {}", hosts.join(", ")))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        anyhow::Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) = leaf(
        hosts.to_vec(),
        &hosts[0],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_pem, client_key) = leaf(
        vec![client_name.to_string()],
        client_name,
        ExtendedKeyUsagePurpose::ClientAuth,
    )
    .context("invalid --client-name")?;
    Ok([
        ca_cert.pem(),
        ca_key_pem,
        server_pem,
        server_key,
        client_pem,
        client_key,
    ])
}

/// The UTC calendar date of a time, as rcgen takes it.
fn ymd(time: SystemTime) -> (i32, u8, u8) {
    let text = humantime::format_rfc3339_seconds(time).to_string();
    let part = |range: std::ops::Range<usize>| text[range].parse().unwrap_or(1);
    (part(0..4), part(5..7) as u8, part(8..10) as u8)
}

fn write_file(path: &Path, text: &str, private: bool) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(if private { 0o600 } else { 0o644 });
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}
