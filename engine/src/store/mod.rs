//! The repository: store format v1 on an [`ObjectStore`] backend.
//!
//! ```text
//!   Store (repo.rs)  config, keys, index, pages, snapshots    ← knows the format
//!     │  format.rs   byte layouts (blobs, packs, envelopes)
//!     │  crypto.rs   master key, HKDF, AES-256-GCM, argon2id
//!     ▼
//!   dyn ObjectStore  opaque bytes under keys                  ← knows nothing of disks
//!     ├─ LocalStore  (local.rs) a folder, atomic writes
//!     └─ S3Store     (s3.rs) a bucket prefix through aws-sdk-s3 (feature `s3`)
//! ```
//!
//! The backend moves opaque bytes under keys; it knows nothing of disks or formats.

#![forbid(unsafe_code)]

pub(crate) mod audit;
pub mod crypto;
mod damage;
pub mod format;
pub(crate) mod gc;
mod history;
pub(crate) mod local;
pub(crate) mod lock;
pub mod mem;
pub(crate) mod prune;
mod repo;
#[cfg(feature = "s3")]
pub(crate) mod s3;

pub use damage::{Damage, RepairReport};
pub use history::{DiskHistory, SourceIdentity};
pub use repo::{
    ChangeRecord, ChunkIndex, ChunkLocation, DiskMeta, Encryption, SnapshotStats, SourceFingerprint,
};
pub use repo::{
    DEFAULT_CHUNK_SIZE, InitOptions, Snapshot, SnapshotSummary, Store, StoreConfig, StoreSummary,
    pin_location,
};
pub(crate) use repo::{IdHash, now_unix_ms, pack_key, read_store_id};

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// How [`ObjectStore::put`] treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Write only if no object has the key (S3: `If-None-Match: *`).
    Create,
    /// Replace any existing object atomically.
    Overwrite,
}

/// What [`ObjectStore::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was written.
    Written,
    /// [`PutMode::Create`] found an object under the key and left it alone.
    AlreadyExists,
}

/// A part of a multipart upload, as the store acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Part number, from 1.
    pub number: u32,
    /// Size in bytes.
    pub size: u64,
    /// The tag the store gave the part (S3: its ETag).
    pub etag: String,
    /// CRC-32C of the part, base64 as S3 carries it; the store checked the bytes against it.
    pub crc32c: String,
}

/// A multipart upload the store holds open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The object key it will create.
    pub key: String,
    /// The store's id of the upload.
    pub upload_id: String,
    /// When it was started, in milliseconds since the Unix epoch, if the store says.
    pub initiated_unix_ms: Option<u64>,
}

/// How a backend that writes large objects as multipart uploads wants its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartRules {
    /// Smallest part but the last (S3: 5 MiB).
    pub min_part: u64,
    /// Largest part (S3: 5 GiB).
    pub max_part: u64,
    /// Most parts in one upload (S3: 10,000).
    pub max_parts: u32,
}

impl PartRules {
    /// The rules of Amazon S3.
    pub const S3: PartRules = PartRules {
        min_part: 5 << 20,
        max_part: 5 << 30,
        max_parts: 10_000,
    };
}

fn no_multipart(location: &str) -> Error {
    Error::internal(format!("{location} does not take multipart uploads"))
}

