//! Crash points, enumerated: a store that stops the process's view at its k-th mutating
//! operation (`store::mem::FaultyStore` over an in-memory store with S3's multipart uploads),
//! for every k of a full replication, a delta, a prune and a gc; then the run again (resumed
//! or anew) against what the crash left, and checks: every snapshot restores exactly, nothing
//! acknowledged was sent again, the store checks out (verify, gc finds nothing missing).

use std::path::Path;
use std::sync::Arc;

use blockferry::internals::pipeline::{Changes, DeltaOptions};
use blockferry::internals::store::mem::{Fault, FaultyStore, MemStore};
use blockferry::{GcOptions, KeepPolicy, gc, prune};
use blockferry::{InitOptions, ReplicateOptions, RestoreOptions, Silent, Store, VerifyOptions};
use blockferry::{ObjectStore, PartRules};
use blockferry_tests::{MIB, Rng, make_image};

const CHUNK: u32 = 64 << 10;

fn rules() -> PartRules {
    PartRules {
        min_part: u64::from(CHUNK),
        max_part: 1 << 30,
        max_parts: 10_000,
    }
}

/// A store in memory and the client state of the test.
struct World {
    inner: Arc<MemStore>,
    /// The client's state folder (job database, pins): replaced when another host takes over.
    state: std::sync::Mutex<Arc<tempfile::TempDir>>,
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        World::of(MemStore::multipart(rules()))
    }

    /// A world whose store is `inner` (one that takes packs whole, or in parts).
    fn of(inner: MemStore) -> World {
        let inner = Arc::new(inner);
        Store::init_backend(
            inner.as_ref(),
            &InitOptions {
                chunk_size: CHUNK,
                passphrase: None,
            },
        )
        .unwrap();
        World {
            inner,
            state: std::sync::Mutex::new(Arc::new(tempfile::tempdir().unwrap())),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn store(&self, fault: Fault) -> (Store, Arc<FaultyStore>) {
        let faulty = Arc::new(FaultyStore::new(self.inner.clone(), fault));
        let store = Store::open_pinned(faulty.clone(), None, self.state().path()).unwrap();
        (store, faulty)
    }

    fn state(&self) -> Arc<tempfile::TempDir> {
        Arc::clone(&self.state.lock().unwrap())
    }

    /// Another host takes over: the same store, an empty state folder.
    fn new_host(&self) {
        *self.state.lock().unwrap() = Arc::new(tempfile::tempdir().unwrap());
    }

    /// After a crash: the crashed process's locks are as good as stale (a real one's would
    /// be judged so; this one's pid is the test's own).
    fn reboot(&self) {
        for key in self.inner.list("locks/").unwrap() {
            self.inner.delete(&key).unwrap();
        }
    }

    fn replicate(&self, store: &Store, image: &Path, delta: bool) -> blockferry::Result<String> {
        let source = blockferry::open_image(image)?;
        let opts = ReplicateOptions {
            workers: 1,
            upload_jobs: 1,
            memory_budget: 8 << 20,
            // One chunk a part: many parts, many crash points.
            part_size: if self.inner.multipart().is_some() {
                CHUNK as usize
            } else {
                0
            },
            job_state: Some(self.state().path().to_path_buf()),
            delta: delta.then(|| DeltaOptions {
                base: blockferry::BaseRef::Snapshot("disk.raw@latest".to_owned()),
                changes: Changes::Hash,
                verify_sample: 0.0,
                change_id: None,
            }),
            ..ReplicateOptions::default()
        };
        blockferry::replicate(store, source.as_ref(), &opts, &Silent).map(|r| r.snapshot)
    }

    /// Every snapshot restores to the bytes it was taken of (`expect`: snapshot id → image
    /// bytes) and verifies; the gc finds no chunk missing.
    fn check(&self, expect: &[(String, Vec<u8>)], what: &str) {
        let (store, _) = self.store(Fault::None);
        let (snaps, bad) = store.snapshots().unwrap();
        assert!(bad.is_empty(), "{what}: unreadable snapshots {bad:?}");
        assert!(
            store.history_problems(&snaps).unwrap().is_empty(),
            "{what}: history problems"
        );
        for (id, bytes) in expect {
            if !snaps.iter().any(|s| &s.id == id) {
                continue; // forgotten by a prune
            }
            let out = self.dir.path().join("out.raw");
            let opts = RestoreOptions {
                force: true,
                ..RestoreOptions::default()
            };
            blockferry::restore(&store, id, &out, &opts, &Silent)
                .unwrap_or_else(|e| panic!("{what}: restoring {id}: {e}"));
            assert!(
                std::fs::read(&out).unwrap() == *bytes,
                "{what}: {id} differs"
            );
            let v = blockferry::verify(&store, id, &VerifyOptions::default(), &Silent).unwrap();
            assert!(v.ok(), "{what}: {id}: {:?}", v.problems);
        }
        let dry = GcOptions {
            dry_run: true,
            ..GcOptions::default()
        };
        let r = gc(&store, &dry, &Silent).unwrap();
        assert_eq!(r.chunks_missing, 0, "{what}: {r:?}");
    }
}

/// A 2 MiB disk with 1 MiB of data in 64 KiB chunks: sixteen chunks, holes between.
fn disk(dir: &Path, rng: &mut Rng) -> std::path::PathBuf {
    let image = dir.join("disk.raw");
    let regions: Vec<(u64, Vec<u8>)> = (0..16u64)
        .map(|i| ((i * 128) << 10, rng.bytes(64 << 10)))
        .collect();
    make_image(&image, 2 * MIB, &regions);
    image
}

/// Replication, full and delta: every crash point, then a resumed run.
#[test]
fn every_crash_point_of_a_replication_resumes_exactly() {
    crash_points_of_a_replication(false, false);
}

/// Replication, full and delta: every crash point, then a run on another host (an empty
/// state folder), which resumes from the store's journal of the job.
#[test]
fn every_crash_point_of_a_replication_resumes_on_another_host() {
    crash_points_of_a_replication(true, false);
}

/// The same, on a store that takes packs whole (a folder): another host finds the job's
/// packs by their names.
#[test]
fn every_crash_point_of_a_replication_into_whole_packs_resumes_on_another_host() {
    crash_points_of_a_replication(true, true);
}

/// Every crash point of a replication, then the run again on this host or (`new_host`) on
/// another one: what both runs sent is what one run sends, but for the trailer a resumed pack
/// gets anew, and on another host the part whose answer came but whose record in the
/// journal did not (one part: one upload at a time here).
fn crash_points_of_a_replication(new_host: bool, whole: bool) {
    let world = || {
        if whole {
            World::of(MemStore::new())
        } else {
            World::new()
        }
    };
    let mut rng = Rng::seeded("crash_points_replicate");
    let seed_dir = tempfile::tempdir().unwrap();
    let image = disk(seed_dir.path(), &mut rng);
    let first = std::fs::read(&image).unwrap();
    let mut changed = first.clone();
    for i in [3usize, 9] {
        let at = (i * 128) << 10;
        changed[at..at + 4096].copy_from_slice(&rng.bytes(4096));
    }
    for delta in [false, true] {
        // A clean run: how many mutating operations, and what it sends.
        let clean = world();
        if delta {
            let (store, _) = clean.store(Fault::None);
            clean.replicate(&store, &image, false).unwrap();
            std::fs::write(&image, &changed).unwrap();
        }
        let (store, counted) = clean.store(Fault::None);
        clean.replicate(&store, &image, delta).unwrap();
        let ops = counted.mutations();
        let sent = counted.pack_bytes();
        assert!(ops > 8, "{ops} operations");
        eprintln!(
            "{} replication: {ops} crash points",
            if delta { "delta" } else { "full" }
        );
        for k in 1..=ops {
            let what = format!(
                "{} crash at {k} of {ops}",
                if delta { "delta" } else { "full" }
            );
            let w = world();
            let mut expect = Vec::new();
            if delta {
                std::fs::write(&image, &first).unwrap();
                let (store, _) = w.store(Fault::None);
                let id = w.replicate(&store, &image, false).unwrap();
                expect.push((id, first.clone()));
                std::fs::write(&image, &changed).unwrap();
            }
            let (store, crashed) = w.store(Fault::CrashAt(k));
            let outcome = w.replicate(&store, &image, delta);
            drop(store);
            w.reboot();
            if new_host {
                w.new_host();
            }
            let acked = crashed.pack_bytes();
            let (store, again) = w.store(Fault::None);
            let id = match outcome {
                // Crashed after the commit (a lock's removal): done already.
                Ok(id) => id,
                Err(_) => w
                    .replicate(&store, &image, delta)
                    .unwrap_or_else(|e| panic!("{what}: the run again: {e}")),
            };
            // Nothing acknowledged is sent again: what both runs sent is what one sends, but
            // for the trailer a resumed pack gets anew (the part the crash hit was not
            // acknowledged, so it counts once).
            let slack = if new_host {
                8192 + u64::from(CHUNK) + 4096
            } else {
                8192
            };
            assert!(
                acked + again.pack_bytes() <= sent + slack,
                "{what}: sent {acked} + {} of {sent}",
                again.pack_bytes()
            );
            expect.push((id, std::fs::read(&image).unwrap()));
            w.check(&expect, &what);
        }
        std::fs::write(&image, &first).unwrap();
    }
}

/// Prune and gc: every crash point leaves a store whose kept snapshots restore, and the
/// operation run again completes.
#[test]
fn every_crash_point_of_a_prune_and_a_gc_leaves_a_sound_store() {
    let mut rng = Rng::seeded("crash_points_gc");
    let seed_dir = tempfile::tempdir().unwrap();
    let image = disk(seed_dir.path(), &mut rng);
    // Three versions of the disk, each rewriting four chunks.
    let mut versions = vec![std::fs::read(&image).unwrap()];
    for v in 1..3usize {
        let mut next = versions[v - 1].clone();
        for i in [v, v + 4, v + 8, v + 12] {
            let at = (i * 128) << 10;
            next[at..at + (64 << 10)].copy_from_slice(&rng.bytes(64 << 10));
        }
        versions.push(next);
    }
    let build = || {
        let w = World::new();
        let mut expect = Vec::new();
        for v in &versions {
            std::fs::write(&image, v).unwrap();
            let (store, _) = w.store(Fault::None);
            expect.push((w.replicate(&store, &image, false).unwrap(), v.clone()));
        }
        (w, expect)
    };
    let policy = KeepPolicy {
        last: 1,
        ..KeepPolicy::default()
    };
    let gc_opts = GcOptions {
        max_unused: 0.0,
        wait: std::time::Duration::from_secs(5),
        ..GcOptions::default()
    };
    for step in ["prune", "gc"] {
        let (clean, _) = build();
        let (store, counted) = clean.store(Fault::None);
        if step == "gc" {
            prune(&store, &policy, None, false).unwrap();
            let (store, c) = clean.store(Fault::None);
            gc(&store, &gc_opts, &Silent).unwrap();
            assert!(c.mutations() > 3);
        } else {
            prune(&store, &policy, None, false).unwrap();
        }
        let ops = if step == "gc" {
            let (w, _) = build();
            let (store, _) = w.store(Fault::None);
            prune(&store, &policy, None, false).unwrap();
            let (store, c) = w.store(Fault::None);
            gc(&store, &gc_opts, &Silent).unwrap();
            c.mutations()
        } else {
            counted.mutations()
        };
        for k in 1..=ops {
            let what = format!("{step} crash at {k} of {ops}");
            let (w, expect) = build();
            if step == "gc" {
                let (store, _) = w.store(Fault::None);
                prune(&store, &policy, None, false).unwrap();
            }
            let (store, _) = w.store(Fault::CrashAt(k));
            let outcome = if step == "gc" {
                gc(&store, &gc_opts, &Silent).map(drop)
            } else {
                prune(&store, &policy, None, false).map(drop)
            };
            drop(store);
            w.reboot();
            // What the crash left is sound, and the operation completes when run again.
            w.check(&expect, &format!("{what}, after the crash"));
            let (store, _) = w.store(Fault::None);
            if outcome.is_err() {
                if step == "gc" {
                    gc(&store, &gc_opts, &Silent).unwrap_or_else(|e| panic!("{what}: again: {e}"));
                } else {
                    prune(&store, &policy, None, false)
                        .unwrap_or_else(|e| panic!("{what}: again: {e}"));
                }
            }
            w.check(&expect, &what);
            let (snaps, _) = store.snapshots().unwrap();
            assert_eq!(snaps.len(), 1, "{what}");
        }
    }
}

/// Issue 16.3: a gc checked its lock once and then deleted without limit. Its lock taken for
/// stale (deleted by another gc) while it deletes, it stops before the next batch.
#[test]
fn a_gc_that_loses_its_lock_while_deleting_stops() {
    let mut rng = Rng::seeded("gc_lost_lock");
    let dir = tempfile::tempdir().unwrap();
    let w = World::new();
    // Many replications, each with its own index object: more deletions than one batch.
    let image = dir.path().join("disk.raw");
    for _ in 0..80 {
        make_image(&image, 256 << 10, &[(0, rng.bytes(64 << 10))]);
        let (store, _) = w.store(Fault::None);
        w.replicate(&store, &image, false).unwrap();
    }
    let expect = vec![];
    let indexes = || w.inner.list("index/").unwrap().len();
    assert!(indexes() >= 80);
    let inner = w.inner.clone();
    let taken = std::sync::atomic::AtomicBool::new(false);
    let faulty =
        FaultyStore::new(w.inner.clone(), Fault::None).with_hook(Box::new(move |_, op, _| {
            // At the first deletion, another gc takes this one's locks for stale.
            if op == blockferry::internals::store::mem::Op::Delete
                && !taken.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                for key in inner.list("locks/").unwrap() {
                    inner.delete(&key).unwrap();
                }
            }
        }));
    let store = Store::open_pinned(Arc::new(faulty), None, w.state().path()).unwrap();
    let opts = GcOptions {
        wait: std::time::Duration::from_secs(5),
        ..GcOptions::default()
    };
    let e = gc(&store, &opts, &Silent).unwrap_err();
    assert!(e.to_string().contains("lost"), "{e}");
    assert!(indexes() > 1, "the gc deleted on after losing its lock");
    w.reboot();
    w.check(&expect, "after the stopped gc");
}
