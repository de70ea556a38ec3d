//! Client settings from a TOML file or the environment, so that a workload's deployment (not
//! its code) says where the service is, which certificates to present, how to retry and
//! whether to cache data keys.
//!
//! ```toml
//! # kms-client.toml
//! endpoint = "https://kms.example:7400"   # the data plane: one URL, or several comma-separated
//! ca_file = "/etc/kms-client/ca.pem"      # the CA that issued the service's certificate
//! cert_file = "/etc/kms-client/workload.pem"
//! key_file = "/etc/kms-client/workload.key"
//! [retry]                                 # optional; these are the defaults
//! attempts = 3
//! backoff_ms = 50
//! timeout_ms = 5000
//! [cache]                                 # optional; no section, no cache
//! max_age_seconds = 60
//! max_messages = 1000
//! max_bytes = 1073741824
//! ```
//!
//! The environment uses the names `kmsctl` reads: `KMS_DATA_ENDPOINT`, `KMS_CA`,
//! `KMS_TLS_CERT`, `KMS_TLS_KEY` (or `KMS_PKI`, a directory holding `ca.pem`, `workload.pem` and
//! `workload.key`), and `KMS_RETRY_ATTEMPTS`, `KMS_TIMEOUT_MS`. [`ClientConfig::load`] reads the
//! file `KMS_CLIENT_CONFIG` names, or else the environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::{CacheLimits, DataClient, Error, RetryPolicy, Tls};

/// Where the service is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The data plane's URL (`https://host:port`).
    pub endpoint: String,
    /// The CA certificate that issued the service's certificate (PEM).
    pub ca_file: Option<PathBuf>,
    /// The workload's client certificate and key for mutual TLS (PEM).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub retry: RetrySettings,
    /// The data-key cache; `None` (no section) leaves it off.
    pub cache: Option<CacheSettings>,
}

/// [`RetryPolicy`] in a file's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    pub attempts: u32,
    pub backoff_ms: u64,
    pub timeout_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        let p = RetryPolicy::default();
        RetrySettings { attempts: p.attempts, backoff_ms: p.backoff.as_millis() as u64, timeout_ms: p.timeout.as_millis() as u64 }
    }
}

/// [`CacheLimits`] in a file's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    pub max_age_seconds: u64,
    pub max_messages: u64,
    pub max_bytes: u64,
    pub capacity: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        let l = CacheLimits::default();
        CacheSettings { max_age_seconds: l.max_age.as_secs(), max_messages: l.max_messages, max_bytes: l.max_bytes, capacity: l.capacity }
    }
}

fn bad(what: impl Into<String>) -> Error {
    Error::Config(what.into())
}

