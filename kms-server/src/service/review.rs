//! The access review the framework asks for every year: every officer, auditor, workload
//! principal and grant with when it was last used, what has gone unused for 90 days, and the
//! officers' sign-offs.
//!
//! Last use is tracked in memory on the request path (no database write per request) and
//! written to the store by the sweeper and before every review.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Caller, Kms};
use crate::clock::now;
use crate::error::Result;

/// Unused for this long, an access is flagged for removal (the framework's least-privilege
/// review; 90 days is also its log retention minimum).
pub const STALE_SECONDS: i64 = 90 * 86_400;
/// A review is due this long after the last sign-off (the framework's yearly review).
pub const REVIEW_PERIOD_SECONDS: i64 = 365 * 86_400;

/// Last-use times not yet written to the store.
/// Last uses as (name, Unix time) pairs.
type LastUses = Vec<(String, i64)>;

#[derive(Debug, Default)]
pub struct Uses(Mutex<(HashMap<String, i64>, HashMap<String, i64>)>);

impl Uses {
    pub fn principal(&self, name: &str, grant_id: Option<&str>) {
        let at = now();
        let mut uses = self.0.lock().unwrap_or_else(|p| p.into_inner());
        uses.0.insert(name.to_string(), at);
        if let Some(id) = grant_id {
            uses.1.insert(id.to_string(), at);
        }
    }

    /// The last uses noted since the previous call: (principals, grants), each (name, time).
    fn take(&self) -> (LastUses, LastUses) {
        let mut uses = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (uses.0.drain().collect(), uses.1.drain().collect())
    }
}

/// One line of the review.
#[derive(Debug, Clone)]
pub struct ReviewEntry {
    /// officer, auditor, principal or grant.
    pub kind: &'static str,
    pub name: String,
    pub detail: String,
    pub enabled: bool,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    /// Unused (or never used) for 90 days.
    pub stale: bool,
}

#[derive(Debug, Clone)]
pub struct Review {
    pub entries: Vec<ReviewEntry>,
    pub last_signoff: Option<(String, i64)>,
    pub signoff_overdue: bool,
}

impl Kms {
    /// Writes pending last-use times to the store.
    pub fn flush_uses(&self) -> Result<()> {
        let (principals, grants) = self.uses.take();
        if !principals.is_empty() || !grants.is_empty() {
            self.store.write(|tx| tx.record_use(&principals, &grants))?;
        }
        Ok(())
    }

    pub fn access_review(&self) -> Result<Review> {
        self.flush_uses()?;
        let at = now();
        let stale = |created: i64, used: Option<i64>| at - used.unwrap_or(created) >= STALE_SECONDS;
        let (principal_uses, grant_uses) = self.store.read(|tx| tx.last_uses())?;
        let principal_uses: HashMap<_, _> = principal_uses.into_iter().collect();
        let grant_uses: HashMap<_, _> = grant_uses.into_iter().collect();
        let mut entries = Vec::new();
        for o in self.officers().list()? {
            entries.push(ReviewEntry {
                kind: o.role.as_str(),
                stale: stale(o.created_at, o.last_login_at),
                name: o.name,
                detail: String::new(),
                enabled: o.enabled,
                created_at: o.created_at,
                last_used_at: o.last_login_at,
            });
        }
        for p in self.list_principals() {
            let used = principal_uses.get(&p.name).copied().flatten();
            entries.push(ReviewEntry {
                kind: "principal",
                stale: stale(p.created_at, used),
                detail: String::new(),
                enabled: p.state == crate::domain::policy::PrincipalState::Enabled,
                created_at: p.created_at,
                last_used_at: used,
                name: p.name,
            });
        }
        for g in self.list_grants(None, None)? {
            let used = grant_uses.get(&g.grant_id).copied().flatten();
            let ops: Vec<&str> = g.operations.iter().map(|o| o.as_str()).collect();
            entries.push(ReviewEntry {
                kind: "grant",
                stale: stale(g.created_at, used),
                detail: format!("{} on key {}: {}", g.principal, g.key_id, ops.join(",")),
                enabled: g.expires_at.is_none_or(|t| t > at),
                created_at: g.created_at,
                last_used_at: used,
                name: g.grant_id,
            });
        }
        let (last_signoff, signoff_overdue) = self.review_signoff()?;
        Ok(Review { entries, last_signoff, signoff_overdue })
    }

    /// The last sign-off of the review (who, when), and whether a new one is overdue.
    pub fn review_signoff(&self) -> Result<(Option<(String, i64)>, bool)> {
        let last_signoff = self.store.read(|tx| tx.last_signoff())?;
        let overdue = last_signoff.as_ref().is_none_or(|(_, t)| now() - t >= REVIEW_PERIOD_SECONDS);
        Ok((last_signoff, overdue))
    }

    /// Records an officer's sign-off of the review, with its audit record.
    pub fn sign_off_review(&self, caller: &Caller, note: &str) -> Result<i64> {
        caller.commit_point(|| format!("record {}'s sign-off of the access review", caller.principal))?;
        let at = now();
        self.store.write(|tx| {
            tx.insert_signoff(&caller.principal, at, note)?;
            tx.append_audit(&caller.audit("SignOffReview", None, None, note.to_string()), at)
        })?;
        Ok(at)
    }
}
