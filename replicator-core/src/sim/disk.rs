//! A simulated disk with a volatile write cache: completed writes are visible
//! to reads but survive a crash only once flushed (or written FUA); a crash
//! keeps a random subset of the unflushed writes, in order, and may tear a
//! write that was in flight. Sparse: only pages ever written hold memory.
//!
//! Owns bytes only; must not know about replication.

use std::collections::BTreeMap;

use crate::engine::rng::SplitMix64;

/// Page size of the sparse store.
pub const SIM_PAGE_BYTES: u64 = 4096;
/// Torn writes tear at this granularity.
pub const SIM_SECTOR_BYTES: u64 = 512;

#[derive(Debug, Clone, Default)]
struct Store {
    pages: BTreeMap<u64, Box<[u8]>>,
}

impl Store {
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let page = abs / SIM_PAGE_BYTES;
            let in_page = (abs % SIM_PAGE_BYTES) as usize;
            let n = (SIM_PAGE_BYTES as usize - in_page).min(data.len() - pos);
            let chunk = &data[pos..pos + n];
            if chunk.iter().all(|&b| b == 0) && !self.pages.contains_key(&page) {
                pos += n;
                continue;
            }
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0u8; SIM_PAGE_BYTES as usize].into_boxed_slice());
            p[in_page..in_page + n].copy_from_slice(chunk);
            if p.iter().all(|&b| b == 0) {
                self.pages.remove(&page);
            }
            pos += n;
        }
    }

    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        let mut pos = 0usize;
        while pos < out.len() {
            let abs = offset + pos as u64;
            let page = abs / SIM_PAGE_BYTES;
            let in_page = (abs % SIM_PAGE_BYTES) as usize;
            let n = (SIM_PAGE_BYTES as usize - in_page).min(out.len() - pos);
            if let Some(p) = self.pages.get(&page) {
                out[pos..pos + n].copy_from_slice(&p[in_page..in_page + n]);
            }
            pos += n;
        }
        out
    }
}

#[derive(Debug, Clone)]
struct Pending {
    offset: u64,
    data: Vec<u8>,
    /// Written FUA: survives a crash for sure.
    durable: bool,
}

/// One simulated disk.
#[derive(Debug, Clone)]
pub struct SimDisk {
    size_bytes: u64,
    durable: Store,
    visible: Store,
    unflushed: Vec<Pending>,
}

impl SimDisk {
    pub fn new(size_bytes: u64) -> Self {
        SimDisk {
            size_bytes,
            durable: Store::default(),
            visible: Store::default(),
            unflushed: Vec::new(),
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Apply a completed write (volatile unless `fua`).
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) {
        assert!(
            offset + data.len() as u64 <= self.size_bytes,
            "sim write past end"
        );
        self.visible.write(offset, data);
        self.unflushed.push(Pending {
            offset,
            data: data.to_vec(),
            durable: fua,
        });
    }

    pub fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        assert!(offset + len <= self.size_bytes, "sim read past end");
        self.visible.read(offset, len)
    }

    /// Everything written so far becomes durable.
    pub fn flush(&mut self) {
        for p in std::mem::take(&mut self.unflushed) {
            self.durable.write(p.offset, &p.data);
        }
    }

    /// A failed flush (a write-back error): the unflushed writes never
    /// reach the medium, FUA ones aside, and reads show what it holds.
    /// Returns whether any write was lost.
    pub fn lose_unflushed(&mut self) -> bool {
        let mut lost = false;
        for p in std::mem::take(&mut self.unflushed) {
            if p.durable {
                self.durable.write(p.offset, &p.data);
            } else {
                lost = true;
            }
        }
        self.visible = self.durable.clone();
        lost
    }

    /// Power loss: each unflushed write independently survives or not
    /// (applied in order); the visible image becomes the durable one.
    pub fn crash(&mut self, rng: &mut SplitMix64) {
        for p in std::mem::take(&mut self.unflushed) {
            if p.durable || rng.chance(1, 2) {
                self.durable.write(p.offset, &p.data);
            }
        }
        self.visible = self.durable.clone();
    }

    /// A write that was in flight at a crash lands partly: a random prefix
    /// of its sectors (used for metadata writes).
    /// With `partial`, at least one sector lands and at least one does not.
    pub fn torn_write(&mut self, offset: u64, data: &[u8], partial: bool, rng: &mut SplitMix64) {
        let sectors = (data.len() as u64).div_ceil(SIM_SECTOR_BYTES);
        let keep = if partial && sectors > 1 {
            1 + rng.below(sectors - 1)
        } else {
            rng.below(sectors + 1)
        };
        let n = (keep * SIM_SECTOR_BYTES).min(data.len() as u64) as usize;
        self.durable.write(offset, &data[..n]);
        self.visible.write(offset, &data[..n]);
    }

    /// FNV-1a of the visible image, for cheap equality checks.
    pub fn digest(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (page, bytes) in &self.visible.pages {
            for b in page.to_le_bytes().iter().chain(bytes.iter()) {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    /// Pages that differ between two disks' visible images.
    pub fn differing_pages(&self, other: &SimDisk) -> Vec<u64> {
        let mut keys: Vec<u64> = self
            .visible
            .pages
            .keys()
            .chain(other.visible.pages.keys())
            .copied()
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys.into_iter()
            .filter(|&k| self.visible.pages.get(&k) != other.visible.pages.get(&k))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushed_write_survives_crash_and_unflushed_may_not() {
        // The volatile cache model: flush makes writes durable; a crash keeps
        // or drops each unflushed write (over many seeds both happen).
        let mut kept = 0;
        for seed in 0..64 {
            let mut d = SimDisk::new(1 << 20);
            d.write(0, &[1u8; 512], false);
            d.flush();
            d.write(4096, &[2u8; 512], false);
            d.crash(&mut SplitMix64::new(seed));
            assert_eq!(d.read(0, 512), vec![1u8; 512]);
            if d.read(4096, 512) == vec![2u8; 512] {
                kept += 1;
            }
        }
        assert!(kept > 0 && kept < 64, "kept {kept} of 64");
    }

    #[test]
    fn fua_write_is_durable_and_not_undone_by_older_unflushed_write() {
        // A FUA write survives any crash, even with an older overlapping
        // unflushed write in the cache.
        for seed in 0..32 {
            let mut d = SimDisk::new(1 << 20);
            d.write(0, &[1u8; 512], false);
            d.write(0, &[3u8; 512], true);
            d.crash(&mut SplitMix64::new(seed));
            assert_eq!(d.read(0, 512), vec![3u8; 512]);
        }
    }
}
