//! A channel to one plane of the service over one or several endpoints (the nodes of a
//! cluster): `https://kms1:7400,https://kms2:7400`, or a DNS name that resolves to several
//! addresses. Each call goes to the current endpoint; a connection error, or an UNAVAILABLE
//! answer (a node that lost its database or its HSM fails closed), moves the channel on to the
//! next one, so that the caller's retry (see [`crate::RetryPolicy`]) lands on another node.
//! Nothing is retried here: whether a call may be sent again is the caller's to say.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::transport::Endpoint;

use crate::{Error, Tls};

/// The gRPC status code of UNAVAILABLE, as it appears in a trailers-only answer's headers.
const UNAVAILABLE: &str = "14";

/// A channel over one or several endpoints of the same plane; cheap to clone (clones share the
/// endpoints and which one is current). Build it with [`crate::channel`].
#[derive(Clone)]
pub struct Channel {
    inner: Arc<Inner>,
}

struct Inner {
    /// Each endpoint as given (or the address a name resolved to), and its channel.
    endpoints: Vec<(String, tonic::transport::Channel)>,
    current: AtomicUsize,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("endpoints", &self.endpoints()).field("current", &self.current()).finish()
    }
}

impl Channel {
    /// Every endpoint, in the order calls fail over.
    pub fn endpoints(&self) -> Vec<&str> {
        self.inner.endpoints.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// The endpoint the next call goes to.
    pub fn current(&self) -> &str {
        &self.inner.endpoints[self.inner.current.load(Ordering::Relaxed) % self.inner.endpoints.len()].0
    }

    /// Moves on from endpoint `failed` (unless another call already has).
    fn failed(&self, failed: usize) {
        let next = (failed + 1) % self.inner.endpoints.len();
        let _ = self.inner.current.compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Opens a channel to `endpoints`: a comma-separated list of `http(s)://host:port` URLs,
    /// each host a name (every address it resolves to becomes an endpoint; the TLS certificate
    /// is checked against the name) or an address. The first endpoint that accepts a
    /// connection is the current one; with several, one that answers its health check
    /// NOT_SERVING is passed over while another serves. The others are connected on first use.
    pub async fn connect(endpoints: &str, tls: &Tls) -> Result<Channel, Error> {
        let mut resolved = Vec::new();
        for url in endpoints.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            resolved.extend(resolve(url, tls).await?);
        }
        if resolved.is_empty() {
            return Err(Error::Config(format!("no endpoint in {endpoints:?}")));
        }
        let several = resolved.len() > 1;
        let mut last_error = None;
        let mut not_serving = None;
        let mut channels = Vec::with_capacity(resolved.len());
        let mut current = None;
        for (name, endpoint) in resolved {
            let channel = match current {
                Some(_) => endpoint.connect_lazy(),
                None => match endpoint.connect().await {
                    Ok(channel) => {
                        if !several || serving(&channel).await {
                            current = Some(channels.len());
                        } else {
                            not_serving.get_or_insert(channels.len());
                        }
                        channel
                    }
                    Err(e) => {
                        last_error = Some(e);
                        endpoint.connect_lazy()
                    }
                },
            };
            channels.push((name, channel));
        }
        let Some(current) = current.or(not_serving) else {
            return Err(last_error.map_or_else(|| Error::Config("no endpoint".into()), Error::from));
        };
        Ok(Channel { inner: Arc::new(Inner { endpoints: channels, current: AtomicUsize::new(current) }) })
    }
}

/// One URL's endpoints: one per address its host name resolves to, or the URL itself when the
/// host is an address.
async fn resolve(url: &str, tls: &Tls) -> Result<Vec<(String, Endpoint)>, Error> {
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| Error::Config(format!("endpoint {url:?}: {e}")))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(Error::Config(format!("endpoint {url:?} is not an http(s) URL"))),
    };
    let host = uri.host().ok_or_else(|| Error::Config(format!("endpoint {url:?} names no host")))?.trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    // `domain`: the name the server's certificate must carry, when the URL holds an address.
    let endpoint = |url: String, domain: Option<&str>| -> Result<Endpoint, Error> {
        let mut ep = Endpoint::from_shared(url)?.connect_timeout(std::time::Duration::from_secs(5));
        if https {
            let config = tls.config()?;
            ep = ep.tls_config(match domain {
                Some(name) => config.domain_name(name),
                None => config,
            })?;
        }
        Ok(ep)
    };
    let addresses: Vec<std::net::SocketAddr> = match host.parse::<std::net::IpAddr>() {
        Ok(_) => Vec::new(),
        Err(_) => {
            tokio::net::lookup_host((host, port)).await.map_err(|e| Error::Config(format!("endpoint {url:?}: cannot resolve {host}: {e}")))?.collect()
        }
    };
    if addresses.len() < 2 {
        // An address, or a name with one: the URL as it is.
        return Ok(vec![(url.to_string(), endpoint(url.to_string(), None)?)]);
    }
    let scheme = if https { "https" } else { "http" };
    addresses.into_iter().map(|a| Ok((format!("{url} ({a})"), endpoint(format!("{scheme}://{a}"), Some(host))?))).collect()
}

/// Whether the endpoint's health service says it serves (a node without its database or HSM
/// says NOT_SERVING); an endpoint without a health service, or that fails to answer, counts
/// as serving, and its calls will say what is wrong.
async fn serving(channel: &tonic::transport::Channel) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: String::new() });
    request.set_timeout(std::time::Duration::from_secs(2));
    health.check(request).await.map_or(true, |r| r.into_inner().status != ServingStatus::NotServing as i32)
}

impl Service<Request<Body>> for Channel {
    type Response = Response<Body>;
    type Error = tonic::transport::Error;
    type Future = BoxFuture<Response<Body>, tonic::transport::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call readies the channel it goes to.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let this = self.clone();
        let used = this.inner.current.load(Ordering::Relaxed) % this.inner.endpoints.len();
        let mut channel = this.inner.endpoints[used].1.clone();
        Box::pin(async move {
            let answer = async {
                std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
                channel.call(request).await
            }
            .await;
            let unavailable = match &answer {
                Err(_) => true,
                Ok(response) => response.headers().get("grpc-status").is_some_and(|s| s == UNAVAILABLE),
            };
            if unavailable {
                this.failed(used);
            }
            answer
        })
    }
}
