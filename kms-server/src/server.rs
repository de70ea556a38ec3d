//! Wiring: open the HSM and the store, recover, and serve both planes until a signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kms_proto::v1::audit_log_server::AuditLogServer;
use kms_proto::v1::crypto_server::CryptoServer;
use kms_proto::v1::key_management_server::KeyManagementServer;
use kms_proto::v1::session_server::SessionServer;
use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::api::admin::AdminService;
use crate::api::audit::AuditService;
use crate::api::crypto::CryptoService;
use crate::api::session::SessionService;
use crate::api::{MAX_DATA_MESSAGE_BYTES, MAX_MESSAGE_BYTES, RequestIds, Shared};
use crate::audit::writer::AuditWriter;
use crate::config::Config;
use crate::domain::officer::Passphrase;
use crate::hsm::pkcs11::Pkcs11Hsm;
use crate::hsm::{Hsm, ServiceKey};
use crate::service::officers::{Enrolment, Officers};
use crate::service::{Kms, Settings};
use crate::store::Store;
use crate::tls::ServerTls;

/// Opens the HSM and the store without recovery or serving, and creates the first officer.
/// Safe while the server runs: it touches only the officers table and the service keys.
pub fn bootstrap_officer(config: &Config, name: &str, passphrase: &Passphrase) -> anyhow::Result<Enrolment> {
    let hsm = Pkcs11Hsm::open(&config.hsm.module, &config.hsm.token_label, &config.pin()?, 1)?;
    crate::files::create_dir(&config.data_dir)?;
    let store = Store::open_configured(config)?;
    let officers = Officers {
        hsm: &hsm,
        store: &store,
        secrets: hsm.service_key(ServiceKey::OfficerSecrets)?,
        session_seconds: config.officers.session_minutes * 60,
    };
    Ok(officers.bootstrap(name, passphrase)?)
}

/// In development mode the first start makes an officer `dev-officer` with a random passphrase
/// and writes its passphrase and TOTP secret under the data directory (mode 0600), so that
/// `kmsctl login --dev` works at once. Never outside development mode: there the first officer
/// is made with `kms-server bootstrap-officer`.
fn dev_officer(kms: &Kms, data_dir: &std::path::Path) -> anyhow::Result<()> {
    if !kms.officers().list()?.is_empty() {
        return Ok(());
    }
    let mut raw = crate::secret::SecretBytes::zeroed(18);
    kms.hsm().random(raw.expose_secret_mut())?;
    let passphrase = Passphrase::new(crate::domain::officer::base32(raw.expose_secret()));
    let enrolment = kms.officers().bootstrap("dev-officer", &passphrase)?;
    let secret = enrolment.0.split("secret=").nth(1).and_then(|s| s.split('&').next()).unwrap_or_default();
    for (file, contents) in [("dev-officer.passphrase", passphrase.expose_secret()), ("dev-officer.totp", secret)] {
        crate::files::write(&data_dir.join(file), contents.as_bytes())?;
    }
    println!("development officer: dev-officer (log in with: kmsctl login --dev)");
    Ok(())
}

