//! Store locks: who is using a store right now, so that a garbage collection never deletes
//! what a running replication, restore or verify relies on.
//!
//! A lock is a small plaintext JSON object `locks/<16 hex>` (docs/FORMAT.md, "Locks").
//! Replications, restores and verifies hold a **shared** lock for their whole run; a garbage
//! collection holds a **gc** lock (one gc per store) while it marks and repacks beside them,
//! then an **exclusive** lock for the short phase in which it deletes. Both sides write their
//! lock first and list the locks second, so of two that start together at least one sees the
//! other: a shared holder that sees an exclusive lock withdraws and waits for it to go; the
//! gc that sees shared locks waits for them to go. Nothing is deleted while a lock other than
//! the gc's own is live.
//!
//! Locks are refreshed every [`LOCK_REFRESH`] (a new object, then the old one deleted: objects
//! are never overwritten). A lock is stale when it was not refreshed for [`LOCK_STALE`], or
//! when it names this host (and boot) and its process is gone; stale locks are ignored and a
//! gc deletes them. A holder that could not refresh for [`LOCK_VALID`] may already be taken
//! for stale, so it does not commit ([`StoreLock::check`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{ObjectStore, PutOutcome, Store, crypto, format::hex, now_unix_ms};
use crate::error::{Error, ErrorKind, Result};
use crate::job::{CancelToken, Event, Observer};

/// How often a holder writes its lock anew.
pub(crate) const LOCK_REFRESH: Duration = Duration::from_secs(5 * 60);
/// A lock not refreshed for this long is stale: its holder is taken for dead.
pub(crate) const LOCK_STALE: Duration = Duration::from_secs(30 * 60);
/// A holder whose last successful refresh is older than this does not commit.
pub(crate) const LOCK_VALID: Duration = Duration::from_secs(20 * 60);
/// How often a waiter looks at the locks again.
const POLL: Duration = Duration::from_millis(500);
/// Largest lock object read (they are about 200 bytes).
const MAX_LOCK_BYTES: u64 = 64 << 10;

/// What a lock allows its holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LockKind {
    /// Reads and writes beside other shared holders and a marking gc.
    Shared,
    /// A garbage collection that marks and repacks; one per store.
    Gc,
    /// A garbage collection that deletes; no other lock is live meanwhile.
    Exclusive,
}

/// The content of a lock object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LockInfo {
    /// What the lock allows.
    pub kind: LockKind,
    /// What the holder does (`replicate`, `restore`, `verify`, `gc`).
    pub operation: String,
    /// The holder's host name.
    pub host: String,
    /// The holder's boot id (Linux), to tell a reboot from a live process.
    #[serde(default)]
    pub boot: String,
    /// The holder's PID namespace (Linux), so that containers sharing a host name and boot
    /// never judge each other's processes.
    #[serde(default)]
    pub pidns: String,
    /// The holder's process id.
    pub pid: u32,
    /// When the holder first took the lock, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// When this object was written.
    pub refreshed_unix_ms: u64,
    /// The disk a replication holds (its name's keyed hash, as in object keys): one run per
    /// disk at a time, on any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

impl LockInfo {
    fn new(kind: LockKind, operation: &str) -> LockInfo {
        let now = now_unix_ms();
        let me = Identity::here();
        LockInfo {
            kind,
            operation: operation.to_owned(),
            host: me.host,
            boot: me.boot,
            pidns: me.pidns,
            pid: std::process::id(),
            created_unix_ms: now,
            refreshed_unix_ms: now,
            disk: None,
        }
    }

    /// Whether the holder is taken for dead: not refreshed for [`LOCK_STALE`] (`age_ms`: how
    /// long ago its object was written, by the store's clock), from an earlier boot of this
    /// host, or from a process of this host, boot and PID namespace that is gone. A process
    /// this host cannot judge (another host, another namespace, `/proc` hidden) counts as
    /// alive.
    pub(crate) fn is_stale(&self, age_ms: u64) -> bool {
        if u128::from(age_ms) > LOCK_STALE.as_millis() {
            return true;
        }
        let me = Identity::here();
        if self.host != me.host || self.boot.is_empty() || me.boot.is_empty() {
            return false;
        }
        if self.boot != me.boot {
            return true;
        }
        !self.pidns.is_empty()
            && self.pidns == me.pidns
            && can_see_processes()
            && !pid_alive(self.pid)
    }

