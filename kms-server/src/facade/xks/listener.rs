//! The XKS listener: HTTPS (TLS 1.2 and 1.3, HTTP/1.1 and HTTP/2), the four routes of the XKS
//! Proxy API under each key store's URI prefix, SigV4, and every call through the same
//! `Shared::call` as gRPC's: the worker pool, the HSM deadline, the revocation epoch, and the
//! audit record (with the whole `requestMetadata`) durable before the answer leaves.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use tokio::net::TcpListener;

use super::auth;
use super::framing;
use super::wire::{self, Call, ErrorName, XksError};
use crate::api::{Audit, DECRYPT_FAILED, Shared, Who};
use crate::domain::ids::KeyId;
use crate::domain::policy::Operation;
use crate::error::Error;
use crate::facade::https::{self, Answer, BodyError, RefusalLog};
use crate::service::xks::{KEY_USAGE_REFUSED, metadata_context};

/// The path every route starts with after the key store's prefix.
const API: &str = "/kms/xks/v1";

/// What the listener's connections share.
struct State {
    shared: Shared,
    refusals: RefusalLog,
}

/// The key store and the credential that signed a request.
struct Signed {
    store: String,
    access_key_id: String,
}

/// The load balancers' health check: `GET /ping` answers 200 unless the HSM is unavailable.
const PING: &str = "/ping";

/// The largest request body read: the spec's largest fields (8,192 bytes of plaintext and of
/// AAD, ARNs of 2,048 characters) in Base64 and JSON, with room to spare.
const MAX_BODY: usize = 64 * 1024;

/// What a request asks, once its path is read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Health,
    Metadata(String),
    Encrypt(String),
    Decrypt(String),
}

impl Route {
    /// The audit trail's name of the operation.
    fn operation(&self) -> &'static str {
        match self {
            Route::Health => "XksGetHealthStatus",
            Route::Metadata(_) => "XksGetKeyMetadata",
            Route::Encrypt(_) => "XksEncrypt",
            Route::Decrypt(_) => "XksDecrypt",
        }
    }
}

/// The key store prefix and the route of `path`, if it is one of the API's.
fn route(path: &str) -> Option<(&str, Route)> {
    let (prefix, rest) = path.rsplit_once(API)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let route = match parts.as_slice() {
        ["", "health"] => Route::Health,
        ["", "keys", id, call] if !id.is_empty() => match *call {
            "metadata" => Route::Metadata(id.to_string()),
            "encrypt" => Route::Encrypt(id.to_string()),
            "decrypt" => Route::Decrypt(id.to_string()),
            _ => return None,
        },
        _ => return None,
    };
    Some((prefix, route))
}

/// Serves the XKS API on `listener` until `shutdown` (`https::serve`).
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    shared: Shared,
    shutdown: tokio::sync::watch::Receiver<bool>,
    grace: std::time::Duration,
) {
    let kms = shared.kms.clone();
    let state = Arc::new(State { shared, refusals: RefusalLog::default() });
    let handler = move |request| {
        let state = state.clone();
        async move { handle(&state, request).await }
    };
    https::serve("xks", kms, listener, tls, handler, shutdown, grace).await
}

fn answer(status: StatusCode, body: Vec<u8>) -> Answer {
    https::json(status, body)
}

fn error(e: &XksError) -> Answer {
    let answer = answer(StatusCode::from_u16(e.name.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), e.body());
    https::noted(answer, https::Outcome::Refused(format!("{}: {}", e.name.as_str(), e.message())))
}

