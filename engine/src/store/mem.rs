//! Stores for tests of crash safety: [`MemStore`], objects in memory with multipart uploads
//! as S3 has them, and [`FaultyStore`], a wrapper that fails, or "crashes" at, the k-th
//! mutating operation.
//!
//! A crash stops the process's view of the store at one operation: that operation and every
//! mutating one after it fail, as if the process had been killed there; reads go on. A run
//! against a crashed store fails, and a run against the store beneath (the state the crash
//! left) resumes or reruns.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{ObjectStore, Part, PartRules, PutMode, PutOutcome, Upload, check_key};
use crate::error::{Error, ErrorKind, Result};

/// An open multipart upload: its key, the parts acknowledged and their bytes.
type OpenUpload = (String, BTreeMap<u32, Part>, BTreeMap<u32, Vec<u8>>);

/// Objects kept in memory, with multipart uploads (parts in memory until completed).
#[derive(Debug, Default)]
pub struct MemStore {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
    uploads: Mutex<HashMap<String, OpenUpload>>,
    next_upload: AtomicU64,
    /// Multipart part rules, if it takes multipart uploads.
    rules: Option<PartRules>,
}

impl MemStore {
    /// An empty store that takes whole objects only (like a local folder).
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// An empty store that takes multipart uploads under `rules` (like S3).
    pub fn multipart(rules: PartRules) -> MemStore {
        MemStore {
            rules: Some(rules),
            ..MemStore::default()
        }
    }
}

fn missing(key: &str) -> Error {
    Error::new(ErrorKind::NotFound, "no such object").with_object(key)
}

impl ObjectStore for MemStore {
    fn location(&self) -> String {
        "memory".to_owned()
    }

    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<PutOutcome> {
        check_key(key)?;
        let mut objects = self.objects.lock().expect("objects");
        if mode == PutMode::Create && objects.contains_key(key) {
            return Ok(PutOutcome::AlreadyExists);
        }
        objects.insert(key.to_owned(), data.to_vec());
        Ok(PutOutcome::Written)
    }

    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>> {
        let objects = self.objects.lock().expect("objects");
        let data = objects.get(key).ok_or_else(|| missing(key))?;
        if data.len() as u64 > max_len {
            return Err(Error::corrupt(key, "object larger than it may be"));
        }
        Ok(data.clone())
    }

    fn get_range(&self, key: &str, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
        let objects = self.objects.lock().expect("objects");
        let data = objects.get(key).ok_or_else(|| missing(key))?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let piece = start
            .checked_add(len)
            .and_then(|end| data.get(start..end))
            .ok_or_else(|| Error::corrupt(key, "range past the end of the object (truncated)"))?;
        buf.clear();
        buf.extend_from_slice(piece);
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .objects
            .lock()
            .expect("objects")
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }

    fn size(&self, key: &str) -> Result<u64> {
        let objects = self.objects.lock().expect("objects");
        Ok(objects.get(key).ok_or_else(|| missing(key))?.len() as u64)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.objects.lock().expect("objects").remove(key);
        Ok(())
    }

    fn multipart(&self) -> Option<PartRules> {
        self.rules
    }

    fn create_upload(&self, key: &str) -> Result<String> {
        check_key(key)?;
        let id = format!("up{}", self.next_upload.fetch_add(1, Ordering::Relaxed));
        self.uploads.lock().expect("uploads").insert(
            id.clone(),
            (key.to_owned(), BTreeMap::new(), BTreeMap::new()),
        );
        Ok(id)
    }

    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        data: bytes::Bytes,
    ) -> Result<Part> {
        let mut uploads = self.uploads.lock().expect("uploads");
        let (_, parts, bodies) = uploads
            .get_mut(upload_id)
            .filter(|(k, _, _)| k == key)
            .ok_or_else(|| missing(key))?;
        let part = Part {
            number,
            size: data.len() as u64,
            etag: format!("{:08x}", crc32c::crc32c(&data)),
            crc32c: String::new(),
        };
        parts.insert(number, part.clone());
        bodies.insert(number, data.to_vec());
        Ok(part)
    }

    fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<Part>> {
        let uploads = self.uploads.lock().expect("uploads");
        let (_, parts, _) = uploads
            .get(upload_id)
            .filter(|(k, _, _)| k == key)
            .ok_or_else(|| missing(key))?;
        Ok(parts.values().cloned().collect())
    }

    fn complete_upload(&self, key: &str, upload_id: &str, parts: &[Part]) -> Result<()> {
        let mut uploads = self.uploads.lock().expect("uploads");
        let Some((k, held, bodies)) = uploads.remove(upload_id) else {
            // Completed before (an answer lost): the object is there.
            return self.size(key).map(drop);
        };
        let mut data = Vec::new();
        for p in parts {
            match (held.get(&p.number), bodies.get(&p.number)) {
                (Some(h), Some(body)) if h.etag == p.etag && k == key => {
                    data.extend_from_slice(body);
                }
                _ => {
                    uploads.insert(upload_id.to_owned(), (k, held, bodies));
                    return Err(Error::new(ErrorKind::Store, "InvalidPart").with_object(key));
                }
            }
        }
        self.objects
            .lock()
            .expect("objects")
            .insert(key.to_owned(), data);
        Ok(())
    }

    fn abort_upload(&self, _key: &str, upload_id: &str) -> Result<()> {
        self.uploads.lock().expect("uploads").remove(upload_id);
        Ok(())
    }

    fn list_uploads(&self) -> Result<Vec<Upload>> {
        Ok(self
            .uploads
            .lock()
            .expect("uploads")
            .iter()
            .map(|(id, (key, _, _))| Upload {
                key: key.clone(),
                upload_id: id.clone(),
                initiated_unix_ms: Some(0),
            })
            .collect())
    }
}

