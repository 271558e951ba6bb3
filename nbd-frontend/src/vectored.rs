//! Writing several buffers with as few system calls as possible.
//!
//! Owns [`write_all_slices`]: a reply's head and its READ data, or a batch
//! of peer frames, go out with vectored writes instead of one write each
//! (with TCP_NODELAY, a separate write of a 32-byte head is a separate
//! packet and a separate wake-up of the reader). Used by the NBD server and
//! by the daemon's peer transport.

use std::io::{self, IoSlice};

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Most buffers handed to one vectored write (well under IOV_MAX, 1024).
pub const MAX_IOVECS: usize = 128;

/// Writes every byte of `parts`, in order; empty parts are skipped.
pub async fn write_all_slices<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    parts: &[&[u8]],
) -> io::Result<()> {
    let (mut next, mut skip) = (0usize, 0usize);
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_IOVECS.min(parts.len()));
    loop {
        // Past what was written and any empty parts.
        while next < parts.len() && parts[next].len() == skip {
            next += 1;
            skip = 0;
        }
        if next == parts.len() {
            return Ok(());
        }
        iov.clear();
        iov.push(IoSlice::new(&parts[next][skip..]));
        iov.extend(
            parts[next + 1..]
                .iter()
                .filter(|p| !p.is_empty())
                .take(MAX_IOVECS - 1)
                .map(|p| IoSlice::new(p)),
        );
        let mut n = w.write_vectored(&iov).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let left = parts[next].len() - skip;
            if n >= left {
                n -= left;
                next += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
}

/// A test stream shared by this crate's unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::{self, IoSlice};
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite};

    /// Records the bytes of each write call (vectored or not), taking at
    /// most `max` bytes per call; reads never complete.
    #[derive(Clone)]
    pub(crate) struct Recorder {
        pub writes: Arc<Mutex<Vec<Vec<u8>>>>,
        pub max: usize,
    }

    impl Recorder {
        pub(crate) fn new(max: usize) -> Recorder {
            Recorder {
                writes: Arc::default(),
                max,
            }
        }

        pub(crate) fn written(&self) -> Vec<Vec<u8>> {
            self.writes.lock().unwrap().clone()
        }

        fn record(&self, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
            let mut call = Vec::new();
            for b in bufs {
                let take = b.len().min(self.max - call.len());
                call.extend_from_slice(&b[..take]);
                if call.len() == self.max {
                    break;
                }
            }
            let n = call.len();
            self.writes.lock().unwrap().push(call);
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.record(&[IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            assert!(bufs.len() <= super::MAX_IOVECS);
            self.record(bufs)
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Recorder;
    use super::*;

    #[tokio::test]
    async fn every_byte_goes_out_in_order_however_the_writes_split() {
        // Proves partial vectored writes resume mid-part, empty parts are
        // skipped, more parts than MAX_IOVECS are all written, and a writer
        // taking everything needs one call per MAX_IOVECS parts.
        let owned: Vec<Vec<u8>> = (0..300u32)
            .map(|i| vec![i as u8; (i as usize * 7) % 23])
            .collect();
        let parts: Vec<&[u8]> = owned.iter().map(|v| &v[..]).collect();
        let want = owned.concat();
        for max in [1, 5, 64, 1 << 20] {
            let mut w = Recorder::new(max);
            write_all_slices(&mut w, &parts).await.unwrap();
            assert_eq!(w.written().concat(), want, "max {max}");
            if max == 1 << 20 {
                let calls = w.written().len();
                assert!(calls <= 300usize.div_ceil(MAX_IOVECS), "{calls} calls");
            }
        }
        let mut w = Recorder::new(8);
        write_all_slices(&mut w, &[&[], &[]]).await.unwrap();
        assert!(w.written().is_empty());
    }
}
