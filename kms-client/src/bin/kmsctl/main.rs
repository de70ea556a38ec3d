//! `kmsctl`: the security officer's command line.
//!
//! Every command prints a short human-readable answer, or JSON with `--json`, and fails with one
//! line on stderr and a non-zero exit status.
//!
//! This file holds the global options, the list of commands and their dispatch; each command
//! group lives in its own module, with its arguments, its calls and its printing. What several
//! groups share is in `output.rs` (printing, private files, times) and `admin.rs` (the admin
//! plane's channel and `--dry-run`).

mod access;
mod admin;
mod approval;
mod audit;
mod backup;
mod cse;
mod data;
mod events;
mod key;
mod officer;
mod output;
mod report;
mod status;
mod transfer;
mod xks;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kms_client::{Error, Tls};

use admin::DryRun;
use output::Out;

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
    /// Why you make this change (printable ASCII, at most 256 characters): kept with the
    /// approval request a quorum policy makes of it.
    #[arg(long, global = true, env = "KMS_REASON")]
    reason: Option<String>,
    /// Runs an approved request whose result comes back to you (a backup, an export, an
    /// import): repeat the command that made the request, with the request's id.
    #[arg(long, global = true)]
    approval: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Keys and their lifecycle.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Aliases (alias/NAME) that name keys.
    #[command(subcommand)]
    Alias(key::AliasCommand),
    /// Data keys for envelope encryption.
    #[command(subcommand)]
    DataKey(data::DataKeyCommand),
    /// Logs an officer in (passphrase and TOTP code) and keeps the session for later commands.
    Login(officer::LoginArgs),
    /// Ends the session.
    Logout,
    /// Officers and auditors.
    #[command(subcommand)]
    Officer(officer::OfficerCommand),
    /// The yearly access review: every officer, auditor, principal and grant with its last use;
    /// `review sign-off` records that an officer reviewed it.
    Review(access::ReviewArgs),
    /// The service's state: version, uptime, HSM health and token, keys by state, usage nearest
    /// the limit, what is due in the next 30 days, and warnings.
    Status,
    /// The audit trail.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Backups: every live key wrapped under the HSM's trusted backup key, with the metadata and
    /// the audit trail, in one integrity-protected file (restored offline with `kms-server restore`).
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Reversibility: every live key version wrapped inside the HSM under the customer's RSA
    /// public key (made trusted first by the HSM's security officer: `kms-server export-key`),
    /// with the metadata and the audit trail, in a bundle OpenSSL alone unwraps
    /// (docs/export-format.md).
    Export(transfer::ExportArgs),
    /// Imports a bundle another instance exported under this one's import parameters
    /// (`kmsctl key import-parameters`): every key, with its id, comes back.
    Import(transfer::ImportArgs),
    /// Workload principals (certificate identities) that may hold grants.
    #[command(subcommand)]
    Principal(access::PrincipalCommand),
    /// Grants: what a principal may do with a key (nothing is allowed without one).
    #[command(subcommand)]
    Grant(access::GrantCommand),
    /// AWS external key stores (XKS): key stores, their credentials, and the keys AWS may use.
    #[command(subcommand)]
    Xks(xks::XksCommand),
    /// Google Workspace client-side encryption: the KACLS URL, the key, the trusted issuers.
    #[command(subcommand)]
    Cse(cse::CseCommand),
    /// Quorum policies: how many officers must approve a covered operation.
    #[command(subcommand)]
    Quorum(approval::QuorumCommand),
    /// Approval requests: list, show, approve or reject (with your passphrase and TOTP again).
    #[command(subcommand)]
    Approval(approval::ApprovalCommand),
    /// Events as they happen (officers and auditors).
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// Notifications: HTTPS webhooks or syslog, for events at the severities you choose.
    #[command(subcommand)]
    Notify(events::NotifyCommand),
    /// The Level 2 evidence report, signed in the HSM, and its verification.
    #[command(subcommand)]
    Report(report::ReportCommand),
    /// Envelope-encrypts a file of any size under a fresh data key (docs/file-format.md).
    Encrypt(data::EncryptArgs),
    /// Whether a data-plane call would be allowed now, and why: for one principal, or for every
    /// principal holding a grant on the key ("who can decrypt payroll?"). Each check the data
    /// plane makes, in its order: rate limit, principal, grants and their conditions, key state.
    Explain(access::ExplainArgs),
    /// Prints the shell completion script for SHELL (bash, zsh, fish, elvish, powershell), e.g.
    /// `kmsctl completions bash > /usr/share/bash-completion/completions/kmsctl`.
    Completions { shell: clap_complete::Shell },
    /// Prints kmsctl's man page (roff), for packaging.
    #[command(hide = true)]
    Manpage,
    /// Decrypts a file made by `kmsctl encrypt`.
    Decrypt(data::DecryptArgs),
}

