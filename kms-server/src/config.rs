//! Typed configuration. The service refuses to start on anything missing or unsafe, and says
//! which setting is at fault.

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::budget::{DEFAULT_ENCRYPTION_LIMIT, DEFAULT_RESERVATION_BLOCK, DEFAULT_ROTATION_THRESHOLD, UsageLimits};
use crate::secret::Pin;

/// The whole configuration file (`kms-server run --config kms.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Holds the SQLite database (`kms.db`) when `store.backend` is `sqlite`.
    pub data_dir: PathBuf,
    /// The CA certificates (PEM) the service's own HTTPS calls trust (notification webhooks,
    /// Google CSE issuers' key sets, a CSE migration source); the system's bundle by default.
    /// Read at each call, so that a renewed bundle needs no restart.
    #[serde(default = "system_ca_file")]
    pub outgoing_ca_file: PathBuf,
    #[serde(default)]
    pub store: StoreConfig,
    pub hsm: HsmConfig,
    pub listen: ListenConfig,
    pub tls: TlsConfig,
    #[serde(default)]
    pub keys: KeysConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub officers: OfficersConfig,
    /// The AWS external key store proxy (XKS) listener; absent, there is none.
    #[serde(default)]
    pub xks: Option<FacadeListenerConfig>,
    /// Google Workspace client-side encryption's key service (KACLS) listener; absent, there is
    /// none.
    #[serde(default)]
    pub cse: Option<FacadeListenerConfig>,
}

/// Debian's bundle of the system's trusted CAs (`ca-certificates`).
pub fn system_ca_file() -> PathBuf {
    PathBuf::from("/etc/ssl/certs/ca-certificates.crt")
}

/// A cloud facade's listener (`[xks]`, `[cse]`): HTTPS only (TLS 1.2 and 1.3), with its own
/// certificate, since the cloud checks it against public CAs (the planes' certificates come
/// from the customer's CA).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FacadeListenerConfig {
    pub listen: SocketAddr,
    /// The certificate chain the cloud sees (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM, mode 0600 or stricter).
    pub key_file: PathBuf,
}

/// Where the metadata and the audit trail live.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default)]
    pub backend: StoreBackend,
    /// PostgreSQL only: a libpq-style connection string (`host=pg1,pg2 port=5432 dbname=kms
    /// user=kms target_session_attrs=read-write sslmode=verify-full sslrootcert=/etc/kms/pg-ca.pem`).
    pub url: Option<String>,
    /// PostgreSQL only: a file holding the password (mode 0600, like the PIN file).
    pub password_file: Option<PathBuf>,
}

/// The store's engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One SQLite file in `data_dir`: one node (the default, and `kms-server dev`).
    #[default]
    Sqlite,
    /// One PostgreSQL database shared by every node.
    Postgres,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OfficersConfig {
    /// Minutes an officer's session lasts after login (default 15, at most 720).
    pub session_minutes: i64,
}

impl Default for OfficersConfig {
    fn default() -> Self {
        OfficersConfig { session_minutes: 15 }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// A signed checkpoint every this many records (default 1,000)...
    pub checkpoint_every_records: i64,
    /// ...or every this many seconds, whichever comes first (default 60).
    pub checkpoint_every_seconds: i64,
    /// Records older than this many days are removed, up to a signed checkpoint so that the rest
    /// still verifies. 0 (the default) keeps everything; otherwise at least
    /// [`MIN_AUDIT_RETENTION_DAYS`].
    pub retention_days: u32,
    /// The service verifies the whole trail on its own every this many hours (default 24, 1 to
    /// 24: at least daily, which `docs/alerts.yml` expects), and once soon after it starts; each
    /// segment is checked as its checkpoint is signed.
    pub verify_every_hours: u64,
}

/// The shortest audit retention allowed: the framework keeps access logs "at least three months"
/// (order 3-17-25, Level 2; TESTPLAN R13 uses 90 days).
pub const MIN_AUDIT_RETENTION_DAYS: u32 = 90;

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { checkpoint_every_records: 1000, checkpoint_every_seconds: 60, retention_days: 0, verify_every_hours: 24 }
    }
}

