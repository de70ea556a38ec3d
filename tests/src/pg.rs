//! A real PostgreSQL for the tests: Debian's package, started on a loopback port in a directory
//! of its own, with TLS (a certificate for 127.0.0.1 from a CA the tests trust) and password
//! authentication, as an unprivileged user (PostgreSQL refuses to run as root, and CI runs as
//! root: then the user `kmstest` is made, or found, and every PostgreSQL command runs as it).
//!
//! One cluster serves a whole test run when `cargo xtask test` started it (`pg-cluster start`
//! writes its settings to a file named by `KMS_TEST_PG`); each server gets a database of its own
//! in it. A test that stops or fails over the database starts a cluster of its own.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

/// The unprivileged user PostgreSQL runs as when the tests run as root.
const OS_USER: &str = "kmstest";
/// The role the service connects as.
pub const ROLE: &str = "kms";

/// The directory of Debian's PostgreSQL binaries (the newest version installed).
pub fn bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (Debian's postgresql package: cargo xtask test installs it)")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().context("no initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A running PostgreSQL cluster (stopped, and its directory removed, when dropped, unless it
/// was handed over with `detach`).
#[derive(Debug)]
pub struct Postgres {
    pub dir: PathBuf,
    pub port: u16,
    /// The CA of the server's certificate (`sslrootcert`).
    pub ca: PathBuf,
    /// A file (mode 0600) holding the `kms` role's password (`store.password_file`).
    pub password_file: PathBuf,
    bin: PathBuf,
    os_user: Option<String>,
    owned: bool,
}

impl Postgres {
    /// `initdb`, TLS, `pg_ctl start`, and the `kms` role.
    pub fn start() -> Result<Postgres> {
        let bin = bin_dir()?;
        let os_user = if is_root() { Some(ensure_os_user()?) } else { None };
        let dir = tempfile::Builder::new().prefix("kms-pg-").tempdir_in(std::env::temp_dir())?.keep();
        let pg = Postgres { port: free_port()?, ca: dir.join("ca.pem"), password_file: dir.join("kms.password"), dir, bin, os_user, owned: true };
        pg.init()?;
        pg.start_again()?;
        let password = random_hex(16)?;
        std::fs::write(&pg.password_file, &password)?;
        std::fs::set_permissions(&pg.password_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        pg.psql("postgres", &format!("CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{password}'"))?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A command run as PostgreSQL's user.
    fn as_user(&self, program: &str) -> Command {
        match &self.os_user {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--"]).arg(self.bin.join(program));
                cmd
            }
            None => Command::new(self.bin.join(program)),
        }
    }

    fn init(&self) -> Result<()> {
        // The certificates first, as root: the CA stays with the tests, the server's pair goes
        // into the data directory, readable only by PostgreSQL's user.
        let pki = kms_server::tls::DevPki::ensure(&self.dir.join("pki")).map_err(|e| anyhow::anyhow!("{e}"))?;
        std::fs::copy(&pki.ca_cert, &self.ca)?;
        if let Some(user) = &self.os_user {
            run(Command::new("chown").arg(user).arg(&self.dir))?;
        }
        run(self.as_user("initdb").arg("-D").arg(self.data()).args([
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        ]))?;
        for (from, to) in [(&pki.server_cert, "server.pem"), (&pki.server_key, "server.key")] {
            let dest = self.data().join(to);
            std::fs::copy(from, &dest)?;
            std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            if let Some(user) = &self.os_user {
                run(Command::new("chown").arg(user).arg(&dest))?;
            }
        }
        let conf = format!(
            "\n# kms tests\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nssl = on\n\
             ssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\nmax_connections = 300\nshared_buffers = 64MB\n\
             wal_level = replica\nmax_wal_senders = 4\nlog_min_messages = warning\n",
            self.port,
            self.dir.display()
        );
        append(&self.data().join("postgresql.conf"), &conf)?;
        std::fs::write(
            self.data().join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostssl replication all 127.0.0.1/32 scram-sha-256\n",
        )?;
        if let Some(user) = &self.os_user {
            run(Command::new("chown").arg(user).arg(self.data().join("pg_hba.conf")))?;
        }
        Ok(())
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start_again(&self) -> Result<()> {
        run(self.as_user("pg_ctl").arg("-D").arg(self.data()).arg("-l").arg(self.dir.join("postgres.log")).args(["-w", "-t", "60", "start"]))
    }

    /// `pg_ctl stop` (fast: sessions are ended, nothing acknowledged is lost).
    pub fn stop(&self) -> Result<()> {
        run(self.as_user("pg_ctl").arg("-D").arg(self.data()).args(["-w", "-m", "fast", "stop"]))
    }

    /// Stops at once, without a checkpoint: the primary's machine lost.
    pub fn crash(&self) -> Result<()> {
        run(self.as_user("pg_ctl").arg("-D").arg(self.data()).args(["-w", "-m", "immediate", "stop"]))
    }

    /// A streaming standby of this cluster on a port of its own, in synchronous replication: a
    /// commit returns once the standby has it on disk (`synchronous_standby_names`).
    pub fn start_standby(&self) -> Result<Postgres> {
        let password = random_hex(16)?;
        self.psql("postgres", &format!("CREATE ROLE replicator REPLICATION LOGIN PASSWORD '{password}'"))?;
        let dir = tempfile::Builder::new().prefix("kms-pg-standby-").tempdir_in(std::env::temp_dir())?.keep();
        let standby = Postgres {
            port: free_port()?,
            dir,
            ca: self.ca.clone(),
            password_file: self.password_file.clone(),
            bin: self.bin.clone(),
            os_user: self.os_user.clone(),
            owned: true,
        };
        if let Some(user) = &standby.os_user {
            run(Command::new("chown").arg(user).arg(&standby.dir))?;
        }
        let primary = self.port.to_string();
        run(standby
            .as_user("pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &primary, "-U", "replicator", "-X", "stream", "-R", "--checkpoint=fast", "-D"])
            .arg(standby.data())
            .env("PGPASSWORD", &password)
            .env("PGSSLMODE", "require"))?;
        // Its own port and socket, and a name the primary waits for (after what -R wrote).
        append(
            &standby.data().join("postgresql.conf"),
            &format!("port = {}\nunix_socket_directories = '{}'\n", standby.port, standby.dir.display()),
        )?;
        append(
            &standby.data().join("postgresql.auto.conf"),
            &format!(
                "primary_conninfo = 'host=127.0.0.1 port={primary} user=replicator password={password} sslmode=require application_name=standby'\n"
            ),
        )?;
        standby.start_again()?;
        self.psql("postgres", "ALTER SYSTEM SET synchronous_standby_names = 'standby'")?;
        self.psql("postgres", "SELECT pg_reload_conf()")?;
        for _ in 0..300 {
            if self.psql("postgres", "SELECT sync_state FROM pg_stat_replication")? == "sync" {
                return Ok(standby);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        bail!("the standby never became synchronous")
    }

    /// Promotes a standby to primary (`pg_ctl promote`), waiting until it takes writes.
    pub fn promote(&self) -> Result<()> {
        run(self.as_user("pg_ctl").arg("-D").arg(self.data()).args(["-w", "promote"]))
    }

    /// The service's connection string for `database` on this cluster or `other`, whichever
    /// takes writes (libpq's multi-host form, as a deployment with a standby writes it).
    pub fn url_with(&self, other: &Postgres, database: &str) -> String {
        format!(
            "host=127.0.0.1,127.0.0.1 port={},{} dbname={database} user={ROLE} target_session_attrs=read-write sslmode=verify-full sslrootcert={} connect_timeout=5",
            self.port,
            other.port,
            self.ca.display()
        )
    }

    /// Runs SQL as the superuser over the local socket.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let out = run_output(self.as_user("psql").args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"]).arg(&self.dir).args([
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            sql,
        ]))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A new, empty database owned by the `kms` role; its connection string.
    pub fn create_database(&self, name: &str) -> Result<String> {
        self.psql("postgres", &format!("CREATE DATABASE {name} OWNER {ROLE}"))?;
        Ok(self.url(name))
    }

    /// The service's connection string for `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={database} user={ROLE} sslmode=verify-full sslrootcert={} connect_timeout=5",
            self.port,
            self.ca.display()
        )
    }

    /// Leaves the cluster running when this value is dropped (another process stops it).
    pub fn detach(mut self) -> Self {
        self.owned = false;
        self
    }

    /// What another process needs to use this cluster: written by `pg-cluster start`, read by
    /// `Postgres::shared`.
    pub fn describe(&self) -> String {
        serde_json::json!({
            "dir": self.dir, "port": self.port, "ca": self.ca, "password_file": self.password_file,
            "bin": self.bin, "os_user": self.os_user,
        })
        .to_string()
    }

    /// The cluster a file written by `describe` names.
    pub fn attach(description: &str) -> Result<Postgres> {
        let v: serde_json::Value = serde_json::from_str(description)?;
        let path = |k: &str| v[k].as_str().map(PathBuf::from).with_context(|| format!("{k} missing"));
        Ok(Postgres {
            dir: path("dir")?,
            port: v["port"].as_u64().context("port")? as u16,
            ca: path("ca")?,
            password_file: path("password_file")?,
            bin: path("bin")?,
            os_user: v["os_user"].as_str().map(String::from),
            owned: false,
        })
    }

    /// The cluster `cargo xtask test` started for the run (`KMS_TEST_PG` names its description),
    /// if any.
    pub fn shared() -> Option<Postgres> {
        let file = std::env::var_os("KMS_TEST_PG")?;
        let text = std::fs::read_to_string(file).ok()?;
        Postgres::attach(&text).ok()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.owned {
            let _ = self.as_user("pg_ctl").arg("-D").arg(self.data()).args(["-w", "-m", "immediate", "stop"]).output();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `kmstest`, made if missing (as a system user without a home or a login shell).
fn ensure_os_user() -> Result<String> {
    if !Command::new("id").arg(OS_USER).output().is_ok_and(|o| o.status.success()) {
        let made = Command::new("useradd").args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OS_USER]).output()?;
        // Another test process may have made it at the same moment.
        if !made.status.success() && !Command::new("id").arg(OS_USER).output().is_ok_and(|o| o.status.success()) {
            bail!("useradd {OS_USER}: {}", String::from_utf8_lossy(&made.stderr));
        }
    }
    Ok(OS_USER.to_string())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut raw = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new().append(true).open(path)?.write_all(text.as_bytes())?;
    Ok(())
}

fn run_output(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

fn run(cmd: &mut Command) -> Result<()> {
    run_output(cmd).map(drop)
}
