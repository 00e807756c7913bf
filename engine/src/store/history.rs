//! Where snapshots live and in which order: each disk's history.
//!
//! A format-2 manifest lives at `snapshots/<disk>/<seq>-<id>`, where `<disk>` is a keyed hash
//! of the disk's name and `<seq>` its place in the disk's history (16 hex digits each), so a
//! disk's snapshots are listed, and ordered, without reading them, whatever the writers'
//! clocks say. A format-1 manifest lives at `snapshots/<id>` and counts as older than any
//! numbered one. Forgetting a snapshot leaves a tombstone at the same name under
//! `forgotten/`: a snapshot that is gone without one was removed behind blockferry's back (or
//! the store was rolled back), which a client that saw it notices.

use serde::{Deserialize, Serialize};

use super::format::hex;
use super::repo::{Snapshot, Store, now_unix_ms};
use crate::error::{Error, ErrorKind, Result};

/// A manifest's (or tombstone's) name, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapKey {
    /// The object key.
    pub(crate) key: String,
    /// The disk's hashed name (16 hex digits); `None` for a format-1 manifest.
    pub(crate) disk: Option<String>,
    /// Place in the disk's history (0 for format 1).
    pub(crate) seq: u64,
    /// Snapshot id (16 hex digits).
    pub(crate) id: String,
}

fn is_hex16(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Parses `<prefix><id>` (format 1) or `<prefix><disk>/<seq>-<id>` (format 2).
fn parse_key(key: &str, prefix: &str) -> Option<SnapKey> {
    let rest = key.strip_prefix(prefix)?;
    match rest.split_once('/') {
        None => is_hex16(rest).then(|| SnapKey {
            key: key.to_owned(),
            disk: None,
            seq: 0,
            id: rest.to_owned(),
        }),
        Some((disk, tail)) => {
            let (seq, id) = tail.split_once('-')?;
            if !(is_hex16(disk) && is_hex16(seq) && is_hex16(id)) {
                return None;
            }
            Some(SnapKey {
                key: key.to_owned(),
                disk: Some(disk.to_owned()),
                seq: u64::from_str_radix(seq, 16).ok()?,
                id: id.to_owned(),
            })
        }
    }
}

/// What forgetting a snapshot leaves behind (sealed like a manifest, at `forgotten/…`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Tombstone {
    /// The snapshot forgotten.
    pub id: String,
    /// Its disk's name (empty if its manifest could not be read).
    pub disk: String,
    /// Its source (empty if unknown).
    #[serde(default)]
    pub source: String,
    /// Its source's member (an OVA disk), if any.
    #[serde(default)]
    pub member: Option<String>,
    /// Its source's chain base, if any.
    #[serde(default)]
    pub chain_base: Option<String>,
    /// Its place in the disk's history.
    pub seq: u64,
    /// When it was forgotten, milliseconds since the Unix epoch.
    pub forgotten_unix_ms: u64,
}

/// The identity of a disk's source: the file it is read from and, in a multi-disk file,
/// which disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIdentity {
    /// Absolute path with links resolved.
    pub path: String,
    /// OVA member, if any.
    pub member: Option<String>,
    /// The bottom of the source's chain (its base disk), when it is a chain: a snapshot
    /// chain's top file changes as snapshots come and go, its base does not.
    pub base: Option<String>,
}

impl SourceIdentity {
    fn of_snapshot(s: &Snapshot) -> SourceIdentity {
        SourceIdentity {
            path: s.disk.source.clone(),
            member: s.disk.member.clone(),
            base: s.disk.chain_base.clone(),
        }
    }

    /// Whether a recorded source is this one: the same file, or chains on the same base (a
    /// snapshot chain whose top moved on), or one the base of the other. A format-1
    /// snapshot recorded the path as given (perhaps relative): it is taken as this one when
    /// it leads to the same file.
    fn matches(&self, recorded: &SourceIdentity, legacy: bool) -> bool {
        if self.member != recorded.member {
            return false;
        }
        let same = |a: &str, b: &str| a == b;
        let base_of = |x: &SourceIdentity| x.base.clone().unwrap_or_else(|| x.path.clone());
        same(&self.path, &recorded.path)
            || same(&base_of(self), &base_of(recorded))
            || (legacy
                && std::fs::canonicalize(&recorded.path)
                    .is_ok_and(|p| p.display().to_string() == self.path))
    }

