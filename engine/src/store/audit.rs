//! The tamper-evident audit log: every operation that changes a store or proves something
//! about it appends a record under `audit/`.
//!
//! Each writer (a process with the store open) keeps its own chain `audit/<chain>/<seq>`:
//! records numbered from 1, each naming the hash of the one before it and the newest record
//! of every other chain it saw (cross-references). Records are sealed like other metadata
//! (with a key derived from the master key: a writer without the passphrase cannot forge or
//! alter one) and written create-only, on S3 optionally under Object Lock retention. The
//! client records the newest record of each chain it saw, so a rollback of the log (its
//! newest records deleted) is noticed. docs/FORMAT.md ("Audit log") specifies it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::format::{self, MetaKind};
use super::{ObjectStore, PutOutcome};
use crate::error::{Error, ErrorKind, Result};
use crate::store::crypto::Sealer;

/// Where the log lives.
pub(crate) const AUDIT_PREFIX: &str = "audit/";
/// Largest record read.
const MAX_RECORD: u64 = 4 << 20;

/// Object Lock retention of audit records (S3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AuditRetention {
    /// How long each record is kept from its writing.
    pub seconds: u64,
    /// Compliance (nobody, the bucket's owner included, can delete or shorten it) or
    /// governance (users with a special permission can).
    pub compliance: bool,
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The writer's chain.
    pub chain: String,
    /// Its number in the chain, from 1.
    pub seq: u64,
    /// The blake3 hash (hex) of the previous record of the chain as stored; `None` for the
    /// first.
    pub prev: Option<String>,
    /// When it was written (the writer's clock).
    pub time_unix_ms: u64,
    /// What was done: `init`, `replicate`, `sync-cycle`, `verify`, `restore`, `export`,
    /// `prune`, `gc`, `forget`, `repair`, `cutover`, `cutover-step`, …
    pub op: String,
    /// The disk it was about, if one.
    pub disk: Option<String>,
    /// The snapshot it made or used, if one.
    pub snapshot: Option<String>,
    /// An object it wrote outside the store (an export's target), if any.
    pub object: Option<String>,
    /// Bytes it moved (stored, restored, exported, deleted), if it moves any.
    pub bytes: Option<u64>,
    /// `ok`, or the error.
    pub result: String,
    /// How long it took.
    pub duration_ms: u64,
    /// The host it ran on.
    pub host: String,
    /// The OS user it ran as.
    pub user: String,
    /// The tool and its version.
    pub tool: String,
    /// The operation's report (its figures), or other details.
    pub details: serde_json::Value,
    /// The newest record of every other chain this writer saw when it began: chain → seq.
    pub heads: BTreeMap<String, u64>,
}

/// What an operation tells the log.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// `op` of the record.
    pub op: &'static str,
    /// The disk.
    pub disk: Option<String>,
    /// The snapshot.
    pub snapshot: Option<String>,
    /// An outside object.
    pub object: Option<String>,
    /// Bytes moved.
    pub bytes: Option<u64>,
    /// The outcome.
    pub result: std::result::Result<(), String>,
    /// When it began.
    pub started: Instant,
    /// Its report.
    pub details: serde_json::Value,
}

impl AuditEvent {
    /// An event of `op` that began at `started`, with the operation's report.
    pub fn new<T: Serialize, E: std::fmt::Display>(
        op: &'static str,
        started: Instant,
        outcome: &std::result::Result<T, E>,
    ) -> AuditEvent {
        AuditEvent {
            op,
            disk: None,
            snapshot: None,
            object: None,
            bytes: None,
            result: outcome.as_ref().map(|_| ()).map_err(ToString::to_string),
            started,
            details: outcome
                .as_ref()
                .ok()
                .and_then(|r| serde_json::to_value(r).ok())
                .unwrap_or(serde_json::Value::Null),
        }
    }
}

impl AuditEvent {
    /// An event whose disk, snapshot and bytes are the report's own `disk`, `snapshot` and
    /// `bytes_field` fields, where it has them.
    pub(crate) fn of_report<T: Serialize, E: std::fmt::Display>(
        op: &'static str,
        started: Instant,
        outcome: &std::result::Result<T, E>,
        bytes_field: &str,
    ) -> AuditEvent {
        let mut ev = AuditEvent::new(op, started, outcome);
        let text = |k: &str| {
            ev.details
                .get(k)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        ev.disk = text("disk");
        ev.snapshot = text("snapshot");
        ev.bytes = ev
            .details
            .get(bytes_field)
            .and_then(serde_json::Value::as_u64);
        ev
    }
}

/// A writer's chain: its id and where it stands.
#[derive(Debug, Default)]
pub(crate) struct Chain {
    state: Option<(String, u64, String)>,
}

/// What appending needs from the store.
pub(crate) struct Writer<'a> {
    pub(crate) backend: &'a dyn ObjectStore,
    pub(crate) meta: &'a Sealer,
    pub(crate) store_id: &'a str,
    pub(crate) state_dir: Option<&'a Path>,
    pub(crate) retention: Option<AuditRetention>,
}

