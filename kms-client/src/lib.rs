//! A typed Rust client for the key management service, and envelope-encryption helpers.
//!
//! The data plane ([`DataClient`]) gives workloads data keys and small-secret encryption; the
//! admin plane (`kms_proto::v1::key_management_client`) is what `kmsctl` drives. Data keys come
//! back in [`DataKey`], which wipes itself when dropped.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kms_client::{DataClient, Tls};
//! let tls = Tls::dev(std::path::Path::new(".kms-dev/pki"));
//! let mut kms = DataClient::connect("https://127.0.0.1:7400", &tls).await?;
//! let ctx = [("tenant".to_string(), "acme".to_string())].into();
//! let (data_key, wrapped) = kms.generate_data_key("alias/app", &ctx).await?;
//! // ... encrypt with data_key.expose_secret(), store `wrapped` beside the ciphertext ...
//! let again = kms.decrypt_data_key(&wrapped, &ctx).await?;
//! assert_eq!(again.expose_secret(), data_key.expose_secret());
//! # Ok(()) }
//! ```

pub mod cache;
pub mod config;
pub mod envelope;
mod failover;
pub mod totp;

pub use cache::{CacheLimits, DataKeyCache};
pub use config::ClientConfig;
pub use failover::Channel;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex, MutexGuard};

pub use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use zeroize::Zeroizing;

/// A data key in clear, wiped on drop; `Debug` shows only its length.
pub struct DataKey(pub(crate) Zeroizing<Vec<u8>>);

impl DataKey {
    /// Takes ownership of key bytes (wiped when the `DataKey` is dropped).
    pub fn from_vec(bytes: Vec<u8>) -> DataKey {
        DataKey(Zeroizing::new(bytes))
    }

    /// The key's bytes, for the local cipher.
    ///
    /// ```
    /// let key = kms_client::DataKey::from_vec(vec![1; 32]);
    /// assert_eq!(key.expose_secret().len(), 32);
    /// assert_eq!(format!("{key:?}"), "DataKey(<32 bytes>)");
    /// ```
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKey(<{} bytes>)", self.0.len())
    }
}

/// A client error: a transport failure, a gRPC status, or a bad envelope.
#[derive(Debug)]
pub enum Error {
    Transport(tonic::transport::Error),
    Status(tonic::Status),
    Envelope(envelope::EnvelopeError),
    /// `--context` pairs that the envelope does not carry.
    ContextMismatch,
    /// A client setting that cannot be used (a missing certificate file, ...).
    Config(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Transport(e) => write!(f, "cannot reach the service: {e}"),
            Error::Status(s) => write!(f, "{:?}: {}", s.code(), s.message()),
            Error::Envelope(e) => e.fmt(f),
            Error::ContextMismatch => f.write_str("the envelope's encryption context does not contain the expected pairs"),
            Error::Config(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for Error {}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Status(s)
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Self {
        Error::Transport(e)
    }
}

impl From<envelope::EnvelopeError> for Error {
    fn from(e: envelope::EnvelopeError) -> Self {
        Error::Envelope(e)
    }
}

/// TLS settings of a client: the CA that issued the server's certificate, and for the data plane
/// the workload's own certificate and key (mutual TLS).
#[derive(Debug, Clone, Default)]
pub struct Tls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Tls {
    /// The development PKI that `kms-server dev` writes to `DATA_DIR/pki`.
    ///
    /// ```
    /// let tls = kms_client::Tls::dev(std::path::Path::new(".kms-dev/pki"));
    /// assert!(tls.ca.unwrap().ends_with("ca.pem"));
    /// ```
    pub fn dev(pki_dir: &Path) -> Tls {
        Tls { ca: Some(pki_dir.join("ca.pem")), cert: Some(pki_dir.join("workload.pem")), key: Some(pki_dir.join("workload.key")) }
    }

    fn config(&self) -> Result<ClientTlsConfig, Error> {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())));
        let ca = self.ca.as_ref().ok_or_else(|| Error::Config("an https endpoint needs the CA certificate (--ca or --pki)".into()))?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => config = config.identity(Identity::from_pem(read(cert)?, read(key)?)),
            (None, None) => {}
            _ => return Err(Error::Config("a client certificate needs its key, and a key its certificate".into())),
        }
        Ok(config)
    }
}