/// One request: its route, its body, its signature, then the call.
async fn handle(state: &State, request: Request<Incoming>) -> Answer {
    let shared = &state.shared;
    // The body first, whatever the answer: answering before it is read resets an HTTP/2 stream.
    let (parts, body) = request.into_parts();
    let body = match https::body(body, MAX_BODY).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            return error(&XksError::new(ErrorName::UnsupportedOperation, format!("the request body is over {MAX_BODY} bytes or broken")));
        }
        Err(BodyError::Late) => return error(&XksError::new(ErrorName::Validation, "the request body did not arrive in time")),
    };
    if parts.uri.path() == PING && parts.method == Method::GET {
        // For load balancers (the spec asks for one): unauthenticated, no HSM call, no audit.
        return match shared.kms.hsm_health() {
            crate::service::status::Health::Unavailable => answer(StatusCode::SERVICE_UNAVAILABLE, br#"{"status":"UNAVAILABLE"}"#.to_vec()),
            health => answer(StatusCode::OK, format!(r#"{{"status":"{}"}}"#, health.as_str()).into_bytes()),
        };
    }
    let Some((prefix, route)) = route(parts.uri.path()) else {
        return error(&XksError::new(ErrorName::InvalidUriPath, "no XKS API at this path"));
    };
    if parts.method != Method::POST {
        let mut response = error(&XksError::new(ErrorName::Validation, "the XKS API takes POST only"));
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("POST"));
        return response;
    }
    // What this node knows of the key stores; if the request names one, or a credential, it
    // does not know, it looks again in the store (made on another node a moment ago?).
    let mut directory = shared.kms.xks_directory();
    let mut signed = authenticated(&directory, prefix, &parts, &body);
    if signed.is_err() {
        let (kms, wanted) = (shared.kms.clone(), prefix.to_string());
        let access_key = auth::access_key_id(&parts).map(str::to_string);
        let fresh = tokio::task::spawn_blocking(move || {
            kms.xks_directory_knowing(|d| d.store_at(&wanted).is_some_and(|s| access_key.as_deref().is_none_or(|id| d.secret(&s.name, id).is_some())))
        });
        if let Ok(fresh) = fresh.await
            && !Arc::ptr_eq(&fresh, &directory)
        {
            directory = fresh;
            signed = authenticated(&directory, prefix, &parts, &body);
        }
    }
    let signed = match signed {
        Ok(signed) => signed,
        Err(e) if e.name == ErrorName::InvalidUriPath => return error(&e),
        Err(e) => {
            // Audited, within a budget, off the data workers (anyone can send these).
            state.refusals.record(shared, route.operation(), e.message()).await;
            return error(&e);
        }
    };
    let result = match &route {
        Route::Health => health(shared, signed, &body).await,
        Route::Metadata(id) => metadata(shared, signed, id, &body).await,
        Route::Encrypt(id) => encrypt(shared, signed, id, &body).await,
        Route::Decrypt(id) => decrypt(shared, signed, id, &body).await,
    };
    match result {
        Ok(body) => https::noted(answer(StatusCode::OK, body), https::Outcome::Answered),
        Err(e) => error(&e),
    }
}

/// The key store at `prefix` and its credential that signed the request, by `directory`.
fn authenticated(directory: &crate::service::xks::Directory, prefix: &str, parts: &http::request::Parts, body: &[u8]) -> Result<Signed, XksError> {
    let store = directory.store_at(prefix).ok_or_else(|| XksError::new(ErrorName::InvalidUriPath, "no key store at this path"))?;
    let access_key_id = auth::authenticate(parts, body, &store.region, |id| directory.secret(&store.name, id), chrono::Utc::now())?;
    Ok(Signed { store: store.name.clone(), access_key_id })
}

/// A gRPC status from `Shared::call` as the XKS error the spec names for it.
fn xks_error(status: &tonic::Status) -> XksError {
    use tonic::Code;
    let message = status.message();
    let name = match status.code() {
        Code::Unauthenticated => ErrorName::AuthenticationFailed,
        Code::InvalidArgument if message == DECRYPT_FAILED => {
            return XksError::new(
                ErrorName::InvalidCiphertext,
                "the ciphertext, IV, tag, AAD or ciphertext metadata does not decrypt under this key",
            );
        }
        Code::InvalidArgument => ErrorName::Validation,
        Code::NotFound => ErrorName::KeyNotFound,
        Code::PermissionDenied => ErrorName::AccessDenied,
        Code::FailedPrecondition if message.starts_with(KEY_USAGE_REFUSED) => ErrorName::InvalidKeyUsage,
        Code::FailedPrecondition => ErrorName::InvalidState,
        Code::ResourceExhausted => ErrorName::Throttling,
        Code::DeadlineExceeded | Code::Unavailable => ErrorName::DependencyTimeout,
        _ => ErrorName::Internal,
    };
    XksError::new(name, message)
}

/// Runs `f` as the call `operation` by the key store that `signed` it, its request's metadata
/// in the audit record. The credential is looked up again once the call has read the
/// revocation epoch: a credential removed before that is refused here, and one removed after
/// it fails the call at commit (the epoch moved), so that no success is answered on a
/// credential whose removal was acknowledged.
async fn run(
    shared: &Shared,
    operation: &'static str,
    signed: Signed,
    metadata: &wire::RequestMetadata,
    f: impl FnOnce(&crate::service::Kms, &crate::service::Caller, &mut crate::api::Facts) -> Result<Vec<u8>, Error> + Send + 'static,
) -> Result<Vec<u8>, XksError> {
    let recorded = metadata.to_json();
    let who = Who::Facade(crate::service::xks::principal(&signed.store));
    shared
        .call(operation, who, Audit::EveryOutcome, move |kms, caller, facts| {
            facts.caller_context = Some(recorded);
            if kms.xks_directory().secret(&signed.store, &signed.access_key_id).is_none() {
                return Err(Error::Unauthenticated { reason: "the credential that signed the request was removed".into() });
            }
            f(kms, caller, facts)
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| xks_error(&s))
}

/// The external key id: our key id (anything else names no key).
fn key_id(id: &str) -> Result<KeyId, Error> {
    id.parse().map_err(|_| Error::NotFound { what: "the external key id (it is a key id of this service)".into() })
}

fn json(value: &impl serde::Serialize) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|e| Error::invalid("answer", e))
}

