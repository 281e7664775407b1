//! Per-table context that every flow slot reaches through an 8-bit id instead of a pointer.
//!
//! A flow needs its table's timeouts (for [`Flow::is_expired`](super::Flow::is_expired)) and its egress IP
//! (for [`Flow::egress_ip`](super::Flow::egress_ip)); storing an 8-byte table pointer plus a 16-byte egress
//! address in each of millions of slots would break the 128-byte-per-flow budget. Instead each live table
//! registers a small immutable [`Context`] in a process-wide array of [`MAX_TABLES`] entries and its slots keep
//! the one-byte index (the top byte of the control word). Registration and release take a mutex (table
//! creation and drop only); reads are one atomic load.
//!
//! Lifetime: [`register`] returns a [`Registration`], which the table's shared state (`conntrack::Inner`, the
//! owner of the flow arena) keeps as a field; dropping it releases the id and frees the context. So a context
//! lives exactly as long as the arena whose slots carry its id, and [`get`] hands out a reference only for a
//! lifetime the caller proves is inside that (it is `unsafe`; its one caller, `Flow::ctx`, ties it to a borrow
//! of the flow). The registry is a [`Registry`] value so that loom can model it (`tests::loom_*`).

use core::net::IpAddr;
use core::sync::atomic::Ordering;

#[cfg(loom)]
use loom::sync::{atomic::AtomicPtr, Mutex};
#[cfg(not(loom))]
use std::sync::{atomic::AtomicPtr, Mutex};

/// Most tables alive at once in one process.
pub(crate) const MAX_TABLES: usize = 256;

/// What flows need to know about their table.
#[derive(Debug)]
pub(crate) struct Context {
    /// The table's per-source quota, which a TCP flow gives back when it finishes (see `quota.rs`).
    pub(crate) quota: std::sync::Arc<super::quota::Quota>,
    /// Egress IP of each pool, by pool id.
    pub(crate) pool_ips: Box<[IpAddr]>,
    /// Idle timeouts in milliseconds: UDP, TCP established, TCP transitory, ICMP.
    pub(crate) udp_ms: u64,
    pub(crate) tcp_est_ms: u64,
    pub(crate) tcp_trans_ms: u64,
    pub(crate) icmp_ms: u64,
}

/// Up to `N` contexts by id. Non-null slots own a `Box<Context>` (made by `Box::into_raw`).
pub(crate) struct Registry<const N: usize> {
    slots: [AtomicPtr<Context>; N],
    lock: Mutex<()>,
}

#[cfg(not(loom))]
static GLOBAL: Registry<MAX_TABLES> = Registry::new();

#[cfg(loom)]
loom::lazy_static! {
    static ref GLOBAL: Registry<MAX_TABLES> = Registry::new();
}

/// Ownership of one registered id; dropping it releases the id and frees its context.
#[derive(Debug)]
pub(crate) struct Registration {
    id: u8,
}

impl Registration {
    /// The id that flows store.
    pub(crate) fn id(&self) -> u8 {
        self.id
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        GLOBAL.release(self.id);
    }
}

/// Registers `ctx` in the process-wide registry; panics when [`MAX_TABLES`] tables are alive (a
/// configuration this gateway never has).
pub(crate) fn register(ctx: Context) -> Registration {
    match GLOBAL.register(ctx) {
        Some(id) => Registration { id },
        None => panic!("more than {MAX_TABLES} conntrack tables alive at once"),
    }
}

/// The context with id `id`.
///
/// # Safety
///
/// The [`Registration`] of `id` must stay alive (not be dropped) for all of `'a`.
#[inline]
pub(crate) unsafe fn get<'a>(id: u8) -> &'a Context {
    // SAFETY: the caller keeps the registration of `id` alive for `'a` (this function's contract).
    unsafe { GLOBAL.get(id) }
}

impl<const N: usize> Registry<N> {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Registry {
            slots: [const { AtomicPtr::new(core::ptr::null_mut()) }; N],
            lock: Mutex::new(()),
        }
    }

    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Registry {
            slots: core::array::from_fn(|_| AtomicPtr::new(core::ptr::null_mut())),
            lock: Mutex::new(()),
        }
    }

    /// Stores `ctx` in a free slot; `None` when all `N` (at most 256) are taken.
    pub(crate) fn register(&self, ctx: Context) -> Option<u8> {
        let _g = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The lock orders this with every release, so a slot seen null here stays null until the store.
        let (i, slot) = self
            .slots
            .iter()
            .enumerate()
            .take(256)
            .find(|(_, s)| s.load(Ordering::Relaxed).is_null())?;
        // Release: pairs with the acquire load in `get`, so a reader that sees the pointer sees the context.
        slot.store(Box::into_raw(Box::new(ctx)), Ordering::Release);
        u8::try_from(i).ok()
    }

    /// Frees the context of `id` (nothing when the slot is empty).
    pub(crate) fn release(&self, id: u8) {
        let Some(slot) = self.slots.get(usize::from(id)) else {
            return;
        };
        let _g = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let raw = slot.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if !raw.is_null() {
            // SAFETY: non-null slot pointers come from `Box::into_raw` in `register`, and the swap above took
            // this one out of the slot, so it is freed once. Callers release an id only when its
            // `Registration` drops, and `get`'s contract forbids any reference from outliving that.
            drop(unsafe { Box::from_raw(raw) });
        }
    }

    /// The context in slot `id`; panics when the slot is empty (a flow whose table was dropped: a bug).
    ///
    /// # Safety
    ///
    /// The slot must not be released during `'a`.
    #[inline]
    pub(crate) unsafe fn get<'a>(&self, id: u8) -> &'a Context {
        let raw = self.slots[usize::from(id)].load(Ordering::Acquire);
        assert!(!raw.is_null(), "flow of a dropped conntrack table");
        // SAFETY: non-null slot pointers come from `Box::into_raw` in `register` (so they are aligned and point
        // at an initialized `Context`, made visible by the release store / acquire load pair); the box is
        // freed only by `release`, which the caller rules out for `'a`; nothing mutates a registered context.
        unsafe { &*raw }
    }
}

