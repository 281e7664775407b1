//! Per-table context that every flow slot reaches through an 8-bit id instead of a pointer.
//!
//! A flow needs its table's timeouts (for [`Flow::is_expired`](super::Flow::is_expired)) and its egress IP
//! (for [`Flow::egress_ip`](super::Flow::egress_ip)); storing an 8-byte table pointer plus a 16-byte egress
//! address in each of millions of slots would break the 128-byte-per-flow budget. Instead each live
//! [`Table`](super::Table) registers a small immutable [`Context`] in a process-wide array of [`MAX_TABLES`]
//! entries and its slots keep the one-byte index (the top byte of the control word). Registration and
//! release take a mutex (table creation and drop only); reads are one atomic load.
//!
//! Lifetime: a context is registered by `Table::new` and released by `Table::drop`. Every `&Flow` borrows its
//! `Table`, so while a flow is reachable its table is alive and so is its context.

use core::net::IpAddr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;

/// Most tables alive at once in one process.
pub(crate) const MAX_TABLES: usize = 256;

/// What flows need to know about their table.
#[derive(Debug)]
pub(crate) struct Context {
    /// Egress IP of each pool, by pool id.
    pub(crate) pool_ips: Box<[IpAddr]>,
    /// Idle timeouts in milliseconds: UDP, TCP established, TCP transitory, ICMP.
    pub(crate) udp_ms: u64,
    pub(crate) tcp_est_ms: u64,
    pub(crate) tcp_trans_ms: u64,
    pub(crate) icmp_ms: u64,
}

static SLOTS: [AtomicPtr<Context>; MAX_TABLES] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_TABLES];
static REGISTER: Mutex<()> = Mutex::new(());

/// Registers `ctx`; panics when [`MAX_TABLES`] tables are alive (a configuration this gateway never has).
pub(crate) fn register(ctx: Context) -> u8 {
    let raw = Box::into_raw(Box::new(ctx));
    let _g = REGISTER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (i, slot) in SLOTS.iter().enumerate() {
        if slot.load(Ordering::Relaxed).is_null() {
            slot.store(raw, Ordering::Release);
            #[allow(clippy::cast_possible_truncation)] // i < MAX_TABLES
            return i as u8;
        }
    }
    // SAFETY: `raw` came from `Box::into_raw` just above and was never shared.
    drop(unsafe { Box::from_raw(raw) });
    panic!("more than {MAX_TABLES} conntrack tables alive at once");
}

/// Releases the context of a table being dropped.
pub(crate) fn release(id: u8) {
    let _g = REGISTER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let raw = SLOTS[usize::from(id)].swap(core::ptr::null_mut(), Ordering::AcqRel);
    if !raw.is_null() {
        // SAFETY: `raw` was created by `register` with `Box::into_raw`; the table owning it is being dropped,
        // so no `&Flow` (each borrows the table) and no `&Context` handed out by `get` can still be in use.
        drop(unsafe { Box::from_raw(raw) });
    }
}

/// The context with id `id`; valid while the table that registered it is alive.
#[inline]
pub(crate) fn get(id: u8) -> &'static Context {
    let raw = SLOTS[usize::from(id)].load(Ordering::Acquire);
    assert!(!raw.is_null(), "flow of a dropped conntrack table");
    // SAFETY: non-null pointers in SLOTS come from `Box::into_raw` in `register` and are freed only by
    // `release` when their table drops. Callers reach this through a `&Flow`, which borrows the table, so
    // the box outlives every use of the returned reference (the `'static` is never observable past the
    // borrow: callers copy values out of it before returning).
    unsafe { &*raw }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_get_release() {
        let id = register(Context {
            pool_ips: Box::new(["192.0.2.1".parse().expect("ip")]),
            udp_ms: 1,
            tcp_est_ms: 2,
            tcp_trans_ms: 3,
            icmp_ms: 4,
        });
        assert_eq!(get(id).tcp_trans_ms, 3);
        release(id);
        assert!(SLOTS[usize::from(id)].load(Ordering::Relaxed).is_null());
    }
}