async fn health(shared: &Shared, signed: Signed, body: &[u8]) -> Result<Vec<u8>, XksError> {
    let metadata = wire::parse_metadata_only(body, Call::Health)?;
    run(shared, "XksGetHealthStatus", signed, &metadata, |kms, caller, _| {
        kms.check_key_store(caller)?;
        let token = kms.hsm_token();
        json(&wire::HealthAnswer {
            xks_proxy_fleet_size: kms.fleet_size(),
            xks_proxy_vendor: "client-held KMS",
            xks_proxy_model: format!("kms-server {}", env!("CARGO_PKG_VERSION")),
            ekm_vendor: token.as_ref().map_or_else(|| "PKCS#11".to_string(), |t| t.manufacturer.clone()),
            ekm_fleet_details: vec![wire::EkmDetail {
                id: token.as_ref().map_or_else(|| "hsm".to_string(), |t| format!("{}/{}", t.label, t.serial_number)),
                model: token.as_ref().map_or_else(|| "unknown".to_string(), |t| t.model.clone()),
                health_status: kms.hsm_health().as_str(),
            }],
        })
    })
    .await
}

async fn metadata(shared: &Shared, signed: Signed, id: &str, body: &[u8]) -> Result<Vec<u8>, XksError> {
    let metadata = wire::parse_metadata_only(body, Call::Metadata)?;
    let id = id.to_string();
    run(shared, "XksGetKeyMetadata", signed, &metadata, move |kms, caller, facts| {
        let key_id = key_id(&id)?;
        facts.key_id = Some(key_id);
        let view = kms.xks_key(caller, key_id)?;
        let usage = [("ENCRYPT", view.encrypt), ("DECRYPT", view.decrypt)].into_iter().filter(|u| u.1).map(|u| u.0).collect();
        json(&wire::KeyMetadataAnswer { key_spec: "AES_256", key_usage: usage, key_status: if view.enabled { "ENABLED" } else { "DISABLED" } })
    })
    .await
}

