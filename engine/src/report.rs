//! The compliance report: what the store holds and what was done to it, per disk, proven by
//! the audit log. Built from the snapshots, the store's configuration and the audit records
//! (each carries its operation's own report), never from a client's memory: anyone with the
//! store and its passphrase gets the same report. JSON, Markdown or one self-contained HTML
//! file (inline CSS and SVG, no script, nothing fetched).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::error::Result;
use crate::store::audit::{AuditProblem, AuditRecord};
use crate::store::{Encryption, Store};

/// Operations that make a snapshot of a disk.
const REPLICATIONS: [&str; 3] = ["replicate", "delta", "sync-cycle"];

/// The store's encryption, as a report shows it (never a key).
#[derive(Debug, Clone, Serialize)]
pub struct EncryptionReport {
    /// `AES-256-GCM` or `none`.
    pub algorithm: &'static str,
    /// The passphrase's key derivation (`argon2id`, memory in KiB, iterations, lanes).
    pub kdf: Option<String>,
    /// A fingerprint of the master key (a keyed hash; it reveals nothing of the key).
    pub key_fingerprint: String,
}

/// A replication of a disk, from its audit record.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicationEntry {
    /// When it ended.
    pub time_unix_ms: u64,
    /// `replicate`, `delta` or `sync-cycle`.
    pub op: String,
    /// The snapshot it made.
    pub snapshot: Option<String>,
    /// Bytes it stored (its report's `bytes_stored`).
    pub bytes_stored: u64,
    /// Bytes it read.
    pub bytes_read: u64,
    /// The disk's virtual size.
    pub virtual_size: u64,
    /// `ok` or the error.
    pub result: String,
    /// How long it took.
    pub duration_ms: u64,
}

/// One operation's record, as the report lists it (verify, export, cutover, validate).
#[derive(Debug, Clone, Serialize)]
pub struct OperationEntry {
    /// When it ended.
    pub time_unix_ms: u64,
    /// The snapshot it used.
    pub snapshot: Option<String>,
    /// Its target (an export's or cutover's), if any.
    pub object: Option<String>,
    /// `ok` or the error.
    pub result: String,
    /// Its report.
    pub details: serde_json::Value,
}

/// One disk.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    /// Its name in the store.
    pub disk: String,
    /// The file it was read from (the newest snapshot's).
    pub source: Option<String>,
    /// Its snapshots in the store now: id, time, size, bytes new.
    pub snapshots: Vec<SnapshotEntry>,
    /// Its replications in the period, oldest first.
    pub replications: Vec<ReplicationEntry>,
    /// Bytes the period's successful replications stored.
    pub bytes_sent: u64,
    /// The recovery point achieved: the longest time in the period without a newer
    /// successful replication (between two, or from the last to the report).
    pub rpo_worst_seconds: Option<f64>,
    /// How old the newest successful replication is at the report's time.
    pub rpo_current_seconds: Option<f64>,
    /// The last successful verify of the disk (any time).
    pub last_verify: Option<OperationEntry>,
    /// The last verify of the disk, successful or not, if it is newer than the last
    /// successful one.
    pub last_verify_failed: Option<OperationEntry>,
    /// Exports in the period.
    pub exports: Vec<OperationEntry>,
    /// The last cutover, if any.
    pub cutover: Option<OperationEntry>,
}

/// A snapshot, as the report lists it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotEntry {
    /// Its id.
    pub id: String,
    /// When it was made.
    pub created_unix_ms: u64,
    /// The disk's virtual size.
    pub virtual_size: u64,
    /// Bytes it added to the store.
    pub bytes_stored: u64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct ComplianceReport {
    /// The store's location.
    pub store: String,
    /// Its id.
    pub store_id: String,
    /// When the report was made.
    pub generated_unix_ms: u64,
    /// The period's start (none: everything).
    pub since_unix_ms: Option<u64>,
    /// The tool.
    pub tool: String,
    /// Encryption.
    pub encryption: EncryptionReport,
    /// Whether the audit log verified whole.
    pub audit_passed: bool,
    /// Its chains and records.
    pub audit_chains: usize,
    /// Records read.
    pub audit_records: usize,
    /// Its problems, if any.
    pub audit_problems: Vec<AuditProblem>,
    /// Each disk.
    pub disks: Vec<DiskReport>,
    /// The validations recorded in the period (`validate --store`), newest per subject.
    pub validations: Vec<OperationEntry>,
}

