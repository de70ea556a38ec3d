//! `kmsctl status`: the service's state on one screen.

use kms_client::pb::key_management_client::KeyManagementClient;
use kms_client::{Error, pb};
use serde_json::{Value, json};

use crate::Context;
use crate::admin::admin_channel;
use crate::output::local_time;

/// Runs `kmsctl status` and prints its answer.
pub(crate) async fn run(ctx: &Context) -> Result<(), Error> {
    let out = &ctx.out;
    let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
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
                       "facades": r.facades.iter().map(|f| json!({"facade": f.facade, "calls_last_hour": f.calls_last_hour,
                           "refusals_last_hour": f.refusals_last_hour, "last_refusal_time": f.last_refusal_time,
                           "last_refusal": f.last_refusal})).collect::<Vec<_>>(),
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
                    for f in &r.facades {
                        let name = match f.facade.as_str() {
                            "xks" => "AWS external key store (XKS)",
                            "cse" => "Google Workspace CSE",
                            other => other,
                        };
                        let last = match f.last_refusal_time {
                            0 => String::new(),
                            at => format!("; last refused {}: {}", local_time(at), f.last_refusal),
                        };
                        lines.push(format!("{name}: {} calls, {} refused in the last hour{last}", f.calls_last_hour, f.refusals_last_hour));
                    }
                    lines.extend(r.recent_hsm_errors.iter().map(|e| format!("HSM error: {e}")));
                    lines.extend(r.warnings.iter().map(|w| format!("WARNING: {w}")));
                    lines.join("\n")
                },
            );
    Ok(())
}