    /// One line for messages: `replicate (shared) by pid 42 on host, since …`.
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} ({}) by pid {} on {}, started {} s ago",
            self.operation,
            match self.kind {
                LockKind::Shared => "shared",
                LockKind::Gc => "gc",
                LockKind::Exclusive => "exclusive",
            },
            self.pid,
            self.host,
            now_unix_ms().saturating_sub(self.created_unix_ms) / 1000
        )
    }
}

/// Who this process is, as far as lock staleness goes.
struct Identity {
    host: String,
    boot: String,
    pidns: String,
}

impl Identity {
    fn here() -> Identity {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let mut host = read("/proc/sys/kernel/hostname");
        if host.is_empty() {
            host = read("/etc/hostname");
        }
        if host.is_empty() {
            host = std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".to_owned());
        }
        let pidns = std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Identity {
            host,
            boot: read("/proc/sys/kernel/random/boot_id"),
            pidns,
        }
    }
}

/// This host's name, as locks record it.
pub(crate) fn host_name() -> String {
    Identity::here().host
}

/// Whether `/proc` shows every process (not mounted with `hidepid`).
fn can_see_processes() -> bool {
    std::fs::read_to_string("/proc/1/stat").is_ok()
}

/// Whether a process of this host is alive (not gone, not a zombie).
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => match stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
        {
            Some(state) => !matches!(state, "Z" | "X" | "x"),
            None => true,
        },
        Err(_) => false,
    }
}

/// A lock object as listed: its key and, if readable, its content.
#[derive(Debug, Clone)]
pub(crate) struct ListedLock {
    /// The object key.
    pub key: String,
    /// The content; `None` if the object could not be parsed (ignored, never deleted).
    pub info: Option<LockInfo>,
    /// When the store says the object was written (ms since the Unix epoch), if it says.
    pub modified_ms: Option<u64>,
}