    /// `path` (and `#member`), for messages.
    pub fn describe(&self) -> String {
        match &self.member {
            Some(m) => format!("{} (disk {m})", self.path),
            None => self.path.clone(),
        }
    }
}

/// One disk's history in a store.
#[derive(Debug, Clone, Default)]
pub struct DiskHistory {
    /// The disk's name.
    pub name: String,
    /// Its format-2 manifests, by sequence number.
    keys: Vec<SnapKey>,
    /// Its format-1 snapshots, oldest first.
    legacy: Vec<Snapshot>,
    /// Its tombstones, by sequence number.
    tombstones: Vec<SnapKey>,
}

impl DiskHistory {
    /// The highest sequence number the disk used, by a snapshot or a forgotten one.
    pub fn max_seq(&self) -> u64 {
        let snaps = self.keys.last().map_or(0, |k| k.seq);
        let gone = self.tombstones.last().map_or(0, |k| k.seq);
        snaps.max(gone)
    }

    /// Whether the disk has no snapshot and never had one.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.legacy.is_empty() && self.tombstones.is_empty()
    }
}

impl Store {
    /// The 16 hex digits a disk name goes by in object keys.
    pub(crate) fn disk_hash(&self, name: &str) -> String {
        hex(&self.keys().disk_key(name))
    }

    /// Where the manifest of `snapshot` belongs.
    pub(crate) fn snapshot_key_of(&self, snapshot: &Snapshot) -> String {
        if snapshot.seq == 0 {
            format!("snapshots/{}", snapshot.id)
        } else {
            format!(
                "snapshots/{}/{:016x}-{}",
                self.disk_hash(&snapshot.disk.name),
                snapshot.seq,
                snapshot.id
            )
        }
    }

    /// Every manifest's name.
    pub(crate) fn snapshot_keys(&self) -> Result<Vec<SnapKey>> {
        Ok(self
            .backend()
            .list("snapshots/")?
            .iter()
            .filter_map(|k| parse_key(k, "snapshots/"))
            .collect())
    }

    /// Every tombstone's name, or those of one disk (its hashed name).
    fn tombstone_keys(&self, disk: Option<&str>) -> Result<Vec<SnapKey>> {
        let prefix = disk.map_or_else(|| "forgotten/".to_owned(), |d| format!("forgotten/{d}/"));
        Ok(self
            .backend()
            .list(&prefix)?
            .iter()
            .filter_map(|k| parse_key(k, "forgotten/"))
            .collect())
    }