impl<const N: usize> Drop for Registry<N> {
    fn drop(&mut self) {
        for slot in &mut self.slots {
            let raw = slot.swap(core::ptr::null_mut(), Ordering::AcqRel);
            if !raw.is_null() {
                // SAFETY: as in `release`; `&mut self` means no reference from `get` is alive.
                drop(unsafe { Box::from_raw(raw) });
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn ctx(trans: u64) -> Context {
        Context {
            quota: std::sync::Arc::new(super::super::quota::Quota::new(
                2,
                super::super::key::HashKey::new(0),
                1,
            )),
            pool_ips: Box::new(["192.0.2.1".parse().expect("ip")]),
            udp_ms: 1,
            tcp_est_ms: 2,
            tcp_trans_ms: trans,
            icmp_ms: 4,
        }
    }

    #[test]
    fn register_get_release() {
        let r = register(ctx(3));
        // SAFETY: `r` is alive until the end of the test.
        assert_eq!(unsafe { get(r.id()) }.tcp_trans_ms, 3);
        let id = r.id();
        drop(r);
        assert!(GLOBAL.slots[usize::from(id)]
            .load(Ordering::Relaxed)
            .is_null());
    }

    #[test]
    fn a_full_registry_refuses_and_ids_are_reused() {
        let reg = Registry::<3>::new();
        let ids: Vec<u8> = (0..3)
            .map(|i| reg.register(ctx(i)).expect("room"))
            .collect();
        assert_eq!(ids, [0, 1, 2]);
        assert!(reg.register(ctx(9)).is_none());
        reg.release(1);
        reg.release(1); // a second release of an empty slot changes nothing
        assert_eq!(reg.register(ctx(7)), Some(1));
        // SAFETY: `reg` releases nothing more before it drops.
        assert_eq!(unsafe { reg.get(1) }.tcp_trans_ms, 7);
        // SAFETY: as above.
        assert_eq!(unsafe { reg.get(2) }.tcp_trans_ms, 2);
        // Dropping `reg` frees the three live contexts (Miri reports a leak otherwise).
    }
}

#[cfg(all(test, loom))]
mod tests {
    use super::*;
    use loom::sync::Arc;

    fn ctx(trans: u64) -> Context {
        Context {
            quota: std::sync::Arc::new(super::super::quota::Quota::new(
                2,
                super::super::key::HashKey::new(0),
                1,
            )),
            pool_ips: Box::new([]),
            udp_ms: 1,
            tcp_est_ms: 2,
            tcp_trans_ms: trans,
            icmp_ms: 4,
        }
    }

    /// Two tables registering at once get different ids, each reads its own context (its fields are visible:
    /// the release store / acquire load pair) and a release by one never frees the other's.
    #[test]
    fn loom_register_get_release() {
        loom::model(|| {
            let reg = Arc::new(Registry::<2>::new());
            let threads: Vec<_> = (0..2u64)
                .map(|t| {
                    let reg = Arc::clone(&reg);
                    loom::thread::spawn(move || {
                        let id = reg.register(ctx(t)).expect("two slots for two tables");
                        // SAFETY: only this thread releases `id`, after the read.
                        assert_eq!(unsafe { reg.get(id) }.tcp_trans_ms, t);
                        reg.release(id);
                        id
                    })
                })
                .collect();
            let ids: Vec<u8> = threads
                .into_iter()
                .map(|h| h.join().expect("join"))
                .collect();
            assert!(ids.iter().all(|&i| i < 2));
        });
    }

    /// A reader on another thread that got the id through a synchronizing handoff (as flows reach workers
    /// through the table's `Arc`) sees the context while the registration lives; the release waits for it.
    #[test]
    fn loom_get_from_another_thread() {
        loom::model(|| {
            let reg = Arc::new(Registry::<1>::new());
            let id = reg.register(ctx(5)).expect("room");
            let r2 = Arc::clone(&reg);
            let h = loom::thread::spawn(move || {
                // SAFETY: the main thread releases `id` only after joining this thread.
                unsafe { r2.get(id) }.tcp_trans_ms
            });
            assert_eq!(h.join().expect("join"), 5);
            reg.release(id);
            assert_eq!(reg.register(ctx(6)), Some(0));
        });
    }
}
