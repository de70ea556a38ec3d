//! The CSE listener: HTTPS (`facade::https`), Google Workspace's KACLS calls under the KACLS
//! URL's path, CORS for the Workspace web clients, both tokens checked on every call, and every
//! call through the same `Shared::call` as gRPC's: the worker pool, the HSM deadline, the
//! revocation epoch, and the audit record (the user, role, resource, perimeter and reason)
//! durable before the answer leaves.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use tokio::net::TcpListener;

use super::jwt;
use super::wire::{self, Authentication, Authorization, CseError, Use};
use crate::api::{Audit, DECRYPT_FAILED, Facts, Shared, Who};
use crate::domain::context::EncryptionContext;
use crate::domain::ids::KeyRef;
use crate::domain::policy::Operation;
use crate::error::Error;
use crate::facade::https::{self, Answer, BodyError, RefusalLog};
use crate::secret::SecretBytes;
use crate::service::cse::{Config, DELEGATE_AUDIENCE, PRINCIPAL};
use crate::service::{Caller, Kms};

/// The Workspace web clients' origin: the one origin CORS lets call.
const GOOGLE_ORIGIN: &str = "https://client-side-encryption.google.com";

/// The largest request body read: two tokens of a few KiB, a wrapped key of 1 KiB, a reason.
const MAX_BODY: usize = 64 * 1024;

/// The operations this key service serves (`status`'s `operations_supported`).
const OPERATIONS: [&str; 12] = [
    "wrap",
    "unwrap",
    "rewrap",
    "digest",
    "privilegedwrap",
    "privilegedunwrap",
    "delegate",
    "wrapprivatekey",
    "privatekeydecrypt",
    "privatekeysign",
    "privilegedprivatekeydecrypt",
    "certs",
];

/// How long `certs` answers from what it last read of the HSM.
const CERTS_FOR: std::time::Duration = std::time::Duration::from_secs(300);

/// How often the node that runs the background jobs fetches the issuers' key sets again.
const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
/// The least time between two fetches of an issuer's key set for tokens naming a key it does
/// not hold (a stream of tokens naming made-up keys costs one fetch a minute), and how long a
/// request waits for one.
const REFETCH_AFTER: std::time::Duration = std::time::Duration::from_secs(60);
const REFETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// What the listener's connections share.
struct State {
    shared: Shared,
    refusals: RefusalLog,
    /// This service's signing keys as last read from the HSM, and when.
    certs: tokio::sync::Mutex<Option<(std::time::Instant, Arc<Published>)>>,
    /// When each issuer's key set was last fetched for a token naming a key it did not hold.
    refetched: tokio::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// This service's signing keys as `certs` publishes them: the JWKS document, and the set it
/// checks our own delegated tokens with.
struct Published {
    body: Vec<u8>,
    keys: jsonwebtoken::jwk::JwkSet,
}

/// Serves the CSE API on `listener` until `shutdown` (`https::serve`).
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    shared: Shared,
    shutdown: tokio::sync::watch::Receiver<bool>,
    grace: std::time::Duration,
) {
    let kms = shared.kms.clone();
    let refresher = tokio::spawn(refresh_loop(shared.clone(), shutdown.clone()));
    let state = Arc::new(State { shared, refusals: RefusalLog::default(), certs: Default::default(), refetched: Default::default() });
    let handler = move |request| {
        let state = state.clone();
        async move { handle(&state, request).await }
    };
    https::serve("cse", kms, listener, tls, handler, shutdown, grace).await;
    refresher.abort();
}

/// Fetches the key set of every issuer that has a URL again, every `REFRESH_EVERY`, on the node
/// that runs the background jobs: issuers rotate their signing keys. A token signed with a key
/// the service does not know yet makes the node it reaches fetch its issuer's set at once
/// (`refetch`).
async fn refresh_loop(shared: Shared, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REFRESH_EVERY) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        if shared.kms.leading() {
            for issuer in shared.kms.cse_config().issuers.iter().filter(|i| i.jwks_url.is_some()) {
                if let Err(e) = refresh(&shared, &issuer.iss, issuer.jwks_url.as_deref().unwrap_or_default()).await {
                    tracing::warn!(iss = %issuer.iss, error = %e, "fetching a CSE issuer's key set again failed; the one held stays");
                }
            }
        }
    }
}

/// Fetches `iss`'s key set from `url` and takes it if it changed.
async fn refresh(shared: &Shared, iss: &str, url: &str) -> Result<(), String> {
    let jwks = fetch_jwks(&shared.outgoing_ca, url).await?;
    let (kms, iss) = (shared.kms.clone(), iss.to_string());
    let changed = tokio::task::spawn_blocking(move || kms.refresh_cse_issuer(&iss, &jwks)).await.map_err(|e| e.to_string())?;
    if changed.map_err(|e| e.to_string())? {
        tracing::info!(url, "a CSE issuer published a new key set; it is taken");
    }
    Ok(())
}

/// The JWKS document published at `url`, trusting the CAs of `ca` (`Shared::outgoing_ca`).
pub async fn fetch_jwks(ca: &std::path::Path, url: &str) -> Result<String, String> {
    let (status, body) = https::call(ca, url, None, &[]).await?;
    if !status.is_success() {
        return Err(format!("{url} answered {status}"));
    }
    String::from_utf8(body.to_vec()).map_err(|_| format!("{url} answered something that is not text"))
}

