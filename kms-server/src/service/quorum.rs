//! Quorum (M-of-N) approvals: no single officer can destroy the organisation's data.
//!
//! A policy says how many distinct officers must approve an operation, globally or for one key.
//! A call it covers does not run: it becomes a request (its arguments fixed as they were asked),
//! which other officers approve or reject, each with their own passphrase and TOTP code again,
//! never the requester. The approval that reaches the count runs the operation, once, on the
//! arguments approved, and its result is recorded against the request. Everything is audited in
//! the chain; a request approved but not yet run when its node stopped is run by the sweep of
//! the node running the background jobs, like any other intent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Caller, Kms, now};
use crate::domain::ids::{KeyId, KeyRef};
use crate::domain::lifecycle::{KeyTransition, VersionTransition};
use crate::domain::officer::Role;
use crate::domain::policy::{Grant, Operation};
use crate::error::{Error, Result};
use crate::store::{ApprovalRequestRecord, QuorumPolicyRecord, VoteRecord};

/// How long a request waits for its approvals.
pub const EXPIRY_SECONDS: i64 = 24 * 3600;
/// The most approvals a policy may ask.
const MAX_REQUIRED: u32 = 16;
/// A request approved this long ago and still not run (its node stopped) is run by the node
/// that runs the background jobs.
const ORPHAN_SECONDS: i64 = 60;

/// The covered operations that concern no one key: a policy for them is global.
const KEYLESS: [&str; 4] = ["CreateBackup", "ExportKeys", "ImportKeys", "DisableOfficer"];

/// The operations a quorum policy can cover.
pub const COVERABLE: [&str; 10] = [
    "CreateBackup",
    "ExportKeys",
    "ImportKeys",
    "ScheduleKeyDestruction",
    "ScheduleKeyVersionDestruction",
    "MarkKeyCompromised",
    "DisableOfficer",
    "CreateGrant",
    "RevokeGrant",
    "SetQuorumPolicy",
];

/// A covered call and the arguments it runs with once approved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "operation")]
pub enum Covered {
    ScheduleKeyDestruction {
        key_id: String,
        pending_days: u32,
    },
    ScheduleKeyVersionDestruction {
        key_id: String,
        version: u32,
        pending_days: u32,
    },
    MarkKeyCompromised {
        key_id: String,
    },
    DisableOfficer {
        name: String,
    },
    CreateGrant {
        principal: String,
        key_id: String,
        operations: Vec<String>,
        required_pairs: BTreeMap<String, String>,
        required_keys: Vec<String>,
        expires_at: Option<i64>,
    },
    RevokeGrant {
        grant_id: String,
        key_id: String,
    },
    SetQuorumPolicy {
        policy_operation: String,
        policy_key_id: Option<String>,
        required: u32,
    },
    /// The operations whose result goes to their requester (a file, keys brought in) run when
    /// the requester calls again with the approved request's id ([`Covered::deferred`]).
    CreateBackup {},
    ExportKeys {
        public_key_sha256: String,
    },
    /// A bundle (`ImportKeys`) or one key's material (`ImportKeyMaterial`).
    ImportKeys {
        import_token: String,
        sha256: String,
    },
}

