//! Commands, argument parsing, output.

// Doc comments here become `--help` text, where Markdown backticks would show literally.
#![allow(clippy::doc_markdown)]

/// `println!` that returns an error (ended on quietly by `main`) when stdout is a closed pipe.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::write_line(format_args!($($arg)*))?
    };
}

mod audit;
mod cutover;
mod demo;
mod image_cmds;
mod inspect;
mod jobs;
mod metrics;
mod output;
mod sync;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use blockferry::{
    BaseRef, CancelToken, ChangeFormat, ChangeSource, DeltaRequest, InitOptions, ReplicateOptions,
    RestoreOptions, Store, VerifyOptions,
};
use blockferry::{DeltaOptions, ObjectStore, S3Options};
use output::{Bar, human_bytes};

/// Moves virtual-machine disks block by block into object storage: deduplicated,
/// compressed, encrypted, resumable and verifiable.
#[derive(Debug, Parser)]
#[command(name = "blockferry", version, about, max_term_width = 100)]
struct Cli {
    /// More log output (-v info, -vv debug); BLOCKFERRY_LOG takes a tracing filter too.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new store (encrypted unless --no-encryption).
    Init(InitArgs),
    /// Copy a disk image into the store as a new snapshot; prints the snapshot id.
    Replicate(ReplicateArgs),
    /// List the snapshots in a store.
    Snapshots(SnapshotsArgs),
    /// Write a snapshot out as a sparse raw file or onto a block device.
    Restore(RestoreArgs),
    /// Write a snapshot out as an image a platform imports: raw, vmdk (streamOptimized, as
    /// AWS VM Import and vSphere take), vhdx, vhd, or vhd-fixed (a fixed VHD of a whole
    /// number of MiB, as Azure takes). Only data is written.
    Export(ExportArgs),
    /// Serve a snapshot read-only over NBD (qemu, qemu-img, nbdcopy read it without a restore)
    /// until interrupted.
    Serve(ServeArgs),
    /// Boot a snapshot in qemu (served over NBD under a throwaway overlay: the store is never
    /// written) and check that its console shows the expected text; exit 3 if not.
    BootTest(BootTestArgs),
    /// The end of a migration: sync until the predicted downtime is within --max-downtime,
    /// then stop the source (--pre-hook), take the final delta, verify it, bring the target
    /// up to date and start it (--post-hook); on failure, --rollback-hook.
    Cutover(cutover::CutoverArgs),
    /// Check that every chunk of a snapshot is intact (and, with --image, equals the source).
    Verify(VerifyArgs),
    /// Show what a disk image is: format, size, sectors, allocation, parent chain.
    Info(ImageArgs),
    /// List the disk images under a folder (format, size, chain, and which are disks to
    /// replicate rather than parents, extents, or unreadable) and the VMs (.vmx with .vmsd,
    /// OVF/OVA, .vmcx): hardware, NICs, disks with their chains, snapshots.
    Discover(DiscoverArgs),
    /// Look inside a disk, read-only: partition table, file systems, boot mode, OS. An image
    /// file, or with --store a snapshot in the store.
    Inspect(inspect::InspectArgs),
    /// Check that a VM or disk is ready for a target (aws, azure, generic): chain and image
    /// health, sizes, sectors, firmware, encryption, OS; exit 3 when a check fails.
    Validate(inspect::ValidateArgs),
    /// Print an image's allocation map as extents (data, zero, unallocated), like `qemu-img map`.
    Map(ImageArgs),
    /// Write an image's virtual disk out as a sparse raw file.
    Convert(ConvertArgs),
    /// List replication jobs (finished, and unfinished ones a re-run resumes).
    Jobs(jobs::JobsArgs),
    /// Abort an unfinished job's uploads and forget it.
    Abandon(jobs::AbandonArgs),
    /// Abort multipart uploads a store's stopped jobs left behind.
    Cleanup(jobs::CleanupArgs),
    /// Forget this client's record of a store (its id, encryption and newest snapshots), so
    /// that a store re-created at the same location on purpose is accepted.
    Unpin(jobs::UnpinArgs),
    /// Replicate continuously: a delta every interval from a change source, until stopped.
    Sync(sync::SyncArgs),
    /// Forget the snapshots a retention policy does not keep (per disk).
    Prune(PruneArgs),
    /// Forget snapshots by id: their manifests go (a record that they were forgotten stays);
    /// their chunks go with the next garbage collection.
    Forget(ForgetArgs),
    /// The store's tamper-evident audit log: verify every chain, or list the records.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// A compliance report of the store: per disk, replications, RPO achieved, verifies,
    /// exports, cutover; encryption; validations; the audit log's verification.
    Report(audit::ReportArgs),
    /// Delete the chunks, packs and pages no snapshot references (repacking packs that are
    /// mostly garbage); safe beside running replications.
    Gc(GcArgs),
    /// Show the whole job on a small sample disk: replicate, change, replicate, verify, restore.
    Demo(DemoArgs),
    /// Write shell completions or man pages (for packagers).
    Generate(GenerateArgs),
}

