//! Attaching a node's disk: open the backing disk (and an external metadata
//! file) with the configured engine, find the metadata by the layout of
//! `replicator_core::metadata`, read and check the superblock, the activity
//! log ring and the bitmap, and hand them to the engine as
//! [`LoadedMetadata`].
//!
//! Owns the refusal to attach: no metadata (run `replctl create-md`), damaged
//! or foreign metadata (the decoder's exact reason), metadata of another
//! resource, node or size. Must not write anything: the engine decides what
//! to write once it runs.

use std::path::PathBuf;
use std::sync::Arc;

use replicator_core::activity_log::{self, AL_RING_TRANSACTIONS, AL_TRANSACTION_BYTES};
use replicator_core::bitmap::{Bitmap, BITMAP_PAGE_BYTES};
use replicator_core::engine::LoadedMetadata;
use replicator_core::metadata::{
    decode_superblocks, MetadataError, MetadataLayout, SUPERBLOCK_SLOT_BYTES,
};

use crate::config::{Config, MetaLocation, NodeConfig};
use crate::disk::{open_engine, AnyEngine, DiskEngine, DiskError, EngineOptions};

/// Bitmap bytes read per disk read while attaching.
pub const BITMAP_READ_CHUNK_BYTES: u64 = 1024 * 1024;

/// Why a node's disk could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Open(#[from] DiskError),
    #[error("refusing to attach: `meta` {} is the disk {} itself: {}", meta.display(), disk.display(), crate::config::META_IS_DISK)]
    MetaIsDisk { meta: PathBuf, disk: PathBuf },
    #[error("bitmap_block_bytes {0} does not fit the metadata format")]
    Geometry(u64),
    #[error("cannot lay out metadata on {}: {source}", path.display())]
    Layout {
        path: PathBuf,
        #[source]
        source: MetadataError,
    },
    #[error("reading the metadata from {} failed: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: DiskError,
    },
    #[error("{} holds no replicator metadata; run `replctl create-md --config {} --node {node}` first", path.display(), config.display())]
    NoMetadata {
        path: PathBuf,
        config: PathBuf,
        node: String,
    },
    #[error("refusing to attach {}: its metadata is damaged or foreign: {source}", path.display())]
    Damaged {
        path: PathBuf,
        #[source]
        source: MetadataError,
    },
    #[error("refusing to attach {}: {source}", path.display())]
    Mismatch {
        path: PathBuf,
        #[source]
        source: MetadataError,
    },
    #[error("refusing to attach {}: the activity log is damaged: {detail}", path.display())]
    ActivityLog { path: PathBuf, detail: String },
    #[error("refusing to attach {}: bitmap page {page} is damaged: {detail}", path.display())]
    Bitmap {
        path: PathBuf,
        page: u64,
        detail: String,
    },
}

/// An attached disk, ready for the engine.
pub struct Attached {
    /// The backing disk (the data area is its first `layout.data_size_bytes`).
    pub data: Arc<AnyEngine>,
    /// The metadata device: the same engine for internal metadata.
    pub meta: Arc<AnyEngine>,
    pub meta_path: PathBuf,
    pub layout: MetadataLayout,
    pub loaded: LoadedMetadata,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("meta_path", &self.meta_path)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// Opens and checks node `node`'s disk and metadata.
pub async fn attach(config: &Config, node: &NodeConfig) -> Result<Attached, AttachError> {
    let opts = EngineOptions {
        io_engine: node.options.io_engine,
        direct: node.options.direct,
        read_only: false,
    };
    let block = u32::try_from(node.options.bitmap_block_bytes)
        .map_err(|_| AttachError::Geometry(node.options.bitmap_block_bytes))?;
    let al_extents = node.options.al_extents;
    let data = Arc::new(open_engine(&node.disk, opts)?);
    let (meta, meta_path, layout) = match &node.meta {
        MetaLocation::Internal => {
            let layout = MetadataLayout::internal(data.size_bytes(), block, al_extents).map_err(
                |source| AttachError::Layout {
                    path: node.disk.clone(),
                    source,
                },
            )?;
            (data.clone(), node.disk.clone(), layout)
        }
        MetaLocation::External(path) => {
            if crate::disk::file::same_file(&node.disk, path).unwrap_or(false) {
                return Err(AttachError::MetaIsDisk {
                    meta: path.clone(),
                    disk: node.disk.clone(),
                });
            }
            let meta = Arc::new(open_engine(path, opts)?);
            let layout =
                MetadataLayout::external(data.size_bytes(), meta.size_bytes(), block, al_extents)
                    .map_err(|source| AttachError::Layout {
                    path: path.clone(),
                    source,
                })?;
            (meta, path.clone(), layout)
        }
    };
    let read = |offset: u64, len: u64| {
        let meta = meta.clone();
        let path = meta_path.clone();
        async move {
            meta.read(offset, len as usize)
                .await
                .map_err(|source| AttachError::Read { path, source })
        }
    };
    let s0 = read(layout.superblock_slot_offset(0), SUPERBLOCK_SLOT_BYTES).await?;
    let s1 = read(layout.superblock_slot_offset(1), SUPERBLOCK_SLOT_BYTES).await?;
    let (superblock, slot) = decode_superblocks(&s0, &s1).map_err(|source| {
        let blank = |e: &MetadataError| matches!(e, MetadataError::BadMagic { found: 0, .. });
        match &source {
            MetadataError::BothSlotsInvalid { slot0, slot1 } if blank(slot0) && blank(slot1) => {
                AttachError::NoMetadata {
                    path: meta_path.clone(),
                    config: config.path.clone(),
                    node: node.name.clone(),
                }
            }
            _ => AttachError::Damaged {
                path: meta_path.clone(),
                source,
            },
        }
    })?;
    layout
        .check_superblock(&superblock, &config.resource, &node.name)
        .map_err(|source| AttachError::Mismatch {
            path: meta_path.clone(),
            source,
        })?;

    let ring = read(layout.al_offset_bytes, layout.al_bytes).await?;
    let blocks: Vec<&[u8]> = (0..AL_RING_TRANSACTIONS as usize)
        .map(|i| &ring[i * AL_TRANSACTION_BYTES..(i + 1) * AL_TRANSACTION_BYTES])
        .collect();
    let al = activity_log::recover(&blocks).map_err(|e| AttachError::ActivityLog {
        path: meta_path.clone(),
        detail: e.to_string(),
    })?;

    let mut bitmap =
        Bitmap::new(layout.data_size_bytes, block).map_err(|e| AttachError::Bitmap {
            path: meta_path.clone(),
            page: 0,
            detail: e.to_string(),
        })?;
    let pages = bitmap.page_count();
    let page_bytes = BITMAP_PAGE_BYTES as u64;
    let pages_per_read = BITMAP_READ_CHUNK_BYTES / page_bytes;
    let mut page = 0u64;
    while page < pages {
        let n = (pages - page).min(pages_per_read);
        let chunk = read(layout.bitmap_page_offset(page), n * page_bytes).await?;
        for i in 0..n {
            let at = (i * page_bytes) as usize;
            bitmap
                .load_page(page + i, &chunk[at..at + BITMAP_PAGE_BYTES])
                .map_err(|e| AttachError::Bitmap {
                    path: meta_path.clone(),
                    page: page + i,
                    detail: e.to_string(),
                })?;
        }
        page += n;
    }
    Ok(Attached {
        data,
        meta,
        meta_path,
        layout,
        loaded: LoadedMetadata {
            superblock,
            superblock_slot: slot,
            bitmap,
            al,
        },
    })
}
