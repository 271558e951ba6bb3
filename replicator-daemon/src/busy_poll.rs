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
//! Polling must only use CPU time nobody else wants, and yielding while
//! polling does not guarantee that: the scheduler may hand the CPU straight
//! back to the poller while the very thread it waits for (the client on the
//! same CPU, an io_uring worker doing a buffered read) stays queued. Then
//! every wait ends only after the budget, just after the thread sleeps:
//! with fio and a one-node export on tmpfs sharing one CPU, 4 KiB random
//! reads at depth 32 fell to 5.7k IOPS (43k without polling). So a poll
//! that found nothing and was followed by a wake-up within
//! [`STARVED_WAKE`] counts as a sign that polling held up the event; after
//! [`STARVED_STREAK`] such signs within [`STARVED_WINDOW`] the thread stops
//! polling for [`STARVED_BACKOFF`], then tries again.
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

/// A wake-up this soon after a poll that found nothing suggests the poll
/// kept the awaited thread off the CPU (a wake-up from a halted CPU takes
/// tens of microseconds on a VM; a task waiting behind the poller runs at
/// once).
pub const STARVED_WAKE: Duration = Duration::from_micros(20);
/// Signs within [`STARVED_WINDOW`] that make the thread stop polling.
pub const STARVED_STREAK: u32 = 3;
/// How recent the signs must be (a poll that found its event neither
/// counts nor clears them: most do so at once, the event already there).
pub const STARVED_WINDOW: Duration = Duration::from_millis(10);
/// How long the thread then sleeps at once before polling again.
pub const STARVED_BACKOFF: Duration = Duration::from_millis(100);

/// One trip to sleep: when it began, whether and until when the thread
/// polled, and whether polling found work.
#[derive(Debug, Clone, Copy)]
pub struct Park {
    /// When the thread went to park.
    pub start: Instant,
    /// When polling ended (`None`: the thread did not poll).
    pub polled_until: Option<Instant>,
    /// Polling found an event.
    pub found: bool,
}

/// Starvation bookkeeping: recent signs, and the end of a backoff.
#[derive(Debug, Default)]
struct Starved {
    /// Signs since `since`, with no poll in between that ended in vain
    /// before a later wake-up.
    signs: u32,
    since: Option<Instant>,
    until: Option<Instant>,
}

/// The process's busy-poll state (one runtime thread polls).
#[derive(Debug, Default)]
pub struct BusyPoll {
    /// `busy_poll_us` in nanoseconds; 0: off.
    max_ns: AtomicU64,
    /// The current budget.
    budget_ns: AtomicU64,
    /// The descriptors whose readiness ends a poll.
    fds: OnceLock<Vec<RawFd>>,
    /// The thread's current trip to sleep.
    park: Mutex<Option<Park>>,
    /// Signs that polling held the awaited thread up.
    starved: Mutex<Starved>,
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

    /// Whether polling is off for a while because it held work up.
    pub fn backing_off(&self, now: Instant) -> bool {
        let s = self.starved.lock().unwrap_or_else(|p| p.into_inner());
        s.until.is_some_and(|until| now < until)
    }

    /// Runtime hook, before the thread sleeps: polls for up to the budget.
    pub fn before_park(&self) {
        let start = Instant::now();
        if self.throughput_bound() || self.backing_off(start) {
            // Leave the CPU to the others, keep the budget.
            *self.park.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return;
        }
        let budget = Duration::from_nanos(self.budget_ns.load(Ordering::Relaxed));
        let park = match self.fds.get() {
            Some(fds) if !fds.is_empty() && !budget.is_zero() => {
                let found = poll_until_ready(fds, start, budget);
                Park {
                    start,
                    polled_until: Some(Instant::now()),
                    found,
                }
            }
            _ => Park {
                start,
                polled_until: None,
                found: false,
            },
        };
        *self.park.lock().unwrap_or_else(|p| p.into_inner()) = Some(park);
    }

    /// Runtime hook, after the thread woke: adapts the budget to the wait.
    pub fn after_unpark(&self) {
        let park = self.park.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(park) = park {
            self.woke(park, Instant::now());
        }
    }