/// How to reach S3 (ignored for local stores).
#[derive(Debug, Args)]
pub(crate) struct S3Args {
    /// S3 endpoint URL of an S3-compatible service (default: AWS_ENDPOINT_URL, else AWS).
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// S3 region (default: the AWS configuration's, else us-east-1).
    #[arg(long)]
    region: Option<String>,
    /// S3 path-style addressing: on or off (default: on for a custom endpoint, off for AWS).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    path_style: Option<bool>,
    /// Time limit of one attempt of one S3 request, after which it is retried (raise it
    /// for large parts on slow links).
    #[arg(long, value_name = "DURATION", value_parser = parse_attempt_timeout, default_value = "5m")]
    s3_attempt_timeout: std::time::Duration,
    /// Smallest S3 part size, for S3-compatible services that take parts under 5 MiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, hide = true)]
    s3_min_part_size: Option<u64>,
    /// Trust only the certificate authorities in this PEM file for HTTPS (default:
    /// AWS_CA_BUNDLE, else the system's).
    #[arg(long, value_name = "FILE")]
    ca_bundle: Option<PathBuf>,
    /// Write this run's audit records under S3 Object Lock retention for this long (`7y`,
    /// `90d`): the bucket must have Object Lock enabled.
    #[arg(long, value_name = "DURATION", env = "BLOCKFERRY_AUDIT_RETENTION", value_parser = humantime::parse_duration)]
    audit_retention: Option<std::time::Duration>,
    /// The retention's mode: compliance (nobody can delete or shorten it, the bucket's owner
    /// included) or governance (users with s3:BypassGovernanceRetention can).
    #[arg(
        long,
        value_name = "compliance|governance",
        default_value = "compliance"
    )]
    audit_lock_mode: String,
}

#[derive(Debug, Args)]
pub(crate) struct StoreArgs {
    /// The store: a local folder or s3://BUCKET/PREFIX (credentials from the standard AWS
    /// chain: environment, profile, instance role).
    #[arg(long, value_name = "PATH|URL")]
    store: String,
    #[command(flatten)]
    s3: S3Args,
    /// Read the passphrase from this file (first line) instead of BLOCKFERRY_PASSPHRASE.
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// This client's state: job checkpoints, and the identity and encryption of each store it
    /// used (a store that changes either under it is refused).
    #[command(flatten)]
    state: jobs::StateArgs,
}

#[derive(Debug, Args)]
struct InitArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Create an unencrypted store: chunks are compressed and checksummed but readable by
    /// anyone who can read the store.
    #[arg(long)]
    no_encryption: bool,
    /// Chunk size: a power of two from 64K to 16M.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    chunk_size: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Compression {
    Lz4,
    None,
}

// Command-line switches, not a state machine.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Args)]
struct ReplicateArgs {
    /// The disk image: raw file or block device, VMDK, VHDX, VHD, or OVA (format detected).
    image: PathBuf,
    /// Which disk of an OVA: its index from 0 or its file name (default: the first).
    #[arg(long, value_name = "DISK")]
    disk: Option<String>,
    /// Follow parent and extent paths that lead outside the image's folder.
    #[arg(long)]
    allow_outside_folder: bool,
    #[command(flatten)]
    store: StoreArgs,
    /// The disk's name in the store (default: the image's file name, or, when another source
    /// has that name, the shortest path ending in it that none has: `vm1/disk.vmdk`, …).
    #[arg(long)]
    name: Option<String>,
    /// This image is the disk --name names at another path (moved, or a copy or export of
    /// it): take the name even though another source had it.
    #[arg(long, requires = "name")]
    same_disk: bool,
    /// Wait this long for another run replicating the same disk to finish (default: fail
    /// at once with "busy").
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    wait: Option<std::time::Duration>,
    /// Warn when the store has acknowledged nothing for this long while parts are in flight.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    stall_warning: std::time::Duration,
    /// Read engine: pread (with the kernel's readahead), `io_uring` where the kernel allows it
    /// (auto), or `io_uring` or fail (uring).
    #[arg(long, value_name = "auto|uring|pread", env = "BLOCKFERRY_IO_ENGINE", default_value = "pread", value_parser = parse_io_engine)]
    io_engine: blockferry::IoEngine,
    /// Chunks in flight with `io_uring` (at most the memory budget's read buffers); 0 picks
    /// 4, or 32 with --direct (which gets no kernel readahead).
    #[arg(long, value_name = "N", default_value_t = 0)]
    io_depth: usize,
    /// With `io_uring`, read past the page cache (O_DIRECT) where the file system and alignment
    /// allow (for cold sources that should not evict the host's cache).
    #[arg(long)]
    direct: bool,
    /// Memory the pipeline may use for data in flight (default: 64 MiB per core, at least
    /// 256 MiB, at most an eighth of the machine's or the container's memory, and never less
    /// than the store's chunk size needs).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_budget: Option<u64>,
    /// Worker threads for hashing, compression and encryption (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Chunk compression.
    #[arg(long, value_enum, default_value_t = Compression::Lz4)]
    compression: Compression,
    /// Uploads in flight at once to S3 (default 4).
    #[arg(long, default_value_t = 0)]
    jobs: usize,
    /// S3 part size, 5M to 64M (default: from the memory budget).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    part_size: Option<u64>,
    /// Start over instead of resuming an unfinished run of this job.
    #[arg(long)]
    restart: bool,
    /// Cap upload bandwidth, in bytes per second (e.g. 50M).
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    bwlimit: Option<u64>,
    /// Make a delta on this snapshot (an id, a unique prefix, or `latest`: the newest
    /// snapshot of this disk), reading only what --changes names.
    #[arg(long, value_name = "SNAPSHOT")]
    base: Option<String>,
    /// What changed since --base: a change list file (VMware CBT, Hyper-V RCT or extents;
    /// format detected), or `hash` to read everything and keep what differs by chunk id.
    #[arg(long, value_name = "FILE|hash", requires = "base")]
    changes: Option<String>,
    /// What changed since --base is what the image (a VMDK snapshot delta, a VHDX/VHD
    /// differencing disk) allocates over its parent: no change list needed.
    #[arg(long, requires = "base", conflicts_with = "changes")]
    changes_from_chain: bool,
    /// The change list's format, instead of detecting it.
    #[arg(long, value_name = "vmware-cbt|hyperv-rct|extents")]
    changes_format: Option<String>,
    /// The source's change-tracking id now (VMware changeId, Hyper-V RCT id), recorded so
    /// that the next delta's list can be checked against it.
    #[arg(long, value_name = "ID")]
    change_id: Option<String>,
    /// Share of the chunks a change list calls unchanged that a delta reads to check it
    /// (rotating, so successive deltas cover the disk); 0 disables the check.
    #[arg(long, value_name = "PERCENT", default_value = "1%", value_parser = parse_percent)]
    verify_sample: f64,
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?}: give a percentage such as 1%"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v / 100.0)
    } else {
        Err(format!("{s:?}: give a percentage from 0% to 100%"))
    }
}