impl Command {
    /// Whether the command changes the service's state (and so takes `--dry-run`).
    fn changes(&self) -> bool {
        match self {
            Command::Key(c) => c.changes(),
            Command::Alias(c) => c.changes(),
            Command::DataKey(c) => c.changes(),
            Command::Officer(c) => c.changes(),
            Command::Review(c) => c.changes(),
            Command::Audit(c) => c.changes(),
            Command::Backup(c) => c.changes(),
            Command::Principal(c) => c.changes(),
            Command::Grant(c) => c.changes(),
            Command::Xks(c) => c.changes(),
            Command::Cse(c) => c.changes(),
            Command::Quorum(c) => c.changes(),
            Command::Notify(c) => c.changes(),
            Command::Approval(c) => c.changes(),
            Command::Export(_) | Command::Import(_) => true,
            Command::Login(_)
            | Command::Report(_)
            | Command::Events(_)
            | Command::Logout
            | Command::Status
            | Command::Encrypt(_)
            | Command::Decrypt(_)
            | Command::Explain(_)
            | Command::Completions { .. }
            | Command::Manpage => false,
        }
    }
}

/// What a command takes from the global options: the two planes' endpoints, the TLS files, where
/// the officer's session is kept, the development directory (for `login --dev`), and how to print.
struct Context {
    endpoint: String,
    data_endpoint: String,
    tls: Tls,
    session: PathBuf,
    dev_dir: PathBuf,
    out: Out,
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
    if let Some(reason) = &cli.reason {
        admin::set_reason(reason)?;
    }
    if let Some(id) = &cli.approval {
        admin::set_approval(id)?;
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
    let ctx =
        Context { tls: cli.tls(), session: cli.session_path(), endpoint: cli.endpoint, data_endpoint: cli.data_endpoint, dev_dir: cli.dev_dir, out };
    match cli.command {
        Command::Completions { .. } | Command::Manpage => Ok(()), // printed by `main`
        Command::Key(cmd) => cmd.run(&ctx).await,
        Command::Alias(cmd) => cmd.run(&ctx).await,
        Command::Login(args) => args.run(&ctx).await,
        Command::Backup(cmd) => cmd.run(&ctx).await,
        Command::Export(args) => args.run(&ctx).await,
        Command::Import(args) => args.run(&ctx).await,
        Command::Logout => officer::logout(&ctx).await,
        Command::Officer(cmd) => cmd.run(&ctx).await,
        Command::Explain(args) => args.run(&ctx).await,
        Command::Status => status::run(&ctx).await,
        Command::Review(args) => args.run(&ctx).await,
        Command::Principal(cmd) => cmd.run(&ctx).await,
        Command::Grant(cmd) => cmd.run(&ctx).await,
        Command::Xks(cmd) => cmd.run(&ctx).await,
        Command::Cse(cmd) => cmd.run(&ctx).await,
        Command::Report(cmd) => cmd.run(&ctx).await,
        Command::Quorum(cmd) => cmd.run(&ctx).await,
        Command::Events(cmd) => cmd.run(&ctx).await,
        Command::Notify(cmd) => cmd.run(&ctx).await,
        Command::Approval(cmd) => cmd.run(&ctx).await,
        Command::Audit(cmd) => cmd.run(&ctx).await,
        Command::DataKey(cmd) => cmd.run(&ctx).await,
        Command::Encrypt(args) => args.run(&ctx).await,
        Command::Decrypt(args) => args.run(&ctx).await,
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
