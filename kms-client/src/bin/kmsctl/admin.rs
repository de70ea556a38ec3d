//! The admin plane's channel: the officer's session on every call, and `--dry-run`.

use std::path::Path;

use base64::Engine;
use kms_client::pb::{DRY_RUN_ANSWER_HEADER as DRY_RUN_ANSWER, DRY_RUN_HEADER as DRY_RUN};
use kms_client::{AdminChannel, Bearer, Error, Tls, channel};

/// `--dry-run`: off, or on with the server's answer (what the call would change) once it came.
#[derive(Clone, Default)]
pub(crate) struct DryRun(Option<std::sync::Arc<std::sync::Mutex<Option<String>>>>);

impl DryRun {
    pub(crate) fn new(on: bool) -> DryRun {
        DryRun(on.then(Default::default))
    }

    pub(crate) fn on(&self) -> bool {
        self.0.is_some()
    }

    pub(crate) fn answer(&self) -> Option<String> {
        self.0.as_ref().and_then(|slot| slot.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The admin-plane channel: the officer's session on every call and, for `--dry-run`, the
/// dry-run request header, keeping the answer's "what would change" for
/// [`Out::print`](crate::output::Out::print).
#[derive(Clone)]
pub(crate) struct Admin {
    inner: AdminChannel,
    dry_run: DryRun,
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;

impl tonic::codegen::Service<HttpRequest> for Admin {
    type Response = <AdminChannel as tonic::codegen::Service<HttpRequest>>::Response;
    type Error = <AdminChannel as tonic::codegen::Service<HttpRequest>>::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: HttpRequest) -> Self::Future {
        for (name, slot) in [(kms_client::pb::REASON_HEADER, &REASON), (kms_client::pb::APPROVAL_HEADER, &APPROVAL)] {
            if let Some(value) = slot.get() {
                request.headers_mut().insert(name, value.clone());
            }
        }
        let slot = self.dry_run.0.clone();
        if slot.is_some() {
            request.headers_mut().insert(DRY_RUN, tonic::codegen::http::HeaderValue::from_static("1"));
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // Binary metadata travels base64-encoded, padded or not (the gRPC spec allows both).
            let answer = response.headers().get(DRY_RUN_ANSWER).and_then(|v| {
                let text = v.to_str().ok()?.trim_end_matches('=');
                base64::engine::general_purpose::STANDARD_NO_PAD.decode(text).ok()
            });
            if let (Some(slot), Some(answer)) = (slot, answer) {
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(String::from_utf8_lossy(&answer).into_owned());
            }
            Ok(response)
        })
    }
}

type Header = std::sync::OnceLock<tonic::codegen::http::HeaderValue>;
/// `--reason` and `--approval`, sent with every admin call of this run.
static REASON: Header = std::sync::OnceLock::new();
static APPROVAL: Header = std::sync::OnceLock::new();

/// Takes `--reason`: printable ASCII, at most 256 characters.
pub(crate) fn set_reason(reason: &str) -> Result<(), Error> {
    set_header(&REASON, "--reason", reason)
}

/// Takes `--approval`: the id of an approved request this run's call runs.
pub(crate) fn set_approval(id: &str) -> Result<(), Error> {
    set_header(&APPROVAL, "--approval", id)
}

fn set_header(slot: &Header, flag: &str, text: &str) -> Result<(), Error> {
    if text.len() > 256 || !text.chars().all(|c| (' '..='~').contains(&c)) {
        return Err(Error::Config(format!("{flag}: at most 256 printable ASCII characters")));
    }
    let value = tonic::codegen::http::HeaderValue::from_str(text).map_err(|_| Error::Config(format!("{flag}: not a header value")))?;
    let _ = slot.set(value);
    Ok(())
}

/// An admin-plane channel carrying the session `kmsctl login` saved, if any.
pub(crate) async fn admin_channel(endpoint: &str, tls: &Tls, session: &Path, dry_run: &DryRun) -> Result<Admin, Error> {
    let token = std::fs::read_to_string(session).ok().map(zeroize::Zeroizing::new);
    let inner =
        tonic::service::interceptor::InterceptedService::new(channel(endpoint, tls).await?, Bearer::new(token.as_deref().map(String::as_str))?);
    Ok(Admin { inner, dry_run: dry_run.clone() })
}