#[derive(Debug, Args)]
struct PruneArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Keep the newest N snapshots of each disk.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_last: usize,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_daily: usize,
    /// Keep the newest snapshot of each of the last N weeks that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_weekly: usize,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_monthly: usize,
    /// Only this disk's snapshots.
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    /// Say what would be forgotten; delete nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct GcArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Repack the packs with the most unused bytes until at most this share of the live
    /// bytes is left unused (0% repacks every pack with garbage, 100% repacks none).
    #[arg(long, value_name = "PERCENT", default_value = "5%", value_parser = parse_percent)]
    max_unused: f64,
    /// How long to wait for running replications, restores and verifies to finish before
    /// deleting (new ones wait for the gc meanwhile).
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = humantime::parse_duration)]
    wait: std::time::Duration,
    /// Say what would be deleted and repacked; change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct SnapshotsArgs {
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
struct ForgetArgs {
    /// Snapshot ids (or unique prefixes, or DISK@latest); a damaged manifest is forgotten
    /// too.
    #[arg(required = true)]
    snapshots: Vec<String>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    /// Snapshot id, unique id prefix, DISK@latest, or `latest` (of the only disk, or of
    /// --disk).
    snapshot: String,
    /// Output: a file (created sparse; it appears under this name only once whole) or a
    /// block device.
    out: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Overwrite an existing output file, or write onto a block device (destroying what it
    /// holds).
    #[arg(long)]
    force: bool,
    /// Restore every chunk that can be read, leave the others zero and list them (exit 3),
    /// instead of stopping at the first damaged one.
    #[arg(long)]
    salvage: bool,
    /// The disk whose snapshot to restore (`latest` then means its newest).
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Snapshot id, unique id prefix, DISK@latest, or `latest` (of the only disk).
    snapshot: String,
    /// Output file (created sparse; it appears under this name only once whole), or an
    /// object, s3://BUCKET/KEY (one multipart upload, resumed if a run stops).
    out: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Image format: raw, vmdk, vhdx, vhd, vhd-fixed.
    #[arg(long, value_name = "FORMAT", value_parser = parse_export_format)]
    format: blockferry::ExportFormat,
    /// Overwrite an existing output file.
    #[arg(long)]
    force: bool,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// To S3: memory for parts in flight (default as replicate's).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_budget: Option<u64>,
    /// To S3: parts uploaded at once (default 4).
    #[arg(long, default_value_t = 0)]
    jobs: usize,
    /// To S3: part size (default 16M, more for images over 160 GB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    part_size: Option<u64>,
    /// To S3, raw or vhd-fixed: a delta on this earlier export, s3://BUCKET/KEY@SNAPSHOT
    /// (parts unchanged since that snapshot are copied by the store, not sent).
    #[arg(long, value_name = "URL@SNAPSHOT", conflicts_with = "incremental")]
    base_export: Option<String>,
    /// To S3, raw or vhd-fixed: a delta on the object being replaced, when it is an export
    /// of an earlier snapshot of this disk (else the whole image is sent, with a warning).
    #[arg(long)]
    incremental: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Snapshot id, unique id prefix, DISK@latest, or `latest` (of the only disk).
    snapshot: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Where to listen: unix:PATH, or HOST:PORT (a non-loopback address needs --tls-cert and
    /// --tls-key, or --insecure).
    #[arg(
        long,
        value_name = "unix:PATH|HOST:PORT",
        default_value = "127.0.0.1:10809"
    )]
    nbd: String,
    /// The export's name (default: the snapshot id; the empty name works too).
    #[arg(long, value_name = "NAME", default_value = "")]
    name: String,
    /// Memory for cached chunks.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "256M")]
    cache: u64,
    /// Chunks read ahead of a client reading in order.
    #[arg(long, value_name = "N", default_value_t = 8)]
    readahead: usize,
    /// Clients served at once.
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_connections: usize,
    /// TLS: the server's certificate chain (PEM); clients must use TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS: the server's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve a non-loopback address without TLS (anyone who reaches it reads the disk).
    #[arg(long)]
    insecure: bool,
}

#[derive(Debug, Args)]
struct BootTestArgs {
    /// Snapshot id, unique id prefix, DISK@latest, or `latest` (of the only disk).
    snapshot: String,
    #[command(flatten)]
    store: StoreArgs,
    /// A regular expression the console must show (default: a login prompt, or the kernel
    /// starting init).
    #[arg(long, value_name = "REGEX")]
    expect: Option<String>,
    /// How long the guest has.
    #[arg(long, value_name = "DURATION", default_value = "3m", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Firmware: bios, uefi, or auto (UEFI when the disk has an EFI system partition).
    #[arg(long, value_name = "bios|uefi|auto", default_value = "auto")]
    firmware: String,
    /// Where the console log and the screenshot go (default: a new folder in the temporary
    /// folder).
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    memory: u32,
    /// Accelerator: kvm, tcg, or auto (KVM when /dev/kvm runs a probe guest).
    #[arg(long, value_name = "kvm|tcg|auto", default_value = "auto")]
    accel: String,
}

