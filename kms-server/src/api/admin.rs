//! `kms.v1.KeyManagement`, the admin plane.

use kms_proto::v1 as pb;
use kms_proto::v1::key_management_server::KeyManagement;
use tonic::{Request, Response, Status};

use super::{Audit, Shared, Who, approval, context, key_ref, officer, optional_key_ref, reason};
use crate::domain::ids::{AliasName, KeyId, KeyRef};
use crate::domain::lifecycle::{DEFAULT_PENDING_DAYS, KeyState, KeyTransition, MAX_PENDING_DAYS, MIN_PENDING_DAYS, VersionState, VersionTransition};
use crate::domain::officer::{Passphrase, Role};
use crate::domain::policy::{Grant, Operation, PrincipalState, valid_principal};
use crate::error::Error;
use crate::service::events::Severity;
use crate::service::export::WrappedVersion;
use crate::service::quorum::Covered;
use crate::service::{KeyView, Kms, VersionView};
use crate::store::PrincipalRecord;

/// The admin plane's gRPC service.
#[derive(Debug, Clone)]
pub struct AdminService(pub Shared);

/// The longest key description (the AWS KMS limit is 8,192 characters; 1,024 is plenty for a
/// human-readable note and keeps listings small).
const MAX_DESCRIPTION: usize = 1024;
/// Automatic rotation: at least daily, at most every 100 years (Google Cloud KMS accepts one day
/// and up; AWS KMS 90 to 2,560 days).
const MIN_ROTATION_SECS: u64 = 86_400;
const MAX_ROTATION_SECS: u64 = 100 * 365 * 86_400;
/// ListKeys page sizes (the AWS KMS `Limit` range is 1 to 1,000, default 100).
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

fn key_state(s: KeyState) -> pb::KeyState {
    match s {
        KeyState::Enabled => pb::KeyState::Enabled,
        KeyState::Disabled => pb::KeyState::Disabled,
        KeyState::Compromised => pb::KeyState::Compromised,
        KeyState::PendingDestruction => pb::KeyState::PendingDestruction,
        KeyState::Destroyed => pb::KeyState::Destroyed,
    }
}

fn version_state(s: VersionState) -> pb::KeyVersionState {
    match s {
        VersionState::Enabled => pb::KeyVersionState::VersionEnabled,
        VersionState::Disabled => pb::KeyVersionState::VersionDisabled,
        VersionState::PendingDestruction => pb::KeyVersionState::VersionPendingDestruction,
        VersionState::Destroyed => pb::KeyVersionState::VersionDestroyed,
    }
}

fn metadata(v: &KeyView) -> pb::KeyMetadata {
    let r = &v.record;
    pb::KeyMetadata {
        key_id: r.key_id.to_string(),
        description: r.description.clone(),
        state: key_state(r.state).into(),
        key_spec: "AES_256".into(),
        primary_version: r.primary_version,
        creation_time: r.created_at,
        rotation_period_seconds: r.rotation_period_secs,
        next_rotation_time: r.next_rotation_at.unwrap_or(0),
        destruction_time: r.destruction_at.unwrap_or(0),
        aliases: v.aliases.iter().map(ToString::to_string).collect(),
        material_missing: v.material_missing,
        origin: r.origin.as_str().into(),
    }
}

fn version(v: &VersionView) -> pb::KeyVersion {
    pb::KeyVersion {
        version: v.record.version,
        state: version_state(v.record.state).into(),
        primary: v.primary,
        creation_time: v.record.created_at,
        encryptions: v.encryptions,
        rotation_threshold: v.limits.rotation_threshold,
        encryption_limit: v.limits.encryption_limit,
        destruction_time: v.record.destruction_at.unwrap_or(0),
        material_missing: v.material_missing,
    }
}

fn pending_days(days: u32) -> Result<u32, Error> {
    match days {
        0 => Ok(DEFAULT_PENDING_DAYS),
        MIN_PENDING_DAYS..=MAX_PENDING_DAYS => Ok(days),
        _ => Err(Error::invalid(
            "pending_window_days",
            format!("is {days}; it must be {MIN_PENDING_DAYS} to {MAX_PENDING_DAYS} (or 0 for {DEFAULT_PENDING_DAYS})"),
        )),
    }
}

fn version_number(n: u32) -> Result<u32, Error> {
    if n == 0 { Err(Error::invalid("key_version", "is required (versions start at 1)")) } else { Ok(n) }
}

fn key_view_response(v: KeyView) -> pb::KeyMetadataResponse {
    pb::KeyMetadataResponse { key: Some(metadata(&v)) }
}

fn version_response(v: KeyView, n: u32) -> Result<pb::KeyVersionResponse, Error> {
    let ver = v.version(n).ok_or_else(|| Error::NotFound { what: format!("version {n}") })?;
    Ok(pb::KeyVersionResponse { key_id: v.record.key_id.to_string(), version: Some(version(ver)) })
}

fn principal_name<'a>(field: &'static str, name: &'a str) -> Result<&'a str, Error> {
    if valid_principal(name) { Ok(name) } else { Err(Error::invalid(field, "must be 1 to 512 bytes without control characters")) }
}

/// A grantable operation's name.
fn operation(field: &'static str, name: &str) -> Result<Operation, Error> {
    Operation::parse(name).ok_or_else(|| {
        let known: Vec<&str> = Operation::ALL.iter().map(|o| o.as_str()).collect();
        Error::invalid(field, format!("{name:?} is not one of {}", known.join(", ")))
    })
}

fn principal(p: PrincipalRecord) -> pb::Principal {
    pb::Principal { name: p.name, state: p.state.as_str().to_string(), creation_time: p.created_at }
}

fn xks_key_store(directory: &crate::service::xks::Directory, s: &crate::store::XksKeyStoreRecord) -> pb::XksKeyStore {
    pb::XksKeyStore {
        name: s.name.clone(),
        uri_prefix: s.uri_prefix.clone(),
        region: s.region.clone(),
        creation_time: s.created_at,
        credentials: directory
            .credentials_of(&s.name)
            .into_iter()
            .map(|c| pb::XksCredential { access_key_id: c.access_key_id.clone(), creation_time: c.created_at })
            .collect(),
    }
}

/// The answer that shows a credential's secret, the one time it is shown.
fn quorum_policy(p: crate::store::QuorumPolicyRecord) -> pb::QuorumPolicy {
    pb::QuorumPolicy {
        operation: p.operation,
        key_id: p.key_id.map(|k| k.to_string()).unwrap_or_default(),
        required: p.required,
        update_time: p.updated_at,
    }
}

fn approval_request(r: crate::store::ApprovalRequestRecord, votes: Vec<crate::store::VoteRecord>) -> pb::ApprovalRequest {
    pb::ApprovalRequest {
        id: r.id,
        operation: r.operation,
        key_id: r.key_id.map(|k| k.to_string()).unwrap_or_default(),
        summary: r.summary,
        arguments: r.arguments,
        requester: r.requester,
        reason: r.reason,
        required: r.required,
        state: r.state,
        creation_time: r.created_at,
        expiration_time: r.expires_at,
        decision_time: r.decided_at.unwrap_or(0),
        result: r.result,
        votes: votes.into_iter().map(|v| pb::ApprovalVote { officer: v.officer, approve: v.approve, time: v.time }).collect(),
    }
}

