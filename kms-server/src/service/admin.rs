//! The key lifecycle: create, rotate, state transitions, version transitions, aliases,
//! destruction and periodic rotation. Every change follows one of two patterns:
//!
//! * state only (enable, disable, ...): under the registry's write lock, commit the new row and
//!   its audit record in one transaction, then swap the registry entry;
//! * touching the HSM (create, rotate, destroy): write an *intent*, do the HSM call, then commit
//!   the new rows, the audit record and the intent's removal in one transaction. Startup
//!   recovery finishes or undoes whatever an interrupted operation left (`recovery.rs`).

use std::sync::MutexGuard;

use super::registry::KeyEntry;
use super::{Caller, Kms};
use crate::audit::AuditEvent;
use crate::clock::now;
use crate::domain::budget::UsageLimits;
use crate::domain::ids::{AliasName, KeyId, KeyRef};
use crate::domain::lifecycle::{KeyOrigin, KeyState, KeyTransition, VersionState, VersionTransition, next_key_state, next_version_state};
use crate::domain::policy::{Grant, PrincipalState};
use crate::error::{Error, Result};
use crate::hooks::{Step, crash_point};
use crate::hsm::{KeyHandle, ObjectName};
use crate::store::Marks;
use crate::store::{AliasRecord, IntentKind, KeyRecord, PrincipalRecord, VersionRecord};

const DAY: i64 = 86_400;

/// A key as the admin plane shows it.
#[derive(Debug, Clone)]
pub struct KeyView {
    pub record: KeyRecord,
    pub aliases: Vec<AliasName>,
    pub material_missing: bool,
    pub versions: Vec<VersionView>,
}

/// A version as the admin plane shows it.
#[derive(Debug, Clone)]
pub struct VersionView {
    pub record: VersionRecord,
    pub primary: bool,
    /// Encryptions counted (at least the number performed).
    pub encryptions: u64,
    pub limits: UsageLimits,
    pub material_missing: bool,
}

impl KeyView {
    fn of(entry: &KeyEntry, limits: UsageLimits) -> KeyView {
        KeyView {
            record: entry.record.clone(),
            aliases: entry.aliases.clone(),
            material_missing: entry.material_missing(),
            versions: entry
                .versions
                .values()
                .map(|v| VersionView {
                    record: v.record.clone(),
                    primary: v.record.version == entry.record.primary_version,
                    encryptions: v.usage.used(&limits),
                    limits,
                    material_missing: v.record.state.has_material() && v.handle.is_none(),
                })
                .collect(),
        }
    }

    pub fn version(&self, version: u32) -> Option<&VersionView> {
        self.versions.iter().find(|v| v.record.version == version)
    }
}

/// Counts a change to what the registry holds, in `tx` (so that other nodes reload theirs), and
/// raises the revocation epoch too when it takes access away (a disable, a compromise, a
/// scheduled or done destruction, a revoked grant, a disabled principal), so that clients
/// caching data keys drop them at their next call and calls running meanwhile fail at commit.
pub(super) fn changed(tx: &crate::store::Tx<'_>, revokes: bool) -> std::result::Result<Marks, crate::store::StoreError> {
    tx.bump_marks(revokes)
}

/// How long a change waits for another node's to end before answering UNAVAILABLE (a backup
/// holds the cluster's admin lock for as long as it takes).
const ADMIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// This node's admin lock and, with several nodes, the cluster's: held by every change from
/// its first check to its commit.
pub(super) struct AdminGuard<'a> {
    _local: MutexGuard<'a, ()>,
    _cluster: crate::store::AdminLease<'a>,
}

pub(super) fn system() -> Caller {
    Caller::internal("system")
}

