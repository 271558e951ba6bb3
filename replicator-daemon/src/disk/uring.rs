//! The io_uring I/O layer: one ring per disk, driven from tokio's own thread.
//!
//! Owns the ring and every buffer while the kernel may touch it. A caller
//! takes one of [`MAX_IN_FLIGHT_REQUESTS`] permits (waiting while all are
//! taken) and puts its operation in a free slot; a submitter task, run after
//! the tasks ready at that moment, hands everything queued to the kernel in
//! one `io_uring_enter` on the same thread: no hand-off to another thread, so
//! an O_DIRECT write costs one wake-up (its completion) instead of three.
//! The ring's descriptor is registered with tokio's reactor ([`AsyncFd`]);
//! the kernel makes it readable when completions are waiting, and a reaper
//! task takes them off the queue, resubmits short reads and writes for the
//! remainder, and answers each caller over a oneshot channel. Each in-flight
//! operation owns its buffer in its slot until its completion has been
//! reaped; dropping the [`UringIo`] waits for every operation still in the
//! kernel (those of cancelled callers), so the disk can be closed after it.
//!
//! This module holds one of the crate's three pieces of `unsafe` (the
//! others are `busy_poll` and `disk::huge`): pushing entries that point at
//! buffers, and registering the ring's descriptor; each block says why it
//! is sound. It must not check ranges or alignment (the engine does).
#![allow(unsafe_code)]

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, Notify, Semaphore};

use super::file::BackingFile;
use super::io::BlockIo;

/// Operations in the kernel at once (slots); also sizes the ring.
pub const MAX_IN_FLIGHT_REQUESTS: usize = 128;

/// Submission ring entries: one per slot (a power of two). Every pushed
/// entry is submitted before the lock is let go, so the queue never holds
/// more than one slot's worth.
const RING_ENTRIES: u32 = (MAX_IN_FLIGHT_REQUESTS as u32).next_power_of_two();

enum Request {
    Read {
        offset: u64,
        buf: BytesMut,
        reply: oneshot::Sender<io::Result<(BytesMut, usize)>>,
    },
    Write {
        offset: u64,
        data: Bytes,
        reply: oneshot::Sender<io::Result<()>>,
    },
    Sync {
        reply: oneshot::Sender<io::Result<()>>,
    },
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Read { offset, buf, .. } => write!(f, "Read({offset}, {})", buf.len()),
            Request::Write { offset, data, .. } => write!(f, "Write({offset}, {})", data.len()),
            Request::Sync { .. } => write!(f, "Sync"),
        }
    }
}

/// One operation's length: larger buffers go in several operations (the
/// rest is resubmitted like a short transfer).
fn op_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// An operation the kernel may be working on, with its buffer and progress.
struct Slot {
    req: Request,
    done_bytes: usize,
}

