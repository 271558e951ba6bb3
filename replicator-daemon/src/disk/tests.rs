//! The shared disk-engine suite: every test runs against the sync and the
//! io_uring engine, each with and without O_DIRECT.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;

/// Size of each test disk (a multiple of 4 KiB so O_DIRECT accepts it).
const TEST_DISK_BYTES: u64 = 4 * 1024 * 1024;
/// Upper bound on any one test's run time.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Sync,
    Uring,
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    engine: Arc<AnyEngine>,
    /// The engine's own buffer pool (not the process-wide one).
    pool: Arc<aligned::BufPool>,
    /// What the disk should hold.
    model: Vec<u8>,
}

/// A sparse test disk and an engine on it; `None` (with a message) when the
/// file system refuses O_DIRECT.
fn setup(kind: Kind, direct: bool) -> Option<Fixture> {
    // tmpfs refuses O_DIRECT: keep direct-test files on a disk file system.
    let dir = if direct {
        tempfile::Builder::new()
            .prefix("replicator-disk-test")
            .tempdir_in("/var/tmp")
            .expect("create temp dir in /var/tmp")
    } else {
        tempfile::tempdir().expect("create temp dir")
    };
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(TEST_DISK_BYTES))
        .expect("create sparse disk file");
    let file = match BackingFile::open(
        &path,
        OpenMode {
            read_only: false,
            direct,
        },
    ) {
        Ok(f) => Arc::new(f),
        Err(DiskError::Open { source, .. })
            if direct && source.raw_os_error() == Some(libc::EINVAL) =>
        {
            eprintln!("SKIPPED: the file system under /var/tmp refuses O_DIRECT; direct-I/O tests did not run");
            return None;
        }
        Err(e) => panic!("open test disk: {e}"),
    };
    let backend = match kind {
        Kind::Sync => Backend::Sync(SyncIo::new(file.clone())),
        Kind::Uring => Backend::Uring(UringIo::new(file.clone()).expect(
            "io_uring setup failed: this kernel or sandbox disallows io_uring (check /proc/sys/kernel/io_uring_disabled)",
        )),
    };
    let pool = aligned::BufPool::new(aligned::POOL_IDLE_CAP_BYTES);
    Some(Fixture {
        _dir: dir,
        path,
        engine: Arc::new(Engine::with_pool(backend, file, pool.clone())),
        pool,
        model: vec![0; TEST_DISK_BYTES as usize],
    })
}