fn parse_export_format(s: &str) -> Result<blockferry::ExportFormat, String> {
    blockferry::ExportFormat::from_name(s).map_err(|e| e.message().to_owned())
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// Snapshot id, unique id prefix, DISK@latest, or `latest` (of the only disk).
    snapshot: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Also compare the snapshot with this image, chunk by chunk.
    #[arg(long, value_name = "IMAGE")]
    image: Option<PathBuf>,
    /// With an OVA as --image: which of its disks (index from 0 or file name).
    #[arg(long, value_name = "DISK")]
    disk: Option<String>,
    /// With --image: follow parent and extent paths that lead outside the image's folder.
    #[arg(long)]
    allow_outside_folder: bool,
    /// Repair what can be: rebuild index objects that cannot be read from the packs, and
    /// record the damaged chunk copies (or the snapshot, if its manifest or a page cannot be
    /// read) so that the next replication stores that data again and gc goes on.
    #[arg(long)]
    repair: bool,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

#[derive(Debug, Args)]
struct ImageArgs {
    /// The disk image (format detected from its content).
    image: PathBuf,
    /// Follow parent and extent paths that lead outside the image's folder.
    #[arg(long)]
    allow_outside_folder: bool,
    /// Which disk of an OVA: its index from 0 or its file name (default: the first).
    #[arg(long, value_name = "DISK")]
    disk: Option<String>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DiscoverArgs {
    /// The folder (a datastore, a VM folder, an export).
    folder: PathBuf,
    /// Follow parent and extent paths that lead outside an image's folder.
    #[arg(long)]
    allow_outside_folder: bool,
    /// Print the result as JSON on stdout (`{"images": [...], "vms": [...]}`).
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print the VMs' disks as CSV on stdout, one row per disk (for planning sheets).
    #[arg(long)]
    csv: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutFormat {
    Raw,
}

#[derive(Debug, Args)]
struct ConvertArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Output file (created sparse) or block device.
    out: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutFormat::Raw)]
    format: OutFormat,
    /// Overwrite an existing output file.
    #[arg(long)]
    force: bool,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("what").required(true).multiple(true))]
struct GenerateArgs {
    /// Print the completion script for this shell on stdout.
    #[arg(long, value_name = "SHELL", group = "what")]
    completions: Option<clap_complete::Shell>,
    /// Write a man page for blockferry and each of its commands into this folder.
    #[arg(long, value_name = "DIR", group = "what")]
    man: Option<PathBuf>,
}

/// `blockferry generate`: completions and man pages from the command definitions.
fn cmd_generate(a: &GenerateArgs) -> anyhow::Result<ExitCode> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    if let Some(shell) = a.completions {
        clap_complete::generate(shell, &mut cmd, "blockferry", &mut std::io::stdout());
    }
    if let Some(dir) = &a.man {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        clap_mangen::generate_to(cmd, dir)
            .with_context(|| format!("writing man pages into {}", dir.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Folder for the sample disk, store and restored copy (default: a new temporary folder).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Exit code when verification found problems.
const EXIT_VERIFY_FAILED: u8 = 3;

/// Parses `1048576`, `64K`, `1M`, `1MiB`, `16m`, `2G` (binary multiples).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (like 1M or 65536)"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown size unit {unit:?} (use K, M, G or T)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn passphrase(args: &StoreArgs) -> anyhow::Result<Option<Vec<u8>>> {
    if let Some(file) = &args.passphrase_file {
        let raw = std::fs::read(file)
            .with_context(|| format!("reading the passphrase file {}", file.display()))?;
        let line = raw.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        return Ok(Some(line.to_vec()));
    }
    Ok(std::env::var_os("BLOCKFERRY_PASSPHRASE").map(|p| {
        use std::os::unix::ffi::OsStrExt;
        p.as_bytes().to_vec()
    }))
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{s:?}: give on or off")),
    }
}

fn parse_io_engine(s: &str) -> Result<blockferry::IoEngine, String> {
    blockferry::IoEngine::from_name(s).ok_or_else(|| format!("{s:?}: auto, uring or pread"))
}

fn parse_attempt_timeout(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(1) {
        return Err("an attempt needs at least 1s".to_owned());
    }
    Ok(d)
}

fn s3_options(args: &S3Args) -> S3Options {
    S3Options {
        endpoint: args.endpoint.clone(),
        region: args.region.clone(),
        path_style: args.path_style,
        min_part_size: args.s3_min_part_size,
        attempt_timeout: args.s3_attempt_timeout,
        ca_bundle: args.ca_bundle.clone(),
        ..S3Options::default()
    }
}

fn backend(args: &StoreArgs, create: bool) -> anyhow::Result<Arc<dyn ObjectStore>> {
    Ok(blockferry::open_backend(
        &args.store,
        create,
        &s3_options(&args.s3),
    )?)
}

pub(crate) fn open_store(args: &StoreArgs) -> anyhow::Result<Store> {
    let pass = passphrase(args)?;
    let store = Store::open_client(
        backend(args, false)?,
        pass.as_deref(),
        Some(&args.state.dir()?),
    )?;
    if let Some(keep) = args.s3.audit_retention {
        let compliance = match args.s3.audit_lock_mode.as_str() {
            "compliance" => true,
            "governance" => false,
            other => anyhow::bail!("--audit-lock-mode {other:?}: compliance or governance"),
        };
        store.set_audit_retention(Some(blockferry::AuditRetention {
            seconds: keep.as_secs(),
            compliance,
        }));
    }
    Ok(store)
}

fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    // S3 retries show by default (a job that waits on the network says so); the AWS
    // configuration loader's warnings (no region in instance metadata off EC2, say) only
    // with -v, as its failures reach the user as blockferry's own errors anyway.
    let default = match verbose {
        0 => "warn,blockferry::store::s3=info,aws_config=error",
        1 => "info",
        _ => "debug",
    };
    let filter =
        EnvFilter::try_from_env("BLOCKFERRY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

pub(crate) fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    init_logging(cli.verbose);
    let json = match &cli.command {
        Command::Init(a) => a.store.json,
        Command::Replicate(a) => a.store.json,
        Command::Snapshots(a) => a.store.json,
        Command::Restore(a) => a.store.json,
        Command::Export(a) => a.store.json,
        Command::Serve(a) => a.store.json,
        Command::BootTest(a) => a.store.json,
        Command::Cutover(a) => a.store.json,
        Command::Verify(a) => a.store.json,
        Command::Info(a) | Command::Map(a) => a.json,
        Command::Discover(a) => a.json,
        Command::Inspect(a) => a.json,
        Command::Validate(a) => a.json,
        Command::Convert(a) => a.image.json,
        Command::Jobs(a) => a.json,
        Command::Abandon(a) => a.json,
        Command::Cleanup(a) => a.store.json,
        Command::Unpin(a) => a.json,
        Command::Sync(a) => a.store.json,
        Command::Prune(a) => a.store.json,
        Command::Forget(a) => a.store.json,
        Command::Audit(a) => a.json(),
        Command::Report(a) => a.store.json,
        Command::Gc(a) => a.store.json,
        Command::Demo(_) | Command::Generate(_) => false,
    };
    match run(cli.command) {
        Ok(code) => code,
        // The reader of our output went away (`| head`): what it wanted it has.
        Err(err) if output::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            report_error(&err, json);
            ExitCode::FAILURE
        }
    }
}

