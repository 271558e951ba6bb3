//! The write-log oracle: every write the simulated client submits gets a
//! unique id stamped into each 512-byte sector it writes, so any sector read
//! back names the write it came from. The oracle records, per sector, which
//! writes were submitted, acknowledged and flushed, and judges what a sector
//! may hold:
//! - a read issued after write W was acknowledged returns W or a write
//!   submitted after it (never older data);
//! - after a crash, each sector holds a write no older than the newest one
//!   flushed (or FUA-acknowledged) before the crash;
//! - after a failover, the promoted node holds every acknowledged write.
//!
//! Owns bookkeeping only; must not drive the engine.

use std::collections::BTreeMap;

/// Granularity of the oracle.
pub const ORACLE_SECTOR_BYTES: u64 = 512;

/// The bytes write `id` puts into the sector at `sector_offset`.
pub fn sector_content(id: u64, sector_offset: u64) -> [u8; ORACLE_SECTOR_BYTES as usize] {
    let mut s = [0u8; ORACLE_SECTOR_BYTES as usize];
    s[..8].copy_from_slice(&id.to_le_bytes());
    s[8..16].copy_from_slice(&sector_offset.to_le_bytes());
    let fill = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 | 1;
    for (i, b) in s[16..].iter_mut().enumerate() {
        *b = fill.wrapping_add(i as u8);
    }
    s
}

/// Which write a sector's bytes came from: `Ok(0)` for zeroes, `Ok(id)` for
/// an intact stamp, `Err` for bytes no write produced (corruption).
pub fn decode_sector(bytes: &[u8], sector_offset: u64) -> Result<u64, String> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let id = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if bytes[..] != sector_content(id, sector_offset)[..] {
        return Err(format!(
            "sector at {sector_offset} holds bytes no write produced (claims write {id})"
        ));
    }
    Ok(id)
}

#[derive(Debug, Clone)]
struct WriteRec {
    offset: u64,
    len: u64,
    zero: bool,
    /// Writes on a split-brain victim never raise floors.
    tracked: bool,
}

/// Per-sector floors.
pub type Floors = BTreeMap<u64, u64>;

#[derive(Debug, Default)]
pub struct Oracle {
    writes: BTreeMap<u64, WriteRec>,
    /// Per sector: ids of writes covering it, ascending (submission order).
    history: BTreeMap<u64, Vec<u64>>,
    /// Newest acknowledged write per sector.
    pub acked: Floors,
    next_id: u64,
}

impl Oracle {
    pub fn new() -> Self {
        Oracle {
            next_id: 1,
            ..Default::default()
        }
    }

    /// Register a write about to be submitted; returns its id.
    pub fn submit(&mut self, offset: u64, len: u64, zero: bool, tracked: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.writes.insert(
            id,
            WriteRec {
                offset,
                len,
                zero,
                tracked,
            },
        );
        for s in sectors(offset, len) {
            self.history.entry(s).or_default().push(id);
        }
        id
    }

    /// The data of write `id`.
    pub fn data_for(&self, id: u64) -> Vec<u8> {
        let w = &self.writes[&id];
        let mut out = Vec::with_capacity(w.len as usize);
        for s in sectors(w.offset, w.len) {
            out.extend_from_slice(&sector_content(id, s * ORACLE_SECTOR_BYTES));
        }
        out
    }

    /// Write `id` was acknowledged to the client.
    pub fn acked(&mut self, id: u64) -> Vec<u64> {
        let w = self.writes[&id].clone();
        if !w.tracked {
            return Vec::new();
        }
        let secs: Vec<u64> = sectors(w.offset, w.len).collect();
        for &s in &secs {
            let e = self.acked.entry(s).or_insert(0);
            *e = (*e).max(id);
        }
        secs
    }

    /// Floors for a range (a snapshot taken when a read is submitted).
    pub fn floors(&self, offset: u64, len: u64) -> Floors {
        sectors(offset, len)
            .filter_map(|s| self.acked.get(&s).map(|&f| (s, f)))
            .collect()
    }

    /// Judge the bytes of `[offset, offset+len)` against per-sector floors.
    pub fn check(
        &self,
        offset: u64,
        data: &[u8],
        floors: &Floors,
        what: &str,
    ) -> Result<(), String> {
        for (i, s) in sectors(offset, data.len() as u64).enumerate() {
            let bytes =
                &data[i * ORACLE_SECTOR_BYTES as usize..(i + 1) * ORACLE_SECTOR_BYTES as usize];
            let got = decode_sector(bytes, s * ORACLE_SECTOR_BYTES)
                .map_err(|e| format!("{what}: {e}"))?;
            let floor = floors.get(&s).copied().unwrap_or(0);
            self.judge(s, got, floor)
                .map_err(|e| format!("{what}: sector at byte {}: {e}", s * ORACLE_SECTOR_BYTES))?;
        }
        Ok(())
    }

    fn judge(&self, sector: u64, got: u64, floor: u64) -> Result<(), String> {
        let hist = self.history.get(&sector).map(Vec::as_slice).unwrap_or(&[]);
        if got == 0 {
            // Zeroes: never written, or a zero-write no older than the floor.
            if floor == 0 || hist.iter().any(|&id| id >= floor && self.writes[&id].zero) {
                return Ok(());
            }
            return Err(format!("reads zeroes but write {floor} was acknowledged"));
        }
        if !hist.contains(&got) {
            return Err(format!("holds write {got}, which never covered it"));
        }
        if got < floor {
            return Err(format!(
                "holds write {got}, older than acknowledged/flushed write {floor}"
            ));
        }
        Ok(())
    }

    /// Every touched sector, for whole-disk checks.
    pub fn touched_sectors(&self) -> impl Iterator<Item = u64> + '_ {
        self.history.keys().copied()
    }
}

pub fn sectors(offset: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = offset / ORACLE_SECTOR_BYTES;
    let end = (offset + len).div_ceil(ORACLE_SECTOR_BYTES);
    first..end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oracle_rejects_stale_sector_after_ack_and_accepts_newer() {
        // The oracle must flag an acknowledged write that reads back older.
        let mut o = Oracle::new();
        let a = o.submit(0, 512, false, true);
        let b = o.submit(0, 512, false, true);
        o.acked(b);
        let floors = o.floors(0, 512);
        assert!(o.check(0, &o.data_for(a), &floors, "t").is_err());
        assert!(o.check(0, &o.data_for(b), &floors, "t").is_ok());
        assert!(o.check(0, &[0u8; 512], &floors, "t").is_err());
        let mut bad = o.data_for(b);
        bad[100] ^= 1;
        assert!(o.check(0, &bad, &floors, "t").is_err());
    }
}
