//! The end-to-end harness: each test gets its own SoftHSM2 token, SQLite file and loopback
//! ports, and talks to the real `kms-server` binary over gRPC and through `kmsctl`.
//!
//! Binaries are found beside the test executable (`target/<profile>/`); `cargo xtask test`
//! builds them before running the suite. Token inspection runs in a child process
//! (`token-inspect`), so each process initialises PKCS#11 once and `SOFTHSM2_CONF` is never
//! changed in a running process.

pub mod cluster;
pub mod pg;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hsm_sim::Token;
use kms_client::Channel;
use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;

/// The server binary the harness runs: `kms-server` built with the end-to-end test hooks
/// (`cargo xtask test` builds it; no workspace build does). Every command made by
/// [`hooked_server`] tells it that the harness started it.
pub const HOOKED_SERVER: &str = "kms-server-test-hooks";

/// `kms-server-test-hooks`, ready to take arguments.
pub fn hooked_server() -> Command {
    let mut cmd = Command::new(bin(HOOKED_SERVER));
    cmd.env(kms_server::hooks::HARNESS, "1");
    cmd
}

/// `cmd` run under `umask` (through `sh`, since setting a child's umask takes `unsafe` code):
/// the same program, arguments, environment and directory.
pub fn with_umask(cmd: Command, umask: Option<u32>) -> Command {
    let Some(umask) = umask else { return cmd };
    let mut wrapped = Command::new("sh");
    wrapped.arg("-c").arg(format!("umask {umask:03o} && exec \"$@\"")).arg("sh").arg(cmd.get_program()).args(cmd.get_args());
    for (name, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(name, value),
            None => wrapped.env_remove(name),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

/// Where the workspace's binaries are: the directory above the test executable's `deps/`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build the binaries first (`cargo xtask test` does)", path.display());
    path
}

/// A committed fixture's SoftHSM2 token (its `softhsm/tokens` and `softhsm/user.pin`), copied
/// into `dir/softhsm` with a configuration of its own.
pub fn token_from_fixture(fixture: &Path, dir: &Path, label: &str) -> Result<Token> {
    let softhsm = dir.join("softhsm");
    copy_dir(&fixture.join("softhsm"), &softhsm)?;
    let conf = softhsm.join("softhsm2.conf");
    std::fs::write(&conf, format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", softhsm.join("tokens").display()))?;
    Ok(Token {
        dir: softhsm.clone(),
        conf,
        module: hsm_sim::find_module()?,
        label: label.to_string(),
        pin_file: softhsm.join("user.pin"),
        so_pin_file: softhsm.join("so.pin"),
    })
}

/// Copies a directory tree (a SoftHSM2 token's files), each file private to its owner.
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// Settings a test may change; the rest of the configuration is fixed.
#[derive(Debug, Clone)]
pub struct Options {
    pub rotation_threshold: u64,
    pub encryption_limit: u64,
    pub usage_reservation_block: u64,
    pub sweep_interval_seconds: u64,
    pub checkpoint_every_records: u64,
    /// `audit.retention_days` (0: keep everything).
    pub audit_retention_days: u32,
    /// Seconds added to the clock audit retention reads (the `test-hooks` build only).
    pub retention_clock_offset: i64,
    /// Seconds added to the clock the destruction and rotation sweep reads (the same).
    pub sweep_clock_offset: i64,
    /// How often the session copies' idle pass runs, in milliseconds (the same; default 5 min).
    pub session_copy_idle_ms: Option<u64>,
    /// The server's `KMS_LOG` filter.
    pub log: &'static str,
    /// `--log-format json` instead of text.
    pub json_logs: bool,
    /// `KMS_TEST_CRASH_AT`: the crash point (`Operation/step`) the server aborts at.
    pub crash_at: Option<String>,
    /// `KMS_TEST_PAUSE_AT`: the crash point the server waits three seconds at.
    pub pause_at: Option<String>,
    /// `hsm.deadline_ms`.
    pub hsm_deadline_ms: u64,
    /// `limits.principal_calls_per_second` (0: no limit) and `limits.principal_burst`.
    pub principal_calls_per_second: f64,
    pub principal_burst: f64,
    /// Provision the backup key pair (`kms-server backup-key`) before the first start, and keep
    /// a copy of the token as it is then: the "second HSM" holding the same backup key that a
    /// disaster-recovery drill restores into (`replace_token_with_replica`).
    pub backup_key: bool,
    /// The umask the server and `kmsctl` run under (default: the test's own).
    pub umask: Option<u32>,
    /// The store: SQLite in the data directory, or a database of its own in PostgreSQL (the
    /// run's shared cluster, else one started for this server). `KMS_TEST_BACKEND=postgres`
    /// makes PostgreSQL the default.
    pub backend: Backend,
    /// Another server's development PKI directory, copied before the first start: the two
    /// trust each other's listeners (one CA), as two key services calling each other do.
    pub pki_from: Option<PathBuf>,
}

/// The store a test server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `KMS_TEST_BACKEND`'s (`sqlite` when unset).
    pub fn from_env() -> Backend {
        match std::env::var("KMS_TEST_BACKEND").as_deref() {
            Ok("postgres") => Backend::Postgres,
            _ => Backend::Sqlite,
        }
    }
}

/// A server's PostgreSQL database: the cluster it lives in (kept alive with the server when it
/// was started for it), and its connection string. Several nodes share one.
#[derive(Debug, Clone)]
pub struct Database {
    pub cluster: std::sync::Arc<pg::Postgres>,
    pub name: String,
    pub url: String,
}

impl Database {
    /// A fresh database in the run's shared cluster, or in a cluster started for it.
    pub fn create() -> Result<Database> {
        let cluster = std::sync::Arc::new(match pg::Postgres::shared() {
            Some(shared) => shared,
            None => pg::Postgres::start()?,
        });
        Database::create_in(cluster)
    }

    pub fn create_in(cluster: std::sync::Arc<pg::Postgres>) -> Result<Database> {
        let mut raw = [0u8; 6];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut raw)?;
        let name = format!("kms_{}", raw.iter().map(|b| format!("{b:02x}")).collect::<String>());
        let url = cluster.create_database(&name)?;
        Ok(Database { cluster, name, url })
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rotation_threshold: 1 << 30,
            encryption_limit: 3_865_470_566,
            usage_reservation_block: 4096,
            sweep_interval_seconds: 1,
            checkpoint_every_records: 1000,
            audit_retention_days: 0,
            retention_clock_offset: 0,
            sweep_clock_offset: 0,
            session_copy_idle_ms: None,
            log: "debug",
            json_logs: false,
            crash_at: None,
            pause_at: None,
            hsm_deadline_ms: 2000,
            principal_calls_per_second: 0.0,
            principal_burst: 1.0,
            backup_key: false,
            umask: None,
            backend: Backend::from_env(),
            pki_from: None,
        }
    }
}

