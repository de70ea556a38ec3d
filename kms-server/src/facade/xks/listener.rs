//! The XKS listener: HTTPS (TLS 1.2 and 1.3, HTTP/1.1 and HTTP/2), the four routes of the XKS
//! Proxy API under each key store's URI prefix, SigV4, and every call through the same
//! `Shared::call` as gRPC's: the worker pool, the HSM deadline, the revocation epoch, and the
//! audit record (with the whole `requestMetadata`) durable before the answer leaves.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use super::auth;
use super::framing;
use super::wire::{self, Call, ErrorName, XksError};
use crate::api::{Audit, DECRYPT_FAILED, Shared, Who};
use crate::domain::ids::KeyId;
use crate::domain::policy::Operation;
use crate::error::Error;
use crate::service::xks::{KEY_USAGE_REFUSED, metadata_context};

/// The path every route starts with after the key store's prefix.
const API: &str = "/kms/xks/v1";

/// Connections served at once; more wait, unaccepted. AWS KMS keeps a few hundred at most.
const MAX_CONNECTIONS: usize = 1024;
/// Requests in flight on one HTTP/2 connection.
const MAX_STREAMS: u32 = 32;
/// How long a TLS handshake, a request's headers, or its body may take (AWS gives a call 250
/// ms in all): a client that sends slowly holds nothing for long.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the listener's connections share.
struct State {
    shared: Shared,
    refusals: std::sync::Mutex<RefusalLog>,
}

/// The audit of requests refused for their signature: anyone who reaches the listener can send
/// them, so each is recorded only within a budget (20 a second, bursts of 100), and the
/// record after a spell over it says how many were not recorded one by one.
struct RefusalLog {
    budget: crate::domain::rate::RateLimiter,
    unrecorded: u64,
}

impl Default for RefusalLog {
    fn default() -> Self {
        let limit = crate::domain::rate::RateLimit { per_second: 20.0, burst: 100.0 };
        RefusalLog { budget: crate::domain::rate::RateLimiter::new(limit), unrecorded: 0 }
    }
}

impl RefusalLog {
    /// Whether to record this refusal, and how many before it were not.
    fn admit(&mut self) -> Option<u64> {
        match self.budget.take("xks", std::time::Instant::now()) {
            Ok(()) => Some(std::mem::take(&mut self.unrecorded)),
            Err(_) => {
                self.unrecorded += 1;
                None
            }
        }
    }
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

/// Serves the XKS API on `listener` until `shutdown`; then closes idle connections, lets the
/// requests in flight finish within `grace`, and returns (dropping every handle on the audit
/// writer it held).
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    shared: Shared,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    grace: std::time::Duration,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let state = Arc::new(State { shared, refusals: std::sync::Mutex::new(RefusalLog::default()) });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // A connection past the limit waits here, unaccepted, in the kernel's backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "XKS listener: accept failed");
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (acceptor, state, mut stop) = (acceptor.clone(), state.clone(), shutdown.clone());
        connections.spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "XKS listener: TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "XKS listener: TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&state, request).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(REQUEST_TIMEOUT);
            builder.http2().timer(hyper_util::rt::TokioTimer::new()).max_concurrent_streams(MAX_STREAMS);
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            let stopping = tokio::select! {
                served = connection.as_mut() => Err(served),
                stopped = stop.wait_for(|stop| *stop) => Ok(stopped.is_ok()),
            };
            let served = match stopping {
                Err(served) => served,
                Ok(_) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "XKS connection ended");
            }
        });
    }
    if tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(?grace, "XKS requests still in flight after the grace period; stopping without them");
    }
    connections.shutdown().await;
}

fn answer(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

fn error(e: &XksError) -> Response<Full<Bytes>> {
    answer(StatusCode::from_u16(e.name.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), e.body())
}

/// One request: its route, its body, its signature, then the call.
async fn handle(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let shared = &state.shared;
    // The body first, whatever the answer: answering before it is read resets an HTTP/2 stream.
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(REQUEST_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(_)) => return error(&XksError::new(ErrorName::UnsupportedOperation, format!("the request body is over {MAX_BODY} bytes or broken"))),
        Err(_) => return error(&XksError::new(ErrorName::Validation, "the request body did not arrive in time")),
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
            let admitted = state.refusals.lock().unwrap_or_else(|p| p.into_inner()).admit();
            if let Some(unrecorded) = admitted {
                let detail = match unrecorded {
                    0 => e.message().to_string(),
                    n => format!("{} ({n} refusals before this one not recorded one by one)", e.message()),
                };
                shared.refusal(route.operation(), "unauthenticated", tonic::Status::unauthenticated(detail)).await;
            }
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
        Ok(body) => answer(StatusCode::OK, body),
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