fn key_of(chain: &str, seq: u64) -> String {
    format!("{AUDIT_PREFIX}{chain}/{seq:016}")
}

/// `audit/<chain>/<seq>` → (chain, seq).
fn parse_key(key: &str) -> Option<(String, u64)> {
    let rest = key.strip_prefix(AUDIT_PREFIX)?;
    let (chain, seq) = rest.split_once('/')?;
    Some((chain.to_owned(), seq.parse().ok()?))
}

fn hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid {}", crate::io::sys::uid()))
}

/// The newest record number of every chain in the log.
fn heads(backend: &dyn ObjectStore) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for key in backend.list(AUDIT_PREFIX)? {
        if let Some((chain, seq)) = parse_key(&key) {
            let e = out.entry(chain).or_insert(0);
            *e = (*e).max(seq);
        }
    }
    Ok(out)
}

impl Writer<'_> {
    /// Appends a record for `ev` to this writer's chain (starting it on first use).
    pub(crate) fn append(&self, chain: &Mutex<Chain>, ev: &AuditEvent) -> Result<AuditRecord> {
        let mut chain = chain
            .lock()
            .map_err(|_| Error::internal("the audit chain's lock is poisoned"))?;
        let (id, seq, prev, seen) = if let Some((id, last, prev)) = &chain.state {
            (id.clone(), last + 1, Some(prev.clone()), BTreeMap::new())
        } else {
            let id = crate::store::format::hex(&crate::store::crypto::random::<8>()?);
            (id, 1, None, heads(self.backend)?)
        };
        let record = AuditRecord {
            chain: id.clone(),
            seq,
            prev,
            time_unix_ms: crate::store::now_unix_ms(),
            op: ev.op.to_owned(),
            disk: ev.disk.clone(),
            snapshot: ev.snapshot.clone(),
            object: ev.object.clone(),
            bytes: ev.bytes,
            result: match &ev.result {
                Ok(()) => "ok".to_owned(),
                Err(e) => e.clone(),
            },
            duration_ms: u64::try_from(ev.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            host: host(),
            user: user(),
            tool: format!("blockferry {}", env!("CARGO_PKG_VERSION")),
            details: ev.details.clone(),
            heads: seen,
        };
        let key = key_of(&id, seq);
        let json = serde_json::to_vec(&record)
            .map_err(|e| Error::internal("encoding an audit record").with_source(e))?;
        let sealed = format::seal_meta(self.meta, MetaKind::Snapshot, &key, &json)?;
        let outcome = match self.retention {
            Some(r) => self.backend.put_retained(
                &key,
                &sealed,
                crate::store::now_unix_ms().saturating_add(r.seconds.saturating_mul(1000)),
                r.compliance,
            )?,
            None => super::create_object(self.backend, &key, &sealed)?,
        };
        if outcome == PutOutcome::AlreadyExists {
            return Err(Error::internal(
                "an audit record's random chain name collided with another writer's",
            )
            .with_object(&key));
        }
        let h = hash(&sealed);
        chain.state = Some((id.clone(), seq, h.clone()));
        if let Some(dir) = self.state_dir {
            crate::job::state::JobDb::open(dir)?.set_audit_head(self.store_id, &id, seq, &h)?;
        }
        Ok(record)
    }
}

/// One problem `audit verify` found, with where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditProblem {
    /// The chain.
    pub chain: String,
    /// The record's number in it (or the snapshot's id for a snapshot without a record).
    pub position: String,
    /// What is wrong.
    pub problem: String,
}

/// The result of `audit verify`.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// Chains found.
    pub chains: usize,
    /// Records read and proven.
    pub records: usize,
    /// Every problem (none: the log is whole).
    pub problems: Vec<AuditProblem>,
    /// The records, ordered by time (those that could be read).
    pub log: Vec<AuditRecord>,
    /// No problem.
    pub passed: bool,
    /// The newest record of each chain and its hash (what a client records).
    #[serde(skip)]
    pub heads: Vec<(String, u64, String)>,
}

