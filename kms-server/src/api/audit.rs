//! `kms.v1.AuditLog`, on the admin listener.

use kms_proto::v1 as pb;
use kms_proto::v1::audit_log_server::AuditLog;
use tonic::{Request, Response, Status};

use super::{Audit, Shared, officer};
use crate::domain::officer::Role;
use crate::error::Error;

/// The audit service.
#[derive(Debug, Clone)]
pub struct AuditService(pub Shared);

/// Page sizes for ListAuditRecords.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

#[tonic::async_trait]
impl AuditLog for AuditService {
    async fn verify_audit(&self, request: Request<pb::VerifyAuditRequest>) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        self.0
            .call("VerifyAudit", who, Audit::EveryOutcome, move |kms, _, facts| {
                let v = kms.verify_audit()?;
                let response = pb::VerifyAuditResponse {
                    ok: v.problem.is_none(),
                    records: v.records,
                    first_bad_index: v.problem.as_ref().map_or(0, |p| p.index),
                    problem: v.problem.map(|p| p.problem).unwrap_or_default(),
                    checkpoints: v.checkpoints,
                    last_checkpoint_seq: v.last_checkpoint,
                    pruned_through_seq: v.pruned_through,
                };
                facts.detail = if response.ok {
                    format!("{} records verified", response.records)
                } else {
                    format!("chain broken at record {}", response.first_bad_index)
                };
                Ok(response)
            })
            .await
    }

    async fn list_audit_records(&self, request: Request<pb::ListAuditRecordsRequest>) -> Result<Response<pb::ListAuditRecordsResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        let r = request.into_inner();
        self.0
            .call("ListAuditRecords", who, Audit::EveryOutcome, move |kms, _, _| {
                let size = match r.page_size {
                    0 => DEFAULT_PAGE,
                    n if n <= MAX_PAGE => n,
                    n => return Err(Error::invalid("page_size", format!("is {n}; at most {MAX_PAGE}"))),
                };
                let page = kms.audit_page(r.after_seq, size)?;
                let next_after_seq = if page.len() == size as usize { page.last().map_or(0, |a| a.seq as u64) } else { 0 };
                let in_window = |t: i64| (r.since == 0 || t >= r.since) && (r.until == 0 || t < r.until);
                let records = page
                    .into_iter()
                    .filter(|a| in_window(a.time))
                    .map(|a| pb::AuditRecord {
                        seq: a.seq as u64,
                        time: a.time,
                        request_id: a.request_id,
                        principal: a.principal,
                        operation: a.operation,
                        key_id: a.key_id.unwrap_or_default(),
                        key_version: a.key_version.and_then(|v| u32::try_from(v).ok()).unwrap_or(0),
                        encryption_context: a.context.unwrap_or_default(),
                        outcome: a.outcome,
                        status: a.status,
                        detail: a.detail,
                        caller_context: a.caller_context.unwrap_or_default(),
                    })
                    .collect();
                Ok(pb::ListAuditRecordsResponse { records, next_after_seq })
            })
            .await
    }
}
