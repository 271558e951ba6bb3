//! [`ReplicatedTarget`]: the NBD [`BlockTarget`] of a replicated node. Every
//! request becomes a `ClientRequest` sent to the node's event loop with a
//! oneshot for its completion, so reads and writes go through the engine
//! (protocol C, ordering, out-of-sync marks) and one FLUSH covers writes
//! completed on every connection (there is one engine).
//!
//! Owns the mapping between NBD semantics and engine requests and between
//! engine `ClientError`s and [`TargetError`]s. Must not touch the disk or the
//! engine directly.

use std::sync::Arc;

use bytes::Bytes;
use nbd_frontend::{BlockTarget, Extent, PayloadBuf, TargetError, TargetFlags};
use replicator_core::engine::{ClientError, ClientRequest, MAX_CLIENT_REQUESTS};
use replicator_core::wire::MAX_WRITE_PAYLOAD_BYTES;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;

/// Largest piece of a write, trim or zero request handed to the engine; the
/// engine mirrors at most one wire frame's payload per request.
pub const ENGINE_WRITE_CHUNK_BYTES: u64 = MAX_WRITE_PAYLOAD_BYTES as u64;

/// One client request on its way to the event loop.
#[derive(Debug)]
pub struct ClientCall {
    pub request: ClientRequest,
    pub reply: oneshot::Sender<Result<Bytes, ClientError>>,
}

/// The replicated export.
#[derive(Debug)]
pub struct ReplicatedTarget {
    caller: Caller,
    size_bytes: u64,
    read_only: bool,
    /// Where WRITE payloads are received (the process-wide pool).
    pool: Arc<crate::disk::aligned::BufPool>,
}

/// The way into the loop, cheap to clone into per-chunk tasks.
#[derive(Debug, Clone)]
struct Caller {
    calls: mpsc::Sender<ClientCall>,
    /// Requests handed to the engine at once; the engine refuses more than
    /// [`MAX_CLIENT_REQUESTS`] with `Busy`, so callers wait here instead.
    slots: Arc<Semaphore>,
}

impl ReplicatedTarget {
    pub fn new(calls: mpsc::Sender<ClientCall>, size_bytes: u64, read_only: bool) -> Self {
        ReplicatedTarget {
            caller: Caller {
                calls,
                slots: Arc::new(Semaphore::new(MAX_CLIENT_REQUESTS)),
            },
            size_bytes,
            read_only,
            pool: crate::disk::aligned::BufPool::shared(),
        }
    }

    async fn call(
        &self,
        op: &'static str,
        offset: u64,
        len_bytes: u64,
        request: ClientRequest,
    ) -> Result<Bytes, TargetError> {
        self.caller.call(op, offset, len_bytes, request).await
    }

