//! The `kms-server` command line: parse it, set up logging, run. Both binaries are this
//! function: `kms-server`, and `kms-server-test-hooks`, which only the end-to-end harness builds
//! and runs (`hooks.rs`).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{AuditConfig, Config, FacadeListenerConfig, HealthConfig, HsmConfig, KeysConfig, ListenConfig, OfficersConfig, TlsConfig};
use crate::domain::officer::Passphrase;

/// `--version`: a build with the test hooks says so.
const VERSION: &str = if crate::hooks::ENABLED {
    concat!(env!("CARGO_PKG_VERSION"), " (with the end-to-end test hooks: not for production)")
} else {
    env!("CARGO_PKG_VERSION")
};

#[derive(Parser)]
#[command(name = "kms-server", version = VERSION, about = "Client-held key management service")]
struct Cli {
    /// Log lines as text for people, or as JSON lines for a log pipeline (each with its request
    /// id and key id in its span fields). The level comes from KMS_LOG (default info).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Development mode: provisions a SoftHSM2 token and a database under DIR and serves on
    /// loopback.
    Dev {
        #[arg(long, default_value = ".kms-dev")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7400")]
        data_listen: std::net::SocketAddr,
        #[arg(long, default_value = "127.0.0.1:7401")]
        admin_listen: std::net::SocketAddr,
        /// Prometheus metrics (plain HTTP, loopback only).
        #[arg(long, default_value = "127.0.0.1:7402")]
        metrics_listen: std::net::SocketAddr,
        /// The AWS external key store proxy (XKS, HTTPS with the development certificate).
        #[arg(long, default_value = "127.0.0.1:7403")]
        xks_listen: std::net::SocketAddr,
        /// Google Workspace CSE's key service (KACLS, HTTPS with the development certificate).
        #[arg(long, default_value = "127.0.0.1:7404")]
        cse_listen: std::net::SocketAddr,
        /// Seconds between destruction and rotation sweeps.
        #[arg(long, default_value_t = 60)]
        sweep_interval: u64,
        /// The most key versions given a session copy (`hsm.session_copies`); 0 turns them off.
        #[arg(long, default_value_t = 1024)]
        session_copies: usize,
    },
    /// Serves with a configuration file (real HSM module, token, PIN source, listeners).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validates a configuration file without starting.
    CheckConfig { config: PathBuf },
    /// Provisioning with the HSM's security officer: makes the backup key pair (a trusted public
    /// key that `kmsctl backup create` wraps every key under, a private key that unwraps them
    /// at restore); a no-op if the token holds it already. Run it once per token, before the
    /// service starts; on a second HSM for disaster recovery, replicate the pair with the HSM's
    /// own tools instead (docs/operations.md).
    BackupKey {
        #[arg(long)]
        config: PathBuf,
        /// A file holding the security officer's PIN (mode 0600); it is read once and not kept.
        #[arg(long)]
        so_pin_file: PathBuf,
    },
    /// The security officer's ceremony before a reversibility export (`kmsctl export`): makes
    /// the customer's RSA public key a trusted object on the token, for one export (which
    /// destroys it). Runs with the service running or not (docs/export-format.md).
    ExportKey {
        #[arg(long)]
        config: PathBuf,
        /// A file holding the security officer's PIN (mode 0600); it is read once and not kept.
        #[arg(long)]
        so_pin_file: PathBuf,
        /// The customer's RSA public key, PEM (`openssl pkey -pubout`): what the export is
        /// wrapped under.
        #[arg(long)]
        public_key: PathBuf,
    },
    /// Restores a backup file into an empty token holding the same backup key and an empty
    /// data directory, offline (the service must not be running). Keys destroyed after the
    /// backup was taken must be named, or their absence stated: see docs/operations.md.
    Restore {
        #[arg(long)]
        config: PathBuf,
        /// The backup file (`kmsctl backup create --out FILE`).
        file: PathBuf,
        /// A file listing key ids destroyed since the backup was made (one per line, `#`
        /// comments allowed), e.g. from `kmsctl key list --state destroyed`: they are restored
        /// as destroyed, their material left wrapped in the file.
        #[arg(long, required_unless_present = "none_destroyed_since", conflicts_with = "none_destroyed_since")]
        destroyed_since: Option<PathBuf>,
        /// States that no key was destroyed since the backup was made.
        #[arg(long)]
        none_destroyed_since: bool,
    },
    /// Moves a single node's SQLite database into the PostgreSQL database the configuration
    /// names (`[store] backend = "postgres"`), offline, on the same HSM: every key, version and
    /// usage counter, alias, principal, grant, officer, sign-off and the whole audit trail, then
    /// verifies the trail there. Refuses a database that holds anything; FILE is not changed.
    Migrate {
        #[arg(long)]
        config: PathBuf,
        /// The node's database (its data directory's kms.db), the node stopped.
        #[arg(long)]
        from_sqlite: PathBuf,
    },
    /// Creates the first officer, on the server's host (refused once any officer exists), and
    /// prints the TOTP enrolment URI once. The passphrase is read from --passphrase-file, or
    /// from the first line of standard input.
    BootstrapOfficer {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
}

/// The whole program: both binaries' `main`.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    crate::hooks::refuse_outside_the_harness()?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("KMS_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
    }
    let (config, dev) = match cli.command {
        Command::Run { config } => (Config::load(&config)?, false),
        Command::BootstrapOfficer { config, name, passphrase_file } => {
            let config = Config::load(&config)?;
            let text = match passphrase_file {
                Some(path) => std::fs::read_to_string(path)?,
                None => std::io::stdin().lines().next().transpose()?.unwrap_or_default(),
            };
            let passphrase = Passphrase::new(text.trim_end_matches(['\r', '\n']).to_string());
            let enrolment = crate::server::bootstrap_officer(&config, &name, &passphrase)?;
            println!("officer {name} created; add this to an authenticator app (shown once):");
            println!("{}", enrolment.0.as_str());
            return Ok(());
        }
        Command::BackupKey { config, so_pin_file } => {
            let config = Config::load(&config)?;
            let so_pin = crate::config::read_pin_file(&so_pin_file)?;
            let outcome = crate::hsm::pkcs11::create_backup_key(&config.hsm.module, &config.hsm.token_label, &config.pin()?, &so_pin)?;
            println!("backup key pair on token {:?}: {outcome:?}", config.hsm.token_label);
            return Ok(());
        }
        Command::ExportKey { config, so_pin_file, public_key } => {
            let config = Config::load(&config)?;
            let so_pin = crate::config::read_pin_file(&so_pin_file)?;
            let pem = std::fs::read_to_string(&public_key).map_err(|e| anyhow::anyhow!("{}: {e}", public_key.display()))?;
            let customer = crate::hsm::RsaPublicKey::from_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", public_key.display()))?;
            let there = crate::hsm::pkcs11::create_export_key(&config.hsm.module, &config.hsm.token_label, &so_pin, &customer)?;
            let what = if there { "was already trusted" } else { "is now trusted" };
            println!(
                "customer key {} ({} bits) {what} on token {:?}: one export can run",
                customer.fingerprint(),
                customer.bits(),
                config.hsm.token_label
            );
            return Ok(());
        }
        Command::Restore { config, file, destroyed_since, none_destroyed_since: _ } => {
            let config = Config::load(&config)?;
            let destroyed = match destroyed_since {
                Some(path) => crate::backup::read_key_list(&path)?,
                None => Vec::new(),
            };
            let report = crate::backup::restore(&config, &file, &destroyed)?;
            println!("{report}");
            return Ok(());
        }
        Command::Migrate { config, from_sqlite } => {
            let config = Config::load(&config)?;
            println!("{}", crate::migrate::migrate(&config, &from_sqlite)?);
            return Ok(());
        }
        Command::CheckConfig { config } => {
            Config::load(&config)?;
            println!("{}: ok", config.display());
            return Ok(());
        }
        Command::Dev { data_dir, data_listen, admin_listen, metrics_listen, xks_listen, cse_listen, sweep_interval, session_copies } => {
            crate::files::create_dir(&data_dir)?;
            let data_dir = data_dir.canonicalize()?;
            let token = hsm_sim::Token::open_or_provision(&data_dir.join("softhsm"), "kms-dev")?;
            // SoftHSM2 reads SOFTHSM2_CONF when the module initialises; setting it in a running
            // (multi-threaded) process is unsound, so re-execute with it set instead.
            if std::env::var_os(hsm_sim::SOFTHSM2_CONF).as_deref() != Some(token.conf.as_os_str()) {
                let err = std::process::Command::new(std::env::current_exe()?)
                    .args(std::env::args_os().skip(1))
                    .env(hsm_sim::SOFTHSM2_CONF, &token.conf)
                    .exec();
                return Err(err.into());
            }
            // The security officer's one provisioning step, done for the developer: the trusted
            // backup key (`kms-server backup-key` on a real deployment).
            if token.so_pin_file.exists() {
                let so_pin = crate::config::read_pin_file(&token.so_pin_file)?;
                let user_pin = crate::config::read_pin_file(&token.pin_file)?;
                crate::hsm::pkcs11::create_backup_key(&token.module, &token.label, &user_pin, &so_pin)?;
            }
            let pki = crate::tls::DevPki::ensure(&data_dir.join("pki")).map_err(|e| anyhow::anyhow!("{e}"))?;
            let config = Config {
                data_dir: data_dir.clone(),
                outgoing_ca_file: crate::config::system_ca_file(),
                store: Default::default(),
                hsm: HsmConfig {
                    module: token.module.clone(),
                    token_label: token.label.clone(),
                    pin_file: Some(token.pin_file.clone()),
                    pin_env: None,
                    sessions: 4,
                    workers: None,
                    deadline_ms: 2000,
                    session_copies,
                },
                listen: ListenConfig { data: data_listen, admin: admin_listen, metrics: Some(metrics_listen) },
                tls: TlsConfig { cert_file: pki.server_cert.clone(), key_file: pki.server_key.clone(), client_ca_file: pki.ca_cert },
                keys: KeysConfig { sweep_interval_seconds: sweep_interval, ..KeysConfig::default() },
                health: HealthConfig::default(),
                limits: Default::default(),
                audit: AuditConfig::default(),
                officers: OfficersConfig::default(),
                xks: Some(FacadeListenerConfig { listen: xks_listen, cert_file: pki.server_cert.clone(), key_file: pki.server_key.clone() }),
                cse: Some(FacadeListenerConfig { listen: cse_listen, cert_file: pki.server_cert.clone(), key_file: pki.server_key.clone() }),
            };
            config.validate()?;
            println!("development mode: token, PIN, database and TLS certificates under {}", data_dir.display());
            (config, true)
        }
    };
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(crate::server::serve(config, dev))
}