/// Adds an officer's session token (`authorization: Bearer TOKEN`) to every admin-plane call.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// `None` (no session) sends no header; the service then answers UNAUTHENTICATED.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kms_client::Error> {
    /// use kms_client::pb::key_management_client::KeyManagementClient;
    /// let tls = kms_client::Tls::dev(std::path::Path::new(".kms-dev/pki"));
    /// let channel = kms_client::channel("https://127.0.0.1:7401", &tls).await?;
    /// let session = std::fs::read_to_string("session-token").unwrap_or_default();
    /// let mut admin = KeyManagementClient::with_interceptor(channel, kms_client::Bearer::new(Some(&session))?);
    /// let keys = admin.list_keys(kms_client::pb::ListKeysRequest::default()).await?.into_inner();
    /// # let _ = keys;
    /// # Ok(()) }
    /// ```
    pub fn new(token: Option<&str>) -> Result<Bearer, Error> {
        token
            .map(|t| format!("Bearer {}", t.trim()).parse().map_err(|_| Error::Config("the session token is not valid text".into())))
            .transpose()
            .map(Bearer)
    }
}

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// An admin-plane channel that carries the officer's session.
pub type AdminChannel = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// Opens a channel to one plane over one or several endpoints, comma-separated (`https://`
/// endpoints use `tls`), for the generated clients in [`pb`] (example at [`Bearer::new`]).
/// Calls fail over between the endpoints: see [`Channel`].
pub async fn channel(endpoints: &str, tls: &Tls) -> Result<Channel, Error> {
    Channel::connect(endpoints, tls).await
}

/// How `DataClient` retries: calls that failed on the service's side for now (UNAVAILABLE, or
/// RESOURCE_EXHAUSTED with its `retry-after-ms` hint), or whose connection broke before an
/// answer came (a node killed while the request was sent: the channel has moved on to the next
/// endpoint), are tried again with exponential backoff; every attempt has a deadline. Nothing
/// else is retried: a refusal is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1: no retry).
    pub attempts: u32,
    /// The wait before the second attempt; it doubles for each later one.
    pub backoff: std::time::Duration,
    /// The deadline of each attempt (sent to the server as `grpc-timeout`).
    pub timeout: std::time::Duration,
}

impl Default for RetryPolicy {
    /// Three attempts, 50 ms then 100 ms apart, 5 s each: a workload's hot path rides out an HSM
    /// session being replaced or a rate limit without stalling for long.
    fn default() -> Self {
        RetryPolicy { attempts: 3, backoff: std::time::Duration::from_millis(50), timeout: std::time::Duration::from_secs(5) }
    }
}