/// How long calls in flight may take to finish after SIGTERM or SIGINT: well inside systemd's
/// default stop timeout (90 s) and Kubernetes' default grace period (30 s).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Opens everything and serves until SIGINT or SIGTERM. Prints one line per plane with its
/// address (tests and scripts read them) before serving. `dev` adds the development officer and
/// a kmsctl hint.
pub async fn serve(config: Config, dev: bool) -> anyhow::Result<()> {
    if crate::hooks::ENABLED {
        tracing::warn!("this build carries the end-to-end test hooks (kms-server-test-hooks): for the test harness only");
    }
    let pin = config.pin()?;
    let hsm_config = config.hsm.clone();
    let hsm = tokio::task::spawn_blocking(move || -> anyhow::Result<Arc<Pkcs11Hsm>> {
        let hsm = Arc::new(Pkcs11Hsm::open(&hsm_config.module, &hsm_config.token_label, &pin, hsm_config.sessions)?);
        match hsm.start_session_copies(hsm_config.session_copies)? {
            true => tracing::info!(limit = hsm_config.session_copies, "session copies of key versions on"),
            false if hsm_config.session_copies > 0 => {
                tracing::info!("session copies off: the token holds no backup key pair (kms-server backup-key)")
            }
            false => tracing::info!("session copies off (hsm.session_copies = 0)"),
        }
        Ok(hsm)
    })
    .await??;
    crate::files::create_dir(&config.data_dir)?;
    let store_config = config.clone();
    let settings = Settings::of(&config);
    let (kms, store) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Kms, Arc<Store>)> {
        let store = Arc::new(Store::open_configured(&store_config)?);
        Ok((Kms::open(hsm, store.clone(), settings)?, store))
    })
    .await??;
    let kms = Arc::new(kms);
    if dev {
        let (kms, dir) = (kms.clone(), config.data_dir.clone());
        tokio::task::spawn_blocking(move || dev_officer(&kms, &dir)).await??;
    }
    let reviewed = kms.clone();
    if tokio::task::spawn_blocking(move || reviewed.access_review()).await??.signoff_overdue {
        tracing::warn!("the access review has not been signed off in the last 365 days: run `kmsctl review`");
    }
    let checked = kms.clone();
    if let Some(warning) = tokio::task::spawn_blocking(move || checked.check_backup_key()).await? {
        tracing::error!("{warning}");
    }
    // The audit trail since the last signed checkpoint, before serving (a problem is reported,
    // and the service serves anyway); the whole trail soon after, in the background.
    let checked = kms.clone();
    tokio::task::spawn_blocking(move || checked.check_audit_at_startup()).await??;
    let (audit_writer, audit_thread) = AuditWriter::start(
        store,
        kms.checkpointer(config.audit.checkpoint_every_records, config.audit.checkpoint_every_seconds),
        kms.changes_seen(),
    )?;
    let hsm_deadline = Duration::from_millis(config.hsm.deadline_ms);
    let workers = crate::workers::Workers::start(config.hsm.worker_threads())?;
    let shared = Shared {
        kms: kms.clone(),
        ids: Arc::new(RequestIds::default()),
        audit: audit_writer,
        workers,
        deadline: hsm_deadline,
        outgoing_ca: config.outgoing_ca_file.clone(),
    };

    let data = TcpListener::bind(config.listen.data).await?;
    let admin = TcpListener::bind(config.listen.admin).await?;
    let (data_addr, admin_addr) = (data.local_addr()?, admin.local_addr()?);
    println!("data plane (kms.v1.Crypto) listening on {data_addr}");
    println!("admin plane (kms.v1.KeyManagement) listening on {admin_addr}");
    let facade = |listen: &Option<crate::config::FacadeListenerConfig>, what: &str| {
        let Some(listen) = listen else { return anyhow::Ok(None) };
        let tls = crate::tls::https_server(&listen.cert_file, &listen.key_file)?;
        let listener = std::net::TcpListener::bind(listen.listen)?;
        listener.set_nonblocking(true)?;
        println!("{what} listening on {}", listener.local_addr()?);
        Ok(Some((TcpListener::from_std(listener)?, tls)))
    };
    let xks = facade(&config.xks, "xks (AWS external key store proxy, HTTPS)")?;
    let cse = facade(&config.cse, "cse (Google Workspace client-side encryption key service, HTTPS)")?;
    let metrics = match config.listen.metrics {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await?;
            println!("metrics (Prometheus, GET /metrics) listening on {}", listener.local_addr()?);
            Some(tokio::spawn(serve_metrics(listener, kms.clone())))
        }
        None => None,
    };
    if dev {
        // Name the kmsctl built beside this binary when there is one, so the line works as is.
        let kmsctl = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("kmsctl")))
            .filter(|path| path.exists())
            .map_or_else(|| "kmsctl".to_string(), |path| path.display().to_string());
        println!("try: {kmsctl} login --dev && {kmsctl} key create --alias demo");
    }

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let sweeper = tokio::spawn(sweep_loop(kms.clone(), Duration::from_secs(config.keys.sweep_interval_seconds), shutdown_rx.clone()));
    let auditor = tokio::spawn(audit_check_loop(kms.clone(), Duration::from_secs(config.audit.verify_every_hours * 3600), shutdown_rx.clone()));
    let follower = tokio::spawn(follow_loop(kms.clone(), shutdown_rx.clone()));

    let (data_health, data_health_service) = tonic_health::server::health_reporter();
    let (admin_health, admin_health_service) = tonic_health::server::health_reporter();
    let health = Health { planes: vec![(data_health, "kms.v1.Crypto"), (admin_health, "kms.v1.KeyManagement")] };
    health.set(probe(&kms).await).await;
    let prober =
        tokio::spawn(probe_loop(kms.clone(), health, Duration::from_secs(config.health.probe_interval_seconds), hsm_deadline, shutdown_rx.clone()));

    let xks = xks
        .map(|(listener, tls)| tokio::spawn(crate::facade::xks::listener::serve(listener, tls, shared.clone(), shutdown_rx.clone(), SHUTDOWN_GRACE)));
    let notifier = tokio::spawn(crate::notify::deliver_loop(shared.clone(), shutdown_rx.clone()));
    let cse = cse
        .map(|(listener, tls)| tokio::spawn(crate::facade::cse::listener::serve(listener, tls, shared.clone(), shutdown_rx.clone(), SHUTDOWN_GRACE)));
    let crypto = CryptoServer::new(CryptoService(shared.clone())).max_decoding_message_size(MAX_DATA_MESSAGE_BYTES);
    let keymgmt = KeyManagementServer::new(AdminService(shared.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let audit = AuditLogServer::new(AuditService(shared.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let session = SessionServer::new(SessionService(shared)).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let tls = ServerTls::load(&config.tls.cert_file, &config.tls.key_file, &config.tls.client_ca_file)?;
    let data_server =
        plane(data, data_addr, tls.data_plane(), shutdown_rx.clone(), |server| server.add_service(crypto).add_service(data_health_service));
    let admin_server = plane(admin, admin_addr, tls.admin_plane(), shutdown_rx, |server| {
        server.add_service(keymgmt).add_service(audit).add_service(session).add_service(admin_health_service)
    });

    let signals = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = shutdown_tx.send(true);
        Ok::<(), std::io::Error>(())
    };
    // Serve until a signal; then stop accepting and give the calls in flight SHUTDOWN_GRACE to
    // finish (each still gets its durable audit record) before going on without them.
    let serving = async {
        let (d, a) = tokio::join!(data_server, admin_server);
        d.and(a)
    };
    tokio::pin!(serving);
    tokio::select! {
        served = &mut serving => served?,
        signalled = signals => {
            signalled?;
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut serving).await {
                Ok(served) => served?,
                Err(_) => tracing::warn!(grace = ?SHUTDOWN_GRACE, "calls still in flight after the grace period; stopping without them"),
            }
        }
    }
    for facade in [xks, cse].into_iter().flatten() {
        // Each returns within its own grace once told to stop.
        let _ = facade.await;
    }
    notifier.abort();
    sweeper.abort();
    auditor.abort();
    follower.abort();
    prober.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    let flushed = kms.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || flushed.flush_uses()).await? {
        tracing::warn!(error = %e, "could not record the last uses of principals and grants");
    }
    // The services (and with them every audit writer handle) are gone: let the writer finish
    // what is queued and sign its last checkpoint before the process exits.
    tokio::task::spawn_blocking(move || audit_thread.join()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The health reporters of both planes.
struct Health {
    planes: Vec<(tonic_health::server::HealthReporter, &'static str)>,
}

impl Health {
    /// NOT_SERVING while the HSM probe fails: load balancers stop sending traffic, and
    /// `grpc-health-probe` / Kubernetes see it.
    async fn set(&self, probe: Result<(), String>) {
        let status = match &probe {
            Ok(()) => tonic_health::ServingStatus::Serving,
            Err(e) => {
                tracing::error!(error = %e, "HSM health probe failed: NOT_SERVING");
                tonic_health::ServingStatus::NotServing
            }
        };
        for (reporter, service) in &self.planes {
            reporter.set_service_status(*service, status).await;
            reporter.set_service_status("", status).await;
        }
    }
}

/// Probes the HSM every `every`, each probe under the HSM deadline. A probe that does not come
/// back in time reports the HSM unavailable, and no second probe is started while it is stuck,
/// so a hung HSM does not take one session per tick.
async fn probe_loop(kms: Arc<Kms>, health: Health, every: Duration, deadline: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    let mut stuck: Option<tokio::task::JoinHandle<crate::error::Result<()>>> = None;
    // The HSM's last known availability: each change is an audit record (and so an event).
    let mut available = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let mut task = match stuck.take() {
            Some(task) if !task.is_finished() => {
                stuck = Some(task);
                health.set(Err("the HSM has not answered the last probe".into())).await;
                continue;
            }
            _ => {
                let kms = kms.clone();
                tokio::task::spawn_blocking(move || kms.probe_hsm())
            }
        };
        // Whether the HSM itself failed (not the store, which the probe also reads).
        let (result, hsm_failed) = match tokio::time::timeout(deadline, &mut task).await {
            Ok(Ok(result)) => (result.as_ref().map_err(|e| e.to_string()).copied(), matches!(result, Err(crate::error::Error::Hsm(_)))),
            Ok(Err(e)) => (Err(e.to_string()), false),
            Err(_) => {
                stuck = Some(task);
                let why = format!("the HSM did not answer the probe within {} ms", deadline.as_millis());
                kms.probe_stalled(&why);
                (Err(why), !kms.probing_store())
            }
        };
        if hsm_failed == available {
            available = !hsm_failed;
            let (kms, detail) = (kms.clone(), result.as_ref().err().cloned().unwrap_or_else(|| "the HSM answers again".to_string()));
            let recorded = tokio::task::spawn_blocking(move || kms.record_hsm_health(available, &detail)).await;
            if !matches!(recorded, Ok(Ok(()))) {
                tracing::warn!("the HSM's change of health could not be recorded in the audit trail");
            }
        }
        health.set(result).await;
    }
}

/// `Kms::probe_hsm` on the blocking pool.
async fn probe(kms: &Arc<Kms>) -> Result<(), String> {
    let kms = kms.clone();
    match tokio::task::spawn_blocking(move || kms.probe_hsm()).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Serves `GET /metrics` (Prometheus text format) on plain HTTP/1.1; anything else is 404.
async fn serve_metrics(listener: TcpListener, kms: Arc<Kms>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                continue;
            }
        };
        let kms = kms.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let kms = kms.clone();
                async move {
                    let response = if request.method() == hyper::Method::GET && request.uri().path() == "/metrics" {
                        let body = tokio::task::spawn_blocking(move || {
                            let status = kms.status().inspect_err(|e| tracing::warn!(error = %e, "metrics: the service's status could not be read"));
                            crate::metrics::metrics().exposition(status.map(|s| s.gauges()).ok().as_ref())
                        })
                        .await
                        .unwrap_or_default();
                        hyper::Response::builder().header("content-type", crate::metrics::CONTENT_TYPE).body(body)
                    } else {
                        hyper::Response::builder().status(hyper::StatusCode::NOT_FOUND).body("not found: try GET /metrics\n".to_string())
                    };
                    response.map_err(|e| std::io::Error::other(e.to_string()))
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

/// Serves one plane: its service and health (added by `add`), plus reflection.
async fn plane(
    listener: TcpListener,
    addr: SocketAddr,
    tls: tonic::transport::ServerTlsConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    add: impl FnOnce(&mut Server) -> tonic::transport::server::Router,
) -> anyhow::Result<()> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kms_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let mut server = Server::builder().tls_config(tls)?.timeout(Duration::from_secs(30)).http2_keepalive_interval(Some(Duration::from_secs(30)));
    let router = add(&mut server).add_service(reflection);
    tracing::info!(%addr, "serving");
    router
        // TCP_NODELAY on every accepted connection: without it Nagle's algorithm holds a small
        // response back until the client's delayed ACK (40 ms on Linux), which showed as a
        // p99.9 of 42 ms under load.
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await?;
    Ok(())
}

/// Runs `job` every `every` (the first time at once) until shutdown.
async fn periodically<F: std::future::Future<Output = ()>>(
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut job: impl FnMut() -> F,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        job().await;
    }
}

async fn sweep_loop(kms: Arc<Kms>, every: Duration, shutdown: tokio::sync::watch::Receiver<bool>) {
    periodically(every, shutdown, || {
        let kms = kms.clone();
        async move {
            let swept = tokio::task::spawn_blocking(move || {
                // The checkpoints signed since the last sweep, with their records (a failure
                // here is reported by the check itself; an error reading them is logged).
                if let Err(e) = kms.check_new_audit_segments() {
                    tracing::error!(error = %e, "the audit segment check could not run; will retry");
                }
                kms.sweep()
            });
            match swept.await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(actions = n, "sweep done"),
                Ok(Err(e)) => tracing::error!(error = %e, "sweep failed; will retry"),
                Err(e) => tracing::error!(error = %e, "sweep task failed"),
            }
        }
    })
    .await
}