/// Google Workspace CSE's settings and issuers as the admin plane shows them.
fn cse_configuration(config: &crate::service::cse::Config) -> pb::CseConfiguration {
    let issuers = config
        .issuers
        .iter()
        .map(|i| pb::CseIssuer {
            iss: i.iss.clone(),
            token: i.token.clone(),
            audiences: i.audiences.clone(),
            key_ids: serde_json::from_str::<serde_json::Value>(&i.jwks)
                .ok()
                .and_then(|v| v["keys"].as_array().map(|keys| keys.iter().filter_map(|k| k["kid"].as_str().map(str::to_string)).collect()))
                .unwrap_or_default(),
            jwks_url: i.jwks_url.clone().unwrap_or_default(),
            update_time: i.updated_at,
        })
        .collect();
    match &config.settings {
        Some(s) => pb::CseConfiguration {
            configured: true,
            kacls_url: s.kacls_url.clone(),
            key_id: s.key_id.to_string(),
            allow_guests: s.guests,
            privileged_users: s.privileged_users.clone(),
            migration_sources: s.migration_sources.clone(),
            owner_domain: s.owner_domain.clone().unwrap_or_default(),
            update_time: s.updated_at,
            issuers,
        },
        None => pb::CseConfiguration { issuers, ..Default::default() },
    }
}

fn xks_credential(kms: &Kms, key_store: &str, new: crate::service::xks::NewCredential) -> pb::XksCredentialResponse {
    let directory = kms.xks_directory();
    pb::XksCredentialResponse {
        key_store: directory.stores().find(|s| s.name == key_store).map(|s| xks_key_store(&directory, s)),
        access_key_id: new.access_key_id,
        secret_access_key: new.secret.expose_secret().to_string(),
    }
}

fn grant(g: Grant) -> pb::Grant {
    pb::Grant {
        grant_id: g.grant_id,
        principal: g.principal,
        key_id: g.key_id.to_string(),
        operations: g.operations.iter().map(|o| o.as_str().to_string()).collect(),
        required_encryption_context: g.required_pairs.into_iter().collect(),
        required_encryption_context_keys: g.required_keys.into_iter().collect(),
        expiration_time: g.expires_at.unwrap_or(0),
        creation_time: g.created_at,
    }
}

impl AdminService {
    async fn principal_state(
        &self,
        who: Who,
        operation: &'static str,
        name: String,
        to: PrincipalState,
    ) -> Result<Response<pb::PrincipalResponse>, Status> {
        self.0
            .call(operation, who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let name = principal_name("name", &name)?;
                Ok(pb::PrincipalResponse { principal: Some(principal(kms.set_principal_state(caller, name, to)?)) })
            })
            .await
    }

    /// An officer's approval or rejection of a request, with their credentials again.
    async fn vote(&self, operation: &'static str, request: Request<pb::VoteRequest>, approve: bool) -> Result<Response<pb::ApprovalRequest>, Status> {
        let who = officer(&request, Role::Officer);
        let mut r = request.into_inner();
        let passphrase = Passphrase::new(std::mem::take(&mut r.passphrase));
        let code = zeroize::Zeroizing::new(std::mem::take(&mut r.totp_code));
        self.0
            .call(operation, who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let view = kms.vote(caller, &r.id, approve, &passphrase, &code)?;
                Ok(approval_request(view.request, view.votes))
            })
            .await
    }

    async fn key_transition(
        &self,
        who: Who,
        operation: &'static str,
        key_id: String,
        t: KeyTransition,
        days: u32,
        reason: String,
    ) -> Result<Response<pb::KeyMetadataResponse>, Status> {
        self.0
            .call(operation, who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let key = key_ref("key_id", &key_id)?;
                let days = if t == KeyTransition::ScheduleDestruction { pending_days(days)? } else { 0 };
                if let Some(id) = kms.key_id_of(&key) {
                    let key_id = id.to_string();
                    match t {
                        KeyTransition::ScheduleDestruction => {
                            kms.gate(caller, Covered::ScheduleKeyDestruction { key_id, pending_days: days }, &reason)?
                        }
                        KeyTransition::Compromise => kms.gate(caller, Covered::MarkKeyCompromised { key_id }, &reason)?,
                        _ => {}
                    }
                }
                kms.transition_key(caller, &key, t, days).map(key_view_response)
            })
            .await
    }

    async fn version_transition(
        &self,
        who: Who,
        operation: &'static str,
        (key_id, n): (String, u32),
        t: VersionTransition,
        days: u32,
        reason: String,
    ) -> Result<Response<pb::KeyVersionResponse>, Status> {
        self.0
            .call(operation, who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let key = key_ref("key_id", &key_id)?;
                let n = version_number(n)?;
                let days = if t == VersionTransition::ScheduleDestruction { pending_days(days)? } else { 0 };
                if let (VersionTransition::ScheduleDestruction, Some(id)) = (t, kms.key_id_of(&key)) {
                    let covered = Covered::ScheduleKeyVersionDestruction { key_id: id.to_string(), version: n, pending_days: days };
                    kms.gate(caller, covered, &reason)?;
                }
                version_response(kms.transition_version(caller, &key, n, t, days)?, n)
            })
            .await
    }
}

fn event_message(e: crate::service::events::Event) -> pb::Event {
    pb::Event {
        seq: e.seq,
        time: e.time,
        kind: e.kind,
        severity: e.severity.as_str().into(),
        principal: e.principal,
        key_id: e.key_id.unwrap_or_default(),
        key_version: e.key_version.unwrap_or(0),
        outcome: e.outcome,
        detail: e.detail,
    }
}

fn subscription_message(s: crate::store::SubscriptionRecord) -> pb::Subscription {
    pb::Subscription {
        id: s.id,
        url: s.url,
        min_severity: s.min_severity,
        cursor: s.cursor,
        delivered: s.delivered,
        failures: s.failures,
        next_attempt_time: s.next_attempt_at,
        last_error: s.last_error,
        creation_time: s.created_at,
    }
}

fn severity(field: &'static str, text: &str, default: Severity) -> Result<Severity, Error> {
    match text {
        "" => Ok(default),
        s => Severity::parse(s).ok_or_else(|| Error::invalid(field, "must be info, warning or critical")),
    }
}

/// How often a watch looks for new records.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