    /// Writes a snapshot manifest: the commit point of a replication.
    pub fn write_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        let key = self.snapshot_key_of(snapshot);
        snapshot.validate(&key, &key)?;
        let sealed = self.seal_record(&key, snapshot, "a snapshot")?;
        self.put_new(&key, &sealed)?;
        if snapshot.seq > 0 {
            self.pin_disk(&snapshot.disk.name, snapshot.seq, &snapshot.id)?;
        }
        Ok(())
    }

    /// Reads the manifest at `key`, checking it belongs there.
    pub(crate) fn read_snapshot_key(&self, key: &str) -> Result<Snapshot> {
        let snapshot: Snapshot = self.read_record(key, "snapshot manifest")?;
        snapshot.validate(key, &self.snapshot_key_of(&snapshot))?;
        Ok(snapshot)
    }

    /// Every snapshot, each disk's together in the order of its history (format-1 ones
    /// first, by time), disks by name, plus the errors of any that could not be read.
    pub fn snapshots(&self) -> Result<(Vec<Snapshot>, Vec<Error>)> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for k in self.snapshot_keys()? {
            match self.read_snapshot_key(&k.key) {
                Ok(s) => good.push(s),
                Err(e) if e.kind() == ErrorKind::Store => return Err(e),
                Err(e) => bad.push(e),
            }
        }
        good.sort_by(|a, b| {
            (&a.disk.name, a.seq, a.created_unix_ms, &a.id).cmp(&(
                &b.disk.name,
                b.seq,
                b.created_unix_ms,
                &b.id,
            ))
        });
        Ok((good, bad))
    }

    /// What is wrong with the disks' histories as `snapshots` (from [`Store::snapshots`])
    /// show them: a predecessor gone without being forgotten, or a disk whose newest snapshot
    /// this client saw is gone (the store was rolled back).
    pub fn history_problems(&self, snapshots: &[Snapshot]) -> Result<Vec<Error>> {
        let keys = self.snapshot_keys()?;
        let tombs = self.tombstone_keys(None)?;
        let known = |id: &str| keys.iter().any(|k| k.id == id) || tombs.iter().any(|k| k.id == id);
        let mut out = Vec::new();
        for s in snapshots {
            if let Some(p) = s.previous.as_deref().filter(|p| !known(p)) {
                out.push(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "snapshot {} of disk {:?} follows snapshot {p}, which is gone without \
                         having been forgotten (deleted outside blockferry, or the store was \
                         rolled back)",
                        s.id, s.disk.name
                    ),
                ));
            }
        }
        if let Some(db) = self.pins()? {
            for (disk, seq, id) in db.disk_pins(&self.config().store_id)? {
                let h = self.disk_hash(&disk);
                let max = keys
                    .iter()
                    .chain(&tombs)
                    .filter(|k| k.disk.as_deref() == Some(&h))
                    .map(|k| k.seq)
                    .max()
                    .unwrap_or(0);
                if max < seq {
                    out.push(rolled_back(&disk, seq, &id));
                }
            }
        }
        Ok(out)
    }

    /// The history of the disk called `name`: its snapshots (format 2 by name, format 1 by
    /// reading them) and tombstones. Checked against this client's record of the disk: a
    /// history shorter than the one it saw is an error (the store was rolled back).
    pub fn disk_history(&self, name: &str) -> Result<DiskHistory> {
        let h = self.disk_hash(name);
        let all = self.snapshot_keys()?;
        let mut keys: Vec<SnapKey> = all
            .iter()
            .filter(|k| k.disk.as_deref() == Some(h.as_str()))
            .cloned()
            .collect();
        keys.sort_by_key(|k| k.seq);
        let mut legacy = Vec::new();
        for k in all.iter().filter(|k| k.disk.is_none()) {
            match self.read_snapshot_key(&k.key) {
                Ok(s) if s.disk.name == name => legacy.push(s),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Store => return Err(e),
                Err(e) => tracing::warn!("an unreadable format-1 snapshot: {e}"),
            }
        }
        legacy.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        let mut tombstones = self.tombstone_keys(Some(&h))?;
        tombstones.sort_by_key(|k| k.seq);
        let history = DiskHistory {
            name: name.to_owned(),
            keys,
            legacy,
            tombstones,
        };
        if let Some(db) = self.pins()?
            && let Some((seq, id)) = db.disk_pin(&self.config().store_id, name)?
            && history.max_seq() < seq
        {
            return Err(rolled_back(name, seq, &id));
        }
        Ok(history)
    }

    /// The newest snapshot of a disk's history (by sequence number; a format-1 one only if
    /// it has no other), read.
    pub fn newest(&self, history: &DiskHistory) -> Result<Option<Snapshot>> {
        if let Some(k) = history.keys.last() {
            let s = self.read_snapshot_key(&k.key)?;
            self.pin_disk(&history.name, s.seq, &s.id)?;
            return Ok(Some(s));
        }
        Ok(history.legacy.last().cloned())
    }

    /// The newest snapshot of the disk called `name`, if it has one.
    pub fn latest_of(&self, name: &str) -> Result<Option<Snapshot>> {
        let history = self.disk_history(name)?;
        self.newest(&history)
    }

    /// The source that owns a disk name: the one its newest snapshot (or, if all are
    /// forgotten, its newest tombstone) was read from. `None` for a name never used.
    pub fn owner_of(&self, history: &DiskHistory) -> Result<Option<(SourceIdentity, bool)>> {
        if let Some(s) = self.newest(history)? {
            return Ok(Some((SourceIdentity::of_snapshot(&s), s.seq == 0)));
        }
        // A tombstone of a snapshot whose manifest could not be read names no source.
        for k in history.tombstones.iter().rev() {
            let t = self.read_tombstone(&k.key)?;
            if !t.source.is_empty() {
                return Ok(Some((
                    SourceIdentity {
                        path: t.source,
                        member: t.member,
                        base: t.chain_base,
                    },
                    false,
                )));
            }
        }
        Ok(None)
    }

    /// Whether `ours` is the source a disk name belongs to (or the name is free).
    pub fn may_use_name(&self, history: &DiskHistory, ours: &SourceIdentity) -> Result<bool> {
        Ok(match self.owner_of(history)? {
            None => true,
            Some((owner, legacy)) => ours.matches(&owner, legacy),
        })
    }

    fn read_tombstone(&self, key: &str) -> Result<Tombstone> {
        self.read_record(key, "tombstone")
    }

    /// The manifest names matching a snapshot id or unique id prefix.
    fn keys_of_id(&self, spec: &str) -> Result<SnapKey> {
        if spec.is_empty() || spec.len() > 16 || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::config(format!(
                "{spec:?} is not a snapshot id (hex digits), `latest` or `DISK@latest`"
            )));
        }
        let want = spec.to_ascii_lowercase();
        let matches: Vec<SnapKey> = self
            .snapshot_keys()?
            .into_iter()
            .filter(|k| k.id.starts_with(&want))
            .collect();
        match <[SnapKey; 1]>::try_from(matches) {
            Ok([k]) => Ok(k),
            Err(m) if m.is_empty() => Err(Error::new(
                ErrorKind::NotFound,
                format!("no snapshot {spec} in the store"),
            )),
            Err(m) => Err(Error::config(format!(
                "snapshot id prefix {spec} is ambiguous ({} snapshots match)",
                m.len()
            ))),
        }
    }

    /// The whole id of the snapshot an id or unique id prefix names (its manifest need not be
    /// readable).
    pub fn snapshot_id(&self, spec: &str) -> Result<String> {
        Ok(self.keys_of_id(spec)?.id)
    }

    /// Forgets a snapshot (an id or unique id prefix; its manifest need not be readable):
    /// leaves a tombstone, then deletes the manifest. Its chunks and pages stay until a
    /// garbage collection. Returns the id forgotten.
    pub fn forget_snapshot(&self, spec: &str) -> Result<String> {
        let started = std::time::Instant::now();
        let result = self.forget_snapshot_run(spec);
        let mut ev = super::audit::AuditEvent::new("forget", started, &result);
        ev.snapshot = Some(
            result
                .as_ref()
                .map_or_else(|_| spec.to_owned(), Clone::clone),
        );
        self.audited(&ev, result)
    }

    fn forget_snapshot_run(&self, spec: &str) -> Result<String> {
        let k = self.keys_of_id(spec)?;
        let known = self.read_snapshot_key(&k.key).ok();
        let tomb = Tombstone {
            id: k.id.clone(),
            disk: known
                .as_ref()
                .map(|s| s.disk.name.clone())
                .unwrap_or_default(),
            source: known
                .as_ref()
                .map(|s| s.disk.source.clone())
                .unwrap_or_default(),
            member: known.as_ref().and_then(|s| s.disk.member.clone()),
            chain_base: known.as_ref().and_then(|s| s.disk.chain_base.clone()),
            seq: k.seq,
            forgotten_unix_ms: now_unix_ms(),
        };
        let key = match &k.disk {
            Some(d) => format!("forgotten/{d}/{:016x}-{}", k.seq, k.id),
            None => format!("forgotten/{}", k.id),
        };
        let sealed = self.seal_record(&key, &tomb, "a tombstone")?;
        match super::create_object(self.backend().as_ref(), &key, &sealed)? {
            // A tombstone already there: forgotten before (the manifest reappeared?).
            super::PutOutcome::Written | super::PutOutcome::AlreadyExists => {}
        }
        self.backend().delete(&k.key)?;
        Ok(k.id)
    }

    /// Loads a snapshot: an id or unique id prefix; `DISK@latest`, the newest snapshot of a
    /// disk; or `latest`, the newest of the only disk of the store (an error naming the
    /// disks when there are several).
    pub fn snapshot(&self, spec: &str) -> Result<Snapshot> {
        if let Some(disk) = spec.strip_suffix("@latest") {
            return self.latest_of(disk)?.ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("the store has no snapshot of disk {disk:?}"),
                )
            });
        }
        if spec == "latest" {
            return self.only_latest();
        }
        let k = self.keys_of_id(spec)?;
        self.read_snapshot_key(&k.key)
    }

    /// `latest` with no disk named: the store's only disk's newest snapshot.
    fn only_latest(&self) -> Result<Snapshot> {
        let keys = self.snapshot_keys()?;
        let mut names: Vec<String> = Vec::new();
        let mut newest: Vec<Snapshot> = Vec::new();
        let mut unreadable = Vec::new();
        // Each format-2 disk's newest manifest, and every format-1 manifest.
        let mut by_disk: std::collections::BTreeMap<&str, &SnapKey> =
            std::collections::BTreeMap::new();
        for k in &keys {
            match &k.disk {
                Some(d) => {
                    let e = by_disk.entry(d).or_insert(k);
                    if k.seq > e.seq {
                        *e = k;
                    }
                }
                None => match self.read_snapshot_key(&k.key) {
                    Ok(s) => {
                        if !names.contains(&s.disk.name) {
                            names.push(s.disk.name.clone());
                        }
                        newest.push(s);
                    }
                    Err(e) => unreadable.push(e),
                },
            }
        }
        for k in by_disk.values() {
            match self.read_snapshot_key(&k.key) {
                Ok(s) => {
                    if !names.contains(&s.disk.name) {
                        names.push(s.disk.name.clone());
                    }
                    newest.push(s);
                }
                Err(e) => unreadable.push(e),
            }
        }
        match names.len() {
            0 => Err(match unreadable.into_iter().next() {
                Some(e) => Error::new(
                    e.kind(),
                    format!(
                        "the store holds {} snapshot manifest(s) but none can be read: {e}",
                        keys.len()
                    ),
                ),
                None => Error::new(ErrorKind::NotFound, "the store has no snapshots"),
            }),
            1 if unreadable.is_empty() => {
                let name = names.remove(0);
                self.latest_of(&name)?
                    .ok_or_else(|| Error::internal("a disk with snapshots has no newest one"))
            }
            _ => {
                names.sort();
                Err(Error::config(format!(
                    "`latest` needs a disk: the store holds {} ({}{}); say which, as \
                     DISK@latest (the disk option where there is one)",
                    if names.len() == 1 {
                        "1 disk and unreadable snapshots".to_owned()
                    } else {
                        format!("{} disks", names.len())
                    },
                    names.join(", "),
                    if unreadable.is_empty() {
                        String::new()
                    } else {
                        format!(", and {} unreadable snapshot(s)", unreadable.len())
                    }
                )))
            }
        }
    }

    /// This client's records of the store, if it was opened with them.
    fn pins(&self) -> Result<Option<crate::job::state::JobDb>> {
        self.state_dir()
            .map(crate::job::state::JobDb::open)
            .transpose()
    }

    /// Records that this client saw snapshot `id` at `seq` of disk `name`.
    fn pin_disk(&self, name: &str, seq: u64, id: &str) -> Result<()> {
        if let Some(db) = self.pins()? {
            db.set_disk_pin(&self.config().store_id, name, seq, id)?;
        }
        Ok(())
    }
}

