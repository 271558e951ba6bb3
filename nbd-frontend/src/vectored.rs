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
    write_in_turns(w, parts, usize::MAX).await
}

/// [`write_all_slices`], handing at most `turn_bytes` to one write call and
/// letting the runtime's other ready tasks run between two calls.
pub async fn write_in_turns<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    parts: &[&[u8]],
    turn_bytes: usize,
) -> io::Result<()> {
    let (mut next, mut skip) = (0usize, 0usize);
    let mut first = true;
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
        // No turns asked for (write_all_slices): no yield either.
        if !first && turn_bytes != usize::MAX {
            tokio::task::yield_now().await;
        }
        first = false;
        iov.clear();
        let mut room = turn_bytes;
        for p in std::iter::once(&parts[next][skip..])
            .chain(parts[next + 1..].iter().copied().filter(|p| !p.is_empty()))
            .take(MAX_IOVECS)
        {
            if room == 0 {
                break;
            }
            let take = p.len().min(room);
            iov.push(IoSlice::new(&p[..take]));
            room -= take;
        }
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

    #[tokio::test(flavor = "current_thread")]
    async fn turns_cap_each_call_and_let_other_tasks_run_between_them() {
        // Proves write_in_turns hands at most turn_bytes to a call, still
        // writes every byte in order, and yields between calls: a task
        // that became ready before the write runs before its second call.
        let owned: Vec<Vec<u8>> = (0..40u32).map(|i| vec![i as u8; 97 + i as usize]).collect();
        let parts: Vec<&[u8]> = owned.iter().map(|v| &v[..]).collect();
        let want = owned.concat();
        let mut w = Recorder::new(usize::MAX);
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let other = tokio::spawn({
            let ran = ran.clone();
            let writes = w.writes.clone();
            async move {
                ran.store(true, std::sync::atomic::Ordering::SeqCst);
                writes.lock().unwrap().len()
            }
        });
        write_in_turns(&mut w, &parts, 1000).await.unwrap();
        let calls = w.written();
        assert_eq!(calls.concat(), want);
        assert!(calls.iter().all(|c| c.len() <= 1000));
        assert_eq!(calls.len(), want.len().div_ceil(1000), "full turns");
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(
            other.await.unwrap(),
            1,
            "the other task ran after the first call"
        );
    }
}