#[tonic::async_trait]
impl KeyManagement for AdminService {
    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<pb::Event, Status>>;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let who = officer(&request, Role::Auditor);
        let r = request.into_inner();
        let shared_kms = self.0.kms.clone();
        let stream = self
            .0
            .call("Watch", who, Audit::EveryOutcome, move |kms, _, _| {
                let min = severity("min_severity", &r.min_severity, Severity::Info)?;
                let mut cursor = if r.after_seq > 0 { r.after_seq } else { kms.audit_end()? };
                let kinds: std::collections::HashSet<String> = r.kinds.into_iter().collect();
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                let kms = shared_kms;
                // Polls the trail (every node's records) until the caller goes away.
                tokio::runtime::Handle::current().spawn(async move {
                    loop {
                        let (k, after) = (kms.clone(), cursor);
                        let read = tokio::task::spawn_blocking(move || k.events_after(after, 500)).await;
                        let Ok(Ok((events, last))) = read else {
                            let _ = tx.send(Err(Status::unavailable("the audit trail could not be read; watch again"))).await;
                            return;
                        };
                        let full = last - cursor >= 500;
                        cursor = last;
                        for e in events.into_iter().filter(|e| e.severity >= min && (kinds.is_empty() || kinds.contains(&e.kind))) {
                            if tx.send(Ok(event_message(e))).await.is_err() {
                                return;
                            }
                        }
                        if full {
                            // More records are waiting: read on before sleeping.
                            continue;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(WATCH_EVERY) => {}
                            _ = tx.closed() => return,
                        }
                    }
                });
                Ok(Some(tokio_stream::wrappers::ReceiverStream::new(rx)))
            })
            .await?;
        let (metadata, stream, extensions) = stream.into_parts();
        let stream = stream.ok_or_else(|| Status::internal("no stream"))?;
        Ok(Response::from_parts(metadata, stream, extensions))
    }

    async fn create_subscription(&self, request: Request<pb::CreateSubscriptionRequest>) -> Result<Response<pb::CreateSubscriptionResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("CreateSubscription", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let min = severity("min_severity", &r.min_severity, Severity::Warning)?;
                let (s, secret) = kms.create_subscription(caller, &r.url, min)?;
                Ok(pb::CreateSubscriptionResponse { subscription: Some(subscription_message(s)), secret })
            })
            .await
    }

    async fn list_subscriptions(&self, request: Request<pb::ListSubscriptionsRequest>) -> Result<Response<pb::ListSubscriptionsResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        self.0
            .call("ListSubscriptions", who, Audit::EveryOutcome, move |kms, _, _| {
                let severities = kms.event_severities()?;
                Ok(pb::ListSubscriptionsResponse {
                    subscriptions: kms.subscriptions()?.into_iter().map(subscription_message).collect(),
                    severities: crate::service::events::DEFAULTS
                        .iter()
                        .map(|(kind, default)| pb::EventSeverity {
                            kind: kind.to_string(),
                            severity: severities.of(kind).unwrap_or(*default).as_str().into(),
                        })
                        .collect(),
                })
            })
            .await
    }

    async fn delete_subscription(&self, request: Request<pb::DeleteSubscriptionRequest>) -> Result<Response<pb::DeleteSubscriptionResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("DeleteSubscription", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                kms.delete_subscription(caller, &r.id)?;
                Ok(pb::DeleteSubscriptionResponse {})
            })
            .await
    }

    async fn set_event_severity(&self, request: Request<pb::SetEventSeverityRequest>) -> Result<Response<pb::SetEventSeverityResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("SetEventSeverity", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let to = (!r.severity.is_empty()).then(|| severity("severity", &r.severity, Severity::Info)).transpose()?;
                kms.set_event_severity(caller, &r.kind, to)?;
                Ok(pb::SetEventSeverityResponse {})
            })
            .await
    }

    async fn create_key(&self, request: Request<pb::CreateKeyRequest>) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("CreateKey", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                if r.description.chars().count() > MAX_DESCRIPTION {
                    return Err(Error::invalid("description", format!("is longer than {MAX_DESCRIPTION} characters")));
                }
                let alias = if r.alias.is_empty() { None } else { Some(AliasName::parse(&r.alias).map_err(|e| Error::invalid("alias", e))?) };
                let period = r.rotation_period_seconds;
                if period != 0 && !(MIN_ROTATION_SECS..=MAX_ROTATION_SECS).contains(&period) {
                    return Err(Error::invalid(
                        "rotation_period_seconds",
                        format!("is {period}; it must be 0 (none) or {MIN_ROTATION_SECS} to {MAX_ROTATION_SECS}"),
                    ));
                }
                let view = kms.create_key(caller, r.description, alias, period)?;
                Ok(pb::CreateKeyResponse { key: Some(metadata(&view)) })
            })
            .await
    }

    async fn describe_key(&self, request: Request<pb::DescribeKeyRequest>) -> Result<Response<pb::DescribeKeyResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        let r = request.into_inner();
        self.0
            .call("DescribeKey", who, Audit::EveryOutcome, move |kms, _, _| {
                let view = kms.describe_key(&key_ref("key_id", &r.key_id)?)?;
                Ok(pb::DescribeKeyResponse { key: Some(metadata(&view)), versions: view.versions.iter().map(version).collect() })
            })
            .await
    }

    async fn list_keys(&self, request: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        let r = request.into_inner();
        self.0
            .call("ListKeys", who, Audit::EveryOutcome, move |kms, _, _| {
                let size = match r.page_size {
                    0 => DEFAULT_PAGE,
                    n if n <= MAX_PAGE => n,
                    n => return Err(Error::invalid("page_size", format!("is {n}; at most {MAX_PAGE}"))),
                };
                let after = if r.page_token.is_empty() {
                    None
                } else {
                    Some(r.page_token.parse::<KeyId>().map_err(|_| Error::invalid("page_token", "is not a token from ListKeys"))?)
                };
                let (views, next) = kms.list_keys(after, size as usize);
                Ok(pb::ListKeysResponse {
                    keys: views.iter().map(metadata).collect(),
                    next_page_token: next.map(|k| k.to_string()).unwrap_or_default(),
                })
            })
            .await
    }

    async fn list_key_versions(&self, request: Request<pb::ListKeyVersionsRequest>) -> Result<Response<pb::ListKeyVersionsResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        let r = request.into_inner();
        self.0
            .call("ListKeyVersions", who, Audit::EveryOutcome, move |kms, _, _| {
                let view = kms.describe_key(&key_ref("key_id", &r.key_id)?)?;
                Ok(pb::ListKeyVersionsResponse { key_id: view.record.key_id.to_string(), versions: view.versions.iter().map(version).collect() })
            })
            .await
    }

    async fn rotate_key(&self, request: Request<pb::RotateKeyRequest>) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("RotateKey", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let view = kms.rotate_key(caller, &key_ref("key_id", &r.key_id)?)?;
                let primary = view.version(view.record.primary_version).map(version);
                Ok(pb::RotateKeyResponse { key: Some(metadata(&view)), version: primary })
            })
            .await
    }

    async fn enable_key(&self, request: Request<pb::EnableKeyRequest>) -> Result<Response<pb::KeyMetadataResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let why = reason(&request);
        self.key_transition(who, "EnableKey", request.into_inner().key_id, KeyTransition::Enable, 0, why).await
    }

    async fn disable_key(&self, request: Request<pb::DisableKeyRequest>) -> Result<Response<pb::KeyMetadataResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let why = reason(&request);
        self.key_transition(who, "DisableKey", request.into_inner().key_id, KeyTransition::Disable, 0, why).await
    }

    async fn mark_key_compromised(&self, request: Request<pb::MarkKeyCompromisedRequest>) -> Result<Response<pb::KeyMetadataResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let why = reason(&request);
        self.key_transition(who, "MarkKeyCompromised", request.into_inner().key_id, KeyTransition::Compromise, 0, why).await
    }

    async fn schedule_key_destruction(
        &self,
        request: Request<pb::ScheduleKeyDestructionRequest>,
    ) -> Result<Response<pb::KeyMetadataResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let why = reason(&request);
        let r = request.into_inner();
        self.key_transition(who, "ScheduleKeyDestruction", r.key_id, KeyTransition::ScheduleDestruction, r.pending_window_days, why).await
    }

    async fn cancel_key_destruction(&self, request: Request<pb::CancelKeyDestructionRequest>) -> Result<Response<pb::KeyMetadataResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let why = reason(&request);
        self.key_transition(who, "CancelKeyDestruction", request.into_inner().key_id, KeyTransition::CancelDestruction, 0, why).await
    }

    async fn enable_key_version(&self, request: Request<pb::KeyVersionRequest>) -> Result<Response<pb::KeyVersionResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let why = reason(&request);
        let r = request.into_inner();
        self.version_transition(who, "EnableKeyVersion", (r.key_id, r.key_version), VersionTransition::Enable, 0, why).await
    }

    async fn disable_key_version(&self, request: Request<pb::KeyVersionRequest>) -> Result<Response<pb::KeyVersionResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let why = reason(&request);
        let r = request.into_inner();
        self.version_transition(who, "DisableKeyVersion", (r.key_id, r.key_version), VersionTransition::Disable, 0, why).await
    }

    async fn schedule_key_version_destruction(
        &self,
        request: Request<pb::ScheduleKeyVersionDestructionRequest>,
    ) -> Result<Response<pb::KeyVersionResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let why = reason(&request);
        let r = request.into_inner();
        self.version_transition(
            who,
            "ScheduleKeyVersionDestruction",
            (r.key_id, r.key_version),
            VersionTransition::ScheduleDestruction,
            r.pending_window_days,
            why,
        )
        .await
    }

    async fn cancel_key_version_destruction(&self, request: Request<pb::KeyVersionRequest>) -> Result<Response<pb::KeyVersionResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let why = reason(&request);
        let r = request.into_inner();
        self.version_transition(who, "CancelKeyVersionDestruction", (r.key_id, r.key_version), VersionTransition::CancelDestruction, 0, why).await
    }

    async fn create_alias(&self, request: Request<pb::CreateAliasRequest>) -> Result<Response<pb::CreateAliasResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("CreateAlias", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let alias = AliasName::parse(&r.alias).map_err(|e| Error::invalid("alias", e))?;
                let key_id = match key_ref("key_id", &r.key_id)? {
                    KeyRef::Id(id) => id,
                    KeyRef::Alias(_) => return Err(Error::invalid("key_id", "must be a key id, not an alias")),
                };
                let rec = kms.create_alias(caller, alias, key_id)?;
                Ok(pb::CreateAliasResponse { alias: rec.alias.to_string(), key_id: rec.key_id.to_string() })
            })
            .await
    }

    async fn delete_alias(&self, request: Request<pb::DeleteAliasRequest>) -> Result<Response<pb::DeleteAliasResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("DeleteAlias", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let alias = AliasName::parse(&r.alias).map_err(|e| Error::invalid("alias", e))?;
                kms.delete_alias(caller, &alias)?;
                Ok(pb::DeleteAliasResponse {})
            })
            .await
    }

    async fn list_aliases(&self, request: Request<pb::ListAliasesRequest>) -> Result<Response<pb::ListAliasesResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        let r = request.into_inner();
        self.0
            .call("ListAliases", who, Audit::EveryOutcome, move |kms, _, _| {
                let key = optional_key_ref("key_id", &r.key_id)?;
                let aliases = kms.list_aliases(key.as_ref())?;
                Ok(pb::ListAliasesResponse {
                    aliases: aliases
                        .into_iter()
                        .map(|a| pb::Alias { alias: a.alias.to_string(), key_id: a.key_id.to_string(), creation_time: a.created_at })
                        .collect(),
                })
            })
            .await
    }

    async fn create_principal(&self, request: Request<pb::PrincipalRequest>) -> Result<Response<pb::PrincipalResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("CreatePrincipal", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let name = principal_name("name", &r.name)?;
                Ok(pb::PrincipalResponse { principal: Some(principal(kms.create_principal(caller, name)?)) })
            })
            .await
    }

    async fn create_xks_key_store(&self, request: Request<pb::CreateXksKeyStoreRequest>) -> Result<Response<pb::XksCredentialResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("CreateXksKeyStore", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let (_, new) = kms.create_xks_key_store(caller, &r.name, &r.uri_prefix, &r.region)?;
                Ok(xks_credential(kms, &r.name, new))
            })
            .await
    }

    async fn list_xks_key_stores(&self, request: Request<pb::ListXksKeyStoresRequest>) -> Result<Response<pb::ListXksKeyStoresResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        self.0
            .call("ListXksKeyStores", who, Audit::EveryOutcome, move |kms, _, _| {
                let directory = kms.xks_directory();
                Ok(pb::ListXksKeyStoresResponse { key_stores: directory.stores().map(|s| xks_key_store(&directory, s)).collect() })
            })
            .await
    }

    async fn add_xks_credential(&self, request: Request<pb::AddXksCredentialRequest>) -> Result<Response<pb::XksCredentialResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("AddXksCredential", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let new = kms.add_xks_credential(caller, &r.key_store)?;
                Ok(xks_credential(kms, &r.key_store, new))
            })
            .await
    }

    async fn set_quorum_policy(&self, request: Request<pb::SetQuorumPolicyRequest>) -> Result<Response<pb::QuorumPolicy>, Status> {
        let who = officer(&request, Role::Officer);
        let why = reason(&request);
        let r = request.into_inner();
        self.0
            .call("SetQuorumPolicy", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let key = optional_key_ref("key_id", &r.key_id)?;
                Ok(quorum_policy(kms.set_quorum_policy(caller, &r.operation, key.as_ref(), r.required, &why)?))
            })
            .await
    }

    async fn list_quorum_policies(
        &self,
        request: Request<pb::ListQuorumPoliciesRequest>,
    ) -> Result<Response<pb::ListQuorumPoliciesResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        self.0
            .call("ListQuorumPolicies", who, Audit::EveryOutcome, move |kms, _, _| {
                Ok(pb::ListQuorumPoliciesResponse { policies: kms.quorum_policies()?.into_iter().map(quorum_policy).collect() })
            })
            .await
    }

    async fn list_approval_requests(
        &self,
        request: Request<pb::ListApprovalRequestsRequest>,
    ) -> Result<Response<pb::ListApprovalRequestsResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        let r = request.into_inner();
        self.0
            .call("ListApprovalRequests", who, Audit::EveryOutcome, move |kms, _, _| {
                let state = (!r.state.is_empty()).then_some(r.state.as_str());
                let requests = kms.approval_requests(state)?;
                Ok(pb::ListApprovalRequestsResponse { requests: requests.into_iter().map(|r| approval_request(r, Vec::new())).collect() })
            })
            .await
    }

    async fn get_approval_request(&self, request: Request<pb::GetApprovalRequestRequest>) -> Result<Response<pb::ApprovalRequest>, Status> {
        let who = officer(&request, Role::Auditor);
        let r = request.into_inner();
        self.0
            .call("GetApprovalRequest", who, Audit::EveryOutcome, move |kms, _, _| {
                let view = kms.approval_request(&r.id)?;
                Ok(approval_request(view.request, view.votes))
            })
            .await
    }

    async fn approve_request(&self, request: Request<pb::VoteRequest>) -> Result<Response<pb::ApprovalRequest>, Status> {
        self.vote("ApproveRequest", request, true).await
    }

    async fn reject_request(&self, request: Request<pb::VoteRequest>) -> Result<Response<pb::ApprovalRequest>, Status> {
        self.vote("RejectRequest", request, false).await
    }

    async fn evidence_report(&self, request: Request<pb::EvidenceReportRequest>) -> Result<Response<pb::EvidenceReportResponse>, Status> {
        use crate::service::report::{Format, Verdict};
        let who = officer(&request, Role::Auditor);
        let r = request.into_inner();
        self.0
            .call("EvidenceReport", who, Audit::EveryOutcome, move |kms, caller, facts| {
                let format = Format::parse(&r.format)?;
                let report = kms.evidence_report(&caller.principal)?;
                let (passed, warnings, failures) = (report.count(Verdict::Pass), report.count(Verdict::Warn), report.count(Verdict::Fail));
                facts.detail = format!("{passed} pass, {warnings} warn, {failures} fail");
                Ok(pb::EvidenceReportResponse {
                    document: kms.render_report(&report, format)?,
                    passed: passed as u32,
                    warnings: warnings as u32,
                    failures: failures as u32,
                })
            })
            .await
    }

    async fn verify_evidence_report(
        &self,
        request: Request<pb::VerifyEvidenceReportRequest>,
    ) -> Result<Response<pb::VerifyEvidenceReportResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        let r = request.into_inner();
        self.0
            .call("VerifyEvidenceReport", who, Audit::EveryOutcome, move |kms, _, facts| {
                let (valid, sha256) = kms.verify_report(&r.document)?;
                facts.detail = format!("{} {sha256}", if valid { "valid" } else { "NOT valid" });
                Ok(pb::VerifyEvidenceReportResponse { valid, sha256 })
            })
            .await
    }

    async fn configure_cse(&self, request: Request<pb::ConfigureCseRequest>) -> Result<Response<pb::CseConfiguration>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("ConfigureCse", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let key = key_ref("key", &r.key)?;
                let options = crate::service::cse::CseOptions {
                    guests: r.allow_guests,
                    privileged_users: r.privileged_users,
                    migration_sources: r.migration_sources,
                    owner_domain: Some(r.owner_domain).filter(|d| !d.is_empty()),
                };
                kms.configure_cse(caller, &r.kacls_url, &key, options)?;
                Ok(cse_configuration(&kms.cse_config()))
            })
            .await
    }

    async fn get_cse_configuration(&self, request: Request<pb::GetCseConfigurationRequest>) -> Result<Response<pb::CseConfiguration>, Status> {
        let who = officer(&request, Role::Auditor);
        self.0.call("GetCseConfiguration", who, Audit::EveryOutcome, move |kms, _, _| Ok(cse_configuration(&kms.cse_config()))).await
    }

    async fn put_cse_issuer(&self, request: Request<pb::PutCseIssuerRequest>) -> Result<Response<pb::CseConfiguration>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        let ca = self.0.outgoing_ca.clone();
        self.0
            .call("PutCseIssuer", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                // A key set given by its URL only is fetched now, once the officer is known (an
                // admin call runs on the blocking pool, where it may wait on the runtime).
                let jwks = match (r.jwks.is_empty(), r.jwks_url.is_empty()) {
                    (true, false) => tokio::runtime::Handle::current()
                        .block_on(crate::facade::cse::listener::fetch_jwks(&ca, &r.jwks_url))
                        .map_err(|e| Error::invalid("jwks_url", e))?,
                    _ => r.jwks,
                };
                let url = Some(r.jwks_url).filter(|u| !u.is_empty());
                kms.put_cse_issuer(caller, &r.token, &r.iss, r.audiences, &jwks, url)?;
                Ok(cse_configuration(&kms.cse_config()))
            })
            .await
    }

    async fn remove_cse_issuer(&self, request: Request<pb::RemoveCseIssuerRequest>) -> Result<Response<pb::CseConfiguration>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("RemoveCseIssuer", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                kms.remove_cse_issuer(caller, &r.iss)?;
                Ok(cse_configuration(&kms.cse_config()))
            })
            .await
    }

    async fn remove_xks_credential(
        &self,
        request: Request<pb::RemoveXksCredentialRequest>,
    ) -> Result<Response<pb::RemoveXksCredentialResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("RemoveXksCredential", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let removed = kms.remove_xks_credential(caller, &r.access_key_id)?;
                let directory = kms.xks_directory();
                let key_store = directory.stores().find(|s| s.name == removed.key_store).map(|s| xks_key_store(&directory, s));
                Ok(pb::RemoveXksCredentialResponse { key_store })
            })
            .await
    }

    async fn list_principals(&self, _request: Request<pb::ListPrincipalsRequest>) -> Result<Response<pb::ListPrincipalsResponse>, Status> {
        let who = officer(&_request, Role::Auditor);
        self.0
            .call("ListPrincipals", who, Audit::EveryOutcome, move |kms, _, _| {
                Ok(pb::ListPrincipalsResponse { principals: kms.list_principals().into_iter().map(principal).collect() })
            })
            .await
    }

    async fn disable_principal(&self, request: Request<pb::PrincipalRequest>) -> Result<Response<pb::PrincipalResponse>, Status> {
        let who = officer(&request, Role::Officer);
        self.principal_state(who, "DisablePrincipal", request.into_inner().name, PrincipalState::Disabled).await
    }

    async fn enable_principal(&self, request: Request<pb::PrincipalRequest>) -> Result<Response<pb::PrincipalResponse>, Status> {
        let who = officer(&request, Role::Officer);
        self.principal_state(who, "EnablePrincipal", request.into_inner().name, PrincipalState::Enabled).await
    }

    async fn create_grant(&self, request: Request<pb::CreateGrantRequest>) -> Result<Response<pb::CreateGrantResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let why = reason(&request);
        let r = request.into_inner();
        self.0
            .call("CreateGrant", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let principal = principal_name("principal", &r.principal)?.to_string();
                let key = key_ref("key_id", &r.key_id)?;
                if r.operations.is_empty() {
                    return Err(Error::invalid("operations", "must name at least one operation"));
                }
                let operations = r.operations.iter().map(|o| operation("operations", o)).collect::<Result<_, _>>()?;
                let required = context("required_encryption_context", r.required_encryption_context)?;
                let required_keys: std::collections::BTreeSet<String> = r.required_encryption_context_keys.into_iter().collect();
                if required_keys.len() > crate::domain::context::MAX_PAIRS || required_keys.iter().any(String::is_empty) {
                    return Err(Error::invalid("required_encryption_context_keys", "must be at most 64 non-empty keys"));
                }
                if r.expiration_time < 0 || (r.expiration_time > 0 && r.expiration_time <= crate::clock::now()) {
                    return Err(Error::invalid("expiration_time", "must be 0 (none) or in the future"));
                }
                let draft = Grant {
                    grant_id: String::new(),
                    principal,
                    key_id: KeyId::from_bytes([0; 16]),
                    operations,
                    required_pairs: required.pairs().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                    required_keys,
                    expires_at: (r.expiration_time > 0).then_some(r.expiration_time),
                    created_at: 0,
                };
                if let Some(id) = kms.key_id_of(&key) {
                    let covered = Covered::CreateGrant {
                        principal: draft.principal.clone(),
                        key_id: id.to_string(),
                        operations: draft.operations.iter().map(|o| o.as_str().to_string()).collect(),
                        required_pairs: draft.required_pairs.clone(),
                        required_keys: draft.required_keys.iter().cloned().collect(),
                        expires_at: draft.expires_at,
                    };
                    kms.gate(caller, covered, &why)?;
                }
                Ok(pb::CreateGrantResponse { grant: Some(grant(kms.create_grant(caller, draft, &key)?)) })
            })
            .await
    }

    async fn list_grants(&self, request: Request<pb::ListGrantsRequest>) -> Result<Response<pb::ListGrantsResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        let r = request.into_inner();
        self.0
            .call("ListGrants", who, Audit::EveryOutcome, move |kms, _, _| {
                let key = optional_key_ref("key_id", &r.key_id)?;
                let principal = (!r.principal.is_empty()).then_some(r.principal.as_str());
                Ok(pb::ListGrantsResponse { grants: kms.list_grants(key.as_ref(), principal)?.into_iter().map(grant).collect() })
            })
            .await
    }

    async fn explain_access(&self, request: Request<pb::ExplainAccessRequest>) -> Result<Response<pb::ExplainAccessResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        let r = request.into_inner();
        self.0
            .call("ExplainAccess", who, Audit::EveryOutcome, move |kms, _, facts| {
                let principal = if r.principal.is_empty() { None } else { Some(principal_name("principal", &r.principal)?) };
                let operation = operation("operation", &r.operation)?;
                let key = key_ref("key_id", &r.key_id)?;
                let context = context("encryption_context", r.encryption_context)?;
                let explained = kms.explain_access(principal, operation, &key, &context)?;
                let allowed = explained.decisions.iter().filter(|d| d.allowed).count();
                (facts.key_id, facts.context) = (Some(explained.key_id), Some(context));
                facts.detail =
                    format!("{operation} for {}: {allowed} of {} allowed", principal.unwrap_or("every grantee"), explained.decisions.len());
                Ok(pb::ExplainAccessResponse {
                    key_id: explained.key_id.to_string(),
                    key_state: key_state(explained.key_state).into(),
                    decisions: explained
                        .decisions
                        .into_iter()
                        .map(|d| pb::AccessDecision {
                            principal: d.principal,
                            allowed: d.allowed,
                            grant_id: d.grant_id.unwrap_or_default(),
                            reasons: d.reasons,
                        })
                        .collect(),
                })
            })
            .await
    }

    async fn revoke_grant(&self, request: Request<pb::RevokeGrantRequest>) -> Result<Response<pb::RevokeGrantResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let why = reason(&request);
        let r = request.into_inner();
        self.0
            .call("RevokeGrant", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                if r.grant_id.is_empty() {
                    return Err(Error::invalid("grant_id", "is required"));
                }
                if let Some(g) = kms.grant(&r.grant_id) {
                    kms.gate(caller, Covered::RevokeGrant { grant_id: g.grant_id, key_id: g.key_id.to_string() }, &why)?;
                }
                kms.revoke_grant(caller, &r.grant_id)?;
                Ok(pb::RevokeGrantResponse {})
            })
            .await
    }

    async fn create_officer(&self, request: Request<pb::CreateOfficerRequest>) -> Result<Response<pb::CreateOfficerResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let mut r = request.into_inner();
        let passphrase = Passphrase::new(std::mem::take(&mut r.passphrase));
        self.0
            .call("CreateOfficer", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let role = Role::parse(&r.role).ok_or_else(|| Error::invalid("role", "must be officer or auditor"))?;
                let enrolment = kms.officers().create(caller, &r.name, role, &passphrase)?;
                Ok(pb::CreateOfficerResponse { otpauth_uri: enrolment.0.to_string() })
            })
            .await
    }

    async fn list_officers(&self, request: Request<pb::ListOfficersRequest>) -> Result<Response<pb::ListOfficersResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        self.0
            .call("ListOfficers", who, Audit::EveryOutcome, move |kms, _, _| {
                Ok(pb::ListOfficersResponse { officers: kms.officers().list()?.into_iter().map(officer_message).collect() })
            })
            .await
    }

    async fn disable_officer(&self, request: Request<pb::DisableOfficerRequest>) -> Result<Response<pb::DisableOfficerResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let why = reason(&request);
        let r = request.into_inner();
        self.0
            .call("DisableOfficer", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                if kms.officers().list()?.iter().any(|o| o.name == r.name && o.enabled) {
                    kms.gate(caller, Covered::DisableOfficer { name: r.name.clone() }, &why)?;
                }
                Ok(pb::DisableOfficerResponse { officer: Some(officer_message(kms.officers().disable(caller, &r.name)?)) })
            })
            .await
    }

    async fn change_passphrase(&self, request: Request<pb::ChangePassphraseRequest>) -> Result<Response<pb::ChangePassphraseResponse>, Status> {
        // Auditors change their own passphrase too.
        let who = officer(&request, Role::Auditor);
        let mut r = request.into_inner();
        let current = Passphrase::new(std::mem::take(&mut r.current_passphrase));
        let new = Passphrase::new(std::mem::take(&mut r.new_passphrase));
        self.0
            .call("ChangePassphrase", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                kms.officers().change_passphrase(caller, &current, &new)?;
                Ok(pb::ChangePassphraseResponse {})
            })
            .await
    }

    async fn reenroll_totp(&self, request: Request<pb::ReenrollTotpRequest>) -> Result<Response<pb::ReenrollTotpResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        self.0
            .call("ReenrollTotp", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                Ok(pb::ReenrollTotpResponse { otpauth_uri: kms.officers().reenroll_totp(caller)?.0.to_string() })
            })
            .await
    }

    async fn access_review(&self, request: Request<pb::AccessReviewRequest>) -> Result<Response<pb::AccessReviewResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        self.0
            .call("AccessReview", who, Audit::EveryOutcome, move |kms, _, facts| {
                let review = kms.access_review()?;
                facts.detail = format!("{} entries, {} unused for 90 days", review.entries.len(), review.entries.iter().filter(|e| e.stale).count());
                Ok(pb::AccessReviewResponse {
                    entries: review
                        .entries
                        .into_iter()
                        .map(|e| pb::ReviewEntry {
                            kind: e.kind.to_string(),
                            name: e.name,
                            detail: e.detail,
                            enabled: e.enabled,
                            creation_time: e.created_at,
                            last_used_time: e.last_used_at.unwrap_or(0),
                            unused_90_days: e.stale,
                        })
                        .collect(),
                    last_signoff_time: review.last_signoff.as_ref().map_or(0, |(_, t)| *t),
                    last_signoff_by: review.last_signoff.map(|(by, _)| by).unwrap_or_default(),
                    signoff_overdue: review.signoff_overdue,
                })
            })
            .await
    }

    async fn sign_off_review(&self, request: Request<pb::SignOffReviewRequest>) -> Result<Response<pb::SignOffReviewResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let r = request.into_inner();
        self.0
            .call("SignOffReview", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                if r.note.chars().count() > MAX_DESCRIPTION {
                    return Err(Error::invalid("note", format!("is longer than {MAX_DESCRIPTION} characters")));
                }
                Ok(pb::SignOffReviewResponse { signoff_time: kms.sign_off_review(caller, &r.note)? })
            })
            .await
    }

    async fn describe_service(&self, request: Request<pb::DescribeServiceRequest>) -> Result<Response<pb::DescribeServiceResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        self.0
            .call("DescribeService", who, Audit::EveryOutcome, move |kms, _, facts| {
                let s = kms.status()?;
                let health = s.health.as_str();
                facts.detail = format!("{health}, {} warnings", s.warnings.len());
                Ok(pb::DescribeServiceResponse {
                    version: env!("CARGO_PKG_VERSION").into(),
                    uptime_seconds: s.uptime_seconds,
                    health: health.into(),
                    health_detail: s.probe.error.unwrap_or_default(),
                    last_probe_time: s.probe.at,
                    token: s.token.map(|t| pb::TokenInfo {
                        label: t.label,
                        manufacturer: t.manufacturer,
                        model: t.model,
                        serial_number: t.serial_number,
                    }),
                    keys_by_state: s.keys_by_state.into_iter().map(|(state, n)| (state.to_string(), n)).collect(),
                    versions_nearest_limit: s
                        .usage
                        .into_iter()
                        .take(crate::service::status::NEAREST_LIMIT)
                        .map(|u| pb::VersionUsage {
                            key_id: u.key_id.to_string(),
                            key_version: u.version,
                            encryptions: u.encryptions,
                            encryption_limit: u.limit,
                        })
                        .collect(),
                    due_soon: s
                        .due_soon
                        .into_iter()
                        .map(|(key_id, action, due_time)| pb::DueKey { key_id: key_id.to_string(), action: action.as_str().into(), due_time })
                        .collect(),
                    last_review_signoff_time: s.last_signoff.as_ref().map_or(0, |(_, t)| *t),
                    last_review_signoff_by: s.last_signoff.map(|(by, _)| by).unwrap_or_default(),
                    review_overdue: s.review_overdue,
                    warnings: s.warnings,
                    hsm_sessions_open: s.sessions.open as u32,
                    hsm_sessions_in_use: s.sessions.in_use as u32,
                    hsm_sessions_size: s.sessions.size as u32,
                    hsm_session_copies: s.sessions.copies.map(|n| n as u32),
                    recent_hsm_errors: s.hsm_failures.iter().map(|f| format!("{} {} {}", f.at, f.function, f.code)).collect(),
                    leader: s.leader,
                    facades: s
                        .facades
                        .into_iter()
                        .map(|f| pb::FacadeActivity {
                            facade: f.facade.into(),
                            calls_last_hour: f.calls,
                            refusals_last_hour: f.refusals,
                            last_refusal_time: f.last_refusal.as_ref().map_or(0, |r| r.0),
                            last_refusal: f.last_refusal.map(|r| r.1).unwrap_or_default(),
                        })
                        .collect(),
                    audit_verified: s.audit.problem.is_none(),
                    audit_verified_through: s.audit.verified_through,
                    audit_last_full_check_time: s.audit.last_full_check.unwrap_or(0),
                    audit_problem: s
                        .audit
                        .problem
                        .map(|p| format!("record {}: {} (found by the {} at {})", p.found.index, p.found.problem, p.by.as_str(), p.at))
                        .unwrap_or_default(),
                })
            })
            .await
    }

    type CreateBackupStream = tokio_stream::wrappers::ReceiverStream<Result<pb::BackupChunk, Status>>;

    async fn create_backup(&self, request: Request<pb::CreateBackupRequest>) -> Result<Response<Self::CreateBackupStream>, Status> {
        let who = officer(&request, Role::Officer);
        let (why, approved) = (reason(&request), approval(&request));
        let made = self
            .0
            .call("CreateBackup", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                kms.gate_deferred(caller, Covered::CreateBackup {}, &why, approved.as_deref())?;
                kms.create_backup(caller).map(Some)
            })
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // A dry run made nothing: its answer is the header alone, over an empty stream.
        let (metadata, backup, _) = made.into_parts();
        if let Some(backup) = backup {
            tokio::task::spawn_blocking(move || send_backup(backup, tx));
        }
        Ok(Response::from_parts(metadata, tokio_stream::wrappers::ReceiverStream::new(rx), Default::default()))
    }

    async fn verify_backup(&self, request: Request<pb::VerifyBackupRequest>) -> Result<Response<pb::VerifyBackupResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        let r = request.into_inner();
        self.0
            .call("VerifyBackup", who, Audit::EveryOutcome, move |kms, _, facts| {
                let digests = crate::service::SectionDigests {
                    objects_bytes: r.objects_bytes,
                    objects_sha256: r.objects_sha256,
                    database_bytes: r.database_bytes,
                    database_sha256: r.database_sha256,
                };
                let manifest = kms.verify_backup(&r.manifest, &r.mac, &digests)?;
                facts.detail = format!("backup made at {} verified", manifest.created_at);
                Ok(pb::VerifyBackupResponse { manifest: Some(manifest_message(&manifest, manifest.file_bytes(r.manifest.len()))) })
            })
            .await
    }

    async fn export_keys(&self, request: Request<pb::ExportKeysRequest>) -> Result<Response<pb::ExportKeysResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let (why, approved) = (reason(&request), approval(&request));
        let r = request.into_inner();
        self.0
            .call("ExportKeys", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let customer = crate::hsm::RsaPublicKey::from_pem(&r.public_key_pem).map_err(|e| Error::invalid("public_key_pem", e))?;
                kms.gate_deferred(caller, Covered::ExportKeys { public_key_sha256: customer.fingerprint() }, &why, approved.as_deref())?;
                let export = kms.export_keys(caller, &customer)?;
                Ok(pb::ExportKeysResponse {
                    manifest: export.manifest,
                    versions: export
                        .versions
                        .into_iter()
                        .map(|v| pb::WrappedKeyVersion { key_id: v.key_id.to_string(), version: v.version, wrapped: v.wrapped })
                        .collect(),
                })
            })
            .await
    }

    async fn get_import_parameters(&self, request: Request<pb::GetImportParametersRequest>) -> Result<Response<pb::ImportParameters>, Status> {
        let who = officer(&request, Role::Officer);
        self.0
            .call("GetImportParameters", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                let p = kms.import_parameters(caller)?;
                Ok(pb::ImportParameters { import_token: p.token, public_key_pem: p.public_key_pem, expires_at: p.expires_at })
            })
            .await
    }

    async fn import_key_material(&self, request: Request<pb::ImportKeyMaterialRequest>) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let (why, approved) = (reason(&request), approval(&request));
        let r = request.into_inner();
        self.0
            .call("ImportKeyMaterial", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, _| {
                crate::service::export::check_material(&r.import_token, &r.wrapping_algorithm, &r.wrapped_key_material)?;
                if r.description.chars().count() > MAX_DESCRIPTION {
                    return Err(Error::invalid("description", format!("is longer than {MAX_DESCRIPTION} characters")));
                }
                let alias = if r.alias.is_empty() { None } else { Some(AliasName::parse(&r.alias).map_err(|e| Error::invalid("alias", e))?) };
                // The approval covers the material, the alias and the description asked.
                let asked = [r.wrapped_key_material.as_slice(), r.alias.as_bytes(), r.description.as_bytes()].join(&0u8);
                let covered = Covered::ImportKeys { import_token: r.import_token.clone(), sha256: crate::domain::hex::sha256_hex(&asked) };
                kms.gate_deferred(caller, covered, &why, approved.as_deref())?;
                let key_id =
                    kms.import_key_material(caller, &r.import_token, &r.wrapping_algorithm, &r.wrapped_key_material, r.description, alias)?;
                Ok(pb::CreateKeyResponse { key: Some(metadata(&kms.describe_key(&KeyRef::Id(key_id))?)) })
            })
            .await
    }

    async fn import_keys(&self, request: Request<tonic::Streaming<pb::ImportKeysChunk>>) -> Result<Response<pb::ImportKeysResponse>, Status> {
        let who = officer(&request, Role::Officer);
        let (why, approved) = (reason(&request), approval(&request));
        let mut chunks = request.into_inner();
        // The chunks are read once the officer is authenticated, on the call's blocking thread.
        let runtime = tokio::runtime::Handle::current();
        self.0
            .call("ImportKeys", who, Audit::FailuresInTransactionSuccesses, move |kms, caller, facts| {
                let (token, manifest, versions) = runtime
                    .block_on(tokio::time::timeout(BUNDLE_READ_TIMEOUT, read_bundle(&mut chunks)))
                    .map_err(|_| Error::invalid("chunks", format!("did not all arrive within {} s", BUNDLE_READ_TIMEOUT.as_secs())))??;
                let checked = crate::service::export::check_bundle(&token, &manifest)?;
                let covered = Covered::ImportKeys { import_token: token.clone(), sha256: crate::domain::hex::sha256_hex(&manifest) };
                kms.gate_deferred(caller, covered, &why, approved.as_deref())?;
                let imported = kms.import_bundle(caller, &token, checked, versions)?;
                facts.detail = format!("{} keys, {} versions", imported.keys.len(), imported.versions);
                Ok(pb::ImportKeysResponse { key_ids: imported.keys.iter().map(ToString::to_string).collect(), versions: imported.versions as u32 })
            })
            .await
    }
}

