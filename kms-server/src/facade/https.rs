//! What the facades' HTTPS listeners share: the accept loop with its bounds (connections,
//! HTTP/2 streams, handshake and request timeouts), TLS 1.2 and 1.3 over HTTP/1.1 and HTTP/2,
//! the graceful stop, reading a bounded body, and the budget for auditing refused requests.
//! Each facade gives a handler that turns one request into one answer.

use std::future::Future;
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;

/// Connections served at once; more wait, unaccepted, in the kernel's backlog. A cloud keeps a
/// few hundred at most.
const MAX_CONNECTIONS: usize = 1024;
/// Requests in flight on one HTTP/2 connection.
const MAX_STREAMS: u32 = 32;
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a request's headers, and then its body, may take (AWS gives a whole call 250 ms):
/// a client that sends slowly holds nothing for long.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The answer type of every facade.
pub type Answer = Response<Full<Bytes>>;

/// What an answer was, for the facade's activity in `kmsctl status`: a call of the API
/// answered, or refused with this message. Answers without it (a load balancer's ping, a CORS
/// preflight) are not counted.
#[derive(Debug, Clone)]
pub enum Outcome {
    Answered,
    Refused(String),
}

/// `answer`, noted as `outcome`.
pub fn noted(mut answer: Answer, outcome: Outcome) -> Answer {
    answer.extensions_mut().insert(outcome);
    answer
}

/// Serves `handler` on `listener` (`name` in logs and in the activity `kms` counts) until
/// `shutdown`; then closes idle connections, lets the requests in flight finish within `grace`,
/// and returns (dropping every handle on the audit writer the handler held).
pub async fn serve<H, F>(
    name: &'static str,
    kms: Arc<crate::service::Kms>,
    listener: TcpListener,
    tls: rustls::ServerConfig,
    handler: H,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    grace: std::time::Duration,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Answer> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (acceptor, handler, mut stop, kms) = (acceptor.clone(), handler.clone(), shutdown.clone(), kms.clone());
        connections.spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(listener = name, %peer, "TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |request| {
                let (answer, kms) = (handler(request), kms.clone());
                async move {
                    let answer = answer.await;
                    match answer.extensions().get::<Outcome>() {
                        Some(Outcome::Answered) => kms.facade_answered(name, None),
                        Some(Outcome::Refused(why)) => kms.facade_answered(name, Some(why)),
                        None => {}
                    }
                    Ok::<_, std::convert::Infallible>(answer)
                }
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
                tracing::debug!(listener = name, %peer, error = %e, "connection ended");
            }
        });
    }
    if tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(listener = name, ?grace, "requests still in flight after the grace period; stopping without them");
    }
    connections.shutdown().await;
}

/// An answer with `status` and a JSON `body`.
pub fn json(status: StatusCode, body: Vec<u8>) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

/// Why a request's body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Over the limit, or broken off.
    TooLarge,
    /// Not all there within `REQUEST_TIMEOUT`.
    Late,
}

/// Reads a request's whole body, at most `max` bytes. Read before any answer, whatever the
/// answer: answering before it is read resets an HTTP/2 stream.
pub async fn body(body: Incoming, max: usize) -> Result<Bytes, BodyError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, Limited::new(body, max).collect()).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(_)) => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Late),
    }
}

/// The audit of requests refused before they reached the service (a bad signature or token):
/// anyone who reaches a public listener can send them, so each is recorded only within a
/// budget (20 a second, bursts of 100), and the record after a spell over it says how many
/// were not recorded one by one.
#[derive(Debug)]
pub struct RefusalLog {
    budget: std::sync::Mutex<(crate::domain::rate::RateLimiter, u64)>,
}

impl Default for RefusalLog {
    fn default() -> Self {
        let limit = crate::domain::rate::RateLimit { per_second: 20.0, burst: 100.0 };
        RefusalLog { budget: std::sync::Mutex::new((crate::domain::rate::RateLimiter::new(limit), 0)) }
    }
}

impl RefusalLog {
    /// Records the refusal of `operation` (why: `reason`) as `unauthenticated` in the audit
    /// trail, off the data workers, if the budget allows; otherwise counts it for the next.
    pub async fn record(&self, shared: &crate::api::Shared, operation: &'static str, reason: &str) {
        let admitted = {
            let mut guard = self.budget.lock().unwrap_or_else(|p| p.into_inner());
            let (budget, unrecorded) = &mut *guard;
            match budget.take("refusals", std::time::Instant::now()) {
                Ok(()) => Some(std::mem::take(unrecorded)),
                Err(_) => {
                    *unrecorded += 1;
                    None
                }
            }
        };
        if let Some(unrecorded) = admitted {
            let detail = match unrecorded {
                0 => reason.to_string(),
                n => format!("{reason} ({n} refusals before this one not recorded one by one)"),
            };
            shared.refusal(operation, "unauthenticated", tonic::Status::unauthenticated(detail)).await;
        }
    }
}

/// How long an outgoing call may take, connection and TLS included.
const OUTGOING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The largest answer an outgoing call reads.
const MAX_OUTGOING_ANSWER: usize = 256 * 1024;

/// An outgoing HTTPS call: `GET url`, or `POST url` with a JSON `body` and `headers`, trusting
/// the CA certificates of `ca_file` only; the answer's status and body. Errors say what failed,
/// never with the body sent.
pub async fn call(ca_file: &std::path::Path, url: &str, body: Option<Vec<u8>>, headers: &[(&str, String)]) -> Result<(StatusCode, Bytes), String> {
    let rest = url.strip_prefix("https://").ok_or_else(|| format!("{url}: only https:// URLs are called"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse::<u16>().map_err(|_| format!("{url}: a bad port"))?),
        None => (authority, 443),
    };
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|_| format!("{url}: a bad host name"))?;
    let config = crate::tls::client_config(ca_file)?;
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| format!("connecting to {authority}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| format!("TLS with {authority}: {e}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.map_err(|e| format!("HTTP with {authority}: {e}"))?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(if body.is_some() { hyper::Method::POST } else { hyper::Method::GET })
            .uri(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let request = request.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| format!("{url}: {e}"))?;
        let answer = sender.send_request(request).await.map_err(|e| format!("calling {url}: {e}"))?;
        let status = answer.status();
        let body = Limited::new(answer.into_body(), MAX_OUTGOING_ANSWER).collect().await.map_err(|e| format!("reading {url}'s answer: {e}"))?;
        Ok((status, body.to_bytes()))
    };
    tokio::time::timeout(OUTGOING_TIMEOUT, work).await.map_err(|_| format!("{url} did not answer within {OUTGOING_TIMEOUT:?}"))?
}
