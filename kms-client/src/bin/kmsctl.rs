//! `kmsctl`: the security officer's command line.
//!
//! Every command prints a short human-readable answer, or JSON with `--json`, and fails with one
//! line on stderr and a non-zero exit status.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Parser, Subcommand};
use kms_client::pb;
use kms_client::pb::audit_log_client::AuditLogClient;
use kms_client::pb::key_management_client::KeyManagementClient;
use kms_client::pb::session_client::SessionClient;
use kms_client::{AdminChannel, Bearer, DataClient, Error, Tls, channel};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "kmsctl", version, about = "Manage keys of the client-held key management service")]
struct Cli {
    /// The admin plane: one URL, or several comma-separated (a cluster's nodes: the first that
    /// answers and serves is used).
    #[arg(long, global = true, env = "KMS_ENDPOINT", default_value = "https://127.0.0.1:7401")]
    endpoint: String,
    /// The data plane (data-key, encrypt, decrypt): one URL or several, failed over between.
    #[arg(long, global = true, env = "KMS_DATA_ENDPOINT", default_value = "https://127.0.0.1:7400")]
    data_endpoint: String,
    /// A directory with ca.pem, workload.pem and workload.key (what `kms-server dev` writes to
    /// DATA_DIR/pki). Default: DEV_DIR/pki when it exists.
    #[arg(long, global = true, env = "KMS_PKI")]
    pki: Option<PathBuf>,
    /// The CA certificate that issued the server's certificate (PEM).
    #[arg(long, global = true, env = "KMS_CA")]
    ca: Option<PathBuf>,
    /// The client certificate for the data plane's mutual TLS (PEM).
    #[arg(long, global = true, env = "KMS_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "KMS_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Where the development set-up keeps its PKI (`pki/`) and officer credentials:
    /// `kms-server dev` writes .kms-dev, `cargo xtask cluster` .kms-cluster.
    #[arg(long, global = true, env = "KMS_DEV_DIR", default_value = ".kms-dev")]
    dev_dir: PathBuf,
    /// Where `kmsctl login` keeps the officer's session token (mode 0600).
    /// Default: $HOME/.config/kmsctl/session.
    #[arg(long, global = true, env = "KMS_SESSION_FILE")]
    session_file: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// For a command that changes something: check it against the live state and your rights
    /// and say what it would change, changing nothing (audited as a dry run).
    #[arg(long, global = true)]
    dry_run: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Keys and their lifecycle.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Aliases (alias/NAME) that name keys.
    #[command(subcommand)]
    Alias(AliasCommand),
    /// Data keys for envelope encryption.
    #[command(subcommand)]
    DataKey(DataKeyCommand),
    /// Logs an officer in (passphrase and TOTP code) and keeps the session for later commands.
    Login {
        /// The officer's name.
        #[arg(long, required_unless_present = "dev")]
        name: Option<String>,
        /// A file holding the passphrase (default: the first line of standard input).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// The six-digit code from the authenticator app (default: the next line of standard input).
        #[arg(long)]
        totp: Option<String>,
        /// Development mode only: log in as dev-officer with the credentials `kms-server dev`
        /// wrote to .kms-dev/ (or `cargo xtask cluster` to .kms-cluster/: see --dev-dir).
        #[arg(long, conflicts_with_all = ["name", "passphrase_file", "totp"])]
        dev: bool,
    },
    /// Ends the session.
    Logout,
    /// Officers and auditors.
    #[command(subcommand)]
    Officer(OfficerCommand),
    /// The yearly access review: every officer, auditor, principal and grant with its last use;
    /// `review sign-off` records that an officer reviewed it.
    Review {
        #[command(subcommand)]
        action: Option<ReviewCommand>,
    },
    /// The service's state: version, uptime, HSM health and token, keys by state, usage nearest
    /// the limit, what is due in the next 30 days, and warnings.
    Status,
    /// The audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Backups: every live key wrapped under the HSM's trusted backup key, with the metadata and
    /// the audit trail, in one integrity-protected file (restored offline with `kms-server restore`).
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Workload principals (certificate identities) that may hold grants.
    #[command(subcommand)]
    Principal(PrincipalCommand),
    /// Grants: what a principal may do with a key (nothing is allowed without one).
    #[command(subcommand)]
    Grant(GrantCommand),
    /// Envelope-encrypts a file of any size under a fresh data key (docs/file-format.md).
    Encrypt {
        #[arg(long)]
        key: String,
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long = "out")]
        output: PathBuf,
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Whether a data-plane call would be allowed now, and why: for one principal, or for every
    /// principal holding a grant on the key ("who can decrypt payroll?"). Each check the data
    /// plane makes, in its order: rate limit, principal, grants and their conditions, key state.
    Explain {
        /// The principal (default: every principal holding a grant on the key).
        #[arg(long)]
        principal: Option<String>,
        /// GenerateDataKey, GenerateDataKeyWithoutPlaintext, Encrypt, Decrypt, ReEncryptFrom or
        /// ReEncryptTo.
        #[arg(long)]
        operation: String,
        #[arg(long)]
        key: String,
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Prints the shell completion script for SHELL (bash, zsh, fish, elvish, powershell), e.g.
    /// `kmsctl completions bash > /usr/share/bash-completion/completions/kmsctl`.
    Completions { shell: clap_complete::Shell },
    /// Prints kmsctl's man page (roff), for packaging.
    #[command(hide = true)]
    Manpage,
    /// Decrypts a file made by `kmsctl encrypt`.
    Decrypt {
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long = "out")]
        output: PathBuf,
        /// Pairs the envelope's context must contain.
        #[command(flatten)]
        context: ContextArgs,
    },
}

impl Command {
    /// Whether the command changes the service's state (and so takes `--dry-run`).
    fn changes(&self) -> bool {
        match self {
            Command::Key(k) => !matches!(k, KeyCommand::Describe { .. } | KeyCommand::List { .. } | KeyCommand::Versions { .. }),
            Command::Alias(a) => !matches!(a, AliasCommand::List { .. }),
            Command::Officer(o) => !matches!(o, OfficerCommand::List),
            Command::Review { action } => action.is_some(),
            Command::Backup(b) => matches!(b, BackupCommand::Create { .. }),
            Command::Principal(p) => !matches!(p, PrincipalCommand::List),
            Command::Grant(g) => !matches!(g, GrantCommand::List { .. }),
            Command::DataKey(_)
            | Command::Login { .. }
            | Command::Logout
            | Command::Status
            | Command::Audit(_)
            | Command::Encrypt { .. }
            | Command::Decrypt { .. }
            | Command::Explain { .. }
            | Command::Completions { .. }
            | Command::Manpage => false,
        }
    }
}

#[derive(Args)]
struct ContextArgs {
    /// An encryption context pair, KEY=VALUE; repeat for more.
    #[arg(long = "context", value_parser = parse_pair)]
    pairs: Vec<(String, String)>,
}

impl ContextArgs {
    fn map(&self) -> Result<BTreeMap<String, String>, String> {
        let mut map = BTreeMap::new();
        for (k, v) in &self.pairs {
            if map.insert(k.clone(), v.clone()).is_some() {
                return Err(format!("--context: the key {k:?} is given twice"));
            }
        }
        Ok(map)
    }
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE with a non-empty KEY")),
    }
}

/// A point in time, as Unix seconds: `YYYY-MM-DD` (midnight UTC), `YYYY-MM-DDTHH:MM:SSZ`, or
/// plain seconds.
fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let bad = || format!("{s:?} is not YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or Unix seconds");
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z').ok_or_else(bad)?)),
        None => (s, None),
    };
    let num = |p: &str, lo: i64, hi: i64| p.parse::<i64>().ok().filter(|n| (lo..=hi).contains(n));
    let d: Vec<&str> = date.split('-').collect();
    let [y, m, day] = d.as_slice() else { return Err(bad()) };
    let (y, m, day) = (num(y, 1970, 9999).ok_or_else(bad)?, num(m, 1, 12).ok_or_else(bad)?, num(day, 1, 31).ok_or_else(bad)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = match time {
        None => 0,
        Some(t) => {
            let parts: Vec<&str> = t.split(':').collect();
            let [h, mi, se] = parts.as_slice() else { return Err(bad()) };
            num(h, 0, 23).ok_or_else(bad)? * 3600 + num(mi, 0, 59).ok_or_else(bad)? * 60 + num(se, 0, 60).ok_or_else(bad)?
        }
    };
    Ok(days * 86_400 + secs)
}