impl Covered {
    pub fn operation(&self) -> &'static str {
        match self {
            Covered::ScheduleKeyDestruction { .. } => "ScheduleKeyDestruction",
            Covered::ScheduleKeyVersionDestruction { .. } => "ScheduleKeyVersionDestruction",
            Covered::MarkKeyCompromised { .. } => "MarkKeyCompromised",
            Covered::DisableOfficer { .. } => "DisableOfficer",
            Covered::CreateGrant { .. } => "CreateGrant",
            Covered::RevokeGrant { .. } => "RevokeGrant",
            Covered::SetQuorumPolicy { .. } => "SetQuorumPolicy",
            Covered::CreateBackup {} => "CreateBackup",
            Covered::ExportKeys { .. } => "ExportKeys",
            Covered::ImportKeys { .. } => "ImportKeys",
        }
    }

    /// Whether the approved operation runs when its requester calls again with the request's
    /// id (`kms-approval`), rather than at the last approval: its result (a backup, an export,
    /// the keys imported) is the requester's to receive.
    pub fn deferred(&self) -> bool {
        matches!(self, Covered::CreateBackup {} | Covered::ExportKeys { .. } | Covered::ImportKeys { .. })
    }

    /// The key the call is about, for per-key policies.
    fn key_id(&self) -> Option<KeyId> {
        match self {
            Covered::ScheduleKeyDestruction { key_id, .. }
            | Covered::ScheduleKeyVersionDestruction { key_id, .. }
            | Covered::MarkKeyCompromised { key_id }
            | Covered::CreateGrant { key_id, .. }
            | Covered::RevokeGrant { key_id, .. } => key_id.parse().ok(),
            Covered::SetQuorumPolicy { policy_key_id, .. } => policy_key_id.as_deref().and_then(|k| k.parse().ok()),
            Covered::DisableOfficer { .. } | Covered::CreateBackup {} | Covered::ExportKeys { .. } | Covered::ImportKeys { .. } => None,
        }
    }

    /// What the request asks, in words.
    pub fn summary(&self) -> String {
        match self {
            Covered::ScheduleKeyDestruction { key_id, pending_days } => format!("schedule the destruction of key {key_id} in {pending_days} days"),
            Covered::ScheduleKeyVersionDestruction { key_id, version, pending_days } => {
                format!("schedule the destruction of version {version} of key {key_id} in {pending_days} days")
            }
            Covered::MarkKeyCompromised { key_id } => format!("mark key {key_id} compromised (irreversible)"),
            Covered::DisableOfficer { name } => format!("disable officer {name}"),
            Covered::CreateGrant { principal, key_id, operations, .. } => format!("grant {principal} {} on key {key_id}", operations.join(",")),
            Covered::RevokeGrant { grant_id, key_id } => format!("revoke grant {grant_id} on key {key_id}"),
            Covered::SetQuorumPolicy { policy_operation, policy_key_id, required } => format!(
                "require {required} approvals for {policy_operation} on {}",
                policy_key_id.as_deref().map_or_else(|| "every key".to_string(), |k| format!("key {k}"))
            ),
            Covered::CreateBackup {} => "make a backup of every key".into(),
            Covered::ExportKeys { public_key_sha256 } => format!("export every key for the customer key {public_key_sha256}"),
            Covered::ImportKeys { import_token, sha256 } => format!("import keys (material sha256 {sha256}) under import parameters {import_token}"),
        }
    }
}

/// A request with its votes, as `kmsctl approval show` prints it.
#[derive(Debug, Clone)]
pub struct RequestView {
    pub request: ApprovalRequestRecord,
    pub votes: Vec<VoteRecord>,
}

impl Kms {
    /// The policies in force.
    pub fn quorum_policies(&self) -> Result<Vec<QuorumPolicyRecord>> {
        Ok(self.store.read(|tx| tx.quorum_policies())?)
    }

    /// How many officers must approve `covered` (1: it runs at once): the stricter of the
    /// operation's global policy and its policy for the key. A change of policy needs the quorum
    /// of the policy it replaces, and of the policy on `SetQuorumPolicy` itself.
    fn required_for(&self, covered: &Covered) -> Result<u32> {
        let policies = self.quorum_policies()?;
        let of = |operation: &str, key: Option<KeyId>| {
            policies.iter().filter(|p| p.operation == operation && (p.key_id.is_none() || p.key_id == key)).map(|p| p.required).max().unwrap_or(1)
        };
        let mut required = of(covered.operation(), covered.key_id());
        if let Covered::SetQuorumPolicy { policy_operation, .. } = covered {
            required = required.max(of(policy_operation, covered.key_id()));
        }
        Ok(required)
    }

    /// Lets `covered` run now, or, when a policy covers it, records a request for it and refuses
    /// the call with `ApprovalRequired`.
    pub fn gate(&self, caller: &Caller, covered: Covered, reason: &str) -> Result<()> {
        let required = self.required_for(&covered)?;
        if required <= 1 {
            return Ok(());
        }
        let summary = covered.summary();
        caller.commit_point(|| format!("ask {required} officers to approve: {summary}"))?;
        let mut id = [0u8; 8];
        self.hsm.random(&mut id)?;
        let at = now();
        let request = ApprovalRequestRecord {
            id: format!("R-{}", crate::domain::hex::hex(&id)),
            operation: covered.operation().to_string(),
            key_id: covered.key_id(),
            arguments: serde_json::to_string(&covered).map_err(|e| Error::invalid("arguments", e))?,
            summary,
            requester: caller.principal.clone(),
            reason: reason.to_string(),
            required,
            state: "pending".into(),
            created_at: at,
            expires_at: at + EXPIRY_SECONDS,
            decided_at: None,
            result: String::new(),
        };
        self.store.write(|tx| {
            tx.insert_approval_request(&request)?;
            let detail = format!("{}: {} (needs {required} approvals; reason: {})", request.id, request.summary, request.reason);
            tx.append_audit(&caller.audit("RequestApproval", request.key_id, None, detail), at)
        })?;
        Err(Error::ApprovalRequired { request_id: request.id, required })
    }

