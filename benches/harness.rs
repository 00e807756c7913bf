//! The end-to-end harness: blockferry and the tools users would otherwise pick, side by side
//! on the same generated data, in one run, with a table of times and ratios against the
//! targets.
//!
//! Run: `cargo bench -p blockferry-benches --bench harness`
//!
//! - `BF_BENCH_MIB`: size of the dense image (default 2048);
//! - `BF_BENCH_S3=0`: skip the S3 section (which starts the tests' SeaweedFS);
//! - `BF_BENCH_KEEP=1`: keep `target/bench-harness`;
//! - `BF_BENCH_ONLY=full,convert,export,nbd,engines,sparse,s3`: run only these sections (the ceiling
//!   always runs; `full` includes the deltas).
//!
//! Needs `qemu-img`, `restic` and `rclone` (`apt-get install qemu-utils restic rclone`); the
//! cold-cache rows need root (to drop the page cache) and are skipped otherwise.
//!
//! The sections:
//! - ceiling: blockferry's own per-chunk work (zero test, keyed blake3, dedup lookup, lz4,
//!   AES-256-GCM) on the image held in memory, on one thread and on one per core;
//! - full replication of the dense OS-like image into a new local store, against the ceiling
//!   and against `restic backup`; then 1% of the chunks change, and deltas (by hash, and from
//!   a VMware CBT list) against restic's incremental backup;
//! - `convert` against `qemu-img convert -O raw`, VMDK and VHDX, dense and sparse;
//! - `export` of a snapshot to each image format against the faster of `qemu-img convert -t
//!   writeback` and `-t none` (output flushed, as blockferry's is) of the restored raw disk
//!   to the same format (streamOptimized VMDK: deflate on both sides);
//! - the read engines (pread, `io_uring` buffered and `O_DIRECT`), cold and warm: replications
//!   into a store that already holds every chunk, so a run reads and hashes only;
//! - a 1 TiB sparse image with 1 GiB allocated against a 1 GiB dense one;
//! - upload to S3 against rclone and boto3;
//! - the peak RSS of every blockferry run against its memory budget.

// A benchmark harness prints its results.
#![allow(clippy::print_stdout)]
// Times and byte counts far below 2^52: exact in an f64.
#![allow(clippy::cast_precision_loss)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use blockferry::internals::io::sys::AlignedBuf;
use blockferry::internals::pipeline::is_zero;
use blockferry::internals::store::crypto::Keys;
use blockferry::internals::store::format;
use blockferry_benches::{
    BOTO3_DOWNLOAD, BOTO3_UPLOAD, Measured, Rng, S3Server, blockferry_release, change_one_percent,
    drop_caches, machine, make_image, make_os_image, measure, os_page, settle, snapshot_id, warm,
};

/// Runs of each paired comparison (medians reported).
const RUNS: usize = 3;
/// blockferry's default memory budget (`--memory-budget`).
const BUDGET: u64 = 256 << 20;
/// What a run may use beyond its budget: code, allocator, index, manifest, runtime.
const RSS_SLACK: u64 = 64 << 20;
const CHUNK: usize = 1 << 20;

/// One line of the results table.
struct Row {
    section: &'static str,
    what: String,
    secs: f64,
    note: String,
}

/// A target and whether this run met it.
struct Target {
    what: String,
    value: String,
    met: bool,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    targets: Vec<Target>,
    /// Peak RSS of every blockferry run, with its budget.
    rss: Vec<(String, u64, u64)>,
}

impl Report {
    fn row(&mut self, section: &'static str, what: impl Into<String>, secs: f64, note: String) {
        self.rows.push(Row {
            section,
            what: what.into(),
            secs,
            note,
        });
    }

    fn target(&mut self, what: impl Into<String>, value: String, met: bool) {
        self.targets.push(Target {
            what: what.into(),
            value,
            met,
        });
    }
}

/// Everything the sections share.
struct Ctx {
    bf: PathBuf,
    work: PathBuf,
    state: PathBuf,
    /// Stores made so far (each run gets a new one where it must start empty).
    stores: u32,
    /// Whether the current store is encrypted: an unencrypted one is opened without a
    /// passphrase (given one, it is refused, as a config switched to "none" would be).
    encrypted: bool,
}

impl Ctx {
    fn bf(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bf);
        c.args(args).env("BLOCKFERRY_STATE_DIR", &self.state);
        if self.encrypted {
            c.env("BLOCKFERRY_PASSPHRASE", "bench passphrase");
        } else {
            c.env_remove("BLOCKFERRY_PASSPHRASE");
        }
        c
    }

    /// A new, empty local store. The one made before it is deleted (no section needs two
    /// at once): the disk holds one store at a time.
    fn new_store(&mut self, encrypted: bool) -> Result<String> {
        let _ = std::fs::remove_dir_all(self.work.join(format!("store-{}", self.stores)));
        self.stores += 1;
        let path = self.work.join(format!("store-{}", self.stores));
        let _ = std::fs::remove_dir_all(&path);
        let store = p(&path);
        self.encrypted = encrypted;
        let mut args = vec!["init", "--store", &store];
        if !encrypted {
            args.push("--no-encryption");
        }
        measure(&mut self.bf(&args))?;
        Ok(store)
    }

    /// A replication (extra arguments appended); its measurement and `--json` report.
    fn replicate(
        &self,
        image: &Path,
        store: &str,
        extra: &[&str],
        rep: &mut Report,
        label: &str,
    ) -> Result<(Measured, String)> {
        let mut args = vec!["replicate", pstr(image), "--store", store, "--json"];
        args.extend_from_slice(extra);
        let (m, out) = measure(&mut self.bf(&args))?;
        let budget = extra
            .iter()
            .position(|a| *a == "--memory-budget")
            .and_then(|i| extra.get(i + 1))
            .and_then(|v| v.strip_suffix('M'))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(BUDGET, |m| m << 20);
        rep.rss.push((label.to_owned(), m.peak_rss, budget));
        Ok((m, out))
    }
}

