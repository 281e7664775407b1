//! Keeps a worker thread serving when its code panics: the panic is caught, counted and logged, and the
//! worker is opened again with fresh buffers and sending sockets. Its receive sockets are kept (their places
//! in the kernel's groups are what steers packets to it, `io::steer`; what is queued in them is not lost),
//! and the flow table, the port pools and the neighbour cache live in the shared gateway and survive, so
//! established flows keep going through the new worker.
//!
//! This is the second line of defence. The first is that no input can make the per-packet code panic (the
//! parsers check lengths first, and the fuzz targets in `forwarder-core/fuzz/` drive the worker's whole
//! path); a panic caught here is a bug to report, which is why each one is logged with its message.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Longest pause between restarts of a worker that keeps panicking.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Runs `open` then `run` until `run` returns or `stop` is set; a panic in either is caught, counted in
/// `panics`, logged, and the worker opened again after a pause that grows with consecutive panics (10 ms,
/// doubling, at most [`MAX_BACKOFF`]). `started` is called once, with the result of the first `open`; an
/// error there ends the supervision (a worker that cannot open its sockets at start-up stops the start).
pub(crate) fn supervise<W>(
    id: usize,
    stop: &AtomicBool,
    panics: &AtomicU64,
    mut open: impl FnMut() -> std::io::Result<W>,
    mut run: impl FnMut(W) -> std::io::Result<()>,
    started: impl FnOnce(Result<(), String>),
) -> std::io::Result<()> {
    let mut started = Some(started);
    let mut consecutive = 0u32;
    loop {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let w = match open() {
                Ok(w) => w,
                Err(e) => {
                    if let Some(s) = started.take() {
                        s(Err(format!("worker {id}: {e}")));
                    }
                    return Err(e);
                }
            };
            if let Some(s) = started.take() {
                s(Ok(()));
            }
            run(w)
        }));
        match outcome {
            Ok(r) => return r,
            Err(payload) => {
                panics.fetch_add(1, Ordering::Relaxed);
                consecutive = consecutive.saturating_add(1);
                let backoff = Duration::from_millis(10)
                    .saturating_mul(1 << consecutive.min(7))
                    .min(MAX_BACKOFF);
                tracing::error!(
                    worker = id,
                    panic = %panic_message(payload.as_ref()),
                    restart_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                    "worker panicked: restarting it with new buffers (flows and receive sockets are kept); \
                     this is a bug, please report it with this message"
                );
                if let Some(s) = started.take() {
                    s(Err(format!("worker {id} panicked while starting")));
                    return Err(std::io::Error::other("worker panicked while starting"));
                }
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                std::thread::sleep(backoff);
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
            }
        }
    }
}

/// The text of a panic payload (`&str` or `String`, as `panic!` makes them).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_panicking_worker_is_restarted_and_counted() {
        let stop = AtomicBool::new(false);
        let panics = AtomicU64::new(0);
        let opened = Cell::new(0);
        let started = Cell::new(None);
        let r = supervise(
            3,
            &stop,
            &panics,
            || {
                opened.set(opened.get() + 1);
                Ok(opened.get())
            },
            |n| {
                if n < 3 {
                    panic!("bad packet {n}");
                }
                Ok(())
            },
            |s| started.set(Some(s.is_ok())),
        );
        assert!(r.is_ok());
        assert_eq!(opened.get(), 3, "opened again after each panic");
        assert_eq!(panics.load(Ordering::Relaxed), 2);
        assert_eq!(started.get(), Some(true), "start-up reported once");
    }

    #[test]
    fn a_failed_start_is_reported_and_ends_it() {
        let stop = AtomicBool::new(false);
        let panics = AtomicU64::new(0);
        let mut started = None;
        let r = supervise::<()>(
            0,
            &stop,
            &panics,
            || Err(std::io::Error::other("no such interface")),
            |()| Ok(()),
            |s| started = Some(s),
        );
        assert!(r.is_err());
        let msg = started.expect("reported").expect_err("an error");
        assert!(msg.contains("no such interface"), "{msg}");
    }

    #[test]
    fn stop_ends_the_restarts() {
        let stop = AtomicBool::new(false);
        let panics = AtomicU64::new(0);
        let r = supervise(
            1,
            &stop,
            &panics,
            || Ok(()),
            |()| {
                stop.store(true, Ordering::Relaxed);
                panic!("while stopping")
            },
            |_| {},
        );
        assert!(r.is_ok());
        assert_eq!(panics.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn panic_messages_are_read() {
        assert_eq!(panic_message(&"x"), "x");
        assert_eq!(panic_message(&String::from("y")), "y");
        assert_eq!(panic_message(&1u8), "(no message)");
    }
}
