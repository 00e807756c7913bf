//! Job state and checkpoints: an embedded SQLite database (WAL, one writer per job).
//!
//! A job is one replication of one source into one store, identified by [`JobKey`]. While it
//! runs, the database records what is durable in the store: every part the store
//! acknowledged (with its ETag, checksum and the chunks it carries), every pack completed,
//! and the chunk id found at each disk position. A run of the same job after a kill resumes
//! from there: it reads only positions whose chunk is not durable and sends only what was in
//! flight. Rows are written only after the store acknowledged what they describe.
//!
//! A lock file per job (an OS file lock, released when the process dies) keeps two processes
//! from running one job at once.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::store::format::{self, Entry, Id, PackId, hex};
use crate::store::{ObjectStore, Part, SourceFingerprint, StoreConfig, now_unix_ms};

/// Schema version of the database; a newer one is refused, an older one brought up to date
/// (2: `parts.last`, a pack's last part, trailer included, is recorded too; 3: `jobs.kind`,
/// and the tables of exports).
const SCHEMA_VERSION: i64 = 3;

/// How long taking a job's lock waits for a process that holds it.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Rows of positions written per transaction.
pub(crate) const POSITION_BATCH: usize = 4096;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    store TEXT NOT NULL,
    store_id TEXT NOT NULL,
    source TEXT NOT NULL,
    disk TEXT NOT NULL,
    chunk_size INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    snapshot TEXT,
    runs INTEGER NOT NULL DEFAULT 1,
    bytes_sent INTEGER NOT NULL DEFAULT 0,
    bytes_resent INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    last_error TEXT,
    kind TEXT NOT NULL DEFAULT 'replicate'
);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs (store_id, source, disk, chunk_size, state);
CREATE TABLE IF NOT EXISTS packs (
    job TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    pack BLOB NOT NULL,
    upload_id TEXT,
    state TEXT NOT NULL,
    entries BLOB,
    PRIMARY KEY (job, pack)
);
CREATE TABLE IF NOT EXISTS parts (
    job TEXT NOT NULL,
    pack BLOB NOT NULL,
    number INTEGER NOT NULL,
    size INTEGER NOT NULL,
    etag TEXT NOT NULL,
    crc32c TEXT NOT NULL,
    chunks BLOB NOT NULL,
    last INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, pack, number),
    FOREIGN KEY (job, pack) REFERENCES packs (job, pack) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS store_pins (
    location TEXT PRIMARY KEY,
    store_id TEXT NOT NULL,
    encrypted INTEGER NOT NULL,
    version INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS disk_pins (
    store_id TEXT NOT NULL,
    disk TEXT NOT NULL,
    seq INTEGER NOT NULL,
    snapshot TEXT NOT NULL,
    PRIMARY KEY (store_id, disk)
);
CREATE TABLE IF NOT EXISTS audit_heads (
    store_id TEXT NOT NULL,
    chain TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (store_id, chain)
);
CREATE TABLE IF NOT EXISTS positions (
    job TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    id BLOB NOT NULL,
    PRIMARY KEY (job, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS exports (
    job TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    target TEXT NOT NULL,
    format TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    plan TEXT NOT NULL,
    upload_id TEXT,
    etag TEXT,
    size INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS export_parts (
    job TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    size INTEGER NOT NULL,
    etag TEXT NOT NULL,
    crc32c TEXT NOT NULL,
    PRIMARY KEY (job, number)
);
";

/// What [`JobDb::cleanup_uploads`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CleanupReport {
    /// Keys of the packs whose uploads were aborted (or would be, on a dry run).
    pub aborted: Vec<String>,
    /// Uploads left alone: too young, resumable by a job here, or not blockferry's.
    pub kept: usize,
    /// Whether nothing was aborted because this was a dry run.
    pub dry_run: bool,
}

/// What identifies a job: the same store, source, disk and chunk size mean the same job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobKey {
    /// The store's location as given (for messages).
    pub store: String,
    /// The store's id (a store moved to another location is the same store).
    pub store_id: String,
    /// The source, as an absolute path.
    pub source: String,
    /// Which disk of a multi-disk source (an OVA), or empty.
    pub disk: String,
    /// Chunk size of the store.
    pub chunk_size: u32,
}

/// What a job's source looked like when the job started: its top file, and every other file
/// it reads (parents of a chain, extents of a VMDK descriptor), so that a resumed run can
/// tell whether any of them changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSource {
    /// The top file (the path the job was started with).
    #[serde(flatten)]
    pub top: SourceFingerprint,
    /// The other files, in the order the source reads them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<SourceFile>,
    /// What the run makes: empty for a full copy; for a delta, its base and change list.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plan: String,
}

/// One file of a source besides its top file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// The file's path as opened.
    pub path: String,
    /// Its identity then.
    #[serde(flatten)]
    pub fingerprint: SourceFingerprint,
}