fn p(path: &Path) -> String {
    path.to_str().unwrap_or_default().to_owned()
}

fn pstr(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

fn gb_s(bytes: u64, secs: f64) -> String {
    format!("{:.2} GB/s", bytes as f64 / secs / 1e9)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

/// Runs each closure `RUNS` times in turns (A, B, C, A, B, C, ...); the median of each.
fn interleaved(runs: &mut [&mut dyn FnMut() -> Result<f64>]) -> Result<Vec<f64>> {
    interleaved_n(RUNS, runs)
}

/// As [`interleaved`], `n` times each.
fn interleaved_n(n: usize, runs: &mut [&mut dyn FnMut() -> Result<f64>]) -> Result<Vec<f64>> {
    let mut times = vec![Vec::new(); runs.len()];
    for _ in 0..n {
        for (i, r) in runs.iter_mut().enumerate() {
            times[i].push(r()?);
        }
    }
    Ok(times.into_iter().map(median).collect())
}

fn main() -> Result<()> {
    // The ceiling runs in a child process: the image it holds in memory would otherwise
    // count in the peak RSS of every later child (Linux carries the parent's high-water
    // mark across a vfork-and-exec).
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--ceiling") {
        return ceiling_child(&args[2..]);
    }
    let mib: u64 = std::env::var("BF_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let with_s3 = std::env::var("BF_BENCH_S3").map_or(true, |v| v != "0");
    for tool in ["qemu-img", "restic"]
        .into_iter()
        .chain(with_s3.then_some("rclone"))
    {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is missing: apt-get install qemu-utils restic rclone");
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let work = root.join("target/bench-harness");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut ctx = Ctx {
        bf: blockferry_release()?,
        state: work.join("state"),
        work: work.clone(),
        stores: 0,
        encrypted: true,
    };
    let mut rep = Report::default();
    println!("machine: {}", machine());
    println!(
        "data: a {mib} MiB dense OS-like image (no page repeats); {RUNS} runs per comparison in \
         turns ({} for the warm read engines), medians; page cache warmed before warm runs, \
         dropped before cold ones\n",
        3 * RUNS
    );
    let os = work.join("os.raw");
    make_os_image(&os, mib, 0x05_1ce0)?;

    let only = std::env::var("BF_BENCH_ONLY").ok();
    let run = |section: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|s| s.trim() == section))
    };
    let ceiling = ceiling_section(&os, &mut rep)?;
    if run("full") {
        full_and_delta_section(&mut ctx, &os, mib, ceiling, &mut rep)?;
    }
    if run("convert") {
        convert_section(&ctx, &os, mib, &mut rep)?;
    }
    if run("export") {
        export_section(&mut ctx, &os, &mut rep)?;
    }
    if run("nbd") {
        nbd_section(&mut ctx, &os, &mut rep)?;
    }
    if run("engines") {
        engines_section(&mut ctx, &os, &mut rep)?;
    }
    if run("sparse") {
        sparse_section(&mut ctx, &mut rep)?;
    }
    if with_s3 && run("s3") {
        // Its stores are encrypted, as users make them.
        ctx.encrypted = true;
        if let Err(e) = s3_section(&ctx, &root, &os, &mut rep) {
            print_report(&rep);
            return Err(e);
        }
    }
    print_report(&rep);
    if std::env::var_os("BF_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

/// What the in-memory stages did.
struct CeilingRun {
    secs: f64,
    stored: u64,
}

/// blockferry's per-chunk work on `data` (in memory) on `threads` threads, chunk `i` going to
/// thread `i % threads`, as the pipeline's workers take them.
fn stages(data: &[u8], threads: usize) -> Result<CeilingRun> {
    let keys = Keys::derive(&[7; 32], b"bench store id..", true);
    let chunks: Vec<&[u8]> = data.chunks(CHUNK).collect();
    let start = Instant::now();
    let stored = std::thread::scope(|s| -> Result<u64> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (keys, chunks) = (&keys, &chunks);
                s.spawn(move || -> Result<u64> {
                    let sealer = keys.pack_sealer(&(t as u128).to_le_bytes());
                    let mut seen = HashSet::new();
                    // As a worker packs: into an aligned buffer reused from pack to pack.
                    let mut pack = AlignedBuf::new(40 << 20);
                    let mut stored = 0;
                    for chunk in chunks.iter().skip(t).step_by(threads) {
                        if is_zero(chunk) {
                            continue;
                        }
                        let id = keys.chunk_id(chunk);
                        if !seen.insert(id) {
                            continue;
                        }
                        format::encode_blob(&sealer, &id, chunk, true, &mut pack)?;
                        if pack.len() >= 32 << 20 {
                            stored += pack.len() as u64;
                            pack.set_len(0);
                        }
                    }
                    Ok(stored + pack.len() as u64)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h
                .join()
                .map_err(|_| anyhow::anyhow!("a thread panicked"))??;
        }
        Ok(total)
    })?;
    Ok(CeilingRun {
        secs: start.elapsed().as_secs_f64(),
        stored,
    })
}

/// `--ceiling IMAGE THREADS`: prints the median seconds of the stages over the image held in
/// memory, and the stored bytes.
fn ceiling_child(args: &[String]) -> Result<()> {
    let (Some(image), Some(threads)) = (args.first(), args.get(1)) else {
        bail!("usage: harness --ceiling IMAGE THREADS");
    };
    let threads: usize = threads.parse()?;
    let data = std::fs::read(image).context("reading the image into memory")?;
    let runs: Vec<CeilingRun> = (0..RUNS)
        .map(|_| stages(&data, threads))
        .collect::<Result<_>>()?;
    let secs = median(runs.iter().map(|r| r.secs).collect());
    println!("{secs} {}", runs[0].stored);
    Ok(())
}

/// The in-memory ceiling; returns the best seconds for the whole image.
fn ceiling_section(os: &Path, rep: &mut Report) -> Result<f64> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let bytes = std::fs::metadata(os)?.len();
    let mut best = f64::MAX;
    for threads in [1, cores] {
        let (_, out) = measure(
            Command::new(std::env::current_exe()?)
                .arg("--ceiling")
                .arg(os)
                .arg(threads.to_string()),
        )?;
        let mut it = out.split_whitespace();
        let secs: f64 = it.next().context("no seconds")?.parse()?;
        let stored: u64 = it.next().context("no size")?.parse()?;
        let ratio = stored as f64 / bytes as f64;
        rep.row(
            "ceiling",
            format!("hash+lz4+AES in memory, {threads} thread(s)"),
            secs,
            format!("{}, stored/raw {ratio:.2}", gb_s(bytes, secs)),
        );
        best = best.min(secs);
        if threads == cores {
            break;
        }
    }
    Ok(best)
}

fn full_and_delta_section(
    ctx: &mut Ctx,
    os: &Path,
    mib: u64,
    ceiling: f64,
    rep: &mut Report,
) -> Result<()> {
    let bytes = mib << 20;
    // Full copies: a new store each run, the image warm.
    let mut times = Vec::new();
    let mut base = String::new();
    let mut store = String::new();
    for _ in 0..RUNS {
        store = ctx.new_store(true)?;
        warm(os)?;
        let (m, out) = ctx.replicate(
            os,
            &store,
            &["--change-id", "cbt-1"],
            rep,
            "full, dense image",
        )?;
        times.push(m.secs);
        base = snapshot_id(&out)?;
    }
    let runs: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
    let full = median(times);
    rep.row(
        "full",
        "blockferry replicate (new encrypted store)",
        full,
        format!("{} (runs {})", gb_s(bytes, full), runs.join(" ")),
    );
    rep.target(
        "full replicate / in-memory ceiling >= 85%",
        format!("{:.0}%", 100.0 * ceiling / full),
        ceiling / full >= 0.85,
    );

    let repo = ctx.work.join("restic");
    let restic = |args: &[&str]| {
        let mut c = Command::new("restic");
        c.args(["--repo", pstr(&repo)])
            .args(["--cache-dir", pstr(&ctx.work.join("restic-cache"))])
            .args(args)
            .env("RESTIC_PASSWORD", "bench passphrase");
        c
    };
    measure(&mut restic(&["init"]))?;
    warm(os)?;
    let (restic_full, _) = measure(&mut restic(&["backup", "--quiet", pstr(os)]))?;
    rep.row(
        "full",
        "restic backup (new repository)",
        restic_full.secs,
        gb_s(bytes, restic_full.secs),
    );
    rep.target(
        "restic full / blockferry full >= 6x",
        format!("{:.2}x", restic_full.secs / full),
        restic_full.secs / full >= 6.0,
    );

    // 1% of the chunks change.
    let (list, changed) = change_one_percent(os, mib, "cbt-1")?;
    let cbt = ctx.work.join("cbt.json");
    std::fs::write(&cbt, list)?;
    let mut hash_times = Vec::new();
    let mut cbt_times = Vec::new();
    for _ in 0..RUNS {
        warm(os)?;
        let (m, _) = ctx.replicate(
            os,
            &store,
            &["--base", &base, "--changes", "hash"],
            rep,
            "delta by hash",
        )?;
        hash_times.push(m.secs);
        warm(os)?;
        let (m, _) = ctx.replicate(
            os,
            &store,
            &[
                "--base",
                &base,
                "--changes",
                pstr(&cbt),
                "--change-id",
                "cbt-2",
            ],
            rep,
            "delta from CBT",
        )?;
        cbt_times.push(m.secs);
    }
    let (hash, cbt_secs) = (median(hash_times), median(cbt_times));
    warm(os)?;
    // Once: a second run would find the file unchanged.
    let (restic_inc, _) = measure(&mut restic(&["backup", "--quiet", pstr(os)]))?;
    rep.row(
        "delta",
        format!("blockferry delta by hash ({changed} chunks changed)"),
        hash,
        String::new(),
    );
    rep.row(
        "delta",
        "blockferry delta from a CBT list",
        cbt_secs,
        format!("{:.1}% of the full copy", 100.0 * cbt_secs / full),
    );
    rep.row(
        "delta",
        "restic backup (incremental)",
        restic_inc.secs,
        String::new(),
    );
    rep.target(
        "restic incremental / blockferry delta by hash >= 6x",
        format!("{:.2}x", restic_inc.secs / hash),
        restic_inc.secs / hash >= 6.0,
    );
    rep.target(
        "restic incremental / blockferry delta from CBT >= 6x",
        format!("{:.2}x", restic_inc.secs / cbt_secs),
        restic_inc.secs / cbt_secs >= 6.0,
    );
    Ok(())
}

fn convert_section(ctx: &Ctx, os: &Path, mib: u64, rep: &mut Report) -> Result<()> {
    // The sparse source: a quarter never written, a tenth zeros (and some repeats).
    let holes = ctx.work.join("holes.raw");
    make_image(&holes, mib, true)?;
    let out_dir = Path::new("/dev/shm").join(format!("bf-harness-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir)?;
    let result = (|| -> Result<()> {
        for (fmt, opts, name) in [
            ("vmdk", "subformat=monolithicSparse", "VMDK"),
            ("vhdx", "subformat=dynamic", "VHDX"),
        ] {
            for (src, kind) in [(os, "dense"), (holes.as_path(), "sparse")] {
                let image = ctx.work.join(format!("{kind}.{fmt}"));
                measure(
                    Command::new("qemu-img")
                        .args(["convert", "-f", "raw", "-O", fmt, "-o", opts])
                        .arg(src)
                        .arg(&image),
                )?;
                let (q_out, b_out) = (out_dir.join("q.raw"), out_dir.join("b.raw"));
                settle(&image)?;
                let t = interleaved(&mut [
                    &mut || {
                        let _ = std::fs::remove_file(&q_out);
                        Ok(measure(
                            Command::new("qemu-img")
                                .args(["convert", "-f", fmt, "-O", "raw"])
                                .arg(&image)
                                .arg(&q_out),
                        )?
                        .0
                        .secs)
                    },
                    &mut || {
                        let _ = std::fs::remove_file(&b_out);
                        Ok(
                            measure(&mut ctx.bf(&["convert", pstr(&image), pstr(&b_out)]))?
                                .0
                                .secs,
                        )
                    },
                ])?;
                let _ = std::fs::remove_file(&image);
                let what = format!("{name} {kind} to raw");
                rep.row(
                    "convert",
                    format!("qemu-img convert, {what}"),
                    t[0],
                    String::new(),
                );
                rep.row(
                    "convert",
                    format!("blockferry convert, {what}"),
                    t[1],
                    String::new(),
                );
                rep.target(
                    format!("qemu-img / blockferry convert, {what} >= 1"),
                    format!("{:.2}x", t[0] / t[1]),
                    t[0] / t[1] >= 1.0,
                );
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&out_dir);
    let _ = std::fs::remove_file(&holes);
    result
}

fn export_section(ctx: &mut Ctx, os: &Path, rep: &mut Report) -> Result<()> {
    let store = ctx.new_store(false)?;
    ctx.replicate(os, &store, &[], rep, "export, first copy")?;
    // The peer's input: the restored raw disk, warm in the page cache as the store is.
    let raw = ctx.work.join("restored.raw");
    measure(&mut ctx.bf(&[
        "restore",
        "latest",
        pstr(&raw),
        "--store",
        &store,
        "--force",
    ]))?;
    warm(&raw)?;
    let (q_out, b_out) = (ctx.work.join("q.img"), ctx.work.join("b.img"));
    for (format, qfmt, opts, target) in [
        ("raw", "raw", "", 1.0),
        ("vhd", "vpc", "subformat=dynamic", 1.0),
        ("vhdx", "vhdx", "subformat=dynamic", 1.0),
        ("vmdk", "vmdk", "subformat=streamOptimized", 1.0 / 1.5),
    ] {
        // qemu-img in both of its cache modes that flush the output as blockferry does:
        // through the page cache with a flush at the end ("writeback"; the default, "unsafe",
        // never flushes and would time the page cache, not the disk), and direct I/O
        // ("none", as blockferry writes a file). The faster is the peer: on these virtual
        // machines, whose freed memory goes back to the host, page-cache writes run from
        // twice as slow to six times as slow as direct ones, depending on what the kernel
        // last freed.
        let qemu = |cache: &str| {
            let _ = std::fs::remove_file(&q_out);
            let mut c = Command::new("qemu-img");
            c.args(["convert", "-t", cache, "-f", "raw", "-O", qfmt]);
            if !opts.is_empty() {
                c.args(["-o", opts]);
            }
            Ok(measure(c.arg(&raw).arg(&q_out))?.0.secs)
        };
        let t = interleaved(
            &mut [&mut || qemu("writeback"), &mut || qemu("none"), &mut || {
                let _ = std::fs::remove_file(&b_out);
                let args = [
                    "export",
                    "latest",
                    pstr(&b_out),
                    "--store",
                    &store,
                    "--format",
                    format,
                ];
                Ok(measure(&mut ctx.bf(&args))?.0.secs)
            }],
        )?;
        rep.row(
            "export",
            format!("qemu-img convert -t writeback raw to {format}"),
            t[0],
            String::new(),
        );
        rep.row(
            "export",
            format!("qemu-img convert -t none raw to {format}"),
            t[1],
            String::new(),
        );
        rep.row(
            "export",
            format!("blockferry export {format}"),
            t[2],
            String::new(),
        );
        let peer = t[0].min(t[1]);
        rep.target(
            format!("faster qemu-img / blockferry export, {format} >= {target:.2}"),
            format!("{:.2}x", peer / t[2]),
            peer / t[2] >= target,
        );
    }
    for f in [&raw, &q_out, &b_out] {
        let _ = std::fs::remove_file(f);
    }
    Ok(())
}

/// A snapshot read sequentially over NBD (`qemu-img convert` from `blockferry serve`, a new
/// server each run: its chunk cache cold, the store's files in the page cache) against the
/// same `qemu-img convert` of the restored raw file.
fn nbd_section(ctx: &mut Ctx, os: &Path, rep: &mut Report) -> Result<()> {
    use std::io::BufRead;
    let store = ctx.new_store(false)?;
    ctx.replicate(os, &store, &[], rep, "nbd, first copy")?;
    let raw_path = ctx.work.join("restored-nbd.raw");
    measure(&mut ctx.bf(&[
        "restore",
        "latest",
        pstr(&raw_path),
        "--store",
        &store,
        "--force",
    ]))?;
    let raw = raw_path.as_path();
    let store = store.as_str();
    let ctx = &*ctx;
    let out = ctx.work.join("nbd-out.raw");
    let socket = ctx.work.join("nbd.sock");
    // qemu-img writes its output in both of the cache modes that flush it (as in the export
    // section): through the page cache ("writeback") and direct ("none"); each side is judged
    // by its faster mode. On these virtual machines page-cache writes are the noisy part: a
    // client reading over NBD and writing through the page cache ran 3x slower than the same
    // client writing direct, with the server's CPU time unchanged.
    let convert = |from: &str, cache: &str| -> Result<f64> {
        let _ = std::fs::remove_file(&out);
        let mut c = Command::new("qemu-img");
        c.args(["convert", "-t", cache, "-f", "raw", "-O", "raw", from])
            .arg(&out);
        Ok(measure(&mut c)?.0.secs)
    };
    let served = |cache: &str| -> Result<f64> {
        let _ = std::fs::remove_file(&socket);
        let mut server = ctx
            .bf(&["serve", "latest", "--store", store, "--nbd"])
            .arg(format!("unix:{}", socket.display()))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let mut uri = String::new();
        std::io::BufReader::new(server.stdout.take().context("no stdout")?).read_line(&mut uri)?;
        let secs = convert(uri.trim(), cache);
        server.kill()?;
        server.wait()?;
        secs
    };
    let t = interleaved(&mut [
        &mut || {
            warm(raw)?;
            convert(pstr(raw), "writeback")
        },
        &mut || {
            warm(raw)?;
            convert(pstr(raw), "none")
        },
        &mut || served("writeback"),
        &mut || served("none"),
    ])?;
    let bytes = std::fs::metadata(raw)?.len();
    for (i, what) in [
        "qemu-img -t writeback, restored raw",
        "qemu-img -t none, restored raw",
        "qemu-img -t writeback, blockferry serve",
        "qemu-img -t none, blockferry serve",
    ]
    .into_iter()
    .enumerate()
    {
        rep.row("nbd", what, t[i], gb_s(bytes, t[i]));
    }
    let (peer, ours) = (t[0].min(t[1]), t[2].min(t[3]));
    rep.target(
        "NBD read / raw file read (qemu-img convert, faster modes) >= 0.50",
        format!("{:.2}x", peer / ours),
        peer / ours >= 0.5,
    );
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(raw);
    Ok(())
}

fn engines_section(ctx: &mut Ctx, os: &Path, rep: &mut Report) -> Result<()> {
    // A store that holds every chunk already: the timed runs read, hash and look up only.
    let store = ctx.new_store(false)?;
    ctx.replicate(
        os,
        &store,
        &["--compression", "none"],
        rep,
        "read engines, first copy",
    )?;
    let bytes = std::fs::metadata(os)?.len();
    let engines: [(&str, &[&str]); 3] = [
        ("pread", &["--io-engine", "pread"]),
        ("io_uring, buffered", &["--io-engine", "uring"]),
        ("io_uring, O_DIRECT", &["--io-engine", "uring", "--direct"]),
    ];
    let cold = drop_caches();
    for (temp, active) in [("cold", cold), ("warm", true)] {
        if !active {
            println!("(not root: cold-cache rows skipped)");
            continue;
        }
        let mut runs: Vec<Box<dyn FnMut() -> Result<f64>>> = Vec::new();
        for (_, args) in engines {
            let (ctx, store) = (&*ctx, store.clone());
            runs.push(Box::new(move || {
                if temp == "cold" {
                    drop_caches();
                } else {
                    warm(os)?;
                }
                let mut a = vec!["replicate", pstr(os), "--store", &store];
                a.extend_from_slice(args);
                Ok(measure(&mut ctx.bf(&a))?.0.secs)
            }));
        }
        let mut refs: Vec<&mut dyn FnMut() -> Result<f64>> = runs
            .iter_mut()
            .map(|b| &mut **b as &mut dyn FnMut() -> Result<f64>)
            .collect();
        // Warm runs take a third of a second, where this machine's noise is ±5%: more of
        // them, for a median that holds still.
        let t = interleaved_n(if temp == "warm" { 3 * RUNS } else { RUNS }, &mut refs)?;
        for ((name, _), secs) in engines.iter().zip(&t) {
            rep.row(
                "engines",
                format!("{temp} read+hash, {name}"),
                *secs,
                gb_s(bytes, *secs),
            );
        }
        let best_uring = t[1].min(t[2]);
        if temp == "cold" {
            rep.target(
                "io_uring O_DIRECT / pread, cold >= 1.5x",
                format!("{:.2}x", t[0] / t[2]),
                t[0] / t[2] >= 1.5,
            );
        } else {
            rep.target(
                "io_uring / pread, warm >= 1 (never slower)",
                format!("{:.2}x", t[0] / best_uring),
                t[0] / best_uring >= 1.0,
            );
        }
    }
    Ok(())
}

fn sparse_section(ctx: &mut Ctx, rep: &mut Report) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let sparse = ctx.work.join("sparse-1t.raw");
    let dense = ctx.work.join("dense-1g.raw");
    make_os_image(&dense, 1024, 0xd15c)?;
    {
        // 1024 extents of 1 MiB at random places in 1 TiB.
        let f = std::fs::File::create(&sparse)?;
        f.set_len(1 << 40)?;
        let mut rng = Rng(0x5a_a85e);
        let mut taken = HashSet::new();
        let mut block = vec![0u8; CHUNK];
        while taken.len() < 1024 {
            let at = rng.next_u64() % (1 << 20);
            if !taken.insert(at) {
                continue;
            }
            for page in block.chunks_mut(4096) {
                os_page(&mut rng, page);
            }
            f.write_all_at(&block, at << 20)?;
        }
        f.sync_all()?;
    }
    let mut t_sparse = Vec::new();
    let mut t_dense = Vec::new();
    for _ in 0..RUNS {
        for (image, times, label) in [
            (&sparse, &mut t_sparse, "1 TiB sparse"),
            (&dense, &mut t_dense, "1 GiB dense"),
        ] {
            let store = ctx.new_store(true)?;
            warm(image)?;
            let (m, _) = ctx.replicate(image, &store, &[], rep, label)?;
            times.push(m.secs);
        }
    }
    let (s, d) = (median(t_sparse), median(t_dense));
    rep.row(
        "sparse",
        "replicate 1 TiB sparse, 1 GiB allocated",
        s,
        String::new(),
    );
    rep.row("sparse", "replicate 1 GiB dense", d, String::new());
    rep.target(
        "1 TiB sparse / 1 GiB dense <= 1.2",
        format!("{:.2}", s / d),
        s / d <= 1.2,
    );
    // The budget holds at every size: a small and a large budget on the sparse image.
    for budget in ["64M", "1024M"] {
        let store = ctx.new_store(true)?;
        ctx.replicate(
            &sparse,
            &store,
            &["--memory-budget", budget],
            rep,
            &format!("1 TiB sparse, budget {budget}"),
        )?;
    }
    let _ = std::fs::remove_file(&sparse);
    let _ = std::fs::remove_file(&dense);
    Ok(())
}

fn s3_section(ctx: &Ctx, root: &Path, os: &Path, rep: &mut Report) -> Result<()> {
    let server = S3Server::start(root)?;
    let python = server.boto3_python()?;
    let env = server.env();
    let with_env = |mut c: Command| {
        // Plain HTTP on loopback: a CA bundle set for some proxy would only trip the SDKs up.
        c.envs(env.iter().map(|(k, v)| (k, v.as_str())))
            .env_remove("AWS_CA_BUNDLE");
        c
    };
    let tag = std::process::id();
    // A new key or store each run: rclone would skip what the destination already has.
    let n = std::cell::Cell::new(0u32);
    let next = || {
        n.set(n.get() + 1);
        n.get()
    };
    // What a run uploaded is deleted after it (untimed): the server keeps its data on this
    // disk.
    let purge = |path: &str| -> Result<()> {
        let mut c = with_env(Command::new("rclone"));
        c.arg("purge").arg(format!("bf:{}/{path}", server.bucket));
        measure(&mut c).map(|_| ())
    };
    let delete = |key: &str| -> Result<()> {
        let mut c = with_env(Command::new("rclone"));
        c.arg("deletefile")
            .arg(format!("bf:{}/{key}", server.bucket));
        measure(&mut c).map(|_| ())
    };
    let t = interleaved(&mut [
        &mut || {
            let prefix = format!("harness-{tag}-bf-{}", next());
            let store = format!("s3://{}/{prefix}", server.bucket);
            measure(&mut with_env(ctx.bf(&["init", "--store", &store])))?;
            warm(os)?;
            let secs = measure(&mut with_env(ctx.bf(&[
                "replicate",
                pstr(os),
                "--store",
                &store,
            ])))?
            .0
            .secs;
            purge(&prefix)?;
            Ok(secs)
        },
        &mut || {
            warm(os)?;
            let key = format!("harness-{tag}-rclone-{}.raw", next());
            let mut c = with_env(Command::new("rclone"));
            c.arg("copyto")
                .arg(os)
                .arg(format!("bf:{}/{key}", server.bucket));
            let secs = measure(&mut c)?.0.secs;
            delete(&key)?;
            Ok(secs)
        },
        &mut || {
            warm(os)?;
            let key = format!("harness-{tag}-boto3-{}.raw", next());
            let mut c = with_env(Command::new(&python));
            c.args(["-c", BOTO3_UPLOAD])
                .arg(os)
                .args([server.bucket.as_str(), &key]);
            let secs = measure(&mut c)?.0.secs;
            delete(&key)?;
            Ok(secs)
        },
    ])?;
    let bytes = std::fs::metadata(os)?.len();
    for (name, secs) in [
        ("blockferry replicate to S3", t[0]),
        ("rclone copyto (plain upload)", t[1]),
        ("boto3 upload_file (plain upload)", t[2]),
    ] {
        rep.row("s3", name, secs, gb_s(bytes, secs));
    }
    rep.target(
        "rclone / blockferry to S3 (info)",
        format!("{:.2}x", t[1] / t[0]),
        true,
    );
    rep.target(
        "boto3 / blockferry to S3 (info)",
        format!("{:.2}x", t[2] / t[0]),
        true,
    );

    // Back from S3: a store and a plain copy made once (untimed); each run writes a new file,
    // deleted after it.
    let prefix = format!("harness-{tag}-bf-restore");
    let store = format!("s3://{}/{prefix}", server.bucket);
    let key = format!("harness-{tag}-copy.raw");
    measure(&mut with_env(ctx.bf(&["init", "--store", &store])))?;
    measure(&mut with_env(ctx.bf(&[
        "replicate",
        pstr(os),
        "--store",
        &store,
    ])))?;
    let mut c = with_env(Command::new("rclone"));
    c.arg("copyto")
        .arg(os)
        .arg(format!("bf:{}/{key}", server.bucket));
    measure(&mut c)?;
    let out = ctx.work.join("from-s3.raw");
    let timed = |mut c: Command| -> Result<f64> {
        let secs = measure(&mut c)?.0.secs;
        std::fs::remove_file(&out)?;
        Ok(secs)
    };
    let t = interleaved(&mut [
        &mut || {
            timed(with_env(ctx.bf(&[
                "restore",
                "--store",
                &store,
                "latest",
                pstr(&out),
            ])))
        },
        &mut || {
            let mut c = with_env(Command::new("rclone"));
            c.arg("copyto")
                .arg(format!("bf:{}/{key}", server.bucket))
                .arg(&out);
            timed(c)
        },
        &mut || {
            let mut c = with_env(Command::new(&python));
            c.args(["-c", BOTO3_DOWNLOAD, server.bucket.as_str(), &key])
                .arg(&out);
            timed(c)
        },
    ])?;
    let restore_t = t;
    export_to_s3(ctx, os, &store, &server.bucket, &with_env, &delete, rep)?;
    let t = restore_t;
    purge(&prefix)?;
    delete(&key)?;
    for (name, secs) in [
        ("blockferry restore from S3", t[0]),
        ("rclone copyto (plain download)", t[1]),
        ("boto3 download_file (plain download)", t[2]),
    ] {
        rep.row("s3", name, secs, gb_s(bytes, secs));
    }
    rep.target(
        "rclone / blockferry from S3 (info)",
        format!("{:.2}x", t[1] / t[0]),
        true,
    );
    rep.target(
        "boto3 / blockferry from S3 (info)",
        format!("{:.2}x", t[2] / t[0]),
        true,
    );
    Ok(())
}

/// Export of the store's snapshot to an object, against rclone uploading the same bytes (the
/// restored raw disk) to S3; then, after 1% of the disk changed in random 1 MiB chunks, a
/// delta export (unchanged parts copied by the server) against the full one.
fn export_to_s3(
    ctx: &Ctx,
    os: &Path,
    store: &str,
    bucket: &str,
    with_env: &dyn Fn(Command) -> Command,
    delete: &dyn Fn(&str) -> Result<()>,
    rep: &mut Report,
) -> Result<()> {
    const MIB: u64 = 1 << 20;
    let tag = std::process::id();
    let raw = ctx.work.join("export-src.raw");
    measure(&mut with_env(ctx.bf(&[
        "restore",
        "--store",
        store,
        "latest",
        pstr(&raw),
        "--force",
    ])))?;
    let bytes = std::fs::metadata(&raw)?.len();
    let target = format!("s3://{bucket}/harness-{tag}-export.raw");
    let key = format!("harness-{tag}-export.raw");
    let peer_key = format!("harness-{tag}-export-rclone.raw");
    let t = interleaved(&mut [
        &mut || {
            let args = [
                "export", "latest", &target, "--store", store, "--format", "raw",
            ];
            let secs = measure(&mut with_env(ctx.bf(&args)))?.0.secs;
            delete(&key)?;
            Ok(secs)
        },
        &mut || {
            warm(&raw)?;
            let mut c = with_env(Command::new("rclone"));
            c.arg("copyto")
                .arg(&raw)
                .arg(format!("bf:{bucket}/{peer_key}"));
            let secs = measure(&mut c)?.0.secs;
            delete(&peer_key)?;
            Ok(secs)
        },
    ])?;
    rep.row("s3", "blockferry export raw to S3", t[0], gb_s(bytes, t[0]));
    rep.row(
        "s3",
        "rclone copyto of the restored raw",
        t[1],
        gb_s(bytes, t[1]),
    );
    rep.target(
        "rclone / blockferry export to S3 (info)",
        format!("{:.2}x", t[1] / t[0]),
        true,
    );

    // The delta: a full export as the base, 1% of the disk rewritten, a delta replicate.
    let full_run = measure(&mut with_env(ctx.bf(&[
        "export", "latest", &target, "--store", store, "--format", "raw", "--json",
    ])))?;
    let changed = std::fs::OpenOptions::new().write(true).open(os)?;
    let chunks = bytes / MIB;
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut noise = vec![0u8; 1 << 20];
    for _ in 0..chunks.div_ceil(100) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for (j, word) in noise.chunks_exact_mut(8).enumerate() {
            let j = u64::try_from(j).unwrap_or(0);
            word.copy_from_slice(&(x ^ j).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
        }
        std::os::unix::fs::FileExt::write_all_at(&changed, &noise, (x % chunks) * MIB)?;
    }
    drop(changed);
    measure(&mut with_env(ctx.bf(&[
        "replicate",
        pstr(os),
        "--store",
        store,
    ])))?;
    let delta_run = measure(&mut with_env(ctx.bf(&[
        "export",
        "latest",
        &target,
        "--store",
        store,
        "--format",
        "raw",
        "--incremental",
        "--json",
    ])))?;
    delete(&key)?;
    let (full, delta) = (&full_run.1, &delta_run.1);
    let sent = |report: &str| json_u64(report, "bytes_sent");
    rep.row(
        "s3",
        "blockferry export raw to S3, full",
        full_run.0.secs,
        format!("{} MiB sent", sent(full) >> 20),
    );
    rep.row(
        "s3",
        "blockferry export raw to S3, delta (1% changed)",
        delta_run.0.secs,
        format!(
            "{} MiB sent, {} MiB copied by S3",
            sent(delta) >> 20,
            json_u64(delta, "bytes_copied") >> 20
        ),
    );
    let share = sent(delta) as f64 / sent(full).max(1) as f64;
    rep.target(
        "delta export bytes sent / full export's <= 5%",
        format!("{:.1}%", share * 100.0),
        share <= 0.05,
    );
    rep.target(
        "full / delta export time (info)",
        format!("{:.2}x", full_run.0.secs / delta_run.0.secs),
        true,
    );
    let _ = std::fs::remove_file(&raw);
    Ok(())
}

/// The number a JSON report gives `field` (0 if none).
fn json_u64(report: &str, field: &str) -> u64 {
    report
        .split(&format!("\"{field}\":"))
        .nth(1)
        .and_then(|rest| {
            let digits: String = rest
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .unwrap_or(0)
}

fn print_report(rep: &Report) {
    println!("{:<9} {:<52} {:>9}  note", "section", "run", "seconds");
    for r in &rep.rows {
        println!(
            "{:<9} {:<52} {:>9.2}  {}",
            r.section, r.what, r.secs, r.note
        );
    }
    println!(
        "\npeak RSS of blockferry runs (budget + {} MiB allowed):",
        RSS_SLACK >> 20
    );
    let mut worst: Vec<(String, u64, u64)> = Vec::new();
    for (label, rss, budget) in &rep.rss {
        match worst.iter_mut().find(|(l, _, _)| l == label) {
            Some(w) => w.1 = w.1.max(*rss),
            None => worst.push((label.clone(), *rss, *budget)),
        }
    }
    let mut all_within = true;
    for (label, rss, budget) in &worst {
        let ok = rss <= &(budget + RSS_SLACK);
        all_within &= ok;
        println!(
            "  {label:<40} {:>6} MiB   budget {:>5} MiB  {}",
            rss >> 20,
            budget >> 20,
            if ok { "ok" } else { "OVER" }
        );
    }
    println!("\ntargets:");
    for t in &rep.targets {
        println!(
            "  {:<56} {:>9}  {}",
            t.what,
            t.value,
            if t.met { "met" } else { "NOT MET" }
        );
    }
    println!(
        "  {:<56} {:>9}  {}",
        "peak RSS <= budget + small constant",
        "",
        if all_within { "met" } else { "NOT MET" }
    );
}