/// A 1 MiB sparse file `name` in a fresh temporary directory (kept alive by
/// the returned guard).
fn small_disk(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    (dir, path)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl Fixture {
    async fn write(&mut self, offset: u64, data: Vec<u8>) {
        let o = offset as usize;
        self.model[o..o + data.len()].copy_from_slice(&data);
        self.engine.write(offset, Bytes::from(data)).await.unwrap();
    }

    fn zero_model(&mut self, offset: u64, len: u64) {
        self.model[offset as usize..(offset + len) as usize].fill(0);
    }

    /// Reads the whole disk back and compares it with the model.
    async fn assert_matches_model(&self) {
        let all = self.engine.read(0, TEST_DISK_BYTES as usize).await.unwrap();
        if all[..] != self.model[..] {
            let first = all
                .iter()
                .zip(&self.model)
                .position(|(a, b)| a != b)
                .unwrap();
            panic!("disk differs from the model first at byte {first}");
        }
        // And through the file system, bypassing the engine.
        let on_disk = std::fs::read(&self.path).unwrap();
        assert!(on_disk == self.model, "file contents differ from the model");
    }

    async fn writes_at_odd_offsets_read_back(mut self) {
        let cases: [(u64, usize); 8] = [
            (0, 1),
            (1, 3000),
            (4095, 2),
            (4097, 8191),
            (65_537, 65_537),
            (1_000_000, 12_345),
            (TEST_DISK_BYTES - 1, 1),
            (TEST_DISK_BYTES - 5000, 4999),
        ];
        for (i, &(off, len)) in cases.iter().enumerate() {
            self.write(off, pattern(i as u64 + 1, len)).await;
            let back = self.engine.read(off, len).await.unwrap();
            assert_eq!(
                &back[..],
                &self.model[off as usize..off as usize + len],
                "at {off}+{len}"
            );
        }
        // Unaligned reads of unaligned spans.
        for &(off, len) in &[(3u64, 10usize), (4090, 20), (70_000, 100_000)] {
            let back = self.engine.read(off, len).await.unwrap();
            assert_eq!(&back[..], &self.model[off as usize..off as usize + len]);
        }
        self.assert_matches_model().await;
    }

    async fn concurrent_writes_to_distinct_ranges_all_land(mut self) {
        // 1000-byte ranges share 4 KiB blocks: under O_DIRECT every one is a
        // read-modify-write racing its neighbours.
        const WRITERS: u64 = 64;
        const LEN: usize = 1000;
        let engine = self.engine.clone();
        let mut tasks = Vec::new();
        for i in 0..WRITERS {
            let data = pattern(1000 + i, LEN);
            let off = 7 + i * LEN as u64;
            self.model[off as usize..off as usize + LEN].copy_from_slice(&data);
            let e = engine.clone();
            tasks.push(tokio::spawn(async move {
                e.write(off, Bytes::from(data)).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        self.assert_matches_model().await;
    }

    async fn zeroes_and_trim_read_back_as_zero(mut self) {
        self.write(0, pattern(7, 1 << 20)).await;
        // Punching, unaligned.
        self.engine
            .write_zeroes(1000, 10_000, true, false)
            .await
            .unwrap();
        self.zero_model(1000, 10_000);
        // Zero range without punching, unaligned.
        self.engine
            .write_zeroes(50_001, 70_000, false, false)
            .await
            .unwrap();
        self.zero_model(50_001, 70_000);
        // Trim (punch hole).
        self.engine.trim(200_000, 300_000).await.unwrap();
        self.zero_model(200_000, 300_000);
        self.assert_matches_model().await;
        // Without fallocate: zeroes are written, in chunks, and fast zero refuses.
        self.engine.disable_fallocate_for_test();
        let r = self.engine.write_zeroes(600_000, 5_000, true, true).await;
        assert!(matches!(r, Err(DiskError::NotFast { .. })), "{r:?}");
        self.assert_matches_model().await;
        self.engine
            .write_zeroes(600_001, 2 * ZERO_CHUNK_BYTES / 3 + 77, true, false)
            .await
            .unwrap();
        self.zero_model(600_001, 2 * ZERO_CHUNK_BYTES / 3 + 77);
        self.assert_matches_model().await;
    }

    async fn block_status_reports_holes_after_punch(mut self) {
        let len = TEST_DISK_BYTES;
        let ex = self.engine.block_status(0, len).await.unwrap();
        assert_eq!(
            ex,
            vec![DiskExtent {
                length_bytes: len,
                hole: true
            }],
            "new sparse file"
        );
        self.write(65_536, pattern(3, 8192)).await;
        if self.engine.file().mode.direct {
            // Buffered writes land at once; direct ones too, but be explicit.
            self.engine.flush().await.unwrap();
        }
        let ex = self.engine.block_status(0, len).await.unwrap();
        assert_eq!(ex.iter().map(|e| e.length_bytes).sum::<u64>(), len);
        let data: Vec<_> = ex.iter().filter(|e| !e.hole).collect();
        assert_eq!(data.len(), 1, "one data extent: {ex:?}");
        assert!(data[0].length_bytes >= 8192);
        assert!(!self.engine.block_status(65_536, 4096).await.unwrap()[0].hole);
        // A sub-range query starts at its offset and does not run past its end.
        let ex = self.engine.block_status(60_000, 10_000).await.unwrap();
        assert_eq!(
            ex.iter().map(|e| e.length_bytes).sum::<u64>(),
            10_000,
            "{ex:?}"
        );
        assert!(ex[0].hole && !ex[1].hole, "{ex:?}");
        self.engine.trim(65_536, 8192).await.unwrap();
        let ex = self.engine.block_status(0, len).await.unwrap();
        assert_eq!(
            ex,
            vec![DiskExtent {
                length_bytes: len,
                hole: true
            }],
            "after punch: {ex:?}"
        );
    }

    async fn flush_succeeds_after_writes(mut self) {
        self.write(12_288, pattern(9, 4096)).await;
        self.engine.flush().await.unwrap();
        self.engine.flush().await.unwrap();
        self.assert_matches_model().await;
    }

    async fn out_of_range_requests_are_refused(self) {
        let size = TEST_DISK_BYTES;
        let e = &self.engine;
        assert!(matches!(
            e.read(size - 10, 20).await,
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            e.read(size, 1).await,
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            e.read(u64::MAX, 2).await,
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            e.write(size - 1, Bytes::from_static(b"ab")).await,
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            e.write_zeroes(size, 1, true, false).await,
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            e.trim(u64::MAX - 1, 10).await,
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            e.block_status(size - 1, 2).await,
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            e.read(0, MAX_IO_BYTES + 1).await,
            Err(DiskError::TooLarge { .. })
        ));
        // The file did not grow.
        assert_eq!(std::fs::metadata(&self.path).unwrap().len(), size);
        // Zero-length requests at the end are fine.
        assert!(e.read(size, 0).await.unwrap().is_empty());
    }

    async fn read_of_truncated_disk_errors(self) {
        // The file shrinks under the engine: reads past the new end fail
        // instead of returning made-up data.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap()
            .set_len(TEST_DISK_BYTES / 2)
            .unwrap();
        let r = self.engine.read(TEST_DISK_BYTES - 8192, 4096).await;
        assert!(matches!(r, Err(DiskError::Io { .. })), "{r:?}");
    }

    /// Fills the pool with buffers of every class up to 4 MiB holding 0xee.
    fn spoil_pool(&self) {
        for class in 0..=10 {
            let bufs: Vec<_> = (0..3)
                .map(|_| {
                    let mut b = self.pool.take(4096 << class);
                    b.as_mut_slice().fill(0xee);
                    b
                })
                .collect();
            drop(bufs);
        }
    }

    async fn stale_pool_contents_never_reach_the_disk_or_a_read(mut self) {
        // Pooled buffers are reused without zeroing; this proves reads and
        // (read-modify-)writes overwrite every byte they use, whatever the
        // buffers held before.
        self.spoil_pool();
        assert!(self.pool.idle_bytes() > 0);
        let cases: [(u64, usize); 7] = [
            (1, 10),
            (4095, 2),
            (5000, 9000),
            (8192 + 100, 4096),
            (65_536, 65_536),
            (1_000_003, 70_000),
            (TEST_DISK_BYTES - 4097, 4097),
        ];
        for (i, &(off, len)) in cases.iter().enumerate() {
            self.spoil_pool();
            self.write(off, pattern(i as u64 + 100, len)).await;
            self.spoil_pool();
            let back = self.engine.read(off, len).await.unwrap();
            assert_eq!(&back[..], &self.model[off as usize..off as usize + len]);
        }
        // Never-written ranges read as zeroes, not as stale pool bytes.
        for &(off, len) in &[
            (2_000_000u64, 300_000usize),
            (3_000_001, 5),
            (4096 * 8, 4096),
        ] {
            self.spoil_pool();
            let back = self.engine.read(off, len).await.unwrap();
            assert!(back.iter().all(|&b| b == 0), "stale bytes in {off}+{len}");
        }
        self.spoil_pool();
        self.assert_matches_model().await;
    }

    async fn direct_flag_reaches_the_file(self) {
        use std::os::fd::AsRawFd;
        let fd = self.engine.file().file.as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
            .unwrap();
        let direct = flags & libc::O_DIRECT as u32 != 0;
        assert_eq!(
            direct,
            self.engine.file().mode.direct,
            "fdinfo flags {flags:o}"
        );
    }
}

macro_rules! engine_suite {
    ($name:ident, $kind:expr, $direct:expr, [$($test:ident),* $(,)?]) => {
        mod $name {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    // See the Fixture method of the same name for what this proves.
                    let Some(f) = setup($kind, $direct) else { return };
                    tokio::time::timeout(TEST_TIMEOUT, f.$test())
                        .await
                        .expect("test exceeded its time limit");
                }
            )*
        }
    };
}

macro_rules! all_suites {
    ($($name:ident: $kind:expr, $direct:expr;)*) => {$(
        engine_suite!($name, $kind, $direct, [
            writes_at_odd_offsets_read_back,
            concurrent_writes_to_distinct_ranges_all_land,
            zeroes_and_trim_read_back_as_zero,
            block_status_reports_holes_after_punch,
            flush_succeeds_after_writes,
            out_of_range_requests_are_refused,
            read_of_truncated_disk_errors,
            direct_flag_reaches_the_file,
            stale_pool_contents_never_reach_the_disk_or_a_read,
        ]);
    )*};
}

all_suites! {
    sync_buffered: Kind::Sync, false;
    sync_direct: Kind::Sync, true;
    uring_buffered: Kind::Uring, false;
    uring_direct: Kind::Uring, true;
}

#[tokio::test]
async fn open_engine_never_creates_a_missing_disk() {
    // Proves opening a nonexistent disk fails and does not create it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.img");
    let opts = EngineOptions {
        io_engine: IoEngineKind::Uring,
        direct: false,
        read_only: false,
    };
    assert!(matches!(
        open_engine(&path, opts),
        Err(DiskError::Open { .. })
    ));
    assert!(!path.exists());
}

#[tokio::test]
async fn open_engine_uring_uses_io_uring_when_available() {
    // Proves io_engine = "uring" gives the io_uring layer where the kernel allows it.
    let (_dir, path) = small_disk("d.img");
    let opts = EngineOptions {
        io_engine: IoEngineKind::Uring,
        direct: false,
        read_only: false,
    };
    let e = open_engine(&path, opts).unwrap();
    assert_eq!(e.io_name(), "uring");
    drop(e);
    let opts = EngineOptions {
        io_engine: IoEngineKind::Sync,
        ..opts
    };
    assert_eq!(open_engine(&path, opts).unwrap().io_name(), "sync");
}

#[tokio::test]
async fn direct_open_of_unaligned_size_is_refused_clearly() {
    // Proves O_DIRECT on a disk whose size is not a 4 KiB multiple is a clear error.
    let dir = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("odd.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(10_000)
        .unwrap();
    match BackingFile::open(
        &path,
        OpenMode {
            read_only: false,
            direct: true,
        },
    ) {
        Err(DiskError::DirectUnaligned {
            size_bytes: 10_000, ..
        }) => {}
        Err(DiskError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("SKIPPED: /var/tmp refuses O_DIRECT");
        }
        other => panic!("expected DirectUnaligned, got {other:?}"),
    }
}

#[tokio::test]
async fn read_only_open_refuses_writes() {
    // Proves a read-only disk cannot be written through the engine.
    let (_dir, path) = small_disk("ro.img");
    let opts = EngineOptions {
        io_engine: IoEngineKind::Sync,
        direct: false,
        read_only: true,
    };
    let e = open_engine(&path, opts).unwrap();
    assert!(matches!(
        e.write(0, Bytes::from_static(b"x")).await,
        Err(DiskError::Io { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_more_requests_than_slots_all_complete() {
    // Proves requests beyond the in-flight cap wait
    // their turn (backpressure) and all complete with the right data.
    let Some(f) = setup(Kind::Uring, false) else {
        return;
    };
    let engine = f.engine.clone();
    let requests = 2 * uring::MAX_IN_FLIGHT_REQUESTS + 200;
    let block = 4096u64;
    assert!(requests as u64 * block <= TEST_DISK_BYTES);
    let run = async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..requests as u64 {
            let e = engine.clone();
            tasks.spawn(async move {
                e.write(i * block, Bytes::from(pattern(i, block as usize)))
                    .await
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
        let mut reads = tokio::task::JoinSet::new();
        for i in 0..requests as u64 {
            let e = engine.clone();
            reads.spawn(async move { (i, e.read(i * block, block as usize).await) });
        }
        while let Some(r) = reads.join_next().await {
            let (i, data) = r.unwrap();
            assert_eq!(
                &data.unwrap()[..],
                &pattern(i, block as usize)[..],
                "block {i}"
            );
        }
        engine.flush().await.unwrap();
    };
    tokio::time::timeout(TEST_TIMEOUT, run)
        .await
        .expect("test exceeded its time limit");
}

#[tokio::test]
async fn uring_setup_failure_falls_back_to_the_sync_engine() {
    // Proves io_engine = "uring" still serves (with the sync layer) when the
    // ring cannot be set up, e.g. io_uring disabled by a sandbox.
    let (_dir, path) = small_disk("d.img");
    let file = Arc::new(BackingFile::open(&path, OpenMode::default()).unwrap());
    let backend = choose_backend(&file, IoEngineKind::Uring, |_| {
        Err(std::io::Error::from_raw_os_error(libc::EPERM))
    });
    assert_eq!(backend.name(), "sync");
    let engine = Engine::new(backend, file);
    engine
        .write(10, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(&engine.read(10, 5).await.unwrap()[..], b"hello");
}

#[tokio::test]
async fn second_writer_on_the_same_disk_is_refused() {
    // Proves a disk open for writing cannot be opened for writing (or
    // reading) by another opener, and is free again once closed.
    let (_dir, path) = small_disk("d.img");
    let rw = OpenMode::default();
    let ro = OpenMode {
        read_only: true,
        direct: false,
    };
    let first = BackingFile::open(&path, rw).unwrap();
    assert!(matches!(
        BackingFile::open(&path, rw),
        Err(DiskError::InUse { .. })
    ));
    assert!(matches!(
        BackingFile::open(&path, ro),
        Err(DiskError::InUse { .. })
    ));
    drop(first);
    let r1 = BackingFile::open(&path, ro).unwrap();
    let r2 = BackingFile::open(&path, ro).expect("readers may share");
    assert!(matches!(
        BackingFile::open(&path, rw),
        Err(DiskError::InUse { .. })
    ));
    drop((r1, r2));
    BackingFile::open(&path, rw).expect("free again after close");
}

#[tokio::test]
async fn uring_engine_dropped_with_cancelled_operations_in_flight_releases_the_disk() {
    // Proves operations whose callers went away still own their buffers until
    // the kernel is done, and dropping the engine waits for them: afterwards
    // the disk is closed (its lock released) and what was written is whole.
    let Some(f) = setup(Kind::Uring, true) else {
        return;
    };
    let block = 64 * 1024usize;
    let count = 2 * uring::MAX_IN_FLIGHT_REQUESTS as u64;
    let mut tasks = Vec::new();
    for i in 0..count {
        let e = f.engine.clone();
        tasks.push(tokio::spawn(async move {
            e.write(
                i * block as u64 % TEST_DISK_BYTES,
                Bytes::from(pattern(i, block)),
            )
            .await
        }));
    }
    // Let some get into the kernel, then cancel every caller.
    tokio::task::yield_now().await;
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    let Fixture {
        _dir, path, engine, ..
    } = f;
    drop(Arc::into_inner(engine).expect("no other handle to the engine"));
    let reopened = BackingFile::open(&path, OpenMode::default())
        .expect("the disk is closed once the engine is dropped");
    drop(reopened);
}

#[tokio::test]
async fn uring_engine_serves_on_a_current_thread_runtime() {
    // Proves completions are picked up by the runtime that submitted them
    // when it has a single thread (replicatord's runtime): a long chain of
    // dependent operations finishes rather than waiting for a wake-up.
    let Some(f) = setup(Kind::Uring, false) else {
        return;
    };
    let run = async {
        for i in 0..2_000u64 {
            let data = pattern(i, 4096);
            f.engine
                .write(i % 64 * 4096, Bytes::from(data.clone()))
                .await
                .unwrap();
            assert_eq!(
                &f.engine.read(i % 64 * 4096, 4096).await.unwrap()[..],
                &data[..]
            );
        }
        f.engine.flush().await.unwrap();
    };
    tokio::time::timeout(TEST_TIMEOUT, run)
        .await
        .expect("test exceeded its time limit");
}

#[tokio::test]
async fn uring_operations_queued_together_go_to_the_kernel_together() {
    // Proves submission batching: writes started by tasks that are ready at
    // the same time are handed to the kernel in far fewer io_uring_enter
    // calls than writes (one device notification per batch).
    let (_dir, path) = small_disk("d.img");
    let file = Arc::new(BackingFile::open(&path, OpenMode::default()).unwrap());
    let io = Arc::new(UringIo::new(file).expect("io_uring"));
    let before = io.submit_calls();
    let writes = 32u64;
    let mut tasks = Vec::new();
    for i in 0..writes {
        let io = io.clone();
        tasks.push(tokio::spawn(async move {
            io.write_at(i * 4096, Bytes::from(pattern(i, 4096))).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let calls = io.submit_calls() - before;
    assert!(
        calls * 4 <= writes,
        "{calls} submit calls for {writes} writes"
    );
}
