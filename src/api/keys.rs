//! The gRPC `ApiKeys` service: a tenant's admins manage its keys. Keys of
//! other tenants are invisible here (NOT_FOUND), like their streams.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{caller, timestamp};
use crate::auth::{KeyInfo, KeyRing, NewKey, Scope};
use crate::proto::api_keys_server::ApiKeys;
use crate::proto::{self as pb};

/// The `ApiKeys` implementation.
pub struct ApiKeysService {
    keys: Arc<KeyRing>,
}

impl ApiKeysService {
    /// A service over `keys`.
    pub fn new(keys: Arc<KeyRing>) -> ApiKeysService {
        ApiKeysService { keys }
    }
}

#[tonic::async_trait]
impl ApiKeys for ApiKeysService {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let caller = caller(&self.keys, &request, &[Scope::Admin])?;
        let request = request.into_inner();
        let scopes = request
            .scopes
            .iter()
            .map(|&s| scope_from_proto(s))
            .collect::<Result<Vec<_>, _>>()?;
        let ttl = (request.ttl_seconds > 0).then(|| Duration::from_secs(request.ttl_seconds));
        caller.may_mint(&scopes, &request.streams, ttl, self.keys.now())?;
        let (info, secret) = self.keys.create(NewKey {
            tenant: caller.tenant,
            scopes,
            streams: request.streams,
            ttl,
        })?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            key: Some(key_to_proto(info)),
            secret,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let caller = caller(&self.keys, &request, &[Scope::Admin])?;
        // A stream-limited admin sees only the keys within its patterns.
        let keys = self.keys.list(Some(&caller.tenant));
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: keys
                .into_iter()
                .filter(|k| caller.covers(&k.streams))
                .map(key_to_proto)
                .collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let caller = caller(&self.keys, &request, &[Scope::Admin])?;
        let id = request.into_inner().id;
        let info = self
            .keys
            .revoke_if(&id, Some(&caller.tenant), |key| caller.covers(&key.streams))?;
        Ok(Response::new(pb::RevokeApiKeyResponse {
            key: Some(key_to_proto(info)),
        }))
    }
}

fn scope_from_proto(value: i32) -> Result<Scope, Status> {
    scope_of_proto(value).ok_or_else(|| {
        super::invalid(format!(
            "unknown scope {value}: use SCOPE_PUBLISH, SCOPE_SUBSCRIBE or SCOPE_ADMIN"
        ))
    })
}

/// The scope a proto value names, if it names one.
pub fn scope_of_proto(value: i32) -> Option<Scope> {
    match pb::Scope::try_from(value) {
        Ok(pb::Scope::Publish) => Some(Scope::Publish),
        Ok(pb::Scope::Subscribe) => Some(Scope::Subscribe),
        Ok(pb::Scope::Admin) => Some(Scope::Admin),
        _ => None,
    }
}

/// The proto form of a scope.
pub fn scope_to_proto(scope: Scope) -> pb::Scope {
    match scope {
        Scope::Publish => pb::Scope::Publish,
        Scope::Subscribe => pb::Scope::Subscribe,
        Scope::Admin => pb::Scope::Admin,
    }
}

/// The proto form of a key description.
pub fn key_to_proto(info: KeyInfo) -> pb::ApiKeyInfo {
    pb::ApiKeyInfo {
        id: info.id,
        tenant: info.tenant,
        scopes: info
            .scopes
            .into_iter()
            .map(|s| scope_to_proto(s) as i32)
            .collect(),
        streams: info.streams,
        created_time: Some(timestamp(info.created_unix_nanos)),
        expire_time: info.expires_unix_nanos.map(timestamp),
        revoke_time: info.revoked_unix_nanos.map(timestamp),
    }
}
