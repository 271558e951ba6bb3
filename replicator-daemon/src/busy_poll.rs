//! Polling for events for a short while before the runtime thread sleeps.
//!
//! On a virtual machine a sleeping CPU is halted, and waking it (the peer's
//! ack arrived, a disk write completed) takes tens of microseconds: on the
//! 2-CPU test VM a pipe round trip between two processes costs 79 µs across
//! CPUs and 2.8 µs on one (`perf bench sched pipe`). A replicated write
//! crosses such a wake-up four or five times. So, like QEMU's adaptive
//! polling of its event loops and the kernel's haltpoll, the thread first
//! polls for readiness for up to a budget, which adapts to how long the
//! thread has actually been waiting: it grows (from [`GROW_START_NS`],
//! doubling, up to `busy_poll_us`) while events come sooner than that, and
//! halves when the thread sleeps longer, so an idle daemon stops polling.
//!
//! Readiness is read from the runtime's own epoll instance(s), found once
//! in `/proc/self/fd` after the runtime is built: a level `poll()` of an
//! epoll descriptor says whether it has events without consuming them, so
//! the runtime's next `epoll_wait` still gets every one. io_uring
//! completions are covered too: the ring's descriptor is registered there,
//! and each `poll()` call lets the kernel run the completion work it queued
//! for this thread.
//!
//! Polling only pays when the work is latency-bound, with CPUs otherwise
//! idle: with many operations outstanding the CPUs are busy and polling
//! takes time from the threads doing the work (replicated 4 KiB writes at
//! depth 32 on tmpfs fell from ~50k to ~30k IOPS when both nodes polled). So
//! the node reports how many operations it has outstanding
//! ([`BusyPoll::set_outstanding`]), and while that was above
//! [`MAX_OUTSTANDING_TO_POLL`] within the last [`OUTSTANDING_WINDOW`], the
//! thread sleeps at once.
//!
//! This module holds one of the crate's three pieces of `unsafe` (the
//! others are `disk::uring` and `disk::huge`): the `poll()` call, with its
//! SAFETY comment.
#![allow(unsafe_code)]

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Default `busy_poll_us`: the most the thread polls before sleeping.
pub const DEFAULT_BUSY_POLL_US: u64 = 200;
/// Accepted `busy_poll_us` (0 turns polling off).
pub const BUSY_POLL_US_RANGE: std::ops::RangeInclusive<u64> = 0..=1_000;
/// First budget once waits turn out short.
pub const GROW_START_NS: u64 = 25_000;
/// With more operations than this outstanding, the thread does not poll.
pub const MAX_OUTSTANDING_TO_POLL: usize = 4;

/// The process's busy-poll state (one runtime thread polls).
#[derive(Debug, Default)]
pub struct BusyPoll {
    /// `busy_poll_us` in nanoseconds; 0: off.
    max_ns: AtomicU64,
    /// The current budget.
    budget_ns: AtomicU64,
    /// The descriptors whose readiness ends a poll.
    fds: OnceLock<Vec<RawFd>>,
    /// When the thread last went to park, and whether polling found work.
    park: Mutex<Option<(Instant, bool)>>,
    /// The most operations the node had outstanding (client requests, disk
    /// I/O) within the last [`OUTSTANDING_WINDOW`], and since when.
    outstanding: Mutex<(usize, Option<Instant>)>,
}

/// How long a count of outstanding operations keeps the thread from polling:
/// a secondary's disk writes on a fast disk finish between two batches of
/// frames, so the count at the moment of sleeping says little.
pub const OUTSTANDING_WINDOW: Duration = Duration::from_millis(1);

impl BusyPoll {
    /// The process-wide instance the runtime hooks use.
    pub fn global() -> &'static BusyPoll {
        static G: OnceLock<BusyPoll> = OnceLock::new();
        G.get_or_init(BusyPoll::default)
    }

    /// Finds the epoll instances the runtime created; call once after it is
    /// built. Without any, polling stays off.
    pub fn attach_to_runtime(&self) {
        self.fds.get_or_init(epoll_fds);
    }

    /// Sets `busy_poll_us` (0 turns polling off).
    pub fn set_max(&self, max: Duration) {
        let ns = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        self.max_ns.store(ns, Ordering::Relaxed);
        let budget = self.budget_ns.load(Ordering::Relaxed).min(ns);
        self.budget_ns.store(budget, Ordering::Relaxed);
    }

    /// How many operations the node has outstanding; above
    /// [`MAX_OUTSTANDING_TO_POLL`] the thread does not poll.
    pub fn set_outstanding(&self, n: usize) {
        let now = Instant::now();
        let mut o = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        let expired =
            o.1.is_none_or(|at| now.duration_since(at) > OUTSTANDING_WINDOW);
        if n >= o.0 || expired {
            *o = (n, Some(now));
        }
    }

    /// Whether the recent peak of outstanding operations rules polling out.
    pub(crate) fn throughput_bound(&self) -> bool {
        let o = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        o.0 > MAX_OUTSTANDING_TO_POLL && o.1.is_some_and(|at| at.elapsed() <= OUTSTANDING_WINDOW)
    }

    /// The current budget (for tests and logs).
    pub fn budget(&self) -> Duration {
        Duration::from_nanos(self.budget_ns.load(Ordering::Relaxed))
    }

    /// Runtime hook, before the thread sleeps: polls for up to the budget.
    pub fn before_park(&self) {
        if self.throughput_bound() {
            // Throughput-bound: leave the CPU to the others, keep the budget.
            *self.park.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return;
        }
        let start = Instant::now();
        let budget = Duration::from_nanos(self.budget_ns.load(Ordering::Relaxed));
        let found = match self.fds.get() {
            Some(fds) if !fds.is_empty() && !budget.is_zero() => {
                poll_until_ready(fds, start, budget)
            }
            _ => false,
        };
        *self.park.lock().unwrap_or_else(|p| p.into_inner()) = Some((start, found));
    }

    /// Runtime hook, after the thread woke: adapts the budget to the wait.
    pub fn after_unpark(&self) {
        let Some((start, found)) = self.park.lock().unwrap_or_else(|p| p.into_inner()).take()
        else {
            return;
        };
        if found {
            return;
        }
        let waited_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let max = self.max_ns.load(Ordering::Relaxed);
        let budget = self.budget_ns.load(Ordering::Relaxed);
        self.budget_ns
            .store(adapt(budget, waited_ns, max), Ordering::Relaxed);
    }
}

