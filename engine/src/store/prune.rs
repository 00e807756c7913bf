//! Retention: which snapshots a policy keeps, and forgetting the others.
//!
//! Forgetting a snapshot deletes only its manifest. Every snapshot, delta or not, lists all of
//! its pages, so no other snapshot depends on a forgotten one; the space its chunks and pages
//! hold is reclaimed by a garbage collection, not here. Forgetting is therefore safe while
//! other replications write to the store (a delta running on a base that is forgotten meanwhile
//! has already read what it takes from it).

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::store::{Snapshot, Store};

/// Which snapshots to keep, per disk. A snapshot is kept if any rule keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    /// The newest this many.
    pub last: usize,
    /// The newest of each of the last this many days (UTC) that have snapshots.
    pub daily: usize,
    /// The newest of each of the last this many weeks (Monday to Sunday, UTC).
    pub weekly: usize,
    /// The newest of each of the last this many months (UTC).
    pub monthly: usize,
}

impl KeepPolicy {
    /// Whether the policy keeps nothing (refused: it would forget every snapshot).
    pub fn is_empty(&self) -> bool {
        self.last == 0 && self.daily == 0 && self.weekly == 0 && self.monthly == 0
    }
}

/// What a prune did (or would do, dry).
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    /// Snapshots kept, by id.
    pub kept: Vec<String>,
    /// Snapshots forgotten (or to forget, on a dry run), by id.
    pub forgotten: Vec<String>,
    /// Whether anything was deleted.
    pub dry_run: bool,
}

const DAY_MS: u64 = 86_400_000;

/// The civil (year, month) of a day count since 1970-01-01 (proleptic Gregorian).
fn year_month(days: u64) -> (i64, u32) {
    let (y, m, _) = civil(days);
    (y, m)
}

/// A time as RFC 3339 in UTC, to the second (`2026-12-03T15:04:05Z`).
pub(crate) fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (y, m, d) = civil(secs / 86_400);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// The civil (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil(days: u64) -> (i64, u32, u32) {
    // Howard Hinnant's civil-from-days, for non-negative day counts.
    let z = i64::try_from(days).unwrap_or(i64::MAX / 2) + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let day = doy - (153 * mp + 2) / 5 + 1;
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

/// The ids `policy` keeps among `snapshots` (all of one disk or several: rules apply per
/// disk name).
pub(crate) fn select(snapshots: &[Snapshot], policy: &KeepPolicy) -> HashSet<String> {
    let mut by_disk: BTreeMap<&str, Vec<&Snapshot>> = BTreeMap::new();
    for s in snapshots {
        by_disk.entry(s.disk.name.as_str()).or_default().push(s);
    }
    let mut keep = HashSet::new();
    for mut snaps in by_disk.into_values() {
        // Newest first: by place in the disk's history (not by the writers' clocks), then,
        // among format-1 snapshots (which have none), by time.
        snaps.sort_by(|a, b| {
            (b.seq, b.created_unix_ms, &b.id).cmp(&(a.seq, a.created_unix_ms, &a.id))
        });
        keep.extend(snaps.iter().take(policy.last).map(|s| s.id.clone()));
        let mut bucketed = |n: usize, bucket: &dyn Fn(u64) -> i64| {
            let mut seen = Vec::new();
            for s in &snaps {
                let b = bucket(s.created_unix_ms / DAY_MS);
                if !seen.contains(&b) {
                    if seen.len() == n {
                        break;
                    }
                    seen.push(b);
                    keep.insert(s.id.clone());
                }
            }
        };
        bucketed(policy.daily, &|d| i64::try_from(d).unwrap_or(i64::MAX));
        // 1970-01-01 was a Thursday: (day + 3) / 7 counts Monday-to-Sunday weeks.
        bucketed(policy.weekly, &|d| {
            i64::try_from((d + 3) / 7).unwrap_or(i64::MAX)
        });
        bucketed(policy.monthly, &|d| {
            let (y, m) = year_month(d);
            y * 12 + i64::from(m)
        });
    }
    keep
}

/// Forgets the snapshots `policy` does not keep (only those of `disk`, if given).
pub fn prune(
    store: &Store,
    policy: &KeepPolicy,
    disk: Option<&str>,
    dry_run: bool,
) -> Result<PruneReport> {
    let started = std::time::Instant::now();
    let result = prune_run(store, policy, disk, dry_run);
    if dry_run {
        return result;
    }
    let mut ev = crate::store::audit::AuditEvent::of_report("prune", started, &result, "");
    ev.disk = disk.map(str::to_owned);
    store.audited(&ev, result)
}