/// Every lock object of the store. A lock that vanishes between the listing and its read
/// may have been replaced by a refresh, so the listing is taken again until it reads whole.
pub(crate) fn list_locks(backend: &dyn ObjectStore) -> Result<Vec<ListedLock>> {
    let mut attempt = 0;
    'list: loop {
        attempt += 1;
        let mut out = Vec::new();
        for (key, modified_ms) in backend.list_modified("locks/")? {
            match backend.get(&key, MAX_LOCK_BYTES) {
                Ok(raw) => {
                    let info = serde_json::from_slice::<LockInfo>(&raw).ok();
                    if info.is_none() {
                        tracing::warn!(object = key, "a lock object that is not readable");
                    }
                    out.push(ListedLock {
                        key,
                        info,
                        modified_ms,
                    });
                }
                Err(e) if e.kind() == ErrorKind::NotFound && attempt < 20 => continue 'list,
                // Released for good (or refreshed that often): left out.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                // Larger than any lock: not one of ours to read.
                Err(e) if e.kind() == ErrorKind::Corrupt => {
                    out.push(ListedLock {
                        key,
                        info: None,
                        modified_ms,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        return Ok(out);
    }
}

fn write_lock(backend: &dyn ObjectStore, info: &LockInfo) -> Result<String> {
    let key = format!("locks/{}", hex(&crypto::random::<8>()?));
    let json =
        serde_json::to_vec(info).map_err(|e| Error::internal("encoding a lock").with_source(e))?;
    match super::create_object(backend, &key, &json)? {
        PutOutcome::Written => Ok(key),
        PutOutcome::AlreadyExists => Err(Error::internal(
            "refusing to overwrite an existing lock (random name collided)",
        )
        .with_object(&key)),
    }
}

/// The locks other than one's own: live ones, and how many could not be read.
struct Others {
    live: Vec<LockInfo>,
    unreadable: usize,
}

/// The store's clock as last seen: when the store said it wrote one of our objects, and when
/// (by this process's monotonic clock) we wrote it. The store's "now" is the one plus the time
/// since the other.
type StoreClock = Option<(u64, Instant)>;

/// Locks other than `own` (keys, each with when this process wrote it), optionally deleting
/// the stale ones found. Age is judged by the store's clock (`clock`, set from one of our own
/// objects when the listing shows one, else as last set): a lock's age is how long before
/// the store's "now" its object was written, so no writer's clock enters. Without a store
/// time (a backend that gives none), the holder's own time against this host's clock.
fn others(
    backend: &dyn ObjectStore,
    own: &[(String, Instant)],
    clock: &mut StoreClock,
    delete_stale: bool,
) -> Result<Others> {
    let listed = list_locks(backend)?;
    for l in &listed {
        if let (Some((_, at)), Some(t)) = (own.iter().find(|(k, _)| *k == l.key), l.modified_ms) {
            let now = |c: &(u64, Instant)| {
                c.0.saturating_add(u64::try_from(c.1.elapsed().as_millis()).unwrap_or(u64::MAX))
            };
            if clock.as_ref().is_none_or(|c| now(c) < now(&(t, *at))) {
                *clock = Some((t, *at));
            }
        }
    }
    let store_now = clock.as_ref().map(|(t, at)| {
        t.saturating_add(u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX))
    });
    let local_now = now_unix_ms();
    let mut out = Others {
        live: Vec::new(),
        unreadable: 0,
    };
    for l in listed {
        if own.iter().any(|(k, _)| *k == l.key) {
            continue;
        }
        let Some(info) = l.info else {
            out.unreadable += 1;
            continue;
        };
        let age = match (store_now, l.modified_ms) {
            (Some(now), Some(written)) => now.saturating_sub(written),
            _ => local_now.saturating_sub(info.refreshed_unix_ms),
        };
        if info.is_stale(age) {
            if delete_stale {
                tracing::warn!(object = l.key, "removing a stale lock: {}", info.describe());
                backend.delete(&l.key)?;
            }
            continue;
        }
        out.live.push(info);
    }
    Ok(out)
}

struct Held {
    backend: Arc<dyn ObjectStore>,
    /// Each lock object held: its key, content, and when this process wrote it.
    keys: Mutex<Vec<(String, LockInfo, Instant)>>,
    /// The last successful refresh, by the monotonic and the wall clock.
    last_ok: Mutex<(Instant, u64)>,
    /// Set for good once the lock may have been taken for stale: a refresh came too late, or
    /// found its object deleted (by a gc that judged it stale).
    lost: AtomicBool,
}

impl Held {
    fn keys(&self) -> Vec<String> {
        self.keys
            .lock()
            .expect("lock keys")
            .iter()
            .map(|(k, _, _)| k.clone())
            .collect()
    }

    fn written(&self) -> Vec<(String, Instant)> {
        self.keys
            .lock()
            .expect("lock keys")
            .iter()
            .map(|(k, _, at)| (k.clone(), *at))
            .collect()
    }

    /// Marks the lock lost if its last successful refresh is older than [`LOCK_VALID`].
    fn check_age(&self) {
        let (mono, wall) = *self.last_ok.lock().expect("lock time");
        let valid = u64::try_from(LOCK_VALID.as_millis()).unwrap_or(u64::MAX);
        if mono.elapsed() > LOCK_VALID || now_unix_ms().saturating_sub(wall) > valid {
            self.lost.store(true, Ordering::SeqCst);
        }
    }

    /// Writes every held lock anew and deletes the old objects.
    fn refresh(&self) {
        self.check_age();
        let mut keys = self.keys.lock().expect("lock keys");
        let mut ok = true;
        for (key, info, at) in keys.iter_mut() {
            match self.backend.size(key) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    tracing::warn!(
                        object = key,
                        "the store lock was removed by another process that took it for stale"
                    );
                    self.lost.store(true, Ordering::SeqCst);
                }
                Err(e) => {
                    tracing::warn!("could not look at the store lock: {e}");
                    ok = false;
                    continue;
                }
            }
            let mut fresh = info.clone();
            fresh.refreshed_unix_ms = now_unix_ms();
            let written = Instant::now();
            match write_lock(self.backend.as_ref(), &fresh) {
                Ok(new_key) => {
                    if let Err(e) = self.backend.delete(key) {
                        tracing::warn!(object = key, "could not delete a refreshed lock: {e}");
                    }
                    *key = new_key;
                    *info = fresh;
                    *at = written;
                }
                Err(e) => {
                    tracing::warn!("could not refresh the store lock: {e}");
                    ok = false;
                }
            }
        }
        if ok {
            *self.last_ok.lock().expect("lock time") = (Instant::now(), now_unix_ms());
        }
    }
}

/// A held store lock; dropping it deletes its objects.
pub(crate) struct StoreLock {
    held: Arc<Held>,
    stop: Option<Sender<()>>,
    refresher: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for StoreLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreLock")
            .field("keys", &self.held.keys())
            .finish_non_exhaustive()
    }
}