fn entry(r: &AuditRecord) -> OperationEntry {
    OperationEntry {
        time_unix_ms: r.time_unix_ms,
        snapshot: r.snapshot.clone(),
        object: r.object.clone(),
        result: r.result.clone(),
        details: r.details.clone(),
    }
}

fn field(r: &AuditRecord, name: &str) -> u64 {
    r.details
        .get(name)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0)
}

fn seconds(ms: u64) -> f64 {
    // Milliseconds as seconds; exact far beyond any period a report covers.
    f64::from(u32::try_from(ms / 1000).unwrap_or(u32::MAX))
        + f64::from(u32::try_from(ms % 1000).unwrap_or(0)) / 1000.0
}

/// Builds the report of `store` for the period from `since_unix_ms` (none: all).
///
/// # Errors
/// The store's snapshots or audit log cannot be read.
pub fn compliance_report(store: &Store, since_unix_ms: Option<u64>) -> Result<ComplianceReport> {
    let now = crate::store::now_unix_ms();
    let since = since_unix_ms.unwrap_or(0);
    let audit = store.audit_verify()?;
    let (snaps, _) = store.snapshots()?;
    let config = store.config();
    let encryption = EncryptionReport {
        algorithm: match config.encryption {
            Encryption::None { .. } => "none",
            Encryption::Aes256Gcm { .. } => "AES-256-GCM",
        },
        kdf: match &config.encryption {
            Encryption::None { .. } => None,
            Encryption::Aes256Gcm { kdf, .. } => Some(format!(
                "argon2id (memory {} KiB, {} iterations, {} lanes)",
                kdf.m_kib, kdf.t, kdf.p
            )),
        },
        key_fingerprint: store.keys().fingerprint(),
    };
    let mut names: BTreeMap<String, Option<String>> = BTreeMap::new();
    for s in &snaps {
        names.insert(s.disk.name.clone(), Some(s.disk.source.clone()));
    }
    for r in &audit.log {
        if let Some(d) = &r.disk
            && REPLICATIONS.contains(&r.op.as_str())
        {
            names.entry(d.clone()).or_insert(None);
        }
    }
    let mut disks = Vec::new();
    for (disk, source) in names {
        let of_disk = |r: &&AuditRecord| r.disk.as_deref() == Some(disk.as_str());
        let mut snapshots: Vec<SnapshotEntry> = snaps
            .iter()
            .filter(|s| s.disk.name == disk)
            .map(|s| SnapshotEntry {
                id: s.id.clone(),
                created_unix_ms: s.created_unix_ms,
                virtual_size: s.disk.virtual_size,
                bytes_stored: s.stats.bytes_stored,
            })
            .collect();
        snapshots.sort_by_key(|s| s.created_unix_ms);
        let replications: Vec<ReplicationEntry> = audit
            .log
            .iter()
            .filter(of_disk)
            .filter(|r| REPLICATIONS.contains(&r.op.as_str()) && r.time_unix_ms >= since)
            .map(|r| ReplicationEntry {
                time_unix_ms: r.time_unix_ms,
                op: r.op.clone(),
                snapshot: r.snapshot.clone(),
                bytes_stored: field(r, "bytes_stored"),
                bytes_read: field(r, "bytes_read"),
                virtual_size: field(r, "virtual_size"),
                result: r.result.clone(),
                duration_ms: r.duration_ms,
            })
            .collect();
        let ok: Vec<u64> = replications
            .iter()
            .filter(|r| r.result == "ok")
            .map(|r| r.time_unix_ms)
            .collect();
        let rpo_worst_seconds = ok.last().map(|&last| {
            let between = ok.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
            seconds(between.max(now.saturating_sub(last)))
        });
        let verifies: Vec<&AuditRecord> = audit
            .log
            .iter()
            .filter(of_disk)
            .filter(|r| r.op == "verify")
            .collect();
        let last_ok = verifies.iter().rev().find(|r| r.result == "ok");
        let last_any = verifies.last();
        disks.push(DiskReport {
            bytes_sent: replications
                .iter()
                .filter(|r| r.result == "ok")
                .map(|r| r.bytes_stored)
                .sum(),
            rpo_current_seconds: ok.last().map(|&t| seconds(now.saturating_sub(t))),
            rpo_worst_seconds,
            last_verify: last_ok.map(|r| entry(r)),
            last_verify_failed: last_any.filter(|r| r.result != "ok").map(|r| entry(r)),
            exports: audit
                .log
                .iter()
                .filter(of_disk)
                .filter(|r| r.op == "export" && r.time_unix_ms >= since)
                .map(entry)
                .collect(),
            cutover: audit
                .log
                .iter()
                .filter(of_disk)
                .rfind(|r| r.op == "cutover")
                .map(entry),
            disk,
            source,
            snapshots,
            replications,
        });
    }
    let mut validations: BTreeMap<String, OperationEntry> = BTreeMap::new();
    for r in audit
        .log
        .iter()
        .filter(|r| r.op == "validate" && r.time_unix_ms >= since)
    {
        validations.insert(r.object.clone().unwrap_or_default(), entry(r));
    }
    Ok(ComplianceReport {
        store: store.location(),
        store_id: config.store_id.clone(),
        generated_unix_ms: now,
        since_unix_ms,
        tool: format!("blockferry {}", env!("CARGO_PKG_VERSION")),
        encryption,
        audit_passed: audit.passed,
        audit_chains: audit.chains,
        audit_records: audit.records,
        audit_problems: audit.problems,
        disks,
        validations: validations.into_values().collect(),
    })
}