impl Slot {
    fn entry(&mut self, fd: types::Fd, index: usize) -> squeue::Entry {
        let e = match &mut self.req {
            Request::Read { offset, buf, .. } => {
                let rest = &mut buf[self.done_bytes..];
                opcode::Read::new(fd, rest.as_mut_ptr(), op_len(rest.len()))
                    .offset(*offset + self.done_bytes as u64)
                    .build()
            }
            Request::Write { offset, data, .. } => {
                let rest = &data[self.done_bytes..];
                opcode::Write::new(fd, rest.as_ptr(), op_len(rest.len()))
                    .offset(*offset + self.done_bytes as u64)
                    .build()
            }
            Request::Sync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        e.user_data(index as u64)
    }

    fn fail(self, e: io::Error) {
        match self.req {
            Request::Read { reply, .. } => drop(reply.send(Err(e))),
            Request::Write { reply, .. } => drop(reply.send(Err(e))),
            Request::Sync { reply } => drop(reply.send(Err(e))),
        }
    }

    /// Applies a completion; returns the slot back if it must be resubmitted.
    fn complete(mut self, result: i32) -> Option<Slot> {
        if result == -libc::EINTR || result == -libc::EAGAIN {
            return Some(self);
        }
        if result < 0 {
            self.fail(io::Error::from_raw_os_error(-result));
            return None;
        }
        let n = result as usize;
        self.done_bytes += n;
        let total_bytes = match &self.req {
            Request::Read { buf, .. } => buf.len(),
            Request::Write { data, .. } => data.len(),
            Request::Sync { .. } => 0,
        };
        if n > 0 && self.done_bytes < total_bytes {
            // Short transfer: resubmit for the remainder.
            return Some(self);
        }
        match self.req {
            // n == 0 on a read is end of file: report what was read.
            Request::Read { buf, reply, .. } => drop(reply.send(Ok((buf, self.done_bytes)))),
            Request::Write { reply, .. } if self.done_bytes < total_bytes => drop(reply.send(Err(
                io::Error::new(io::ErrorKind::WriteZero, "write made no progress"),
            ))),
            Request::Write { reply, .. } | Request::Sync { reply } => drop(reply.send(Ok(()))),
        }
        None
    }
}

/// The ring, its slots, and whether it still works.
struct Ring {
    ring: IoUring,
    fd: types::Fd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// `io_uring_enter` calls that handed entries to the kernel (tests).
    submit_calls: u64,
    /// Set when `io_uring_enter` failed for good: the buffers of the
    /// operations then in the kernel are leaked, new ones fail at once.
    broken: Option<String>,
}

impl Ring {
    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Puts `slot` in the kernel's queue (not yet submitted), or hands it
    /// back failed if it cannot.
    fn push_slot(&mut self, mut slot: Slot) {
        if let Some(why) = &self.broken {
            slot.fail(io::Error::other(format!("io_uring failed: {why}")));
            return;
        }
        let Some(index) = self.free.pop() else {
            slot.fail(io::Error::other("io_uring: no free slot"));
            return;
        };
        let entry = slot.entry(self.fd, index);
        self.slots[index] = Some(slot);
        // SAFETY: the entry points into the buffer owned by `self.slots[index]`,
        // which stays there (heap data not moved, not freed) until this
        // entry's completion is taken off the completion queue in `reap`, or
        // forever (leaked) if the ring breaks. The ring, and so the slots,
        // are only dropped once nothing is in flight (`UringIo::drop`).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            if let Some(slot) = self.slots[index].take() {
                self.free.push(index);
                slot.fail(io::Error::other("io_uring submission queue is full"));
            }
        }
    }

    /// Hands the queued entries to the kernel; `wait` blocks until at least
    /// that many completions are ready.
    fn submit(&mut self, wait: usize) {
        if self.broken.is_some() {
            return;
        }
        if !self.ring.submission().is_empty() {
            self.submit_calls += 1;
        }
        loop {
            match self.ring.submit_and_wait(wait) {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The completion queue is full or the kernel is short of
                // memory: what was not taken stays queued for the next call,
                // made once the reaper has emptied the completion queue.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => return,
                Err(e) => {
                    tracing::error!(error = %e, "io_uring submit failed; failing in-flight disk I/O");
                    self.break_down(e.to_string());
                    return;
                }
            }
        }
    }

    /// Fails every in-flight operation, leaking its buffer (the kernel may
    /// still use it), and refuses new ones.
    fn break_down(&mut self, why: String) {
        for slot in self.slots.iter_mut().filter_map(Option::take) {
            let err = io::Error::other(format!("io_uring failed: {why}"));
            match slot.req {
                Request::Read { buf, reply, .. } => {
                    std::mem::forget(buf);
                    let _ = reply.send(Err(err));
                }
                Request::Write { data, reply, .. } => {
                    std::mem::forget(data);
                    let _ = reply.send(Err(err));
                }
                Request::Sync { reply } => drop(reply.send(Err(err))),
            }
        }
        self.broken = Some(why);
    }

    /// Takes every waiting completion off the queue and answers its caller;
    /// returns how many operations finished for good (their permits go back).
    fn reap(&mut self) -> usize {
        let mut finished = 0;
        let mut resubmitted = false;
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            let (user_data, result) = (cqe.user_data(), cqe.result());
            let index = user_data as usize;
            let Some(slot) = self.slots.get_mut(index).and_then(Option::take) else {
                tracing::error!(user_data, "io_uring completion for an empty slot");
                continue;
            };
            self.free.push(index);
            match slot.complete(result) {
                Some(again) => {
                    self.push_slot(again);
                    resubmitted = true;
                }
                None => finished += 1,
            }
        }
        // Resubmissions, and anything a refused submit (EBUSY) left queued.
        if resubmitted || !self.ring.submission().is_empty() {
            self.submit(0);
        }
        finished
    }
}

/// What the callers, the submitter and the reaper share.
struct Shared {
    ring: Mutex<Ring>,
    /// One permit per free slot.
    permits: Semaphore,
    /// Entries are queued and the submitter has been asked to submit them.
    submit_pending: AtomicBool,
    /// Wakes the submitter.
    submit_wake: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding the lock leaves the ring in a state every
        // step keeps consistent (slots and free list change together).
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reaps under the lock and gives back the finished operations' permits.
    fn reap(&self) {
        let (finished, broken) = {
            let mut ring = self.lock();
            let finished = ring.reap();
            (finished, ring.broken.is_some())
        };
        if broken {
            self.permits.close();
        }
        self.permits.add_permits(finished);
    }
}

/// The ring's descriptor, for the reactor.
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The tokio side of the ring: submits requests, awaits their results.
pub struct UringIo {
    shared: Arc<Shared>,
    reaper: tokio::task::JoinHandle<()>,
    submitter: tokio::task::JoinHandle<()>,
    /// Kept open until every operation on it has finished.
    _file: Arc<BackingFile>,
}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringIo")
            .field("in_flight", &self.shared.lock().in_flight())
            .finish()
    }
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the io_uring engine has stopped")
}

