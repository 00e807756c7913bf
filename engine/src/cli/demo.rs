//! `blockferry demo`: the whole job on a small sample disk, narrated.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

use blockferry::{
    InitOptions, ReplicateOptions, ReplicateReport, RestoreOptions, Silent, Store, VerifyOptions,
};

use super::output::human_bytes;
use super::same_contents;

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 256 * MIB;
const PASSPHRASE: &[u8] = b"blockferry demo passphrase";

/// splitmix64: a small deterministic generator for sample data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Text-like, compressible data, as system files and logs are.
fn text_like(rng: &mut Rng, len: usize) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "kernel", "module", "systemd", "journal", "config", "package", "library", "/usr/lib",
        "0x7f3a", "ERROR", "started", "session",
    ];
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let w = WORDS[usize::try_from(rng.next() % 12).unwrap_or(0)];
        out.extend_from_slice(w.as_bytes());
        out.push(if rng.next().is_multiple_of(9) {
            b'\n'
        } else {
            b' '
        });
    }
    out.truncate(len);
    out
}

fn write_at(path: &Path, data: &[u8], offset: u64) -> anyhow::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all_at(data, offset)
        .with_context(|| format!("writing {}", path.display()))
}

fn make_disk(path: &Path) -> anyhow::Result<()> {
    let mut rng = Rng(0x626c_6f63_6b66_6572);
    let f = std::fs::File::create(path)?;
    f.set_len(DISK_SIZE)?; // Sparse: everything not written below is a hole.
    drop(f);
    // A "boot area" and 24 MiB of system-file-like text.
    write_at(path, &text_like(&mut rng, usize::try_from(25 * MIB)?), 0)?;
    // 8 MiB of incompressible data (compressed media, encrypted files).
    let mut random = vec![0u8; usize::try_from(8 * MIB)?];
    rng.fill(&mut random);
    write_at(path, &random, 32 * MIB)?;
    // 4 MiB of explicit zeros: allocated, but nothing to store.
    write_at(path, &vec![0u8; usize::try_from(4 * MIB)?], 48 * MIB)?;
    // A cloned template: the same 8 MiB again further on, which deduplicates.
    write_at(path, &random, 96 * MIB)?;
    Ok(())
}

fn show(step: &str, r: &ReplicateReport) -> anyhow::Result<()> {
    outln!(
        "{step}: snapshot {} of {} virtual\n    read {} (holes skipped), zero {}, deduplicated {}, \
         new {} stored as {} in {:.2}s",
        r.snapshot,
        human_bytes(r.virtual_size),
        human_bytes(r.bytes_read),
        human_bytes(r.bytes_zero),
        human_bytes(r.bytes_deduplicated),
        human_bytes(r.bytes_new),
        human_bytes(r.bytes_stored),
        r.seconds
    );
    Ok(())
}

pub(crate) fn run(dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    let dir: PathBuf = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::temp_dir().join(format!("blockferry-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let disk = dir.join("disk.raw");
    let store_dir = dir.join("store");
    let restored = dir.join("restored.raw");
    for p in [&disk, &restored] {
        let _ = std::fs::remove_file(p);
    }
    if store_dir.exists() {
        std::fs::remove_dir_all(&store_dir)
            .with_context(|| format!("clearing the previous demo store {}", store_dir.display()))?;
    }
    let store_path = store_dir
        .to_str()
        .context("the demo folder's path is not UTF-8")?;
    outln!("blockferry demo in {}", dir.display());

    make_disk(&disk)?;
    outln!(
        "1. made a sparse sample disk {} ({} virtual: text-like data, random data, a zero run, \
         a cloned region, holes)",
        disk.display(),
        human_bytes(DISK_SIZE)
    );

    Store::init(
        store_path,
        &InitOptions {
            chunk_size: 1 << 20,
            passphrase: Some(PASSPHRASE.to_vec()),
        },
    )?;
    let store = Store::open(store_path, Some(PASSPHRASE))?;
    outln!(
        "2. created an encrypted store {} (AES-256-GCM, passphrase {:?})",
        store_dir.display(),
        String::from_utf8_lossy(PASSPHRASE)
    );

    let opts = ReplicateOptions::default();
    let first = blockferry::replicate(
        &store,
        blockferry::open_image(&disk)?.as_ref(),
        &opts,
        &Silent,
    )?;
    show("3. full replication", &first)?;

    let mut rng = Rng(42);
    let mut change = vec![0u8; usize::try_from(2 * MIB)?];
    rng.fill(&mut change);
    write_at(&disk, &change, 40 * MIB)?;
    write_at(
        &disk,
        &text_like(&mut rng, usize::try_from(MIB)?),
        200 * MIB,
    )?;
    outln!("4. changed the disk: 2 MiB overwritten, 1 MiB written into a hole");

    let second = blockferry::replicate(
        &store,
        blockferry::open_image(&disk)?.as_ref(),
        &opts,
        &Silent,
    )?;
    show("5. replication again", &second)?;
    outln!(
        "    only the changed chunks were stored: {} new of {} allocated",
        human_bytes(second.bytes_new),
        human_bytes(second.allocated_bytes)
    );

    let report = blockferry::verify(
        &store,
        &second.snapshot,
        &VerifyOptions {
            image: Some(disk.clone()),
            ..VerifyOptions::default()
        },
        &Silent,
    )?;
    if !report.ok() {
        bail!("verification failed: {:?}", report.problems);
    }
    outln!(
        "6. verified snapshot {}: {} chunks decrypt and match their ids, and equal the disk",
        report.snapshot,
        report.chunks_checked
    );

    blockferry::restore(
        &store,
        &second.snapshot,
        &restored,
        &RestoreOptions::default(),
        &Silent,
    )?;
    if !same_contents(&disk, &restored)? {
        bail!("the restored disk differs from the source");
    }
    outln!(
        "7. restored it to {}: byte-identical to the disk",
        restored.display()
    );
    outln!(
        "try: BLOCKFERRY_PASSPHRASE={:?} blockferry snapshots --store {}",
        String::from_utf8_lossy(PASSPHRASE),
        store_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