/// With several nodes, keeps this node's registry up with the others' changes: every 100 ms it
/// looks at what the audit writer saw at its last commit, and every second at the store itself.
async fn follow_loop(kms: Arc<Kms>, shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut ticks = 0u64;
    periodically(Duration::from_millis(100), shutdown, || {
        let kms = kms.clone();
        ticks += 1;
        let ask_store = ticks.is_multiple_of(10);
        async move {
            match tokio::task::spawn_blocking(move || kms.follow_other_nodes(ask_store)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not follow the other nodes' changes; will retry"),
                Err(e) => tracing::error!(error = %e, "follow task failed"),
            }
        }
    })
    .await
}

/// Verifies the whole audit trail now (soon after startup) and then every `every`
/// (`audit.verify_every_hours`), in the background: its length grows with the trail.
async fn audit_check_loop(kms: Arc<Kms>, every: Duration, shutdown: tokio::sync::watch::Receiver<bool>) {
    periodically(every, shutdown, || {
        let kms = kms.clone();
        async move {
            let started = std::time::Instant::now();
            match tokio::task::spawn_blocking(move || kms.check_whole_audit(crate::service::AuditCheck::Full)).await {
                Ok(Ok(())) => tracing::info!(elapsed = ?started.elapsed(), "audit trail checked"),
                Ok(Err(e)) => tracing::error!(error = %e, "the audit check could not run; will retry at the next one"),
                Err(e) => tracing::error!(error = %e, "audit check task failed"),
            }
        }
    })
    .await
}
