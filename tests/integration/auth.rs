//! API keys, tenants and scopes, through the real server and client.

use std::sync::Arc;
use std::time::Duration;

use pullstream::auth::{KeyRing, NewKey, Scope};
use pullstream::config::ServerConfig;
use pullstream::proto::api_keys_client::ApiKeysClient;
use pullstream::proto::event_log_client::EventLogClient;
use pullstream::proto::{self as pb};
use pullstream::storage::{Store, StoreOptions};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::Code;

use crate::common::*;

/// Sends a fixed `authorization` value (or none).
#[derive(Clone)]
pub(crate) struct Bearer(pub(crate) Option<String>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        Ok(request)
    }
}

pub(crate) type Keyed = EventLogClient<InterceptedService<Channel, Bearer>>;

pub(crate) async fn client_with(server: &TestServer, key: &str) -> Keyed {
    EventLogClient::with_interceptor(
        server.channel().await,
        Bearer(Some(format!("Bearer {key}"))),
    )
}

pub(crate) async fn admin_api(
    server: &TestServer,
    key: &str,
) -> ApiKeysClient<InterceptedService<Channel, Bearer>> {
    ApiKeysClient::with_interceptor(
        server.channel().await,
        Bearer(Some(format!("Bearer {key}"))),
    )
}

/// Creates keys offline on the data dir (as `pullstream keys create
/// --data-dir` does), before the server starts. Returns the key strings.
pub(crate) fn offline_keys(dir: &std::path::Path, keys: &[(&str, &[Scope])]) -> Vec<String> {
    let store = Store::open(&StoreOptions {
        path: dir.to_path_buf(),
        cache_bytes: 8 << 20,
        background_flush: pullstream::storage::BackgroundFlush::Off,
        write_ahead_log: true,
        checkpoint_bytes: 64 << 20,
        faults: None,
    })
    .unwrap();
    let ring = KeyRing::load(Arc::new(store)).unwrap();
    keys.iter()
        .map(|(tenant, scopes)| {
            ring.create(NewKey {
                tenant: tenant.to_string(),
                scopes: scopes.to_vec(),
                streams: Vec::new(),
                ttl: None,
            })
            .unwrap()
            .1
        })
        .collect()
}

/// A server whose data dir already holds keys.
async fn server_with_keys(keys: &[(&str, &[Scope])]) -> (TestServer, Vec<String>) {
    server_with_keys_and(keys, |_| {}).await
}

/// The same, with `tweak` applied to the config.
async fn server_with_keys_and(
    keys: &[(&str, &[Scope])],
    tweak: impl FnOnce(&mut ServerConfig),
) -> (TestServer, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let secrets = offline_keys(dir.path(), keys);
    let mut config = ServerConfig::for_tests(dir.path());
    tweak(&mut config);
    (TestServer::start_in(dir, config).await, secrets)
}

async fn create_key(
    server: &TestServer,
    admin: &str,
    scopes: &[pb::Scope],
    streams: &[&str],
    ttl_seconds: u64,
) -> (String, String) {
    let response = admin_api(server, admin)
        .await
        .create_api_key(pb::CreateApiKeyRequest {
            scopes: scopes.iter().map(|&s| s as i32).collect(),
            streams: streams.iter().map(|s| s.to_string()).collect(),
            ttl_seconds,
        })
        .await
        .unwrap()
        .into_inner();
    (response.key.unwrap().id, response.secret)
}

fn ev() -> Vec<pb::NewEvent> {
    vec![event("order.created", "{}")]
}