impl Kms {
    /// Takes the admin locks, and reloads the registry if another node changed anything since
    /// it was last loaded: every change is decided on the current state.
    pub(super) fn admin_lock(&self) -> Result<AdminGuard<'_>> {
        let local = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let cluster = self.store.admin_lease(ADMIN_WAIT)?;
        self.reload_if_changed()?;
        Ok(AdminGuard { _local: local, _cluster: cluster })
    }

    fn view(&self, entry: &KeyEntry) -> KeyView {
        KeyView::of(entry, self.settings.limits)
    }

    // ----- reads -----

    pub fn describe_key(&self, key: &KeyRef) -> Result<KeyView> {
        let entry = self.registry.entry(key)?;
        Ok(self.view(&entry))
    }

    /// Keys in id order, `page_size` at a time after `after`.
    pub fn list_keys(&self, after: Option<KeyId>, page_size: usize) -> (Vec<KeyView>, Option<KeyId>) {
        let state = self.registry.read();
        let mut ids: Vec<KeyId> = state.keys.keys().copied().filter(|id| after.is_none_or(|a| *id > a)).collect();
        ids.sort();
        let more = ids.len() > page_size;
        ids.truncate(page_size);
        let next = if more { ids.last().copied() } else { None };
        (ids.iter().filter_map(|id| state.keys.get(id)).map(|e| self.view(e)).collect(), next)
    }

    pub fn list_aliases(&self, key: Option<&KeyRef>) -> Result<Vec<AliasRecord>> {
        let filter = key.map(|k| self.registry.entry(k).map(|e| e.record.key_id)).transpose()?;
        let state = self.registry.read();
        let mut out: Vec<AliasRecord> = state.aliases.values().filter(|a| filter.is_none_or(|k| a.key_id == k)).cloned().collect();
        out.sort_by(|a, b| a.alias.cmp(&b.alias));
        Ok(out)
    }

    // ----- create and rotate -----

    /// Writes the intent and creates the version's HSM object (for `operation`: CreateKey or
    /// RotateKey).
    fn create_version_object(&self, operation: &'static str, caller: &Caller, key_id: KeyId, version: u32) -> Result<(i64, KeyHandle)> {
        let intent = self.store.write(|tx| tx.insert_intent(IntentKind::Create, key_id, version, now()))?;
        crash_point(operation, Step::AfterIntent);
        match self.hsm.generate_key(&ObjectName { key_id, version }) {
            Ok(handle) => {
                crash_point(operation, Step::AfterHsm);
                if let Err(late) = caller.check_deadline() {
                    // The HSM answered after the caller gave up: undo, so that DEADLINE_EXCEEDED
                    // means nothing changed.
                    self.abandon_object(intent, handle);
                    return Err(late);
                }
                Ok((intent, handle))
            }
            Err(e) => {
                if let Err(cleanup) = self.store.write(|tx| tx.delete_intent(intent)) {
                    tracing::warn!(error = %cleanup, "could not remove a create intent; recovery will");
                }
                Err(e.into())
            }
        }
    }

    /// Undoes `create_version_object` after a failed commit. If this fails too, the intent
    /// stays and startup recovery destroys the object.
    fn abandon_object(&self, intent: i64, handle: KeyHandle) {
        let undone =
            self.hsm.destroy(handle).map_err(Error::from).and_then(|()| self.store.write(|tx| tx.delete_intent(intent)).map_err(Error::from));
        if let Err(e) = undone {
            tracing::error!(error = %e, "could not undo an uncommitted key object; recovery will on restart");
        }
    }

    pub fn create_key(&self, caller: &Caller, description: String, alias: Option<AliasName>, rotation_period_secs: u64) -> Result<KeyView> {
        let _admin = self.admin_lock()?;
        if let Some(alias) = &alias
            && self.registry.read().aliases.contains_key(alias)
        {
            return Err(Error::AlreadyExists { what: alias.to_string() });
        }
        caller.commit_point(|| {
            let named = alias.as_ref().map(|a| format!(" named {a}")).unwrap_or_default();
            let rotation = if rotation_period_secs > 0 { format!(", rotated every {rotation_period_secs} s") } else { String::new() };
            format!("create a key{named} in the HSM (Enabled, version 1 primary{rotation})")
        })?;
        let mut id = [0u8; 16];
        self.hsm.random(&mut id)?;
        let key_id = KeyId::from_random(id);
        let (intent, handle) = self.create_version_object("CreateKey", caller, key_id, 1)?;
        let created_at = now();
        let (record, version) = KeyRecord::new(key_id, description, created_at, rotation_period_secs, KeyOrigin::Hsm);
        let alias_record = alias.map(|alias| AliasRecord { alias, key_id, created_at });
        let mut state = self.registry.write();
        let committed = self.store.write(|tx| {
            tx.insert_key(&record)?;
            tx.insert_version(&version)?;
            if let Some(a) = &alias_record {
                tx.insert_alias(a)?;
            }
            tx.delete_intent(intent)?;
            tx.append_audit(&caller.audit("CreateKey", Some(key_id), Some(1), "created Enabled".into()), created_at)?;
            changed(tx, false)
        });
        let marks = match committed {
            Ok(marks) => marks,
            Err(e) => {
                drop(state);
                self.abandon_object(intent, handle);
                return Err(e.into());
            }
        };
        crash_point("CreateKey", Step::AfterCommit);
        state.note(marks);
        if let Some(a) = alias_record {
            state.aliases.insert(a.alias.clone(), a);
        }
        state.put(record, vec![(version, Some(handle))]);
        let entry = state.keys.get(&key_id).cloned().ok_or_else(|| Error::NotFound { what: format!("key {key_id}") })?;
        tracing::info!(%key_id, "key created");
        Ok(self.view(&entry))
    }

    pub fn rotate_key(&self, caller: &Caller, key: &KeyRef) -> Result<KeyView> {
        let _admin = self.admin_lock()?;
        let entry = self.registry.entry(key)?;
        next_key_state(entry.record.state, KeyTransition::Rotate, entry.record.compromised).map_err(Error::precondition)?;
        self.rotate_locked(&entry, caller, "rotated by an officer")
    }

    /// Rotates a key whose `version` reached its usage threshold or limit, unless another
    /// request already did.
    pub(super) fn rotate_exhausted(&self, key_id: KeyId, version: u32) -> Result<()> {
        let _admin = self.admin_lock()?;
        let entry = self.registry.entry(&KeyRef::Id(key_id))?;
        if entry.record.primary_version != version {
            return Ok(());
        }
        if entry.record.state != KeyState::Enabled {
            return Err(Error::UsageExhausted { key_id, version });
        }
        self.rotate_locked(&entry, &system(), "usage threshold reached (NIST SP 800-38D budget)").map(|_| ())
    }

    /// Adds a version and makes it primary. Caller holds the admin lock.
    fn rotate_locked(&self, entry: &KeyEntry, caller: &Caller, why: &str) -> Result<KeyView> {
        let key_id = entry.record.key_id;
        let next = entry.versions.keys().next_back().copied().unwrap_or(0) + 1;
        caller.commit_point(|| format!("rotate key {key_id}: a new version {next} in the HSM becomes primary"))?;
        let (intent, handle) = self.create_version_object("RotateKey", caller, key_id, next)?;
        let at = now();
        let mut record = entry.record.clone();
        record.primary_version = next;
        if record.rotation_period_secs > 0 {
            record.next_rotation_at = Some(at + record.rotation_period_secs as i64);
        }
        let version = VersionRecord { key_id, version: next, state: VersionState::Enabled, created_at: at, reserved: 0, destruction_at: None };
        let mut state = self.registry.write();
        let committed = self.store.write(|tx| {
            tx.insert_version(&version)?;
            tx.update_key(&record)?;
            tx.delete_intent(intent)?;
            tx.append_audit(&caller.audit("RotateKey", Some(key_id), Some(next), why.to_string()), at)?;
            changed(tx, false)
        });
        let marks = match committed {
            Ok(marks) => marks,
            Err(e) => {
                drop(state);
                self.abandon_object(intent, handle);
                return Err(e.into());
            }
        };
        crash_point("RotateKey", Step::AfterCommit);
        state.note(marks);
        let mut versions = state.versions_of(key_id);
        versions.push((version, Some(handle)));
        state.put(record, versions);
        let entry = state.resolve(&KeyRef::Id(key_id))?.clone();
        tracing::info!(%key_id, version = next, why, "key rotated");
        Ok(self.view(&entry))
    }

    // ----- state transitions -----

    /// Enable, disable, compromise, schedule or cancel destruction. `pending_days` is used by
    /// `ScheduleDestruction` only (already validated to 7..=30 by the API layer).
    pub fn transition_key(&self, caller: &Caller, key: &KeyRef, transition: KeyTransition, pending_days: u32) -> Result<KeyView> {
        let _admin = self.admin_lock()?;
        let entry = self.registry.entry(key)?;
        let key_id = entry.record.key_id;
        let next = next_key_state(entry.record.state, transition, entry.record.compromised).map_err(Error::precondition)?;
        let at = now();
        let mut record = entry.record.clone();
        record.state = next;
        let operation = match transition {
            KeyTransition::Enable => "EnableKey",
            KeyTransition::Disable => "DisableKey",
            KeyTransition::Compromise => {
                record.compromised = true;
                "MarkKeyCompromised"
            }
            KeyTransition::ScheduleDestruction => {
                record.destruction_at = Some(at + i64::from(pending_days) * DAY);
                "ScheduleKeyDestruction"
            }
            KeyTransition::CancelDestruction => {
                record.destruction_at = None;
                "CancelKeyDestruction"
            }
            KeyTransition::Destroy | KeyTransition::Rotate => {
                return Err(Error::precondition("not a state transition an officer can request directly"));
            }
        };
        let revokes = matches!(transition, KeyTransition::Disable | KeyTransition::Compromise | KeyTransition::ScheduleDestruction);
        caller.commit_point(|| {
            let when = record.destruction_at.filter(|_| transition == KeyTransition::ScheduleDestruction);
            let when = when.map(|at| format!(", its material destroyed at {at} (in {pending_days} days)")).unwrap_or_default();
            let cut = if revokes { "; every workload is refused from its next call" } else { "" };
            format!("change key {key_id} from {} to {next}{when}{cut}", entry.record.state)
        })?;
        let mut state = self.registry.write();
        let marks = self.store.write(|tx| {
            tx.update_key(&record)?;
            tx.append_audit(&caller.audit(operation, Some(key_id), None, format!("{} -> {next}", entry.record.state)), at)?;
            changed(tx, revokes)
        })?;
        crash_point(operation, Step::AfterCommit);
        if transition == KeyTransition::Compromise {
            for (version, handle) in state.versions_of(key_id) {
                if let Some(handle) = handle {
                    self.drop_copies(key_id, version.version, handle);
                }
            }
        }
        state.put_record(record);
        state.note(marks);
        let entry = state.resolve(&KeyRef::Id(key_id))?.clone();
        tracing::info!(%key_id, state = %next, "key state changed");
        Ok(self.view(&entry))
    }

    pub fn transition_version(
        &self,
        caller: &Caller,
        key: &KeyRef,
        version: u32,
        transition: VersionTransition,
        pending_days: u32,
    ) -> Result<KeyView> {
        let _admin = self.admin_lock()?;
        let entry = self.registry.entry(key)?;
        let key_id = entry.record.key_id;
        let current = entry.versions.get(&version).ok_or_else(|| Error::NotFound { what: format!("version {version} of key {key_id}") })?;
        let next = next_version_state(entry.record.state, current.record.state, version == entry.record.primary_version, transition)
            .map_err(Error::precondition)?;
        let at = now();
        let mut record = current.record.clone();
        record.state = next;
        let operation = match transition {
            VersionTransition::Enable => "EnableKeyVersion",
            VersionTransition::Disable => "DisableKeyVersion",
            VersionTransition::ScheduleDestruction => {
                record.destruction_at = Some(at + i64::from(pending_days) * DAY);
                "ScheduleKeyVersionDestruction"
            }
            VersionTransition::CancelDestruction => {
                record.destruction_at = None;
                "CancelKeyVersionDestruction"
            }
            VersionTransition::Destroy => {
                return Err(Error::precondition("versions are destroyed by the sweeper when their window ends"));
            }
        };
        let revokes = matches!(transition, VersionTransition::Disable | VersionTransition::ScheduleDestruction);
        caller.commit_point(|| {
            let when = record.destruction_at.filter(|_| transition == VersionTransition::ScheduleDestruction);
            let when = when.map(|at| format!(", its material destroyed at {at} (in {pending_days} days)")).unwrap_or_default();
            format!("change version {version} of key {key_id} from {} to {next}{when}", current.record.state)
        })?;
        let mut state = self.registry.write();
        let marks = self.store.write(|tx| {
            tx.update_version_state(&record)?;
            tx.append_audit(&caller.audit(operation, Some(key_id), Some(version), format!("{} -> {next}", current.record.state)), at)?;
            changed(tx, revokes)
        })?;
        state.put_version(record, current.handle);
        state.note(marks);
        let entry = state.resolve(&KeyRef::Id(key_id))?.clone();
        Ok(self.view(&entry))
    }

    // ----- aliases -----

    pub fn create_alias(&self, caller: &Caller, alias: AliasName, key_id: KeyId) -> Result<AliasRecord> {
        let _admin = self.admin_lock()?;
        let entry = self.registry.entry(&KeyRef::Id(key_id))?;
        if entry.record.state == KeyState::Destroyed {
            return Err(Error::precondition(format!("key {key_id} is Destroyed")));
        }
        let mut state = self.registry.write();
        if state.aliases.contains_key(&alias) {
            return Err(Error::AlreadyExists { what: alias.to_string() });
        }
        caller.commit_point(|| format!("name key {key_id} {alias}"))?;
        let record = AliasRecord { alias, key_id, created_at: now() };
        let marks = self.store.write(|tx| {
            tx.insert_alias(&record)?;
            tx.append_audit(&caller.audit("CreateAlias", Some(key_id), None, record.alias.to_string()), record.created_at)?;
            changed(tx, false)
        })?;
        state.note(marks);
        state.aliases.insert(record.alias.clone(), record.clone());
        state.refresh_aliases(key_id);
        Ok(record)
    }

    pub fn delete_alias(&self, caller: &Caller, alias: &AliasName) -> Result<()> {
        let _admin = self.admin_lock()?;
        let mut state = self.registry.write();
        let record = state.aliases.get(alias).cloned().ok_or_else(|| Error::NotFound { what: alias.to_string() })?;
        caller.commit_point(|| format!("delete {alias}, which names key {}", record.key_id))?;
        let marks = self.store.write(|tx| {
            tx.delete_alias(alias)?;
            tx.append_audit(&caller.audit("DeleteAlias", Some(record.key_id), None, alias.to_string()), now())?;
            changed(tx, false)
        })?;
        state.note(marks);
        state.aliases.remove(alias);
        state.refresh_aliases(record.key_id);
        Ok(())
    }

    // ----- principals and grants -----

    pub fn list_principals(&self) -> Vec<PrincipalRecord> {
        let mut out: Vec<PrincipalRecord> = self.registry.read().principals.values().cloned().collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn create_principal(&self, caller: &Caller, name: &str) -> Result<PrincipalRecord> {
        if let Some(whose) = super::facade_principal(name) {
            return Err(Error::invalid("name", format!("{name}: this name is {whose} (kmsctl xks, kmsctl cse)")));
        }
        let _admin = self.admin_lock()?;
        let mut state = self.registry.write();
        if state.principals.contains_key(name) {
            return Err(Error::AlreadyExists { what: format!("principal {name}") });
        }
        caller.commit_point(|| format!("register principal {name} (Enabled, with no grant)"))?;
        let record = PrincipalRecord { name: name.to_string(), state: PrincipalState::Enabled, created_at: now() };
        let marks = self.store.write(|tx| {
            tx.insert_principal(name, PrincipalState::Enabled, record.created_at)?;
            tx.append_audit(&caller.audit("CreatePrincipal", None, None, format!("principal {name}")), record.created_at)?;
            changed(tx, false)
        })?;
        state.note(marks);
        state.principals.insert(name.to_string(), record.clone());
        Ok(record)
    }

    /// Enables or disables a principal; a disabled one is refused from its next call on.
    pub fn set_principal_state(&self, caller: &Caller, name: &str, to: PrincipalState) -> Result<PrincipalRecord> {
        let _admin = self.admin_lock()?;
        let mut state = self.registry.write();
        let mut record = state.principals.get(name).cloned().ok_or_else(|| Error::NotFound { what: format!("principal {name}") })?;
        caller.commit_point(|| {
            let cut = if to == PrincipalState::Disabled { "; it is refused from its next call" } else { "" };
            format!("change principal {name} from {} to {}{cut}", record.state.as_str(), to.as_str())
        })?;
        record.state = to;
        let operation = match to {
            PrincipalState::Enabled => "EnablePrincipal",
            PrincipalState::Disabled => "DisablePrincipal",
        };
        let marks = self.store.write(|tx| {
            tx.set_principal_state(name, to)?;
            tx.append_audit(&caller.audit(operation, None, None, format!("principal {name}")), now())?;
            changed(tx, to == PrincipalState::Disabled)
        })?;
        state.principals.insert(name.to_string(), record.clone());
        state.note(marks);
        Ok(record)
    }

    pub fn list_grants(&self, key: Option<&KeyRef>, principal: Option<&str>) -> Result<Vec<Grant>> {
        let key_id = key.map(|k| self.registry.entry(k).map(|e| e.record.key_id)).transpose()?;
        let state = self.registry.read();
        let mut out: Vec<Grant> = state
            .grants
            .values()
            .flatten()
            .filter(|g| key_id.is_none_or(|k| g.key_id == k) && principal.is_none_or(|p| g.principal == p))
            .cloned()
            .collect();
        out.sort_by(|a, b| (a.created_at, &a.grant_id).cmp(&(b.created_at, &b.grant_id)));
        Ok(out)
    }

    /// Creates a grant. The principal must be registered and the key must not be destroyed;
    /// the grant binds the key id an alias names now.
    pub fn create_grant(&self, caller: &Caller, mut grant: Grant, key: &KeyRef) -> Result<Grant> {
        let _admin = self.admin_lock()?;
        let entry = self.registry.entry(key)?;
        if entry.record.state == KeyState::Destroyed {
            return Err(Error::precondition(format!("key {} is Destroyed", entry.record.key_id)));
        }
        if !self.registry.read().principals.contains_key(&grant.principal) {
            return Err(Error::NotFound { what: format!("principal {}", grant.principal) });
        }
        let ops: Vec<&str> = grant.operations.iter().map(|o| o.as_str()).collect();
        caller.commit_point(|| {
            let pairs: Vec<String> = grant.required_pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let keys: Vec<&str> = grant.required_keys.iter().map(String::as_str).collect();
            let mut conditions = Vec::new();
            if !pairs.is_empty() {
                conditions.push(format!("with the context pairs {}", pairs.join(", ")));
            }
            if !keys.is_empty() {
                conditions.push(format!("with the context keys {}", keys.join(", ")));
            }
            if let Some(at) = grant.expires_at {
                conditions.push(format!("until {at}"));
            }
            let conditions = if conditions.is_empty() { String::new() } else { format!(" ({})", conditions.join("; ")) };
            format!("grant {} {} on key {}{conditions}", grant.principal, ops.join(","), entry.record.key_id)
        })?;
        let mut id = [0u8; 16];
        self.hsm.random(&mut id)?;
        grant.grant_id = KeyId::from_random(id).to_string();
        grant.key_id = entry.record.key_id;
        grant.created_at = now();
        // Principals are never deleted, and the admin lock is held: the check above still holds.
        let mut state = self.registry.write();
        let marks = self.store.write(|tx| {
            tx.insert_grant(&grant)?;
            tx.append_audit(
                &caller.audit("CreateGrant", Some(grant.key_id), None, format!("grant {} to {}: {}", grant.grant_id, grant.principal, ops.join(","))),
                grant.created_at,
            )?;
            changed(tx, false)
        })?;
        state.note(marks);
        state.grants.entry(grant.key_id).or_default().push(grant.clone());
        Ok(grant)
    }

    /// The live grant `grant_id`, if there is one.
    pub fn grant(&self, grant_id: &str) -> Option<Grant> {
        self.registry.read().grant(grant_id).cloned()
    }

    /// Revokes a grant: it allows nothing from the next call on.
    pub fn revoke_grant(&self, caller: &Caller, grant_id: &str) -> Result<()> {
        let _admin = self.admin_lock()?;
        let mut state = self.registry.write();
        let grant = state.grant(grant_id).cloned().ok_or_else(|| Error::NotFound { what: format!("grant {grant_id}") })?;
        caller.commit_point(|| {
            format!("revoke grant {grant_id} of {} on key {}; it allows nothing from the next call", grant.principal, grant.key_id)
        })?;
        let at = now();
        let marks = self.store.write(|tx| {
            tx.revoke_grant(grant_id, at)?;
            tx.append_audit(&caller.audit("RevokeGrant", Some(grant.key_id), None, format!("grant {grant_id} of {}", grant.principal)), at)?;
            changed(tx, true)
        })?;
        state.note(marks);
        if let Some(list) = state.grants.get_mut(&grant.key_id) {
            list.retain(|g| g.grant_id != grant_id);
        }
        Ok(())
    }

    // ----- background work -----

    /// Destroys what is due, rotates what is due, removes audit records past retention, and
    /// settles the intents a node that died left. With several nodes, only the leader does (its
    /// lock in the store: one node at a time, another taking over when it dies). Returns how
    /// many actions it took.
    pub fn sweep(&self) -> Result<usize> {
        self.flush_uses()?;
        if let Some(limiter) = &self.limiter {
            limiter.lock().unwrap_or_else(|p| p.into_inner()).forget_idle(std::time::Instant::now());
        }
        let leading = self.store.leading()?;
        self.leading.store(leading, std::sync::atomic::Ordering::SeqCst);
        if !leading {
            return Ok(0);
        }
        let pruned = self.prune_audit(self.settings.audit_retention_days, now() + crate::hooks::retention_clock_offset())?;
        // Before the admin lock: running an approved request takes it.
        let approvals = self.expire_requests()? + self.run_approved()?;
        let _admin = self.admin_lock()?;
        // Under the cluster's admin lock no live node is in the middle of a change: an intent in
        // the store is a dead node's.
        let mut settled = 0;
        if self.store.is_shared() && !self.store.read(|tx| tx.intents())?.is_empty() {
            let mut objects = self.hsm.find_keys()?.into_iter().collect();
            settled = self.settle_intents(&mut objects)?;
            self.reload_if_changed()?;
        }
        let at = now() + crate::hooks::sweep_clock_offset();
        let entries: Vec<_> = self.registry.read().keys.values().cloned().collect();
        let mut actions = usize::from(pruned.is_some()) + settled + approvals;
        for entry in entries {
            let r = &entry.record;
            if r.state == KeyState::PendingDestruction && r.destruction_at.is_some_and(|t| t <= at) {
                self.destroy_key(&entry)?;
                actions += 1;
                continue;
            }
            for v in entry.versions.values() {
                if v.record.state == VersionState::PendingDestruction && v.record.destruction_at.is_some_and(|t| t <= at) {
                    self.destroy_version(&entry, v.record.version)?;
                    actions += 1;
                }
            }
            if r.state == KeyState::Enabled && r.next_rotation_at.is_some_and(|t| t <= at) {
                let entry = self.registry.entry(&KeyRef::Id(r.key_id))?;
                self.rotate_locked(&entry, &system(), "rotation period elapsed")?;
                actions += 1;
            }
        }
        Ok(actions)
    }

    /// Destroys one version's HSM object under a destroy intent (for `operation`: DestroyKey or
    /// DestroyKeyVersion); returns the intent.
    fn destroy_object(&self, operation: &'static str, key_id: KeyId, version: u32, handle: Option<KeyHandle>) -> Result<Option<i64>> {
        let Some(handle) = handle else { return Ok(None) };
        let intent = self.store.write(|tx| tx.insert_intent(IntentKind::Destroy, key_id, version, now()))?;
        crash_point(operation, Step::AfterIntent);
        if let Err(e) = self.hsm.destroy(handle) {
            // The HSM said no (it is down, or busy): the object is still there and the next
            // sweep tries again, so this attempt's intent goes.
            if let Err(cleanup) = self.store.write(|tx| tx.delete_intent(intent)) {
                tracing::warn!(error = %cleanup, "could not remove a destroy intent; recovery will");
            }
            return Err(e.into());
        }
        crash_point(operation, Step::AfterHsm);
        Ok(Some(intent))
    }

    fn destroy_version(&self, entry: &KeyEntry, version: u32) -> Result<()> {
        let key_id = entry.record.key_id;
        let Some(v) = entry.versions.get(&version) else { return Ok(()) };
        let intent = self.destroy_object("DestroyKeyVersion", key_id, version, v.handle)?;
        let at = now();
        let mut record = v.record.clone();
        record.state = VersionState::Destroyed;
        record.destruction_at = Some(at);
        let mut state = self.registry.write();
        let marks = self.store.write(|tx| {
            tx.update_version_state(&record)?;
            if let Some(i) = intent {
                tx.delete_intent(i)?;
            }
            tx.append_audit(&AuditEvent::system("DestroyKeyVersion", Some(key_id), Some(version), "HSM object destroyed".into()), at)?;
            changed(tx, true)
        })?;
        state.put_version(record, None);
        state.note(marks);
        tracing::info!(%key_id, version, "key version destroyed");
        Ok(())
    }

    fn destroy_key(&self, entry: &KeyEntry) -> Result<()> {
        let key_id = entry.record.key_id;
        let mut intents = Vec::new();
        for v in entry.versions.values().filter(|v| v.record.state.has_material()) {
            match self.destroy_object("DestroyKey", key_id, v.record.version, v.handle) {
                Ok(intent) => intents.extend(intent.map(|i| (v.record.clone(), i))),
                Err(e) => {
                    // Keep what was done: the versions whose objects are gone are recorded as
                    // destroyed now; the next sweep destroys the rest and the key.
                    let at = now();
                    let mut state = self.registry.write();
                    let marks = self.store.write(|tx| {
                        for (record, intent) in &intents {
                            tx.update_version_state(&VersionRecord { state: VersionState::Destroyed, destruction_at: Some(at), ..record.clone() })?;
                            tx.delete_intent(*intent)?;
                        }
                        changed(tx, true)
                    })?;
                    state.note(marks);
                    for (record, _) in intents {
                        state.put_version(VersionRecord { state: VersionState::Destroyed, destruction_at: Some(at), ..record }, None);
                    }
                    return Err(e);
                }
            }
        }
        let intents: Vec<i64> = intents.into_iter().map(|(_, i)| i).collect();
        let at = now();
        let mut record = entry.record.clone();
        record.state = KeyState::Destroyed;
        record.destruction_at = Some(at);
        let versions: Vec<(VersionRecord, Option<KeyHandle>)> = entry
            .versions
            .values()
            .map(|v| {
                let mut r = v.record.clone();
                if r.state.has_material() {
                    r.state = VersionState::Destroyed;
                    r.destruction_at = Some(at);
                }
                (r, None)
            })
            .collect();
        let mut state = self.registry.write();
        let marks = self.store.write(|tx| {
            tx.update_key(&record)?;
            for (v, _) in &versions {
                tx.update_version_state(v)?;
            }
            for i in &intents {
                tx.delete_intent(*i)?;
            }
            tx.append_audit(&AuditEvent::system("DestroyKey", Some(key_id), None, "HSM objects destroyed; tombstone kept".into()), at)?;
            changed(tx, true)
        })?;
        crash_point("DestroyKey", Step::AfterCommit);
        state.put(record, versions);
        state.note(marks);
        tracing::info!(%key_id, "key destroyed");
        Ok(())
    }
}