/// The key an Encrypt or Decrypt names (noted for its audit record), if the key store may do
/// `operation` with it under the request's metadata.
fn authorized(
    kms: &crate::service::Kms,
    caller: &crate::service::Caller,
    facts: &mut crate::api::Facts,
    id: &str,
    operation: Operation,
    m: &wire::RequestMetadata,
) -> Result<crate::domain::policy::Authorized, Error> {
    let key_id = key_id(id)?;
    facts.key_id = Some(key_id);
    let context = metadata_context(m.aws_principal_arn.as_deref(), m.kms_operation.as_deref(), m.kms_via_service.as_deref())?;
    kms.authorize_xks(caller, key_id, operation, &context)
}

async fn encrypt(shared: &Shared, signed: Signed, id: &str, body: &[u8]) -> Result<Vec<u8>, XksError> {
    let request = wire::parse_encrypt(body)?;
    let metadata = request.metadata.clone();
    let id = id.to_string();
    run(shared, "XksEncrypt", signed, &metadata, move |kms, caller, facts| {
        let proof = authorized(kms, caller, facts, &id, Operation::Encrypt, &request.metadata)?;
        let aad = |version| framing::aad(request.aad.as_deref(), &framing::metadata(version));
        let sealed = kms.xks_encrypt(&proof, request.plaintext.expose_secret(), &aad, request.integrity_value)?;
        facts.key_version = Some(sealed.version);
        let (ciphertext, tag) = sealed.ciphertext.split_at(sealed.ciphertext.len().saturating_sub(wire::TAG_LEN));
        json(&wire::EncryptAnswer::new(&request, &framing::metadata(sealed.version), &sealed.iv.0, ciphertext, tag))
    })
    .await
}

async fn decrypt(shared: &Shared, signed: Signed, id: &str, body: &[u8]) -> Result<Vec<u8>, XksError> {
    let request = wire::parse_decrypt(body)?;
    let metadata = request.metadata.clone();
    let id = id.to_string();
    run(shared, "XksDecrypt", signed, &metadata, move |kms, caller, facts| {
        let proof = authorized(kms, caller, facts, &id, Operation::Decrypt, &request.metadata)?;
        let version = framing::version_of(request.ciphertext_metadata.as_deref()).map_err(|_| Error::DecryptFailed)?;
        facts.key_version = Some(version);
        let md = request.ciphertext_metadata.as_deref().unwrap_or_default();
        let aad = framing::aad(request.aad.as_deref(), md);
        let sealed = [request.ciphertext.as_slice(), &request.tag].concat();
        let plaintext = kms.xks_decrypt(&proof, version, &request.iv, &aad, &sealed)?;
        let encoded = zeroize::Zeroizing::new(B64.encode(plaintext.expose_secret()));
        json(&serde_json::json!({ "plaintext": encoded.as_str() }))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_to_their_call_and_their_key_stores_prefix() {
        assert_eq!(route("/kms/xks/v1/health"), Some(("", Route::Health)));
        assert_eq!(route("/tenant/a/kms/xks/v1/keys/k-1/encrypt"), Some(("/tenant/a", Route::Encrypt("k-1".into()))));
        assert_eq!(route("/p/kms/xks/v1/keys/k/metadata"), Some(("/p", Route::Metadata("k".into()))));
        assert_eq!(route("/p/kms/xks/v1/keys/k/decrypt"), Some(("/p", Route::Decrypt("k".into()))));
        for bad in [
            "/",
            "/p/kms/xks/v1",
            "/p/kms/xks/v1/",
            "/p/kms/xks/v1/keys//encrypt",
            "/p/kms/xks/v1/keys/k/sign",
            "/p/kms/xks/v1/keys/k/encrypt/x",
            "/p/kms/xks/v2/health",
        ] {
            assert_eq!(route(bad), None, "{bad}");
        }
    }
}
