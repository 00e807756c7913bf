//! Incremental replication: after a full copy of a realistic image, 1% of its chunks change;
//! a delta from a VMware CBT list and a delta by hash comparison are timed against the full
//! replication and against `restic backup` (Debian package) of the same file into a local
//! restic repository, full and incremental, in one run.
//! Run: `cargo bench -p blockferry-benches --bench delta` (`BF_BENCH_MIB` sets the image size,
//! default 8192; `BF_BENCH_KEEP=1` keeps its files in target/bench-delta; needs `restic`:
//! apt-get install restic).
//!
//! Every run finds the image in the page cache (read whole before each; it fits in memory),
//! writes to the same local disk, with its default settings (blockferry: encrypted store,
//! 1 MiB chunks; restic: its defaults, which encrypt and deduplicate too).

// A benchmark harness prints its results.
#![allow(clippy::print_stdout)]

use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use blockferry_benches::{Rng, blockferry_release, machine, make_image};

const CHUNK: u64 = 1 << 20;
/// Bytes rewritten inside each changed chunk.
const WRITE: usize = 256 << 10;
/// Runs of each delta (median taken).
const DELTA_RUNS: usize = 3;

/// Runs a command, failing on a non-zero exit; returns wall seconds and stdout.
fn run(cmd: &mut Command) -> Result<(f64, String)> {
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((secs, String::from_utf8(out.stdout)?))
}