/// Seconds since the Unix epoch.
fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A Unix time as the officer reads times: in the local time zone (`TZ`, or the system's), in
/// the date and time form of their locale (`LC_ALL`, `LC_TIME` or `LANG`, e.g. `fr_MA.UTF-8`;
/// POSIX's when unset or unknown). `--json` keeps the number.
fn local_time(unix: i64) -> String {
    use chrono::TimeZone;
    let locale = ["LC_ALL", "LC_TIME", "LANG"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.is_empty())
        .and_then(|v| chrono::Locale::try_from(v.split(['.', '@']).next().unwrap_or_default()).ok())
        .unwrap_or(chrono::Locale::POSIX);
    match chrono::Local.timestamp_opt(unix, 0).single() {
        Some(at) => at.format_localized("%c", locale).to_string(),
        None => unix.to_string(),
    }
}

fn record_json(a: &pb::AuditRecord) -> Value {
    json!({
        "seq": a.seq, "time": a.time, "request_id": a.request_id, "principal": a.principal,
        "operation": a.operation, "key_id": a.key_id, "key_version": a.key_version,
        "encryption_context": a.encryption_context, "outcome": a.outcome, "status": a.status,
        "detail": a.detail, "caller_context": a.caller_context,
    })
}

/// "365d", "12h", "30m", "90s" or plain seconds.
fn parse_period(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a period like 365d, 12h, 30m or 90s"))?;
    let unit = match unit {
        'd' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return Err(format!("{s:?}: the unit must be d, h, m or s")),
    };
    n.checked_mul(unit).ok_or_else(|| format!("{s:?} is too long"))
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Creates a key (Enabled, version 1 primary) in the HSM.
    Create {
        #[arg(long)]
        alias: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Automatic rotation period: 365d, 90d, ... (none by default).
        #[arg(long, value_parser = parse_period)]
        rotation_period: Option<u64>,
    },
    /// Shows a key and its versions.
    Describe { key: String },
    /// Lists keys.
    List {
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        /// Only keys in this state; `--state destroyed --ids` lists what a restore needs to be
        /// told about (`kms-server restore --destroyed-since`).
        #[arg(long, value_enum)]
        state: Option<StateFilter>,
        /// Print only the key ids, one per line.
        #[arg(long)]
        ids: bool,
    },
    /// Lists a key's versions with their usage counts.
    Versions { key: String },
    /// Adds a new primary version; older versions only decrypt.
    Rotate { key: String },
    /// Disabled -> Enabled.
    Enable { key: String },
    /// Enabled -> Disabled: every operation refused from the next call on (reversible).
    Disable { key: String },
    /// Marks a key compromised: irreversible; data under it can only be re-encrypted elsewhere.
    Compromise {
        key: String,
        /// Confirms the irreversible change.
        #[arg(long)]
        yes: bool,
    },
    /// Schedules destruction after a pending window of 7 to 30 days.
    ScheduleDestruction {
        key: String,
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(7..=30))]
        pending_days: u32,
    },
    /// Cancels a scheduled destruction (the key becomes Disabled).
    CancelDestruction { key: String },
    /// One version of a key.
    #[command(subcommand)]
    Version(VersionCommand),
}

#[derive(Subcommand)]
enum VersionCommand {
    Enable {
        key: String,
        version: u32,
    },
    Disable {
        key: String,
        version: u32,
    },
    ScheduleDestruction {
        key: String,
        version: u32,
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(7..=30))]
        pending_days: u32,
    },
    CancelDestruction {
        key: String,
        version: u32,
    },
}

#[derive(Subcommand)]
enum AliasCommand {
    /// Points alias/NAME at a key id.
    Create {
        alias: String,
        key: String,
    },
    Delete {
        alias: String,
    },
    List {
        #[arg(long)]
        key: Option<String>,
    },
}

#[derive(Subcommand)]
enum ReviewCommand {
    /// Records your sign-off of the access review (audited).
    SignOff {
        #[arg(long, default_value = "")]
        note: String,
    },
}

#[derive(Subcommand)]
enum OfficerCommand {
    /// Adds an officer or an auditor; prints the TOTP enrolment URI (shown once).
    Add {
        name: String,
        #[arg(long, value_parser = ["officer", "auditor"])]
        role: String,
        /// A file holding the new officer's passphrase (default: the first line of standard input).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    List,
    /// Disables an officer and ends their sessions.
    Disable {
        name: String,
    },
    /// Changes your own passphrase (both read from files, or from two lines of standard input).
    Passphrase {
        #[arg(long)]
        current_file: Option<PathBuf>,
        #[arg(long)]
        new_file: Option<PathBuf>,
    },
    /// A new TOTP secret for yourself; prints the new enrolment URI.
    ReenrollTotp,
}

/// A secret from a file, or the next line of standard input.
fn secret_input(file: &Option<PathBuf>) -> Result<zeroize::Zeroizing<String>, Error> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?,
        None => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map_err(|e| Error::Config(e.to_string()))?;
            line
        }
    };
    Ok(zeroize::Zeroizing::new(text.trim_end_matches(['\r', '\n']).to_string()))
}

fn officer_json(o: &pb::Officer) -> Value {
    json!({"name": o.name, "role": o.role, "enabled": o.enabled, "creation_time": o.creation_time,
           "last_login_time": o.last_login_time, "locked_until": o.locked_until})
}

#[derive(Subcommand)]
enum PrincipalCommand {
    /// Registers a workload identity (a SPIFFE ID or certificate CN).
    Add {
        name: String,
    },
    List,
    /// Cuts a workload off from its next call on.
    Disable {
        name: String,
    },
    Enable {
        name: String,
    },
}

#[derive(Subcommand)]
enum GrantCommand {
    /// Allows a principal some operations on a key.
    Create {
        #[arg(long)]
        principal: String,
        #[arg(long)]
        key: String,
        /// Comma-separated: GenerateDataKey, GenerateDataKeyWithoutPlaintext, Encrypt, Decrypt,
        /// ReEncryptFrom, ReEncryptTo; or `all`.
        #[arg(long, value_delimiter = ',', required = true)]
        operations: Vec<String>,
        /// A pair the encryption context must contain, KEY=VALUE; repeat for more.
        #[arg(long = "require", value_parser = parse_pair)]
        require: Vec<(String, String)>,
        /// A key the encryption context must contain; repeat for more.
        #[arg(long = "require-key")]
        require_keys: Vec<String>,
        /// Expiry after this period (30d, 12h, ...); none by default.
        #[arg(long, value_parser = parse_period)]
        expires_in: Option<u64>,
    },
    List {
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        principal: Option<String>,
    },
    /// Revokes a grant: it allows nothing from the next call on.
    Revoke { grant_id: String },
}