/// A flat namespace of immutable objects: the only thing a store backend provides.
///
/// Contract: `put` is atomic (readers see the whole object or none) and durable when it
/// returns; keys are `/`-separated lowercase ASCII (`check_key` checks them); all methods may be
/// called from several threads at once.
pub trait ObjectStore: Send + Sync + Debug {
    /// Where the store lives, for messages (a path or URL).
    fn location(&self) -> String;
    /// Bytes that can still be written, where the backend has a fixed capacity (a local
    /// file system); `None` where it has none (object storage).
    fn free_bytes(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Stores `data` under `key`, create-only, under Object Lock retention until
    /// `until_unix_ms` (compliance mode, or governance): only S3 buckets with Object Lock
    /// can; others refuse.
    fn put_retained(
        &self,
        key: &str,
        data: &[u8],
        until_unix_ms: u64,
        compliance: bool,
    ) -> Result<PutOutcome> {
        let _ = (key, data, until_unix_ms, compliance);
        Err(audit::no_retention(&self.location()))
    }
    /// Stores `data` under `key`.
    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<PutOutcome>;
    /// Reads a whole object; a missing one is [`ErrorKind::NotFound`], one larger than
    /// `max_len` bytes is [`ErrorKind::Corrupt`] (and is not read).
    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>>;
    /// Reads `len` bytes at `offset` of an object into `buf` (replacing its contents); a range
    /// past the end is [`ErrorKind::Corrupt`] (the object is truncated).
    fn get_range(&self, key: &str, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()>;
    /// Lists the keys under a prefix (`"snapshots/"`), sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Lists the keys under a prefix with each object's size, sorted by key.
    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for key in self.list(prefix)? {
            match self.size(&key) {
                Ok(size) => out.push((key, size)),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
    /// Lists the keys under a prefix with when each object was last written, by the store's
    /// own clock (S3: `LastModified`; a folder: the file's modification time), in
    /// milliseconds since the Unix epoch, where the backend knows it.
    fn list_modified(&self, prefix: &str) -> Result<Vec<(String, Option<u64>)>> {
        Ok(self.list(prefix)?.into_iter().map(|k| (k, None)).collect())
    }
    /// Size of an object in bytes.
    fn size(&self, key: &str) -> Result<u64>;
    /// Deletes an object; deleting a missing one is not an error.
    fn delete(&self, key: &str) -> Result<()>;

    /// The part rules when this backend writes large objects as multipart uploads (whose
    /// parts become durable one by one); `None` when it writes whole objects only.
    fn multipart(&self) -> Option<PartRules> {
        None
    }
    /// Starts a multipart upload that will create `key`; returns its upload id.
    fn create_upload(&self, key: &str) -> Result<String> {
        let _ = key;
        Err(no_multipart(&self.location()))
    }
    /// Uploads one part; the store checks the bytes against their CRC-32C in transit.
    /// Uploading a number again replaces that part.
    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        data: bytes::Bytes,
    ) -> Result<Part> {
        let _ = (key, upload_id, number, data);
        Err(no_multipart(&self.location()))
    }
    /// The parts the store holds for an upload, by number (every page of the listing).
    fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<Part>> {
        let _ = (key, upload_id);
        Err(no_multipart(&self.location()))
    }
    /// Assembles `parts` (ascending numbers, gaps allowed) into the object and checks that it
    /// exists with their total size afterwards. An upload the store already completed (its
    /// answer lost on the way) is recognised, not assembled twice.
    fn complete_upload(&self, key: &str, upload_id: &str, parts: &[Part]) -> Result<()> {
        let _ = (key, upload_id, parts);
        Err(no_multipart(&self.location()))
    }
    /// Aborts an upload and frees its parts; a missing upload is not an error.
    fn abort_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        let _ = (key, upload_id);
        Err(no_multipart(&self.location()))
    }
    /// The multipart uploads open under this store.
    fn list_uploads(&self) -> Result<Vec<Upload>> {
        Ok(Vec::new())
    }
    /// How an S3 backend was opened (other objects on S3 are reached the same way).
    fn s3_options(&self) -> Option<&S3Options> {
        None
    }
}

/// Writes a new object with [`PutMode::Create`]. An object already under the key that holds
/// exactly `data` is our own write, whose answer was lost and which the client retried (the
/// retry then finds it): that is [`PutOutcome::Written`], not a collision.
pub(crate) fn create_object(
    backend: &dyn ObjectStore,
    key: &str,
    data: &[u8],
) -> Result<PutOutcome> {
    match backend.put(key, data, PutMode::Create)? {
        PutOutcome::Written => Ok(PutOutcome::Written),
        PutOutcome::AlreadyExists => match backend.get(key, data.len() as u64) {
            Ok(existing) if existing == data => {
                tracing::info!(object = key, "a write whose answer was lost had landed");
                Ok(PutOutcome::Written)
            }
            // Larger than ours, or gone again: not ours.
            Ok(_) => Ok(PutOutcome::AlreadyExists),
            Err(e) if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::NotFound) => {
                Ok(PutOutcome::AlreadyExists)
            }
            Err(e) => Err(e),
        },
    }
}

/// Checks that a key is a relative path of safe components (`[a-z0-9._-]`, no `.`/`..`).
pub(crate) fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 512
        && key.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Internal,
            format!("invalid object key {key:?}"),
        ))
    }
}

/// How to reach S3. Every field left `None` comes from the standard AWS configuration chain
/// (environment, profile files, instance metadata).
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Endpoint URL of an S3-compatible service (else `AWS_ENDPOINT_URL` or AWS itself).
    pub endpoint: Option<String>,
    /// Region (else the chain's; `us-east-1` when nothing names one).
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); `None` picks it for custom endpoints.
    pub path_style: Option<bool>,
    /// Attempts per request, the first included, for a running job. The default (40, with
    /// backoff growing to 20 s) rides out an outage of about five minutes.
    pub max_attempts: u32,
    /// Time limit of one attempt of one request.
    pub attempt_timeout: Duration,
    /// Time limit of one request over all its attempts: the deadline budget.
    pub operation_timeout: Duration,
    /// Time limit for opening a connection.
    pub connect_timeout: Duration,
    /// Access key id and secret key to use instead of the AWS chain (for embedding callers
    /// that hold credentials themselves).
    pub static_credentials: Option<(String, String)>,
    /// Smallest part size to use instead of S3's 5 MiB, for services that take smaller parts
    /// (tests of 10,000-part uploads use it); AWS refuses smaller parts at completion.
    pub min_part_size: Option<u64>,
    /// A PEM file of the certificate authorities to trust for HTTPS instead of the system's
    /// (else `AWS_CA_BUNDLE`, as other AWS tools read it, else the system's).
    pub ca_bundle: Option<std::path::PathBuf>,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: None,
            path_style: None,
            max_attempts: 40,
            attempt_timeout: Duration::from_secs(300),
            operation_timeout: Duration::from_secs(1800),
            connect_timeout: Duration::from_secs(5),
            min_part_size: None,
            static_credentials: None,
            ca_bundle: None,
        }
    }
}

