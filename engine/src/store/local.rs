//! The local-directory backend: one file per object under a root folder.
//!
//! Writes are atomic and durable: data goes to `tmp/` first, is fsynced, then linked (create)
//! or renamed (overwrite) into place, and the parent folder is fsynced. A reader never sees a
//! partial object, and a killed writer leaves at most a stray file in `tmp/`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{ObjectStore, PutMode, PutOutcome, check_key};
use crate::error::{Error, ErrorKind, Result};
use crate::store::crypto;
use crate::store::format::hex;

/// Stray temporary files older than this are removed when a store is opened for writing.
const STALE_TMP: Duration = Duration::from_secs(24 * 3600);

/// A store kept in a local folder.
#[derive(Debug)]
pub(crate) struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (without creating) a store folder.
    pub(crate) fn open(root: &Path) -> Result<LocalStore> {
        let meta = fs::metadata(root).map_err(|e| {
            let kind = if e.kind() == io::ErrorKind::NotFound {
                ErrorKind::NotFound
            } else {
                ErrorKind::Store
            };
            Error::new(kind, "cannot open the store folder")
                .with_path(root)
                .with_source(e)
        })?;
        if !meta.is_dir() {
            return Err(Error::new(ErrorKind::Store, "store path is not a folder").with_path(root));
        }
        let store = LocalStore {
            root: root.to_path_buf(),
        };
        store.remove_stale_tmp();
        Ok(store)
    }

    /// Creates the store folder if needed and opens it.
    pub(crate) fn create(root: &Path) -> Result<LocalStore> {
        fs::create_dir_all(root).map_err(|e| store_err("creating the store folder", root, e))?;
        LocalStore::open(root)
    }

    fn path_of(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Removes temporary files that a killed writer left behind more than a day ago.
    pub(crate) fn remove_stale_tmp(&self) {
        let Ok(entries) = fs::read_dir(self.tmp_dir()) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STALE_TMP);
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    fn write_tmp(&self, data: &[u8]) -> Result<PathBuf> {
        let dir = self.tmp_dir();
        fs::create_dir_all(&dir).map_err(|e| store_err("creating tmp folder", &dir, e))?;
        let name: [u8; 12] = crypto::random()?;
        let path = dir.join(format!("{}.tmp", hex(&name)));
        let direct = data.len() >= DIRECT_MIN;
        let opened = open_tmp(&path, direct).or_else(|e| {
            // File systems without O_DIRECT (tmpfs, some FUSE) refuse it at open.
            if direct && e.raw_os_error() == Some(libc::EINVAL) {
                open_tmp(&path, false)
            } else {
                Err(e)
            }
        });
        let (f, direct) = opened.map_err(|e| store_err("creating a temporary object", &path, e))?;
        let written = if direct {
            write_direct(&f, &path, data)
        } else {
            (&f).write_all(data)
        };
        written.and_then(|()| f.sync_all()).map_err(|e| {
            let _ = fs::remove_file(&path);
            store_err("writing a temporary object", &path, e)
        })?;
        Ok(path)
    }
}

/// Objects from this size on (packs) are written with `O_DIRECT`: they are not read back
/// soon, so they go past the page cache instead of evicting the host's (and the copy into
/// fresh cache pages, which measured here as a quarter of a replication's CPU time, is
/// saved).
const DIRECT_MIN: usize = 1 << 20;
/// Bytes staged in an aligned buffer per `O_DIRECT` write.
const DIRECT_PIECE: usize = 4 << 20;

/// Creates a temporary object file, with `O_DIRECT` if asked; says whether it has it.
fn open_tmp(path: &Path, direct: bool) -> io::Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).map(|f| (f, direct))
}