impl JobSource {
    /// What changed from `self` (the job's record) to `now`, in words; empty if nothing.
    pub fn changes(&self, now: &JobSource) -> Vec<String> {
        fn diff(was: &SourceFingerprint, now: &SourceFingerprint, out: &mut Vec<String>, of: &str) {
            if was.size != now.size {
                out.push(format!("{of}size {} → {}", was.size, now.size));
            }
            if was.modified_unix_ns != now.modified_unix_ns {
                out.push(format!("{of}modification time"));
            }
            if (was.device, was.inode) != (now.device, now.inode) {
                out.push(format!(
                    "{of}file identity (device and inode: replaced by another file)"
                ));
            }
        }
        let mut out = Vec::new();
        if self.plan != now.plan {
            out.push(
                "the delta's base snapshot or change list (the job was started with others)"
                    .to_owned(),
            );
        }
        diff(&self.top, &now.top, &mut out, "");
        let was: Vec<&str> = self.others.iter().map(|f| f.path.as_str()).collect();
        let is: Vec<&str> = now.others.iter().map(|f| f.path.as_str()).collect();
        if was != is {
            out.push(format!(
                "the files it reads: [{}] → [{}]",
                was.join(", "),
                is.join(", ")
            ));
            return out;
        }
        for (w, n) in self.others.iter().zip(&now.others) {
            diff(
                &w.fingerprint,
                &n.fingerprint,
                &mut out,
                &format!("{}: ", w.path),
            );
        }
        out
    }
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Not finished: running now, or stopped (killed, failed, cancelled) and resumable.
    Active,
    /// Finished with a snapshot.
    Done,
}

impl JobState {
    fn parse(s: &str) -> JobState {
        if s == "done" {
            JobState::Done
        } else {
            JobState::Active
        }
    }
}

/// A job as the database records it.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    /// Job id (16 hex digits).
    pub id: String,
    /// Store location as given when the job started.
    pub store: String,
    /// The store's id.
    pub store_id: String,
    /// Source path.
    pub source: String,
    /// Disk selector, or empty.
    pub disk: String,
    /// Chunk size.
    pub chunk_size: u32,
    /// The source as it was when the job started.
    pub fingerprint: JobSource,
    /// Active or done.
    pub state: JobState,
    /// The snapshot a finished job made.
    pub snapshot: Option<String>,
    /// Runs so far (the first and every resume).
    pub runs: u32,
    /// Bytes of parts and packs the store acknowledged, over all runs.
    pub bytes_sent: u64,
    /// Bytes sent again because they were in flight when a run stopped.
    pub bytes_resent: u64,
    /// When the job started, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// When the database last heard of it.
    pub updated_unix_ms: u64,
    /// The error the last run stopped on, if it failed.
    pub last_error: Option<String>,
    /// Whether a process is running it now (its lock is held).
    pub running: bool,
    /// What the job does.
    pub kind: JobKind,
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// A replication of a source into a store (`source` is the source's path).
    Replicate,
    /// An export of a snapshot to an object (`source` is the target's URL).
    Export,
}

/// A pack of a job whose multipart upload is still open.
#[derive(Debug, Clone)]
pub struct OpenPack {
    /// Pack id.
    pub pack: PackId,
    /// The store's upload id.
    pub upload_id: String,
    /// Parts the store acknowledged, with the entries each carries (offsets within the part).
    pub parts: Vec<(Part, Vec<Entry>)>,
    /// The number of the pack's last part (its remaining records and its trailer), if it was
    /// acknowledged: with every part before it, the upload completes as it is.
    pub last_part: Option<u32>,
}

/// Holds a job's lock file locked; dropping it releases the job.
#[derive(Debug)]
pub struct JobLock {
    _file: File,
}

/// The job database.
#[derive(Debug)]
pub struct JobDb {
    pub(super) conn: Connection,
    dir: PathBuf,
}

/// The default folder of the job database: `$BLOCKFERRY_STATE_DIR`, else
/// `$XDG_STATE_HOME/blockferry`, else `~/.local/state/blockferry`.
pub fn default_state_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BLOCKFERRY_STATE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("blockferry"));
    }
    let home = std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .ok_or_else(|| {
            Error::config("no folder for job state: set BLOCKFERRY_STATE_DIR or HOME")
        })?;
    Ok(PathBuf::from(home).join(".local/state/blockferry"))
}