fn rolled_back(disk: &str, seq: u64, id: &str) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!(
            "snapshot {id}, number {seq} of disk {disk:?} and the newest this client saw of it, \
             is gone from the store and was not forgotten: the store was rolled back or \
             altered. If that was intended, forget this client's record of the store \
             (`blockferry unpin`)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_in_both_formats() {
        let v1 = parse_key("snapshots/0011223344556677", "snapshots/").unwrap();
        assert_eq!(
            (v1.disk, v1.seq, v1.id.as_str()),
            (None, 0, "0011223344556677")
        );
        let v2 = parse_key(
            "snapshots/aabbccddeeff0011/000000000000000a-0011223344556677",
            "snapshots/",
        )
        .unwrap();
        assert_eq!(v2.disk.as_deref(), Some("aabbccddeeff0011"));
        assert_eq!((v2.seq, v2.id.as_str()), (10, "0011223344556677"));
        for bad in [
            "snapshots/001122",
            "snapshots/aabbccddeeff0011/0a-0011223344556677",
            "snapshots/AABBCCDDEEFF0011/000000000000000a-0011223344556677",
            "snapshots/aabbccddeeff0011/000000000000000a_0011223344556677",
            "index/0011223344556677",
        ] {
            assert!(parse_key(bad, "snapshots/").is_none(), "{bad}");
        }
    }
}