/// Deletes a freshly written lock object on an early return.
struct Written<'a> {
    backend: &'a dyn ObjectStore,
    key: Option<String>,
}

impl Written<'_> {
    fn keep(mut self) -> String {
        self.key.take().expect("a written lock")
    }
}

impl Drop for Written<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take()
            && let Err(e) = self.backend.delete(&key)
        {
            tracing::warn!(object = key, "could not remove a lock: {e}");
        }
    }
}

impl StoreLock {
    fn start(
        backend: Arc<dyn ObjectStore>,
        key: String,
        info: LockInfo,
        written: Instant,
    ) -> StoreLock {
        let held = Arc::new(Held {
            backend,
            keys: Mutex::new(vec![(key, info, written)]),
            last_ok: Mutex::new((Instant::now(), now_unix_ms())),
            lost: AtomicBool::new(false),
        });
        let (stop, stopped) = channel::<()>();
        let h = Arc::clone(&held);
        let refresher = std::thread::Builder::new()
            .name("store-lock".to_owned())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(LOCK_REFRESH) {
                    h.refresh();
                }
            })
            .ok();
        if refresher.is_none() {
            tracing::warn!(
                "could not start the lock refresher; a run longer than 20 minutes will not commit"
            );
        }
        StoreLock {
            held,
            stop: Some(stop),
            refresher,
        }
    }

    /// Takes a shared lock for `operation`. While a garbage collection deletes (holds an
    /// exclusive lock) it waits, telling `waiting` once, and gives up if `cancelled`.
    pub(crate) fn shared(
        backend: &Arc<dyn ObjectStore>,
        operation: &str,
        cancelled: &dyn Fn() -> bool,
        waiting: &mut dyn FnMut(&LockInfo),
    ) -> Result<StoreLock> {
        Self::take_shared(backend, operation, None, Duration::ZERO, cancelled, waiting)
    }

    /// Writes a shared lock (holding `disk`, if given), then lists the locks: a live
    /// exclusive lock makes it withdraw and wait, looking without a lock of its own (a gc
    /// waits for every other lock to go, so a waiter must not keep writing one), until the
    /// gc is done; another holder of the disk makes it withdraw and try again after a
    /// random pause until `wait` runs out.
    fn take_shared(
        backend: &Arc<dyn ObjectStore>,
        operation: &str,
        disk: Option<&str>,
        wait: Duration,
        cancelled: &dyn Fn() -> bool,
        waiting: &mut dyn FnMut(&LockInfo),
    ) -> Result<StoreLock> {
        let deadline = Instant::now() + wait;
        let mut told = false;
        let mut attempt = 0u32;
        let mut clock: StoreClock = None;
        loop {
            attempt += 1;
            // Fresh times on every attempt: a lock written after a long wait must not look old.
            let mut info = LockInfo::new(LockKind::Shared, operation);
            info.disk = disk.map(str::to_owned);
            let at = Instant::now();
            let written = Written {
                backend: backend.as_ref(),
                key: Some(write_lock(backend.as_ref(), &info)?),
            };
            let own = [(written.key.clone().expect("a written lock"), at)];
            let live = others(backend.as_ref(), &own, &mut clock, false)?.live;
            let blocker = live
                .iter()
                .find(|l| l.kind == LockKind::Exclusive)
                .or_else(|| {
                    live.iter()
                        .find(|l| disk.is_some() && l.disk.as_deref() == disk)
                })
                .cloned();
            let Some(blocker) = blocker else {
                return Ok(StoreLock::start(
                    Arc::clone(backend),
                    written.keep(),
                    info,
                    at,
                ));
            };
            drop(written);
            if !told {
                waiting(&blocker);
                told = true;
            }
            let stop = || {
                Error::new(
                    ErrorKind::Cancelled,
                    "cancelled while waiting for the store or the disk",
                )
            };
            if blocker.kind == LockKind::Exclusive {
                // Wait, without a lock, until no exclusive lock is live; then start over.
                loop {
                    if cancelled() {
                        return Err(stop());
                    }
                    std::thread::sleep(POLL);
                    let busy = others(backend.as_ref(), &[], &mut clock, false)?
                        .live
                        .iter()
                        .any(|l| l.kind == LockKind::Exclusive);
                    if !busy {
                        break;
                    }
                }
                continue;
            }
            // Another run holds the disk. Both write, then list: of two that start together
            // each may see the other, so both withdraw and try again after a random pause
            // (about a second of quick tries even without a wait); soon one is alone.
            if cancelled() {
                return Err(stop());
            }
            if Instant::now() >= deadline && attempt > 8 {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "the disk is being replicated by another run: {}; wait for it (the \
                         wait option) or stop it",
                        blocker.describe()
                    ),
                ));
            }
            let jitter = u64::from(crypto::random::<1>()?[0]);
            std::thread::sleep(if attempt <= 8 {
                Duration::from_millis(20 + jitter / 2)
            } else {
                POLL + Duration::from_millis(jitter)
            });
        }
    }

    /// Takes a shared lock that also holds one disk (`disk`: its name's hash) for a
    /// replication: no other run may hold the same disk, here or on another host. Another
    /// holder of the disk makes it wait up to `wait` (telling `busy` once), then fail with
    /// [`ErrorKind::Busy`]; a garbage collection that deletes makes it wait as
    /// [`StoreLock::shared`] does.
    pub(crate) fn shared_disk(
        backend: &Arc<dyn ObjectStore>,
        operation: &str,
        disk: &str,
        wait: Duration,
        cancelled: &dyn Fn() -> bool,
        waiting: &mut dyn FnMut(&LockInfo),
    ) -> Result<StoreLock> {
        Self::take_shared(backend, operation, Some(disk), wait, cancelled, waiting)
    }

    /// Takes the gc lock: fails with [`ErrorKind::Busy`] if another garbage collection holds
    /// the store.
    pub(crate) fn gc(backend: &Arc<dyn ObjectStore>) -> Result<StoreLock> {
        let info = LockInfo::new(LockKind::Gc, "gc");
        let at = Instant::now();
        let written = Written {
            backend: backend.as_ref(),
            key: Some(write_lock(backend.as_ref(), &info)?),
        };
        let own = [(written.key.clone().expect("a written lock"), at)];
        let other = others(backend.as_ref(), &own, &mut None, false)?
            .live
            .into_iter()
            .find(|l| l.kind != LockKind::Shared);
        if let Some(other) = other {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "another garbage collection holds the store: {}",
                    other.describe()
                ),
            ));
        }
        Ok(StoreLock::start(
            Arc::clone(backend),
            written.keep(),
            info,
            at,
        ))
    }

    /// Adds an exclusive lock to a gc lock and waits, up to `wait`, until no other live lock
    /// (nor any lock object it cannot read) remains, deleting stale ones. New shared holders
    /// wait meanwhile. On failure the exclusive lock is withdrawn.
    pub(crate) fn exclusive(
        &self,
        wait: Duration,
        cancelled: &dyn Fn() -> bool,
        waiting: &mut dyn FnMut(&[LockInfo]),
    ) -> Result<()> {
        let backend = Arc::clone(&self.held.backend);
        let info = LockInfo::new(LockKind::Exclusive, "gc");
        let at = Instant::now();
        let key = write_lock(backend.as_ref(), &info)?;
        self.held
            .keys
            .lock()
            .expect("lock keys")
            .push((key, info, at));
        let deadline = Instant::now() + wait;
        let mut told = false;
        let mut clock: StoreClock = None;
        let outcome = loop {
            let found = match others(backend.as_ref(), &self.held.written(), &mut clock, true) {
                Ok(found) => found,
                Err(e) => break Err(e),
            };
            if found.live.is_empty() && found.unreadable == 0 {
                break self.check();
            }
            if cancelled() {
                break Err(Error::new(
                    ErrorKind::Cancelled,
                    "cancelled while waiting for the store's other users to finish",
                ));
            }
            if Instant::now() >= deadline {
                let mut list: Vec<String> = found.live.iter().map(LockInfo::describe).collect();
                if found.unreadable > 0 {
                    list.push(format!(
                        "{} lock objects this version cannot read",
                        found.unreadable
                    ));
                }
                break Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "the store is still in use after waiting {} s: {}",
                        wait.as_secs(),
                        list.join("; ")
                    ),
                ));
            }
            if !told {
                waiting(&found.live);
                told = true;
            }
            std::thread::sleep(POLL);
        };
        if outcome.is_err() {
            let mut keys = self.held.keys.lock().expect("lock keys");
            if let Some(at) = keys
                .iter()
                .position(|(_, i, _)| i.kind == LockKind::Exclusive)
            {
                let (key, _, _) = keys.remove(at);
                let _ = backend.delete(&key);
            }
        }
        outcome
    }

    /// Fails if the lock may have been taken for stale: its refreshes failed for
    /// [`LOCK_VALID`] or came late, or one of its objects is gone (removed by a gc that judged
    /// it stale). A holder checks this before it commits; a gc before it deletes.
    pub(crate) fn check(&self) -> Result<()> {
        self.held.check_age();
        let mut lost = self.held.lost.load(Ordering::SeqCst);
        for key in self.held.keys() {
            match self.held.backend.size(&key) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => lost = true,
                Err(e) => return Err(e),
            }
        }
        if lost {
            return Err(Error::new(
                ErrorKind::Store,
                "the store lock was lost (not refreshed in time, or removed by another process \
                 that took it for stale): this run does not commit; run it again",
            ));
        }
        Ok(())
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        for key in self.held.keys() {
            if let Err(e) = self.held.backend.delete(&key) {
                tracing::warn!(object = key, "could not remove the store lock: {e}");
            }
        }
    }
}