    /// `gate` for an operation whose result goes to its requester ([`Covered::deferred`]):
    /// with `approval` (the `kms-approval` id of a request approved for these very arguments,
    /// by this requester), the request is used up and the call runs; without, as `gate`.
    pub fn gate_deferred(&self, caller: &Caller, covered: Covered, reason: &str, approval: Option<&str>) -> Result<()> {
        let Some(id) = approval else {
            return self.gate(caller, covered, reason);
        };
        let request = self.store.read(|tx| tx.approval_request(id))?.ok_or_else(|| Error::NotFound { what: format!("approval request {id}") })?;
        if request.requester != caller.principal {
            return Err(Error::precondition(format!("request {id} is {}'s: only its requester runs it", request.requester)));
        }
        let arguments = serde_json::to_string(&covered).map_err(|e| Error::invalid("arguments", e))?;
        if request.arguments != arguments {
            return Err(Error::invalid("kms-approval", format!("request {id} approved another call: {}", request.summary)));
        }
        if request.state != "ready" {
            return Err(Error::precondition(format!("request {id} is {}, not approved and unused", request.state)));
        }
        if request.expires_at <= now() + crate::hooks::sweep_clock_offset() {
            return Err(Error::precondition(format!("request {id} expired at {}: ask again", request.expires_at)));
        }
        caller.commit_point(|| format!("use approved request {id}: {}", request.summary))?;
        let at = now();
        let used = self.store.write(|tx| {
            let used = tx.move_request(id, "ready", "executed", at, "run by its requester")?;
            if used {
                tx.append_audit(
                    &caller.audit("ExecuteApprovedRequest", request.key_id, None, format!("{id}: {} — run by its requester", request.summary)),
                    at,
                )?;
            }
            Ok(used)
        })?;
        if !used {
            return Err(Error::precondition(format!("request {id} was used already")));
        }
        Ok(())
    }

    /// Sets how many officers must approve `operation` (on `key`, or on every key), through the
    /// quorum of the policy it replaces. A policy asking more officers than are enabled is
    /// refused: no lock-out by configuration.
    pub fn set_quorum_policy(
        &self,
        caller: &Caller,
        operation: &str,
        key: Option<&KeyRef>,
        required: u32,
        reason: &str,
    ) -> Result<QuorumPolicyRecord> {
        let covered = self.policy_change(operation, key, required)?;
        self.gate(caller, covered.clone(), reason)?;
        self.apply_policy(caller, &covered)
    }

    /// The change `set_quorum_policy` asks, checked.
    fn policy_change(&self, operation: &str, key: Option<&KeyRef>, required: u32) -> Result<Covered> {
        if !COVERABLE.contains(&operation) {
            return Err(Error::invalid("operation", format!("{operation:?} is not one a quorum can cover: {}", COVERABLE.join(", "))));
        }
        if !(1..=MAX_REQUIRED).contains(&required) {
            return Err(Error::invalid("required", format!("must be 1 to {MAX_REQUIRED}")));
        }
        if key.is_some() && KEYLESS.contains(&operation) {
            return Err(Error::invalid("key", format!("{operation} concerns no one key: its policy is global")));
        }
        let key_id = key.map(|k| self.registry.entry(k).map(|e| e.record.key_id)).transpose()?;
        let officers = self.officers().list()?.iter().filter(|o| o.enabled && o.role == Role::Officer).count();
        if required as usize > officers {
            return Err(Error::precondition(format!(
                "{required} approvals asked, but only {officers} officers are enabled: the operation could never run"
            )));
        }
        Ok(Covered::SetQuorumPolicy { policy_operation: operation.to_string(), policy_key_id: key_id.map(|k| k.to_string()), required })
    }

    fn apply_policy(&self, caller: &Caller, covered: &Covered) -> Result<QuorumPolicyRecord> {
        let Covered::SetQuorumPolicy { policy_operation, policy_key_id, required } = covered else {
            return Err(Error::invalid("arguments", "not a policy change"));
        };
        let record = QuorumPolicyRecord {
            operation: policy_operation.clone(),
            key_id: policy_key_id.as_deref().and_then(|k| k.parse().ok()),
            required: *required,
            updated_at: now(),
        };
        caller.commit_point(|| covered.summary())?;
        self.store.write(|tx| {
            tx.put_quorum_policy(&record)?;
            tx.append_audit(&caller.audit("SetQuorumPolicy", record.key_id, None, covered.summary()), record.updated_at)
        })?;
        Ok(record)
    }