/// Per-principal rate limits (a token bucket each).
#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Calls per second each principal (workload or officer) may make, sustained; 0 (the
    /// default) for no limit. AWS KMS's base quota for cryptographic operations, 5,500 per
    /// second, is a reasonable start for a busy workload.
    pub principal_calls_per_second: f64,
    /// Calls a principal may make at once after a quiet spell (default: one second's worth).
    pub principal_burst: Option<f64>,
}

impl LimitsConfig {
    pub fn rate_limit(&self) -> crate::domain::rate::RateLimit {
        let per_second = self.principal_calls_per_second;
        crate::domain::rate::RateLimit { per_second, burst: self.principal_burst.unwrap_or(per_second).max(1.0) }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Seconds between HSM probes (an encryption under the canary key). The health status is
    /// never older than this; AWS's external key store contract allows at most 60 s.
    pub probe_interval_seconds: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { probe_interval_seconds: 10 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// The PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.
    pub module: PathBuf,
    /// The label of the token holding the keys.
    pub token_label: String,
    /// A file holding the user PIN (mode 0600 or stricter). Exactly one of pin_file and pin_env.
    pub pin_file: Option<PathBuf>,
    /// The name of an environment variable holding the user PIN.
    pub pin_env: Option<String>,
    /// Worker sessions in the pool. SoftHSM2's throughput does not grow past the core count
    /// (SOFTHSM-NOTES.md); a network HSM may want more.
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    /// Threads that run data-plane calls (`workers.rs`). Default: one per CPU core, at most
    /// `sessions`, which suits an HSM that is CPU-bound in the process (SoftHSM2); a network HSM,
    /// whose calls mostly wait on the network, wants as many as `sessions`.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Milliseconds a data-plane call may wait for the HSM before it answers DEADLINE_EXCEEDED
    /// ("retry later"); default 2,000 (TESTPLAN R7), 100 to 60,000. AWS's external key store
    /// fails a call after 250 ms end to end, so keep it under that where the HSM allows.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// The most key versions given a *session copy* (ARCHITECTURE.md): SoftHSM2 runs AES-GCM
    /// about three times as fast under a session object as under a token object. Made in the
    /// background with the backup key pair (none without it), about 10 KiB of memory each; a
    /// copy unused for 5 to 10 minutes is evicted. Default 1,024; 0 turns them off (an HSM whose
    /// token objects are as fast gains nothing).
    #[serde(default = "default_session_copies")]
    pub session_copies: usize,
}

impl HsmConfig {
    /// The data-plane worker threads: `workers`, or one per CPU core up to `sessions`.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from).min(self.sessions))
    }
}

fn default_sessions() -> usize {
    4
}

fn default_session_copies() -> usize {
    1024
}

fn default_deadline_ms() -> u64 {
    2000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// The data plane (kms.v1.Crypto).
    pub data: SocketAddr,
    /// The admin plane (kms.v1.KeyManagement).
    pub admin: SocketAddr,
    /// Prometheus metrics over plain HTTP (`GET /metrics`); loopback only, since it has no TLS
    /// (scrape it through a local agent). Absent: no metrics listener.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

/// TLS for both listeners; there is no plaintext mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM), presented on both listeners.
    pub cert_file: PathBuf,
    /// Its private key (PEM, mode 0600 or stricter).
    pub key_file: PathBuf,
    /// The customer's CA (PEM) that issues workload client certificates. The data plane accepts
    /// only certificates it issued; the system's public roots are never trusted.
    pub client_ca_file: PathBuf,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Primary-version encryptions that trigger an automatic rotation (default 2^30).
    pub rotation_threshold: u64,
    /// Encryptions after which a version refuses to encrypt (default and maximum 0.9 * 2^32,
    /// NIST SP 800-38D section 8.3).
    pub encryption_limit: u64,
    /// Encryptions reserved per database write (default 4,096).
    pub usage_reservation_block: u64,
    /// How often due destructions and rotations are carried out (default 60 s).
    pub sweep_interval_seconds: u64,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            rotation_threshold: DEFAULT_ROTATION_THRESHOLD,
            encryption_limit: DEFAULT_ENCRYPTION_LIMIT,
            usage_reservation_block: DEFAULT_RESERVATION_BLOCK,
            sweep_interval_seconds: 60,
        }
    }
}

