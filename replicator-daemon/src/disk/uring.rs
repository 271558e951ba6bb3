//! The io_uring I/O layer: one ring on its own thread, bridged into tokio.
//!
//! Owns the ring, its thread and every buffer while the kernel may touch it.
//! Requests arrive over a bounded channel ([`SUBMIT_QUEUE_REQUESTS`]); the
//! submitter then kicks an eventfd that the ring polls, so the thread sleeps
//! only in `io_uring_enter`. At most [`MAX_IN_FLIGHT_REQUESTS`] operations are
//! in the kernel at once; further requests wait in the channel, and senders
//! wait when it is full. Each in-flight operation owns its buffer in a slot
//! until its completion has been reaped; short reads and writes are
//! resubmitted for the remainder; a request that cannot be pushed is handed
//! back as an error. Results go back over a oneshot channel.
//!
//! This is the only module of the crate allowed to use `unsafe` (pushing
//! entries that point at buffers, and creating the eventfd); each block says
//! why it is sound. It must not check ranges or alignment (the engine does).
#![allow(unsafe_code)]

use std::fs::File;
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use io_uring::{opcode, squeue, types, IoUring};
use tokio::sync::{mpsc, oneshot};

use super::file::BackingFile;
use super::io::BlockIo;

/// Operations in the kernel at once (slots); also sizes the ring.
pub const MAX_IN_FLIGHT_REQUESTS: usize = 128;

/// Allocations from this size up are served by mmap and given back to the
/// kernel when freed (glibc's initial default, made fixed).
pub const MALLOC_MMAP_THRESHOLD_BYTES: i32 = 128 * 1024;

/// Keeps glibc from raising its mmap threshold after the first large free.
/// Otherwise the aligned bounce buffers of O_DIRECT I/O (a little over
/// 128 KiB per resync chunk), allocated and freed on many threads, pile up
/// in per-thread arenas: a 256 MiB resync onto an O_DIRECT disk grew the
/// target's RSS to 536 MiB, 70 MiB with the threshold fixed. Idempotent.
pub fn fix_malloc_mmap_threshold() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: mallopt only changes allocator tuning parameters; glibc
        // makes it safe to call from any thread at any time, and no pointer
        // is passed.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES) };
        if ok != 1 {
            tracing::warn!(
                "cannot fix the malloc mmap threshold; O_DIRECT buffers may inflate memory use"
            );
        }
    });
}
/// Requests queued between tokio and the ring thread.
pub const SUBMIT_QUEUE_REQUESTS: usize = 256;
/// Submission ring entries: every slot plus the eventfd poll, rounded to a power of two.
const RING_ENTRIES: u32 = (MAX_IN_FLIGHT_REQUESTS as u32 + 1).next_power_of_two();
/// user_data of the eventfd poll; slots use their index.
const WAKE_USER_DATA: u64 = u64::MAX;

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

/// The tokio side of the ring: sends requests, awaits their results.
#[derive(Debug)]
pub struct UringIo {
    tx: Option<mpsc::Sender<Request>>,
    wake: Arc<File>,
    thread: Option<std::thread::JoinHandle<()>>,
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

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the io_uring thread has stopped")
}

impl UringIo {
    /// Sets up the ring and starts its thread; fails if io_uring is unavailable.
    pub fn new(file: Arc<BackingFile>) -> io::Result<UringIo> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: eventfd takes no pointers; it returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let wake = Arc::new(File::from(unsafe { OwnedFd::from_raw_fd(raw) }));
        let mut r = Ring {
            ring,
            fd: types::Fd(file.file.as_raw_fd()),
            slots: (0..MAX_IN_FLIGHT_REQUESTS).map(|_| None).collect(),
            free: (0..MAX_IN_FLIGHT_REQUESTS).rev().collect(),
        };
        // Arm the wake-up poll here, so a ring that cannot poll is an error
        // the caller can fall back from, not a dead engine.
        r.arm_wake(&wake)?;
        r.ring.submit()?;
        let (tx, rx) = mpsc::channel(SUBMIT_QUEUE_REQUESTS);
        let thread_wake = wake.clone();
        let thread = std::thread::Builder::new()
            .name("disk-uring".into())
            .spawn(move || ring_thread(r, file, rx, thread_wake))?;
        Ok(UringIo {
            tx: Some(tx),
            wake,
            thread: Some(thread),
        })
    }

    async fn call<T>(&self, req: Request, rx: oneshot::Receiver<io::Result<T>>) -> io::Result<T> {
        let tx = self.tx.as_ref().ok_or_else(stopped)?;
        // Only waiting for room may be cancelled; the send and the kick
        // happen together, so no queued request is left without a wake-up.
        let permit = tx.reserve().await.map_err(|_| stopped())?;
        permit.send(req);
        kick(&self.wake);
        rx.await.map_err(|_| stopped())?
    }
}