/// Reads and checks every chain: each record present (1..newest), authentic (sealed with
/// this store's key), in its place (chain and number inside match its name) and linked (its
/// `prev` is the hash of the one before); every cross-reference present; every chain head
/// this client saw still there; every snapshot named by a record (`snapshots` given).
pub(crate) fn verify(
    backend: &dyn ObjectStore,
    meta: &Sealer,
    client_heads: &[(String, u64, String)],
    snapshots: Option<&[(String, String)]>,
) -> Result<AuditReport> {
    let mut by_chain: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for key in backend.list(AUDIT_PREFIX)? {
        if let Some((chain, seq)) = parse_key(&key) {
            by_chain.entry(chain).or_default().push(seq);
        }
    }
    let mut problems = Vec::new();
    let mut log = Vec::new();
    let mut hashes: HashMap<(String, u64), String> = HashMap::new();
    let problem = |chain: &str, seq: u64, what: String| AuditProblem {
        chain: chain.to_owned(),
        position: seq.to_string(),
        problem: what,
    };
    for (chain, seqs) in &mut by_chain {
        seqs.sort_unstable();
        let newest = seqs.last().copied().unwrap_or(0);
        let mut prev: Option<String> = None;
        for seq in 1..=newest {
            if seqs.binary_search(&seq).is_err() {
                problems.push(problem(
                    chain,
                    seq,
                    "missing: the record was deleted".into(),
                ));
                prev = None;
                continue;
            }
            let key = key_of(chain, seq);
            let raw = match backend.get(&key, MAX_RECORD) {
                Ok(r) => r,
                Err(e) => {
                    problems.push(problem(chain, seq, format!("cannot be read: {e}")));
                    prev = None;
                    continue;
                }
            };
            let rec: AuditRecord =
                match format::open_meta(meta, MetaKind::Snapshot, &key, raw.clone())
                    .map_err(|e| e.to_string())
                    .and_then(|p| serde_json::from_slice(&p).map_err(|e| e.to_string()))
                {
                    Ok(r) => r,
                    Err(why) => {
                        problems.push(problem(
                            chain,
                            seq,
                            format!(
                                "fails authentication: altered, or sealed with another store's key \
                             ({why})"
                            ),
                        ));
                        prev = None;
                        continue;
                    }
                };
            if rec.chain != *chain || rec.seq != seq {
                problems.push(problem(
                    chain,
                    seq,
                    format!("holds record {} of chain {}: moved", rec.seq, rec.chain),
                ));
            } else if seq > 1 && prev.is_some() && rec.prev != prev {
                problems.push(problem(
                    chain,
                    seq,
                    format!("does not follow record {}: reordered or replaced", seq - 1),
                ));
            }
            let h = hash(&raw);
            hashes.insert((chain.clone(), seq), h.clone());
            prev = Some(h);
            log.push(rec);
        }
    }
    for rec in &log {
        for (other, seq) in &rec.heads {
            let have = by_chain
                .get(other)
                .and_then(|s| s.last())
                .copied()
                .unwrap_or(0);
            if have < *seq {
                problems.push(problem(
                    other,
                    *seq,
                    format!(
                        "gone: record {} of chain {} saw the chain at record {seq}, and it now ends at {have}",
                        rec.seq, rec.chain
                    ),
                ));
            }
        }
    }
    for (chain, seq, h) in client_heads {
        match hashes.get(&(chain.clone(), *seq)) {
            Some(have) if have == h => {}
            Some(_) => problems.push(problem(
                chain,
                *seq,
                "differs from the record this client saw there: replaced".into(),
            )),
            None => {
                if !problems
                    .iter()
                    .any(|p| p.chain == *chain && p.position == seq.to_string())
                {
                    problems.push(problem(
                        chain,
                        *seq,
                        "gone: this client saw the log up to this record (rolled back)".into(),
                    ));
                }
            }
        }
    }
    if let Some(snaps) = snapshots {
        for (id, disk) in snaps {
            if !log
                .iter()
                .any(|r| r.snapshot.as_deref() == Some(id) && r.result == "ok")
            {
                problems.push(AuditProblem {
                    chain: String::new(),
                    position: id.clone(),
                    problem: format!("snapshot {id} of disk {disk} has no audit record"),
                });
            }
        }
    }
    log.sort_by(|a, b| {
        a.time_unix_ms
            .cmp(&b.time_unix_ms)
            .then(a.chain.cmp(&b.chain))
            .then(a.seq.cmp(&b.seq))
    });
    let records = log.len();
    let heads = by_chain
        .iter()
        .filter_map(|(chain, seqs)| {
            let seq = *seqs.last()?;
            Some((
                chain.clone(),
                seq,
                hashes.get(&(chain.clone(), seq))?.clone(),
            ))
        })
        .collect();
    Ok(AuditReport {
        chains: by_chain.len(),
        records,
        passed: problems.is_empty(),
        problems,
        log,
        heads,
    })
}

/// The error for a retained write where the backend cannot retain.
pub(crate) fn no_retention(location: &str) -> Error {
    Error::new(
        ErrorKind::Config,
        format!(
            "{location} cannot keep objects under retention: Object Lock needs an S3 bucket \
             created with Object Lock enabled"
        ),
    )
    .with_setting("audit_retention")
}
