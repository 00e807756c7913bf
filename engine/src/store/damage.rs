//! Known damage and its repair: records of damaged chunk copies and snapshots, and index
//! objects rebuilt from the packs.
//!
//! A damage record (`damaged/<16 hex>`, sealed like a manifest) lists chunk copies found
//! damaged (a chunk id and the pack holding the bad copy) and snapshots whose manifest or
//! pages cannot be read. The chunk index leaves the listed copies out, so the next
//! replication of a disk holding that data stores it again (and every snapshot referencing
//! the chunk reads the good copy from then on); a garbage collection neither keeps a listed
//! copy as a chunk's home nor stops at a listed snapshot.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::format::{Id, PackId, hex, unhex};
use super::repo::{Store, now_unix_ms, pack_key};
use crate::error::{Error, ErrorKind, Result};

/// One damage record's content.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct DamageRecord {
    /// Damaged chunk copies: `[chunk id hex, pack id hex]`.
    #[serde(default)]
    pub chunks: Vec<(String, String)>,
    /// Snapshots whose manifest or pages cannot be read.
    #[serde(default)]
    pub snapshots: Vec<String>,
    /// When it was written.
    pub created_unix_ms: u64,
}

/// Every damage the store's records list.
#[derive(Debug, Clone, Default)]
pub struct Damage {
    /// Damaged chunk copies (chunk id, pack).
    pub chunks: HashSet<(Id, PackId)>,
    /// Snapshot ids.
    pub snapshots: HashSet<String>,
    /// The record objects, by key.
    pub keys: Vec<String>,
}

impl Damage {
    /// Whether the copy of chunk `id` in `pack` is known to be damaged.
    pub fn chunk(&self, id: &Id, pack: &PackId) -> bool {
        !self.chunks.is_empty() && self.chunks.contains(&(*id, *pack))
    }
}

/// What a repair did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepairReport {
    /// Index objects that could not be read and were replaced.
    pub index_objects_replaced: u64,
    /// Packs indexed anew from their trailers.
    pub packs_reindexed: u64,
    /// Damaged chunk copies recorded (the next replication stores their data again).
    pub chunks_recorded: u64,
    /// Snapshots recorded as damaged (a garbage collection goes on without them).
    pub snapshots_recorded: u64,
}

impl Store {
    /// Every damage record of the store. One that cannot be read is left out, warned: the
    /// damage it listed is then found again (chunks are checked against their ids on read).
    pub fn damage(&self) -> Result<Damage> {
        let mut out = Damage::default();
        for key in self.backend().list("damaged/")? {
            let rec = match self.read_damage_record(&key) {
                Ok(rec) => rec,
                Err(e) if e.kind() == ErrorKind::Store => return Err(e),
                Err(e) => {
                    tracing::warn!("an unreadable damage record is left out: {e}");
                    continue;
                }
            };
            for (c, p) in &rec.chunks {
                let (Some(c), Some(p)) = (unhex::<32>(c), unhex::<16>(p)) else {
                    return Err(Error::corrupt(&key, "damage record names an invalid id"));
                };
                out.chunks.insert((c, p));
            }
            out.snapshots.extend(rec.snapshots);
            out.keys.push(key);
        }
        Ok(out)
    }

    fn read_damage_record(&self, key: &str) -> Result<DamageRecord> {
        self.read_record(key, "damage record")
    }

    /// Writes a damage record (nothing if it lists nothing).
    pub fn record_damage(&self, chunks: &[(Id, PackId)], snapshots: &[String]) -> Result<()> {
        if chunks.is_empty() && snapshots.is_empty() {
            return Ok(());
        }
        let rec = DamageRecord {
            chunks: chunks.iter().map(|(c, p)| (hex(c), hex(p))).collect(),
            snapshots: snapshots.to_vec(),
            created_unix_ms: now_unix_ms(),
        };
        let key = format!("damaged/{}", hex(&super::crypto::random::<8>()?));
        let sealed = self.seal_record(&key, &rec, "a damage record")?;
        self.put_new(&key, &sealed)
    }

    /// Replaces index objects that cannot be read: every pack no readable index object lists
    /// is indexed anew from its trailer (an index object is written), then the unreadable
    /// objects are deleted. Returns (objects replaced, packs indexed).
    pub fn rebuild_index(&self) -> Result<(u64, u64)> {
        let mut listed: HashSet<PackId> = HashSet::new();
        let mut damaged = Vec::new();
        for key in self.backend().list("index/")? {
            match self.read_index_object(&key) {
                Ok(packs) => listed.extend(packs.into_iter().map(|(p, _)| p)),
                Err(e) if matches!(e.kind(), ErrorKind::Corrupt) => damaged.push(key),
                Err(e) => return Err(e),
            }
        }
        if damaged.is_empty() {
            return Ok((0, 0));
        }
        let mut fresh = Vec::new();
        for key in self.backend().list("packs/")? {
            let Some(id) = key.rsplit('/').next().and_then(unhex::<16>) else {
                continue;
            };
            if listed.contains(&id) || pack_key(&id) != key {
                continue;
            }
            match self.read_pack_entries(&id) {
                Ok((entries, _)) => fresh.push((id, entries)),
                // A pack whose trailer is damaged too: its chunks are lost to the index (the
                // next replication stores their data again).
                Err(e) if e.kind() == ErrorKind::Corrupt => {
                    tracing::warn!("a pack cannot be indexed: {e}");
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let packs = fresh.len() as u64;
        for batch in fresh.chunks(1024) {
            self.write_index(batch)?;
        }
        for key in &damaged {
            self.backend().delete(key)?;
        }
        Ok((damaged.len() as u64, packs))
    }
}
