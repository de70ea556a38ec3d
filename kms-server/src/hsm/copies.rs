//! The bookkeeping of *session copies* of key versions.
//!
//! SoftHSM2 keeps a private token object's value encrypted under the token key and decrypts it,
//! after re-reading the object's file under locks, on every use; a session object holds its value
//! in memory. AES-GCM under a session copy of a version runs about three times as fast
//! (ARCHITECTURE.md, "Where the time goes"). `pkcs11.rs` makes each copy in the background, by
//! wrapping the version under the trusted public backup key and unwrapping it with the private
//! one, whose `CKA_UNWRAP_TEMPLATE` makes any unwrapped key sensitive and unable to wrap, unwrap
//! or derive: so a copy is made by no path the user PIN did not already have, and is as protected
//! as its version (`templates::session_copy`).
//!
//! This module only decides: which versions have a copy, which are wanted, and which must never
//! get one again in this generation (destroyed, or refused by the HSM), and which have gone
//! unused long enough to give their place (and memory) to others: a copy not used between two
//! idle passes is evicted, and destroyed only at the pass after, when no call can still be using
//! it. Everything is per link generation (see `KeyHandle`): a new login or initialisation drops
//! every copy (a new login closes the anchor session they were made on, an initialisation every
//! session), so a new generation starts empty.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::Duration;

/// An object handle: `cryptoki`'s, or a plain number in the unit tests.
pub(super) trait Handle: Copy + PartialEq {
    fn raw(&self) -> u64;
}

impl Handle for cryptoki::object::ObjectHandle {
    fn raw(&self) -> u64 {
        self.handle()
    }
}

/// What is known of one version's copy in the current generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry<H> {
    /// Queued for the maker.
    Wanted,
    Ready(H),
    /// Destroyed with its version, or refused by the HSM: the token object is used. Kept as a
    /// tombstone, so that a copy the maker finishes late is never taken for another object
    /// given the same handle (a PKCS#11 module may reuse handles); not counted in the limit.
    Never,
}

impl<H> Entry<H> {
    /// Counted in the limit: a copy that exists or is being made.
    fn live(&self) -> bool {
        !matches!(self, Entry::Never)
    }
}

/// An entry, and whether its copy was used since the last idle pass.
#[derive(Debug)]
struct Slot<H> {
    entry: Entry<H>,
    used: AtomicBool,
}

#[derive(Debug)]
struct Entries<H> {
    generation: u64,
    /// By the raw handle of the version's token object.
    map: HashMap<u64, Slot<H>>,
    /// Entries that are `Wanted` or `Ready`, and `Ready` ones.
    live: usize,
    ready: usize,
}

impl<H: Handle> Entries<H> {
    fn new(generation: u64) -> Self {
        Entries { generation, map: HashMap::new(), live: 0, ready: 0 }
    }

    /// Whether `generation` is this map's, after starting afresh when it is newer; a request of
    /// an older generation must change nothing.
    fn at(&mut self, generation: u64) -> bool {
        if generation > self.generation {
            *self = Entries::new(generation);
        }
        generation == self.generation
    }

    fn get(&self, object: H) -> Option<Entry<H>> {
        self.map.get(&object.raw()).map(|slot| slot.entry)
    }

    /// Sets (or with `None` removes) an object's entry, keeping the counts; returns the old one.
    /// A new entry counts as used, so that it lives at least until the second idle pass.
    fn set(&mut self, object: u64, entry: Option<Entry<H>>) -> Option<Entry<H>> {
        let old = match entry {
            Some(entry) => self.map.insert(object, Slot { entry, used: AtomicBool::new(true) }),
            None => self.map.remove(&object),
        }
        .map(|slot| slot.entry);
        let count = |e: Option<Entry<H>>| (usize::from(e.is_some_and(|e| e.live())), usize::from(matches!(e, Some(Entry::Ready(_)))));
        let ((live_old, ready_old), (live_new, ready_new)) = (count(old), count(entry));
        self.live = self.live + live_new - live_old;
        self.ready = self.ready + ready_new - ready_old;
        old
    }
}

/// Session copies wanted, made and refused; shared by the data workers (lookups), the maker
/// thread and `destroy`.
#[derive(Debug)]
pub(super) struct Copies<H> {
    /// The most copies kept (each costs SoftHSM2 about 10 KiB); 0 until `enable`.
    limit: AtomicUsize,
    entries: RwLock<Entries<H>>,
    /// Copies evicted at the last idle pass (or whose destruction failed), with their versions'
    /// raw handles and their generation: destroyed at the next pass, or with their version.
    /// Locked only with `entries` held for writing.
    evicted: Mutex<(u64, Vec<(u64, H)>)>,
    queue: Mutex<VecDeque<(H, u64)>>,
    wanted: Condvar,
}