impl RetryPolicy {
    /// Runs `call` under the policy. `call` makes a fresh request each time, with the attempt's
    /// timeout.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// let policy = kms_client::RetryPolicy { attempts: 3, backoff: Duration::from_millis(1), timeout: Duration::from_secs(1) };
    /// let mut calls = 0;
    /// let answer = policy
    ///     .run(|_timeout| {
    ///         calls += 1;
    ///         let n = calls;
    ///         async move { if n < 3 { Err(tonic::Status::unavailable("HSM busy")) } else { Ok(n) } }
    ///     })
    ///     .await;
    /// assert_eq!(answer.unwrap(), 3, "two UNAVAILABLE answers were retried");
    /// let refused = policy.run(|_| async { Err::<(), _>(tonic::Status::permission_denied("no grant")) }).await;
    /// assert_eq!(refused.unwrap_err().code(), tonic::Code::PermissionDenied, "a refusal is final");
    /// # }
    /// ```
    pub async fn run<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(std::time::Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut wait = self.backoff;
        let mut attempt = 1;
        loop {
            match call(self.timeout).await {
                Err(s) if attempt < self.attempts && retryable(&s) => {
                    // The server's hint, when it gives one, is the least to wait.
                    let hint = s.metadata().get("retry-after-ms").and_then(|v| v.to_str().ok()?.parse().ok()).map(std::time::Duration::from_millis);
                    tokio::time::sleep(hint.map_or(wait, |h| h.max(wait))).await;
                    wait *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// Whether another attempt may pass: the service said so, or the connection broke under the
/// call (tonic answers `UNKNOWN` "transport error" with the transport's error as the source).
fn retryable(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted)
        || std::error::Error::source(s).is_some_and(|e| e.is::<tonic::transport::Error>())
}

/// A request with a deadline.
fn timed<T>(message: T, timeout: std::time::Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// The data-plane client.
#[derive(Debug, Clone)]
pub struct DataClient {
    pub raw: CryptoClient<Channel>,
    /// Retries of `generate_data_key` and `decrypt_data_key` (and so of the envelope helpers).
    pub retry: RetryPolicy,
    /// The data-key cache of the envelope helpers, shared by clones; `None` (the default) asks
    /// the service for every envelope.
    cache: Option<Arc<Mutex<DataKeyCache>>>,
}

fn to_map(ctx: &BTreeMap<String, String>) -> HashMap<String, String> {
    ctx.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl DataClient {
    /// Connects to the data plane with mutual TLS (or see [`ClientConfig::connect`]).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kms_client::Error> {
    /// let tls = kms_client::Tls {
    ///     ca: Some("/etc/kms-client/ca.pem".into()),
    ///     cert: Some("/etc/kms-client/workload.pem".into()),
    ///     key: Some("/etc/kms-client/workload.key".into()),
    /// };
    /// let mut kms = kms_client::DataClient::connect("https://kms.example:7400", &tls).await?;
    /// kms.retry.attempts = 5; // ride out longer HSM hiccups
    /// # Ok(()) }
    /// ```
    pub async fn connect(endpoint: &str, tls: &Tls) -> Result<DataClient, Error> {
        Ok(DataClient { raw: CryptoClient::new(channel(endpoint, tls).await?), retry: RetryPolicy::default(), cache: None })
    }

    /// Turns on the data-key cache of `encrypt_stream` and `decrypt_stream` (see [`cache`]).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kms_client::Error> {
    /// # let tls = kms_client::Tls::dev(std::path::Path::new(".kms-dev/pki"));
    /// let mut kms = kms_client::DataClient::connect("https://127.0.0.1:7400", &tls)
    ///     .await?
    ///     .with_cache(kms_client::CacheLimits::default());
    /// let ctx = [("tenant".to_string(), "acme".to_string())].into();
    /// for part in [&b"one"[..], b"two"] {
    ///     // One GenerateDataKey for both envelopes.
    ///     kms.encrypt_stream("alias/app", &ctx, &mut &part[..], &mut Vec::new()).await?;
    /// }
    /// assert_eq!(kms.cache().map(|c| c.len()), Some((1, 0)));
    /// # Ok(()) }
    /// ```
    pub fn with_cache(mut self, limits: CacheLimits) -> Self {
        self.cache = Some(Arc::new(Mutex::new(DataKeyCache::new(limits))));
        self
    }

    /// The cache, when on (example at [`DataClient::with_cache`]).
    pub fn cache(&self) -> Option<MutexGuard<'_, DataKeyCache>> {
        self.cache.as_ref().map(|c| c.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Lets the cache see an answer: its revocation epoch, or a refusal (the key or grant may
    /// just have been revoked), either of which may drop every cached key.
    fn observe<T>(&self, result: &Result<T, tonic::Status>, epoch: impl FnOnce(&T) -> u64) {
        let Some(mut cache) = self.cache() else { return };
        match result {
            Ok(answer) => cache.observe_epoch(epoch(answer)),
            Err(s) if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::FailedPrecondition) => cache.purge(),
            Err(_) => {}
        }
    }

    /// A fresh AES-256 data key and its wrapped form (always from the service). Encrypt with the
    /// key, store the wrapped form beside the ciphertext, drop the key.
    ///
    /// ```no_run
    /// # async fn demo(kms: &mut kms_client::DataClient) -> Result<(), kms_client::Error> {
    /// let ctx = [("object".to_string(), "s3://bucket/report.pdf".to_string())].into();
    /// let (data_key, wrapped) = kms.generate_data_key("alias/app", &ctx).await?;
    /// assert_eq!(data_key.expose_secret().len(), 32);
    /// # let _ = wrapped;
    /// # Ok(()) }
    /// ```
    pub async fn generate_data_key(&mut self, key_id: &str, ctx: &BTreeMap<String, String>) -> Result<(DataKey, Vec<u8>), Error> {
        let raw = &self.raw;
        let result = self
            .retry
            .run(|timeout| {
                let request = pb::GenerateDataKeyRequest {
                    key_id: key_id.to_string(),
                    key_spec: pb::DataKeySpec::Aes256.into(),
                    number_of_bytes: 0,
                    encryption_context: to_map(ctx),
                    caller_context: None,
                };
                let mut raw = raw.clone();
                async move { raw.generate_data_key(timed(request, timeout)).await }
            })
            .await
            .map(tonic::Response::into_inner);
        self.observe(&result, |r| r.revocation_epoch);
        let mut resp = result?;
        let key = DataKey::from_vec(std::mem::take(&mut resp.plaintext));
        Ok((key, std::mem::take(&mut resp.ciphertext_blob)))
    }

    /// Unwraps a data key made by `generate_data_key` (always with the service), under the same
    /// encryption context; any other context is refused.
    ///
    /// ```no_run
    /// # async fn demo(kms: &mut kms_client::DataClient, wrapped: Vec<u8>) -> Result<(), kms_client::Error> {
    /// let ctx = [("object".to_string(), "s3://bucket/report.pdf".to_string())].into();
    /// let data_key = kms.decrypt_data_key(&wrapped, &ctx).await?;
    /// # let _ = data_key;
    /// # Ok(()) }
    /// ```
    pub async fn decrypt_data_key(&mut self, wrapped: &[u8], ctx: &BTreeMap<String, String>) -> Result<DataKey, Error> {
        let raw = &self.raw;
        let result = self
            .retry
            .run(|timeout| {
                let request = pb::DecryptRequest {
                    ciphertext_blob: wrapped.to_vec(),
                    encryption_context: to_map(ctx),
                    key_id: String::new(),
                    caller_context: None,
                };
                let mut raw = raw.clone();
                async move { raw.decrypt(timed(request, timeout)).await }
            })
            .await
            .map(tonic::Response::into_inner);
        self.observe(&result, |r| r.revocation_epoch);
        let mut resp = result?;
        Ok(DataKey::from_vec(std::mem::take(&mut resp.plaintext)))
    }

    /// Envelope-encrypts `input` to `output` under a fresh data key (docs/file-format.md).
    ///
    /// ```no_run
    /// # async fn demo(kms: &mut kms_client::DataClient) -> Result<(), Box<dyn std::error::Error>> {
    /// let ctx = [("file".to_string(), "report.pdf".to_string())].into();
    /// let mut input = std::io::BufReader::new(std::fs::File::open("report.pdf")?);
    /// let mut output = std::fs::File::create("report.pdf.kmse")?;
    /// kms.encrypt_stream("alias/app", &ctx, &mut input, &mut output).await?;
    /// # Ok(()) }
    /// ```
    pub async fn encrypt_stream(
        &mut self,
        key_id: &str,
        ctx: &BTreeMap<String, String>,
        input: &mut impl BufRead,
        output: &mut impl Write,
    ) -> Result<u64, Error> {
        let now = std::time::Instant::now();
        let cached = self.cache().and_then(|mut c| c.for_encryption(key_id, ctx, 0, now));
        let (data_key, wrapped, fresh) = match cached {
            Some((key, wrapped)) => (key, wrapped, false),
            None => {
                let (key, wrapped) = self.generate_data_key(key_id, ctx).await?;
                (Arc::new(key), wrapped, true)
            }
        };
        // Every envelope gets its own random nonce prefix, so a data key reused from the cache
        // never repeats an IV (docs/file-format.md).
        let mut prefix = [0u8; 7];
        aes_gcm::aead::rand_core::RngCore::fill_bytes(&mut aes_gcm::aead::OsRng, &mut prefix);
        let header = envelope::Header::new(ctx.clone(), wrapped.clone(), prefix);
        let written = envelope::seal(&header, data_key.expose_secret(), input, output)?;
        // A stream's length is known only once it is sealed: its bytes count against the entry
        // afterwards (so the byte limit can be passed by at most one envelope).
        if let Some(mut cache) = self.cache() {
            if fresh {
                cache.put_for_encryption(key_id, ctx, data_key, wrapped, written, now);
            } else {
                cache.count_bytes(key_id, ctx, written);
            }
        }
        Ok(written)
    }

    /// Decrypts an envelope. `expected` pairs, if any, must all be in the envelope's context.
    ///
    /// ```no_run
    /// # async fn demo(kms: &mut kms_client::DataClient) -> Result<(), Box<dyn std::error::Error>> {
    /// let expected = [("file".to_string(), "report.pdf".to_string())].into();
    /// let mut input = std::io::BufReader::new(std::fs::File::open("report.pdf.kmse")?);
    /// let mut output = Vec::new();
    /// kms.decrypt_stream(&expected, &mut input, &mut output).await?;
    /// # Ok(()) }
    /// ```
    pub async fn decrypt_stream(
        &mut self,
        expected: &BTreeMap<String, String>,
        input: &mut impl BufRead,
        output: &mut impl Write,
    ) -> Result<u64, Error> {
        let header = envelope::Header::read(input)?;
        if expected.iter().any(|(k, v)| header.context.get(k) != Some(v)) {
            return Err(Error::ContextMismatch);
        }
        let now = std::time::Instant::now();
        let cached = self.cache().and_then(|mut c| c.for_decryption(&header.wrapped_key, &header.context, now));
        let data_key = match cached {
            Some(key) => key,
            None => {
                let key = Arc::new(self.decrypt_data_key(&header.wrapped_key, &header.context).await?);
                if let Some(mut cache) = self.cache() {
                    cache.put_for_decryption(&header.wrapped_key, &header.context, key.clone(), now);
                }
                key
            }
        };
        Ok(envelope::open(&header, data_key.expose_secret(), input, output)?)
    }
}
