//! A job's checkpoints mirrored into its store, so that any host with the store and the
//! source resumes it (docs/FORMAT.md, "Jobs").
//!
//! The local job database ([`state`](super::state)) stays the fast path: a host that started
//! a job resumes it from there. Beside it, a job writes to the store:
//! - its record `jobs/<id>` when it starts: the source, the disk, the chunk size and the
//!   source's identity, so that another host can tell the job is for the disk it was asked
//!   to replicate; and `jobindex/<id>/<hash>`, the hash (keyed) of the source, so that a host
//!   finds its source's jobs in one listing without reading every job's record;
//! - a record `journal/<id>/part-<random>` for every part the store acknowledged, written by
//!   the uploader before the part counts as acknowledged anywhere: the pack, the upload id,
//!   the part's number, size, ETag and checksum, and the chunk records it carries;
//! - batches of positions `journal/<id>/pos-<random>`: the chunk id found at each disk
//!   position, written every few seconds (a position not recorded is only read again).
//!
//! Every record is sealed like the store's other metadata and written create-only under a
//! random name: the records of one job never need ordering. Whole packs and completed uploads
//! need no record: a pack's id begins with its job's id, so a listing finds them and their
//! trailers say what they hold. A job that finishes or is abandoned removes its record and
//! its journal. Two hosts never write one job at once: a replication holds its disk's lock in
//! the store for the whole run (see `store::lock`), and checks it before it commits.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::state::{JobKey, JobSource};
use crate::error::{ErrorKind, Result};
use crate::store::format::{self, Entry, Id, PackId, hex, unhex, unhex_vec};
use crate::store::{Part, Store, now_unix_ms};

/// Largest number of records read back from one job's journal.
const MAX_RECORDS: usize = 1 << 20;

/// A job's record in the store (`jobs/<id>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredJob {
    pub(crate) job: String,
    /// The source's absolute path.
    pub(crate) source: String,
    /// Which disk of a multi-disk source (empty for a single disk).
    #[serde(default)]
    pub(crate) disk: Option<String>,
    #[serde(default)]
    pub(crate) chunk_size: Option<u32>,
    /// The source's identity and the run's plan when the job started.
    #[serde(default)]
    pub(crate) fingerprint: Option<JobSource>,
    /// The host that started the job.
    #[serde(default)]
    pub(crate) host: Option<String>,
    pub(crate) created_unix_ms: u64,
}

/// A part the store acknowledged, as the journal holds it.
#[derive(Debug, Serialize, Deserialize)]
struct PartRecord {
    pack: String,
    upload_id: String,
    number: u32,
    size: u64,
    etag: String,
    crc32c: String,
    /// The chunk records the part carries (offsets within the part), encoded as in a pack's
    /// trailer, in hex.
    chunks: String,
    /// The pack's last part (its trailer included).
    last: bool,
}

/// Positions of the disk with the chunk ids found there.
#[derive(Debug, Serialize, Deserialize)]
struct PositionsRecord {
    /// Pairs of (position, chunk id in hex).
    positions: Vec<(u64, String)>,
}

/// An open upload of a job, as its journal tells it.
#[derive(Debug, Default)]
pub(crate) struct JournalUpload {
    pub(crate) upload_id: String,
    /// Acknowledged parts by number, each with its chunk records and whether it is the last.
    pub(crate) parts: BTreeMap<u32, (Part, Vec<Entry>, bool)>,
}

/// What a job's journal holds.
#[derive(Debug, Default)]
pub(crate) struct JournalContent {
    pub(crate) positions: Vec<(u64, Id)>,
    /// By pack id.
    pub(crate) uploads: BTreeMap<PackId, JournalUpload>,
    /// Records that could not be read (damaged, or of another key): skipped.
    pub(crate) unreadable: usize,
}

fn record_key(job: &str) -> String {
    format!("jobs/{job}")
}

fn journal_prefix(job: &str) -> String {
    format!("journal/{job}/")
}

/// The hash that names a job's source (path, disk of it, chunk size) in `jobindex/<job>/<hash>`,
/// keyed like disk names' (no path shows): a host looking for a job to take up reads only the
/// records of its source's jobs, found in one listing.
fn source_hash(store: &Store, key: &JobKey) -> String {
    let of = format!("job\0{}\0{}\0{}", key.source, key.disk, key.chunk_size);
    store.disk_hash(&of)
}