impl KeysConfig {
    pub fn limits(&self) -> UsageLimits {
        UsageLimits {
            rotation_threshold: self.rotation_threshold,
            encryption_limit: self.encryption_limit,
            reservation_block: self.usage_reservation_block,
        }
    }
}

/// A configuration the service refuses, naming the setting.
#[derive(Debug)]
pub struct ConfigError {
    pub setting: &'static str,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setting, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// The data directory holds the database (keys' metadata, the audit trail, officers' hashes):
/// another user who can write it could replace or delete them. It may not exist yet (the service
/// makes it); if it does, neither group nor others may write it.
fn data_dir_private(dir: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.permissions().mode() & 0o022 != 0 => Err(refuse(
            "data_dir",
            format!("{} is writable by its group or by others (mode {:o}); chmod go-w it", dir.display(), meta.permissions().mode() & 0o777),
        )),
        _ => Ok(()),
    }
}

/// The database and its journal hold the audit trail and the keys' metadata: the service refuses
/// to start on any of them that its group or other accounts may read or write (it makes them
/// mode 0600 itself, `files.rs`).
fn database_private(dir: &Path) -> Result<(), ConfigError> {
    for name in crate::store::DATABASE_FILES {
        let path = dir.join(name);
        if let Some(mode) = crate::files::exposed(&path) {
            return Err(refuse("data_dir", format!("{} is readable or writable by others (mode {mode:o}); chmod 600 it", path.display())));
        }
    }
    Ok(())
}