    /// The thread woke at `now` from `park`: watches for polling that held
    /// work up, else adapts the budget to the wait.
    pub fn woke(&self, park: Park, now: Instant) {
        if let Some(end) = park.polled_until.filter(|_| !park.found) {
            let mut s = self.starved.lock().unwrap_or_else(|p| p.into_inner());
            if now.duration_since(end) < STARVED_WAKE {
                // A sign. Signs older than the window are forgotten.
                match s.since {
                    Some(since) if now.duration_since(since) <= STARVED_WINDOW => s.signs += 1,
                    _ => (s.signs, s.since) = (1, Some(now)),
                }
                if s.signs >= STARVED_STREAK {
                    (s.signs, s.since) = (0, None);
                    s.until = Some(now + STARVED_BACKOFF);
                }
                return;
            }
            // Polling ended in vain and the event came later on its own: the
            // usual case, and no sign.
            (s.signs, s.since) = (0, None);
        }
        if park.found {
            return;
        }
        let waited_ns =
            u64::try_from(now.duration_since(park.start).as_nanos()).unwrap_or(u64::MAX);
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

    fn vain_poll(at: Instant) -> Park {
        Park {
            start: at - Duration::from_micros(200),
            polled_until: Some(at),
            found: false,
        }
    }

    #[test]
    fn wake_ups_right_after_vain_polls_stop_polling_for_a_while() {
        // Proves the starvation guard: three vain polls each followed by a
        // wake-up within STARVED_WAKE (the awaited thread ran only once the
        // poller slept) start a backoff of STARVED_BACKOFF, and such signs
        // leave the budget alone.
        let b = BusyPoll::default();
        b.set_max(Duration::from_micros(200));
        b.budget_ns.store(200_000, Ordering::Relaxed);
        let t = Instant::now();
        let soon = Duration::from_micros(5);
        for i in 0..STARVED_STREAK {
            assert!(!b.backing_off(t), "not yet after {i} signs");
            let at = t + Duration::from_micros(300 * u64::from(i));
            b.woke(vain_poll(at), at + soon);
        }
        let last = t + Duration::from_micros(300 * u64::from(STARVED_STREAK - 1)) + soon;
        assert!(b.backing_off(last));
        assert!(b.backing_off(last + STARVED_BACKOFF - Duration::from_micros(1)));
        assert!(
            !b.backing_off(last + STARVED_BACKOFF),
            "polling resumes after the backoff"
        );
        assert_eq!(
            b.budget(),
            Duration::from_micros(200),
            "signs do not adapt the budget"
        );
    }

    #[test]
    fn scattered_signs_and_ordinary_waits_do_not_stop_polling() {
        // Proves the guard's limits: signs further apart than the window are
        // forgotten, a vain poll whose event came later on its own clears
        // them, and polls that found their event neither count nor clear.
        let b = BusyPoll::default();
        b.set_max(Duration::from_micros(200));
        let t = Instant::now();
        let soon = Duration::from_micros(5);
        let found = |at: Instant| Park {
            start: at,
            polled_until: Some(at),
            found: true,
        };
        // Spread out: each sign starts a new window.
        for i in 0..10u32 {
            let at = t + (STARVED_WINDOW + Duration::from_millis(1)) * i;
            b.woke(vain_poll(at), at + soon);
        }
        assert!(!b.backing_off(t + STARVED_WINDOW * 11));
        // Close together, but cleared by an ordinary wait in between.
        let u = t + Duration::from_secs(1);
        b.woke(vain_poll(u), u + soon);
        b.woke(vain_poll(u + soon * 10), u + soon * 11);
        b.woke(vain_poll(u + soon * 20), u + soon * 20 + STARVED_WAKE * 3);
        b.woke(vain_poll(u + soon * 40), u + soon * 41);
        assert!(!b.backing_off(u + soon * 41));
        // Found polls in between change nothing: two more signs make three.
        b.woke(found(u + soon * 50), u + soon * 50);
        b.woke(vain_poll(u + soon * 60), u + soon * 61);
        assert!(!b.backing_off(u + soon * 61));
        b.woke(found(u + soon * 70), u + soon * 70);
        b.woke(vain_poll(u + soon * 80), u + soon * 81);
        assert!(b.backing_off(u + soon * 81));
    }

    #[test]
    fn a_backing_off_thread_sleeps_at_once() {
        // Proves before_park honours the backoff: with an epoll instance that
        // never becomes ready, the thread polls for its whole budget, and not
        // at all while backing off.
        // SAFETY (test): plain epoll syscalls on descriptors owned here.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0);
        let b = BusyPoll::default();
        b.fds.set(vec![ep]).unwrap();
        let budget = Duration::from_millis(300);
        b.set_max(budget);
        b.budget_ns.store(300_000_000, Ordering::Relaxed);
        let t = Instant::now();
        b.before_park();
        assert!(t.elapsed() >= budget, "polls for the budget");
        b.after_unpark();
        let now = Instant::now();
        for _ in 0..STARVED_STREAK {
            b.woke(vain_poll(now), now);
        }
        let t = Instant::now();
        b.before_park();
        assert!(t.elapsed() < budget, "backing off: no poll");
        assert!(b.park.lock().unwrap().is_none());
        unsafe { libc::close(ep) };
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