async fn append_as(client: &mut Keyed, stream: &str) -> Result<u64, tonic::Status> {
    client
        .append(pb::AppendRequest {
            stream: stream.into(),
            events: ev(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().first_offset)
}

async fn read_as(client: &mut Keyed, stream: &str) -> Result<Vec<pb::Event>, tonic::Status> {
    client
        .read(pb::ReadRequest {
            stream: stream.into(),
            limit: 100,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().events)
}

async fn list_as(client: &mut Keyed) -> Vec<String> {
    client
        .list_streams(pb::ListStreamsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .streams
        .into_iter()
        .map(|s| s.name)
        .collect()
}

#[tokio::test]
async fn tenants_cannot_see_or_touch_each_others_streams_or_consumers() {
    within(async {
        let all: &[Scope] = &[Scope::Publish, Scope::Subscribe, Scope::Admin];
        let (server, keys) = server_with_keys(&[("acme", all), ("globex", all)]).await;
        let mut a = client_with(&server, &keys[0]).await;
        let mut b = client_with(&server, &keys[1]).await;

        // The same name in two tenants: two streams.
        assert_eq!(append_as(&mut a, "orders").await.unwrap(), 0);
        assert_eq!(append_as(&mut a, "orders").await.unwrap(), 1);
        assert_eq!(append_as(&mut b, "orders").await.unwrap(), 0);
        append_as(&mut a, "only-acme").await.unwrap();
        assert_eq!(list_as(&mut a).await, vec!["only-acme", "orders"]);
        assert_eq!(list_as(&mut b).await, vec!["orders"]);
        let events = read_as(&mut a, "orders").await.unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0].stream, "orders",
            "events carry the tenant's own name"
        );
        assert_eq!(read_as(&mut b, "orders").await.unwrap().len(), 1);

        // Another tenant's stream is exactly a stream that does not exist.
        let status = read_as(&mut b, "only-acme").await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        let status = b
            .get_stream(pb::GetStreamRequest {
                stream: "only-acme".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        let status = b
            .subscribe(pb::SubscribeRequest {
                stream: "only-acme".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        let info = a
            .get_stream(pb::GetStreamRequest {
                stream: "orders".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .stream
            .unwrap();
        assert_eq!((info.name.as_str(), info.next_offset), ("orders", 2));

        // Consumers are per tenant too.
        a.commit_cursor(pb::CommitCursorRequest {
            stream: "orders".into(),
            consumer: "billing".into(),
            next_offset: 2,
            ..Default::default()
        })
        .await
        .unwrap();
        let status = b
            .get_consumer(pb::GetConsumerRequest {
                stream: "orders".into(),
                consumer: "billing".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        let listed = b
            .list_consumers(pb::ListConsumersRequest {
                stream: "orders".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .consumers;
        assert!(listed.is_empty());

        // Deleting B's "orders" leaves A's alone.
        b.delete_stream(pb::DeleteStreamRequest {
            stream: "orders".into(),
        })
        .await
        .unwrap();
        assert_eq!(read_as(&mut a, "orders").await.unwrap().len(), 2);

        // Keys are per tenant: B's admin cannot see or revoke A's keys.
        let a_keys = admin_api(&server, &keys[0])
            .await
            .list_api_keys(pb::ListApiKeysRequest {})
            .await
            .unwrap()
            .into_inner()
            .keys;
        assert_eq!(a_keys.len(), 1);
        assert_eq!(a_keys[0].tenant, "acme");
        let status = admin_api(&server, &keys[1])
            .await
            .revoke_api_key(pb::RevokeApiKeyRequest {
                id: a_keys[0].id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn each_scope_allows_its_calls_and_denies_the_others() {
    within(async {
        let (server, keys) =
            server_with_keys(&[("t", &[Scope::Publish, Scope::Subscribe, Scope::Admin])]).await;
        let admin = &keys[0];
        let (_, publisher) = create_key(&server, admin, &[pb::Scope::Publish], &[], 0).await;
        let (_, reader) = create_key(&server, admin, &[pb::Scope::Subscribe], &[], 0).await;
        let mut p = client_with(&server, &publisher).await;
        let mut r = client_with(&server, &reader).await;
        let mut a = client_with(&server, admin).await;

        append_as(&mut p, "s").await.unwrap();
        assert_eq!(
            read_as(&mut p, "s").await.unwrap_err().code(),
            Code::PermissionDenied
        );
        let status = p
            .subscribe(pb::SubscribeRequest {
                stream: "s".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(
            status.message().contains("subscribe"),
            "{}",
            status.message()
        );

        assert_eq!(read_as(&mut r, "s").await.unwrap().len(), 1);
        assert_eq!(
            append_as(&mut r, "s").await.unwrap_err().code(),
            Code::PermissionDenied
        );
        // Both may describe streams.
        assert_eq!(list_as(&mut p).await, vec!["s"]);
        assert_eq!(list_as(&mut r).await, vec!["s"]);

        // Deleting needs admin; so does managing keys.
        for client in [&mut p, &mut r] {
            let status = client
                .delete_stream(pb::DeleteStreamRequest { stream: "s".into() })
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied);
        }
        let status = admin_api(&server, &publisher)
            .await
            .list_api_keys(pb::ListApiKeysRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        a.delete_stream(pb::DeleteStreamRequest { stream: "s".into() })
            .await
            .unwrap();
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn stream_patterns_limit_a_key() {
    within(async {
        let (server, keys) =
            server_with_keys(&[("t", &[Scope::Publish, Scope::Subscribe, Scope::Admin])]).await;
        let (_, limited) = create_key(
            &server,
            &keys[0],
            &[pb::Scope::Publish, pb::Scope::Subscribe],
            &["orders.>"],
            0,
        )
        .await;
        let mut c = client_with(&server, &limited).await;
        append_as(&mut c, "orders.eu").await.unwrap();
        let status = append_as(&mut c, "billing").await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(
            status.message().contains("orders.>"),
            "{}",
            status.message()
        );
        // A stream outside the pattern: the limited key does not list it.
        let mut full = client_with(&server, &keys[0]).await;
        full.create_stream(pb::CreateStreamRequest {
            stream: "audit".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(list_as(&mut c).await, vec!["orders.eu"]);
        // Bad patterns are refused at creation.
        let status = admin_api(&server, &keys[0])
            .await
            .create_api_key(pb::CreateApiKeyRequest {
                scopes: vec![pb::Scope::Publish as i32],
                streams: vec!["a..b".into()],
                ttl_seconds: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn missing_bad_expired_and_revoked_keys_are_unauthenticated() {
    within(async {
        let (server, keys) =
            server_with_keys(&[("t", &[Scope::Publish, Scope::Subscribe, Scope::Admin])]).await;
        let admin = &keys[0];
        let mut anonymous = EventLogClient::with_interceptor(server.channel().await, Bearer(None));
        let status = anonymous
            .list_streams(pb::ListStreamsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(status.message().contains("Bearer"), "says what to send");
        for bad in [
            "Bearer nonsense",
            "Basic abc",
            "Bearer ps_0000000000000000_00",
        ] {
            let mut c = EventLogClient::with_interceptor(
                server.channel().await,
                Bearer(Some(bad.to_string())),
            );
            let status = c
                .list_streams(pb::ListStreamsRequest::default())
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{bad}");
        }

        // Expiry (an hour; the server's clock is moved on two).
        let (_, short) = create_key(&server, admin, &[pb::Scope::Subscribe], &[], 3600).await;
        let mut c = client_with(&server, &short).await;
        assert!(c
            .list_streams(pb::ListStreamsRequest::default())
            .await
            .is_ok());
        server.config.clock.advance(Duration::from_secs(2 * 3600));
        let status = c
            .list_streams(pb::ListStreamsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(status.message().contains("expired"), "{}", status.message());

        // Revocation ends a live subscription.
        let (id, reader) = create_key(&server, admin, &[pb::Scope::Subscribe], &[], 0).await;
        let mut publisher = client_with(&server, admin).await;
        publisher
            .create_stream(pb::CreateStreamRequest {
                stream: "live".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut c = client_with(&server, &reader).await;
        let mut sub = c
            .subscribe(pb::SubscribeRequest {
                stream: "live".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        next(&mut sub).await.unwrap();
        admin_api(&server, admin)
            .await
            .revoke_api_key(pb::RevokeApiKeyRequest { id })
            .await
            .unwrap();
        let status = loop {
            match next(&mut sub).await {
                Ok(_) => continue,
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), Code::Unauthenticated);
        let status = c
            .list_streams(pb::ListStreamsRequest::default())
            .await
            .unwrap_err();
        assert!(status.message().contains("revoked"), "{}", status.message());
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn no_secret_is_written_to_the_data_dir() {
    within(async {
        let (server, keys) =
            server_with_keys(&[("t", &[Scope::Publish, Scope::Subscribe, Scope::Admin])]).await;
        let (_, created) = create_key(&server, &keys[0], &[pb::Scope::Publish], &[], 0).await;
        let (dir, _) = server.stop().await;
        let mut files = vec![dir.path().to_path_buf()];
        let mut checked = 0;
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            for key in [&keys[0], &created] {
                let secret = key.splitn(3, '_').nth(2).unwrap();
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{} holds a key secret",
                    path.display()
                );
            }
            checked += 1;
        }
        assert!(checked > 0);
    })
    .await;
}

#[tokio::test]
async fn per_key_limits_answer_resource_exhausted_and_spare_other_keys() {
    within(async {
        let both: &[Scope] = &[Scope::Publish, Scope::Subscribe];
        let (server, keys) = server_with_keys_and(&[("t", both), ("t", both)], |c| {
            c.max_subscriptions_per_key = 2;
            c.key_rate_limit = 5;
        })
        .await;
        let mut a = client_with(&server, &keys[0]).await;
        let mut b = client_with(&server, &keys[1]).await;
        a.create_stream(pb::CreateStreamRequest {
            stream: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let subscribe = |client: &mut Keyed| {
            let mut client = client.clone();
            async move {
                client
                    .subscribe(pb::SubscribeRequest {
                        stream: "s".into(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner())
            }
        };

        // Subscriptions: two per key.
        let first = subscribe(&mut a).await.unwrap();
        let _second = subscribe(&mut a).await.unwrap();
        let status = subscribe(&mut a).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("2 subscriptions"),
            "{}",
            status.message()
        );
        let _other = subscribe(&mut b)
            .await
            .expect("another key is not affected");
        // Closing one frees its slot (once the server sees it closed).
        drop(first);
        let mut reopened = None;
        for _ in 0..100 {
            match subscribe(&mut a).await {
                Ok(s) => {
                    reopened = Some(s);
                    break;
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        assert!(reopened.is_some(), "the slot came back");

        // Rate: 5 calls a second; a burst of 60 runs out, others still work.
        let mut refused = 0;
        for _ in 0..60 {
            match a
                .get_stream(pb::GetStreamRequest { stream: "s".into() })
                .await
            {
                Ok(_) => {}
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted);
                    refused += 1;
                }
            }
        }
        assert!(refused > 0, "60 calls at once must exceed 5 per second");
        b.get_stream(pb::GetStreamRequest { stream: "s".into() })
            .await
            .expect("another key keeps its own budget");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn retention_status_and_groups_follow_tenants_and_scopes() {
    let (server, keys) = server_with_keys(&[
        ("acme", &[Scope::Publish, Scope::Subscribe]),
        ("acme", &[Scope::Admin]),
        ("globex", &[Scope::Publish, Scope::Subscribe, Scope::Admin]),
    ])
    .await;
    let mut acme = client_with(&server, &keys[0]).await;
    let mut acme_admin = client_with(&server, &keys[1]).await;
    let mut globex = client_with(&server, &keys[2]).await;
    append_as(&mut acme, "orders").await.unwrap();
    append_as(&mut globex, "ledger").await.unwrap();

    // Changing retention deletes data: admin only, own tenant only.
    let update = |stream: &str| pb::UpdateStreamRequest {
        stream: stream.into(),
        retention: Some(pb::RetentionPolicy {
            max_events: 10,
            ..Default::default()
        }),
    };
    let denied = acme.update_stream(update("orders")).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let updated = acme_admin.update_stream(update("orders")).await.unwrap();
    assert_eq!(updated.into_inner().stream.unwrap().name, "orders");
    let foreign = globex.update_stream(update("orders")).await.unwrap_err();
    assert_eq!(
        foreign.code(),
        Code::NotFound,
        "another tenant's stream does not exist"
    );

    // Status shows only the caller's tenant, under the names it uses.
    for (client, expected) in [(&mut acme, "orders"), (&mut globex, "ledger")] {
        let status = client
            .get_server_status(pb::GetServerStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let names: Vec<_> = status
            .streams
            .iter()
            .map(|s| s.stream.as_ref().unwrap().name.as_str())
            .collect();
        assert_eq!(names, [expected]);
    }

    // Groups: subscribe scope, own tenant.
    let mut member = acme
        .subscribe(pb::SubscribeRequest {
            stream: "orders".into(),
            group: "g".into(),
            member: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    within(member.message()).await.unwrap();
    let group = |stream: &str| pb::GetGroupRequest {
        stream: stream.into(),
        group: "g".into(),
    };
    assert_eq!(
        acme.get_group(group("orders"))
            .await
            .unwrap()
            .into_inner()
            .group
            .unwrap()
            .members
            .len(),
        1
    );
    let foreign = globex.get_group(group("orders")).await.unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);
    let admin_only = acme_admin.get_group(group("orders")).await.unwrap_err();
    assert_eq!(
        admin_only.code(),
        Code::PermissionDenied,
        "groups need the subscribe scope"
    );
    let delete = pb::DeleteGroupRequest {
        stream: "orders".into(),
        group: "g".into(),
    };
    let denied = acme.delete_group(delete.clone()).await.unwrap_err();
    assert_eq!(
        denied.code(),
        Code::PermissionDenied,
        "deleting a group needs admin"
    );
    acme_admin.delete_group(delete).await.unwrap();
}

/// The minting rule: scopes, stream patterns and expiry of a created key
/// lie within the creator's; a stream-limited admin lists and revokes only
/// keys within its patterns; patterns per key are bounded.
#[tokio::test]
async fn a_key_mints_only_keys_within_its_own_rights() {
    let (server, keys) =
        server_with_keys(&[("t", &[Scope::Publish, Scope::Subscribe, Scope::Admin])]).await;
    let root = &keys[0];
    let (limited_id, limited) = create_key(
        &server,
        root,
        &[pb::Scope::Admin, pb::Scope::Subscribe],
        &["orders.>"],
        3600,
    )
    .await;
    let mut api = admin_api(&server, &limited).await;
    let mint = |scopes: &[pb::Scope], streams: &[&str], ttl_seconds: u64| pb::CreateApiKeyRequest {
        scopes: scopes.iter().map(|&s| s as i32).collect(),
        streams: streams.iter().map(|s| s.to_string()).collect(),
        ttl_seconds,
    };
    for (request, why) in [
        (mint(&[pb::Scope::Subscribe], &[], 60), "patterns"),
        (mint(&[pb::Scope::Subscribe], &["secret"], 60), "patterns"),
        (mint(&[pb::Scope::Subscribe], &["orders.eu"], 0), "expire"),
        (
            mint(&[pb::Scope::Subscribe], &["orders.eu"], 31 * 365 * 86400),
            "expire",
        ),
        (
            mint(&[pb::Scope::Publish], &["orders.eu"], 60),
            "publish scope",
        ),
    ] {
        let status = api.create_api_key(request).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{why}: {status:?}");
        assert!(status.message().contains(why), "{}", status.message());
    }
    let minted = api
        .create_api_key(mint(&[pb::Scope::Subscribe], &["orders.eu"], 60))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    // The limited admin sees itself and what it minted, not the root key.
    let mut seen: Vec<String> = api
        .list_api_keys(pb::ListApiKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.id)
        .collect();
    seen.sort();
    let mut expected = vec![limited_id.clone(), minted.id.clone()];
    expected.sort();
    assert_eq!(seen, expected);
    let root_id = root.split('_').nth(1).unwrap().to_string();
    let status = api
        .revoke_api_key(pb::RevokeApiKeyRequest { id: root_id })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    api.revoke_api_key(pb::RevokeApiKeyRequest { id: minted.id })
        .await
        .expect("a key within its patterns can be revoked");
    // The tenant-wide admin still sees every key.
    let all = admin_api(&server, root)
        .await
        .list_api_keys(pb::ListApiKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(all.len(), 3);
    // Bounded patterns.
    let many: Vec<String> = (0..101).map(|i| format!("s{i}")).collect();
    let status = admin_api(&server, root)
        .await
        .create_api_key(pb::CreateApiKeyRequest {
            scopes: vec![pb::Scope::Subscribe as i32],
            streams: many,
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("at most 100"),
        "{}",
        status.message()
    );
}

/// The data dir holds events and key digests: what the server creates is
/// private (directories 0700, files 0600).
#[tokio::test]
async fn the_data_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server =
        TestServer::start_in(tempfile::tempdir().unwrap(), ServerConfig::for_tests(&data)).await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![event("t", "1")]).await;
    drop(client);
    server.stop().await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for d in [data.clone(), data.join("sled"), data.join("wal")] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    for sub in ["sled", "wal"] {
        for entry in std::fs::read_dir(data.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                assert_eq!(mode(&path), 0o600, "{}", path.display());
            }
        }
    }
}