/// Every grant operation, for `--operations all`.
const ALL_OPERATIONS: [&str; 6] = ["GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "Encrypt", "Decrypt", "ReEncryptFrom", "ReEncryptTo"];

fn principal_json(p: &pb::Principal) -> Value {
    json!({"name": p.name, "state": p.state, "creation_time": p.creation_time})
}

fn grant_json(g: &pb::Grant) -> Value {
    json!({
        "grant_id": g.grant_id, "principal": g.principal, "key_id": g.key_id, "operations": g.operations,
        "required_encryption_context": g.required_encryption_context,
        "required_encryption_context_keys": g.required_encryption_context_keys,
        "expiration_time": g.expiration_time, "creation_time": g.creation_time,
    })
}

fn grant_text(g: &pb::Grant) -> String {
    format!("{}  {}  {}  {}", g.grant_id, g.principal, g.key_id, g.operations.join(","))
}

/// A key state, as `kmsctl key list --state` names it.
#[derive(Clone, Copy, clap::ValueEnum)]
enum StateFilter {
    Enabled,
    Disabled,
    Compromised,
    PendingDestruction,
    Destroyed,
}

impl StateFilter {
    fn matches(self, state: i32) -> bool {
        let want = match self {
            StateFilter::Enabled => pb::KeyState::Enabled,
            StateFilter::Disabled => pb::KeyState::Disabled,
            StateFilter::Compromised => pb::KeyState::Compromised,
            StateFilter::PendingDestruction => pb::KeyState::PendingDestruction,
            StateFilter::Destroyed => pb::KeyState::Destroyed,
        };
        state == want as i32
    }
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Makes a backup and writes it to FILE (written beside it first, then renamed: a file
    /// that exists is complete).
    Create {
        #[arg(long = "out")]
        output: PathBuf,
    },
    /// Checks a backup file without restoring it: its structure and section hashes here, its
    /// MAC in the server's HSM. Exits non-zero, saying what failed, for a changed file.
    Verify { file: PathBuf },
}

/// The head of a backup file and the digests of its two sections (docs/file-format.md).
fn read_backup(path: &Path) -> Result<pb::VerifyBackupRequest, Error> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let bad = |what: String| Error::Config(format!("{}: not a valid backup file: {what}", path.display()));
    let mut r = BufReader::new(File::open(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|_| bad("shorter than its magic number".into()))?;
    if &magic != b"KMSBAK\x00\x01" {
        return Err(bad("wrong magic number".into()));
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|_| bad("truncated".into()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 16 * 1024 {
        return Err(bad(format!("manifest length {len} is over 16 KiB")));
    }
    let mut manifest = vec![0u8; len];
    let mut mac = vec![0u8; 32];
    r.read_exact(&mut manifest).and_then(|()| r.read_exact(&mut mac)).map_err(|_| bad("truncated in its head".into()))?;
    let head: Value = serde_json::from_slice(&manifest).map_err(|e| bad(format!("manifest: {e}")))?;
    let objects_len = head["objects"]["bytes"].as_u64().ok_or_else(|| bad("the manifest has no objects length".into()))?;
    let io = |e: std::io::Error| Error::Config(format!("{}: {e}", path.display()));
    let mut digest = Sha256::new();
    let objects_bytes = std::io::copy(&mut (&mut r).take(objects_len), &mut digest).map_err(io)?;
    let objects_sha256 = hex(&digest.finalize_reset());
    let database_bytes = std::io::copy(&mut r, &mut digest).map_err(io)?;
    Ok(pb::VerifyBackupRequest { manifest, mac, objects_bytes, objects_sha256, database_bytes, database_sha256: hex(&digest.finalize()) })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn manifest_json(m: &pb::BackupManifest) -> Value {
    json!({"creation_time": m.creation_time, "service_version": m.service_version, "token_label": m.token_label,
           "token_serial": m.token_serial, "backup_key_label": m.backup_key_label, "keys": m.keys, "live_versions": m.live_versions,
           "audit_checkpoint_seq": m.audit_checkpoint_seq, "objects": m.objects, "file_bytes": m.file_bytes})
}

fn manifest_text(m: &pb::BackupManifest) -> String {
    format!(
        "backup of {} by kms-server {} (token {:?}, serial {}): {} keys, {} live versions, {} wrapped objects under {:?}, audit through record {}, {} bytes",
        m.creation_time,
        m.service_version,
        m.token_label,
        m.token_serial,
        m.keys,
        m.live_versions,
        m.objects,
        m.backup_key_label,
        m.audit_checkpoint_seq,
        m.file_bytes
    )
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verifies the hash chain; exits non-zero and names the first bad record if it is broken.
    Verify,
    /// Writes records as JSON lines (for a SIEM), optionally within a time window.
    Export {
        /// From this time on: YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ (UTC) or Unix seconds.
        #[arg(long, value_parser = parse_time)]
        since: Option<i64>,
        /// Before this time.
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
        /// The file to write (standard output by default).
        #[arg(long = "out")]
        output: Option<PathBuf>,
    },
    /// Follows the trail: prints records as they are written, as JSON lines.
    Tail {
        /// Start after this sequence number (default: the current end of the trail).
        #[arg(long)]
        after: Option<u64>,
        /// Stop after this many records (default: run until interrupted).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Prints records in order.
    List {
        /// Records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum DataKeyCommand {
    /// Generates a data key: prints it (base64) and its wrapped blob (base64).
    Generate {
        #[arg(long)]
        key: String,
        /// 16 (AES-128) or 32 (AES-256).
        #[arg(long, default_value_t = 32)]
        bytes: u32,
        /// Return only the wrapped blob.
        #[arg(long)]
        without_plaintext: bool,
        #[command(flatten)]
        context: ContextArgs,
    },
}

fn key_state_name(n: i32) -> &'static str {
    pb::KeyState::try_from(n).map(|s| s.as_str_name()).unwrap_or("UNKNOWN")
}

fn version_state_name(n: i32) -> &'static str {
    pb::KeyVersionState::try_from(n).map(|s| s.as_str_name().trim_start_matches("VERSION_")).unwrap_or("UNKNOWN")
}

fn key_json(k: &pb::KeyMetadata) -> Value {
    json!({
        "key_id": k.key_id,
        "description": k.description,
        "state": key_state_name(k.state),
        "key_spec": k.key_spec,
        "primary_version": k.primary_version,
        "creation_time": k.creation_time,
        "rotation_period_seconds": k.rotation_period_seconds,
        "next_rotation_time": k.next_rotation_time,
        "destruction_time": k.destruction_time,
        "aliases": k.aliases,
        "material_missing": k.material_missing,
    })
}

fn version_json(v: &pb::KeyVersion) -> Value {
    json!({
        "version": v.version,
        "state": version_state_name(v.state),
        "primary": v.primary,
        "creation_time": v.creation_time,
        "encryptions": v.encryptions,
        "rotation_threshold": v.rotation_threshold,
        "encryption_limit": v.encryption_limit,
        "destruction_time": v.destruction_time,
        "material_missing": v.material_missing,
    })
}

fn key_text(k: &pb::KeyMetadata) -> String {
    let mut s = format!("{}  {}  primary v{}", k.key_id, key_state_name(k.state), k.primary_version);
    if !k.aliases.is_empty() {
        s.push_str(&format!("  {}", k.aliases.join(",")));
    }
    if k.destruction_time != 0 {
        s.push_str(&format!("  destruction at {}", k.destruction_time));
    }
    if k.material_missing {
        s.push_str("  MATERIAL MISSING");
    }
    s
}

fn version_text(v: &pb::KeyVersion) -> String {
    format!(
        "  v{}{}  {}  encryptions {} / {}",
        v.version,
        if v.primary { " (primary)" } else { "" },
        version_state_name(v.state),
        v.encryptions,
        v.encryption_limit
    )
}

struct Out {
    json: bool,
    dry_run: DryRun,
}

impl Out {
    /// Prints a command's answer; for a dry run, what the server said it would change instead.
    fn print(&self, json: Value, text: impl FnOnce() -> String) {
        if let Some(would) = self.dry_run.answer() {
            if self.json {
                println!("{}", json!({"dry_run": true, "would": would}));
            } else {
                println!("dry run: would {would}; nothing was changed");
            }
        } else if self.json {
            println!("{json}");
        } else {
            println!("{}", text());
        }
    }

    fn key(&self, k: Option<pb::KeyMetadata>) -> Result<(), Error> {
        let k = k.unwrap_or_default();
        self.print(key_json(&k), || key_text(&k));
        Ok(())
    }

    fn version(&self, r: pb::KeyVersionResponse) -> Result<(), Error> {
        let v = r.version.unwrap_or_default();
        let mut j = version_json(&v);
        j["key_id"] = json!(r.key_id);
        self.print(j, || format!("{}\n{}", r.key_id, version_text(&v)));
        Ok(())
    }
}

/// Creates (or truncates) a file only its owner can read or write, whatever the umask: every
/// file kmsctl writes (sessions, backups, audit exports, plaintext) holds something sensitive.
fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// A new file only its owner can read (a session, or a temporary file beside an output): whatever
/// stood at that name (one left by a crash, or a link someone planted) is removed first, never
/// followed.
fn create_fresh(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

/// Writes a file only its owner can read (the session token), in a directory only its owner can
/// enter when kmsctl makes it.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |e: std::io::Error| Error::Config(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
    }
    create_fresh(path).and_then(|mut f| f.write_all(contents)).map_err(io)
}

/// Writes to `path` through a temporary file renamed into place only on success, so a failed
/// decryption never leaves partial plaintext under the requested name.
async fn write_atomically(path: &Path, f: impl AsyncFnOnce(&mut BufWriter<File>) -> Result<u64, Error>) -> Result<u64, Error> {
    let io = |e: std::io::Error| Error::Envelope(e.into());
    let tmp = path.with_extension("kmsctl-partial");
    let mut w = BufWriter::new(create_fresh(&tmp).map_err(io)?);
    let result = f(&mut w).await.and_then(|n| w.flush().map(|()| n).map_err(io));
    match result {
        Ok(n) => std::fs::rename(&tmp, path).map(|()| n).map_err(io),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn open_input(path: &Path) -> Result<BufReader<File>, Error> {
    File::open(path).map(BufReader::new).map_err(|e| Error::Envelope(e.into()))
}

/// `--dry-run`: off, or on with the server's answer (what the call would change) once it came.
#[derive(Clone, Default)]
struct DryRun(Option<std::sync::Arc<std::sync::Mutex<Option<String>>>>);

impl DryRun {
    fn new(on: bool) -> DryRun {
        DryRun(on.then(Default::default))
    }

    fn on(&self) -> bool {
        self.0.is_some()
    }

    fn answer(&self) -> Option<String> {
        self.0.as_ref().and_then(|slot| slot.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The admin-plane channel: the officer's session on every call and, for `--dry-run`, the
/// dry-run request header, keeping the answer's "what would change" for [`Out::print`].
#[derive(Clone)]
struct Admin {
    inner: AdminChannel,
    dry_run: DryRun,
}

use pb::{DRY_RUN_ANSWER_HEADER as DRY_RUN_ANSWER, DRY_RUN_HEADER as DRY_RUN};

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;

impl tonic::codegen::Service<HttpRequest> for Admin {
    type Response = <AdminChannel as tonic::codegen::Service<HttpRequest>>::Response;
    type Error = <AdminChannel as tonic::codegen::Service<HttpRequest>>::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: HttpRequest) -> Self::Future {
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

/// An admin-plane channel carrying the session `kmsctl login` saved, if any.
async fn admin_channel(endpoint: &str, tls: &Tls, session: &Path, dry_run: &DryRun) -> Result<Admin, Error> {
    let token = std::fs::read_to_string(session).ok().map(zeroize::Zeroizing::new);
    let inner =
        tonic::service::interceptor::InterceptedService::new(channel(endpoint, tls).await?, Bearer::new(token.as_deref().map(String::as_str))?);
    Ok(Admin { inner, dry_run: dry_run.clone() })
}

impl Cli {
    fn session_path(&self) -> PathBuf {
        self.session_file.clone().unwrap_or_else(|| {
            std::env::var_os("HOME").map_or_else(|| PathBuf::from(".kmsctl-session"), |h| PathBuf::from(h).join(".config/kmsctl/session"))
        })
    }

    /// Explicit files win over --pki, which wins over the development default.
    fn tls(&self) -> Tls {
        let dev = self.dev_dir.join("pki");
        let base = match &self.pki {
            Some(dir) => Tls::dev(dir),
            None if dev.join("ca.pem").exists() => Tls::dev(&dev),
            None => Tls::default(),
        };
        Tls { ca: self.ca.clone().or(base.ca), cert: self.tls_cert.clone().or(base.cert), key: self.tls_key.clone().or(base.key) }
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    if cli.dry_run && !cli.command.changes() {
        return Err(Error::Config("--dry-run: this command changes nothing; a dry run is for commands that do".into()));
    }
    let out = Out { json: cli.json, dry_run: DryRun::new(cli.dry_run) };
    let dry_run = out.dry_run.clone();
    execute(cli, out).await?;
    if dry_run.on() && dry_run.answer().is_none() {
        return Err(Error::Config(
            "--dry-run: the server did not answer as a dry run (a release without them?): the change may have been made".into(),
        ));
    }
    Ok(())
}

async fn execute(cli: Cli, out: Out) -> Result<(), Error> {
    let tls = cli.tls();
    let session = cli.session_path();
    match cli.command {
        Command::Completions { .. } | Command::Manpage => Ok(()), // printed by `main`
        Command::Key(cmd) => {
            let mut c = KeyManagementClient::new(admin_channel(&cli.endpoint, &tls, &session, &out.dry_run).await?);
            match cmd {
                KeyCommand::Create { alias, description, rotation_period } => {
                    let r = c
                        .create_key(pb::CreateKeyRequest {
                            description,
                            alias: alias.unwrap_or_default(),
                            rotation_period_seconds: rotation_period.unwrap_or(0),
                        })
                        .await?;
                    out.key(r.into_inner().key)
                }
                KeyCommand::Describe { key } => {
                    let r = c.describe_key(pb::DescribeKeyRequest { key_id: key }).await?.into_inner();
                    let k = r.key.unwrap_or_default();
                    let mut j = key_json(&k);
                    j["versions"] = Value::Array(r.versions.iter().map(version_json).collect());
                    out.print(j, || {
                        let mut s = key_text(&k);
                        if !k.description.is_empty() {
                            s.push_str(&format!("\n  description: {}", k.description));
                        }
                        for v in &r.versions {
                            s.push('\n');
                            s.push_str(&version_text(v));
                        }
                        s
                    });
                    Ok(())
                }
                KeyCommand::List { page_size, state, ids } => {
                    let mut all = Vec::new();
                    let mut token = String::new();
                    loop {
                        let r = c.list_keys(pb::ListKeysRequest { page_size, page_token: token }).await?.into_inner();
                        all.extend(r.keys.into_iter().filter(|k| state.is_none_or(|s| s.matches(k.state))));
                        if r.next_page_token.is_empty() {
                            break;
                        }
                        token = r.next_page_token;
                    }
                    if ids {
                        out.print(Value::Array(all.iter().map(|k| json!(k.key_id)).collect()), || {
                            all.iter().map(|k| k.key_id.clone()).collect::<Vec<_>>().join("\n")
                        });
                    } else {
                        out.print(Value::Array(all.iter().map(key_json).collect()), || all.iter().map(key_text).collect::<Vec<_>>().join("\n"));
                    }
                    Ok(())
                }
                KeyCommand::Versions { key } => {
                    let r = c.list_key_versions(pb::ListKeyVersionsRequest { key_id: key }).await?.into_inner();
                    out.print(json!({"key_id": r.key_id, "versions": r.versions.iter().map(version_json).collect::<Vec<_>>()}), || {
                        std::iter::once(r.key_id.clone()).chain(r.versions.iter().map(version_text)).collect::<Vec<_>>().join("\n")
                    });
                    Ok(())
                }
                KeyCommand::Rotate { key } => {
                    let r = c.rotate_key(pb::RotateKeyRequest { key_id: key }).await?.into_inner();
                    out.key(r.key)
                }
                KeyCommand::Enable { key } => out.key(c.enable_key(pb::EnableKeyRequest { key_id: key }).await?.into_inner().key),
                KeyCommand::Disable { key } => out.key(c.disable_key(pb::DisableKeyRequest { key_id: key }).await?.into_inner().key),
                KeyCommand::Compromise { key, yes } => {
                    if !yes && !out.dry_run.on() {
                        return Err(Error::Status(tonic::Status::invalid_argument(
                            "marking a key compromised is irreversible; add --yes to confirm",
                        )));
                    }
                    out.key(c.mark_key_compromised(pb::MarkKeyCompromisedRequest { key_id: key }).await?.into_inner().key)
                }
                KeyCommand::ScheduleDestruction { key, pending_days } => out.key(
                    c.schedule_key_destruction(pb::ScheduleKeyDestructionRequest { key_id: key, pending_window_days: pending_days })
                        .await?
                        .into_inner()
                        .key,
                ),
                KeyCommand::CancelDestruction { key } => {
                    out.key(c.cancel_key_destruction(pb::CancelKeyDestructionRequest { key_id: key }).await?.into_inner().key)
                }
                KeyCommand::Version(v) => match v {
                    VersionCommand::Enable { key, version } => {
                        out.version(c.enable_key_version(pb::KeyVersionRequest { key_id: key, key_version: version }).await?.into_inner())
                    }
                    VersionCommand::Disable { key, version } => {
                        out.version(c.disable_key_version(pb::KeyVersionRequest { key_id: key, key_version: version }).await?.into_inner())
                    }
                    VersionCommand::ScheduleDestruction { key, version, pending_days } => out.version(
                        c.schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest {
                            key_id: key,
                            key_version: version,
                            pending_window_days: pending_days,
                        })
                        .await?
                        .into_inner(),
                    ),
                    VersionCommand::CancelDestruction { key, version } => {
                        out.version(c.cancel_key_version_destruction(pb::KeyVersionRequest { key_id: key, key_version: version }).await?.into_inner())
                    }
                },
            }
        }
        Command::Alias(cmd) => {
            let mut c = KeyManagementClient::new(admin_channel(&cli.endpoint, &tls, &session, &out.dry_run).await?);
            match cmd {
                AliasCommand::Create { alias, key } => {
                    let r = c.create_alias(pb::CreateAliasRequest { alias, key_id: key }).await?.into_inner();
                    out.print(json!({"alias": r.alias, "key_id": r.key_id}), || format!("{} -> {}", r.alias, r.key_id));
                    Ok(())
                }
                AliasCommand::Delete { alias } => {
                    c.delete_alias(pb::DeleteAliasRequest { alias: alias.clone() }).await?;
                    out.print(json!({"deleted": alias}), || format!("deleted {alias}"));
                    Ok(())
                }
                AliasCommand::List { key } => {
                    let r = c.list_aliases(pb::ListAliasesRequest { key_id: key.unwrap_or_default() }).await?.into_inner();
                    out.print(
                        Value::Array(
                            r.aliases.iter().map(|a| json!({"alias": a.alias, "key_id": a.key_id, "creation_time": a.creation_time})).collect(),
                        ),
                        || r.aliases.iter().map(|a| format!("{} -> {}", a.alias, a.key_id)).collect::<Vec<_>>().join("\n"),
                    );
                    Ok(())
                }
            }
        }
        Command::Login { name, passphrase_file, totp, dev } => {
            let (name, passphrase, code) = if dev {
                let dir = &cli.dev_dir;
                let read = |f: &str| {
                    std::fs::read_to_string(dir.join(f))
                        .map_err(|e| Error::Config(format!("{}: {e} (is `cargo xtask dev` running from here?)", dir.join(f).display())))
                };
                let secret = read("dev-officer.totp")?;
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                let code = kms_client::totp::code(&secret, now).ok_or_else(|| Error::Config("bad development TOTP secret".into()))?;
                ("dev-officer".to_string(), zeroize::Zeroizing::new(read("dev-officer.passphrase")?), zeroize::Zeroizing::new(code))
            } else {
                let passphrase = secret_input(&passphrase_file)?;
                let code = match totp {
                    Some(code) => zeroize::Zeroizing::new(code),
                    None => secret_input(&None)?,
                };
                (name.unwrap_or_default(), passphrase, code)
            };
            let mut c = SessionClient::new(channel(&cli.endpoint, &tls).await?);
            let mut r =
                c.login(pb::LoginRequest { name: name.clone(), passphrase: passphrase.to_string(), totp_code: code.to_string() }).await?.into_inner();
            let token = zeroize::Zeroizing::new(std::mem::take(&mut r.session_token));
            write_private(&session, token.as_bytes())?;
            out.print(json!({"officer": name, "role": r.role, "expiration_time": r.expiration_time}), || {
                let left = (r.expiration_time - now()).max(0);
                format!("logged in as {name} ({}) until {} (in {} minutes)", r.role, local_time(r.expiration_time), (left + 30) / 60)
            });
            Ok(())
        }
        Command::Backup(cmd) => {
            let mut c = KeyManagementClient::new(admin_channel(&cli.endpoint, &tls, &session, &out.dry_run).await?);
            match cmd {
                BackupCommand::Create { output } => {
                    let io = |e: std::io::Error| Error::Config(format!("{}: {e}", output.display()));
                    let mut partial = output.clone().into_os_string();
                    partial.push(".partial");
                    let partial = PathBuf::from(partial);
                    let mut stream = c.create_backup(pb::CreateBackupRequest {}).await?.into_inner();
                    if out.dry_run.answer().is_some() {
                        out.print(Value::Null, String::new);
                        return Ok(());
                    }
                    let mut file = BufWriter::new(create_fresh(&partial).map_err(io)?);
                    let (mut manifest, mut written) = (None, 0u64);
                    let received = loop {
                        match stream.message().await {
                            Ok(Some(chunk)) => {
                                manifest = manifest.or(chunk.manifest);
                                if let Err(e) = file.write_all(&chunk.data) {
                                    break Err(io(e));
                                }
                                written += chunk.data.len() as u64;
                            }
                            Ok(None) => break Ok(()),
                            Err(status) => break Err(Error::Status(status)),
                        }
                    };
                    let complete = received.and_then(|()| match &manifest {
                        Some(m) if m.file_bytes == written => Ok(()),
                        _ => Err(Error::Config(format!("the backup stream ended after {written} bytes, before the whole file"))),
                    });
                    let synced = complete.and_then(|()| file.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io));
                    if let Err(e) = synced {
                        let _ = std::fs::remove_file(&partial);
                        return Err(e);
                    }
                    std::fs::rename(&partial, &output).map_err(io)?;
                    let m = manifest.unwrap_or_default();
                    out.print(json!({"file": output, "manifest": manifest_json(&m)}), || format!("{}: {}", output.display(), manifest_text(&m)));
                    Ok(())
                }
                BackupCommand::Verify { file } => {
                    let request = read_backup(&file)?;
                    let r = c.verify_backup(request).await?.into_inner();
                    let m = r.manifest.unwrap_or_default();
                    out.print(json!({"ok": true, "manifest": manifest_json(&m)}), || format!("backup ok: {}", manifest_text(&m)));
                    Ok(())
                }
            }
        }
        Command::Logout => {
            let mut c = SessionClient::new(admin_channel(&cli.endpoint, &tls, &session, &out.dry_run).await?);
            let ended = c.logout(pb::LogoutRequest {}).await;
            let _ = std::fs::remove_file(&session);
            ended?;
            out.print(json!({"logged_out": true}), || "logged out".to_string());
            Ok(())
        }
        Command::Officer(cmd) => {
            let mut c = KeyManagementClient::new(admin_channel(&cli.endpoint, &tls, &session, &out.dry_run).await?);
            match cmd {
                OfficerCommand::Add { name, role, passphrase_file } => {
                    let passphrase = secret_input(&passphrase_file)?;
                    let mut r = c
                        .create_officer(pb::CreateOfficerRequest { name: name.clone(), role, passphrase: passphrase.to_string() })
                        .await?
                        .into_inner();
                    let uri = zeroize::Zeroizing::new(std::mem::take(&mut r.otpauth_uri));
                    out.print(json!({"officer": name, "otpauth_uri": uri.as_str()}), || {
                        format!("officer {name} added; add this to their authenticator app (shown once):\n{}", uri.as_str())
                    });
                    Ok(())
                }
                OfficerCommand::List => {
                    let r = c.list_officers(pb::ListOfficersRequest {}).await?.into_inner();
                    out.print(Value::Array(r.officers.iter().map(officer_json).collect()), || {
                        r.officers
                            .iter()
                            .map(|o| format!("{}  {}  {}", o.name, o.role, if o.enabled { "enabled" } else { "disabled" }))
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                    Ok(())
                }
                OfficerCommand::Disable { name } => {
                    let r = c.disable_officer(pb::DisableOfficerRequest { name }).await?.into_inner();
                    let o = r.officer.unwrap_or_default();
                    out.print(officer_json(&o), || format!("{} disabled", o.name));
                    Ok(())
                }
                OfficerCommand::Passphrase { current_file, new_file } => {
                    let current = secret_input(&current_file)?;
                    let new = secret_input(&new_file)?;
                    c.change_passphrase(pb::ChangePassphraseRequest { current_passphrase: current.to_string(), new_passphrase: new.to_string() })
                        .await?;
                    out.print(json!({"changed": true}), || "passphrase changed".to_string());
                    Ok(())
                }
                OfficerCommand::ReenrollTotp => {
                    let mut r = c.reenroll_totp(pb::ReenrollTotpRequest {}).await?.into_inner();
                    let uri = zeroize::Zeroizing::new(std::mem::take(&mut r.otpauth_uri));
                    out.print(json!({"otpauth_uri": uri.as_str()}), || format!("new enrolment (shown once):\n{}", uri.as_str()));
                    Ok(())
                }
            }
        }
        Command::Explain { principal, operation, key, context } => {
            let mut c = KeyManagementClient::new(admin_channel(&cli.endpoint, &tls, &session, &out.dry_run).await?);
            let encryption_context: std::collections::HashMap<String, String> = context.map().map_err(Error::Config)?.into_iter().collect();
            let r = c
                .explain_access(pb::ExplainAccessRequest {
                    principal: principal.unwrap_or_default(),
                    operation: operation.clone(),
                    key_id: key,
                    encryption_context,
                })
                .await?
                .into_inner();
            let decisions: Vec<Value> = r
                .decisions
                .iter()
                .map(|d| json!({"principal": d.principal, "allowed": d.allowed, "grant_id": d.grant_id, "reasons": d.reasons}))
                .collect();
            out.print(json!({"key_id": r.key_id, "key_state": key_state_name(r.key_state), "operation": operation, "decisions": decisions}), || {
                let pairs: Vec<String> = context.pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let with = if pairs.is_empty() { "no encryption context".to_string() } else { format!("the context {}", pairs.join(", ")) };
                let mut lines = vec![format!("{operation} on key {} ({}), with {with}:", r.key_id, key_state_name(r.key_state))];
                if r.decisions.is_empty() {
                    lines.push(format!("  nobody: no principal holds a grant on key {}", r.key_id));
                }
                for d in &r.decisions {
                    let by = if d.grant_id.is_empty() { String::new() } else { format!(" (grant {})", d.grant_id) };
                    lines.push(format!("{}  {}{by}", if d.allowed { "ALLOWED" } else { "DENIED " }, d.principal));
                    lines.extend(d.reasons.iter().map(|why| format!("    - {why}")));
                }
                lines.join("\n")
            });
            Ok(())
        }
        Command::Status => {
            let mut c = KeyManagementClient::new(admin_channel(&cli.endpoint, &tls, &session, &out.dry_run).await?);
            let r = c.describe_service(pb::DescribeServiceRequest {}).await?.into_inner();
            let token = r.token.clone().unwrap_or_default();
            let usage: Vec<Value> = r
                .versions_nearest_limit
                .iter()
                .map(|u| json!({"key_id": u.key_id, "key_version": u.key_version, "encryptions": u.encryptions, "encryption_limit": u.encryption_limit}))
                .collect();
            let due: Vec<Value> = r.due_soon.iter().map(|d| json!({"key_id": d.key_id, "action": d.action, "due_time": d.due_time})).collect();
            out.print(
                json!({"version": r.version, "uptime_seconds": r.uptime_seconds, "health": r.health, "health_detail": r.health_detail,
                       "recent_hsm_errors": r.recent_hsm_errors,
                       "last_probe_time": r.last_probe_time,
                       "token": {"label": token.label, "manufacturer": token.manufacturer, "model": token.model, "serial_number": token.serial_number},
                       "keys_by_state": r.keys_by_state, "versions_nearest_limit": usage, "due_soon": due,
                       "last_review_signoff_time": r.last_review_signoff_time, "last_review_signoff_by": r.last_review_signoff_by,
                       "review_overdue": r.review_overdue, "warnings": r.warnings,
                       "hsm_sessions": {"open": r.hsm_sessions_open, "in_use": r.hsm_sessions_in_use, "size": r.hsm_sessions_size},
                       "hsm_session_copies": r.hsm_session_copies, "leader": r.leader,
                       "audit": {"verified": r.audit_verified, "verified_through": r.audit_verified_through,
                                 "last_full_check_time": r.audit_last_full_check_time, "problem": r.audit_problem}}),
                || {
                    let detail = if r.health_detail.is_empty() { String::new() } else { format!(" ({})", r.health_detail) };
                    let mut lines = vec![
                        format!("kms-server {}, up {} s{}", r.version, r.uptime_seconds, if r.leader { ", runs the background jobs" } else { "" }),
                        format!("health: {}{detail}", r.health),
                        format!("HSM token: {} ({} {}, serial {})", token.label, token.manufacturer, token.model, token.serial_number),
                        format!(
                            "HSM sessions: {} in use, {} open, at most {}; session copies of key versions: {}",
                            r.hsm_sessions_in_use,
                            r.hsm_sessions_open,
                            r.hsm_sessions_size,
                            r.hsm_session_copies.map_or_else(|| "off".to_string(), |n| n.to_string())
                        ),
                    ];
                    lines.push(match (r.audit_verified, r.audit_last_full_check_time) {
                        (false, _) => format!("audit trail: DOES NOT VERIFY: {}", r.audit_problem),
                        (true, 0) => format!("audit trail: verified through record {} (the whole trail not yet)", r.audit_verified_through),
                        (true, at) => format!("audit trail: verified through record {}; whole trail last checked {}", r.audit_verified_through, local_time(at)),
                    });
                    let mut states: Vec<_> = r.keys_by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
                    states.sort();
                    lines.push(format!("keys: {}", if states.is_empty() { "none".to_string() } else { states.join(", ") }));
                    for u in &r.versions_nearest_limit {
                        lines.push(format!("usage: {} v{}: {} of {} encryptions", u.key_id, u.key_version, u.encryptions, u.encryption_limit));
                    }
                    for d in &r.due_soon {
                        lines.push(format!("due: {} of {} at {}", d.action, d.key_id, d.due_time));
                    }
                    lines.extend(r.recent_hsm_errors.iter().map(|e| format!("HSM error: {e}")));
                    lines.extend(r.warnings.iter().map(|w| format!("WARNING: {w}")));
                    lines.join("\n")
                },
            );
            Ok(())
        }
        Command::Review { action } => {
            let mut c = KeyManagementClient::new(admin_channel(&cli.endpoint, &tls, &session, &out.dry_run).await?);
            match action {
                Some(ReviewCommand::SignOff { note }) => {
                    let r = c.sign_off_review(pb::SignOffReviewRequest { note }).await?.into_inner();
                    out.print(json!({"signoff_time": r.signoff_time}), || format!("review signed off at {}", r.signoff_time));
                }
                None => {
                    let r = c.access_review(pb::AccessReviewRequest {}).await?.into_inner();
                    let rows: Vec<Value> = r
                        .entries
                        .iter()
                        .map(|e| {
                            json!({"kind": e.kind, "name": e.name, "detail": e.detail, "enabled": e.enabled,
                                   "creation_time": e.creation_time, "last_used_time": e.last_used_time,
                                   "unused_90_days": e.unused_90_days})
                        })
                        .collect();
                    out.print(
                        json!({"entries": rows, "last_signoff_time": r.last_signoff_time, "last_signoff_by": r.last_signoff_by,
                               "signoff_overdue": r.signoff_overdue}),
                        || {
                            let mut lines: Vec<String> = r
                                .entries
                                .iter()
                                .map(|e| {
                                    let used =
                                        if e.last_used_time == 0 { "never used".to_string() } else { format!("last used {}", e.last_used_time) };
                                    let flag = if e.unused_90_days { "  UNUSED 90 DAYS: remove?" } else { "" };
                                    format!("{:<9} {}  {}  {used}{flag}", e.kind, e.name, e.detail)
                                })
                                .collect();
                            lines.push(if r.signoff_overdue {
                                "WARNING: the access review has not been signed off in the last 365 days (kmsctl review sign-off)".to_string()
                            } else {
                                format!("last signed off by {} at {}", r.last_signoff_by, r.last_signoff_time)
                            });
                            lines.join("\n")
                        },
                    );
                }
            }
            Ok(())
        }
        Command::Principal(cmd) => {
            let mut c = KeyManagementClient::new(admin_channel(&cli.endpoint, &tls, &session, &out.dry_run).await?);
            let one = |p: Option<pb::Principal>| {
                let p = p.unwrap_or_default();
                out.print(principal_json(&p), || format!("{}  {}", p.name, p.state));
                Ok(())
            };
            match cmd {
                PrincipalCommand::Add { name } => one(c.create_principal(pb::PrincipalRequest { name }).await?.into_inner().principal),
                PrincipalCommand::Disable { name } => one(c.disable_principal(pb::PrincipalRequest { name }).await?.into_inner().principal),
                PrincipalCommand::Enable { name } => one(c.enable_principal(pb::PrincipalRequest { name }).await?.into_inner().principal),
                PrincipalCommand::List => {
                    let r = c.list_principals(pb::ListPrincipalsRequest {}).await?.into_inner();
                    out.print(Value::Array(r.principals.iter().map(principal_json).collect()), || {
                        r.principals.iter().map(|p| format!("{}  {}", p.name, p.state)).collect::<Vec<_>>().join("\n")
                    });
                    Ok(())
                }
            }
        }
        Command::Grant(cmd) => {
            let mut c = KeyManagementClient::new(admin_channel(&cli.endpoint, &tls, &session, &out.dry_run).await?);
            match cmd {
                GrantCommand::Create { principal, key, operations, require, require_keys, expires_in } => {
                    let operations =
                        if operations.iter().any(|o| o == "all") { ALL_OPERATIONS.iter().map(|o| o.to_string()).collect() } else { operations };
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                    let r = c
                        .create_grant(pb::CreateGrantRequest {
                            principal,
                            key_id: key,
                            operations,
                            required_encryption_context: require.into_iter().collect(),
                            required_encryption_context_keys: require_keys,
                            expiration_time: expires_in.map_or(0, |p| (now + p) as i64),
                        })
                        .await?
                        .into_inner();
                    let g = r.grant.unwrap_or_default();
                    out.print(grant_json(&g), || grant_text(&g));
                    Ok(())
                }
                GrantCommand::List { key, principal } => {
                    let r = c
                        .list_grants(pb::ListGrantsRequest { key_id: key.unwrap_or_default(), principal: principal.unwrap_or_default() })
                        .await?
                        .into_inner();
                    out.print(Value::Array(r.grants.iter().map(grant_json).collect()), || {
                        r.grants.iter().map(grant_text).collect::<Vec<_>>().join("\n")
                    });
                    Ok(())
                }
                GrantCommand::Revoke { grant_id } => {
                    c.revoke_grant(pb::RevokeGrantRequest { grant_id: grant_id.clone() }).await?;
                    out.print(json!({"revoked": grant_id}), || format!("revoked {grant_id}"));
                    Ok(())
                }
            }
        }
        Command::Audit(cmd) => {
            let mut c = AuditLogClient::new(admin_channel(&cli.endpoint, &tls, &session, &out.dry_run).await?);
            match cmd {
                AuditCommand::Verify => {
                    let r = c.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
                    out.print(
                        json!({
                            "ok": r.ok, "records": r.records, "first_bad_index": r.first_bad_index, "problem": r.problem,
                            "checkpoints": r.checkpoints, "last_checkpoint_seq": r.last_checkpoint_seq,
                            "pruned_through_seq": r.pruned_through_seq,
                        }),
                        || {
                            if r.ok {
                                let pruned = match r.pruned_through_seq {
                                    0 => String::new(),
                                    n => format!("; records 1 to {n} removed by retention, anchored at their signed checkpoint"),
                                };
                                format!(
                                    "audit trail ok: {} records, {} signed checkpoints (the last covers record {}){pruned}",
                                    r.records, r.checkpoints, r.last_checkpoint_seq
                                )
                            } else {
                                format!("audit trail BROKEN at record {}: {}", r.first_bad_index, r.problem)
                            }
                        },
                    );
                    if r.ok {
                        Ok(())
                    } else {
                        Err(Error::Status(tonic::Status::data_loss(format!("the audit chain is broken at record {}", r.first_bad_index))))
                    }
                }
                AuditCommand::Export { since, until, output } => {
                    let mut sink: Box<dyn Write> = match &output {
                        Some(path) => Box::new(BufWriter::new(create_private(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?)),
                        None => Box::new(std::io::stdout().lock()),
                    };
                    let io = |e: std::io::Error| Error::Config(e.to_string());
                    let (mut after, mut written) = (0, 0u64);
                    loop {
                        let r = c
                            .list_audit_records(pb::ListAuditRecordsRequest {
                                after_seq: after,
                                page_size: 1000,
                                since: since.unwrap_or(0),
                                until: until.unwrap_or(0),
                            })
                            .await?
                            .into_inner();
                        for a in &r.records {
                            writeln!(sink, "{}", record_json(a)).map_err(io)?;
                            written += 1;
                        }
                        if r.next_after_seq == 0 {
                            break;
                        }
                        after = r.next_after_seq;
                    }
                    sink.flush().map_err(io)?;
                    if output.is_some() {
                        out.print(json!({"records": written}), || format!("exported {written} records"));
                    }
                    Ok(())
                }
                AuditCommand::Tail { after, count } => {
                    let mut after = match after {
                        Some(seq) => seq,
                        None => c.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner().records,
                    };
                    let mut printed = 0u64;
                    loop {
                        let r = c
                            .list_audit_records(pb::ListAuditRecordsRequest { after_seq: after, page_size: 1000, since: 0, until: 0 })
                            .await?
                            .into_inner();
                        for a in &r.records {
                            println!("{}", record_json(a));
                            after = a.seq;
                            printed += 1;
                            if count.is_some_and(|n| printed >= n) {
                                return Ok(());
                            }
                        }
                        if r.records.is_empty() {
                            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        }
                    }
                }
                AuditCommand::List { after, limit } => {
                    let r = c
                        .list_audit_records(pb::ListAuditRecordsRequest { after_seq: after, page_size: limit, since: 0, until: 0 })
                        .await?
                        .into_inner();
                    let rows: Vec<Value> = r.records.iter().map(record_json).collect();
                    out.print(Value::Array(rows), || {
                        r.records
                            .iter()
                            .map(|a| format!("{} {} {} {} {} {} {}", a.seq, a.time, a.principal, a.operation, a.key_id, a.outcome, a.status))
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                    Ok(())
                }
            }
        }
        Command::DataKey(DataKeyCommand::Generate { key, bytes, without_plaintext, context }) => {
            let ctx = context.map().map_err(|e| Error::Status(tonic::Status::invalid_argument(e)))?;
            let mut c = DataClient::connect(&cli.data_endpoint, &tls).await?;
            let map = ctx.into_iter().collect();
            if without_plaintext {
                let r = c
                    .raw
                    .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
                        key_id: key,
                        key_spec: 0,
                        number_of_bytes: bytes,
                        encryption_context: map,
                        caller_context: None,
                    })
                    .await?
                    .into_inner();
                let blob = B64.encode(&r.ciphertext_blob);
                out.print(json!({"key_id": r.key_id, "key_version": r.key_version, "ciphertext_blob": blob}), || {
                    format!("key {} version {}\nciphertext_blob {blob}", r.key_id, r.key_version)
                });
            } else {
                let mut r = c
                    .raw
                    .generate_data_key(pb::GenerateDataKeyRequest {
                        key_id: key,
                        key_spec: 0,
                        number_of_bytes: bytes,
                        encryption_context: map,
                        caller_context: None,
                    })
                    .await?
                    .into_inner();
                let plaintext = zeroize::Zeroizing::new(B64.encode(std::mem::take(&mut r.plaintext)));
                let blob = B64.encode(&r.ciphertext_blob);
                out.print(
                    json!({"key_id": r.key_id, "key_version": r.key_version, "plaintext": plaintext.as_str(), "ciphertext_blob": blob}),
                    || format!("key {} version {}\nplaintext {}\nciphertext_blob {blob}", r.key_id, r.key_version, plaintext.as_str()),
                );
            }
            Ok(())
        }
        Command::Encrypt { key, input, output, context } => {
            let ctx = context.map().map_err(|e| Error::Status(tonic::Status::invalid_argument(e)))?;
            let mut client = DataClient::connect(&cli.data_endpoint, &tls).await?;
            let n = write_atomically(&output, async |w| client.encrypt_stream(&key, &ctx, &mut open_input(&input)?, w).await).await?;
            out.print(json!({"bytes": n, "out": output}), || format!("encrypted {n} bytes to {}", output.display()));
            Ok(())
        }
        Command::Decrypt { input, output, context } => {
            let ctx = context.map().map_err(|e| Error::Status(tonic::Status::invalid_argument(e)))?;
            let mut client = DataClient::connect(&cli.data_endpoint, &tls).await?;
            let n = write_atomically(&output, async |w| client.decrypt_stream(&ctx, &mut open_input(&input)?, w).await).await?;
            out.print(json!({"bytes": n, "out": output}), || format!("decrypted {n} bytes to {}", output.display()));
            Ok(())
        }
    }
}

/// The commands that only print something about kmsctl itself, with no service to talk to.
fn print_about_itself(command: &Command) -> Option<std::io::Result<()>> {
    use clap::CommandFactory;
    // Rendered in memory first: clap_complete panics on a write error (a closed pipe).
    let mut text = Vec::new();
    match command {
        Command::Completions { shell } => clap_complete::generate(*shell, &mut Cli::command(), "kmsctl", &mut text),
        Command::Manpage => {
            if let Err(e) = clap_mangen::Man::new(Cli::command()).render(&mut text) {
                return Some(Err(e));
            }
        }
        _ => return None,
    }
    Some(std::io::stdout().write_all(&text))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(printed) = print_about_itself(&cli.command) {
        return match printed {
            // A reader that stopped early (`| head`) is not an error.
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kmsctl: error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kmsctl: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmsctl: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Words kmsctl knows, and words it must refuse well.
    const WORDS: &[&str] = &[
        "key",
        "create",
        "describe",
        "list",
        "versions",
        "rotate",
        "enable",
        "disable",
        "compromise",
        "schedule-destruction",
        "cancel-destruction",
        "version",
        "alias",
        "data-key",
        "generate",
        "decrypt",
        "encrypt",
        "login",
        "logout",
        "officer",
        "add",
        "review",
        "sign-off",
        "status",
        "audit",
        "verify",
        "export",
        "tail",
        "principal",
        "grant",
        "revoke",
        "backup",
        "--json",
        "--alias",
        "--key",
        "--context",
        "--in",
        "--out",
        "--since",
        "--until",
        "--state",
        "destroyed",
        "--ids",
        "--page-size",
        "--pending-days",
        "--rotation-period",
        "--operations",
        "--require",
        "--principal",
        "--dev",
        "--name",
        "--totp",
        "--yes",
        "--endpoint",
        "--pki",
        "--help",
        "-h",
        "--version",
        "alias/x",
        "app=hr",
        "=",
        "365d",
        "2026-13-40",
        "-1",
        "0",
        "99999999999999999999",
        "",
        "--",
        "-",
        "\u{0}",
        "é",
        "--context=a=b",
    ];

    /// Real command paths, so that most cases reach a subcommand's own arguments.
    const PATHS: &[&[&str]] = &[
        &[],
        &["key", "create"],
        &["key", "list"],
        &["key", "schedule-destruction"],
        &["key", "version", "disable"],
        &["data-key", "generate"],
        &["grant", "create"],
        &["audit", "export"],
        &["backup", "create"],
        &["backup", "verify"],
        &["encrypt"],
        &["login"],
    ];

    fn argv() -> impl Strategy<Value = Vec<String>> {
        let word = prop_oneof![
            4 => proptest::sample::select(WORDS).prop_map(str::to_string),
            1 => ".{0,40}",
            1 => proptest::collection::vec(any::<char>(), 0..20).prop_map(|c| c.into_iter().collect::<String>()),
        ];
        (proptest::sample::select(PATHS), proptest::collection::vec(word, 0..8))
            .prop_map(|(path, tail)| path.iter().map(|w| w.to_string()).chain(tail).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

        /// TESTPLAN R10 for the CLI: any argument list is parsed or refused, never a panic,
        /// always quickly, and a refusal says what was wrong (an unknown word, a missing or bad
        /// value, naming the argument).
        #[test]
        fn any_argument_list_is_parsed_or_refused_with_a_reason(args in argv()) {
            let started = std::time::Instant::now();
            let parsed = Cli::try_parse_from(std::iter::once("kmsctl".to_string()).chain(args.iter().cloned()));
            prop_assert!(started.elapsed() < std::time::Duration::from_secs(1), "{args:?} took {:?}", started.elapsed());
            if let Err(e) = parsed {
                let message = e.to_string();
                prop_assert!(!message.trim().is_empty(), "{args:?}: an empty refusal");
                if !matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
                    | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand)
                {
                    prop_assert!(message.starts_with("error:"), "{args:?}: {message}");
                }
            }
        }
    }

    #[test]
    fn periods() {
        assert_eq!(parse_period("365d"), Ok(365 * 86_400));
        assert_eq!(parse_period("12h"), Ok(12 * 3600));
        assert_eq!(parse_period("90"), Ok(90));
        assert!(parse_period("1y").is_err());
        assert!(parse_period("d").is_err());
        assert!(parse_period("").is_err());
        assert!(parse_period("99999999999999999999d").is_err());
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01"), Ok(0));
        assert_eq!(parse_time("2026-11-25"), Ok(1_795_564_800));
        assert_eq!(parse_time("2000-03-01T12:30:05Z"), Ok(951_913_805));
        assert_eq!(parse_time("1700000000"), Ok(1_700_000_000));
        for bad in ["2026-13-01", "2026-11", "2026-11-25T10:00:00", "yesterday", "2026-11-25T25:00:00Z"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pairs() {
        assert_eq!(parse_pair("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_pair("=b").is_err());
        assert!(parse_pair("ab").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::{CommandFactory, FromArgMatches};
        Cli::command().debug_assert();
        // Global options must not clash with any subcommand's arguments (clap only finds out
        // when the values are read).
        let lines: &[&[&str]] = &[
            &["key", "describe", "k"],
            &["key", "create", "--alias", "a", "--rotation-period", "30d"],
            &["key", "version", "schedule-destruction", "k", "2", "--pending-days", "7"],
            &["alias", "list", "--key", "k"],
            &["data-key", "generate", "--key", "k", "--context", "a=b"],
            &["encrypt", "--key", "k", "--in", "a", "--out", "b"],
            &["audit", "list", "--after", "3"],
            &["audit", "export", "--since", "2026-11-01", "--until", "2026-11-02T10:00:00Z"],
            &["audit", "tail", "--count", "2"],
            &["grant", "create", "--principal", "p", "--key", "k", "--operations", "Encrypt,Decrypt", "--require", "a=b"],
            &["principal", "disable", "p"],
            &["login", "--name", "ana", "--passphrase-file", "/f", "--totp", "123456"],
            &["login", "--dev"],
            &["review"],
            &["review", "sign-off", "--note", "yearly"],
            &["officer", "add", "bo", "--role", "auditor", "--passphrase-file", "/f"],
            &["--pki", "/p", "--tls-cert", "/c", "--tls-key", "/k", "--ca", "/ca", "key", "list"],
        ];
        for line in lines {
            let matches = Cli::command().try_get_matches_from(std::iter::once(&"kmsctl").chain(line.iter())).unwrap();
            Cli::from_arg_matches(&matches).unwrap();
        }
    }
}