/// Inserts an active job of `kind` (in `conn`, or a transaction of it) under `id`, or a new
/// random id; returns the id.
pub(super) fn insert_job(
    conn: &Connection,
    key: &JobKey,
    fingerprint: &JobSource,
    kind: JobKind,
    id: Option<&str>,
) -> Result<String> {
    let id = match id {
        Some(id) => id.to_owned(),
        None => hex(&crate::store::crypto::random::<8>()?),
    };
    let now = i64_of(now_unix_ms());
    let fp = serde_json::to_string(fingerprint)
        .map_err(|e| Error::internal("encoding a fingerprint").with_source(e))?;
    let kind = match kind {
        JobKind::Replicate => "replicate",
        JobKind::Export => "export",
    };
    conn.execute(
        "INSERT INTO jobs (id, store, store_id, source, disk, chunk_size, fingerprint, state, \
         created_ms, updated_ms, kind) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'active', ?8, ?8, ?9)",
        params![
            id,
            key.store,
            key.store_id,
            key.source,
            key.disk,
            key.chunk_size,
            fp,
            now,
            kind
        ],
    )
    .map_err(|e| db_err("recording the job", e))?;
    Ok(id)
}

pub(super) fn db_err(what: &str, e: rusqlite::Error) -> Error {
    Error::new(ErrorKind::Io, format!("job database: {what}")).with_source(e)
}

