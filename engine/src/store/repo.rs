//! [`Store`]: an unlocked repository, with the operations every pipeline needs.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::crypto::{self, KEY_LEN, KdfParams, Keys, Sealer};
use super::format::{
    self, Entry, Id, MetaKind, PAGE_ENTRIES, PackId, ZERO_ID, hex, unhex, unhex_vec,
};
use super::{ObjectStore, PutMode, PutOutcome, S3Options, create_object, open_backend};
use crate::error::{Error, ErrorKind, Result};

/// Smallest chunk size a store accepts.
pub(crate) const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size a store accepts.
pub(crate) const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Chunk size of new stores unless asked otherwise.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

const CONFIG_KEY: &str = "config";
/// The store format this version writes (the config's `version`): 2 authenticates the config
/// and keys snapshots by disk and sequence (docs/FORMAT.md).
pub(crate) const STORE_VERSION: u16 = 2;
/// Largest config object read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest metadata object read (the envelope caps of format.rs, plus framing and slack for
/// incompressible payloads).
pub(super) const MAX_META_BYTES: u64 = (256 << 20) + 4096;
const FORMAT_NAME: &str = "blockferry-store";

/// The store's `config` object (plaintext JSON; see docs/FORMAT.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreConfig {
    /// Always `"blockferry-store"`.
    pub format: String,
    /// Store format version.
    pub version: u16,
    /// 16 random bytes, hex: the HKDF salt of every derived key.
    pub store_id: String,
    /// Chunk size in bytes (power of two, 64 KiB..16 MiB).
    pub chunk_size: u32,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// How the master key is kept.
    pub encryption: Encryption,
    /// HMAC-SHA256 (hex) of the config without this field, under a key derived from the
    /// master key (format 2; a format-1 config has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl StoreConfig {
    /// The bytes the MAC covers: the config without its MAC, serialised in field order.
    fn canonical(&self) -> Result<Vec<u8>> {
        let mut c = self.clone();
        c.mac = None;
        serde_json::to_vec(&c).map_err(|e| Error::internal("encoding store config").with_source(e))
    }

    /// Whether the store keeps chunks and metadata encrypted.
    pub fn encrypted(&self) -> bool {
        matches!(self.encryption, Encryption::Aes256Gcm { .. })
    }
}

/// A store as every front end describes it (`blockferry init --json`, Python's
/// `Store.config`, `Store.create`'s result).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreSummary {
    /// Where the store lives (a folder or `s3://bucket/prefix`).
    pub location: String,
    /// Its id (the HKDF salt of every derived key), hex.
    pub store_id: String,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Whether chunks and metadata are encrypted.
    pub encrypted: bool,
    /// Store format version.
    pub format_version: u16,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

impl StoreSummary {
    /// The summary of the store at `location` whose config is `c`.
    pub fn new(location: &str, c: &StoreConfig) -> StoreSummary {
        StoreSummary {
            location: location.to_owned(),
            store_id: c.store_id.clone(),
            chunk_size: c.chunk_size,
            encrypted: c.encrypted(),
            format_version: c.version,
            created_unix_ms: c.created_unix_ms,
        }
    }
}

/// How a store keeps its master key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Encryption {
    /// Unencrypted store: the master key (used only to key chunk ids) is kept in the clear.
    None {
        /// The master key, hex.
        master_key: String,
    },
    /// AES-256-GCM; the master key is wrapped under an argon2id passphrase key.
    Aes256Gcm {
        /// Argon2id parameters.
        kdf: KdfParams,
        /// Argon2id salt, hex.
        salt: String,
        /// `nonce | sealed master key | tag`, hex.
        wrapped_key: String,
    },
}

/// Options for [`Store::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// The passphrase that will unlock the store; `None` creates an unencrypted store.
    pub passphrase: Option<Vec<u8>>,
}

/// A source's identity at the time it was read, to tell later whether it changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFingerprint {
    /// Size of the file or device in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub modified_unix_ns: i64,
    /// Device number of the file system holding it.
    pub device: u64,
    /// Inode number.
    pub inode: u64,
}

/// What a snapshot records about the disk it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskMeta {
    /// The disk's name in the store: unique per source (format 2), given or derived from the
    /// source's path.
    pub name: String,
    /// The file the disk was read from: its absolute path with links resolved (format 2; as
    /// given in format 1), a VMDK's descriptor rather than its extent.
    pub source: String,
    /// Which disk of a multi-disk source (an OVA's member file), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// The bottom of the source's chain (its base disk), when it was a chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_base: Option<String>,
    /// Source format (`raw`, …).
    pub format: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Logical sector size in bytes.
    pub logical_sector_size: u32,
    /// Physical sector size in bytes.
    pub physical_sector_size: u32,
    /// Bytes the source reported allocated.
    pub allocated_bytes: u64,
    /// Identity of the source file when it was read.
    pub fingerprint: SourceFingerprint,
}

