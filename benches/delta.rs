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

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};
use blockferry_benches::{
    CHANGE_WRITE, blockferry_release, change_one_percent, field, machine, make_image, median_of,
    run, snapshot_id,
};

/// Runs of each delta (median taken).
const DELTA_RUNS: usize = 3;

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
        CHANGE_WRITE >> 10
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