/// The most bytes of a bundle's manifest an import reads (100,000 versions take about 20 MiB).
const MAX_BUNDLE_MANIFEST: usize = 32 * 1024 * 1024;
/// The longest an import's chunks may take to arrive.
const BUNDLE_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Reads an import's chunks: the token, the manifest, the wrapped versions.
async fn read_bundle(chunks: &mut tonic::Streaming<pb::ImportKeysChunk>) -> Result<(String, Vec<u8>, Vec<WrappedVersion>), Error> {
    let (mut token, mut manifest, mut versions) = (None, Vec::new(), Vec::new());
    let broken = |s: Status| Error::invalid("chunks", format!("could not be read: {}", s.message()));
    while let Some(chunk) = chunks.message().await.map_err(broken)? {
        if token.is_some() && chunk.manifest.is_empty() && chunk.versions.is_empty() {
            return Err(Error::invalid("chunks", "after the first, each carries part of the manifest or versions"));
        }
        match &token {
            None => token = Some(chunk.import_token),
            Some(_) if !chunk.import_token.is_empty() => return Err(Error::invalid("import_token", "comes in the first chunk only")),
            Some(_) => {}
        }
        if !chunk.manifest.is_empty() && !versions.is_empty() {
            return Err(Error::invalid("manifest", "must come whole before the first version"));
        }
        if manifest.len() + chunk.manifest.len() > MAX_BUNDLE_MANIFEST {
            return Err(Error::invalid("manifest", format!("is longer than {MAX_BUNDLE_MANIFEST} bytes")));
        }
        manifest.extend_from_slice(&chunk.manifest);
        for v in chunk.versions {
            if versions.len() >= crate::service::export::MAX_IMPORT_VERSIONS {
                return Err(Error::invalid("versions", format!("are more than {}", crate::service::export::MAX_IMPORT_VERSIONS)));
            }
            let key_id = v.key_id.parse().map_err(|e| Error::invalid("versions", format!("key id {:?}: {e}", v.key_id)))?;
            if v.wrapped.is_empty() || v.wrapped.len() > crate::service::export::MAX_WRAPPED {
                return Err(Error::invalid("versions", format!("hold a wrapped version of {} bytes", v.wrapped.len())));
            }
            versions.push(WrappedVersion { key_id, version: v.version, wrapped: v.wrapped });
        }
    }
    Ok((token.unwrap_or_default(), manifest, versions))
}