/// Counters recorded with a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes recorded as zero: unallocated, or read and found all zero.
    pub bytes_zero: u64,
    /// Bytes of chunks the store already held.
    pub bytes_deduplicated: u64,
    /// Plaintext bytes of chunks stored by this run.
    pub bytes_new: u64,
    /// Bytes of packs written to the store by this run (chunks compressed and sealed, plus
    /// pack headers and trailers).
    pub bytes_stored: u64,
    /// Chunks stored by this run.
    pub chunks_stored: u64,
    /// Bytes a delta took from its parent snapshot without reading them.
    #[serde(default)]
    pub bytes_unchanged: u64,
}

/// How a delta snapshot was made from its parent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// Where the changes came from: `vmware-cbt`, `hyperv-rct`, `extents` or `hash` (every
    /// chunk read and compared by id).
    pub source: String,
    /// The change id the list was taken against, if it named one.
    #[serde(default)]
    pub base_change_id: Option<String>,
    /// Bytes the list named as changed.
    #[serde(default)]
    pub bytes_listed: u64,
    /// Why the list was not trusted and every chunk was compared instead, if so.
    #[serde(default)]
    pub fallback: Option<String>,
    /// Chunk positions the list called unchanged that were read to check it.
    #[serde(default)]
    pub sample_chunks: u64,
    /// Of those, how many differed from the parent (the change tracking missed writes).
    #[serde(default)]
    pub sample_mismatches: u64,
    /// Chunk position where the next delta's sample starts.
    #[serde(default)]
    pub sample_next: u64,
}

/// A snapshot manifest: the commit point of a replication.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// Snapshot id (16 hex digits).
    pub id: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The disk it is a copy of.
    pub disk: DiskMeta,
    /// Chunk size the chunk map uses.
    pub chunk_size: u32,
    /// Chunk positions per page.
    pub page_entries: u32,
    /// Its place in its disk's history: 1 for the disk's first snapshot, one more for each
    /// after (format 2; 0 for a format-1 snapshot, older than any with a number). Orders a
    /// disk's snapshots whatever the writers' clocks say.
    #[serde(default)]
    pub seq: u64,
    /// The disk's newest snapshot when this one was written (its predecessor), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// The snapshot this one was taken relative to (a delta's base), if any.
    pub parent: Option<String>,
    /// Change-tracking id of the source at this snapshot, if any.
    pub change_id: Option<String>,
    /// How this snapshot was made from its parent (a delta), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<ChangeRecord>,
    /// Page ids (hex) in disk order; `None` for a page of zero chunks.
    pub pages: Vec<Option<String>>,
    /// Counters of the run that made it.
    pub stats: SnapshotStats,
    /// The program that wrote it.
    pub tool: String,
    /// The replication job that made it (format 2; none for a run without a job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

/// What lists of snapshots show of one (the CLI's `snapshots --json`, the bindings): the
/// manifest without its page ids.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    /// Snapshot id.
    pub id: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The disk's name.
    pub disk: String,
    /// The image it was read from.
    pub source: String,
    /// Which disk of a multi-disk image (an OVA member), if any.
    pub member: Option<String>,
    /// Its place in the disk's history (0 for a format-1 snapshot).
    pub seq: u64,
    /// The disk's snapshot before it, if any.
    pub previous: Option<String>,
    /// The image's format.
    pub format: String,
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Chunk size of the chunk map.
    pub chunk_size: u32,
    /// The snapshot it is a delta on, if any.
    pub parent: Option<String>,
    /// Change-tracking id of the source at this snapshot, if any.
    pub change_id: Option<String>,
    /// How it was made from its parent, for a delta.
    pub changes: Option<ChangeRecord>,
    /// Counters of the run that made it.
    pub stats: SnapshotStats,
}

impl Snapshot {
    /// The snapshot as lists show it.
    pub fn summary(&self) -> SnapshotSummary {
        SnapshotSummary {
            id: self.id.clone(),
            created_unix_ms: self.created_unix_ms,
            disk: self.disk.name.clone(),
            source: self.disk.source.clone(),
            member: self.disk.member.clone(),
            seq: self.seq,
            previous: self.previous.clone(),
            format: self.disk.format.clone(),
            virtual_size: self.disk.virtual_size,
            chunk_size: self.chunk_size,
            parent: self.parent.clone(),
            change_id: self.change_id.clone(),
            changes: self.changes.clone(),
            stats: self.stats.clone(),
        }
    }

    /// Number of chunk positions of the disk.
    pub fn n_chunks(&self) -> u64 {
        self.disk.virtual_size.div_ceil(u64::from(self.chunk_size))
    }

    /// The id of page `idx`, `None` for a zero page.
    pub fn page_id(&self, idx: usize) -> Result<Option<Id>> {
        match self.pages.get(idx) {
            Some(Some(h)) => unhex::<32>(h).map(Some).ok_or_else(|| {
                Error::corrupt(
                    &format!("snapshot {}", self.id),
                    format!("page {idx} has an invalid id"),
                )
            }),
            Some(None) => Ok(None),
            None => Err(Error::internal(format!("page {idx} out of range"))),
        }
    }