    /// Requests in `state` (all when `None`), newest first.
    pub fn approval_requests(&self, state: Option<&str>) -> Result<Vec<ApprovalRequestRecord>> {
        self.expire_requests()?;
        Ok(self.store.read(|tx| tx.approval_requests(state, 500))?)
    }

    pub fn approval_request(&self, id: &str) -> Result<RequestView> {
        self.expire_requests()?;
        let (request, votes) = self.store.read(|tx| Ok((tx.approval_request(id)?, tx.votes(id)?)))?;
        let request = request.ok_or_else(|| Error::NotFound { what: format!("approval request {id}") })?;
        Ok(RequestView { request, votes })
    }

    /// `caller`'s approval (or rejection) of request `id`, given with their passphrase and TOTP
    /// code again. The approval that reaches the count runs the operation before this returns.
    pub fn vote(&self, caller: &Caller, id: &str, approve: bool, passphrase: &crate::domain::officer::Passphrase, code: &str) -> Result<RequestView> {
        // What refuses the vote whoever casts it is checked first, so that a doomed vote spends
        // no TOTP code; the vote itself is then checked again in its transaction.
        let view = self.approval_request(id)?;
        let request = &view.request;
        if request.state != "pending" {
            return Err(Error::precondition(format!("request {id} is {}; only a pending request takes votes", request.state)));
        }
        if request.requester == caller.principal {
            return Err(Error::PermissionDenied {
                reason: format!("{} asked for request {id}: another officer must decide on it", caller.principal),
            });
        }
        if view.votes.iter().any(|v| v.officer == caller.principal) {
            return Err(Error::AlreadyExists { what: format!("{}'s vote on request {id}", caller.principal) });
        }
        self.officers().reauthenticate(&caller.principal, passphrase, code)?;
        let what = if approve { "approve" } else { "reject" };
        caller.commit_point(|| format!("{what} request {id}: {}", request.summary))?;
        let at = now();
        let approvals = view.votes.iter().filter(|v| v.approve).count() as u32 + u32::from(approve);
        let decided = match (approve, approvals >= request.required) {
            (false, _) => Some("rejected"),
            (true, true) => Some("approved"),
            (true, false) => None,
        };
        self.store.write(|tx| {
            let vote = VoteRecord { request_id: id.to_string(), officer: caller.principal.clone(), approve, time: at };
            if !tx.insert_vote(&vote)? {
                return Err(crate::store::StoreError::Corrupt { table: "approval_votes", detail: format!("a second vote by {}", caller.principal) });
            }
            if let Some(state) = decided
                && !tx.move_request(id, "pending", state, at, "")?
            {
                return Err(crate::store::StoreError::Corrupt { table: "approval_requests", detail: format!("{id} left pending during the vote") });
            }
            let operation = if approve { "ApproveRequest" } else { "RejectRequest" };
            let detail = format!("{id}: {} ({approvals} of {} approvals)", request.summary, request.required);
            tx.append_audit(&caller.audit(operation, request.key_id, None, detail), at)
        })?;
        if decided == Some("approved") {
            // A crash here leaves the request approved and not run: the sweep runs it.
            crate::hooks::crash_point("ApproveRequest", crate::hooks::Step::AfterCommit);
            let approved = ApprovalRequestRecord { state: "approved".into(), decided_at: Some(at), ..request.clone() };
            self.execute(&approved);
        }
        self.approval_request(id)
    }

    /// Runs an approved request's operation, once, and records its result.
    fn execute(&self, request: &ApprovalRequestRecord) {
        let caller = Caller::internal(&format!("{} (approved request {})", request.requester, request.id));
        let covered = serde_json::from_str::<Covered>(&request.arguments).map_err(|e| Error::invalid("arguments", e));
        let (state, result) = match covered {
            Ok(c) if c.deferred() => ("ready", format!("approved: runs once when {} calls again with --approval {}", request.requester, request.id)),
            c => match c.and_then(|c| self.run(&caller, &c)) {
                Ok(done) => ("executed", done),
                Err(e) => ("failed", e.to_string()),
            },
        };
        let at = now();
        let recorded = self.store.write(|tx| {
            if tx.move_request(&request.id, "approved", state, at, &result)? {
                let detail = format!("{}: {} — {state}: {result}", request.id, request.summary);
                let operation = if state == "ready" { "ApprovedRequestReady" } else { "ExecuteApprovedRequest" };
                tx.append_audit(&caller.audit(operation, request.key_id, None, detail), at)?;
            }
            Ok(())
        });
        if let Err(e) = recorded {
            tracing::error!(request = %request.id, error = %e, "an approved request ran but its result could not be recorded; it runs again at recovery");
        }
    }