impl ClientConfig {
    /// Reads a TOML file (see the module's documentation).
    ///
    /// ```
    /// # fn main() -> Result<(), kms_client::Error> {
    /// let dir = std::env::temp_dir().join(format!("kms-client-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir).unwrap();
    /// let path = dir.join("kms-client.toml");
    /// std::fs::write(&path, "endpoint = \"https://kms.example:7400\"\nca_file = \"/etc/kms-client/ca.pem\"\n[cache]\nmax_age_seconds = 30\n").unwrap();
    /// let config = kms_client::ClientConfig::from_file(&path)?;
    /// assert_eq!(config.endpoint, "https://kms.example:7400");
    /// assert_eq!(config.retry_policy().attempts, 3);
    /// assert_eq!(config.cache_limits().unwrap().max_age, std::time::Duration::from_secs(30));
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok(()) }
    /// ```
    pub fn from_file(path: &Path) -> Result<ClientConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        let config: ClientConfig = toml::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads the environment (see the module's documentation).
    ///
    /// ```
    /// # fn main() -> Result<(), kms_client::Error> {
    /// // In a real workload the variables come from its deployment; here a lookup stands in.
    /// let vars = |name: &str| match name {
    ///     "KMS_DATA_ENDPOINT" => Some("https://kms.example:7400".to_string()),
    ///     "KMS_PKI" => Some("/etc/kms-client".to_string()),
    ///     _ => None,
    /// };
    /// let config = kms_client::ClientConfig::from_lookup(vars)?;
    /// assert_eq!(config.ca_file.as_deref(), Some(std::path::Path::new("/etc/kms-client/ca.pem")));
    /// # Ok(()) }
    /// ```
    pub fn from_env() -> Result<ClientConfig, Error> {
        ClientConfig::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`from_env`](Self::from_env), with the variables read through `var`.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<ClientConfig, Error> {
        let endpoint = var("KMS_DATA_ENDPOINT").ok_or_else(|| bad("KMS_DATA_ENDPOINT is not set"))?;
        let pki = var("KMS_PKI").map(PathBuf::from);
        let path = |name: &str, file: &str| var(name).map(PathBuf::from).or_else(|| pki.as_ref().map(|d| d.join(file)));
        let number = |name: &str| -> Result<Option<u64>, Error> {
            var(name).map(|v| v.parse().map_err(|_| bad(format!("{name} is not a number: {v:?}")))).transpose()
        };
        let mut retry = RetrySettings::default();
        if let Some(n) = number("KMS_RETRY_ATTEMPTS")? {
            retry.attempts = u32::try_from(n).map_err(|_| bad("KMS_RETRY_ATTEMPTS is too large"))?;
        }
        if let Some(ms) = number("KMS_TIMEOUT_MS")? {
            retry.timeout_ms = ms;
        }
        let config = ClientConfig {
            endpoint,
            ca_file: path("KMS_CA", "ca.pem"),
            cert_file: path("KMS_TLS_CERT", "workload.pem"),
            key_file: path("KMS_TLS_KEY", "workload.key"),
            retry,
            cache: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// The file `KMS_CLIENT_CONFIG` names if it is set, else the environment.
    pub fn load() -> Result<ClientConfig, Error> {
        match std::env::var_os("KMS_CLIENT_CONFIG") {
            Some(path) => ClientConfig::from_file(Path::new(&path)),
            None => ClientConfig::from_env(),
        }
    }

    fn validate(&self) -> Result<(), Error> {
        for endpoint in self.endpoint.split(',').map(str::trim) {
            if !endpoint.starts_with("https://") && !endpoint.starts_with("http://") {
                return Err(bad(format!("endpoint {endpoint:?} is not an http(s) URL")));
            }
        }
        if self.retry.attempts == 0 || self.retry.timeout_ms == 0 {
            return Err(bad("retry.attempts and retry.timeout_ms must be at least 1"));
        }
        if self.cache.is_some_and(|c| c.max_age_seconds == 0 || c.max_messages == 0 || c.max_bytes == 0 || c.capacity == 0) {
            return Err(bad("every cache limit must be at least 1 (leave the [cache] section out for no cache)"));
        }
        Ok(())
    }

    pub fn tls(&self) -> Tls {
        Tls { ca: self.ca_file.clone(), cert: self.cert_file.clone(), key: self.key_file.clone() }
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            attempts: self.retry.attempts,
            backoff: Duration::from_millis(self.retry.backoff_ms),
            timeout: Duration::from_millis(self.retry.timeout_ms),
        }
    }

    pub fn cache_limits(&self) -> Option<CacheLimits> {
        self.cache.map(|c| CacheLimits {
            max_age: Duration::from_secs(c.max_age_seconds),
            max_messages: c.max_messages,
            max_bytes: c.max_bytes,
            capacity: c.capacity,
        })
    }

    /// Connects a [`DataClient`] with these settings.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kms_client::Error> {
    /// let mut kms = kms_client::ClientConfig::load()?.connect().await?;
    /// let ctx = [("tenant".to_string(), "acme".to_string())].into();
    /// let (data_key, wrapped) = kms.generate_data_key("alias/app", &ctx).await?;
    /// # let _ = (data_key, wrapped);
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self) -> Result<DataClient, Error> {
        let mut client = DataClient::connect(&self.endpoint, &self.tls()).await?;
        client.retry = self.retry_policy();
        Ok(match self.cache_limits() {
            Some(limits) => client.with_cache(limits),
            None => client,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_and_every_refusal() {
        let text = "endpoint = \"https://k:7400\"\nca_file = \"ca.pem\"\ncert_file = \"w.pem\"\nkey_file = \"w.key\"\n\
                    [retry]\nattempts = 5\n[cache]\nmax_messages = 10\n";
        let config: ClientConfig = toml::from_str(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.retry_policy().attempts, 5);
        assert_eq!(config.retry_policy().timeout, Duration::from_secs(5), "unset values keep their defaults");
        assert_eq!(config.cache_limits().unwrap().max_messages, 10);
        assert_eq!(config.tls().key.as_deref(), Some(Path::new("w.key")));

        assert!(toml::from_str::<ClientConfig>("endpoint = \"https://k\"\nsurprise = 1\n").is_err(), "unknown settings are refused");
        for broken in
            ["endpoint = \"k:7400\"\n", "endpoint = \"https://k\"\n[retry]\nattempts = 0\n", "endpoint = \"https://k\"\n[cache]\nmax_bytes = 0\n"]
        {
            let config: ClientConfig = toml::from_str(broken).unwrap();
            assert!(config.validate().is_err(), "{broken}");
        }
        let env = |name: &str| (name == "KMS_DATA_ENDPOINT").then(|| "https://k".to_string());
        assert!(ClientConfig::from_lookup(env).unwrap().cache.is_none());
        let env = |name: &str| match name {
            "KMS_DATA_ENDPOINT" => Some("https://k".to_string()),
            "KMS_TIMEOUT_MS" => Some("soon".to_string()),
            _ => None,
        };
        let e = ClientConfig::from_lookup(env).unwrap_err();
        assert!(e.to_string().contains("KMS_TIMEOUT_MS"), "{e}");
        assert!(ClientConfig::from_lookup(|_| None).unwrap_err().to_string().contains("KMS_DATA_ENDPOINT"));
    }
}