/// Writes `data` to a new file opened with `O_DIRECT`: the whole blocks straight from `data`
/// when it is aligned (a replication's packs are), else through an aligned staging buffer;
/// the tail (less than a block) through a buffered descriptor. Should the file system refuse
/// a direct write after all, the rest goes buffered.
fn write_direct(f: &File, path: &Path, data: &[u8]) -> io::Result<()> {
    use crate::io::sys::{AlignedBuf, DIRECT_ALIGN};
    thread_local! {
        static STAGE: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::new(AlignedBuf::empty());
    }
    let whole = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
    let aligned = (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN);
    let done = STAGE.with_borrow_mut(|stage| -> io::Result<usize> {
        if !aligned && stage.capacity() < DIRECT_PIECE {
            *stage = AlignedBuf::new(DIRECT_PIECE);
        }
        let mut at = 0;
        while at < whole {
            let n = if aligned {
                whole - at
            } else {
                DIRECT_PIECE.min(whole - at)
            };
            let piece: &[u8] = if aligned {
                &data[at..at + n]
            } else {
                stage.set_len(n);
                stage.copy_from_slice(&data[at..at + n]);
                stage
            };
            match f.write_at(piece, at as u64) {
                // Only whole blocks keep the next write aligned.
                Ok(w) if w > 0 && w % DIRECT_ALIGN == 0 => at += w,
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(at)
    })?;
    if done < data.len() {
        let buffered = OpenOptions::new().write(true).open(path)?;
        buffered.write_all_at(&data[done..], done as u64)?;
        buffered.sync_all()?;
    }
    Ok(())
}

fn store_err(what: &str, path: &Path, e: io::Error) -> Error {
    Error::new(ErrorKind::Store, what)
        .with_path(path)
        .with_source(e)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| store_err("syncing folder", dir, e))
}

/// Creates `dir` and its missing ancestors below `root`, syncing each parent it changed.
fn create_dirs(root: &Path, dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && parent != root
    {
        create_dirs(root, parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(dir.parent().unwrap_or(root)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(store_err("creating folder", dir, e)),
    }
}

impl ObjectStore for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn free_bytes(&self) -> Result<Option<u64>> {
        crate::io::sys::free_bytes(&self.root)
            .map(Some)
            .map_err(|e| store_err("reading the free space of", &self.root, e))
    }

    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<PutOutcome> {
        let path = self.path_of(key)?;
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        create_dirs(&self.root, &parent)?;
        let tmp = self.write_tmp(data)?;
        let outcome = match mode {
            PutMode::Overwrite => fs::rename(&tmp, &path)
                .map(|()| PutOutcome::Written)
                .map_err(|e| store_err("moving an object into place", &path, e)),
            PutMode::Create => {
                // A hard link fails if the target exists: an atomic "create if absent".
                let r = match fs::hard_link(&tmp, &path) {
                    Ok(()) => Ok(PutOutcome::Written),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        Ok(PutOutcome::AlreadyExists)
                    }
                    // File systems without hard links: check, then rename. Only a concurrent
                    // writer of the very same key could slip in between, and object names are
                    // random or content ids, so that writer would be writing the same bytes.
                    Err(e)
                        if e.kind() == io::ErrorKind::Unsupported
                            || e.raw_os_error() == Some(libc::EPERM) =>
                    {
                        if path.exists() {
                            Ok(PutOutcome::AlreadyExists)
                        } else {
                            fs::rename(&tmp, &path)
                                .map(|()| PutOutcome::Written)
                                .map_err(|e| store_err("moving an object into place", &path, e))
                        }
                    }
                    Err(e) => Err(store_err("linking an object into place", &path, e)),
                };
                let _ = fs::remove_file(&tmp);
                r
            }
        };
        if outcome.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        let outcome = outcome?;
        sync_dir(&parent)?;
        Ok(outcome)
    }

    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>> {
        use std::io::Read;
        let path = self.path_of(key)?;
        let mut f = File::open(&path).map_err(|e| object_err(key, &path, e))?;
        let len = f.metadata().map_err(|e| object_err(key, &path, e))?.len();
        if len > max_len {
            return Err(Error::corrupt(
                key,
                format!("object is {len} bytes, more than the {max_len} such an object may have"),
            ));
        }
        let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        // `take` guards against a file growing between the size check and the read.
        Read::by_ref(&mut f)
            .take(max_len)
            .read_to_end(&mut buf)
            .map_err(|e| object_err(key, &path, e))?;
        Ok(buf)
    }

    fn get_range(&self, key: &str, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
        let path = self.path_of(key)?;
        let f = File::open(&path).map_err(|e| object_err(key, &path, e))?;
        buf.clear();
        buf.resize(len, 0);
        f.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::corrupt(key, "object truncated: range reaches past its end")
                    .with_offset(offset)
            } else {
                object_err(key, &path, e).with_offset(offset)
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = self.path_of(prefix.trim_end_matches('/'))?;
        let mut keys = Vec::new();
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(store_err("listing objects", &dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| store_err("listing objects", &dir, e))?;
                let path = entry.path();
                let ft = entry
                    .file_type()
                    .map_err(|e| store_err("listing objects", &path, e))?;
                if ft.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(&self.root)
                    && let Some(key) = rel.to_str()
                    && check_key(key).is_ok()
                {
                    keys.push(key.to_owned());
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    fn list_modified(&self, prefix: &str) -> Result<Vec<(String, Option<u64>)>> {
        let mut out = Vec::new();
        for key in self.list(prefix)? {
            let modified = fs::metadata(self.path_of(&key)?)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .and_then(|d| u64::try_from(d.as_millis()).ok());
            out.push((key, modified));
        }
        Ok(out)
    }

    fn size(&self, key: &str) -> Result<u64> {
        let path = self.path_of(key)?;
        fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| object_err(key, &path, e))
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(store_err("deleting an object", &path, e)),
        }
    }
}

fn object_err(key: &str, path: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::new(ErrorKind::NotFound, "object missing from the store")
            .with_object(key)
            .with_path(path)
    } else {
        Error::new(ErrorKind::Store, "reading an object")
            .with_object(key)
            .with_path(path)
            .with_source(e)
    }
}