fn refuse(setting: &'static str, reason: impl fmt::Display) -> ConfigError {
    ConfigError { setting, reason: reason.to_string() }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| refuse("config", format!("{}: {e}", path.display())))?;
        let config: Config = toml::from_str(&text).map_err(|e| refuse("config", format!("{}: {e}", path.display())))?;
        config.validate()?;
        Ok(config)
    }

    /// Every check that does not need the HSM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        data_dir_private(&self.data_dir)?;
        self.validate_store()?;
        if !self.hsm.module.is_file() {
            return Err(refuse("hsm.module", format!("{} is not a file", self.hsm.module.display())));
        }
        if self.hsm.token_label.is_empty() {
            return Err(refuse("hsm.token_label", "is empty"));
        }
        if self.hsm.pin_file.is_some() == self.hsm.pin_env.is_some() {
            return Err(refuse("hsm.pin_file", "exactly one of hsm.pin_file and hsm.pin_env must be set"));
        }
        if let Some(path) = &self.hsm.pin_file {
            pin_file_private("hsm.pin_file", path)?;
        }
        if self.hsm.sessions == 0 || self.hsm.sessions > 256 {
            return Err(refuse("hsm.sessions", "must be 1 to 256"));
        }
        if self.hsm.workers.is_some_and(|n| n == 0 || n > 256) {
            return Err(refuse("hsm.workers", "must be 1 to 256"));
        }
        if !(100..=60_000).contains(&self.hsm.deadline_ms) {
            return Err(refuse("hsm.deadline_ms", "must be 100 to 60,000"));
        }
        if self.hsm.session_copies > 1_000_000 {
            return Err(refuse("hsm.session_copies", "must be 0 to 1,000,000"));
        }
        if self.listen.data == self.listen.admin && self.listen.data.port() != 0 {
            return Err(refuse("listen.admin", "the data and admin planes need separate listeners"));
        }
        if let Some(metrics) = self.listen.metrics
            && !metrics.ip().is_loopback()
        {
            return Err(refuse("listen.metrics", format!("{metrics} is not a loopback address; the metrics listener has no TLS")));
        }
        crate::tls::ServerTls::load(&self.tls.cert_file, &self.tls.key_file, &self.tls.client_ca_file).map_err(|e| refuse("tls", e))?;
        let mut taken = vec![Some(self.listen.data), Some(self.listen.admin), self.listen.metrics];
        for (name, listen, facade) in [("xks", "xks.listen", &self.xks), ("cse", "cse.listen", &self.cse)] {
            let Some(facade) = facade else { continue };
            if facade.listen.port() != 0 && taken.contains(&Some(facade.listen)) {
                return Err(refuse(listen, format!("{} is another listener's", facade.listen)));
            }
            taken.push(Some(facade.listen));
            crate::tls::https_server(&facade.cert_file, &facade.key_file).map_err(|e| refuse(name, e))?;
        }
        self.keys.limits().validate().map_err(|e| refuse("keys", e))?;
        if !(1..=720).contains(&self.officers.session_minutes) {
            return Err(refuse("officers.session_minutes", "must be 1 to 720"));
        }
        if self.audit.checkpoint_every_records < 1 || self.audit.checkpoint_every_seconds < 1 {
            return Err(refuse("audit", "checkpoint_every_records and checkpoint_every_seconds must be at least 1"));
        }
        if !(1..=24).contains(&self.audit.verify_every_hours) {
            return Err(refuse("audit.verify_every_hours", "must be 1 to 24"));
        }
        if self.audit.retention_days != 0 && self.audit.retention_days < MIN_AUDIT_RETENTION_DAYS {
            return Err(refuse(
                "audit.retention_days",
                format!("is {}; it must be 0 (keep everything) or at least {MIN_AUDIT_RETENTION_DAYS} days", self.audit.retention_days),
            ));
        }
        let rate = self.limits.principal_calls_per_second;
        if !rate.is_finite() || rate < 0.0 || self.limits.principal_burst.is_some_and(|b| !b.is_finite() || b < 1.0) {
            return Err(refuse("limits", "principal_calls_per_second must be 0 or more and principal_burst at least 1"));
        }
        if !(1..=60).contains(&self.health.probe_interval_seconds) {
            return Err(refuse("health.probe_interval_seconds", "must be 1 to 60"));
        }
        if self.keys.sweep_interval_seconds == 0 {
            return Err(refuse("keys.sweep_interval_seconds", "must be at least 1"));
        }
        Ok(())
    }

    /// The store's settings: a private SQLite database, or a PostgreSQL connection string that
    /// verifies the server (`sslmode=verify-full` with `sslrootcert`) and a private password file.
    fn validate_store(&self) -> Result<(), ConfigError> {
        let s = &self.store;
        match s.backend {
            StoreBackend::Sqlite => {
                if s.url.is_some() || s.password_file.is_some() {
                    return Err(refuse("store.url", "is for store.backend = \"postgres\""));
                }
                database_private(&self.data_dir)
            }
            StoreBackend::Postgres => {
                let url = s.url.as_deref().ok_or_else(|| refuse("store.url", "is required with store.backend = \"postgres\""))?;
                let info = crate::store::Conninfo::parse(url).map_err(|e| refuse("store.url", e))?;
                match info.sslmode.as_deref() {
                    Some(crate::store::VERIFY_FULL) => {}
                    other => {
                        return Err(refuse(
                            "store.url",
                            format!(
                                "sslmode is {}; it must be verify-full (TLS, the server's certificate and host name checked)",
                                other.unwrap_or("not set")
                            ),
                        ));
                    }
                }
                let ca = info.sslrootcert.ok_or_else(|| refuse("store.url", "sslrootcert=FILE is required (the CA of the server's certificate)"))?;
                if !ca.is_file() {
                    return Err(refuse("store.url", format!("sslrootcert {} is not a file", ca.display())));
                }
                let password =
                    s.password_file.as_deref().ok_or_else(|| refuse("store.password_file", "is required with store.backend = \"postgres\""))?;
                pin_file_private("store.password_file", password)
            }
        }
    }

    /// Reads the PIN from its file or environment variable.
    pub fn pin(&self) -> Result<Pin, ConfigError> {
        let pin = match (&self.hsm.pin_file, &self.hsm.pin_env) {
            (Some(path), _) => return read_pin("hsm.pin_file", path),
            (None, Some(var)) => Pin::new(std::env::var(var).map_err(|_| refuse("hsm.pin_env", format!("environment variable {var} is not set")))?),
            (None, None) => return Err(refuse("hsm.pin_file", "no PIN source configured")),
        };
        if pin.is_empty() {
            return Err(refuse("hsm.pin_file", "the PIN is empty"));
        }
        Ok(pin)
    }
}