/// Opens the backend named by a store location: `s3://BUCKET/PREFIX` or a local folder
/// (created if `create`). `s3` configures the S3 client.
pub fn open_backend(location: &str, create: bool, s3: &S3Options) -> Result<Arc<dyn ObjectStore>> {
    if location.starts_with("s3://") {
        #[cfg(feature = "s3")]
        return Ok(Arc::new(s3::S3Store::open(location, s3)?));
        #[cfg(not(feature = "s3"))]
        return Err(Error::config(format!(
            "{location:?}: this build has no S3 support (build with the `s3` feature)"
        )));
    }
    if location.contains("://") {
        return Err(Error::config(format!(
            "unsupported store location {location:?}: give a local folder or s3://BUCKET/PREFIX"
        )));
    }
    let _ = s3;
    let path = Path::new(location);
    let store = if create {
        local::LocalStore::create(path)?
    } else {
        local::LocalStore::open(path)?
    };
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_store_is_create_only_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let store = local::LocalStore::create(dir.path()).unwrap();
        assert_eq!(
            store.put("a/b", b"one", PutMode::Create).unwrap(),
            PutOutcome::Written
        );
        assert_eq!(
            store.put("a/b", b"two", PutMode::Create).unwrap(),
            PutOutcome::AlreadyExists
        );
        assert_eq!(store.get("a/b", 3).unwrap(), b"one");
        let e = store.get("a/b", 2).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(store.get("a/c", 9).unwrap_err().kind(), ErrorKind::NotFound);
        let mut buf = Vec::new();
        store.get_range("a/b", 1, 2, &mut buf).unwrap();
        assert_eq!(buf, b"ne");
        assert_eq!(
            store.get_range("a/b", 2, 5, &mut buf).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        store.put("a/b", b"three", PutMode::Overwrite).unwrap();
        assert_eq!(store.get("a/b", 9).unwrap(), b"three");
        assert_eq!(store.list("a/").unwrap(), vec!["a/b".to_owned()]);
        assert!(store.list("zz/").unwrap().is_empty());
        store.delete("a/b").unwrap();
        store.delete("a/b").unwrap();
        // Nothing is left in tmp/ by successful writes.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn large_objects_written_past_the_page_cache_read_back_exactly() {
        // O_DIRECT on the disk's file system; tmpfs (/dev/shm) either supports it or makes
        // the store fall back to buffered writes: both must give the same bytes, from
        // unaligned memory (staged) and from aligned memory (written as it is).
        let shm = std::path::Path::new("/dev/shm");
        let dirs = [
            Some(tempfile::tempdir().unwrap()),
            shm.is_dir().then(|| tempfile::tempdir_in(shm).unwrap()),
        ];
        for dir in dirs.iter().flatten() {
            let store = local::LocalStore::create(dir.path()).unwrap();
            let mut state = 0x9e37_79b9_u32;
            for (i, len) in [
                1 << 20,
                (1 << 20) + 1,
                (4 << 20) + 4095,
                8 << 20,
                (9 << 20) + 123,
            ]
            .into_iter()
            .enumerate()
            {
                let data: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 17;
                        state ^= state << 5;
                        state.to_le_bytes()[0]
                    })
                    .collect();
                let key = format!("packs/{i}");
                store.put(&key, &data, PutMode::Create).unwrap();
                assert!(store.get(&key, len as u64).unwrap() == data, "{len} bytes");
                store
                    .put(&key, &data[..len - 1], PutMode::Overwrite)
                    .unwrap();
                assert!(store.get(&key, len as u64).unwrap() == data[..len - 1]);
                // From an aligned buffer (a replication's packs), written without staging.
                let mut aligned = crate::io::sys::AlignedBuf::new(len);
                aligned.set_len(len);
                aligned.copy_from_slice(&data);
                let key = format!("packs/aligned-{i}");
                store.put(&key, &aligned, PutMode::Create).unwrap();
                assert!(
                    store.get(&key, len as u64).unwrap() == data,
                    "aligned {len} bytes"
                );
            }
            assert_eq!(
                std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
                0
            );
        }
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("packs/ab/abcdef").is_ok());
        assert!(check_key("config").is_ok());
        for bad in [
            "", "/abs", "a//b", "../x", "a/./b", "A", "a b", "a\0b", "snap/",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
    }
}
