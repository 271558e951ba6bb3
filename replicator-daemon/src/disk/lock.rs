//! Exclusive locks on byte ranges, so that read-modify-write of a partial
//! O_DIRECT block never races another change to the same block.
//!
//! Owns the table of locked ranges. One entry exists per mutating request in
//! flight, so the table is bounded by the callers' own in-flight limits (the
//! NBD server's per-connection window); waiters are woken on every release
//! and re-check. It does no I/O.
#![forbid(unsafe_code)]

use std::sync::Mutex;

use tokio::sync::Notify;

/// A table of locked `[start, end)` ranges.
#[derive(Debug, Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
}

/// Holds `[start, end)` until dropped.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register interest before checking, so a release between the
            // check and the await is not missed.
            notified.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                if !held.iter().any(|&(s, e)| s < end && start < e) {
                    held.push((start, end));
                    return RangeGuard {
                        locks: self,
                        range: (start, end),
                    };
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_lock_waits_until_release_and_disjoint_does_not() {
        // Proves an overlapping range blocks until the holder drops, while a
        // disjoint range is granted at once.
        let locks = RangeLocks::default();
        let g = locks.lock(0, 4096).await;
        let disjoint = tokio::time::timeout(Duration::from_secs(5), locks.lock(4096, 8192)).await;
        assert!(disjoint.is_ok(), "disjoint range must not wait");
        drop(disjoint);
        let mut waiter = Box::pin(locks.lock(100, 200));
        assert!(
            futures_poll_once(waiter.as_mut()).is_none(),
            "overlapping range must wait"
        );
        drop(g);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter must be granted after release");
    }

    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match f.poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