fn error(e: &CseError) -> Answer {
    let answer = https::json(StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), e.body());
    https::noted(answer, https::Outcome::Refused(format!("{} {}", e.code, e.message)))
}

/// One request: CORS, its route, its body, its tokens, then the call.
async fn handle(state: &State, request: Request<Incoming>) -> Answer {
    let google = request.headers().get(header::ORIGIN).is_some_and(|o| o == GOOGLE_ORIGIN);
    let mut answer = route(state, request).await;
    if google {
        let headers = answer.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static(GOOGLE_ORIGIN));
        headers.insert(header::VARY, HeaderValue::from_static("origin"));
    }
    answer
}

async fn route(state: &State, request: Request<Incoming>) -> Answer {
    let (parts, body) = request.into_parts();
    let body = match https::body(body, MAX_BODY).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => return error(&CseError::new(413, format!("the request body is over {MAX_BODY} bytes or broken"))),
        Err(BodyError::Late) => return error(&CseError::new(408, "the request body did not arrive in time")),
    };
    let config = state.shared.kms.cse_config();
    let Some(operation) = config.path_prefix().and_then(|prefix| parts.uri.path().strip_prefix(prefix)).and_then(|rest| rest.strip_prefix('/'))
    else {
        return error(&CseError::new(404, "no key service at this path"));
    };
    let post = match operation {
        "status" | "certs" => false,
        op if OPERATIONS.contains(&op) => true,
        _ => return error(&CseError::new(404, "no such operation")),
    };
    if parts.method == Method::OPTIONS {
        return preflight(&parts);
    }
    let method = if post { Method::POST } else { Method::GET };
    if parts.method != method {
        let mut answer = error(&CseError::new(405, format!("{operation} takes {method} only")));
        answer.headers_mut().insert(header::ALLOW, HeaderValue::from_static(if post { "POST, OPTIONS" } else { "GET, OPTIONS" }));
        return answer;
    }
    let result = match operation {
        "status" => return https::json(StatusCode::OK, status()),
        "certs" => return certs(state).await,
        "wrap" => wrap(state, &config, &body).await,
        "unwrap" => unwrap(state, &config, &body).await,
        "digest" => digest(state, &config, &body).await,
        "rewrap" => rewrap(state, &config, &body).await,
        "privilegedwrap" => privileged_wrap(state, &config, &body).await,
        "delegate" => delegate(state, &config, &body).await,
        "wrapprivatekey" => wrap_private_key(state, &config, &body).await,
        "privatekeydecrypt" => private_key_decrypt(state, &config, &body).await,
        "privatekeysign" => private_key_sign(state, &config, &body).await,
        "privilegedprivatekeydecrypt" => privileged_private_key_decrypt(state, &config, &body).await,
        _ => privileged_unwrap(state, &config, &body).await,
    };
    match result {
        Ok(body) => https::noted(https::json(StatusCode::OK, body), https::Outcome::Answered),
        Err(e) => error(&e),
    }
}

/// The CORS preflight: Google's web clients may POST JSON; any other origin is refused.
fn preflight(parts: &http::request::Parts) -> Answer {
    if parts.headers.get(header::ORIGIN).is_none_or(|o| o != GOOGLE_ORIGIN) {
        return error(&CseError::forbidden("this origin may not call the key service"));
    }
    let mut answer = https::json(StatusCode::NO_CONTENT, Vec::new());
    let headers = answer.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("content-type, authorization"));
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("3600"));
    answer
}

fn status() -> Vec<u8> {
    let status = serde_json::json!({
        "server_type": "KACLS",
        "vendor_id": "client-held-kms",
        "version": env!("CARGO_PKG_VERSION"),
        "name": "kms-server",
        "operations_supported": OPERATIONS,
    });
    status.to_string().into_bytes()
}

/// The public keys that verify the tokens this service signs, as a JWKS.
async fn certs(state: &State) -> Answer {
    match published(state).await {
        Ok(published) => https::json(StatusCode::OK, published.body.clone()),
        Err(e) => error(&e),
    }
}

/// This service's signing keys, read from the HSM at most every `CERTS_FOR`.
async fn published(state: &State) -> Result<Arc<Published>, CseError> {
    let mut cached = state.certs.lock().await;
    if let Some((at, published)) = cached.as_ref()
        && at.elapsed() < CERTS_FOR
    {
        return Ok(published.clone());
    }
    let kms = state.shared.kms.clone();
    match tokio::task::spawn_blocking(move || kms.cse_signing_keys()).await {
        Ok(Ok(keys)) => {
            let jwks = serde_json::json!({ "keys": keys.iter().map(jwt::jwk).collect::<Vec<_>>() });
            let keys = serde_json::from_value(jwks.clone()).map_err(|_| CseError::new(500, "internal error"))?;
            let published = Arc::new(Published { body: json(jwks), keys });
            *cached = Some((std::time::Instant::now(), published.clone()));
            Ok(published)
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reading the signing keys for certs failed");
            Err(CseError::new(503, "the HSM did not give the signing keys; retry later"))
        }
        Err(_) => Err(CseError::new(500, "internal error")),
    }
}