/// A command line that does not parse: clap's message (help and version as asked), and with
/// `--json` anywhere in it, the error as JSON on stdout too. Exit code 2.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind as Clap;
    if matches!(e.kind(), Clap::DisplayHelp | Clap::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if std::env::args_os().any(|a| a == "--json") {
        // The first paragraph: the error and what it lists (not the usage line and hint).
        let text = e.render().to_string();
        let first: Vec<&str> = text
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .map(str::trim)
            .collect();
        let message = first.join(" ");
        let message = message.strip_prefix("error: ").unwrap_or(&message);
        let _ = print_json(&json!({ "error": { "kind": "Usage", "message": message } }));
    }
    let _ = e.print();
    ExitCode::from(2)
}

/// How the command line sets what an engine error names (see `blockferry::Error::setting`).
fn flag_hint(setting: &str) -> Option<&'static str> {
    Some(match setting {
        "allow_outside_folder" => "--allow-outside-folder",
        "base" => "--base",
        "changes" => "--changes FILE|hash or --changes-from-chain",
        "change_id" => "--change-id",
        "force" => "--force",
        "io_engine" => "--io-engine pread|auto",
        "keep" => "--keep-last, --keep-daily, --keep-weekly or --keep-monthly",
        "passphrase" => "BLOCKFERRY_PASSPHRASE or --passphrase-file",
        "restart" => "--restart",
        "same_disk" => "--same-disk",
        "unpin" => "blockferry unpin --store STORE",
        "verify_sample" => "--verify-sample",
        _ => return None,
    })
}

fn report_error(err: &anyhow::Error, json: bool) {
    let engine = err.downcast_ref::<blockferry::Error>();
    let hint = engine
        .and_then(blockferry::Error::setting)
        .and_then(flag_hint)
        .map(|h| format!(" [{h}]"))
        .unwrap_or_default();
    if json {
        let mut obj = json!({ "error": { "message": format!("{err:#}{hint}") } });
        if let Some(e) = engine {
            obj["error"]["kind"] = json!(format!("{:?}", e.kind()));
            obj["error"]["path"] = json!(e.path().map(|p| p.display().to_string()));
            obj["error"]["object"] = json!(e.object());
            obj["error"]["offset"] = json!(e.offset());
            obj["error"]["setting"] = json!(e.setting());
        }
        let _ = print_json(&obj);
    }
    eprintln!("error: {err}{hint}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Init(a) => cmd_init(&a),
        Command::Replicate(a) => cmd_replicate(&a),
        Command::Snapshots(a) => cmd_snapshots(&a),
        Command::Restore(a) => cmd_restore(&a),
        Command::Export(a) => cmd_export(&a),
        Command::Serve(a) => cmd_serve(&a),
        Command::BootTest(a) => cmd_boot_test(&a),
        Command::Cutover(a) => cutover::run(&a),
        Command::Verify(a) => cmd_verify(&a),
        Command::Info(a) => image_cmds::info(&a),
        Command::Map(a) => image_cmds::map(&a),
        Command::Discover(a) => image_cmds::discover(&a),
        Command::Inspect(a) => inspect::run(a),
        Command::Validate(a) => inspect::validate(a),
        Command::Convert(a) => image_cmds::convert(&a),
        Command::Jobs(a) => jobs::list(&a),
        Command::Abandon(a) => jobs::abandon(&a),
        Command::Cleanup(a) => jobs::cleanup(&a),
        Command::Unpin(a) => jobs::unpin(&a),
        Command::Sync(a) => sync::run(&a),
        Command::Prune(a) => cmd_prune(&a),
        Command::Forget(a) => cmd_forget(&a),
        Command::Audit(a) => audit::run(&a),
        Command::Report(a) => audit::report(&a),
        Command::Gc(a) => cmd_gc(&a),
        Command::Generate(a) => cmd_generate(&a),
        Command::Demo(a) => demo::run(a.dir.as_deref()),
    }
}