/// The admin-plane client type: a TLS channel that carries the officer's session token.
pub type Admin = KeyManagementClient<kms_client::AdminChannel>;

/// The officer every test server is bootstrapped with.
pub const OFFICER: &str = "test-officer";
/// Its passphrase (test servers only).
pub const OFFICER_PASSPHRASE: &str = "correct horse battery staple";

/// A running server with its own token and database.
#[derive(Debug)]
pub struct Server {
    pub dir: tempfile::TempDir,
    pub token: Token,
    pub options: Options,
    child: Option<Child>,
    pub data_addr: String,
    pub admin_addr: String,
    /// The Prometheus metrics listener.
    pub metrics_addr: String,
    /// The XKS facade's HTTPS listener.
    pub xks_addr: String,
    /// The CSE facade's HTTPS listener.
    pub cse_addr: String,
    /// The bootstrap officer's TOTP secret (base32), from its enrolment URI.
    pub officer_totp: String,
    /// The bootstrap officer's session token.
    pub session: String,
    /// The PostgreSQL database, when the server uses one.
    pub database: Option<Database>,
}

/// The current TOTP code of a base32 secret, one step ahead of `step_offset` steps.
pub fn totp_now(base32_secret: &str, step_offset: i64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs() as i64;
    kms_client::totp::code(base32_secret, (now + step_offset * 30) as u64).expect("a base32 secret")
}