/// Refuses a PIN file that anyone but its owner can read or write.
fn pin_file_private(setting: &'static str, path: &Path) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| refuse(setting, format!("{}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(refuse(setting, format!("{} is readable or writable by others; chmod 600 it", path.display())));
    }
    Ok(())
}

fn read_pin(setting: &'static str, path: &Path) -> Result<Pin, ConfigError> {
    pin_file_private(setting, path)?;
    let pin = Pin::new(std::fs::read_to_string(path).map_err(|e| refuse(setting, format!("{}: {e}", path.display())))?);
    if pin.is_empty() {
        return Err(refuse(setting, format!("{} is empty", path.display())));
    }
    Ok(pin)
}

/// Reads a PIN from a file outside the configuration (the security officer's, for
/// `kms-server backup-key --so-pin-file`), with the same checks as `hsm.pin_file`.
pub fn read_pin_file(path: &Path) -> Result<Pin, ConfigError> {
    read_pin("pin file", path)
}

/// Reads a secret (a password) from a file only its owner can read.
pub fn read_secret_file(path: &Path) -> Result<crate::secret::SecretText, ConfigError> {
    read_pin("store.password_file", path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The annotated example documents every setting; it must stay a file the service reads.
    #[test]
    fn the_example_configuration_parses_with_every_section() {
        let config: Config = toml::from_str(include_str!("../../kms.example.toml")).expect("kms.example.toml parses");
        assert_eq!(config.hsm.deadline_ms, 2000);
        assert!(config.listen.metrics.is_some_and(|m| m.ip().is_loopback()));
        assert_eq!(config.limits.principal_calls_per_second, 5500.0);
        assert_eq!(config.audit.retention_days, 0);
        assert_eq!(config.hsm.workers, None);
        assert_eq!(config.xks.as_ref().map(|x| x.listen.port()), Some(8443));
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        assert_eq!(config.hsm.worker_threads(), cores.min(config.hsm.sessions));
    }

    #[test]
    fn data_workers_are_one_to_256() {
        let mut config: Config = toml::from_str(include_str!("../../kms.example.toml")).expect("kms.example.toml parses");
        // Settings checked before hsm.workers, made valid.
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "1234").unwrap();
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        config.data_dir = dir.path().to_path_buf();
        config.hsm.module = std::env::current_exe().unwrap();
        (config.hsm.pin_file, config.hsm.pin_env) = (Some(pin), None);
        for (workers, ok) in [(0, false), (1, true), (256, true), (257, false)] {
            config.hsm.workers = Some(workers);
            assert_eq!(config.hsm.worker_threads(), workers);
            let refused = config.validate().err().map(|e| e.setting);
            assert_eq!(refused == Some("hsm.workers"), !ok, "workers = {workers}: {refused:?}");
        }
    }

    #[test]
    fn a_data_directory_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (mode, ok) in [(0o700, true), (0o755, true), (0o775, false), (0o777, false)] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let result = data_dir_private(dir.path());
            assert_eq!(result.is_ok(), ok, "mode {mode:o}: {result:?}");
            if let Err(e) = result {
                assert_eq!(e.setting, "data_dir");
            }
        }
        assert!(data_dir_private(&dir.path().join("not-yet")).is_ok(), "the service makes it");
    }
}
