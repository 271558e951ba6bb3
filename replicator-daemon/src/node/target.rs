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

use bytes::{Bytes, BytesMut};
use nbd_frontend::{BlockTarget, Extent, TargetError, TargetFlags};
use replicator_core::engine::{ClientError, ClientRequest, MAX_CLIENT_REQUESTS};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// One client request on its way to the event loop.
#[derive(Debug)]
pub struct ClientCall {
    pub request: ClientRequest,
    pub reply: oneshot::Sender<Result<Bytes, ClientError>>,
}

/// The replicated export.
#[derive(Debug)]
pub struct ReplicatedTarget {
    calls: mpsc::Sender<ClientCall>,
    size_bytes: u64,
    read_only: bool,
    /// Requests handed to the engine at once; the engine refuses more than
    /// [`MAX_CLIENT_REQUESTS`] with `Busy`, so callers wait here instead.
    slots: Arc<Semaphore>,
}

impl ReplicatedTarget {
    pub fn new(calls: mpsc::Sender<ClientCall>, size_bytes: u64, read_only: bool) -> Self {
        ReplicatedTarget {
            calls,
            size_bytes,
            read_only,
            slots: Arc::new(Semaphore::new(MAX_CLIENT_REQUESTS)),
        }
    }

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

    async fn read(&self, offset: u64, len_bytes: u32) -> Result<BytesMut, TargetError> {
        let data = self
            .call(
                "read",
                offset,
                u64::from(len_bytes),
                ClientRequest::Read { offset, len_bytes },
            )
            .await?;
        Ok(BytesMut::from(&data[..]))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), TargetError> {
        self.writable()?;
        let len = data.len() as u64;
        self.call(
            "write",
            offset,
            len,
            ClientRequest::Write { offset, data, fua },
        )
        .await
        .map(drop)
    }

    async fn flush(&self) -> Result<(), TargetError> {
        self.call("flush", 0, 0, ClientRequest::Flush)
            .await
            .map(drop)
    }

    async fn trim(&self, offset: u64, len_bytes: u64, fua: bool) -> Result<(), TargetError> {
        self.writable()?;
        let len = len_u32("trim", offset, len_bytes)?;
        self.call(
            "trim",
            offset,
            len_bytes,
            ClientRequest::Trim {
                offset,
                len_bytes: len,
            },
        )
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
        let len = len_u32("write_zeroes", offset, len_bytes)?;
        self.call(
            "write_zeroes",
            offset,
            len_bytes,
            ClientRequest::WriteZeroes {
                offset,
                len_bytes: len,
                fua,
            },
        )
        .await
        .map(drop)
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