/// Checks the authentication token of a `wrap` or `unwrap`: an identity provider's, or a
/// delegated one this service signed (`delegate`: issued by its own KACLS URL, for
/// `kacls-delegate`, checked with the keys `certs` publishes).
async fn authentication(state: &State, config: &Config, operation: &'static str, jwt: &str) -> Result<Authentication, CseError> {
    let own = config.settings.as_ref().map(|s| s.kacls_url.as_str()).filter(|url| jwt::unverified_issuer(jwt).as_deref() == Some(*url));
    match own {
        None => token(state, operation, "authentication", jwt, &config.authentication).await,
        Some(url) => {
            let ours =
                jwt::Issuer { iss: url.to_string(), audiences: vec![DELEGATE_AUDIENCE.to_string()], keys: published(state).await?.keys.clone() };
            let claims: Authentication = token(state, operation, "authentication", jwt, &[ours]).await?;
            if claims.delegated_to.is_none() || claims.resource_name.is_none() {
                return Err(CseError::unauthenticated("the authentication token names no delegate or resource"));
            }
            Ok(claims)
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Checks a token against the issuers of its kind; a refusal is audited (within the budget:
/// anyone can send tokens) and answered 401. A token naming a key its issuer's set does not
/// hold is checked again after the set is fetched again (`refetch`).
async fn token<C: serde::de::DeserializeOwned>(
    state: &State,
    operation: &'static str,
    which: &str,
    token: &str,
    issuers: &[jwt::Issuer],
) -> Result<C, CseError> {
    let mut verified = jwt::verify(which, token, issuers, unix_now());
    if verified.is_err()
        && let Some(iss) = jwt::unknown_key_issuer(token, issuers)
        && let Some(fresh) = refetch(state, &iss).await
    {
        let issuers: Vec<jwt::Issuer> = issuers.iter().map(|i| if i.iss == iss { fresh.clone() } else { i.clone() }).collect();
        verified = jwt::verify(which, token, &issuers, unix_now());
    }
    match verified {
        Ok(claims) => Ok(claims),
        Err(refused) => {
            state.refusals.record(&state.shared, operation, &refused.0).await;
            Err(CseError::unauthenticated(refused.0))
        }
    }
}

/// Fetches `iss`'s key set again now, unless that was done less than `REFETCH_AFTER` ago (a
/// request meanwhile waits for the fetch under way), and returns the issuer as the service now
/// trusts it; `None` when its set is not fetched from a URL.
async fn refetch(state: &State, iss: &str) -> Option<jwt::Issuer> {
    let mut refetched = state.refetched.lock().await;
    let url = state.shared.kms.cse_config().issuers.iter().find(|i| i.iss == iss)?.jwks_url.clone()?;
    if refetched.get(iss).is_none_or(|at| at.elapsed() >= REFETCH_AFTER) {
        refetched.insert(iss.to_string(), std::time::Instant::now());
        match tokio::time::timeout(REFETCH_TIMEOUT, refresh(&state.shared, iss, &url)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(iss, error = %e, "fetching a CSE issuer's key set for a key it did not hold failed"),
            Err(_) => tracing::warn!(iss, "fetching a CSE issuer's key set for a key it did not hold took too long"),
        }
    }
    let config = state.shared.kms.cse_config();
    config.authentication.iter().chain(&config.authorization).chain(&config.kacls).find(|i| i.iss == iss).cloned()
}

/// What a call records of its caller: the user, their role and delegation, the reason.
fn caller_context(operation: &str, email: &str, authz: Option<&Authorization>, reason: &str) -> String {
    serde_json::json!({
        "kacls_operation": operation,
        "email": email,
        "role": authz.map(|a| a.role.as_str()),
        "email_type": authz.and_then(|a| a.email_type.as_deref()),
        "delegated_to": authz.and_then(|a| a.delegated_to.as_deref()),
        "message_id": authz.and_then(|a| a.message_id.as_deref()),
        "reason": reason,
    })
    .to_string()
}

/// A gRPC status from `Shared::call` as CSE's structured error.
fn cse_error(status: &tonic::Status) -> CseError {
    use tonic::Code;
    let message = status.message();
    match status.code() {
        Code::InvalidArgument if message == DECRYPT_FAILED => {
            CseError::bad_request("wrapped_key does not open for this resource_name and perimeter, or it was altered")
        }
        Code::InvalidArgument => CseError::bad_request(message),
        Code::Unauthenticated => CseError::unauthenticated(message),
        Code::PermissionDenied | Code::FailedPrecondition => CseError::forbidden(message),
        Code::NotFound => CseError::new(404, message),
        Code::ResourceExhausted => CseError::new(429, message),
        Code::DeadlineExceeded | Code::Unavailable => CseError::new(503, message),
        _ => CseError::new(500, message),
    }
}

/// Runs `f` as `operation` by Google Workspace's principal, `caller_context` in its record.
async fn run(
    shared: &Shared,
    operation: &'static str,
    caller_context: String,
    f: impl FnOnce(&Kms, &Caller, &mut Facts) -> Result<Vec<u8>, Error> + Send + 'static,
) -> Result<Vec<u8>, CseError> {
    shared
        .call(operation, Who::Facade(PRINCIPAL.to_string()), Audit::EveryOutcome, move |kms, caller, facts| {
            facts.caller_context = Some(caller_context);
            f(kms, caller, facts)
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| cse_error(&s))
}

/// A refusal of the facade's own (the tokens disagree, a field is malformed) as the service
/// error that `cse_error` turns back into it, so that the call audits it.
fn refused(e: CseError) -> Error {
    match e.code {
        400 => Error::InvalidArgument { field: "request", reason: e.message },
        503 => Error::precondition(e.message),
        _ => Error::PermissionDenied { reason: e.message },
    }
}

fn json(value: serde_json::Value) -> Vec<u8> {
    value.to_string().into_bytes()
}

/// Wraps `dek` for `resource_name` in `perimeter` under the key CSE is set to use.
fn wrap_key(
    kms: &Kms,
    caller: &Caller,
    facts: &mut Facts,
    config: &Config,
    dek: &[u8],
    resource_name: &str,
    perimeter: &str,
) -> Result<Vec<u8>, Error> {
    wrap_under(kms, caller, facts, config, dek, wire::context_pairs(resource_name, perimeter), perimeter)
}

/// Wraps `secret` under the key CSE is set to use, bound to `pairs` (which name `perimeter`),
/// in the envelope that carries the perimeter.
fn wrap_under(
    kms: &Kms,
    caller: &Caller,
    facts: &mut Facts,
    config: &Config,
    secret: &[u8],
    pairs: std::collections::HashMap<String, String>,
    perimeter: &str,
) -> Result<Vec<u8>, Error> {
    let key_id = config.settings.as_ref().map(|s| s.key_id).ok_or_else(|| Error::precondition("Google Workspace CSE is not configured"))?;
    let context = EncryptionContext::new(pairs).map_err(|e| Error::invalid("resource_name", e))?;
    facts.key_id = Some(key_id);
    facts.context = Some(context.clone());
    let proof = kms.authorize(caller, &KeyRef::Id(key_id), Operation::Encrypt, &context)?;
    let encrypted = kms.encrypt(&proof, secret, &context)?;
    facts.key_version = Some(encrypted.key_version);
    Ok(wire::envelope(perimeter, &encrypted.blob))
}

/// The data encryption key in `wrapped` (Base64), if it was wrapped for `resource_name`, and
/// the perimeter it was wrapped in.
fn unwrap_key(kms: &Kms, caller: &Caller, facts: &mut Facts, wrapped: &str, resource_name: &str) -> Result<(SecretBytes, String), Error> {
    let bytes = wire::decode("wrapped_key", wrapped, wire::MAX_WRAPPED_KEY).map_err(refused)?;
    open_under(kms, caller, facts, "wrapped_key", &bytes, |perimeter| wire::context_pairs(resource_name, perimeter))
}

/// What the envelope `bytes` holds, if it was wrapped under the context `pairs` makes of its
/// perimeter, and that perimeter.
fn open_under(
    kms: &Kms,
    caller: &Caller,
    facts: &mut Facts,
    field: &str,
    bytes: &[u8],
    pairs: impl FnOnce(&str) -> std::collections::HashMap<String, String>,
) -> Result<(SecretBytes, String), Error> {
    let (perimeter, blob) =
        wire::open_envelope(bytes).map_err(|_| refused(CseError::bad_request(format!("{field} was not made by this key service"))))?;
    let context = EncryptionContext::new(pairs(&perimeter)).map_err(|e| Error::invalid("resource_name", e))?;
    facts.context = Some(context.clone());
    if let Ok(parsed) = crate::domain::blob::Blob::parse(blob) {
        (facts.key_id, facts.key_version) = (Some(parsed.header.key_id), Some(parsed.header.version));
    }
    let decrypted = kms.decrypt(caller, blob, &context, None)?;
    Ok((decrypted.plaintext, perimeter))
}

fn key_answer(field: &str, key: &[u8]) -> Vec<u8> {
    let encoded = zeroize::Zeroizing::new(B64.encode(key));
    json(serde_json::json!({ field: encoded.as_str() }))
}

async fn wrap(state: &State, config: &Arc<Config>, body: &[u8]) -> Result<Vec<u8>, CseError> {
    let request: wire::WrapRequest = wire::parse(body)?;
    wire::check_reason(&request.reason)?;
    let dek = zeroize::Zeroizing::new(wire::decode("key", request.key.expose_secret(), wire::MAX_KEY)?);
    let authn = authentication(state, config, "CseWrap", request.authentication.expose_secret()).await?;
    let authz: Authorization = token(state, "CseWrap", "authorization", request.authorization.expose_secret(), &config.authorization).await?;
    let context = caller_context("wrap", &authz.email, Some(&authz), &request.reason);
    let config = config.clone();
    run(&state.shared, "CseWrap", context, move |kms, caller, facts| {
        check(&config, Some(&authn), &authz, Use::Wrap)?;
        let perimeter = authz.perimeter_id.as_deref().unwrap_or_default();
        let wrapped = wrap_key(kms, caller, facts, &config, &dek, &authz.resource_name, perimeter)?;
        Ok(json(serde_json::json!({ "wrapped_key": B64.encode(wrapped) })))
    })
    .await
}

/// The checks between the tokens and this service's settings.
fn check(config: &Config, authn: Option<&Authentication>, authz: &Authorization, what: Use) -> Result<(), Error> {
    let settings = config.settings.as_ref().ok_or_else(|| Error::precondition("Google Workspace CSE is not configured"))?;
    wire::check_tokens(authn, authz, what, &settings.kacls_url, settings.guests).map_err(refused)?;
    wire::check_owner(authz, settings.owner_domain.as_deref()).map_err(refused)
}

async fn unwrap(state: &State, config: &Arc<Config>, body: &[u8]) -> Result<Vec<u8>, CseError> {
    let request: wire::UnwrapRequest = wire::parse(body)?;
    wire::check_reason(&request.reason)?;
    let authn = authentication(state, config, "CseUnwrap", request.authentication.expose_secret()).await?;
    let authz: Authorization = token(state, "CseUnwrap", "authorization", request.authorization.expose_secret(), &config.authorization).await?;
    let context = caller_context("unwrap", &authz.email, Some(&authz), &request.reason);
    let config = config.clone();
    run(&state.shared, "CseUnwrap", context, move |kms, caller, facts| {
        check(&config, Some(&authn), &authz, Use::Unwrap)?;
        let (dek, _) = unwrap_key(kms, caller, facts, &request.wrapped_key, &authz.resource_name)?;
        Ok(key_answer("key", dek.expose_secret()))
    })
    .await
}

async fn digest(state: &State, config: &Arc<Config>, body: &[u8]) -> Result<Vec<u8>, CseError> {
    let request: wire::DigestRequest = wire::parse(body)?;
    wire::check_reason(&request.reason)?;
    let authz: Authorization = token(state, "CseDigest", "authorization", request.authorization.expose_secret(), &config.authorization).await?;
    let context = caller_context("digest", &authz.email, Some(&authz), &request.reason);
    let config = config.clone();
    run(&state.shared, "CseDigest", context, move |kms, caller, facts| {
        check(&config, None, &authz, Use::Digest)?;
        let (dek, perimeter) = unwrap_key(kms, caller, facts, &request.wrapped_key, &authz.resource_name)?;
        let hash = wire::resource_key_hash(dek.expose_secret(), &authz.resource_name, &perimeter).map_err(refused)?;
        Ok(json(serde_json::json!({ "resource_key_hash": B64.encode(hash) })))
    })
    .await
}

/// Rewraps a key under the key CSE uses now: one this service wrapped (after an officer
/// changed the key), or, in a migration between key services, one the key service at
/// `original_kacls_url` wrapped, which opens it for this one (its `privilegedunwrap`, with a
/// migration token signed here) if it is one of the settings' migration sources.
async fn rewrap(state: &State, config: &Arc<Config>, body: &[u8]) -> Result<Vec<u8>, CseError> {
    let request: wire::RewrapRequest = wire::parse(body)?;
    wire::check_reason(&request.reason)?;
    let authz: Authorization = token(state, "CseRewrap", "authorization", request.authorization.expose_secret(), &config.authorization).await?;
    let context = caller_context("rewrap", &authz.email, Some(&authz), &request.reason);
    let original = request.original_kacls_url.trim_end_matches('/').to_string();
    let ours = config.settings.as_ref().is_some_and(|s| s.kacls_url == original);
    let fetched = match ours {
        true => None,
        false => Some(open_elsewhere(state, config, &authz, &original, &request).await),
    };
    let config = config.clone();
    run(&state.shared, "CseRewrap", context, move |kms, caller, facts| {
        check(&config, None, &authz, Use::Rewrap)?;
        let (dek, perimeter) = match fetched {
            None => unwrap_key(kms, caller, facts, &request.wrapped_key, &authz.resource_name)?,
            Some(fetched) => (fetched?, authz.perimeter_id.clone().unwrap_or_default()),
        };
        let wrapped = wrap_key(kms, caller, facts, &config, dek.expose_secret(), &authz.resource_name, &perimeter)?;
        let hash = wire::resource_key_hash(dek.expose_secret(), &authz.resource_name, &perimeter).map_err(refused)?;
        Ok(json(serde_json::json!({ "wrapped_key": B64.encode(wrapped), "resource_key_hash": B64.encode(hash) })))
    })
    .await
}

/// The data key in a key the service at `original` wrapped, as it opens it for this one: its
/// `privilegedunwrap`, with a migration token signed here. Only for a migration source the
/// officer named (no call to any other address), and only once the tokens agree.
async fn open_elsewhere(
    state: &State,
    config: &Config,
    authz: &Authorization,
    original: &str,
    request: &wire::RewrapRequest,
) -> Result<SecretBytes, Error> {
    if !config.migrates_from(original) {
        return Err(refused(CseError::forbidden(
            "original_kacls_url is not a migration source of this key service (kmsctl cse configure --migration-source)",
        )));
    }
    check(config, None, authz, Use::Rewrap)?;
    let (kms, from, resource) = (state.shared.kms.clone(), original.to_string(), authz.resource_name.clone());
    let token = tokio::task::spawn_blocking(move || kms.cse_migration_token(&from, &resource))
        .await
        .map_err(|_| Error::precondition("signing the migration token failed"))??;
    let body = serde_json::json!({"authentication": token, "resource_name": authz.resource_name, "wrapped_key": request.wrapped_key,
                                  "reason": request.reason});
    let ca = &state.shared.outgoing_ca;
    let unreachable = |why: String| Error::precondition(format!("the key service at {original} did not open the key: {why}"));
    let (status, answer) =
        https::call(ca, &format!("{original}/privilegedunwrap"), Some(body.to_string().into_bytes()), &[]).await.map_err(unreachable)?;
    let answer: serde_json::Value = serde_json::from_slice(&answer).map_err(|_| unreachable(format!("it answered {status} and no JSON")))?;
    if !status.is_success() {
        let message: String = answer["message"].as_str().unwrap_or_default().chars().take(200).collect();
        return Err(unreachable(format!("it answered {status}: {message}")));
    }
    let key = answer["key"].as_str().ok_or_else(|| unreachable("its answer has no key".into()))?;
    Ok(SecretBytes::new(wire::decode("key", key, wire::MAX_KEY).map_err(refused)?))
}

/// Issues a delegated authentication token: the user of the two tokens lets the authorization
/// token's `delegated_to` wrap and unwrap the keys of its `resource_name` on their behalf (a
/// Google service acting for the user). Signed in the HSM with the key `certs` publishes, valid
/// 15 minutes; `wrap` and `unwrap` take it as an authentication token, for that delegate and
/// that resource only (`wire::check_tokens`), with the delegate's own authorization token.
async fn delegate(state: &State, config: &Arc<Config>, body: &[u8]) -> Result<Vec<u8>, CseError> {
    let request: wire::DelegateRequest = wire::parse(body)?;
    wire::check_reason(&request.reason)?;
    let authn: Authentication = token(state, "CseDelegate", "authentication", request.authentication.expose_secret(), &config.authentication).await?;
    let authz: Authorization = token(state, "CseDelegate", "authorization", request.authorization.expose_secret(), &config.authorization).await?;
    let context = caller_context("delegate", &authz.email, Some(&authz), &request.reason);
    let config = config.clone();
    run(&state.shared, "CseDelegate", context, move |kms, _, facts| {
        check(&config, Some(&authn), &authz, Use::Delegate)?;
        // The record names the resource as a wrap's does.
        let pairs = wire::context_pairs(&authz.resource_name, authz.perimeter_id.as_deref().unwrap_or_default());
        facts.context = Some(EncryptionContext::new(pairs).map_err(|e| Error::invalid("resource_name", e))?);
        let token = kms.cse_delegated_token(&authz.email, authz.delegated_to.as_deref().unwrap_or_default(), &authz.resource_name)?;
        Ok(json(serde_json::json!({ "delegated_authentication": token })))
    })
    .await
}

/// The claims `privilegedunwrap` reads of its authentication token: a user's (the identity
/// provider's) or another key service's migration token.
#[derive(Debug, serde::Deserialize)]
struct PrivilegedClaims {
    iss: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    google_email: Option<String>,
    #[serde(default)]
    kacls_url: Option<String>,
    #[serde(default)]
    resource_name: Option<String>,
}

/// Who a privileged call's authentication token names: the identity provider's `google_email`
/// when it has one, else its `email`.
fn privileged_user(claims: &PrivilegedClaims) -> Result<String, CseError> {
    claims
        .google_email
        .clone()
        .or_else(|| claims.email.clone())
        .ok_or_else(|| CseError::unauthenticated("the authentication token names no user (email)"))
}

fn check_resource_name(resource_name: &str) -> Result<(), CseError> {
    if resource_name.is_empty() || resource_name.len() > wire::MAX_RESOURCE_NAME {
        return Err(CseError::bad_request(format!("resource_name must be 1 to {} bytes", wire::MAX_RESOURCE_NAME)));
    }
    Ok(())
}

/// Wraps on the authentication token alone (no authorization token, no role): a domain
/// administrator's bulk import of existing files into Drive, for a user the settings name
/// (`--privileged-user`, as for `privilegedunwrap`). The key is bound to the resource name and
/// the perimeter the request gives, as `wrap` binds them to the authorization token's.
async fn privileged_wrap(state: &State, config: &Arc<Config>, body: &[u8]) -> Result<Vec<u8>, CseError> {
    let request: wire::PrivilegedWrapRequest = wire::parse(body)?;
    wire::check_reason(&request.reason)?;
    check_resource_name(&request.resource_name)?;
    check_perimeter_id(&request.perimeter_id)?;
    let dek = zeroize::Zeroizing::new(wire::decode("key", request.key.expose_secret(), wire::MAX_KEY)?);
    let claims: PrivilegedClaims =
        token(state, "CsePrivilegedWrap", "authentication", request.authentication.expose_secret(), &config.authentication).await?;
    let who = privileged_user(&claims)?;
    let context = caller_context("privilegedwrap", &who, None, &request.reason);
    let config = config.clone();
    run(&state.shared, "CsePrivilegedWrap", context, move |kms, caller, facts| {
        privileged(&config, &who, "privilegedwrap")?;
        let wrapped = wrap_key(kms, caller, facts, &config, &dek, &request.resource_name, &request.perimeter_id)?;
        Ok(json(serde_json::json!({ "wrapped_key": B64.encode(wrapped) })))
    })
    .await
}

/// Unwraps on the authentication token alone (no authorization token, no role, no perimeter):
/// for a user the settings name (Google's takeout and migration tools), or for another key
/// service migrating keys out of this one (its migration token, from a trusted `kacls` issuer,
/// naming this service and this resource). The resource name must still be the one the key
/// was wrapped for.
async fn privileged_unwrap(state: &State, config: &Arc<Config>, body: &[u8]) -> Result<Vec<u8>, CseError> {
    let request: wire::PrivilegedUnwrapRequest = wire::parse(body)?;
    wire::check_reason(&request.reason)?;
    check_resource_name(&request.resource_name)?;
    let issuers: Vec<jwt::Issuer> = config.authentication.iter().chain(&config.kacls).cloned().collect();
    let claims: PrivilegedClaims = token(state, "CsePrivilegedUnwrap", "authentication", request.authentication.expose_secret(), &issuers).await?;
    let migration = config.kacls.iter().any(|i| i.iss == claims.iss);
    let who = if migration { claims.iss.clone() } else { privileged_user(&claims)? };
    let context = caller_context("privilegedunwrap", &who, None, &request.reason);
    let config = config.clone();
    run(&state.shared, "CsePrivilegedUnwrap", context, move |kms, caller, facts| {
        if migration {
            let ours =
                config.settings.as_ref().is_some_and(|s| claims.kacls_url.as_deref().map(|u| u.trim_end_matches('/')) == Some(s.kacls_url.as_str()));
            if !ours || claims.resource_name.as_deref() != Some(request.resource_name.as_str()) {
                return Err(refused(CseError::forbidden("the migration token is for another key service or resource")));
            }
        } else {
            privileged(&config, &who, "privilegedunwrap")?;
        }
        let (dek, _) = unwrap_key(kms, caller, facts, &request.wrapped_key, &request.resource_name)?;
        Ok(key_answer("key", dek.expose_secret()))
    })
    .await
}

/// Refuses a privileged call (the authentication token alone) unless the settings name its user.
fn privileged(config: &Config, who: &str, operation: &str) -> Result<(), Error> {
    if config.privileged(who) {
        return Ok(());
    }
    Err(refused(CseError::forbidden(format!("this user may not call {operation} (kmsctl cse configure --privileged-user)"))))
}

fn check_perimeter_id(perimeter_id: &str) -> Result<(), CseError> {
    if perimeter_id.len() > wire::MAX_PERIMETER_ID {
        return Err(CseError::bad_request(format!("perimeter_id is at most {} bytes", wire::MAX_PERIMETER_ID)));
    }
    Ok(())
}

/// Wraps a Gmail user's S/MIME private key for Gmail to keep (`wrapprivatekey`): a key service
/// administrator's call (`--privileged-user`), on the authentication token alone. The key is
/// checked (`Kms::cse_user_key`), then wrapped under the key CSE uses, bound to its public
/// key's hash and to the perimeter, so that only a call naming that public key (Gmail's
/// `spki_hash`) opens it.
async fn wrap_private_key(state: &State, config: &Arc<Config>, body: &[u8]) -> Result<Vec<u8>, CseError> {
    let request: wire::WrapPrivateKeyRequest = wire::parse(body)?;
    let text = request.private_key.expose_secret();
    check_perimeter_id(&request.perimeter_id)?;
    let given = if text.trim_start().starts_with("-----BEGIN") {
        // The reference's example escapes the PEM's line breaks once more than JSON needs.
        zeroize::Zeroizing::new(text.replace("\\n", "\n").into_bytes())
    } else {
        zeroize::Zeroizing::new(wire::decode("private_key", text.trim(), wire::MAX_WRAPPED_PRIVATE_KEY)?)
    };
    let claims: PrivilegedClaims =
        token(state, "CseWrapPrivateKey", "authentication", request.authentication.expose_secret(), &config.authentication).await?;
    let who = privileged_user(&claims)?;
    let context = caller_context("wrapprivatekey", &who, None, "");
    let config = config.clone();
    run(&state.shared, "CseWrapPrivateKey", context, move |kms, caller, facts| {
        privileged(&config, &who, "wrapprivatekey")?;
        let (pkcs1, spki_hash) = kms.cse_user_key(&given)?;
        let pairs = wire::private_key_context(&spki_hash, &request.perimeter_id);
        let wrapped = wrap_under(kms, caller, facts, &config, &pkcs1, pairs, &request.perimeter_id)?;
        Ok(json(serde_json::json!({ "wrapped_private_key": B64.encode(wrapped) })))
    })
    .await
}

/// Opens a wrapped private key for the public key `spki_hash` names and runs `op` with it in
/// the HSM.
fn with_private_key(
    kms: &Kms,
    caller: &Caller,
    facts: &mut Facts,
    wrapped: &str,
    spki_hash: &str,
    op: crate::hsm::RsaPrivateOp<'_>,
) -> Result<SecretBytes, Error> {
    let bytes = wire::decode("wrapped_private_key", wrapped, wire::MAX_WRAPPED_PRIVATE_KEY).map_err(refused)?;
    let (pkcs1, _) = open_under(kms, caller, facts, "wrapped_private_key", &bytes, |perimeter| wire::private_key_context(spki_hash, perimeter))
        .map_err(|e| match e {
            Error::DecryptFailed => Error::invalid("wrapped_private_key", "does not open for this spki_hash and perimeter, or it was altered"),
            e => e,
        })?;
    kms.cse_private_key_op(pkcs1.expose_secret(), spki_hash, op)
}

/// Gmail's `privatekeydecrypt`: the user (a `decrypter`) has the content key of a message
/// decrypted with their S/MIME private key, which the authorization token names by its public
/// key's hash.
async fn private_key_decrypt(state: &State, config: &Arc<Config>, body: &[u8]) -> Result<Vec<u8>, CseError> {
    let request: wire::PrivateKeyDecryptRequest = wire::parse(body)?;
    wire::check_reason(&request.reason)?;
    let ciphertext = wire::decode("encrypted_data_encryption_key", &request.encrypted_data_encryption_key, wire::MAX_RSA_CIPHERTEXT)?;
    let decryption = wire::decryption(&request.algorithm, &request.rsa_oaep_label)?;
    let authn = authentication(state, config, "CsePrivateKeyDecrypt", request.authentication.expose_secret()).await?;
    let authz: Authorization =
        token(state, "CsePrivateKeyDecrypt", "authorization", request.authorization.expose_secret(), &config.authorization).await?;
    let context = caller_context("privatekeydecrypt", &authz.email, Some(&authz), &request.reason);
    let config = config.clone();
    run(&state.shared, "CsePrivateKeyDecrypt", context, move |kms, caller, facts| {
        check(&config, Some(&authn), &authz, Use::PrivateKeyDecrypt)?;
        let spki_hash = wire::spki_hash(authz.spki_hash.as_deref(), authz.spki_hash_algorithm.as_deref()).map_err(refused)?;
        let dek = with_private_key(kms, caller, facts, &request.wrapped_private_key, &spki_hash, decryption.op(&ciphertext))?;
        Ok(key_answer("data_encryption_key", dek.expose_secret()))
    })
    .await
}

/// Gmail's `privatekeysign`: the user (a `signer`) has a digest signed with their S/MIME
/// private key.
async fn private_key_sign(state: &State, config: &Arc<Config>, body: &[u8]) -> Result<Vec<u8>, CseError> {
    let request: wire::PrivateKeySignRequest = wire::parse(body)?;
    wire::check_reason(&request.reason)?;
    let digest = wire::sha256_digest(&request.digest)?;
    let signing = wire::signing(&request.algorithm, request.rsa_pss_salt_length)?;
    let authn = authentication(state, config, "CsePrivateKeySign", request.authentication.expose_secret()).await?;
    let authz: Authorization =
        token(state, "CsePrivateKeySign", "authorization", request.authorization.expose_secret(), &config.authorization).await?;
    let context = caller_context("privatekeysign", &authz.email, Some(&authz), &request.reason);
    let config = config.clone();
    run(&state.shared, "CsePrivateKeySign", context, move |kms, caller, facts| {
        check(&config, Some(&authn), &authz, Use::PrivateKeySign)?;
        let spki_hash = wire::spki_hash(authz.spki_hash.as_deref(), authz.spki_hash_algorithm.as_deref()).map_err(refused)?;
        let signature = with_private_key(kms, caller, facts, &request.wrapped_private_key, &spki_hash, signing.op(&digest))?;
        Ok(json(serde_json::json!({ "signature": B64.encode(signature.expose_secret()) })))
    })
    .await
}

/// `privilegedprivatekeydecrypt`: decrypts on the authentication token alone (Google's takeout
/// of encrypted mail), for a user the settings name (`--privileged-user`); the public key's
/// hash comes in the request, and the wrapped key still opens only for it.
async fn privileged_private_key_decrypt(state: &State, config: &Arc<Config>, body: &[u8]) -> Result<Vec<u8>, CseError> {
    let request: wire::PrivilegedPrivateKeyDecryptRequest = wire::parse(body)?;
    wire::check_reason(&request.reason)?;
    let ciphertext = wire::decode("encrypted_data_encryption_key", &request.encrypted_data_encryption_key, wire::MAX_RSA_CIPHERTEXT)?;
    let decryption = wire::decryption(&request.algorithm, &request.rsa_oaep_label)?;
    let spki_hash = wire::spki_hash(Some(&request.spki_hash), request.spki_hash_algorithm.as_deref())?;
    let claims: PrivilegedClaims =
        token(state, "CsePrivilegedPrivateKeyDecrypt", "authentication", request.authentication.expose_secret(), &config.authentication).await?;
    let who = privileged_user(&claims)?;
    let context = caller_context("privilegedprivatekeydecrypt", &who, None, &request.reason);
    let config = config.clone();
    run(&state.shared, "CsePrivilegedPrivateKeyDecrypt", context, move |kms, caller, facts| {
        privileged(&config, &who, "privilegedprivatekeydecrypt")?;
        let dek = with_private_key(kms, caller, facts, &request.wrapped_private_key, &spki_hash, decryption.op(&ciphertext))?;
        Ok(key_answer("data_encryption_key", dek.expose_secret()))
    })
    .await
}
