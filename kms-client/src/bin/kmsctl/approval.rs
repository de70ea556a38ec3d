//! Quorum (M-of-N) approvals: the policies, and the requests they make of covered calls.

use std::path::PathBuf;

use clap::Subcommand;
use kms_client::pb::key_management_client::KeyManagementClient;
use kms_client::{Error, pb};
use serde_json::{Value, json};

use crate::Context;
use crate::admin::admin_channel;
use crate::officer::secret_input;
use crate::output::local_time;

#[derive(Subcommand)]
pub(crate) enum QuorumCommand {
    /// Requires M distinct officers to approve OPERATION (1 removes the policy). Covered:
    /// ScheduleKeyDestruction, ScheduleKeyVersionDestruction, MarkKeyCompromised,
    /// DisableOfficer, CreateGrant, RevokeGrant, SetQuorumPolicy. A change needs the quorum it
    /// replaces.
    Set {
        operation: String,
        #[arg(long)]
        required: u32,
        /// Only for this key (id or alias/NAME); every key when not given.
        #[arg(long)]
        key: Option<String>,
    },
    /// The policies in force.
    List,
}

#[derive(Subcommand)]
pub(crate) enum ApprovalCommand {
    /// Requests, newest first.
    List {
        /// pending, approved, executed, failed, rejected or expired.
        #[arg(long)]
        state: Option<String>,
    },
    /// One request: what it runs, who asked and why, the votes.
    Show { id: String },
    /// Approves a request with your passphrase and TOTP code again (never your own request);
    /// the approval that reaches the count runs it.
    Approve(Vote),
    /// Rejects a request (your passphrase and TOTP code again): it will not run.
    Reject(Vote),
}

#[derive(clap::Args)]
pub(crate) struct Vote {
    id: String,
    /// A file holding your passphrase (default: the first line of standard input).
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Your authenticator's current code (default: the next line of standard input).
    #[arg(long)]
    totp: Option<String>,
}

fn policy_json(p: &pb::QuorumPolicy) -> Value {
    json!({"operation": p.operation, "key_id": p.key_id, "required": p.required, "update_time": p.update_time})
}

fn request_json(r: &pb::ApprovalRequest) -> Value {
    json!({
        "id": r.id, "operation": r.operation, "key_id": r.key_id, "summary": r.summary, "arguments": r.arguments,
        "requester": r.requester, "reason": r.reason, "required": r.required, "state": r.state,
        "creation_time": r.creation_time, "expiration_time": r.expiration_time, "decision_time": r.decision_time, "result": r.result,
        "votes": r.votes.iter().map(|v| json!({"officer": v.officer, "approve": v.approve, "time": v.time})).collect::<Vec<_>>(),
    })
}

fn request_line(r: &pb::ApprovalRequest) -> String {
    let approvals = r.votes.iter().filter(|v| v.approve).count();
    let votes = if r.votes.is_empty() && r.state != "pending" { String::new() } else { format!(" ({approvals}/{} approvals)", r.required) };
    format!("{}  {:<9} {}{votes}  by {}", r.id, r.state, r.summary, r.requester)
}

fn request_text(r: &pb::ApprovalRequest) -> String {
    let mut lines = vec![
        request_line(r),
        format!("reason: {}", if r.reason.is_empty() { "(none given)" } else { &r.reason }),
        format!("asked {}, expires {}", local_time(r.creation_time), local_time(r.expiration_time)),
        format!("runs: {}", r.arguments),
    ];
    for v in &r.votes {
        lines.push(format!("{} by {} at {}", if v.approve { "approved" } else { "rejected" }, v.officer, local_time(v.time)));
    }
    if !r.result.is_empty() {
        lines.push(format!("result: {}", r.result));
    }
    lines.join("\n")
}

impl QuorumCommand {
    pub(crate) fn changes(&self) -> bool {
        matches!(self, QuorumCommand::Set { .. })
    }

    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        match self {
            QuorumCommand::Set { operation, required, key } => {
                let r = c.set_quorum_policy(pb::SetQuorumPolicyRequest { operation, key_id: key.unwrap_or_default(), required }).await?.into_inner();
                out.print(policy_json(&r), || {
                    let on = if r.key_id.is_empty() { "every key".to_string() } else { format!("key {}", r.key_id) };
                    format!("{} on {on}: {} approvals", r.operation, r.required)
                });
            }
            QuorumCommand::List => {
                let r = c.list_quorum_policies(pb::ListQuorumPoliciesRequest {}).await?.into_inner();
                out.print(Value::Array(r.policies.iter().map(policy_json).collect()), || {
                    if r.policies.is_empty() {
                        return "no quorum policy: one officer does everything".to_string();
                    }
                    let on = |p: &pb::QuorumPolicy| if p.key_id.is_empty() { "every key".to_string() } else { p.key_id.clone() };
                    r.policies.iter().map(|p| format!("{:<30} {:<38} {} approvals", p.operation, on(p), p.required)).collect::<Vec<_>>().join("\n")
                });
            }
        }
        Ok(())
    }
}

impl ApprovalCommand {
    pub(crate) fn changes(&self) -> bool {
        matches!(self, ApprovalCommand::Approve(_) | ApprovalCommand::Reject(_))
    }

    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        let r = match self {
            ApprovalCommand::List { state } => {
                let r = c.list_approval_requests(pb::ListApprovalRequestsRequest { state: state.unwrap_or_default() }).await?.into_inner();
                out.print(Value::Array(r.requests.iter().map(request_json).collect()), || {
                    if r.requests.is_empty() { "no request".to_string() } else { r.requests.iter().map(request_line).collect::<Vec<_>>().join("\n") }
                });
                return Ok(());
            }
            ApprovalCommand::Show { id } => c.get_approval_request(pb::GetApprovalRequestRequest { id }).await?.into_inner(),
            ApprovalCommand::Approve(vote) => c.approve_request(vote.request()?).await?.into_inner(),
            ApprovalCommand::Reject(vote) => c.reject_request(vote.request()?).await?.into_inner(),
        };
        out.print(request_json(&r), || request_text(&r));
        Ok(())
    }
}

impl Vote {
    fn request(self) -> Result<pb::VoteRequest, Error> {
        let passphrase = secret_input(&self.passphrase_file)?;
        let code = match self.totp {
            Some(code) => zeroize::Zeroizing::new(code),
            None => secret_input(&None)?,
        };
        Ok(pb::VoteRequest { id: self.id, passphrase: passphrase.to_string(), totp_code: code.to_string() })
    }
}