fn prune_run(
    store: &Store,
    policy: &KeepPolicy,
    disk: Option<&str>,
    dry_run: bool,
) -> Result<PruneReport> {
    if policy.is_empty() {
        return Err(Error::config(
            "a prune needs a rule that keeps something: the last, daily, weekly or monthly \
             snapshots",
        )
        .with_setting("keep"));
    }
    let (snaps, unreadable) = store.snapshots()?;
    if let Some(e) = unreadable.into_iter().next() {
        // A manifest that cannot be read cannot be judged: stop rather than guess.
        return Err(e);
    }
    let snaps: Vec<Snapshot> = snaps
        .into_iter()
        .filter(|s| disk.is_none_or(|d| s.disk.name == d))
        .collect();
    let keep = select(&snaps, policy);
    let mut report = PruneReport {
        kept: Vec::new(),
        forgotten: Vec::new(),
        dry_run,
    };
    for s in &snaps {
        if keep.contains(&s.id) {
            report.kept.push(s.id.clone());
        } else {
            if !dry_run {
                store.forget_snapshot(&s.id)?;
            }
            report.forgotten.push(s.id.clone());
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DiskMeta, SnapshotStats};

    fn snap(id: &str, disk: &str, ms: u64) -> Snapshot {
        Snapshot {
            id: id.to_owned(),
            created_unix_ms: ms,
            seq: 0,
            previous: None,
            disk: DiskMeta {
                name: disk.to_owned(),
                source: String::new(),
                member: None,
                chain_base: None,
                format: "raw".to_owned(),
                virtual_size: 0,
                logical_sector_size: 512,
                physical_sector_size: 512,
                allocated_bytes: 0,
                fingerprint: crate::store::SourceFingerprint::default(),
            },
            chunk_size: 1 << 20,
            page_entries: 4096,
            parent: None,
            change_id: None,
            changes: None,
            pages: Vec::new(),
            stats: SnapshotStats::default(),
            tool: String::new(),
            job: None,
        }
    }

    #[test]
    fn a_disk_s_history_orders_by_sequence_not_clock() {
        // The second snapshot's writer had a clock years behind the first's.
        let mut a = snap("a", "d", 900_000_000_000_000);
        a.seq = 1;
        let mut b = snap("b", "d", 1_000);
        b.seq = 2;
        let policy = KeepPolicy {
            last: 1,
            ..KeepPolicy::default()
        };
        assert_eq!(kept(&[a, b], &policy), ["b"]);
    }

    fn kept(snaps: &[Snapshot], policy: &KeepPolicy) -> Vec<String> {
        let keep = select(snaps, policy);
        let mut v: Vec<String> = keep.into_iter().collect();
        v.sort();
        v
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_312_931_155), "2026-12-03T15:48:51Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn civil_months() {
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(year_month(31), (1970, 2));
        assert_eq!(year_month(59), (1970, 3));
        // 2000-02-29 and 2024-12-31.
        assert_eq!(year_month(11_016), (2000, 2));
        assert_eq!(year_month(20_088), (2024, 12));
        assert_eq!(year_month(20_089), (2025, 1));
    }

    #[test]
    fn rules_apply_per_disk_and_combine() {
        let h = 3_600_000;
        // Disk a: two a day for five days (day 10 to 14); disk b: one snapshot.
        let mut snaps = Vec::new();
        for day in 10..15u64 {
            for half in 0..2 {
                snaps.push(snap(
                    &format!("a{day}{half}"),
                    "a",
                    day * DAY_MS + half * 12 * h,
                ));
            }
        }
        snaps.push(snap("b", "b", 3 * DAY_MS));
        let last2 = KeepPolicy {
            last: 2,
            ..KeepPolicy::default()
        };
        assert_eq!(kept(&snaps, &last2), ["a140", "a141", "b"]);
        let daily3 = KeepPolicy {
            daily: 3,
            ..KeepPolicy::default()
        };
        assert_eq!(kept(&snaps, &daily3), ["a121", "a131", "a141", "b"]);
        let both = KeepPolicy {
            last: 1,
            daily: 2,
            ..KeepPolicy::default()
        };
        assert_eq!(kept(&snaps, &both), ["a131", "a141", "b"]);
        // Day 10 (1970-01-11) is a Sunday: days 11-14 are the next week.
        let weekly2 = KeepPolicy {
            weekly: 2,
            ..KeepPolicy::default()
        };
        assert_eq!(kept(&snaps, &weekly2), ["a101", "a141", "b"]);
        let monthly = KeepPolicy {
            monthly: 5,
            ..KeepPolicy::default()
        };
        assert_eq!(kept(&snaps, &monthly), ["a141", "b"]);
        assert!(KeepPolicy::default().is_empty());
    }
}