    /// Checks a manifest read from (or about to be written to) `key`; `expected_key` is
    /// where a manifest of this disk, sequence number and id belongs.
    pub(crate) fn validate(&self, key: &str, expected_key: &str) -> Result<()> {
        let bad = |m: String| Err(Error::corrupt(key, m));
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
            || !self.chunk_size.is_power_of_two()
        {
            return bad(format!("invalid chunk size {}", self.chunk_size));
        }
        if self.page_entries as usize != PAGE_ENTRIES {
            return bad(format!("unsupported page size {}", self.page_entries));
        }
        if self.disk.virtual_size > i64::MAX as u64 {
            return bad(format!(
                "virtual size {} out of range",
                self.disk.virtual_size
            ));
        }
        let want = self.n_chunks().div_ceil(PAGE_ENTRIES as u64);
        if self.pages.len() as u64 != want {
            return bad(format!(
                "has {} pages where its size needs {want}",
                self.pages.len()
            ));
        }
        if key != expected_key {
            return bad(format!(
                "records id {:?}, sequence {} and disk {:?}, which belong elsewhere",
                self.id, self.seq, self.disk.name
            ));
        }
        for i in 0..self.pages.len() {
            self.page_id(i)?;
        }
        Ok(())
    }
}

/// Where a stored chunk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLocation {
    pack: u32,
    /// Offset of the blob in its pack.
    pub offset: u64,
    /// Blob length.
    pub stored_len: u32,
    /// Plaintext length.
    pub raw_len: u32,
}

/// Chunk ids are keyed hashes, uniformly random and secret: their first 8 bytes are a good hash.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

/// Hash maps and sets keyed by chunk or page ids.
pub(crate) type IdHash = BuildHasherDefault<IdHasher>;

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (8 * i);
        }
    }
}

/// Chunk id → location, built from every index object of the store.
#[derive(Default)]
pub struct ChunkIndex {
    packs: Vec<PackId>,
    map: HashMap<Id, ChunkLocation, BuildHasherDefault<IdHasher>>,
    /// Index objects that could not be read (the chunks they list are treated as absent).
    pub damaged: Vec<Error>,
}

impl std::fmt::Debug for ChunkIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkIndex")
            .field("packs", &self.packs.len())
            .field("chunks", &self.map.len())
            .field("damaged", &self.damaged.len())
            .finish()
    }
}

impl ChunkIndex {
    /// Fails if an index object could not be read: one that fails authentication was
    /// altered or damaged, and writing on would store its chunks again and hide it (or,
    /// under a swapped config, write them in clear).
    pub(crate) fn refuse_damage(&self) -> Result<()> {
        let Some(e) = self.damaged.first() else {
            return Ok(());
        };
        let mut err = Error::new(
            e.kind(),
            format!(
                "{e}; {} index object(s) of the store cannot be read: stopping (`blockferry \
                 verify --repair` rebuilds them from the packs)",
                self.damaged.len()
            ),
        );
        if let Some(o) = e.object() {
            err = err.with_object(o);
        }
        Err(err)
    }

    /// Records the entries of one pack.
    pub fn insert_pack(&mut self, pack_id: PackId, entries: &[Entry]) {
        self.insert_pack_except(pack_id, entries, &super::Damage::default());
    }

    /// Records the entries of one pack but the chunk copies `damage` lists.
    pub fn insert_pack_except(
        &mut self,
        pack_id: PackId,
        entries: &[Entry],
        damage: &super::Damage,
    ) {
        let pack = u32::try_from(self.packs.len()).expect("fewer than 2^32 packs");
        self.packs.push(pack_id);
        for e in entries.iter().filter(|e| !damage.chunk(&e.id, &pack_id)) {
            self.map.entry(e.id).or_insert(ChunkLocation {
                pack,
                offset: e.offset,
                stored_len: e.stored_len,
                raw_len: e.raw_len,
            });
        }
    }

    /// Whether the store holds a chunk.
    pub fn contains(&self, id: &Id) -> bool {
        self.map.contains_key(id)
    }

    /// Where a chunk is stored.
    pub fn get(&self, id: &Id) -> Option<(PackId, ChunkLocation)> {
        self.map.get(id).map(|l| (self.packs[l.pack as usize], *l))
    }

    /// Every stored chunk with its pack's object key and location, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (Id, String, ChunkLocation)> + '_ {
        self.map
            .iter()
            .map(|(id, l)| (*id, pack_key(&self.packs[l.pack as usize]), *l))
    }

    /// Number of distinct chunks.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The object key of a pack.
pub(crate) fn pack_key(id: &PackId) -> String {
    let h = hex(id);
    format!("packs/{}/{h}", &h[..2])
}