/// A number field of a `replicate --json` report.
fn field(json: &str, name: &str) -> u64 {
    json.split(&format!("\"{name}\":"))
        .nth(1)
        .and_then(|rest| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The snapshot id of a `replicate --json` report.
fn snapshot_id(json: &str) -> Result<String> {
    json.split("\"snapshot\":")
        .nth(1)
        .and_then(|rest| rest.split('"').nth(1))
        .map(str::to_owned)
        .context("no snapshot id in the report")
}

/// Reads the whole image so that every timed run finds it in the page cache.
fn warm(image: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(image)?;
    let mut buf = vec![0u8; 8 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// Runs `cmd()` `n` times (page cache warmed before each); returns the median seconds and
/// the last stdout.
fn median_of(n: usize, image: &Path, mut cmd: impl FnMut() -> Command) -> Result<(f64, String)> {
    let mut times = Vec::new();
    let mut last = String::new();
    for _ in 0..n {
        warm(image)?;
        let (secs, out) = run(&mut cmd())?;
        times.push(secs);
        last = out;
    }
    times.sort_by(f64::total_cmp);
    Ok((times[n / 2], last))
}

/// Rewrites `WRITE` random bytes inside 1% of the chunks (chosen at random); returns the
/// VMware CBT `QueryChangedDiskAreas` result that describes the change.
fn change_one_percent(image: &Path, mib: u64, base_change_id: &str) -> Result<(String, u64)> {
    let f = std::fs::OpenOptions::new().write(true).open(image)?;
    let chunks = mib * (1 << 20) / CHUNK;
    let n = (chunks / 100).max(1);
    let mut rng = Rng(0xde17_a0c4_a9ed);
    let mut picked: Vec<u64> = Vec::new();
    while (picked.len() as u64) < n {
        let c = rng.next_u64() % chunks;
        if !picked.contains(&c) {
            picked.push(c);
        }
    }
    picked.sort_unstable();
    let mut buf = vec![0u8; WRITE];
    let mut areas = String::new();
    for c in &picked {
        let within = (rng.next_u64() % ((CHUNK - WRITE as u64) / 4096)) * 4096;
        let at = c * CHUNK + within;
        rng.fill(&mut buf);
        f.write_all_at(&buf, at)?;
        if !areas.is_empty() {
            areas.push_str(", ");
        }
        write!(areas, r#"{{"start": {at}, "length": {WRITE}}}"#)?;
    }
    f.sync_all()?;
    let size = mib << 20;
    Ok((
        format!(
            r#"{{"startOffset": 0, "length": {size}, "changeId": "{base_change_id}", "changedArea": [{areas}]}}"#
        ),
        n,
    ))
}

fn main() -> Result<()> {
    let mib: u64 = std::env::var("BF_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8192);
    if Command::new("restic").arg("version").output().is_err() {
        bail!("restic is missing: apt-get install restic");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bf = blockferry_release()?;
    let work = root.join("target/bench-delta");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let image = work.join("disk.raw");
    let cbt = work.join("cbt.json");
    let (cbt_store, hash_store, repo) = (
        work.join("store-cbt"),
        work.join("store-hash"),
        work.join("restic"),
    );
    let env = [
        ("BLOCKFERRY_PASSPHRASE", "bench passphrase"),
        ("RESTIC_PASSWORD", "bench passphrase"),
    ];
    let state = work.join("state");
    let cache = work.join("restic-cache");
    let bfc = |args: &[&str]| {
        let mut c = Command::new(&bf);
        c.args(args).envs(env).env("BLOCKFERRY_STATE_DIR", &state);
        c
    };
    let restic = |args: &[&str]| {
        let mut c = Command::new("restic");
        c.args(["--repo", repo.to_str().unwrap_or_default()])
            .args(["--cache-dir", cache.to_str().unwrap_or_default()])
            .args(args)
            .envs(env);
        c
    };
    let p = |path: &Path| path.to_str().unwrap_or_default().to_owned();

    println!("machine: {}", machine());
    println!(
        "image: {mib} MiB realistic (a quarter holes, a tenth zeros, OS-like text, repeated and \
         random blocks); 1% of its 1 MiB chunks then get {} KiB rewritten; page cache warmed \
         before each run; full copies and restic once, deltas median of {DELTA_RUNS}\n",
        WRITE >> 10
    );
    make_image(&image, mib, true)?;
    for store in [&cbt_store, &hash_store] {
        run(&mut bfc(&["init", "--store", &p(store)]))?;
    }
    let img = p(&image);
    let (full_cbt, out) = median_of(1, &image, || {
        bfc(&[
            "replicate",
            &img,
            "--store",
            &p(&cbt_store),
            "--change-id",
            "cbt-1",
            "--json",
        ])
    })?;
    let full_read = field(&out, "bytes_read");
    let cbt_base = snapshot_id(&out)?;
    let (full_hash, out) = median_of(1, &image, || {
        bfc(&["replicate", &img, "--store", &p(&hash_store), "--json"])
    })?;
    let hash_base = snapshot_id(&out)?;
    run(&mut restic(&["init"]))?;
    let (restic_full, _) = median_of(1, &image, || restic(&["backup", "--quiet", &img]))?;

    let (list, changed) = change_one_percent(&image, mib, "cbt-1")?;
    std::fs::write(&cbt, list)?;
    // Each delta run takes the full copy as its base, so every run does the same work.
    let (delta_cbt, out) = median_of(DELTA_RUNS, &image, || {
        bfc(&[
            "replicate",
            &img,
            "--store",
            &p(&cbt_store),
            "--base",
            &cbt_base,
            "--changes",
            &p(&cbt),
            "--change-id",
            "cbt-2",
            "--json",
        ])
    })?;
    let cbt_read = field(&out, "bytes_read");
    let (delta_hash, out) = median_of(DELTA_RUNS, &image, || {
        bfc(&[
            "replicate",
            &img,
            "--store",
            &p(&hash_store),
            "--base",
            &hash_base,
            "--changes",
            "hash",
            "--json",
        ])
    })?;
    let hash_read = field(&out, "bytes_read");
    // Once: a second run would find the file unchanged and skip it.
    let (restic_inc, _) = median_of(1, &image, || restic(&["backup", "--quiet", &img]))?;

    // Not timed: both deltas hold the changed image.
    for store in [&cbt_store, &hash_store] {
        run(&mut bfc(&[
            "verify",
            "--store",
            &p(store),
            "latest",
            "--image",
            &img,
        ]))?;
    }

    // Byte counts of a few GiB: exact in an f64.
    #[allow(clippy::cast_precision_loss)]
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    println!("{changed} chunks changed; both deltas verified against the changed image\n");
    println!("{:<34} {:>9} {:>12}", "run", "seconds", "GiB read");
    for (name, secs, read) in [
        ("blockferry full (store A)", full_cbt, Some(full_read)),
        ("blockferry full (store B)", full_hash, None),
        ("restic backup, full", restic_full, None),
        ("blockferry delta, CBT list (A)", delta_cbt, Some(cbt_read)),
        ("blockferry delta, hash (B)", delta_hash, Some(hash_read)),
        ("restic backup, incremental", restic_inc, None),
    ] {
        let read = read.map_or_else(|| "-".to_owned(), |r| format!("{:.2}", gib(r)));
        println!("{name:<34} {secs:>9.2} {read:>12}");
    }
    println!();
    println!(
        "CBT delta / full replication:      {:>6.2}%   (target at most 3%)",
        100.0 * delta_cbt / full_cbt
    );
    println!(
        "restic incremental / hash delta:   {:>6.2}x   (target at least 5x)",
        restic_inc / delta_hash
    );
    println!(
        "restic full / blockferry full:     {:>6.2}x",
        restic_full / full_cbt.min(full_hash)
    );
    println!(
        "restic incremental / CBT delta:    {:>6.2}x",
        restic_inc / delta_cbt
    );
    if std::env::var_os("BF_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}