// What a replication, a restore or a verify takes, telling the observer what it waits for.

/// Takes the store's shared lock for `operation` (see `store::lock`), telling the observer
/// when a garbage collection that is deleting makes it wait.
fn shared_lock(
    store: &Store,
    operation: &str,
    cancel: &CancelToken,
    observer: &dyn Observer,
) -> Result<StoreLock> {
    StoreLock::shared(
        store.backend(),
        operation,
        &|| cancel.is_cancelled(),
        &mut |gc| {
            let msg = format!(
                "waiting for a garbage collection to finish deleting: {}",
                gc.describe()
            );
            tracing::info!(warning = %msg);
            observer.event(&Event::Warning(msg));
        },
    )
}

/// The shared lock of a replication, which also holds its disk (see
/// [`StoreLock::shared_disk`]), telling the observer what it waits for.
pub(crate) fn disk_lock(
    store: &Store,
    disk: &str,
    wait: Duration,
    cancel: &CancelToken,
    observer: &dyn Observer,
) -> Result<StoreLock> {
    StoreLock::shared_disk(
        store.backend(),
        "replicate",
        &store.disk_hash(disk),
        wait,
        &|| cancel.is_cancelled(),
        &mut |holder| {
            let msg = if holder.kind == LockKind::Exclusive {
                format!(
                    "waiting for a garbage collection to finish deleting: {}",
                    holder.describe()
                )
            } else {
                format!(
                    "disk {disk:?} is being replicated by another run ({}); waiting",
                    holder.describe()
                )
            };
            tracing::info!("{msg}");
            observer.event(&Event::Warning(msg));
        },
    )
}

/// The shared lock of a run that only reads the store (restore, verify): with read-only
/// credentials it cannot be written, and the run goes on without it, warned that a garbage
/// collection running meanwhile could make it fail (never damage anything).
pub(crate) fn reader_lock(
    store: &Store,
    operation: &str,
    cancel: &CancelToken,
    observer: &dyn Observer,
) -> Result<Option<StoreLock>> {
    match shared_lock(store, operation, cancel, observer) {
        Ok(lock) => Ok(Some(lock)),
        Err(e) if e.kind() == ErrorKind::AccessDenied => {
            let msg = format!(
                "cannot write a store lock ({e}): going on without one; a garbage collection \
                 running meanwhile could make this {operation} fail"
            );
            tracing::info!(warning = %msg);
            observer.event(&Event::Warning(msg));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