    /// The covered operation itself, as its own call would run it.
    fn run(&self, caller: &Caller, covered: &Covered) -> Result<String> {
        let key = |id: &str| id.parse::<KeyId>().map(KeyRef::Id).map_err(|_| Error::invalid("key_id", "is not a key id"));
        match covered {
            Covered::ScheduleKeyDestruction { key_id, pending_days } => {
                let view = self.transition_key(caller, &key(key_id)?, KeyTransition::ScheduleDestruction, *pending_days)?;
                Ok(format!("key {} is {}", view.record.key_id, view.record.state.as_str()))
            }
            Covered::ScheduleKeyVersionDestruction { key_id, version, pending_days } => {
                self.transition_version(caller, &key(key_id)?, *version, VersionTransition::ScheduleDestruction, *pending_days)?;
                Ok(format!("version {version} of key {key_id} is pending destruction"))
            }
            Covered::MarkKeyCompromised { key_id } => {
                self.transition_key(caller, &key(key_id)?, KeyTransition::Compromise, 0)?;
                Ok(format!("key {key_id} is compromised"))
            }
            Covered::DisableOfficer { name } => {
                self.officers().disable(caller, name)?;
                Ok(format!("officer {name} is disabled"))
            }
            Covered::CreateGrant { principal, key_id, operations, required_pairs, required_keys, expires_at } => {
                let operations = operations
                    .iter()
                    .map(|o| Operation::parse(o).ok_or_else(|| Error::invalid("operations", format!("{o:?} is not an operation"))))
                    .collect::<Result<_>>()?;
                let grant = Grant {
                    grant_id: String::new(),
                    principal: principal.clone(),
                    key_id: key_id.parse().map_err(|_| Error::invalid("key_id", "is not a key id"))?,
                    operations,
                    required_pairs: required_pairs.clone(),
                    required_keys: required_keys.iter().cloned().collect(),
                    expires_at: *expires_at,
                    created_at: 0,
                };
                let grant = self.create_grant(caller, grant, &key(key_id)?)?;
                Ok(format!("grant {} created", grant.grant_id))
            }
            Covered::RevokeGrant { grant_id, .. } => {
                self.revoke_grant(caller, grant_id)?;
                Ok(format!("grant {grant_id} revoked"))
            }
            Covered::SetQuorumPolicy { .. } => {
                let p = self.apply_policy(caller, covered)?;
                Ok(format!("{} now needs {} approvals", p.operation, p.required))
            }
            Covered::CreateBackup {} | Covered::ExportKeys { .. } | Covered::ImportKeys { .. } => {
                Err(Error::precondition("runs when its requester calls again with the request's id"))
            }
        }
    }

    /// Pending requests past their expiry become `expired` (audited).
    pub fn expire_requests(&self) -> Result<usize> {
        let at = now() + crate::hooks::sweep_clock_offset();
        let mut waiting = self.store.read(|tx| tx.approval_requests(Some("pending"), 500))?;
        waiting.extend(self.store.read(|tx| tx.approval_requests(Some("ready"), 500))?);
        let mut expired = 0;
        for r in waiting.iter().filter(|r| r.expires_at <= at) {
            let hours = EXPIRY_SECONDS / 3600;
            let why =
                if r.state == "ready" { format!("approved but not run within {hours} hours") } else { format!("not approved within {hours} hours") };
            self.store.write(|tx| {
                if tx.move_request(&r.id, &r.state, "expired", at, &why)? {
                    let detail = format!("{}: {} ({why})", r.id, r.summary);
                    tx.append_audit(&crate::audit::AuditEvent::system("ExpireRequest", r.key_id, None, detail), at)?;
                }
                Ok(())
            })?;
            expired += 1;
        }
        Ok(expired)
    }

    /// Runs the requests approved over a minute ago and still not run (the node that approved
    /// them stopped before it could): the sweep's, on the node that runs the background jobs.
    pub fn run_approved(&self) -> Result<usize> {
        let at = now() + crate::hooks::sweep_clock_offset();
        let approved = self.store.read(|tx| tx.approval_requests(Some("approved"), 500))?;
        let due: Vec<_> = approved.into_iter().filter(|r| r.decided_at.is_some_and(|t| at - t >= ORPHAN_SECONDS)).collect();
        for r in &due {
            tracing::warn!(request = %r.id, "running a request approved before this node stopped");
            self.execute(r);
        }
        Ok(due.len())
    }
}