    /// Splits a mutation into engine-sized pieces run concurrently; fails if
    /// any piece fails (NBD writes are not atomic either).
    async fn chunked(
        &self,
        op: &'static str,
        offset: u64,
        len_bytes: u64,
        piece: impl Fn(u64, u64) -> ClientRequest,
    ) -> Result<(), TargetError> {
        if len_bytes <= ENGINE_WRITE_CHUNK_BYTES {
            return self
                .call(op, offset, len_bytes, piece(offset, len_bytes))
                .await
                .map(drop);
        }
        let mut set = JoinSet::new();
        let mut at = 0u64;
        while at < len_bytes {
            let n = (len_bytes - at).min(ENGINE_WRITE_CHUNK_BYTES);
            let (caller, req) = (self.caller.clone(), piece(offset + at, n));
            let o = offset + at;
            set.spawn(async move { caller.call(op, o, n, req).await.map(drop) });
            at += n;
        }
        let mut result = Ok(());
        while let Some(r) = set.join_next().await {
            let r = r.unwrap_or(Err(TargetError::ShuttingDown));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

impl Caller {
    async fn call(
        &self,
        op: &'static str,
        offset: u64,
        len_bytes: u64,
        request: ClientRequest,
    ) -> Result<Bytes, TargetError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| TargetError::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        self.calls
            .send(ClientCall { request, reply })
            .await
            .map_err(|_| TargetError::ShuttingDown)?;
        match rx.await {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(e)) => Err(map_error(e, op, offset, len_bytes)),
            Err(_) => Err(TargetError::ShuttingDown),
        }
    }
}

impl ReplicatedTarget {
    fn writable(&self) -> Result<(), TargetError> {
        if self.read_only {
            Err(TargetError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

/// Engine errors to the server's error type (the server picks the errno).
pub fn map_error(e: ClientError, op: &'static str, offset: u64, len_bytes: u64) -> TargetError {
    let io = |kind: std::io::ErrorKind, why: &str| TargetError::Io {
        op,
        offset,
        len_bytes,
        source: std::io::Error::new(kind, why.to_string()),
    };
    match e {
        ClientError::NotPrimary => TargetError::Unavailable("this node is not primary".to_string()),
        ClientError::Io => io(
            std::io::ErrorKind::Other,
            "the local disk failed (or the write could not be made safe)",
        ),
        ClientError::OutOfRange => io(
            std::io::ErrorKind::InvalidInput,
            "the range is outside the volume",
        ),
        ClientError::Busy => TargetError::Unavailable("too many requests in flight".to_string()),
    }
}

fn len_u32(op: &'static str, offset: u64, len_bytes: u64) -> Result<u32, TargetError> {
    u32::try_from(len_bytes).map_err(|_| TargetError::Io {
        op,
        offset,
        len_bytes,
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "requests are limited to 4 GiB",
        ),
    })
}

impl BlockTarget for ReplicatedTarget {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn flags(&self) -> TargetFlags {
        TargetFlags {
            read_only: self.read_only,
            can_flush: true,
            can_trim: !self.read_only,
            can_zero: !self.read_only,
            can_fast_zero: false,
            can_cache: false,
            // One engine serves every connection: a flush covers writes
            // completed on all of them.
            can_multi_conn: true,
            rotational: false,
        }
    }

    async fn read(&self, offset: u64, len_bytes: u32) -> Result<Bytes, TargetError> {
        self.call(
            "read",
            offset,
            u64::from(len_bytes),
            ClientRequest::Read { offset, len_bytes },
        )
        .await
    }

    /// Payloads land in pooled aligned buffers: the local O_DIRECT write
    /// of each (4 KiB-aligned) chunk then needs no copy.
    fn payload_buf(&self, len_bytes: usize) -> Option<Box<dyn PayloadBuf>> {
        crate::target::pooled_payload(&self.pool, len_bytes)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), TargetError> {
        self.writable()?;
        let len = data.len() as u64;
        self.chunked("write", offset, len, |o, n| ClientRequest::Write {
            offset: o,
            data: data.slice((o - offset) as usize..(o - offset + n) as usize),
            fua,
        })
        .await
    }

    async fn flush(&self) -> Result<(), TargetError> {
        self.call("flush", 0, 0, ClientRequest::Flush)
            .await
            .map(drop)
    }

    async fn trim(&self, offset: u64, len_bytes: u64, fua: bool) -> Result<(), TargetError> {
        self.writable()?;
        len_u32("trim", offset, len_bytes)?;
        self.chunked("trim", offset, len_bytes, |o, n| ClientRequest::Trim {
            offset: o,
            len_bytes: n as u32,
        })
        .await?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len_bytes: u64,
        _may_punch: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), TargetError> {
        self.writable()?;
        if fast {
            // Zeroing is mirrored like a write; it is never "fast".
            return Err(TargetError::NotFast);
        }
        len_u32("write_zeroes", offset, len_bytes)?;
        self.chunked("write_zeroes", offset, len_bytes, |o, n| {
            ClientRequest::WriteZeroes {
                offset: o,
                len_bytes: n as u32,
                fua,
            }
        })
        .await
    }

    async fn cache(&self, _offset: u64, _len_bytes: u64) -> Result<(), TargetError> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len_bytes: u64) -> Result<Vec<Extent>, TargetError> {
        // Allocation differs between replicas; report data everywhere.
        let _ = offset;
        Ok(vec![Extent {
            length_bytes: len_bytes,
            hole: false,
            zero: false,
        }])
    }
}