fn cmd_init(a: &InitArgs) -> anyhow::Result<ExitCode> {
    let chunk_size = u32::try_from(a.chunk_size)
        .map_err(|_| anyhow::anyhow!("chunk size must be a power of two from 64K to 16M"))?;
    let pass = if a.no_encryption {
        None
    } else {
        Some(passphrase(&a.store)?.ok_or_else(|| {
            anyhow::anyhow!(
                "an encrypted store needs a passphrase: set BLOCKFERRY_PASSPHRASE or pass \
                 --passphrase-file (or choose --no-encryption)"
            )
        })?)
    };
    let opts = InitOptions {
        chunk_size,
        passphrase: pass,
    };
    // Before the folder is made: a refused store leaves nothing behind.
    opts.check()?;
    // This client knows the new store from now on (its id and encryption are checked on
    // every later use).
    let config = Store::init_client(
        &*backend(&a.store, true)?,
        &opts,
        Some(&a.store.state.dir()?),
    )?;
    let encrypted = config.encrypted();
    if a.store.json {
        print_json(&blockferry::StoreSummary::new(&a.store.store, &config))?;
    } else {
        outln!(
            "created store {} ({} chunks, {})",
            a.store.store,
            human_bytes(u64::from(config.chunk_size)),
            if encrypted {
                "encrypted with AES-256-GCM"
            } else {
                "NOT encrypted"
            }
        );
        if encrypted {
            eprintln!("keep the passphrase safe: without it the store cannot be read");
        } else {
            eprintln!(
                "warning: this store is unencrypted: anyone who can read its folder can read the \
                 disks in it. Chunks are still compressed, checksummed and deduplicated."
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_replicate(a: &ReplicateArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let image_opts = blockferry::OpenOptions {
        ova_disk: a.disk.clone(),
        allow_outside_folder: a.allow_outside_folder,
        ..blockferry::OpenOptions::default()
    };
    let source = blockferry::open_image_with(&a.image, &image_opts)?;
    let opts = ReplicateOptions {
        memory_budget: a
            .memory_budget
            .map_or(0, |b| usize::try_from(b).unwrap_or(usize::MAX).max(1)),
        workers: a.workers,
        compression: matches!(a.compression, Compression::Lz4),
        disk_name: a.name.clone(),
        same_disk: a.same_disk,
        wait: a.wait.unwrap_or_default(),
        stall_warning: a.stall_warning,
        cancel: CancelToken::new(),
        job_state: Some(a.store.state.dir()?),
        restart: a.restart,
        disk_selector: a.disk.clone().unwrap_or_default(),
        upload_jobs: a.jobs,
        part_size: a
            .part_size
            .map_or(0, |p| usize::try_from(p).unwrap_or(usize::MAX)),
        bwlimit: a.bwlimit,
        io_engine: a.io_engine,
        io_depth: a.io_depth,
        direct_io: a.direct,
        delta: delta_options(a, source.as_ref())?,
        change_id: a.change_id.clone(),
        ..ReplicateOptions::default()
    };
    let bar = Bar::new(
        !a.store.json && std::io::stderr().is_terminal(),
        "replicating",
    );
    let report = blockferry::replicate(&store, source.as_ref(), &opts, &bar)?;
    bar.done();
    if a.store.json {
        print_json(&serde_json::to_value(&report)?)?;
    } else {
        outln!("{}", report.snapshot);
        eprintln!(
            "snapshot {} of {} ({}): read {}, zero {}, deduplicated {}, new {} stored as {} in {:.1}s",
            report.snapshot,
            report.disk,
            human_bytes(report.virtual_size),
            human_bytes(report.bytes_read),
            human_bytes(report.bytes_zero),
            human_bytes(report.bytes_deduplicated),
            human_bytes(report.bytes_new),
            human_bytes(report.bytes_stored),
            report.seconds
        );
        if let (Some(base), Some(c)) = (&report.base, &report.changes) {
            eprintln!(
                "delta on {base} from {}: {} unchanged, {} listed, sample {} chunks ({} differed){}",
                c.source,
                human_bytes(report.bytes_unchanged),
                human_bytes(c.bytes_listed),
                c.sample_chunks,
                c.sample_mismatches,
                c.fallback
                    .as_deref()
                    .map(|f| format!("; compared every chunk: {f}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The delta a `replicate` asks for, with its change list read and checked.
fn delta_options(
    a: &ReplicateArgs,
    source: &dyn blockferry::BlockSource,
) -> anyhow::Result<Option<DeltaOptions>> {
    let format = a
        .changes_format
        .as_deref()
        .map(ChangeFormat::from_name)
        .transpose()?;
    let request = DeltaRequest {
        base: a.base.as_deref().map(BaseRef::parse),
        changes: if a.changes_from_chain {
            Some(ChangeSource::Chain)
        } else {
            a.changes
                .as_deref()
                .map(|c| ChangeSource::from_name(c, format))
        },
        verify_sample: a.verify_sample,
        change_id: a.change_id.clone(),
    };
    Ok(request.resolve(source)?)
}

fn cmd_prune(a: &PruneArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let policy = blockferry::KeepPolicy {
        last: a.keep_last,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
    };
    let report = blockferry::prune(&store, &policy, a.disk.as_deref(), a.dry_run)?;
    if a.store.json {
        print_json(&serde_json::to_value(&report)?)?;
    } else {
        let verb = if a.dry_run { "would forget" } else { "forgot" };
        for id in &report.forgotten {
            outln!("{id}");
        }
        eprintln!(
            "{verb} {} snapshots, kept {} (space is reclaimed by a garbage collection)",
            report.forgotten.len(),
            report.kept.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_gc(a: &GcArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let opts = blockferry::GcOptions {
        max_unused: a.max_unused,
        wait: a.wait,
        dry_run: a.dry_run,
        cancel: sync::cancel_on_signals()?,
    };
    let bar = Bar::new(
        !a.store.json && std::io::stderr().is_terminal(),
        "repacking",
    );
    let r = blockferry::gc(&store, &opts, &bar);
    bar.done();
    let r = r?;
    if a.store.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        let b = output::human_bytes;
        let verb = if r.dry_run { "would delete" } else { "deleted" };
        eprintln!(
            "{verb} {} packs and {} pages; {} packs repacked into {} ({} moved)",
            r.packs_deleted,
            r.pages_deleted,
            r.packs_repacked,
            r.packs_written,
            b(r.bytes_repacked)
        );
        eprintln!(
            "store: {} before, {} after; {} snapshots, {} chunks, {} unused left in packs",
            b(r.bytes_before),
            b(r.bytes_after),
            r.snapshots,
            r.chunks_live,
            b(r.bytes_unused_left)
        );
    }
    Ok(if r.chunks_missing > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

fn cmd_snapshots(a: &SnapshotsArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let (snaps, bad) = store.snapshots()?;
    let problems = store.history_problems(&snaps)?;
    if a.store.json {
        let list = snaps
            .iter()
            .map(|s| {
                let mut v = serde_json::to_value(s.summary())?;
                v["created"] = json!(output::rfc3339(s.created_unix_ms));
                Ok(v)
            })
            .collect::<serde_json::Result<Vec<_>>>()?;
        let errors: Vec<String> = bad.iter().map(ToString::to_string).collect();
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        print_json(&json!({ "snapshots": list, "unreadable": errors, "problems": problems }))?;
    } else {
        outln!(
            "{:<16}  {:>4}  {:<20}  {:>10}  {:>10}  {:<24}  SOURCE",
            "ID",
            "#",
            "CREATED",
            "SIZE",
            "NEW",
            "DISK"
        );
        for s in &snaps {
            outln!(
                "{:<16}  {:>4}  {:<20}  {:>10}  {:>10}  {:<24}  {}{}",
                s.id,
                s.seq,
                output::rfc3339(s.created_unix_ms),
                human_bytes(s.disk.virtual_size),
                human_bytes(s.stats.bytes_new),
                s.disk.name,
                s.disk.source,
                s.disk
                    .member
                    .as_deref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            );
        }
    }
    for e in &bad {
        eprintln!("error: unreadable snapshot: {e}");
    }
    for p in &problems {
        eprintln!("error: {p}");
    }
    Ok(if bad.is_empty() && problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn cmd_forget(a: &ForgetArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let mut forgotten = Vec::new();
    for spec in &a.snapshots {
        // By id (its manifest need not be readable), or DISK@latest.
        let id = if spec.ends_with("@latest") {
            store.snapshot(spec)?.id
        } else {
            spec.clone()
        };
        forgotten.push(store.forget_snapshot(&id)?);
    }
    if a.store.json {
        print_json(&json!({ "forgotten": forgotten }))?;
    } else {
        for id in &forgotten {
            outln!("{id}");
        }
        eprintln!(
            "forgot {} snapshot(s) (space is reclaimed by a garbage collection)",
            forgotten.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_export(a: &ExportArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let opts = blockferry::ExportOptions {
        format: a.format,
        workers: a.workers,
        force: a.force,
        cancel: CancelToken::new(),
        memory_budget: a
            .memory_budget
            .map_or(0, |b| usize::try_from(b).unwrap_or(usize::MAX).max(1)),
        upload_jobs: a.jobs,
        part_size: a
            .part_size
            .map_or(0, |p| usize::try_from(p).unwrap_or(usize::MAX)),
        s3: Some(s3_options(&a.store.s3)),
        base_export: a.base_export.clone(),
        incremental: a.incremental,
    };
    let bar = Bar::new(
        !a.store.json && std::io::stderr().is_terminal(),
        "exporting",
    );
    let report = blockferry::export(&store, &a.snapshot, &a.out, &opts, &bar)?;
    bar.done();
    if a.store.json {
        print_json(&report)?;
    } else {
        outln!(
            "exported snapshot {} of disk {} to {} as {} ({} disk, {} of data, {} file) in \
             {:.1}s",
            report.snapshot,
            report.disk,
            report.output,
            report.format.name(),
            human_bytes(report.virtual_size),
            human_bytes(report.bytes_written),
            human_bytes(report.file_size),
            report.seconds
        );
        if report.parts > 0 {
            outln!(
                "{} parts: {} sent, {} copied by the store{}{}",
                report.parts,
                human_bytes(report.bytes_sent),
                human_bytes(report.bytes_copied),
                report
                    .base
                    .as_ref()
                    .map(|b| format!(" from the export of snapshot {b}"))
                    .unwrap_or_default(),
                if report.resumed {
                    format!(
                        ", {} sent by an earlier run",
                        human_bytes(report.bytes_resumed)
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_serve(a: &ServeArgs) -> anyhow::Result<ExitCode> {
    let store = Arc::new(open_store(&a.store)?);
    let opts = blockferry::NbdOptions {
        listen: blockferry::NbdListen::parse(&a.nbd)?,
        export_name: a.name.clone(),
        cache_bytes: a.cache,
        readahead: a.readahead,
        max_connections: a.max_connections,
        insecure: a.insecure,
        tls: a.tls_cert.clone().zip(a.tls_key.clone()),
    };
    let stop = sync::cancel_on_signals()?;
    let server = blockferry::serve_nbd(store, &a.snapshot, &opts, &blockferry::Silent)?;
    if a.store.json {
        outln!(
            "{}",
            serde_json::json!({
                "address": server.address(),
                "uri": server.uri(),
                "export": server.export_name(),
            })
        );
    } else {
        outln!("{}", server.uri());
        eprintln!(
            "serving {} read-only on {} (Ctrl-C stops)",
            server.export_name(),
            server.address()
        );
    }
    while !stop.is_cancelled() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let stats = server.stats();
    server.stop();
    if a.store.json {
        outln!("{}", serde_json::json!({ "stopped": stats }));
    } else {
        eprintln!(
            "stopped: {} connections, {} reads, {} answered, {} chunks fetched",
            stats.connections,
            stats.reads,
            human_bytes(stats.bytes_read),
            stats.chunks_fetched
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_boot_test(a: &BootTestArgs) -> anyhow::Result<ExitCode> {
    let store = Arc::new(open_store(&a.store)?);
    let opts = blockferry::BootTestOptions {
        expect: a.expect.clone(),
        timeout: a.timeout,
        firmware: blockferry::Firmware::from_name(&a.firmware)?,
        output_dir: a.output_dir.clone(),
        memory_mib: a.memory,
        accel: a.accel.clone(),
        cancel: sync::cancel_on_signals()?,
    };
    let report = blockferry::boot_test(&store, &a.snapshot, &opts, &blockferry::Silent)?;
    if a.store.json {
        print_json(&report)?;
    } else {
        outln!(
            "{}: snapshot {} of disk {} ({}, {}) in {:.1}s: {}",
            if report.passed { "passed" } else { "FAILED" },
            report.snapshot,
            report.disk,
            if report.firmware == blockferry::Firmware::Uefi {
                "UEFI"
            } else {
                "BIOS"
            },
            report.accelerator,
            report.seconds,
            report.reason
        );
        outln!("console: {}", report.console_log.display());
        if let Some(shot) = &report.screenshot {
            outln!("screen: {}", shot.display());
        }
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn cmd_restore(a: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let opts = RestoreOptions {
        workers: a.workers,
        force: a.force,
        salvage: a.salvage,
        cancel: CancelToken::new(),
    };
    let bar = Bar::new(
        !a.store.json && std::io::stderr().is_terminal(),
        "restoring",
    );
    let spec = match &a.disk {
        Some(disk) if a.snapshot == "latest" => format!("{disk}@latest"),
        Some(disk) => {
            let s = store.snapshot(&a.snapshot)?;
            anyhow::ensure!(
                s.disk.name == *disk,
                "snapshot {} is of disk {:?}, not {disk:?}",
                s.id,
                s.disk.name
            );
            s.id
        }
        None => a.snapshot.clone(),
    };
    let report = blockferry::restore(&store, &spec, &a.out, &opts, &bar)?;
    bar.done();
    if a.store.json {
        let mut v = serde_json::to_value(&report)?;
        v["complete"] = json!(report.complete());
        print_json(&v)?;
    } else {
        for p in &report.unreadable {
            outln!(
                "offset {}: unreadable, left zero: {}",
                p.offset.unwrap_or_default(),
                p.message
            );
        }
        outln!(
            "restored snapshot {} of disk {} to {} ({}, {} of data){} in {:.1}s",
            report.snapshot,
            report.disk,
            report.output,
            human_bytes(report.virtual_size),
            human_bytes(report.bytes_written),
            if report.complete() {
                String::new()
            } else {
                format!(
                    "; INCOMPLETE: {} chunks ({}) could not be read and are zero",
                    report.problems_total,
                    human_bytes(report.bytes_unreadable)
                )
            },
            report.seconds
        );
    }
    Ok(if report.complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VERIFY_FAILED)
    })
}

fn cmd_verify(a: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let opts = VerifyOptions {
        image: a.image.clone(),
        ova_disk: a.disk.clone(),
        allow_outside_folder: a.allow_outside_folder,
        workers: a.workers,
        repair: a.repair,
        ..VerifyOptions::default()
    };
    let bar = Bar::new(
        !a.store.json && std::io::stderr().is_terminal(),
        "verifying",
    );
    let report = blockferry::verify(&store, &a.snapshot, &opts, &bar)?;
    bar.done();
    if let Some(r) = &report.repair
        && !a.store.json
    {
        eprintln!(
            "repair: {} index object(s) replaced ({} packs indexed anew), {} damaged chunk \
             copies and {} snapshot(s) recorded",
            r.index_objects_replaced, r.packs_reindexed, r.chunks_recorded, r.snapshots_recorded
        );
    }
    if a.store.json {
        let mut v = serde_json::to_value(&report)?;
        v["ok"] = json!(report.ok());
        print_json(&v)?;
    } else if report.ok() {
        outln!(
            "snapshot {} of disk {} verified: {} chunks intact{} ({:.1}s)",
            report.snapshot,
            report.disk,
            report.chunks_checked,
            if report.image_compared {
                ", identical to the image"
            } else {
                ""
            },
            report.seconds
        );
    } else {
        for p in &report.problems {
            match p.offset {
                Some(o) => outln!("snapshot {}, offset {o}: {}", report.snapshot, p.message),
                None => outln!("snapshot {}: {}", report.snapshot, p.message),
            }
        }
        outln!(
            "snapshot {} FAILED verification: {} problem(s)",
            report.snapshot,
            report.problems_total
        );
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VERIFY_FAILED)
    })
}

/// Whether two files have identical contents (used by the demo).
pub(crate) fn same_contents(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let mut fa = std::fs::File::open(a)?;
    let mut fb = std::fs::File::open(b)?;
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