/// The base32 secret in an otpauth:// URI.
pub fn otpauth_secret(uri: &str) -> String {
    uri.split("secret=").nth(1).and_then(|s| s.split('&').next()).unwrap_or_default().to_string()
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Server {
        let dir = tempfile::tempdir().expect("temporary directory");
        let token = Token::open_or_provision(&dir.path().join("softhsm"), "kms-test").expect("token provisioned");
        Server::start_in(dir, token, options)
    }

    /// Starts on an existing directory (token and database), e.g. a committed fixture.
    pub fn start_in(dir: tempfile::TempDir, token: Token, options: Options) -> Server {
        let database = (options.backend == Backend::Postgres).then(|| Database::create().expect("a PostgreSQL database"));
        Server::start_node(dir, token, options, database, None)
    }

    /// A server set up on `dir` and `token`, its configuration written, not started: for a
    /// command to run first (`server_command`, e.g. `kms-server migrate`); `restart` starts it.
    pub fn configured(dir: tempfile::TempDir, token: Token, options: Options, database: Option<Database>) -> Server {
        let server = Server {
            dir,
            token,
            options,
            child: None,
            data_addr: String::new(),
            admin_addr: String::new(),
            metrics_addr: String::new(),
            xks_addr: String::new(),
            cse_addr: String::new(),
            officer_totp: String::new(),
            session: String::new(),
            database,
        };
        server.write_config().expect("configuration written");
        server
    }

    /// Starts one node of a cluster: on `database`, and with `officer` (the TOTP secret and a
    /// session of the officer the first node bootstrapped) when it is not the first.
    pub fn start_node(
        dir: tempfile::TempDir,
        token: Token,
        options: Options,
        database: Option<Database>,
        officer: Option<(String, String)>,
    ) -> Server {
        let mut server = Server::configured(dir, token, options, database);
        if let Some((totp, session)) = officer {
            // A later node of a cluster: the officer and the backup key are the first node's,
            // and any officer session works on any node.
            server.officer_totp = totp;
            server.spawn().expect("server started");
            std::fs::write(server.session_path(), &session).expect("session written");
            server.session = session;
            return server;
        }
        if server.options.backup_key {
            server.provision_backup_key().expect("backup key provisioned");
        }
        server.bootstrap_officer().expect("officer bootstrapped");
        server.spawn().expect("server started");
        server.login().expect("officer logged in");
        server
    }

    /// `kms-server bootstrap-officer` on the server's host, before it starts.
    fn bootstrap_officer(&mut self) -> Result<()> {
        self.write_config()?;
        let pass = self.dir.path().join("officer.passphrase");
        std::fs::write(&pass, OFFICER_PASSPHRASE)?;
        let out = hooked_server()
            .args(["bootstrap-officer", "--name", OFFICER, "--config"])
            .arg(self.config_path())
            .arg("--passphrase-file")
            .arg(&pass)
            .env(hsm_sim::SOFTHSM2_CONF, &self.token.conf)
            .output()?;
        if !out.status.success() {
            bail!("bootstrap-officer failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let uri = stdout.lines().find(|l| l.starts_with("otpauth://")).context("no enrolment URI printed")?;
        self.officer_totp = otpauth_secret(uri);
        Ok(())
    }

    /// The key ceremony: `kms-server backup-key` with the token's SO PIN, then a copy of the
    /// token's files as they are (holding only the backup key pair).
    fn provision_backup_key(&mut self) -> Result<()> {
        self.write_config()?;
        let out = self.server_command(&["backup-key", "--so-pin-file", &self.token.so_pin_file.display().to_string()])?;
        if !out.status.success() {
            bail!("backup-key failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        copy_dir(&self.token.dir.join("tokens"), &self.token_replica())?;
        Ok(())
    }

    fn token_replica(&self) -> PathBuf {
        self.token.dir.join("tokens.replica")
    }

    /// Wipes the token: its files are replaced by the copy made right after the backup key pair
    /// was (an empty HSM that holds the same backup key). The server must be stopped.
    pub fn replace_token_with_replica(&self) {
        let tokens = self.token.dir.join("tokens");
        std::fs::remove_dir_all(&tokens).expect("token files removed");
        copy_dir(&self.token_replica(), &tokens).expect("replica copied");
    }

    /// Moves the server onto another PostgreSQL database (its configuration rewritten). The
    /// server must be stopped.
    pub fn use_database(&mut self, database: Database) {
        self.database = Some(database);
        self.write_config().expect("configuration written");
    }

    /// Runs `kms-server ARGS --config <this server's config>` on the server's host (with the
    /// token and the crash point the options name) and returns its output.
    pub fn server_command(&self, args: &[&str]) -> Result<Output> {
        Ok(hooked_server()
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .env(hsm_sim::SOFTHSM2_CONF, &self.token.conf)
            .env("KMS_TEST_CRASH_AT", self.options.crash_at.as_deref().unwrap_or_default())
            .env("KMS_TEST_PAUSE_AT", self.options.pause_at.as_deref().unwrap_or_default())
            .output()?)
    }

    /// Logs the bootstrap officer in again (after a restore ended every session). A TOTP step is
    /// accepted once, so the next one is tried when this one was used.
    pub fn relogin(&mut self) {
        if self.login().is_err() {
            self.login_at(1).expect("officer logged in again");
        }
    }

    /// Logs the bootstrap officer in over gRPC, and leaves the session where kmsctl finds it.
    fn login(&mut self) -> Result<()> {
        self.login_at(0)
    }

    fn login_at(&mut self, step_offset: i64) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (addr, tls, code) = (self.admin_addr.clone(), self.tls(), totp_now(&self.officer_totp, step_offset));
        let token = std::thread::spawn(move || {
            rt.block_on(async move {
                let channel = kms_client::channel(&format!("https://{addr}"), &tls).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut r = kms_proto::v1::session_client::SessionClient::new(channel)
                    .login(pb::LoginRequest { name: OFFICER.into(), passphrase: OFFICER_PASSPHRASE.into(), totp_code: code })
                    .await?
                    .into_inner();
                Ok::<String, anyhow::Error>(std::mem::take(&mut r.session_token))
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("login thread panicked"))??;
        std::fs::write(self.session_path(), &token)?;
        self.session = token;
        Ok(())
    }

    /// Where kmsctl keeps this server's officer session.
    pub fn session_path(&self) -> PathBuf {
        self.dir.path().join("kmsctl.session")
    }

    /// Turns a storage fault on (`disk-full`, `read-only`) or off (`None`): the server applies
    /// it before its next write transaction (`test-hooks` builds).
    pub fn store_fault(&self, fault: Option<&str>) {
        let path = self.dir.path().join("store-faults");
        match fault {
            Some(f) => std::fs::write(path, f).expect("fault file written"),
            None => {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// The file the server's HSM fault injector reads (`test-hooks` builds).
    pub fn hsm_faults_path(&self) -> PathBuf {
        self.dir.path().join("hsm-faults")
    }

    /// Injects `FUNCTION FAULT` (e.g. `C_Encrypt CKR_DEVICE_ERROR`, `* hang`) into every later
    /// PKCS#11 call of that function, or clears the fault with `None`.
    pub fn hsm_fault(&self, fault: Option<&str>) {
        match fault {
            Some(f) => std::fs::write(self.hsm_faults_path(), f).expect("fault file written"),
            None => {
                let _ = std::fs::remove_file(self.hsm_faults_path());
            }
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("kms.toml")
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("kms.db")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The development PKI of this server (a CA, its server certificate, one workload's).
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// TLS settings of a workload holding the development certificate.
    pub fn tls(&self) -> kms_client::Tls {
        kms_client::Tls::dev(&self.pki_dir())
    }

    /// A TLS channel to one of this server's listeners, with the given client settings.
    pub async fn channel_with(&self, addr: &str, tls: &kms_client::Tls) -> Result<Channel, kms_client::Error> {
        kms_client::channel(&format!("https://{addr}"), tls).await
    }

    /// A TLS channel with the development workload certificate.
    pub async fn channel(&self, addr: &str) -> Channel {
        self.channel_with(addr, &self.tls()).await.expect("listener reachable over TLS")
    }

    fn write_config(&self) -> Result<()> {
        if let Some(from) = &self.options.pki_from
            && !self.pki_dir().exists()
        {
            std::fs::create_dir_all(self.pki_dir())?;
            for file in std::fs::read_dir(from)? {
                let file = file?;
                std::fs::copy(file.path(), self.pki_dir().join(file.file_name()))?;
            }
        }
        let pki = kms_server::tls::DevPki::ensure(&self.pki_dir()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let o = &self.options;
        let config = format!(
            "data_dir = {:?}\noutgoing_ca_file = {:?}\n\
             [hsm]\nmodule = {:?}\ntoken_label = {:?}\npin_file = {:?}\nsessions = 4\ndeadline_ms = {}\n\
             [listen]\ndata = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\n\
             [tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n\
             [keys]\nrotation_threshold = {}\nencryption_limit = {}\nusage_reservation_block = {}\nsweep_interval_seconds = {}\n\
             [health]\nprobe_interval_seconds = 1\n\
             [audit]\ncheckpoint_every_records = {}\nretention_days = {}\n\
             [limits]\nprincipal_calls_per_second = {:?}\nprincipal_burst = {:?}\n\
             [xks]\nlisten = \"127.0.0.1:0\"\ncert_file = {:?}\nkey_file = {:?}\n\
             [cse]\nlisten = \"127.0.0.1:0\"\ncert_file = {:?}\nkey_file = {:?}\n{}",
            self.dir.path(),
            pki.ca_cert,
            self.token.module,
            self.token.label,
            self.token.pin_file,
            o.hsm_deadline_ms,
            pki.server_cert,
            pki.server_key,
            pki.ca_cert,
            o.rotation_threshold,
            o.encryption_limit,
            o.usage_reservation_block,
            o.sweep_interval_seconds,
            o.checkpoint_every_records,
            o.audit_retention_days,
            o.principal_calls_per_second,
            o.principal_burst,
            pki.server_cert,
            pki.server_key,
            pki.server_cert,
            pki.server_key,
            self.database.as_ref().map_or_else(String::new, |db| format!(
                "[store]\nbackend = \"postgres\"\nurl = {:?}\npassword_file = {:?}\n",
                db.url, db.cluster.password_file
            )),
        );
        std::fs::write(self.config_path(), config)?;
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        self.write_config()?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let mut server = hooked_server();
        server.args(["--log-format", if self.options.json_logs { "json" } else { "text" }, "run", "--config"]).arg(self.config_path());
        let mut child = with_umask(server, self.options.umask)
            .env(hsm_sim::SOFTHSM2_CONF, &self.token.conf)
            .env("KMS_LOG", self.options.log)
            .env("KMS_TEST_RETENTION_CLOCK_OFFSET", self.options.retention_clock_offset.to_string())
            .env("KMS_TEST_SWEEP_CLOCK_OFFSET", self.options.sweep_clock_offset.to_string())
            .env("KMS_TEST_SESSION_COPY_IDLE_MS", self.options.session_copy_idle_ms.map(|ms| ms.to_string()).unwrap_or_default())
            .env("KMS_TEST_CRASH_AT", self.options.crash_at.as_deref().unwrap_or_default())
            .env("KMS_TEST_PAUSE_AT", self.options.pause_at.as_deref().unwrap_or_default())
            .env("KMS_TEST_HSM_FAULTS", self.hsm_faults_path())
            .env("KMS_TEST_STORE_FAULTS", self.dir.path().join("store-faults"))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawning kms-server")?;
        let stdout = child.stdout.take().context("stdout")?;
        // Read the two "listening on" lines on a thread, so a server that hangs cannot hang the
        // test past the deadline.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(std::io::Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut data, mut admin, mut metrics) = (None, None, None);
        while data.is_none() || admin.is_none() || metrics.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                    bail!("kms-server did not start; its log:\n{log}");
                }
            };
            let addr = line.rsplit(' ').next().unwrap_or_default().to_string();
            if line.starts_with("data plane") {
                data = Some(addr);
            } else if line.starts_with("admin plane") {
                admin = Some(addr);
            } else if line.starts_with("metrics") {
                metrics = Some(addr);
            } else if line.starts_with("xks") {
                self.xks_addr = addr;
            } else if line.starts_with("cse") {
                self.cse_addr = addr;
            }
        }
        self.data_addr = data.unwrap_or_default();
        self.admin_addr = admin.unwrap_or_default();
        self.metrics_addr = metrics.unwrap_or_default();
        self.child = Some(child);
        Ok(())
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        self.terminate(Duration::from_secs(20));
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit; its status, `None` if it did not
    /// exit in time (it is then killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let status = wait_for(&mut child, timeout);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }

    /// Waits (up to `timeout`) for the server to exit on its own; true if it did.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> bool {
        let exited = self.child.as_mut().is_none_or(|child| wait_for(child, timeout).is_some());
        if exited {
            self.child = None;
        }
        exited
    }

    /// SIGKILL: no chance to clean up.
    /// Whether the server's process was started and not stopped or killed since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn().expect("server restarted");
    }

    pub fn restart_after_kill9(&mut self) {
        self.kill9();
        self.spawn().expect("server restarted");
    }

    pub async fn data(&self) -> CryptoClient<Channel> {
        CryptoClient::new(self.channel(&self.data_addr).await)
    }

    /// The admin plane, as the bootstrap officer.
    pub async fn admin(&self) -> Admin {
        self.admin_as(Some(&self.session)).await
    }

    /// The admin plane with a given session token (or none).
    pub async fn admin_as(&self, token: Option<&str>) -> Admin {
        let channel = self.channel(&self.admin_addr).await;
        KeyManagementClient::new(kms_client::AdminChannel::new(channel, kms_client::Bearer::new(token).expect("a valid token")))
    }

    /// Runs `kmsctl` against this server, as the bootstrap officer.
    pub fn kmsctl(&self, args: &[&str]) -> Output {
        self.kmsctl_with_session(&self.session_path(), args)
    }

    /// Runs `kmsctl` against this server with the session kept in `session`.
    pub fn kmsctl_with_session(&self, session: &Path, args: &[&str]) -> Output {
        self.kmsctl_command(session, args).output().expect("kmsctl ran")
    }

    /// The `kmsctl` command `kmsctl_with_session` runs, for a test to add to (its environment).
    pub fn kmsctl_command(&self, session: &Path, args: &[&str]) -> Command {
        let mut kmsctl = Command::new(bin("kmsctl"));
        kmsctl
            .arg("--endpoint")
            .arg(format!("https://{}", self.admin_addr))
            .arg("--data-endpoint")
            .arg(format!("https://{}", self.data_addr))
            .arg("--pki")
            .arg(self.pki_dir())
            .arg("--session-file")
            .arg(session)
            .args(args)
            .env_remove("KMS_ENDPOINT")
            .env_remove("KMS_DATA_ENDPOINT")
            .env_remove("KMS_CA")
            .env_remove("KMS_TLS_CERT")
            .env_remove("KMS_TLS_KEY")
            .env_remove("KMS_SESSION_FILE")
            .env_remove("KMS_DEV_DIR");
        with_umask(kmsctl, self.options.umask)
    }

    /// A read-only connection to the server's database.
    /// Every row of the service's state tables, as text: everything but the audit trail (which
    /// records each refusal) and last-use times (which the sweeper writes), so that a test can
    /// show a refused call changed nothing.
    pub fn state_snapshot(&self) -> String {
        let db = self.db();
        let mut out = String::new();
        for table in ["keys", "key_versions", "aliases", "intents", "principals", "grants", "officers"] {
            let mut stmt = db.prepare(&format!("SELECT * FROM {table} ORDER BY rowid")).expect("a state table");
            let columns: Vec<usize> = (0..stmt.column_count()).filter(|i| stmt.column_name(*i).is_ok_and(|n| n != "last_used_at")).collect();
            let rows =
                stmt.query_map([], |r| Ok(columns.iter().map(|i| format!("{:?}", r.get_ref(*i))).collect::<Vec<_>>().join("|"))).expect("rows");
            for row in rows {
                out.push_str(&row.expect("a row"));
                out.push('\n');
            }
        }
        out
    }

    /// `GET PATH` on the metrics listener: the status line and the body.
    pub fn http_get(&self, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&self.metrics_addr).expect("metrics listener");
        write!(stream, "GET {path} HTTP/1.1\r\nHost: kms\r\nConnection: close\r\n\r\n").expect("request sent");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response read");
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (head.lines().next().unwrap_or_default().to_string(), body.to_string())
    }

    /// The value of the metrics series `series` (name and labels, as exposed) now; `None` when
    /// the series is absent.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics");
        body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Runs SQL on the server's database behind its back (SQL both engines take): what time or
    /// an intruder does to the rows.
    pub fn sql(&self, sql: &str) {
        match &self.database {
            None => {
                let db = rusqlite::Connection::open(self.db_path()).expect("database opens");
                // The service may be writing: wait for its lock rather than fail.
                db.busy_timeout(Duration::from_secs(5)).expect("a busy timeout");
                db.execute_batch(sql).expect("the SQL ran");
            }
            Some(db) => {
                db.cluster.psql(&db.name, sql).expect("the SQL ran");
            }
        }
    }

    /// A read-only connection to the server's database: its SQLite file, or for PostgreSQL a
    /// SQLite copy of the database as it is now (the copy backups are made of).
    pub fn db(&self) -> rusqlite::Connection {
        let path = match &self.database {
            None => self.db_path(),
            Some(_) => {
                static EXPORTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = EXPORTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = self.dir.path().join(format!("postgres-copy-{n}.db"));
                let config = kms_server::config::Config::load(&self.config_path()).expect("the server's configuration");
                // On a thread of its own: the PostgreSQL client may not run inside a test's runtime.
                std::thread::scope(|s| {
                    s.spawn(|| {
                        kms_server::store::Store::open_configured(&config).and_then(|store| store.export_sqlite(&path)).expect("the database copied")
                    })
                    .join()
                    .expect("the copy's thread")
                });
                path
            }
        };
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).expect("database opens")
    }

    /// The versions the database says have material, as HSM labels (`kms:KEY:VERSION`), sorted.
    pub fn live_version_labels(&self) -> Vec<String> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT key_id, version FROM key_versions WHERE state != 'Destroyed' ORDER BY key_id, version").expect("query");
        let rows = stmt.query_map([], |r| Ok(format!("kms:{}:{}", r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).expect("rows");
        rows.map(|r| r.expect("a row")).collect()
    }

    /// The labels of the customer key objects on the token, sorted (to compare with
    /// `live_version_labels`).
    pub fn object_labels(&self) -> Vec<String> {
        let mut labels: Vec<String> = self.token_objects().iter().map(|o| o["label"].as_str().unwrap_or_default().to_string()).collect();
        labels.sort();
        labels
    }

    /// Every customer key object on the token (label `kms:…`), as `token-inspect` sees it from
    /// a second process. The health canary (`kms-health-canary`) is left out.
    pub fn token_objects(&self) -> Vec<serde_json::Value> {
        let out = self.inspect("list");
        let all = serde_json::from_slice::<Vec<serde_json::Value>>(&out).expect("token-inspect prints JSON");
        all.into_iter().filter(|o| o["label"].as_str().is_some_and(|l| l.starts_with("kms:"))).collect()
    }

    /// Runs `token-inspect ACTION` against this server's token and returns its stdout.
    pub fn inspect(&self, action: &str) -> Vec<u8> {
        let out = Command::new(bin("token-inspect"))
            .arg(action)
            .arg(&self.token.module)
            .arg(&self.token.label)
            .arg(&self.token.pin_file)
            .env(hsm_sim::SOFTHSM2_CONF, &self.token.conf)
            .output()
            .expect("token-inspect ran");
        assert!(out.status.success(), "token-inspect failed: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Builds an encryption context.
pub fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The identity of the development workload certificate every test client presents.
pub const WORKLOAD: &str = kms_server::tls::DEV_WORKLOAD_ID;

/// Adds an officer or auditor (as the bootstrap officer) and returns their TOTP secret.
pub async fn add_officer(server: &Server, name: &str, role: &str, passphrase: &str) -> String {
    let mut admin = server.admin().await;
    let r = admin
        .create_officer(pb::CreateOfficerRequest { name: name.into(), role: role.into(), passphrase: passphrase.into() })
        .await
        .expect("officer created")
        .into_inner();
    assert!(r.otpauth_uri.starts_with(&format!("otpauth://totp/KMS:{name}?secret=")), "{}", r.otpauth_uri);
    otpauth_secret(&r.otpauth_uri)
}

/// Logs an officer in with the current TOTP code and returns the session token.
pub async fn login_officer(server: &Server, name: &str, passphrase: &str, totp_secret: &str) -> String {
    let mut session = kms_proto::v1::session_client::SessionClient::new(server.channel(&server.admin_addr).await);
    let mut r = session
        .login(pb::LoginRequest { name: name.into(), passphrase: passphrase.into(), totp_code: totp_now(totp_secret, 0) })
        .await
        .expect("logged in")
        .into_inner();
    std::mem::take(&mut r.session_token)
}

/// Registers the development workload as a principal (once; later calls change nothing).
pub async fn register_workload(admin: &mut Admin) {
    match admin.create_principal(pb::PrincipalRequest { name: WORKLOAD.into() }).await {
        Ok(_) => {}
        Err(e) if e.code() == tonic::Code::AlreadyExists => {}
        Err(e) => panic!("registering the workload: {e}"),
    }
}

/// Grants the development workload every operation on `key`.
pub async fn grant_all(admin: &mut Admin, key: &str) -> String {
    register_workload(admin).await;
    let operations = ["GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "Encrypt", "Decrypt", "ReEncryptFrom", "ReEncryptTo"];
    admin
        .create_grant(pb::CreateGrantRequest {
            principal: WORKLOAD.into(),
            key_id: key.into(),
            operations: operations.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("grant created")
        .into_inner()
        .grant
        .expect("grant")
        .grant_id
}

/// A GenerateDataKey request for an AES-256 data key under `key`, with `context`.
pub fn gdk(key: &str, context: &[(&str, &str)]) -> pb::GenerateDataKeyRequest {
    pb::GenerateDataKeyRequest {
        key_id: key.into(),
        key_spec: pb::DataKeySpec::Aes256.into(),
        number_of_bytes: 0,
        encryption_context: ctx(context),
        caller_context: None,
    }
}

/// Encrypts `calls` one-byte plaintexts under `key`, one after the other; how many each key
/// version took.
pub async fn encrypt_counting_versions(mut data: CryptoClient<Channel>, key: String, calls: usize) -> HashMap<u32, u64> {
    let mut per_version: HashMap<u32, u64> = HashMap::new();
    for _ in 0..calls {
        let r = data
            .encrypt(pb::EncryptRequest {
                key_id: key.clone(),
                plaintext: b"x".to_vec(),
                encryption_context: Default::default(),
                caller_context: None,
            })
            .await
            .unwrap()
            .into_inner();
        *per_version.entry(r.key_version).or_default() += 1;
    }
    per_version
}

/// Creates a key over gRPC, grants the development workload every operation on it, and
/// returns its id.
pub async fn create_key(admin: &mut Admin, alias: &str) -> String {
    let r = admin
        .create_key(pb::CreateKeyRequest { description: "test".into(), alias: alias.into(), rotation_period_seconds: 0 })
        .await
        .expect("key created")
        .into_inner();
    let key_id = r.key.expect("metadata").key_id;
    grant_all(admin, &key_id).await;
    key_id
}

/// Waits (up to `timeout`) for `child` to exit; its status, `None` if it is still running.
pub fn wait_for(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTPS server of the test's own on 127.0.0.1 (a webhook receiver, an issuer's key set),
/// with `server`'s development certificate, so that the server trusts it: each request gets the
/// answer `answer` makes of it. Its address.
pub async fn https_endpoint<F, A>(server: &Server, answer: F) -> std::net::SocketAddr
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> A + Clone + Send + Sync + 'static,
    A: std::future::Future<Output = hyper::Response<http_body_util::Full<hyper::body::Bytes>>> + Send + 'static,
{
    let pki = kms_server::tls::DevPki::paths(&server.pki_dir());
    let tls = kms_server::tls::https_server(&pki.server_cert, &pki.server_key).expect("the development certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (acceptor, answer) = (acceptor.clone(), answer.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else { return };
                let service = hyper::service::service_fn(move |request| {
                    let answer = answer(request);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

/// Waits for `check` to hold, polling until a deadline (tests never sleep to synchronise).
pub fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