fn time(ms: u64) -> String {
    crate::store::prune::rfc3339(ms)
}

fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut whole = n;
    let mut rest = 0;
    while whole >= 1024 && unit < UNITS.len() - 1 {
        rest = whole % 1024;
        whole /= 1024;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{whole}.{} {}", rest * 10 / 1024, UNITS[unit])
    }
}

fn duration(s: Option<f64>) -> String {
    s.map_or_else(|| "-".to_owned(), |s| format!("{s:.0} s"))
}

impl ComplianceReport {
    /// The report as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(m, "# Compliance report: {}\n", self.store);
        let _ = writeln!(m, "- store id: `{}`", self.store_id);
        let _ = writeln!(
            m,
            "- generated: {} by {}",
            time(self.generated_unix_ms),
            self.tool
        );
        let _ = writeln!(
            m,
            "- period: {}",
            self.since_unix_ms.map_or_else(
                || "everything recorded".to_owned(),
                |s| format!("since {}", time(s))
            )
        );
        let _ = writeln!(
            m,
            "- encryption: {}{}; key fingerprint `{}`",
            self.encryption.algorithm,
            self.encryption
                .kdf
                .as_ref()
                .map_or_else(String::new, |k| format!(", {k}")),
            self.encryption.key_fingerprint
        );
        let _ = writeln!(
            m,
            "- audit log: {} ({} records in {} chains)\n",
            if self.audit_passed {
                "verified whole"
            } else {
                "**PROBLEMS FOUND**"
            },
            self.audit_records,
            self.audit_chains
        );
        for p in &self.audit_problems {
            let _ = writeln!(
                m,
                "  - chain `{}` record {}: {}",
                p.chain, p.position, p.problem
            );
        }
        for d in &self.disks {
            let _ = writeln!(m, "## Disk {}\n", d.disk);
            if let Some(s) = &d.source {
                let _ = writeln!(m, "- source: `{s}`");
            }
            let _ = writeln!(
                m,
                "- replications in the period: {} ({} stored); RPO achieved: worst {}, now {}",
                d.replications.len(),
                size(d.bytes_sent),
                duration(d.rpo_worst_seconds),
                duration(d.rpo_current_seconds)
            );
            let _ = writeln!(
                m,
                "- last successful verify: {}",
                d.last_verify.as_ref().map_or_else(
                    || "never".to_owned(),
                    |v| format!(
                        "{} of snapshot {}",
                        time(v.time_unix_ms),
                        v.snapshot.as_deref().unwrap_or("-")
                    )
                )
            );
            if let Some(v) = &d.last_verify_failed {
                let _ = writeln!(
                    m,
                    "- **the last verify failed** ({}): {}",
                    time(v.time_unix_ms),
                    v.result
                );
            }
            if let Some(c) = &d.cutover {
                let _ = writeln!(
                    m,
                    "- cutover: {} to {}: {}",
                    time(c.time_unix_ms),
                    c.object.as_deref().unwrap_or("-"),
                    c.result
                );
            }
            let _ = writeln!(
                m,
                "\n| time | operation | snapshot | stored | read | result |\n|---|---|---|---|---|---|"
            );
            for r in &d.replications {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {} | {} |",
                    time(r.time_unix_ms),
                    r.op,
                    r.snapshot.as_deref().unwrap_or("-"),
                    size(r.bytes_stored),
                    size(r.bytes_read),
                    r.result
                );
            }
            let _ = writeln!(m, "\nSnapshots in the store: {}\n", d.snapshots.len());
        }
        if !self.validations.is_empty() {
            let _ = writeln!(m, "## Validations\n");
            for v in &self.validations {
                let _ = writeln!(
                    m,
                    "- {} {}: {}",
                    time(v.time_unix_ms),
                    v.object.as_deref().unwrap_or("-"),
                    if v.details.get("passed") == Some(&serde_json::Value::Bool(true)) {
                        "ready"
                    } else {
                        "NOT READY"
                    }
                );
            }
        }
        m
    }

    /// The report as one self-contained HTML file: inline CSS, and a timeline of each
    /// disk's replications and verifies as inline SVG (no script, nothing fetched).
    pub fn to_html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Compliance report: {}</title><style>{}</style></head><body>",
            esc(&self.store),
            CSS
        );
        let _ = write!(
            h,
            "<h1>Compliance report</h1><p class=\"store\">{}</p><dl>",
            esc(&self.store)
        );
        let rows = [
            ("Store id", self.store_id.clone()),
            (
                "Generated",
                format!("{} by {}", time(self.generated_unix_ms), self.tool),
            ),
            (
                "Period",
                self.since_unix_ms.map_or_else(
                    || "everything recorded".to_owned(),
                    |s| format!("since {}", time(s)),
                ),
            ),
            (
                "Encryption",
                format!(
                    "{}{}",
                    self.encryption.algorithm,
                    self.encryption
                        .kdf
                        .as_ref()
                        .map_or_else(String::new, |k| format!(", {k}"))
                ),
            ),
            ("Key fingerprint", self.encryption.key_fingerprint.clone()),
        ];
        for (k, v) in rows {
            let _ = write!(h, "<dt>{k}</dt><dd>{}</dd>", esc(&v));
        }
        let _ = write!(
            h,
            "<dt>Audit log</dt><dd class=\"{}\" id=\"audit\">{} ({} records in {} chains)</dd></dl>",
            if self.audit_passed { "ok" } else { "bad" },
            if self.audit_passed {
                "verified whole"
            } else {
                "PROBLEMS FOUND"
            },
            self.audit_records,
            self.audit_chains
        );
        if !self.audit_problems.is_empty() {
            h.push_str("<ul class=\"problems\">");
            for p in &self.audit_problems {
                let _ = write!(
                    h,
                    "<li>chain {} record {}: {}</li>",
                    esc(&p.chain),
                    esc(&p.position),
                    esc(&p.problem)
                );
            }
            h.push_str("</ul>");
        }
        let start = self
            .since_unix_ms
            .or_else(|| {
                self.disks
                    .iter()
                    .flat_map(|d| d.replications.iter().map(|r| r.time_unix_ms))
                    .min()
            })
            .unwrap_or(self.generated_unix_ms);
        for d in &self.disks {
            let _ = write!(h, "<section class=\"disk\"><h2>Disk {}</h2>", esc(&d.disk));
            if let Some(s) = &d.source {
                let _ = write!(h, "<p>Source: <code>{}</code></p>", esc(s));
            }
            let _ = write!(
                h,
                "<p>{} replications in the period, {} stored. RPO achieved: worst {}, now {}. Last successful verify: {}.{}</p>",
                d.replications.len(),
                size(d.bytes_sent),
                duration(d.rpo_worst_seconds),
                duration(d.rpo_current_seconds),
                d.last_verify.as_ref().map_or_else(
                    || "never".to_owned(),
                    |v| format!(
                        "{} of snapshot {}",
                        time(v.time_unix_ms),
                        esc(v.snapshot.as_deref().unwrap_or("-"))
                    )
                ),
                d.cutover.as_ref().map_or_else(String::new, |c| format!(
                    " Cutover: {} ({}).",
                    time(c.time_unix_ms),
                    esc(&c.result)
                ))
            );
            timeline(&mut h, d, start, self.generated_unix_ms);
            h.push_str("<table><tr><th>Time</th><th>Operation</th><th>Snapshot</th><th>Stored</th><th>Read</th><th>Result</th></tr>");
            for r in &d.replications {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                    time(r.time_unix_ms),
                    esc(&r.op),
                    esc(r.snapshot.as_deref().unwrap_or("-")),
                    size(r.bytes_stored),
                    size(r.bytes_read),
                    if r.result == "ok" { "ok" } else { "bad" },
                    esc(&r.result)
                );
            }
            let _ = write!(
                h,
                "</table><p>{} snapshots in the store.</p></section>",
                d.snapshots.len()
            );
        }
        if !self.validations.is_empty() {
            h.push_str("<h2>Validations</h2><ul>");
            for v in &self.validations {
                let ready = v.details.get("passed") == Some(&serde_json::Value::Bool(true));
                let _ = write!(
                    h,
                    "<li>{} {}: <span class=\"{}\">{}</span></li>",
                    time(v.time_unix_ms),
                    esc(v.object.as_deref().unwrap_or("-")),
                    if ready { "ok" } else { "bad" },
                    if ready { "ready" } else { "NOT READY" }
                );
            }
            h.push_str("</ul>");
        }
        h.push_str("</body></html>\n");
        h
    }
}