pub(super) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl JobDb {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<JobDb> {
        std::fs::create_dir_all(dir.join("locks"))
            .map_err(|e| Error::io("creating the job state folder", dir, e))?;
        let path = dir.join("jobs.sqlite");
        let conn = Connection::open(&path).map_err(|e| db_err("opening", e).with_path(&path))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(|e| db_err("configuring", e))?;
        // WAL with NORMAL sync: a commit survives the process being killed; the OS crashing
        // may lose the last commits, which only costs re-sending their parts.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| db_err("configuring", e))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| db_err("configuring", e))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| db_err("configuring", e))?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| db_err("creating tables", e).with_path(&path))?;
        let version: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| db_err("reading the schema version", e))?;
        match version.as_deref().map(str::parse::<i64>) {
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                    params![SCHEMA_VERSION.to_string()],
                )
                .map_err(|e| db_err("writing the schema version", e))?;
            }
            Some(Ok(v)) if v == SCHEMA_VERSION => {}
            Some(Ok(v)) if (1..SCHEMA_VERSION).contains(&v) => {
                if v < 2 {
                    conn.execute_batch(
                        "ALTER TABLE parts ADD COLUMN last INTEGER NOT NULL DEFAULT 0;",
                    )
                    .map_err(|e| db_err("updating the database to schema 2", e).with_path(&path))?;
                }
                conn.execute_batch(
                    "ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'replicate';
                     UPDATE meta SET value = '3' WHERE key = 'schema';",
                )
                .map_err(|e| db_err("updating the database to schema 3", e).with_path(&path))?;
            }
            Some(_) => {
                return Err(Error::new(
                    ErrorKind::UnsupportedVersion,
                    "the job database was written by a newer blockferry; upgrade, or point \
                     BLOCKFERRY_STATE_DIR elsewhere",
                )
                .with_path(&path));
            }
        }
        Ok(JobDb {
            conn,
            dir: dir.to_path_buf(),
        })
    }

    /// The folder holding the database.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock_path(&self, job: &str) -> PathBuf {
        self.dir.join("locks").join(format!("{job}.lock"))
    }

    /// Takes the job's lock, failing if another process holds it.
    pub fn lock(&self, job: &str) -> Result<JobLock> {
        let path = self.lock_path(job);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("opening the job lock", &path, e))?;
        // A process killed a moment ago may still hold the lock while the kernel tears it
        // down: wait a little before calling the job busy.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(JobLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "job {job} is running in another process; wait for it or stop it \
                             first"
                        ),
                    ));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(Error::io("locking the job", &path, e));
                }
            }
        }
    }

    fn is_running(&self, job: &str) -> bool {
        File::options()
            .write(true)
            .open(self.lock_path(job))
            .is_ok_and(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
    }

    pub(super) fn record(&self, row: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
        let id: String = row.get(0)?;
        let fingerprint: String = row.get(6)?;
        let state: String = row.get(7)?;
        Ok(JobRecord {
            running: self.is_running(&id),
            id,
            store: row.get(1)?,
            store_id: row.get(2)?,
            source: row.get(3)?,
            disk: row.get(4)?,
            chunk_size: u32::try_from(row.get::<_, i64>(5)?).unwrap_or(0),
            // An unreadable record compares as changed, so the job is refused, not resumed.
            fingerprint: serde_json::from_str(&fingerprint).unwrap_or_default(),
            state: JobState::parse(&state),
            snapshot: row.get(8)?,
            runs: u32::try_from(row.get::<_, i64>(9)?).unwrap_or(0),
            bytes_sent: u64_of(row.get(10)?),
            bytes_resent: u64_of(row.get(11)?),
            created_unix_ms: u64_of(row.get(12)?),
            updated_unix_ms: u64_of(row.get(13)?),
            last_error: row.get(14)?,
            kind: if row.get::<_, String>(15)? == "export" {
                JobKind::Export
            } else {
                JobKind::Replicate
            },
        })
    }

    pub(super) const COLUMNS: &'static str = "id, store, store_id, source, disk, chunk_size, fingerprint, \
        state, snapshot, runs, bytes_sent, bytes_resent, created_ms, updated_ms, last_error, kind";

    /// Every job, newest first.
    pub fn list(&self) -> Result<Vec<JobRecord>> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM jobs ORDER BY created_ms DESC",
                Self::COLUMNS
            ))
            .map_err(|e| db_err("listing jobs", e))?;
        let rows = stmt
            .query_map([], |r| self.record(r))
            .map_err(|e| db_err("listing jobs", e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| db_err("listing jobs", e))
    }

    /// One job by id (or a unique prefix of it).
    pub fn get(&self, id: &str) -> Result<JobRecord> {
        let matches: Vec<JobRecord> = self
            .list()?
            .into_iter()
            .filter(|j| j.id.starts_with(id))
            .collect();
        match matches.len() {
            1 => Ok(matches.into_iter().next().expect("one match")),
            0 => Err(Error::new(ErrorKind::NotFound, format!("no job {id:?}"))),
            _ => Err(Error::config(format!(
                "{id:?} names several jobs; give more of the id"
            ))),
        }
    }

    /// The unfinished job for `key`, if there is one.
    pub fn find_active(&self, key: &JobKey) -> Result<Option<JobRecord>> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM jobs WHERE store_id = ?1 AND source = ?2 AND disk = ?3 \
                 AND chunk_size = ?4 AND state = 'active' AND kind = 'replicate' ORDER BY created_ms DESC LIMIT 1",
                Self::COLUMNS
            ))
            .map_err(|e| db_err("finding the job", e))?;
        stmt.query_row(
            params![key.store_id, key.source, key.disk, key.chunk_size],
            |r| self.record(r),
        )
        .optional()
        .map_err(|e| db_err("finding the job", e))
    }

    /// Records a new job.
    pub fn create(&self, key: &JobKey, fingerprint: &JobSource) -> Result<JobRecord> {
        let id = insert_job(&self.conn, key, fingerprint, JobKind::Replicate, None)?;
        self.get(&id)
    }

    /// Records a job another host started (found in the store) under its id.
    pub(crate) fn adopt(
        &self,
        id: &str,
        key: &JobKey,
        fingerprint: &JobSource,
    ) -> Result<JobRecord> {
        insert_job(&self.conn, key, fingerprint, JobKind::Replicate, Some(id))?;
        self.get(id)
    }

    /// Counts one more run of a job and clears its last error.
    pub fn start_run(&self, job: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE jobs SET runs = runs + 1, last_error = NULL, updated_ms = ?2 \
                 WHERE id = ?1",
                params![job, i64_of(now_unix_ms())],
            )
            .map(drop)
            .map_err(|e| db_err("updating the job", e))
    }

    /// Records the error a run stopped on.
    pub fn set_error(&self, job: &str, error: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE jobs SET last_error = ?2, updated_ms = ?3 WHERE id = ?1",
                params![job, error, i64_of(now_unix_ms())],
            )
            .map(drop)
            .map_err(|e| db_err("updating the job", e))
    }

    /// Adds to the bytes a job re-sent.
    pub fn add_resent(&self, job: &str, bytes: u64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE jobs SET bytes_resent = bytes_resent + ?2 WHERE id = ?1",
                params![job, i64_of(bytes)],
            )
            .map(drop)
            .map_err(|e| db_err("updating the job", e))
    }

    /// Marks a job done with its snapshot and forgets its checkpoints.
    pub fn finish(&self, job: &str, snapshot: &str) -> Result<()> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| db_err("finishing the job", e))?;
        tx.execute(
            "UPDATE jobs SET state = 'done', snapshot = ?2, last_error = NULL, updated_ms = ?3 \
             WHERE id = ?1",
            params![job, snapshot, i64_of(now_unix_ms())],
        )
        .map_err(|e| db_err("finishing the job", e))?;
        tx.execute("DELETE FROM positions WHERE job = ?1", params![job])
            .map_err(|e| db_err("finishing the job", e))?;
        tx.execute("DELETE FROM packs WHERE job = ?1", params![job])
            .map_err(|e| db_err("finishing the job", e))?;
        tx.commit().map_err(|e| db_err("finishing the job", e))
    }

    /// Abandons a job: aborts the multipart uploads it left open in its store (`backend`)
    /// and forgets it. Fails if a process is running it.
    pub fn abandon(&self, job: &str, backend: &dyn ObjectStore) -> Result<()> {
        let lock = self.lock(job)?;
        for open in self.open_packs(job)? {
            backend.abort_upload(&crate::store::pack_key(&open.pack), &open.upload_id)?;
            self.drop_pack(job, &open.pack)?;
        }
        super::journal::forget_job(backend, job)?;
        self.delete(job)?;
        drop(lock);
        Ok(())
    }

    /// Abandons the job `id` (or a unique prefix of it): a finished job is just forgotten, an
    /// unfinished one has its open uploads aborted in its store (reached with `s3` when it is
    /// on S3), or, for an export, its upload of the target object, first. Returns the job as it was.
    pub fn abandon_job(&self, id: &str, s3: &crate::store::S3Options) -> Result<JobRecord> {
        let job = self.get(id)?;
        if job.state == JobState::Done {
            self.delete(&job.id)?;
        } else if job.kind == JobKind::Export {
            #[cfg(feature = "s3")]
            self.abandon_export(&job.id, s3)?;
            #[cfg(not(feature = "s3"))]
            self.delete(&job.id)?;
        } else {
            let backend = crate::store::open_backend(&job.store, false, s3)?;
            self.abandon(&job.id, backend.as_ref())?;
        }
        Ok(job)
    }

    /// Aborts the multipart uploads of packs in the store (`backend`) that no job may still
    /// resume, and that were started more than `older_than` ago. A job records itself in the
    /// store (`jobs/<id>`) until it finishes or is abandoned, and its packs' ids begin with
    /// its id: the uploads of such a job, on any host, are left alone unless
    /// `include_stopped_jobs`; so are those of unfinished jobs of this database. Uploads that
    /// are not blockferry's packs are left alone. Holds the store's gc lock meanwhile (one
    /// cleanup or gc at a time). With `dry_run`, only says what it would abort.
    pub fn cleanup_uploads(
        &self,
        backend: &std::sync::Arc<dyn ObjectStore>,
        older_than: Duration,
        include_stopped_jobs: bool,
        dry_run: bool,
    ) -> Result<CleanupReport> {
        let _lock = crate::store::lock::StoreLock::gc(backend)?;
        let store_id = crate::store::read_store_id(backend.as_ref())?;
        let resumable = self.open_upload_ids(&store_id)?;
        let recorded: Vec<String> = backend
            .list("jobs/")?
            .into_iter()
            .filter_map(|k| k.strip_prefix("jobs/").map(str::to_owned))
            .collect();
        let now = now_unix_ms();
        let cutoff = u64::try_from(older_than.as_millis()).unwrap_or(u64::MAX);
        let mut report = CleanupReport {
            aborted: Vec::new(),
            kept: 0,
            dry_run,
        };
        for u in backend.list_uploads()? {
            let ours = u.key.starts_with("packs/");
            let old = u
                .initiated_unix_ms
                .is_none_or(|t| now.saturating_sub(t) >= cutoff);
            let pack = u.key.rsplit('/').next().unwrap_or_default();
            let of_recorded_job = recorded
                .iter()
                .any(|job| job.len() == 16 && pack.starts_with(job.as_str()));
            if !ours
                || !old
                || resumable.contains(&u.upload_id)
                || (of_recorded_job && !include_stopped_jobs)
            {
                report.kept += 1;
                continue;
            }
            if !dry_run {
                backend.abort_upload(&u.key, &u.upload_id)?;
            }
            report.aborted.push(u.key);
        }
        Ok(report)
    }

    /// Upload ids of every open pack of every unfinished job of a store.
    pub fn open_upload_ids(&self, store_id: &str) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT packs.upload_id FROM packs JOIN jobs ON jobs.id = packs.job \
                 WHERE jobs.store_id = ?1 AND jobs.state = 'active' AND packs.state = 'open'",
            )
            .map_err(|e| db_err("reading packs", e))?;
        let rows = stmt
            .query_map(params![store_id], |r| r.get::<_, Option<String>>(0))
            .map_err(|e| db_err("reading packs", e))?;
        let mut out = Vec::new();
        for row in rows {
            if let Some(id) = row.map_err(|e| db_err("reading packs", e))? {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Forgets a job and everything recorded for it.
    pub fn delete(&self, job: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM jobs WHERE id = ?1", params![job])
            .map_err(|e| db_err("deleting the job", e))?;
        let _ = std::fs::remove_file(self.lock_path(job));
        Ok(())
    }

    /// Checks a store against what this client knew of it: the store at `location` must
    /// have the id it had, a store once encrypted must still be, and its format may not go
    /// back to an older version (a config swapped for a weaker one). Records it on success
    /// (`fresh`: a store just created here, which replaces any record of the location).
    pub fn pin_store(&self, location: &str, config: &StoreConfig, fresh: bool) -> Result<()> {
        let encrypted = config.encrypted();
        if !fresh {
            let known: Option<(String, bool, i64)> = self
                .conn
                .query_row(
                    "SELECT store_id, encrypted, version FROM store_pins WHERE location = ?1",
                    params![location],
                    |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0, r.get(2)?)),
                )
                .optional()
                .map_err(|e| db_err("reading store records", e))?;
            let refuse = |why: String| {
                Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "the store at {location} {why}: refusing it (its config may have been \
                         replaced). If it was re-created on purpose, forget this client's \
                         record of it (unpin the store)"
                    ),
                )
                .with_object("config")
                .with_setting("unpin"))
            };
            if let Some((id, was_encrypted, version)) = known {
                if id != config.store_id {
                    return refuse(format!(
                        "is not the store this client used there: its id was {id}, now {}",
                        config.store_id
                    ));
                }
                if was_encrypted && !encrypted {
                    return refuse("was encrypted and now says it is not".to_owned());
                }
                if version > i64::from(config.version) {
                    return refuse(format!(
                        "was in store format {version} and now says format {}",
                        config.version
                    ));
                }
            }
            // The same store seen encrypted at another location.
            let elsewhere: bool = self
                .conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM store_pins WHERE store_id = ?1 AND encrypted = 1)",
                    params![config.store_id],
                    |r| r.get(0),
                )
                .map_err(|e| db_err("reading store records", e))?;
            if elsewhere && !encrypted {
                return refuse(format!(
                    "(id {}) was encrypted where this client used it before and now says it is not",
                    config.store_id
                ));
            }
        }
        self.conn
            .execute(
                "INSERT INTO store_pins (location, store_id, encrypted, version, updated_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (location) DO UPDATE SET \
                 store_id = ?2, encrypted = ?3, version = max(version, ?4), updated_ms = ?5",
                params![
                    location,
                    config.store_id,
                    i64::from(encrypted),
                    i64::from(config.version),
                    i64_of(now_unix_ms())
                ],
            )
            .map(drop)
            .map_err(|e| db_err("recording the store", e))
    }

    /// Forgets what this client knew of the store at `location` (and of its disks' newest
    /// snapshots); true if it knew it.
    pub fn unpin_store(&self, location: &str) -> Result<bool> {
        let id: Option<String> = self
            .conn
            .query_row(
                "SELECT store_id FROM store_pins WHERE location = ?1",
                params![location],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| db_err("reading store records", e))?;
        if let Some(id) = &id {
            self.conn
                .execute(
                    "DELETE FROM store_pins WHERE location = ?1",
                    params![location],
                )
                .map_err(|e| db_err("forgetting the store", e))?;
            self.conn
                .execute("DELETE FROM disk_pins WHERE store_id = ?1", params![id])
                .map_err(|e| db_err("forgetting the store", e))?;
        }
        Ok(id.is_some())
    }

    /// The newest snapshot this client saw of a disk of a store: its sequence number and id.
    pub fn disk_pin(&self, store_id: &str, disk: &str) -> Result<Option<(u64, String)>> {
        self.conn
            .query_row(
                "SELECT seq, snapshot FROM disk_pins WHERE store_id = ?1 AND disk = ?2",
                params![store_id, disk],
                |r| Ok((u64_of(r.get(0)?), r.get(1)?)),
            )
            .optional()
            .map_err(|e| db_err("reading disk records", e))
    }

    /// Every disk of a store this client recorded: name, newest sequence number and snapshot.
    pub fn disk_pins(&self, store_id: &str) -> Result<Vec<(String, u64, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT disk, seq, snapshot FROM disk_pins WHERE store_id = ?1")
            .map_err(|e| db_err("reading disk records", e))?;
        let rows = stmt
            .query_map(params![store_id], |r| {
                Ok((r.get(0)?, u64_of(r.get(1)?), r.get(2)?))
            })
            .map_err(|e| db_err("reading disk records", e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| db_err("reading disk records", e))
    }

    /// Records that a disk's newest snapshot is at least `seq` (`snapshot`).
    pub fn set_disk_pin(&self, store_id: &str, disk: &str, seq: u64, snapshot: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO disk_pins (store_id, disk, seq, snapshot) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (store_id, disk) DO UPDATE SET seq = ?3, snapshot = ?4 \
                 WHERE ?3 > disk_pins.seq",
                params![store_id, disk, i64_of(seq), snapshot],
            )
            .map(drop)
            .map_err(|e| db_err("recording a disk", e))
    }

    /// Records that the audit log's chain `chain` of a store reached record `seq` (whose
    /// stored bytes hash to `hash`), unless a newer one was recorded.
    pub fn set_audit_head(&self, store_id: &str, chain: &str, seq: u64, hash: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO audit_heads (store_id, chain, seq, hash) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (store_id, chain) DO UPDATE SET seq = ?3, hash = ?4 \
                 WHERE ?3 > audit_heads.seq",
                params![store_id, chain, i64_of(seq), hash],
            )
            .map(drop)
            .map_err(|e| db_err("recording the audit log's head", e))
    }

    /// The newest record of each audit chain of a store this client saw: chain, seq, hash.
    pub fn audit_heads(&self, store_id: &str) -> Result<Vec<(String, u64, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT chain, seq, hash FROM audit_heads WHERE store_id = ?1")
            .map_err(|e| db_err("reading the audit log's heads", e))?;
        let rows = stmt
            .query_map(params![store_id], |r| {
                Ok((r.get(0)?, u64_of(r.get(1)?), r.get(2)?))
            })
            .map_err(|e| db_err("reading the audit log's heads", e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| db_err("reading the audit log's heads", e))
    }

    /// Records the chunk id found at disk positions.
    pub fn record_positions(&self, job: &str, positions: &[(u64, Id)]) -> Result<()> {
        if positions.is_empty() {
            return Ok(());
        }
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| db_err("recording positions", e))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO positions (job, idx, id) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| db_err("recording positions", e))?;
            for (idx, id) in positions {
                stmt.execute(params![job, i64_of(*idx), &id[..]])
                    .map_err(|e| db_err("recording positions", e))?;
            }
        }
        tx.commit().map_err(|e| db_err("recording positions", e))
    }

    /// Every recorded position of a job.
    pub fn positions(&self, job: &str) -> Result<Vec<(u64, Id)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT idx, id FROM positions WHERE job = ?1")
            .map_err(|e| db_err("reading positions", e))?;
        let rows = stmt
            .query_map(params![job], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(|e| db_err("reading positions", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (idx, id) = row.map_err(|e| db_err("reading positions", e))?;
            // A damaged row only costs reading that position again.
            if let (Ok(idx), Ok(id)) = (u64::try_from(idx), Id::try_from(id.as_slice())) {
                out.push((idx, id));
            }
        }
        Ok(out)
    }

    /// Reserves a pack id for a run's workers: a reserved pack may be in the store (complete)
    /// even if the run stopped before recording it, so a resumed run looks for each.
    pub fn reserve_pack(&self, job: &str, pack: &PackId) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO packs (job, pack, state) VALUES (?1, ?2, 'reserved')",
                params![job, &pack[..]],
            )
            .map(drop)
            .map_err(|e| db_err("reserving a pack id", e))
    }

    /// Pack ids reserved and not yet known to be open or complete.
    pub fn reserved_packs(&self, job: &str) -> Result<Vec<PackId>> {
        let mut stmt = self
            .conn
            .prepare("SELECT pack FROM packs WHERE job = ?1 AND state = 'reserved'")
            .map_err(|e| db_err("reading packs", e))?;
        let rows = stmt
            .query_map(params![job], |r| r.get::<_, Vec<u8>>(0))
            .map_err(|e| db_err("reading packs", e))?;
        let mut out = Vec::new();
        for row in rows {
            let pack = row.map_err(|e| db_err("reading packs", e))?;
            out.push(
                PackId::try_from(pack.as_slice())
                    .map_err(|_| Error::new(ErrorKind::Io, "job database: a damaged pack id"))?,
            );
        }
        Ok(out)
    }

    /// Records a pack whose multipart upload was started (reserved or not).
    pub fn open_pack(&self, job: &str, pack: &PackId, upload_id: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO packs (job, pack, upload_id, state) VALUES (?1, ?2, ?3, 'open') \
                 ON CONFLICT (job, pack) DO UPDATE SET upload_id = ?3, state = 'open'",
                params![job, &pack[..], upload_id],
            )
            .map(drop)
            .map_err(|e| db_err("recording a pack", e))
    }

    /// Records a part the store acknowledged, with the entries it carries (`last`: the pack's
    /// last part, its trailer included).
    pub fn record_part(
        &self,
        job: &str,
        pack: &PackId,
        part: &Part,
        chunks: &[Entry],
        last: bool,
    ) -> Result<()> {
        let mut blob = Vec::with_capacity(chunks.len() * format::ENTRY_BYTES);
        format::encode_entries(chunks, &mut blob);
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| db_err("recording a part", e))?;
        tx.execute(
            "INSERT OR REPLACE INTO parts (job, pack, number, size, etag, crc32c, chunks, \
             last) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                job,
                &pack[..],
                part.number,
                i64_of(part.size),
                part.etag,
                part.crc32c,
                blob,
                i64::from(last)
            ],
        )
        .map_err(|e| db_err("recording a part", e))?;
        tx.execute(
            "UPDATE jobs SET bytes_sent = bytes_sent + ?2, updated_ms = ?3 WHERE id = ?1",
            params![job, i64_of(part.size), i64_of(now_unix_ms())],
        )
        .map_err(|e| db_err("recording a part", e))?;
        tx.commit().map_err(|e| db_err("recording a part", e))
    }

    /// Records a pack as complete in the store, with its entries (pack offsets).
    pub fn complete_pack(
        &self,
        job: &str,
        pack: &PackId,
        entries: &[Entry],
        whole: Option<u64>,
    ) -> Result<()> {
        let mut blob = Vec::with_capacity(entries.len() * format::ENTRY_BYTES);
        format::encode_entries(entries, &mut blob);
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| db_err("recording a pack", e))?;
        tx.execute(
            "INSERT INTO packs (job, pack, state, entries) VALUES (?1, ?2, 'complete', ?3) \
             ON CONFLICT (job, pack) DO UPDATE SET state = 'complete', entries = ?3",
            params![job, &pack[..], blob],
        )
        .map_err(|e| db_err("recording a pack", e))?;
        tx.execute(
            "DELETE FROM parts WHERE job = ?1 AND pack = ?2",
            params![job, &pack[..]],
        )
        .map_err(|e| db_err("recording a pack", e))?;
        if let Some(bytes) = whole {
            tx.execute(
                "UPDATE jobs SET bytes_sent = bytes_sent + ?2, updated_ms = ?3 WHERE id = ?1",
                params![job, i64_of(bytes), i64_of(now_unix_ms())],
            )
            .map_err(|e| db_err("recording a pack", e))?;
        }
        tx.commit().map_err(|e| db_err("recording a pack", e))
    }

    /// Forgets a pack (its upload was aborted).
    pub fn drop_pack(&self, job: &str, pack: &PackId) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM packs WHERE job = ?1 AND pack = ?2",
                params![job, &pack[..]],
            )
            .map(drop)
            .map_err(|e| db_err("forgetting a pack", e))
    }

    /// Marks complete packs as listed in an index object of the store.
    pub fn set_indexed(&self, job: &str, packs: &[PackId]) -> Result<()> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| db_err("recording the index", e))?;
        for pack in packs {
            tx.execute(
                "UPDATE packs SET state = 'indexed' WHERE job = ?1 AND pack = ?2",
                params![job, &pack[..]],
            )
            .map_err(|e| db_err("recording the index", e))?;
        }
        tx.commit().map_err(|e| db_err("recording the index", e))
    }

    /// Complete packs, with their entries; `unindexed_only` leaves out those already indexed.
    pub fn complete_packs(
        &self,
        job: &str,
        unindexed_only: bool,
    ) -> Result<Vec<(PackId, Vec<Entry>)>> {
        let sql = if unindexed_only {
            "SELECT pack, entries FROM packs WHERE job = ?1 AND state = 'complete'"
        } else {
            "SELECT pack, entries FROM packs WHERE job = ?1 AND state IN ('complete', 'indexed')"
        };
        let mut stmt = self
            .conn
            .prepare(sql)
            .map_err(|e| db_err("reading packs", e))?;
        let rows = stmt
            .query_map(params![job], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))
            })
            .map_err(|e| db_err("reading packs", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (pack, entries) = row.map_err(|e| db_err("reading packs", e))?;
            let pack = PackId::try_from(pack.as_slice())
                .map_err(|_| Error::new(ErrorKind::Io, "job database: a damaged pack id"))?;
            let entries = format::decode_entries(&entries.unwrap_or_default())
                .ok_or_else(|| Error::new(ErrorKind::Io, "job database: damaged pack entries"))?;
            out.push((pack, entries));
        }
        Ok(out)
    }

    /// Packs whose multipart upload is open, with their acknowledged parts.
    pub fn open_packs(&self, job: &str) -> Result<Vec<OpenPack>> {
        let mut stmt = self
            .conn
            .prepare("SELECT pack, upload_id FROM packs WHERE job = ?1 AND state = 'open'")
            .map_err(|e| db_err("reading packs", e))?;
        let packs = stmt
            .query_map(params![job], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<String>>(1)?))
            })
            .map_err(|e| db_err("reading packs", e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| db_err("reading packs", e))?;
        let mut out = Vec::new();
        for (pack, upload_id) in packs {
            let pack = PackId::try_from(pack.as_slice())
                .map_err(|_| Error::new(ErrorKind::Io, "job database: a damaged pack id"))?;
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT number, size, etag, crc32c, chunks, last FROM parts \
                     WHERE job = ?1 AND pack = ?2 ORDER BY number",
                )
                .map_err(|e| db_err("reading parts", e))?;
            let parts = stmt
                .query_map(params![job, &pack[..]], |r| {
                    Ok((
                        Part {
                            number: r.get(0)?,
                            size: u64_of(r.get(1)?),
                            etag: r.get(2)?,
                            crc32c: r.get(3)?,
                        },
                        r.get::<_, Vec<u8>>(4)?,
                        r.get::<_, i64>(5)? != 0,
                    ))
                })
                .map_err(|e| db_err("reading parts", e))?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(|e| db_err("reading parts", e))?;
            let mut decoded = Vec::new();
            let mut last_part = None;
            for (part, chunks, last) in parts {
                let chunks = format::decode_entries(&chunks).ok_or_else(|| {
                    Error::new(ErrorKind::Io, "job database: damaged part entries")
                })?;
                if last {
                    last_part = Some(part.number);
                }
                decoded.push((part, chunks));
            }
            out.push(OpenPack {
                pack,
                upload_id: upload_id.unwrap_or_default(),
                parts: decoded,
                last_part,
            });
        }
        Ok(out)
    }
}