fn page_key(id: &Id) -> String {
    let h = hex(id);
    format!("pages/{}/{h}", &h[..2])
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An open, unlocked store: the repository format on a backend.
pub struct Store {
    backend: Arc<dyn ObjectStore>,
    config: StoreConfig,
    keys: Keys,
    pub(super) meta: Sealer,
    /// The client state folder whose records this store is checked against (pinned), if any.
    state_dir: Option<std::path::PathBuf>,
    /// This process's chain of the audit log.
    audit_chain: std::sync::Mutex<super::audit::Chain>,
    /// Object Lock retention of audit records, if asked for.
    audit_retention: std::sync::Mutex<Option<super::audit::AuditRetention>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.backend.location())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The id of the store on `backend`, read from its config (no passphrase needed).
pub(crate) fn read_store_id(backend: &dyn ObjectStore) -> Result<String> {
    let raw = backend.get(CONFIG_KEY, MAX_CONFIG_BYTES)?;
    Ok(parse_config(&raw)?.store_id)
}

impl InitOptions {
    /// Checks the options before anything is created (a folder made for a store that is then
    /// refused would be left behind).
    pub fn check(&self) -> Result<()> {
        check_chunk_size(self.chunk_size)?;
        if self.passphrase.as_ref().is_some_and(Vec::is_empty) {
            return Err(Error::new(
                ErrorKind::Credentials,
                "the passphrase is empty",
            ));
        }
        Ok(())
    }
}

fn check_chunk_size(chunk_size: u32) -> Result<()> {
    if (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) && chunk_size.is_power_of_two() {
        Ok(())
    } else {
        Err(Error::config(format!(
            "chunk size {chunk_size} must be a power of two from 64 KiB to 16 MiB"
        )))
    }
}

fn key_wrap_aad(store_id: &str) -> Vec<u8> {
    format!("blockferry v1 key wrap {store_id}").into_bytes()
}

impl Store {
    /// Creates a new store at `location` (a folder, created if missing, or `s3://BUCKET/PREFIX`
    /// with the S3 settings of the environment).
    pub fn init(location: &str, opts: &InitOptions) -> Result<StoreConfig> {
        check_chunk_size(opts.chunk_size)?;
        Store::init_backend(&*open_backend(location, true, &S3Options::default())?, opts)
    }

    /// Creates a new store on a backend.
    pub fn init_backend(backend: &dyn ObjectStore, opts: &InitOptions) -> Result<StoreConfig> {
        Store::init_inner(backend, opts, None)
    }

    /// Creates a store; its audit log begins with the `init` record (the client in
    /// `state_dir`, if any, records that record as the log's head).
    fn init_inner(
        backend: &dyn ObjectStore,
        opts: &InitOptions,
        state_dir: Option<&std::path::Path>,
    ) -> Result<StoreConfig> {
        let started = std::time::Instant::now();
        check_chunk_size(opts.chunk_size)?;
        let store_id = hex(&crypto::random::<16>()?);
        let master: [u8; KEY_LEN] = crypto::random()?;
        let encryption = match &opts.passphrase {
            None => Encryption::None {
                master_key: hex(&master),
            },
            Some(pass) => {
                if pass.is_empty() {
                    return Err(Error::new(
                        ErrorKind::Credentials,
                        "the passphrase is empty",
                    ));
                }
                let salt: [u8; 16] = crypto::random()?;
                let kdf = KdfParams::DEFAULT;
                let kek = crypto::passphrase_key(pass, &salt, kdf)?;
                let wrapped = crypto::wrap_key(&kek, &master, &key_wrap_aad(&store_id))?;
                Encryption::Aes256Gcm {
                    kdf,
                    salt: hex(&salt),
                    wrapped_key: hex(&wrapped),
                }
            }
        };
        let mut config = StoreConfig {
            format: FORMAT_NAME.to_owned(),
            version: STORE_VERSION,
            store_id,
            chunk_size: opts.chunk_size,
            created_unix_ms: now_unix_ms(),
            encryption,
            mac: None,
        };
        let id = unhex::<16>(&config.store_id).expect("a store id just drawn");
        let keys = Keys::derive(&master, &id, opts.passphrase.is_some());
        config.mac = Some(hex(&keys.config_mac(&config.canonical()?)));
        let json = serde_json::to_vec_pretty(&config)
            .map_err(|e| Error::internal("encoding store config").with_source(e))?;
        match create_object(backend, CONFIG_KEY, &json)? {
            PutOutcome::Written => {}
            PutOutcome::AlreadyExists => {
                return Err(Error::config(format!(
                    "a store already exists at {}",
                    backend.location()
                )));
            }
        }
        let summary = StoreSummary::new(&backend.location(), &config);
        let ev = super::audit::AuditEvent::new("init", started, &Ok::<_, Error>(summary));
        super::audit::Writer {
            backend,
            meta: &keys.meta_sealer(),
            store_id: &config.store_id,
            state_dir,
            retention: None,
        }
        .append(&std::sync::Mutex::default(), &ev)?;
        Ok(config)
    }

    /// Opens the store at `location`; `passphrase` is needed for encrypted stores.
    pub fn open(location: &str, passphrase: Option<&[u8]>) -> Result<Store> {
        let backend = open_backend(location, false, &S3Options::default())?;
        Store::open_backend(backend, passphrase)
    }

    /// Opens a store on an existing backend.
    pub fn open_backend(backend: Arc<dyn ObjectStore>, passphrase: Option<&[u8]>) -> Result<Store> {
        let raw = backend.get(CONFIG_KEY, MAX_CONFIG_BYTES).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "no blockferry store at {} (run `blockferry init` first)",
                        backend.location()
                    ),
                )
            } else {
                e
            }
        })?;
        let config = parse_config(&raw)?;
        let store_id = unhex::<16>(&config.store_id)
            .ok_or_else(|| Error::corrupt(CONFIG_KEY, "invalid store id"))?;
        let (master, encrypted) = match &config.encryption {
            Encryption::None { master_key } => {
                if passphrase.is_some() {
                    // Whoever can write the store could have replaced its config to switch
                    // encryption off: a client that means to encrypt never writes in clear.
                    return Err(Error::new(
                        ErrorKind::Credentials,
                        format!(
                            "the store at {} is not encrypted, but a passphrase was given: \
                             refusing it, as its config may have been replaced to switch \
                             encryption off; a store created unencrypted on purpose is opened \
                             without a passphrase",
                            backend.location()
                        ),
                    )
                    .with_object(CONFIG_KEY));
                }
                (
                    unhex::<KEY_LEN>(master_key)
                        .ok_or_else(|| Error::corrupt(CONFIG_KEY, "invalid master key"))?,
                    false,
                )
            }
            Encryption::Aes256Gcm {
                kdf,
                salt,
                wrapped_key,
            } => {
                let pass = passphrase.ok_or_else(|| {
                    Error::new(
                        ErrorKind::Credentials,
                        "the store is encrypted: a passphrase is needed",
                    )
                    .with_setting("passphrase")
                })?;
                if pass.is_empty() {
                    return Err(Error::new(
                        ErrorKind::Credentials,
                        "the passphrase is empty (an empty passphrase file or variable?)",
                    ));
                }
                let salt = unhex_vec(salt)
                    .ok_or_else(|| Error::corrupt(CONFIG_KEY, "invalid key salt"))?;
                let wrapped = unhex_vec(wrapped_key)
                    .ok_or_else(|| Error::corrupt(CONFIG_KEY, "invalid wrapped key"))?;
                let kek = crypto::passphrase_key(pass, &salt, *kdf)?;
                (
                    crypto::unwrap_key(&kek, &wrapped, &key_wrap_aad(&config.store_id))?,
                    true,
                )
            }
        };
        let keys = Keys::derive(&master, &store_id, encrypted);
        if config.version >= 2 {
            let mac =
                config.mac.as_deref().and_then(unhex_vec).ok_or_else(|| {
                    Error::corrupt(CONFIG_KEY, "the store config has no valid MAC")
                })?;
            if !keys.config_mac_ok(&config.canonical()?, &mac) {
                return Err(Error::corrupt(
                    CONFIG_KEY,
                    "the store config failed authentication: it was altered or damaged; \
                     refusing the store",
                ));
            }
        }
        let meta = keys.meta_sealer();
        Ok(Store {
            backend,
            config,
            keys,
            meta,
            state_dir: None,
            audit_chain: std::sync::Mutex::default(),
            audit_retention: std::sync::Mutex::default(),
        })
    }

    /// Opens a store on a backend and checks it against what this client recorded of it in
    /// the state folder `state_dir` (the job database's): the store at this location must
    /// keep its id, stay encrypted if it was, and not go back to an older format. The
    /// client's record of each disk's newest snapshot is kept there too (rollback checks).
    pub fn open_pinned(
        backend: Arc<dyn ObjectStore>,
        passphrase: Option<&[u8]>,
        state_dir: &std::path::Path,
    ) -> Result<Store> {
        let mut store = Store::open_backend(backend, passphrase)?;
        let db = crate::job::state::JobDb::open(state_dir)?;
        db.pin_store(&pin_location(&store.location()), &store.config, false)?;
        store.state_dir = Some(state_dir.to_path_buf());
        Ok(store)
    }

    /// Opens a store as a client does (the CLI and the bindings): pinned ([`Store::open_pinned`])
    /// to the records in `state_dir`, or in the default state folder
    /// ([`default_state_dir`](crate::job::state::default_state_dir)) when `None`; unpinned
    /// only when there is no state folder to be found at all (no home folder).
    pub fn open_client(
        backend: Arc<dyn ObjectStore>,
        passphrase: Option<&[u8]>,
        state_dir: Option<&std::path::Path>,
    ) -> Result<Store> {
        match client_state_dir(state_dir) {
            Some(dir) => Store::open_pinned(backend, passphrase, &dir),
            None => Store::open_backend(backend, passphrase),
        }
    }

    /// Creates a store as a client does: [`Store::init_backend`], then the client records the
    /// new store (as [`Store::open_client`] finds its state folder) so that a store put in
    /// its place later is refused.
    pub fn init_client(
        backend: &dyn ObjectStore,
        opts: &InitOptions,
        state_dir: Option<&std::path::Path>,
    ) -> Result<StoreConfig> {
        let dir = client_state_dir(state_dir);
        let config = Store::init_inner(backend, opts, dir.as_deref())?;
        if let Some(dir) = dir {
            crate::job::state::JobDb::open(&dir)?.pin_store(
                &pin_location(&backend.location()),
                &config,
                true,
            )?;
        }
        Ok(config)
    }

    /// Writes audit records under Object Lock retention from now on (S3 buckets with Object
    /// Lock only: a record's write fails elsewhere).
    pub fn set_audit_retention(&self, retention: Option<super::audit::AuditRetention>) {
        if let Ok(mut r) = self.audit_retention.lock() {
            *r = retention;
        }
    }

    /// Appends a record of an operation to this process's chain of the audit log.
    ///
    /// # Errors
    /// The record cannot be written (the store, or the retention the bucket refused).
    pub fn audit(&self, ev: &super::audit::AuditEvent) -> Result<super::audit::AuditRecord> {
        let retention = self.audit_retention.lock().ok().and_then(|r| *r);
        super::audit::Writer {
            backend: self.backend.as_ref(),
            meta: &self.meta,
            store_id: &self.config.store_id,
            state_dir: self.state_dir.as_deref(),
            retention,
        }
        .append(&self.audit_chain, ev)
        .map_err(|e| {
            Error::new(
                e.kind(),
                format!("the operation's audit record could not be written: {e}"),
            )
        })
    }

    /// Records `ev` and returns the operation's `result`: an operation that succeeded but
    /// whose record cannot be written fails (a log with a gap proves nothing); one that
    /// failed keeps its own error (the record's failure is logged).
    pub(crate) fn audited<T>(&self, ev: &super::audit::AuditEvent, result: Result<T>) -> Result<T> {
        match (self.audit(ev), result) {
            (Ok(_), r) => r,
            (Err(e), Ok(_)) => Err(e),
            (Err(e), Err(original)) => {
                tracing::warn!(error = %e, "the failed operation's audit record could not be written");
                Err(original)
            }
        }
    }

    /// As [`Self::audited`], for an operation that only reads the store (restore, verify,
    /// export): it records itself if it can, and a store it may not write to (read-only
    /// credentials, a bucket that refuses) gets a warning instead of a failed operation.
    pub(crate) fn audited_read<T>(
        &self,
        ev: &super::audit::AuditEvent,
        result: Result<T>,
    ) -> Result<T> {
        if let Err(e) = self.audit(ev) {
            tracing::warn!(
                "{e} (the {} is done; it is missing from the store's audit log)",
                ev.op
            );
        }
        result
    }

    /// Checks the whole audit log (docs/FORMAT.md, "Audit log"): every chain whole, authentic and
    /// linked, every cross-reference and every head this client saw present, every snapshot
    /// recorded. This client then records the chains' heads it read.
    ///
    /// # Errors
    /// The log cannot be listed or the client's records read.
    pub fn audit_verify(&self) -> Result<super::audit::AuditReport> {
        let db = self
            .state_dir
            .as_deref()
            .map(crate::job::state::JobDb::open)
            .transpose()?;
        let seen = match &db {
            Some(db) => db.audit_heads(&self.config.store_id)?,
            None => Vec::new(),
        };
        let (snaps, _) = self.snapshots()?;
        let snaps: Vec<(String, String)> = snaps
            .iter()
            .map(|s| (s.id.clone(), s.disk.name.clone()))
            .collect();
        let report = super::audit::verify(self.backend.as_ref(), &self.meta, &seen, Some(&snaps))?;
        // Only a whole log moves this client's marks (a damaged one must stay noticed).
        if let Some(db) = &db
            && report.passed
        {
            for (chain, seq, hash) in &report.heads {
                db.set_audit_head(&self.config.store_id, chain, *seq, hash)?;
            }
        }
        Ok(report)
    }

    /// The client state folder the store was opened with ([`Store::open_pinned`]).
    pub fn state_dir(&self) -> Option<&std::path::Path> {
        self.state_dir.as_deref()
    }

    /// The store configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.config.chunk_size
    }

    /// Whether chunks and metadata are encrypted.
    pub fn encrypted(&self) -> bool {
        self.config.encrypted()
    }

    /// What the store is, as the front ends show it.
    pub fn summary(&self) -> StoreSummary {
        StoreSummary::new(&self.location(), &self.config)
    }

    /// Bytes the store's backend can still take, if it has a fixed capacity (a local folder's
    /// file system); `None` for object storage.
    ///
    /// # Errors
    /// The file system cannot be asked.
    pub fn free_bytes(&self) -> Result<Option<u64>> {
        self.backend.free_bytes()
    }

    /// Where the store lives (a path or URL).
    pub fn location(&self) -> String {
        self.backend.location()
    }

    /// The derived keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn ObjectStore> {
        &self.backend
    }

    /// Reads every index object into a chunk index, leaving out the chunk copies damage
    /// records list (see [`Store::damage`]). Index objects that cannot be read are reported in
    /// [`ChunkIndex::damaged`] and their chunks treated as absent (a replication stops then;
    /// `verify --repair` rebuilds them).
    pub fn load_index(&self) -> Result<ChunkIndex> {
        let damage = self.damage()?;
        let mut index = ChunkIndex::default();
        for key in self.backend.list("index/")? {
            match self.read_index_object(&key) {
                Ok(packs) => {
                    for (pack_id, entries) in packs {
                        index.insert_pack_except(pack_id, &entries, &damage);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Store => return Err(e),
                Err(e) => {
                    tracing::warn!("ignoring unreadable index object: {e}");
                    index.damaged.push(e);
                }
            }
        }
        Ok(index)
    }

    /// Reads one index object: the packs it lists with their entries.
    pub fn read_index_object(&self, key: &str) -> Result<Vec<(PackId, Vec<Entry>)>> {
        let raw = self.backend.get(key, MAX_META_BYTES)?;
        let payload = format::open_meta(&self.meta, MetaKind::Index, key, raw)?;
        format::decode_index(&payload, key)
    }

    /// Writes one index object listing the chunks of some durable packs.
    pub fn write_index(&self, packs: &[(PackId, Vec<Entry>)]) -> Result<()> {
        if packs.is_empty() {
            return Ok(());
        }
        let key = format!("index/{}", hex(&crypto::random::<16>()?));
        let sealed = format::seal_meta(
            &self.meta,
            MetaKind::Index,
            &key,
            &format::encode_index(packs)?,
        )?;
        self.put_new(&key, &sealed)
    }

    /// Writes a finished pack.
    pub fn put_pack(&self, pack_id: &PackId, bytes: &[u8]) -> Result<()> {
        self.put_new(&pack_key(pack_id), bytes)
    }

    /// Reads the chunk records a pack in the store lists, from its header and trailer only
    /// (two ranged reads), and its size. `NotFound` if the store has no such pack.
    pub fn read_pack_entries(&self, pack_id: &PackId) -> Result<(Vec<Entry>, u64)> {
        let key = pack_key(pack_id);
        let size = self.backend.size(&key)?;
        let min = (format::PACK_HEADER + format::PACK_FOOTER) as u64;
        if size < min {
            return Err(Error::corrupt(
                &key,
                "pack truncated: shorter than header and footer",
            ));
        }
        let mut header = Vec::new();
        self.backend
            .get_range(&key, 0, format::PACK_HEADER, &mut header)?;
        if format::pack_id_of(&header, &key)? != *pack_id {
            return Err(Error::corrupt(&key, "pack header names another pack"));
        }
        let header: [u8; format::PACK_HEADER] = header
            .as_slice()
            .try_into()
            .map_err(|_| Error::corrupt(&key, "pack truncated inside its header"))?;
        // The footer and the longest trailer a pack can have, or the whole pack after its
        // header if it is shorter.
        let tail_len = (size - format::PACK_HEADER as u64)
            .min((format::MAX_TRAILER_RECORD + format::PACK_FOOTER) as u64);
        let tail_at = size - tail_len;
        let mut tail = Vec::new();
        let len = usize::try_from(tail_len).expect("bounded by the trailer cap");
        self.backend.get_range(&key, tail_at, len, &mut tail)?;
        let sealer = self.keys.pack_sealer(pack_id);
        let entries = format::decode_pack_tail(&sealer, &header, &tail, tail_at, size, &key)?;
        Ok((entries, size))
    }

    /// Reads a sealed JSON record of the snapshot kind (a manifest, tombstone, damage or job
    /// record) at `key`; `what` names it in errors.
    pub(crate) fn read_record<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        what: &str,
    ) -> Result<T> {
        let payload = format::open_meta(
            &self.meta,
            MetaKind::Snapshot,
            key,
            self.backend.get(key, MAX_META_BYTES)?,
        )?;
        serde_json::from_slice(&payload)
            .map_err(|e| Error::corrupt(key, format!("{what} is not valid")).with_source(e))
    }

    /// Seals `value` as a JSON record of the snapshot kind for `key` (see [`Self::read_record`]).
    pub(crate) fn seal_record<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        what: &str,
    ) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(value)
            .map_err(|e| Error::internal(format!("encoding {what}")).with_source(e))?;
        format::seal_meta(&self.meta, MetaKind::Snapshot, key, &json)
    }

    pub(crate) fn put_new(&self, key: &str, bytes: &[u8]) -> Result<()> {
        match create_object(self.backend.as_ref(), key, bytes)? {
            PutOutcome::Written => Ok(()),
            PutOutcome::AlreadyExists => Err(Error::internal(
                "refusing to overwrite an existing object (random name collided)",
            )
            .with_object(key)),
        }
    }

    /// Reads, authenticates, decompresses and checks one chunk into `out`.
    /// `record` is scratch space for the sealed blob.
    ///
    /// The chunk is proven once (see [`Self::decode_chunk`]); [`Self::read_chunk_strict`]
    /// checks every guard of the record.
    pub fn read_chunk(
        &self,
        index: &ChunkIndex,
        id: &Id,
        record: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        self.read_chunk_checked(index, id, record, out, false)
    }

    /// [`Self::read_chunk`], checking every guard of the record: an encrypted chunk's
    /// plaintext is hashed against its id after its tag was checked, an unencrypted record's
    /// checksum is checked before its plaintext is hashed. A damaged guard of intact data is
    /// damage all the same, which `verify` reports.
    pub fn read_chunk_strict(
        &self,
        index: &ChunkIndex,
        id: &Id,
        record: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        self.read_chunk_checked(index, id, record, out, true)
    }

    fn read_chunk_checked(
        &self,
        index: &ChunkIndex,
        id: &Id,
        record: &mut Vec<u8>,
        out: &mut Vec<u8>,
        strict: bool,
    ) -> Result<()> {
        let (pack_id, loc) = index.get(id).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("chunk {} is in no index of the store", hex(id)),
            )
        })?;
        let key = pack_key(&pack_id);
        self.check_location(&pack_id, &loc)?;
        self.backend
            .get_range(&key, loc.offset, loc.stored_len as usize, record)?;
        self.decode(&pack_id, &loc, id, record, out, strict)
    }

    /// Checks a chunk location from the index before anything is read for it.
    pub fn check_location(&self, pack: &PackId, loc: &ChunkLocation) -> Result<()> {
        if loc.stored_len as usize > format::blob_bound(self.chunk_size() as usize) {
            return Err(Error::corrupt(
                &pack_key(pack),
                format!(
                    "index claims a {}-byte chunk record, larger than any chunk",
                    loc.stored_len
                ),
            )
            .with_offset(loc.offset));
        }
        Ok(())
    }

    /// Authenticates, decompresses and checks one chunk record (read from `pack` at `loc`;
    /// decrypted in place) into `out`.
    ///
    /// The chunk is proven to be the one named `id` once: an encrypted record by its
    /// AES-GCM tag, which covers the id, the header and the payload (only a holder of the
    /// key makes one); an unencrypted record by the keyed hash of its plaintext. Proving it
    /// twice (hashing a decrypted plaintext, or checking an unencrypted record's checksum as
    /// well) cost a quarter of the CPU of a restore, an export or an NBD read.
    pub fn decode_chunk(
        &self,
        pack: &PackId,
        loc: &ChunkLocation,
        id: &Id,
        record: &mut [u8],
        out: &mut (impl format::PlainBuf + ?Sized),
    ) -> Result<()> {
        self.decode(pack, loc, id, record, out, false)
    }

    fn decode(
        &self,
        pack: &PackId,
        loc: &ChunkLocation,
        id: &Id,
        record: &mut [u8],
        out: &mut (impl format::PlainBuf + ?Sized),
        strict: bool,
    ) -> Result<()> {
        let key = pack_key(pack);
        let sealer = self.keys.pack_sealer(pack);
        let hash = strict || !sealer.encrypts();
        let sealer = if strict {
            sealer
        } else {
            sealer.plaintext_proven()
        };
        format::decode_blob(
            &sealer,
            id,
            record,
            self.chunk_size() as usize,
            &key,
            loc.offset,
            out,
        )?;
        let plain = (*out).as_ref();
        if plain.len() != loc.raw_len as usize || (hash && self.keys.chunk_id(plain) != *id) {
            return Err(
                Error::corrupt(&key, "chunk content does not match its id").with_offset(loc.offset)
            );
        }
        Ok(())
    }

    /// Stores a page of chunk ids; returns its id, or `None` if every entry is zero.
    pub fn write_page(&self, ids: &[Id]) -> Result<Option<Id>> {
        if ids.iter().all(|id| *id == ZERO_ID) {
            return Ok(None);
        }
        let payload = format::encode_page(ids)?;
        let id = self.keys.page_id(&payload);
        let key = page_key(&id);
        let sealed = format::seal_meta(&self.meta, MetaKind::Page, &key, &payload)?;
        // Pages are content-addressed: an existing page with this id holds these bytes.
        self.backend.put(&key, &sealed, PutMode::Create)?;
        Ok(Some(id))
    }

    /// Reads a page of chunk ids, checking it against its id.
    pub fn read_page(&self, id: &Id) -> Result<Vec<Id>> {
        let key = page_key(id);
        let payload = format::open_meta(
            &self.meta,
            MetaKind::Page,
            &key,
            self.backend.get(&key, MAX_META_BYTES)?,
        )?;
        if self.keys.page_id(&payload) != *id {
            return Err(Error::corrupt(&key, "page content does not match its id"));
        }
        format::decode_page(&payload, &key)
    }

    /// A fresh snapshot id.
    pub fn new_snapshot_id() -> Result<String> {
        Ok(hex(&crypto::random::<8>()?))
    }
}