impl<H: Handle> Default for Copies<H> {
    fn default() -> Self {
        Copies {
            limit: AtomicUsize::new(0),
            entries: RwLock::new(Entries::new(0)),
            evicted: Mutex::new((0, Vec::new())),
            queue: Mutex::new(VecDeque::new()),
            wanted: Condvar::new(),
        }
    }
}

impl<H: Handle> Copies<H> {
    pub(super) fn enable(&self, limit: usize) {
        self.limit.store(limit, Ordering::Release);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Entries<H>> {
        // Every update is one map operation: a poisoned lock is still consistent.
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Entries<H>> {
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The copy of a version's token object, if one is ready; if none was asked for in this
    /// generation, asks the maker for one (within the limit).
    pub(super) fn get(&self, object: H, generation: u64) -> Option<H> {
        let limit = self.limit.load(Ordering::Acquire);
        if limit == 0 {
            return None;
        }
        {
            let entries = self.read();
            if entries.generation == generation {
                match entries.map.get(&object.raw()) {
                    Some(Slot { entry: Entry::Ready(copy), used }) => {
                        // Written only when it changes: the flag's cache line stays shared.
                        if !used.load(Ordering::Relaxed) {
                            used.store(true, Ordering::Relaxed);
                        }
                        return Some(*copy);
                    }
                    Some(_) => return None,
                    None if entries.live >= limit => return None,
                    None => {}
                }
            }
        }
        let mut entries = self.write();
        if entries.at(generation) && entries.live < limit && entries.get(object).is_none() {
            entries.set(object.raw(), Some(Entry::Wanted));
            self.queue.lock().unwrap_or_else(|p| p.into_inner()).push_back((object, generation));
            self.wanted.notify_one();
        }
        None
    }

    /// The next version to copy, waiting at most `wait` for one.
    pub(super) fn next_wanted(&self, wait: Duration) -> Option<(H, u64)> {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let (mut queue, _) = self.wanted.wait_timeout_while(queue, wait, |q| q.is_empty()).unwrap_or_else(|p| p.into_inner());
        queue.pop_front()
    }

    /// Moves an object's entry from `from` to `to` (`None`: removed) if it is `from` in
    /// `generation`; whether it was.
    fn transition(&self, object: H, generation: u64, from: Entry<H>, to: Option<Entry<H>>) -> bool {
        let mut entries = self.write();
        let moved = entries.at(generation) && entries.get(object) == Some(from);
        if moved {
            entries.set(object.raw(), to);
        }
        moved
    }

    /// Records a copy the maker made. `false` when it is not wanted any more (its version was
    /// destroyed meanwhile, or the generation changed): the caller destroys it.
    pub(super) fn finish(&self, object: H, generation: u64, copy: H) -> bool {
        self.transition(object, generation, Entry::Wanted, Some(Entry::Ready(copy)))
    }

    /// The maker could not make a copy: `retry` when the failure may pass (it is wanted again
    /// on the next use), otherwise the token object is used for the rest of the generation.
    pub(super) fn failed(&self, object: H, generation: u64, retry: bool) {
        self.transition(object, generation, Entry::Wanted, if retry { None } else { Some(Entry::Never) });
    }

    /// A call with a ready copy failed as if the copy were gone: forget it, so the next use takes
    /// the token object and asks for a new copy.
    pub(super) fn forget(&self, object: H, generation: u64, copy: H) {
        self.transition(object, generation, Entry::Ready(copy), None);
    }

    /// The evicted copies of `generation`, locked (with `entries` held for writing).
    fn evicted(&self, generation: u64) -> std::sync::MutexGuard<'_, (u64, Vec<(u64, H)>)> {
        let mut evicted = self.evicted.lock().unwrap_or_else(|p| p.into_inner());
        if evicted.0 != generation {
            // An older generation's copies went with its anchor or its library.
            *evicted = (generation, Vec::new());
        }
        evicted
    }

    /// The version's token object is about to be destroyed: no copy of it will be made or used
    /// again, and its copies (a ready one, an evicted one not yet destroyed) are returned for the
    /// caller to destroy first.
    pub(super) fn take_for_destroy(&self, object: H, generation: u64) -> Vec<H> {
        let mut entries = self.write();
        if !entries.at(generation) {
            return Vec::new();
        }
        let mut copies: Vec<H> = match entries.set(object.raw(), Some(Entry::Never)) {
            Some(Entry::Ready(copy)) => vec![copy],
            _ => Vec::new(),
        };
        self.evicted(generation).1.retain(|(of, copy)| {
            let this = *of == object.raw();
            if this {
                copies.push(*copy);
            }
            !this
        });
        copies
    }

    /// Destroying copies taken by `take_for_destroy` failed: they are destroyed at the next idle
    /// pass, or first thing when their version's destruction is tried again.
    pub(super) fn destroy_later(&self, object: H, generation: u64, copies: &[H]) {
        let mut entries = self.write();
        if entries.at(generation) {
            self.evicted(generation).1.extend(copies.iter().map(|copy| (object.raw(), *copy)));
        }
    }

    /// The idle pass: evicts the copies of `generation` not used since the last pass (their
    /// versions go back to their token objects, and are asked for again on their next use), and
    /// returns the copies evicted at the last pass, to destroy now: by now no call that took one
    /// just before it was evicted can still be using it.
    pub(super) fn evict_idle(&self, generation: u64) -> Vec<H> {
        let mut entries = self.write();
        if !entries.at(generation) {
            return Vec::new();
        }
        let idle: Vec<(u64, H)> = entries
            .map
            .iter()
            .filter_map(|(object, slot)| match slot.entry {
                Entry::Ready(copy) if !slot.used.swap(false, Ordering::Relaxed) => Some((*object, copy)),
                _ => None,
            })
            .collect();
        for (object, _) in &idle {
            entries.set(*object, None);
        }
        let due = std::mem::replace(&mut self.evicted(generation).1, idle);
        due.into_iter().map(|(_, copy)| copy).collect()
    }

    /// Copies ready in `generation`; `None` when copies are off.
    pub(super) fn ready(&self, generation: u64) -> Option<usize> {
        if self.limit.load(Ordering::Acquire) == 0 {
            return None;
        }
        let entries = self.read();
        Some(if entries.generation == generation { entries.ready } else { 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Handle for u64 {
        fn raw(&self) -> u64 {
            *self
        }
    }

    fn h(n: u64) -> u64 {
        n
    }

    const NOW: Duration = Duration::ZERO;

    #[test]
    fn off_until_enabled() {
        let copies = Copies::default();
        assert_eq!(copies.get(h(1), 1), None);
        assert_eq!(copies.next_wanted(NOW), None);
        assert_eq!(copies.ready(1), None);
    }

    #[test]
    fn a_version_is_wanted_once_then_its_copy_is_used() {
        let copies = Copies::default();
        copies.enable(10);
        assert_eq!(copies.get(h(1), 1), None);
        assert_eq!(copies.get(h(1), 1), None);
        assert_eq!(copies.next_wanted(NOW), Some((h(1), 1)));
        assert_eq!(copies.next_wanted(NOW), None, "asked for once");
        assert!(copies.finish(h(1), 1, h(100)));
        assert_eq!(copies.get(h(1), 1), Some(h(100)));
        assert_eq!(copies.ready(1), Some(1));
    }

    #[test]
    fn a_new_generation_starts_empty_and_an_older_one_changes_nothing() {
        let copies = Copies::default();
        copies.enable(10);
        copies.get(h(1), 1);
        assert!(copies.finish(h(1), 1, h(100)));
        assert_eq!(copies.get(h(1), 2), None, "the copy died with generation 1");
        assert_eq!(copies.ready(2), Some(0));
        assert_eq!(copies.next_wanted(NOW), Some((h(1), 1)));
        assert_eq!(copies.next_wanted(NOW), Some((h(1), 2)));
        assert!(!copies.finish(h(1), 1, h(101)), "a copy of an old generation is refused");
        assert!(copies.finish(h(1), 2, h(102)));
        assert_eq!(copies.get(h(1), 1), None);
        assert_eq!(copies.get(h(1), 2), Some(h(102)));
    }

    #[test]
    fn a_destroyed_version_never_gets_a_copy_even_one_made_meanwhile() {
        let copies = Copies::default();
        copies.enable(10);
        copies.get(h(1), 1);
        assert_eq!(copies.take_for_destroy(h(1), 1), Vec::<u64>::new());
        assert!(!copies.finish(h(1), 1, h(100)), "the maker's copy must be destroyed, not kept");
        assert_eq!(copies.get(h(1), 1), None);
        assert_eq!(copies.next_wanted(NOW), Some((h(1), 1)));
        assert_eq!(copies.next_wanted(NOW), None, "not asked for again");

        copies.get(h(2), 1);
        assert!(copies.finish(h(2), 1, h(200)));
        assert_eq!(copies.take_for_destroy(h(2), 1), [h(200)]);
        assert_eq!(copies.get(h(2), 1), None);
        copies.destroy_later(h(2), 1, &[h(200)]);
        assert_eq!(copies.get(h(2), 1), None, "never used again");
        assert_eq!(copies.take_for_destroy(h(2), 1), [h(200)], "found again by the next attempt");
        copies.destroy_later(h(2), 1, &[h(200)]);
        assert_eq!(copies.evict_idle(1), [h(200)], "destroyed at the next idle pass");
        assert_eq!(copies.evict_idle(1), Vec::<u64>::new(), "and only once");
    }

    #[test]
    fn a_destroyed_version_takes_its_evicted_copy_with_it_at_once() {
        let copies = Copies::default();
        copies.enable(10);
        copies.get(h(1), 1);
        assert!(copies.finish(h(1), 1, h(100)));
        copies.evict_idle(1);
        assert_eq!(copies.evict_idle(1), Vec::<u64>::new(), "evicted now, destroyed at the next pass");
        copies.get(h(1), 1);
        assert!(copies.finish(h(1), 1, h(101)), "used again: a new copy");
        let mut taken = copies.take_for_destroy(h(1), 1);
        taken.sort();
        assert_eq!(taken, [h(100), h(101)], "the evicted copy does not wait for the next pass");
        copies.evict_idle(1);
        assert_eq!(copies.evict_idle(1), Vec::<u64>::new(), "nothing left to destroy twice");
    }

    #[test]
    fn failures_are_retried_only_when_they_may_pass() {
        let copies = Copies::default();
        copies.enable(10);
        copies.get(h(1), 1);
        copies.get(h(2), 1);
        copies.failed(h(1), 1, true);
        copies.failed(h(2), 1, false);
        copies.get(h(1), 1);
        copies.get(h(2), 1);
        let queued: Vec<_> = std::iter::from_fn(|| copies.next_wanted(NOW)).collect();
        assert_eq!(queued, [(h(1), 1), (h(2), 1), (h(1), 1)]);
    }

    #[test]
    fn a_lost_copy_is_forgotten_and_asked_for_again() {
        let copies = Copies::default();
        copies.enable(10);
        copies.get(h(1), 1);
        assert!(copies.finish(h(1), 1, h(100)));
        copies.forget(h(1), 1, h(100));
        assert_eq!(copies.get(h(1), 1), None);
        assert_eq!(copies.ready(1), Some(0));
        assert_eq!(std::iter::from_fn(|| copies.next_wanted(NOW)).count(), 2);
    }

    #[test]
    fn destroyed_versions_do_not_use_up_the_limit() {
        let copies = Copies::default();
        copies.enable(1);
        copies.get(h(1), 1);
        assert!(copies.finish(h(1), 1, h(100)));
        copies.get(h(2), 1);
        assert_eq!(copies.take_for_destroy(h(1), 1), [h(100)]);
        assert_eq!(copies.ready(1), Some(0));
        copies.get(h(2), 1);
        assert!(copies.finish(h(2), 1, h(200)), "the slot was freed");
        assert_eq!(copies.get(h(2), 1), Some(h(200)));
    }

    #[test]
    fn a_copy_unused_between_two_idle_passes_is_evicted_and_its_place_freed() {
        let copies = Copies::default();
        copies.enable(2);
        for n in 1..=2 {
            copies.get(h(n), 1);
            assert!(copies.finish(h(n), 1, h(100 + n)));
        }
        assert_eq!(copies.evict_idle(1), Vec::<u64>::new(), "new copies count as used");
        assert_eq!(copies.get(h(1), 1), Some(h(101)));
        assert_eq!(copies.evict_idle(1), Vec::<u64>::new(), "evicted copies are destroyed a pass later");
        assert_eq!(copies.ready(1), Some(1));
        assert_eq!(copies.get(h(2), 1), None);
        copies.get(h(3), 1);
        let queued: Vec<_> = std::iter::from_fn(|| copies.next_wanted(NOW)).collect();
        assert_eq!(queued, [(h(1), 1), (h(2), 1), (h(2), 1)], "the evicted version is asked for again; the limit holds (2 live)");
        assert_eq!(copies.evict_idle(1), [h(102)], "only the copy unused since the last pass");
        assert_eq!(copies.evict_idle(2), Vec::<u64>::new(), "a new generation has no copies to evict or destroy");
        assert_eq!(copies.evict_idle(1), Vec::<u64>::new(), "nor has an old one");
    }

    #[test]
    fn no_more_than_the_limit_is_asked_for() {
        let copies = Copies::default();
        copies.enable(2);
        for n in 1..=5 {
            copies.get(h(n), 1);
        }
        assert_eq!(std::iter::from_fn(|| copies.next_wanted(NOW)).count(), 2);
    }
}