/// What a mutating operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `put`.
    Put,
    /// `delete`.
    Delete,
    /// `create_upload`.
    CreateUpload,
    /// `upload_part`.
    UploadPart,
    /// `complete_upload`.
    CompleteUpload,
    /// `abort_upload`.
    AbortUpload,
}

/// What a [`FaultyStore`] does at its k-th mutating operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing: it only counts.
    None,
    /// The k-th mutating operation (from 1) fails; the others go through.
    FailAt(u64),
    /// The k-th mutating operation and every one after it fail (the process stops there).
    CrashAt(u64),
}

/// Called before each mutating operation with its number (from 1), kind and key.
pub type Hook = dyn Fn(u64, Op, &str) + Send + Sync;

/// A store that passes everything to another and fails, or crashes at, a mutating operation;
/// it counts mutating operations and the bytes of pack data acknowledged.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    fault: Fault,
    ops: AtomicU64,
    pack_bytes: AtomicU64,
    hook: Option<Box<Hook>>,
}

impl std::fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyStore")
            .field("fault", &self.fault)
            .field("ops", &self.ops)
            .finish_non_exhaustive()
    }
}

impl FaultyStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, fault: Fault) -> FaultyStore {
        FaultyStore {
            inner,
            fault,
            ops: AtomicU64::new(0),
            pack_bytes: AtomicU64::new(0),
            hook: None,
        }
    }

    /// Calls `hook` before each mutating operation.
    #[must_use]
    pub fn with_hook(mut self, hook: Box<Hook>) -> FaultyStore {
        self.hook = Some(hook);
        self
    }

    /// Mutating operations asked for so far (failed ones included).
    pub fn mutations(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    /// Bytes of packs the store acknowledged (whole packs put, parts uploaded).
    pub fn pack_bytes(&self) -> u64 {
        self.pack_bytes.load(Ordering::SeqCst)
    }

    fn step(&self, op: Op, key: &str) -> Result<()> {
        let k = self.ops.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(hook) = &self.hook {
            hook(k, op, key);
        }
        let fails = match self.fault {
            Fault::None => false,
            Fault::FailAt(at) => k == at,
            Fault::CrashAt(at) => k >= at,
        };
        if fails {
            return Err(Error::new(
                ErrorKind::Store,
                format!("injected fault at mutating operation {k} ({op:?})"),
            )
            .with_object(key));
        }
        Ok(())
    }
}

impl ObjectStore for FaultyStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<PutOutcome> {
        self.step(Op::Put, key)?;
        let out = self.inner.put(key, data, mode)?;
        if key.starts_with("packs/") && out == PutOutcome::Written {
            self.pack_bytes
                .fetch_add(data.len() as u64, Ordering::SeqCst);
        }
        Ok(out)
    }
    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>> {
        self.inner.get(key, max_len)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.get_range(key, offset, len, buf)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn list_modified(&self, prefix: &str) -> Result<Vec<(String, Option<u64>)>> {
        self.inner.list_modified(prefix)
    }
    fn size(&self, key: &str) -> Result<u64> {
        self.inner.size(key)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.step(Op::Delete, key)?;
        self.inner.delete(key)
    }
    fn multipart(&self) -> Option<PartRules> {
        self.inner.multipart()
    }
    fn create_upload(&self, key: &str) -> Result<String> {
        self.step(Op::CreateUpload, key)?;
        self.inner.create_upload(key)
    }
    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        data: bytes::Bytes,
    ) -> Result<Part> {
        self.step(Op::UploadPart, key)?;
        let n = data.len() as u64;
        let part = self.inner.upload_part(key, upload_id, number, data)?;
        self.pack_bytes.fetch_add(n, Ordering::SeqCst);
        Ok(part)
    }
    fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<Part>> {
        self.inner.list_parts(key, upload_id)
    }
    fn complete_upload(&self, key: &str, upload_id: &str, parts: &[Part]) -> Result<()> {
        self.step(Op::CompleteUpload, key)?;
        self.inner.complete_upload(key, upload_id, parts)
    }
    fn abort_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        self.step(Op::AbortUpload, key)?;
        self.inner.abort_upload(key, upload_id)
    }
    fn list_uploads(&self) -> Result<Vec<Upload>> {
        self.inner.list_uploads()
    }
}