impl UringIo {
    /// Sets up the ring and its reaper on the current tokio runtime; fails
    /// if io_uring is unavailable or there is no runtime.
    pub fn new(file: Arc<BackingFile>) -> io::Result<UringIo> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("no tokio runtime for io_uring: {e}")))?;
        let ring = IoUring::new(RING_ENTRIES)?;
        let ring_fd = ring.as_raw_fd();
        let shared = Arc::new(Shared {
            ring: Mutex::new(Ring {
                ring,
                fd: types::Fd(file.file.as_raw_fd()),
                slots: (0..MAX_IN_FLIGHT_REQUESTS).map(|_| None).collect(),
                free: (0..MAX_IN_FLIGHT_REQUESTS).rev().collect(),
                broken: None,
                submit_calls: 0,
            }),
            permits: Semaphore::new(MAX_IN_FLIGHT_REQUESTS),
            submit_pending: AtomicBool::new(false),
            submit_wake: Notify::new(),
        });
        // Registering here makes a ring the reactor cannot poll an error the
        // caller can fall back from, not a dead engine.
        let afd = {
            let _enter = handle.enter();
            // SAFETY: the descriptor is the ring's, owned by `shared`; the
            // reaper keeps `shared` alive and drops this registration first
            // (field order of `Reaper`), so the descriptor stays open and the
            // same for the registration's whole life.
            unsafe { AsyncFd::register_with_interest(RingFd(ring_fd), Interest::READABLE) }
                .map_err(|e| io::Error::other(format!("cannot poll the io_uring: {e}")))?
        };
        let reaper = handle.spawn(reap_forever(Reaper {
            afd,
            shared: shared.clone(),
        }));
        let submitter = handle.spawn(submit_forever(shared.clone()));
        Ok(UringIo {
            shared,
            reaper,
            submitter,
            _file: file,
        })
    }

    /// How many `io_uring_enter` calls handed entries to the kernel so far.
    pub fn submit_calls(&self) -> u64 {
        self.shared.lock().submit_calls
    }

    async fn call<T>(&self, req: Request, rx: oneshot::Receiver<io::Result<T>>) -> io::Result<T> {
        // Only waiting for a permit may be cancelled; once pushed, the slot
        // owns the buffer until the kernel is done with it.
        let permit = self.shared.permits.acquire().await.map_err(|_| stopped())?;
        permit.forget();
        self.shared.lock().push_slot(Slot { req, done_bytes: 0 });
        // Submitted by the submitter task, which runs after the tasks that
        // are ready now: the operations they queue meanwhile go to the
        // kernel in one io_uring_enter (and one device notification: on a
        // VM each is a trap to the host, ~7% of the daemons' CPU at depth
        // 32 when every operation was submitted alone).
        if !self.shared.submit_pending.swap(true, Ordering::AcqRel) {
            self.shared.submit_wake.notify_one();
        }
        rx.await.map_err(|_| stopped())?
    }
}

/// The reaper's state; the descriptor's registration goes before the ring.
struct Reaper {
    afd: AsyncFd<RingFd>,
    shared: Arc<Shared>,
}

async fn reap_forever(r: Reaper) {
    loop {
        let mut guard = match r.afd.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot wait for io_uring completions");
                r.shared.lock().break_down(format!("reactor: {e}"));
                r.shared.permits.close();
                return;
            }
        };
        // Cleared before reaping: a completion posted meanwhile makes the
        // descriptor readable again, so none is left waiting.
        guard.clear_ready();
        r.shared.reap();
    }
}

/// Submits what callers queued, once per wake-up.
async fn submit_forever(shared: Arc<Shared>) {
    loop {
        shared.submit_wake.notified().await;
        // Cleared before submitting: an entry queued after this point asks
        // for another round, so none is left unsubmitted.
        shared.submit_pending.store(false, Ordering::Release);
        shared.lock().submit(0);
    }
}

impl Drop for UringIo {
    fn drop(&mut self) {
        self.reaper.abort();
        self.submitter.abort();
        self.shared.permits.close();
        // Wait for the operations still in the kernel (those of cancelled
        // callers), so that once this returns no buffer is in use and the
        // disk may be closed and its lock released. Bounded by
        // MAX_IN_FLIGHT_REQUESTS disk operations.
        let mut ring = self.shared.lock();
        while ring.in_flight() > 0 && ring.broken.is_none() {
            ring.submit(1);
            ring.reap();
        }
    }
}

impl BlockIo for UringIo {
    fn read_at(
        &self,
        offset: u64,
        buf: BytesMut,
    ) -> impl Future<Output = io::Result<(BytesMut, usize)>> + Send {
        let (reply, rx) = oneshot::channel();
        self.call(Request::Read { offset, buf, reply }, rx)
    }

    fn write_at(&self, offset: u64, data: Bytes) -> impl Future<Output = io::Result<()>> + Send {
        let (reply, rx) = oneshot::channel();
        self.call(
            Request::Write {
                offset,
                data,
                reply,
            },
            rx,
        )
    }

    fn sync_data(&self) -> impl Future<Output = io::Result<()>> + Send {
        let (reply, rx) = oneshot::channel();
        self.call(Request::Sync { reply }, rx)
    }

    fn name(&self) -> &'static str {
        "uring"
    }
}
