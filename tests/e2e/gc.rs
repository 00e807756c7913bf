//! Garbage collection: `prune` + `gc` give the space back (to within 10% of a fresh copy of
//! what is kept) and never break a kept snapshot, beside a running replication too; store
//! locks make new users wait while a gc deletes and make a gc wait for (or refuse) others.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blockferry_tests::{
    MIB, PASSPHRASE, Rng, Sandbox, Value, bin, file_hash, kill_when, make_image, write_at,
};

/// Bytes of a local store's objects (locks and temporary files left out).
/// Bytes of the store's data and metadata (not its locks, temporary files or audit log: a
/// failed gc adds its record to the log, and nothing else).
fn store_bytes(store: &str) -> u64 {
    blockferry_tests::objects(store, "")
        .iter()
        .filter(|p| {
            let rel = p.strip_prefix(store).unwrap();
            !rel.starts_with("locks") && !rel.starts_with("tmp") && !rel.starts_with("audit")
        })
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

fn snapshot_ids(sb: &Sandbox) -> Vec<String> {
    let store = sb.store();
    sb.json(&["snapshots", "--store", &store])["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

fn gc(sb: &Sandbox, extra: &[&str]) -> Value {
    let store = sb.store();
    let mut args = vec!["gc", "--store", store.as_str()];
    args.extend_from_slice(extra);
    sb.json(&args)
}

/// Rewrites `n` random whole chunks of an image with fresh random data.
fn churn(rng: &mut Rng, image: &Path, size: u64, n: usize) {
    for _ in 0..n {
        let at = rng.below(size / MIB) * MIB;
        write_at(image, at, &rng.bytes(MIB as usize));
    }
}

#[test]
fn prune_and_gc_give_the_space_back_and_kept_snapshots_restore() {
    let mut rng = Rng::seeded("gc_reclaim");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let size = 32 * MIB;
    let image = sb.path("vm.raw");
    make_image(&image, size, &[(0, rng.bytes((24 * MIB) as usize))]);
    let db = sb.path("db.raw");
    make_image(&db, 8 * MIB, &[(MIB, rng.texty((4 * MIB) as usize))]);
    sb.replicate(&db, &[]);
    // Eight versions of the VM, each with a quarter of its chunks rewritten, some as deltas.
    let mut versions: Vec<(String, PathBuf)> = Vec::new();
    for v in 0..8 {
        churn(&mut rng, &image, size, 8);
        write_at(&image, rng.below(size - 4096), &rng.bytes(4096));
        let extra: &[&str] = if v % 2 == 1 {
            &["--base", "latest", "--changes", "hash"]
        } else {
            &[]
        };
        let id = sb.replicate(&image, extra)["snapshot"]
            .as_str()
            .unwrap()
            .to_owned();
        let copy = sb.path(&format!("vm-{v}.raw"));
        std::fs::copy(&image, &copy).unwrap();
        versions.push((id, copy));
    }
    sb.ok(&["prune", "--store", &store, "--keep-last", "2"]);
    let before = store_bytes(&store);

    let dry = gc(&sb, &["--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(store_bytes(&store), before, "a dry run changes nothing");

    let report = gc(&sb, &[]);
    assert_eq!(report["snapshots"], 3, "{report}");
    assert_eq!(report["chunks_missing"], 0, "{report}");
    // Whether a pack lost all its chunks (deleted) or only some (repacked) depends on
    // which chunks the random churn hit; that some were given back does not.
    let freed =
        report["packs_deleted"].as_u64().unwrap() + report["packs_repacked"].as_u64().unwrap();
    assert!(freed > 0, "{report}");
    assert!(report["pages_deleted"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(
        report["packs_deleted"], dry["packs_deleted"],
        "{report} {dry}"
    );
    assert_eq!(
        report["packs_repacked"], dry["packs_repacked"],
        "{report} {dry}"
    );
    let after = store_bytes(&store);
    assert!(
        after * 10 < before * 7,
        "before {before}, after {after}: {report}"
    );

    // Every kept snapshot restores and verifies.
    let kept = snapshot_ids(&sb);
    assert_eq!(kept.len(), 3);
    for (id, copy) in &versions[6..] {
        assert!(kept.contains(id));
        let out = sb.restore(id, "out.raw");
        assert_eq!(file_hash(&out), file_hash(copy), "snapshot {id}");
        let v = sb.json(&["verify", "--store", &store, id]);
        assert_eq!(v["ok"], true, "{v}");
    }
    let out = sb.restore(&kept[0], "db-out.raw");
    assert_eq!(file_hash(&out), file_hash(&db));

    // Within 10% of a fresh store holding the same three disks.
    let fresh = Sandbox::new();
    fresh.init(&[]);
    fresh.replicate(&db, &[]);
    for (_, copy) in &versions[6..] {
        fresh.replicate(copy, &["--name", "vm.raw", "--same-disk"]);
    }
    let fresh_bytes = store_bytes(&fresh.store());
    assert!(
        after * 10 <= fresh_bytes * 11,
        "after gc {after} bytes, a fresh copy {fresh_bytes}: {report}"
    );

    // A second gc finds nothing to delete.
    let again = gc(&sb, &[]);
    assert_eq!(again["packs_deleted"], 0, "{again}");
    assert_eq!(again["pages_deleted"], 0, "{again}");
    // The store still takes deltas on what is kept.
    churn(&mut rng, &image, size, 2);
    sb.replicate(&image, &["--base", "latest", "--changes", "hash"]);
    sb.verify_latest_against(&image);
}

/// Starts a replication whose stderr can be read afterwards.
fn spawn(sb: &Sandbox, image: &Path, extra: &[&str]) -> std::process::Child {
    let store = sb.store();
    Command::new(bin())
        .args(["replicate", image.to_str().unwrap(), "--store", &store])
        .args(extra)
        .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE)
        .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads lines of a child's output until one contains `needle` (failing at its end);
/// returns what it read.
fn lines_until(out: &mut impl std::io::BufRead, needle: &str) -> String {
    let mut seen = String::new();
    while !seen.lines().any(|l| l.contains(needle)) {
        let n = out.read_line(&mut seen).unwrap();
        assert!(n > 0, "the output ended before {needle:?}: {seen}");
    }
    seen
}

fn lock_files(store: &str) -> Vec<PathBuf> {
    blockferry_tests::objects(store, "locks")
}

#[test]
fn gc_beside_a_running_replication_keeps_what_it_deduplicates_against() {
    let mut rng = Rng::seeded("gc_concurrent");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let a = sb.path("a.raw");
    let old = rng.bytes((16 * MIB) as usize);
    make_image(&a, 16 * MIB, &[(0, old.clone())]);
    let b = sb.path("b.raw");
    make_image(&b, 16 * MIB, &[(0, rng.bytes((16 * MIB) as usize))]);
    sb.replicate(&a, &["--name", "vm"]);
    sb.replicate(&b, &["--name", "vm", "--same-disk"]);
    // a's snapshot is forgotten: its chunks are garbage when the gc marks.
    sb.ok(&["prune", "--store", &store, "--keep-last", "1"]);
    // c holds all of a's chunks (deduplicated against its packs) and new ones, sent slowly.
    let c = sb.path("c.raw");
    make_image(
        &c,
        48 * MIB,
        &[(0, old), (16 * MIB, rng.bytes((32 * MIB) as usize))],
    );
    let child = spawn(
        &sb,
        &c,
        &[
            "--name",
            "other",
            "--bwlimit",
            "8M",
            "--memory-budget",
            "32M",
            "--json",
        ],
    );
    // Its lock is taken before it reads the index: once it stored a pack, it has read the
    // index and holds the lock until its snapshot is written (seconds later, at 8 MB/s).
    let start = Instant::now();
    let sent = "SELECT coalesce(sum(bytes_sent), 0) FROM jobs WHERE state = 'active'";
    while sb.job_db_count(sent) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the replication stored nothing"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        lock_files(&store).len(),
        1,
        "the replication holds its lock"
    );
    let report = gc(&sb, &[]);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replicated: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The gc waited for the replication before deleting.
    assert!(report["waited_ms"].as_u64().unwrap() > 100, "{report}");
    let id = replicated["snapshot"].as_str().unwrap();
    let restored = sb.restore(id, "c-out.raw");
    assert_eq!(file_hash(&restored), file_hash(&c));
    for id in snapshot_ids(&sb) {
        let v = sb.json(&["verify", "--store", &store, &id]);
        assert_eq!(v["ok"], true, "{v}");
    }
    assert!(lock_files(&store).is_empty(), "{:?}", lock_files(&store));
    // Everything left is live: a second gc deletes nothing.
    let left = gc(&sb, &[]);
    assert_eq!(left["packs_deleted"], 0, "{left}");
}

/// Writes a lock object as another process would.
fn fake_lock(store: &str, name: &str, kind: &str, pid: u32, refreshed_ago_ms: u64) -> PathBuf {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let lock = serde_json::json!({
        "kind": kind,
        "operation": "test",
        "host": read("/proc/sys/kernel/hostname"),
        "boot": read("/proc/sys/kernel/random/boot_id"),
        "pidns": std::fs::read_link("/proc/self/ns/pid").unwrap().display().to_string(),
        "pid": pid,
        "created_unix_ms": now - refreshed_ago_ms,
        "refreshed_unix_ms": now - refreshed_ago_ms,
    });
    let dir = Path::new(store).join("locks");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, lock.to_string()).unwrap();
    // Its age is what the store says (the file's time), not what it says of itself.
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_millis(refreshed_ago_ms))
        .unwrap();
    path
}

/// The pid of a process that has exited (and been reaped).
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn locks_make_replications_wait_for_a_deleting_gc_and_a_gc_wait_for_users() {
    let mut rng = Rng::seeded("gc_locks");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let image = sb.path("vm.raw");
    make_image(&image, 4 * MIB, &[(0, rng.bytes((2 * MIB) as usize))]);
    sb.replicate(&image, &[]);
    write_at(&image, 0, &rng.bytes(MIB as usize));
    let me = std::process::id();

    // A gc that is deleting (a live exclusive lock) holds new replications back.
    let lock = fake_lock(&store, "00000000000000a1", "exclusive", me, 0);
    let mut child = spawn(&sb, &image, &[]);
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    // It says it waits (and then waits): nothing moves until the lock goes.
    let mut stderr = lines_until(&mut err, "waiting for a garbage collection");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the replication did not wait: {stderr}"
    );
    std::fs::remove_file(&lock).unwrap();
    std::io::Read::read_to_string(&mut err, &mut stderr).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{stderr}");

    // A dead holder's lock (its process is gone, or it was not refreshed for an hour) holds
    // nothing back.
    fake_lock(&store, "00000000000000a2", "exclusive", dead_pid(), 0);
    fake_lock(&store, "00000000000000a3", "exclusive", 1, 3_600_000);
    let out = sb.run(&["replicate", image.to_str().unwrap(), "--store", &store]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("waiting"), "{stderr}");

    // A gc removes stale locks; a live user makes it wait, then give up without deleting.
    sb.ok(&["prune", "--store", &store, "--keep-last", "1"]);
    let user = fake_lock(&store, "00000000000000b1", "shared", me, 0);
    let before = store_bytes(&store);
    sb.fails(
        &["gc", "--store", &store, "--wait", "1s"],
        1,
        &["still in use", "test (shared)"],
    );
    assert_eq!(store_bytes(&store), before, "nothing was deleted");
    assert_eq!(
        lock_files(&store),
        vec![user.clone()],
        "stale locks removed, own lock withdrawn"
    );
    std::fs::remove_file(&user).unwrap();

    // One gc at a time.
    let other = fake_lock(&store, "00000000000000c1", "gc", me, 0);
    sb.fails(
        &["gc", "--store", &store],
        1,
        &["another garbage collection holds the store"],
    );
    std::fs::remove_file(&other).unwrap();
    let report = gc(&sb, &[]);
    // The forgotten chunk shared a pack with a live one or had its own, depending on which
    // worker took it: repacked or deleted, its pack is gone either way.
    assert!(
        report["packs_deleted"].as_u64().unwrap() + report["packs_repacked"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(store_bytes(&store) < before);
    assert!(lock_files(&store).is_empty());
    sb.verify_latest_against(&image);
}

#[test]
fn a_stopped_job_whose_packs_were_collected_resumes_correctly() {
    let mut rng = Rng::seeded("gc_resume");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let image = sb.path("disk.raw");
    make_image(&image, 96 * MIB, &[(0, rng.bytes((96 * MIB) as usize))]);
    let packs = || blockferry_tests::objects(&store, "packs").len();
    kill_when(&sb, &image, &["--memory-budget", "32M"], || packs() >= 2);
    // The killed run's packs belong to no snapshot: the gc deletes them (its lock is stale,
    // its process gone).
    let report = gc(&sb, &[]);
    assert!(report["packs_deleted"].as_u64().unwrap() >= 2, "{report}");
    assert_eq!(packs(), 0, "{report}");
    let resumed = sb.replicate(&image, &["--memory-budget", "32M"]);
    assert_eq!(resumed["resumed"], true, "{resumed}");
    let out = sb.restore(resumed["snapshot"].as_str().unwrap(), "out.raw");
    assert_eq!(file_hash(&out), file_hash(&image));
    sb.verify_latest_against(&image);
}

#[test]
fn gc_on_s3() {
    let mut rng = Rng::seeded("gc_s3");
    let sb = Sandbox::new_s3("gc");
    sb.init(&[]);
    let store = sb.store();
    let image = sb.path("vm.raw");
    make_image(&image, 24 * MIB, &[(0, rng.bytes((24 * MIB) as usize))]);
    sb.replicate(&image, &[]);
    churn(&mut rng, &image, 24 * MIB, 12);
    sb.replicate(&image, &[]);
    sb.ok(&["prune", "--store", &store, "--keep-last", "1"]);
    let report = gc(&sb, &["--max-unused", "0%"]);
    assert!(
        report["packs_repacked"].as_u64().unwrap() + report["packs_deleted"].as_u64().unwrap() > 0,
        "{report}"
    );
    // What is left is the live chunks and little else.
    assert!(
        report["bytes_after"].as_u64().unwrap() < 24 * MIB * 11 / 10,
        "{report}"
    );
    assert_eq!(report["bytes_unused_left"], 0, "{report}");
    let out = sb.restore("latest", "out.raw");
    assert_eq!(file_hash(&out), file_hash(&image));
    sb.verify_latest_against(&image);
}