/// The most bytes of a backup in one message.
const BACKUP_CHUNK: usize = 256 * 1024;

fn manifest_message(m: &crate::backup::Manifest, file_bytes: u64) -> pb::BackupManifest {
    pb::BackupManifest {
        creation_time: m.created_at,
        service_version: m.service_version.clone(),
        token_label: m.token_label.clone(),
        token_serial: m.token_serial.clone(),
        backup_key_label: m.backup_key_label.clone(),
        keys: m.keys,
        live_versions: m.live_versions,
        audit_checkpoint_seq: m.audit_checkpoint_seq,
        objects: m.objects.count,
        file_bytes,
    }
}

/// Streams a backup's bytes to the client, on a blocking thread (it reads a file); stops when
/// the client goes away.
fn send_backup(backup: crate::service::BackupFile, tx: tokio::sync::mpsc::Sender<Result<pb::BackupChunk, Status>>) {
    use std::io::Read;
    let mut manifest = Some(manifest_message(&backup.manifest, backup.head.len() as u64 + backup.manifest.database.bytes));
    let mut reader = (&backup.head[..]).chain(backup.database);
    loop {
        let mut data = vec![0u8; BACKUP_CHUNK];
        let n = match reader.read(&mut data) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "reading the backup snapshot");
                let _ = tx.blocking_send(Err(Status::internal("the backup snapshot could not be read; the file is incomplete")));
                return;
            }
        };
        data.truncate(n);
        if tx.blocking_send(Ok(pb::BackupChunk { data, manifest: manifest.take() })).is_err() {
            return;
        }
    }
}

fn officer_message(o: crate::store::OfficerRecord) -> pb::Officer {
    pb::Officer {
        name: o.name,
        role: o.role.as_str().to_string(),
        enabled: o.enabled,
        creation_time: o.created_at,
        last_login_time: o.last_login_at.unwrap_or(0),
        locked_until: o.locked_until.unwrap_or(0),
    }
}