/// Records in the store that job `key`'s job `job` is under way: a cleanup on any host
/// leaves its open uploads alone, and another host can resume it.
pub(crate) fn record_job(store: &Store, job: &str, key: &JobKey, source: &JobSource) -> Result<()> {
    let record = StoredJob {
        job: job.to_owned(),
        source: key.source.clone(),
        disk: Some(key.disk.clone()),
        chunk_size: Some(key.chunk_size),
        fingerprint: Some(source.clone()),
        host: Some(crate::store::lock::host_name()),
        created_unix_ms: now_unix_ms(),
    };
    let index = format!("jobindex/{job}/{}", source_hash(store, key));
    let key = record_key(job);
    let sealed = store.seal_record(&key, &record, "a job record")?;
    for (k, bytes) in [(key.as_str(), sealed.as_slice()), (index.as_str(), &[][..])] {
        match crate::store::create_object(store.backend().as_ref(), k, bytes)? {
            crate::store::PutOutcome::Written | crate::store::PutOutcome::AlreadyExists => {}
        }
    }
    Ok(())
}

/// Whether the store still records job `job` (another host may have finished or abandoned
/// it).
pub(crate) fn is_recorded(store: &Store, job: &str) -> Result<bool> {
    match store.backend().size(&record_key(job)) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The unfinished jobs the store records that match `key` (same source, disk and chunk
/// size), newest first. Records this version cannot read are skipped.
pub(crate) fn find_recorded(store: &Store, key: &JobKey) -> Result<Vec<StoredJob>> {
    let mut out = Vec::new();
    let hash = source_hash(store, key);
    for listed in store.backend().list("jobindex/")? {
        let Some((id, of)) = listed
            .strip_prefix("jobindex/")
            .and_then(|rest| rest.split_once('/'))
        else {
            continue;
        };
        if of != hash || id.len() != 16 || unhex::<8>(id).is_none() {
            continue;
        }
        let k = record_key(id);
        let record: StoredJob = match store.read_record(&k, "a job record") {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::warn!(object = k, "skipping a job record that cannot be read: {e}");
                continue;
            }
        };
        if record.job == id
            && record.source == key.source
            && record.disk.as_deref() == Some(key.disk.as_str())
            && record.chunk_size == Some(key.chunk_size)
            && record.fingerprint.is_some()
        {
            out.push(record);
        }
    }
    out.sort_by_key(|r| std::cmp::Reverse(r.created_unix_ms));
    Ok(out)
}

/// Removes the store's record of a job and its journal (the job finished or was abandoned).
/// The record goes first: no host takes up a job whose record is gone, so a journal that a
/// failure left behind is only litter, which a garbage collection removes.
pub(crate) fn forget_job(backend: &dyn crate::store::ObjectStore, job: &str) -> Result<()> {
    backend.delete(&record_key(job))?;
    for key in backend.list(&journal_prefix(job))? {
        backend.delete(&key)?;
    }
    for key in backend.list(&format!("jobindex/{job}/"))? {
        backend.delete(&key)?;
    }
    Ok(())
}

/// Journal records and source listings whose job the store no longer records (left by a
/// failure while the job was being forgotten): nothing reads them, and a garbage collection
/// deletes them.
pub(crate) fn orphan_records(backend: &dyn crate::store::ObjectStore) -> Result<Vec<String>> {
    let recorded: HashSet<String> = backend
        .list("jobs/")?
        .into_iter()
        .filter_map(|k| k.strip_prefix("jobs/").map(str::to_owned))
        .collect();
    let journal = backend.list("journal/")?.into_iter().filter(|k| {
        k.strip_prefix("journal/")
            .and_then(|rest| rest.split('/').next())
            .is_some_and(|job| !recorded.contains(job))
    });
    let index = backend.list("jobindex/")?.into_iter().filter(|k| {
        k.strip_prefix("jobindex/")
            .and_then(|rest| rest.split('/').next())
            .is_some_and(|job| !recorded.contains(job))
    });
    Ok(journal.chain(index).collect())
}

fn put_record<T: Serialize>(store: &Store, job: &str, kind: &str, value: &T) -> Result<()> {
    let key = format!(
        "{}{kind}-{}",
        journal_prefix(job),
        hex(&crate::store::crypto::random::<8>()?)
    );
    let sealed = store.seal_record(&key, value, "a journal record")?;
    store.put_new(&key, &sealed)
}

/// Records a part the store acknowledged (see the module's documentation).
pub(crate) fn record_part(
    store: &Store,
    job: &str,
    pack: &PackId,
    upload_id: &str,
    part: &Part,
    chunks: &[Entry],
    last: bool,
) -> Result<()> {
    let mut blob = Vec::with_capacity(chunks.len() * format::ENTRY_BYTES);
    format::encode_entries(chunks, &mut blob);
    let record = PartRecord {
        pack: hex(pack),
        upload_id: upload_id.to_owned(),
        number: part.number,
        size: part.size,
        etag: part.etag.clone(),
        crc32c: part.crc32c.clone(),
        chunks: hex(&blob),
        last,
    };
    put_record(store, job, "part", &record)
}

/// Records positions with their chunk ids.
pub(crate) fn record_positions(store: &Store, job: &str, positions: &[(u64, Id)]) -> Result<()> {
    if positions.is_empty() {
        return Ok(());
    }
    let record = PositionsRecord {
        positions: positions.iter().map(|(i, id)| (*i, hex(id))).collect(),
    };
    put_record(store, job, "pos", &record)
}

/// Reads job `job`'s journal. A record that cannot be opened or makes no sense is skipped
/// and counted (what it described is sent again); a listing or a read that fails is an error.
pub(crate) fn read_journal(store: &Store, job: &str) -> Result<JournalContent> {
    let mut out = JournalContent::default();
    let keys = store.backend().list(&journal_prefix(job))?;
    if keys.len() > MAX_RECORDS {
        return Err(crate::error::Error::corrupt(
            &journal_prefix(job),
            format!(
                "the job's journal holds {} records, more than {MAX_RECORDS}",
                keys.len()
            ),
        ));
    }
    let mut seen_parts: HashSet<(PackId, u32)> = HashSet::new();
    for key in keys {
        let name = key.rsplit('/').next().unwrap_or_default();
        if name.starts_with("part-") {
            let Some(record) = read_or_skip::<PartRecord>(store, &key, &mut out.unreadable)? else {
                continue;
            };
            let pack = unhex::<{ std::mem::size_of::<PackId>() }>(&record.pack);
            let chunks = unhex_vec(&record.chunks).and_then(|b| format::decode_entries(&b));
            let (Some(pack), Some(chunks)) = (pack, chunks) else {
                out.unreadable += 1;
                continue;
            };
            if !pack.starts_with(&unhex::<8>(job).unwrap_or_default()) || record.number == 0 {
                out.unreadable += 1;
                continue;
            }
            if !seen_parts.insert((pack, record.number)) {
                continue;
            }
            let upload = out.uploads.entry(pack).or_default();
            if upload.upload_id.is_empty() {
                upload.upload_id.clone_from(&record.upload_id);
            } else if upload.upload_id != record.upload_id {
                out.unreadable += 1;
                continue;
            }
            upload.parts.insert(
                record.number,
                (
                    Part {
                        number: record.number,
                        size: record.size,
                        etag: record.etag,
                        crc32c: record.crc32c,
                    },
                    chunks,
                    record.last,
                ),
            );
        } else if name.starts_with("pos-") {
            let Some(record) = read_or_skip::<PositionsRecord>(store, &key, &mut out.unreadable)?
            else {
                continue;
            };
            for (idx, id) in record.positions {
                match unhex::<32>(&id) {
                    Some(id) => out.positions.push((idx, id)),
                    None => out.unreadable += 1,
                }
            }
        }
    }
    Ok(out)
}

/// A journal record, or `None` (counted in `unreadable`) when it cannot be opened (damaged,
/// sealed for another key) or is gone; other failures (the store's) are errors.
fn read_or_skip<T: serde::de::DeserializeOwned>(
    store: &Store,
    key: &str,
    unreadable: &mut usize,
) -> Result<Option<T>> {
    match store.read_record(key, "a journal record") {
        Ok(r) => Ok(Some(r)),
        Err(e) if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::NotFound) => {
            tracing::warn!(object = key, "skipping a journal record: {e}");
            *unreadable += 1;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The packs of job `job` in the store (complete objects): their ids begin with the job's.
pub(crate) fn job_packs(store: &Store, job: &str) -> Result<Vec<PackId>> {
    let Some(prefix) = unhex::<8>(job) else {
        return Ok(Vec::new());
    };
    let listed = store
        .backend()
        .list(&format!("packs/{}/{job}", &job[..2]))?;
    Ok(listed
        .iter()
        .filter_map(|k| k.rsplit('/').next())
        .filter_map(unhex::<{ std::mem::size_of::<PackId>() }>)
        .filter(|p| p.starts_with(&prefix))
        .collect())
}

/// The multipart uploads of job `job`'s packs the store holds open: (pack, upload id).
pub(crate) fn job_uploads(store: &Store, job: &str) -> Result<Vec<(PackId, String)>> {
    let Some(prefix) = unhex::<8>(job) else {
        return Ok(Vec::new());
    };
    Ok(store
        .backend()
        .list_uploads()?
        .into_iter()
        .filter(|u| u.key.starts_with("packs/"))
        .filter_map(|u| {
            let pack = unhex::<{ std::mem::size_of::<PackId>() }>(u.key.rsplit('/').next()?)?;
            pack.starts_with(&prefix).then_some((pack, u.upload_id))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::job::state::SourceFile;
    use crate::store::mem::MemStore;
    use crate::store::{InitOptions, ObjectStore, SourceFingerprint};

    fn store() -> (Arc<MemStore>, Store) {
        let mem = Arc::new(MemStore::new());
        Store::init_backend(
            mem.as_ref(),
            &InitOptions {
                chunk_size: 64 << 10,
                passphrase: Some(b"pass".to_vec()),
            },
        )
        .unwrap();
        let store = Store::open_backend(mem.clone(), Some(b"pass")).unwrap();
        (mem, store)
    }

    fn key(source: &str) -> JobKey {
        JobKey {
            store: "mem".to_owned(),
            store_id: "id".to_owned(),
            source: source.to_owned(),
            disk: String::new(),
            chunk_size: 64 << 10,
        }
    }

    #[test]
    fn a_journal_reads_back_what_was_recorded_and_skips_what_makes_no_sense() {
        let (mem, store) = store();
        let job = "0011223344556677";
        let fp = JobSource {
            top: SourceFingerprint {
                size: 1 << 20,
                modified_unix_ns: 5,
                device: 1,
                inode: 2,
            },
            others: vec![SourceFile {
                path: "/parent".to_owned(),
                fingerprint: SourceFingerprint::default(),
            }],
            plan: "plan".to_owned(),
        };
        record_job(&store, job, &key("/disk.raw"), &fp).unwrap();
        let mut pack = [7u8; 16];
        pack[..8].copy_from_slice(&unhex::<8>(job).unwrap());
        let entry = Entry {
            id: [9; 32],
            offset: 24,
            stored_len: 100,
            raw_len: 200,
        };
        let part = Part {
            number: 1,
            size: 5 << 20,
            etag: "\"e\"".to_owned(),
            crc32c: "c".to_owned(),
        };
        record_part(&store, job, &pack, "up", &part, &[entry], false).unwrap();
        // A part of a pack that is not the job's is not believed.
        record_part(&store, job, &[1; 16], "up", &part, &[entry], false).unwrap();
        record_positions(&store, job, &[(3, [9; 32]), (4, [0; 32])]).unwrap();
        // A record sealed for another key (moved there) cannot be opened: skipped.
        let keys = mem.list("journal/").unwrap();
        let moved = mem.get(&keys[0], 1 << 20).unwrap();
        mem.put(
            &format!("journal/{job}/part-ffffffffffffffff"),
            &moved,
            crate::store::PutMode::Create,
        )
        .unwrap();

        let found = find_recorded(&store, &key("/disk.raw")).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].fingerprint.as_ref(), Some(&fp));
        assert!(
            find_recorded(&store, &key("/other.raw"))
                .unwrap()
                .is_empty()
        );
        let content = read_journal(&store, job).unwrap();
        assert_eq!(content.positions, vec![(3, [9; 32]), (4, [0; 32])]);
        assert_eq!(content.unreadable, 2);
        let upload = &content.uploads[&pack];
        assert_eq!(upload.upload_id, "up");
        assert_eq!(upload.parts[&1], (part, vec![entry], false));

        // Forgetting the record first leaves the journal and the listing orphans, which gc
        // finds.
        mem.delete(&record_key(job)).unwrap();
        assert_eq!(orphan_records(mem.as_ref()).unwrap().len(), 5);
        assert!(!is_recorded(&store, job).unwrap());
        record_job(&store, job, &key("/disk.raw"), &fp).unwrap();
        assert!(orphan_records(mem.as_ref()).unwrap().is_empty());
        forget_job(mem.as_ref(), job).unwrap();
        for prefix in ["journal/", "jobs/", "jobindex/"] {
            assert!(mem.list(prefix).unwrap().is_empty(), "{prefix}");
        }
    }
}