/// `dir`, or the default state folder if there is one.
fn client_state_dir(dir: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
    match dir {
        Some(d) => Some(d.to_path_buf()),
        None => crate::job::state::default_state_dir().ok(),
    }
}

/// The name a store's location is recorded under: a local folder by its canonical path.
pub fn pin_location(location: &str) -> String {
    if location.contains("://") {
        return location.trim_end_matches('/').to_owned();
    }
    std::fs::canonicalize(location)
        .map_or_else(|_| location.to_owned(), |p| p.display().to_string())
}

fn parse_config(raw: &[u8]) -> Result<StoreConfig> {
    let value: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| Error::corrupt(CONFIG_KEY, "store config is not valid JSON").with_source(e))?;
    if value.get("format").and_then(|v| v.as_str()) != Some(FORMAT_NAME) {
        return Err(Error::corrupt(CONFIG_KEY, "not a blockferry store config"));
    }
    let version = value
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| Error::corrupt(CONFIG_KEY, "store config has no version"))?;
    if version > u64::from(STORE_VERSION) {
        return Err(Error::new(
            ErrorKind::UnsupportedVersion,
            format!(
                "the store uses format version {version}, newer than this blockferry reads \
                 ({STORE_VERSION}); upgrade blockferry"
            ),
        )
        .with_object(CONFIG_KEY));
    }
    let config: StoreConfig = serde_json::from_value(value)
        .map_err(|e| Error::corrupt(CONFIG_KEY, "store config is not valid").with_source(e))?;
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&config.chunk_size)
        || !config.chunk_size.is_power_of_two()
    {
        return Err(Error::corrupt(
            CONFIG_KEY,
            format!("invalid chunk size {}", config.chunk_size),
        ));
    }
    Ok(config)
}
