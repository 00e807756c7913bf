//! A snapshot as a readable disk: chunks fetched from the store when first read, kept in a
//! cache of bounded size, and read ahead of a client reading in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, ErrorKind, Result};
use crate::store::format::{Id, ZERO_ID};
use crate::store::{ChunkIndex, Snapshot, Store};

/// Pages of chunk ids kept (each is 128 KiB at most).
const PAGES_KEPT: usize = 16;

/// Buffers of evicted chunks kept for the next fetches: memory the process touched already
/// (a fresh buffer costs the kernel a page fault and a zeroed page for every 4 KiB).
const SPARE_BUFFERS: usize = 8;

thread_local! {
    /// A fetching thread's scratch space for a sealed chunk record.
    static RECORD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A chunk as a reader gets it: its bytes, or zeros.
#[derive(Clone)]
pub(crate) enum Chunk {
    Zero,
    Data(Arc<Vec<u8>>),
}

/// What the disk did, for reports and tests.
#[derive(Debug, Default)]
pub(crate) struct DiskCounters {
    pub(crate) fetched: AtomicU64,
    pub(crate) fetched_bytes: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) cached_bytes_peak: AtomicU64,
}

struct Cache {
    chunks: HashMap<u64, (Arc<Vec<u8>>, u64)>,
    bytes: u64,
    clock: u64,
    /// Chunks being fetched (a second reader waits instead of fetching again).
    loading: std::collections::HashSet<u64>,
    pages: Vec<(usize, Arc<Vec<Id>>)>,
}

/// A snapshot read through the store.
pub(crate) struct Disk {
    store: Arc<Store>,
    pub(crate) snapshot: Snapshot,
    index: ChunkIndex,
    pub(crate) chunk: u64,
    pub(crate) size: u64,
    limit: u64,
    cache: Mutex<Cache>,
    loaded: Condvar,
    spare: Mutex<Vec<Vec<u8>>>,
    pub(crate) counters: DiskCounters,
}

impl Disk {
    /// The snapshot `spec` of `store`, with a chunk cache of at most `cache_bytes` (at least
    /// one chunk's worth, so that a read always goes through).
    pub(crate) fn open(store: Arc<Store>, spec: &str, cache_bytes: u64) -> Result<Disk> {
        let snapshot = store.snapshot(spec)?;
        let index = store.load_index()?;
        let chunk = u64::from(snapshot.chunk_size);
        Ok(Disk {
            size: snapshot.disk.virtual_size,
            chunk,
            limit: cache_bytes.max(chunk),
            index,
            snapshot,
            store,
            cache: Mutex::new(Cache {
                chunks: HashMap::new(),
                bytes: 0,
                clock: 0,
                loading: std::collections::HashSet::new(),
                pages: Vec::new(),
            }),
            loaded: Condvar::new(),
            spare: Mutex::new(Vec::new()),
            counters: DiskCounters::default(),
        })
    }

    /// Number of chunks.
    pub(crate) fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk)
    }

    /// The length of chunk `c`.
    pub(crate) fn chunk_len(&self, c: u64) -> u64 {
        self.chunk.min(self.size.saturating_sub(c * self.chunk))
    }

    /// The id of chunk `c`.
    pub(crate) fn id(&self, c: u64) -> Result<Id> {
        let per_page = u64::from(self.snapshot.page_entries);
        let page = usize::try_from(c / per_page).map_err(|_| Error::internal("page index"))?;
        let ids = self.page(page)?;
        Ok(usize::try_from(c % per_page)
            .ok()
            .and_then(|i| ids.get(i))
            .copied()
            .unwrap_or(ZERO_ID))
    }

    fn page(&self, page: usize) -> Result<Arc<Vec<Id>>> {
        if let Some((_, ids)) = self
            .cache
            .lock()
            .expect("cache")
            .pages
            .iter()
            .find(|(p, _)| *p == page)
        {
            return Ok(ids.clone());
        }
        let ids = Arc::new(match self.snapshot.page_id(page)? {
            Some(id) => self.store.read_page(&id)?,
            None => Vec::new(),
        });
        let mut cache = self.cache.lock().expect("cache");
        if cache.pages.len() >= PAGES_KEPT {
            cache.pages.remove(0);
        }
        cache.pages.push((page, ids.clone()));
        Ok(ids)
    }

    /// Whether chunk `c` holds data (else it reads as zeros).
    pub(crate) fn allocated(&self, c: u64) -> Result<bool> {
        Ok(self.id(c)? != ZERO_ID)
    }

    /// Chunk `c`, from the cache or the store.
    pub(crate) fn chunk(&self, c: u64) -> Result<Chunk> {
        let id = self.id(c)?;
        if id == ZERO_ID {
            return Ok(Chunk::Zero);
        }
        {
            let mut cache = self.cache.lock().expect("cache");
            loop {
                cache.clock += 1;
                let now = cache.clock;
                if let Some((data, used)) = cache.chunks.get_mut(&c) {
                    *used = now;
                    self.counters.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Chunk::Data(data.clone()));
                }
                if !cache.loading.contains(&c) {
                    cache.loading.insert(c);
                    break;
                }
                cache = self.loaded.wait(cache).expect("cache");
            }
        }
        let fetched = self.fetch(c, &id);
        let mut cache = self.cache.lock().expect("cache");
        cache.loading.remove(&c);
        let result = fetched.map(|data| {
            let data = Arc::new(data);
            let len = data.len() as u64;
            // Least recently used chunks go until this one fits.
            while cache.bytes + len > self.limit {
                let Some((&old, _)) = cache.chunks.iter().min_by_key(|(_, (_, used))| *used) else {
                    break;
                };
                if let Some((gone, _)) = cache.chunks.remove(&old) {
                    cache.bytes -= gone.len() as u64;
                    // Unless a reader still holds it, the buffer serves a later fetch.
                    if let Ok(buf) = Arc::try_unwrap(gone) {
                        let mut spare = self.spare.lock().expect("spare buffers");
                        if spare.len() < self.spare_kept() {
                            spare.push(buf);
                        }
                    }
                }
            }
            cache.clock += 1;
            let now = cache.clock;
            cache.chunks.insert(c, (data.clone(), now));
            cache.bytes += len;
            self.counters
                .cached_bytes_peak
                .fetch_max(cache.bytes, Ordering::Relaxed);
            Chunk::Data(data)
        });
        self.loaded.notify_all();
        result
    }

    /// How many spare buffers are kept: a quarter of the cache's worth at most.
    fn spare_kept(&self) -> usize {
        usize::try_from(self.limit / self.chunk / 4)
            .unwrap_or(SPARE_BUFFERS)
            .clamp(1, SPARE_BUFFERS)
    }

    /// Whether chunk `c` is cached or being fetched (read-ahead skips it).
    pub(crate) fn has(&self, c: u64) -> bool {
        let cache = self.cache.lock().expect("cache");
        cache.chunks.contains_key(&c) || cache.loading.contains(&c)
    }

    fn fetch(&self, c: u64, id: &Id) -> Result<Vec<u8>> {
        let mut data = self
            .spare
            .lock()
            .expect("spare buffers")
            .pop()
            .unwrap_or_default();
        let offset = c * self.chunk;
        RECORD
            .with_borrow_mut(|record| self.store.read_chunk(&self.index, id, record, &mut data))
            .map_err(|e| e.at_disk_offset(offset))?;
        if data.len() as u64 != self.chunk_len(c) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "a chunk's length disagrees with its position in the snapshot",
            )
            .at_disk_offset(offset));
        }
        self.counters.fetched.fetch_add(1, Ordering::Relaxed);
        self.counters
            .fetched_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }
}