fn kick(wake: &File) {
    // An eventfd write fails only if the counter would overflow, and then
    // the thread is already due to wake up.
    let _ = (&*wake).write(&1u64.to_ne_bytes());
}

impl Drop for UringIo {
    fn drop(&mut self) {
        // Close the channel first so the woken thread sees it closed.
        self.tx = None;
        kick(&self.wake);
        // Wait for the operations still in the kernel (those of cancelled
        // callers), so that once this returns the disk is closed and its
        // lock released. Bounded by MAX_IN_FLIGHT_REQUESTS disk operations.
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the io_uring thread panicked");
            }
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

struct Ring {
    ring: IoUring,
    fd: types::Fd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
}

impl Ring {
    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Puts `slot` in the kernel's queue, or hands it back failed if it cannot.
    fn push_slot(&mut self, mut slot: Slot) {
        let Some(index) = self.free.pop() else {
            slot.fail(io::Error::other("io_uring: no free slot"));
            return;
        };
        let entry = slot.entry(self.fd, index);
        self.slots[index] = Some(slot);
        // SAFETY: the entry points into the buffer owned by `self.slots[index]`,
        // which stays there (heap data not moved, not freed) until this
        // entry's completion is taken off the completion queue in
        // `ring_thread`, or forever (leaked) if the ring dies.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            if let Some(slot) = self.slots[index].take() {
                self.free.push(index);
                slot.fail(io::Error::other("io_uring submission queue is full"));
            }
        }
    }

    fn arm_wake(&mut self, wake: &File) -> io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(wake.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(WAKE_USER_DATA);
        // SAFETY: a poll entry carries no buffer; the eventfd outlives the
        // ring (the thread holds an Arc of it until after the ring is dropped).
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue is full"))
    }
}

fn ring_thread(
    mut r: Ring,
    file: Arc<BackingFile>,
    mut rx: mpsc::Receiver<Request>,
    wake: Arc<File>,
) {
    let mut closed = false;
    let mut completions = Vec::with_capacity(RING_ENTRIES as usize * 2);
    loop {
        while !closed && !r.free.is_empty() {
            match rx.try_recv() {
                Ok(req) => r.push_slot(Slot { req, done_bytes: 0 }),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
            }
        }
        if closed && r.in_flight() == 0 {
            break;
        }
        match r.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(e) => {
                tracing::error!(error = %e, "io_uring submit failed; failing in-flight disk I/O and stopping the ring");
                // The kernel may still use the buffers: leak them, fail the requests.
                for slot in r.slots.iter_mut().filter_map(Option::take) {
                    let Slot { req, .. } = slot;
                    let err = || io::Error::other(format!("io_uring failed: {e}"));
                    match req {
                        Request::Read { buf, reply, .. } => {
                            std::mem::forget(buf);
                            let _ = reply.send(Err(err()));
                        }
                        Request::Write { data, reply, .. } => {
                            std::mem::forget(data);
                            let _ = reply.send(Err(err()));
                        }
                        Request::Sync { reply } => drop(reply.send(Err(err()))),
                    }
                }
                // Leak the ring too, so nothing it points at is ever unmapped early.
                std::mem::forget(r.ring);
                return;
            }
        }
        completions.clear();
        completions.extend(r.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, result) in &completions {
            if user_data == WAKE_USER_DATA {
                let mut counter = [0u8; 8];
                let _ = (&*wake).read(&mut counter);
                if !closed {
                    if let Err(e) = r.arm_wake(&wake) {
                        tracing::error!(error = %e, "io_uring engine cannot re-arm its wake-up poll");
                    }
                }
                continue;
            }
            let index = user_data as usize;
            let Some(slot) = r.slots.get_mut(index).and_then(Option::take) else {
                tracing::error!(user_data, "io_uring completion for an empty slot");
                continue;
            };
            r.free.push(index);
            if let Some(again) = slot.complete(result) {
                r.push_slot(again);
            }
        }
    }
    drop(r);
    drop(file);
}