const CSS: &str = "body{font-family:sans-serif;margin:2em;color:#222}h1{margin-bottom:0}.store{color:#555;margin-top:.2em}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:bold}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;font-size:.9em}.ok{color:#176b2c}.bad{color:#b00020;font-weight:bold}svg{background:#fafafa;border:1px solid #ddd}.disk{margin-top:2em}";

/// The disk's timeline: time across, a bar per replication (its height the bytes stored,
/// against the disk's largest), a diamond per verify.
fn timeline(h: &mut String, d: &DiskReport, start: u64, end: u64) {
    const W: u64 = 900;
    const H: u64 = 120;
    let span = end.saturating_sub(start).max(1);
    let x = |t: u64| 20 + (t.saturating_sub(start).min(span)) * (W - 40) / span;
    let most = d
        .replications
        .iter()
        .map(|r| r.bytes_stored)
        .max()
        .unwrap_or(0)
        .max(1);
    let _ = write!(
        h,
        "<svg class=\"timeline\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"replications of {}\"><line x1=\"20\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/>",
        esc(&d.disk),
        H - 20,
        W - 20,
        H - 20
    );
    for r in &d.replications {
        let bar = 4 + r.bytes_stored * (H - 40) / most;
        let _ = write!(
            h,
            "<rect class=\"replication\" x=\"{}\" y=\"{}\" width=\"6\" height=\"{bar}\" fill=\"{}\"><title>{} {} {}: {} stored</title></rect>",
            x(r.time_unix_ms).saturating_sub(3),
            H - 20 - bar,
            if r.result == "ok" {
                "#2e7d32"
            } else {
                "#c62828"
            },
            time(r.time_unix_ms),
            esc(&r.op),
            esc(r.snapshot.as_deref().unwrap_or("-")),
            size(r.bytes_stored)
        );
    }
    if let Some(v) = &d.last_verify {
        let cx = x(v.time_unix_ms);
        let _ = write!(
            h,
            "<polygon class=\"verify\" points=\"{},{} {},{} {},{} {},{}\" fill=\"#1565c0\"><title>verified {}</title></polygon>",
            cx,
            H - 14,
            cx + 6,
            H - 8,
            cx,
            H - 2,
            cx.saturating_sub(6),
            H - 8,
            time(v.time_unix_ms)
        );
    }
    let _ = write!(
        h,
        "<text x=\"20\" y=\"14\" font-size=\"11\">{}</text><text x=\"{}\" y=\"14\" font-size=\"11\" text-anchor=\"end\">{}</text></svg>",
        time(start),
        W - 20,
        time(end)
    );
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