/// The next budget after a wait of `waited_ns` that polling did not cover:
/// grow when polling a little longer would have covered it, else halve.
pub fn adapt(budget_ns: u64, waited_ns: u64, max_ns: u64) -> u64 {
    let next = if waited_ns <= max_ns {
        budget_ns.saturating_mul(2).max(GROW_START_NS)
    } else {
        budget_ns / 2
    };
    next.min(max_ns)
}

/// Polls `fds` until one is readable or `budget` has passed since `start`.
fn poll_until_ready(fds: &[RawFd], start: Instant, budget: Duration) -> bool {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pfds` is a valid, exclusively borrowed array of
        // `pfds.len()` pollfd structs for the duration of the call; poll
        // with a zero timeout only writes their `revents`. A descriptor
        // that was closed is reported as POLLNVAL, never dereferenced.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 0) };
        if n > 0 && pfds.iter().any(|p| p.revents & libc::POLLIN != 0) {
            return true;
        }
        if start.elapsed() >= budget {
            return false;
        }
        // Give the CPU to any other runnable thread (the peer daemon, the
        // client): polling must only use time nobody else wants.
        std::thread::yield_now();
    }
}

/// The epoll instances of this process (descriptors whose link reads
/// `anon_inode:[eventpoll]`).
fn epoll_fds() -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:[eventpoll]")
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_grows_while_waits_are_short_and_halves_when_long() {
        // Proves the adaptation: short waits grow the budget from the start
        // value by doubling up to the maximum; long waits halve it to zero.
        let max = 200_000;
        let mut b = 0;
        let mut seen = Vec::new();
        for _ in 0..5 {
            b = adapt(b, 150_000, max);
            seen.push(b);
        }
        assert_eq!(seen, [25_000, 50_000, 100_000, 200_000, 200_000]);
        for _ in 0..20 {
            b = adapt(b, 10_000_000, max);
        }
        assert_eq!(b, 0);
        assert_eq!(adapt(100_000, 150_000, 0), 0, "max 0 turns polling off");
    }

    #[test]
    fn many_recent_outstanding_operations_rule_polling_out() {
        // Proves the gate: a peak above the limit stops polling for the
        // window even if the count dropped since, and a low count after the
        // window lets polling resume.
        let b = BusyPoll::default();
        assert!(!b.throughput_bound());
        b.set_outstanding(MAX_OUTSTANDING_TO_POLL);
        assert!(!b.throughput_bound());
        b.set_outstanding(32);
        b.set_outstanding(0);
        assert!(b.throughput_bound(), "the recent peak counts");
        std::thread::sleep(OUTSTANDING_WINDOW * 2);
        assert!(!b.throughput_bound(), "an old peak does not");
        b.set_outstanding(1);
        assert!(!b.throughput_bound());
    }

    #[test]
    fn polling_ends_as_soon_as_an_epoll_instance_has_an_event() {
        // Proves readiness is seen through an epoll descriptor without
        // consuming it, and that polling stops at the budget otherwise.
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY (test): plain epoll syscalls on descriptors owned here.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0);
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 1,
        };
        assert_eq!(
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, rx.as_raw_fd(), &mut ev) },
            0
        );
        let t = Instant::now();
        assert!(!poll_until_ready(&[ep], t, Duration::from_millis(5)));
        assert!(t.elapsed() >= Duration::from_millis(5));
        tx.write_all(b"x").unwrap();
        assert!(poll_until_ready(
            &[ep],
            Instant::now(),
            Duration::from_secs(5)
        ));
        // Not consumed: the epoll instance still reports the event.
        let mut out = [libc::epoll_event { events: 0, u64: 0 }; 1];
        assert_eq!(unsafe { libc::epoll_wait(ep, out.as_mut_ptr(), 1, 0) }, 1);
        unsafe { libc::close(ep) };
    }
}
