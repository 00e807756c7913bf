//! The long operations: replicate, restore, verify, convert, prune, gc. Each takes an
//! options struct (NULL: the defaults) and fills a report.

use std::ffi::{c_char, c_void};
use std::mem::offset_of;
use std::path::Path;

use blockferry::{
    BaseRef, ChangeFormat, ChangeSource, ConvertOptions, DeltaRequest, ExportFormat, ExportOptions,
    IoEngine, OpenOptions, ReplicateOptions, RestoreOptions, VerifyOptions, default_state_dir,
};

use crate::abi::{self, sized};
use crate::error::{Fail, FfiResult, boundary, invalid};
use crate::handle::{opt_str_arg, ref_arg, str_arg};
use crate::observe::{bf_progress_cb, run};
use crate::store::bf_store;
use crate::{bf_cancel, bf_result, ffi_arg, token};

/// A read engine (`bf_replicate_options.io_engine` and others).
pub type bf_io_engine = u32;
/// `pread(2)`, one request at a time, with the kernel's readahead: portable (the default).
pub const BF_IO_ENGINE_PREAD: bf_io_engine = 0;
/// `io_uring` where the kernel allows it, else `pread`.
pub const BF_IO_ENGINE_AUTO: bf_io_engine = 1;
/// `io_uring`, or fail.
pub const BF_IO_ENGINE_URING: bf_io_engine = 2;

fn io_engine(code: bf_io_engine, what: &str) -> FfiResult<IoEngine> {
    match code {
        BF_IO_ENGINE_PREAD => Ok(IoEngine::Pread),
        BF_IO_ENGINE_AUTO => Ok(IoEngine::Auto),
        BF_IO_ENGINE_URING => Ok(IoEngine::Uring),
        v => Err(invalid(format!(
            "{what} {v} is none of BF_IO_ENGINE_PREAD (0), _AUTO (1) or _URING (2)"
        ))),
    }
}

/// A count from C as a `usize` (saturating on 32-bit machines, where it is a limit anyway).
fn count(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Options of `bf_replicate`. Fill with `bf_replicate_options_init(&opts, sizeof opts)`, then
/// set fields. Strings are borrowed for the call only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_replicate_options {
    /// The struct's size in bytes (set by `bf_replicate_options_init`).
    pub size: usize,
    /// Disk name recorded (NULL: the shortest of the image's file name and its paths with
    /// more folders that no other source uses).
    pub name: *const c_char,
    /// The source is the disk `name` at another path (moved, or a copy): take the name
    /// although another source had it.
    pub same_disk: bool,
    /// Follow parent and extent paths outside the image's folder.
    pub allow_outside_folder: bool,
    /// Which disk of an OVA (index from 0, or file name; NULL: the first).
    pub disk: *const c_char,
    /// Folder of the job database (NULL: `BLOCKFERRY_STATE_DIR`, else the XDG state folder).
    pub state_dir: *const c_char,
    /// Record no job state (the run cannot be resumed).
    pub no_state: bool,
    /// Start over instead of resuming an unfinished run of this job.
    pub restart: bool,
    /// Compress chunks with lz4 (the default: true).
    pub compression: bool,
    /// `O_DIRECT` reads with `io_uring`.
    pub direct: bool,
    /// Hashing/compression/encryption threads (0: one per core).
    pub workers: u32,
    /// Memory for data in flight, in bytes (0: chosen from the machine).
    pub memory_budget: u64,
    /// Read engine (`BF_IO_ENGINE_*`).
    pub io_engine: bf_io_engine,
    /// Chunks in flight with `io_uring` (0: the default).
    pub io_depth: u32,
    /// Uploads in flight on S3 (0: the default, 4).
    pub upload_jobs: u32,
    /// Seconds to wait for another run replicating the same disk before failing with
    /// `BF_RESULT_BUSY` (0: fail at once).
    pub wait_secs: u32,
    /// S3 part size in bytes (0: from the memory budget).
    pub part_size: u64,
    /// Upload cap in bytes per second (0: none).
    pub bwlimit: u64,
    /// Make a delta on this snapshot (id, prefix, "latest" of the store or "latest-of-disk");
    /// NULL for a full copy.
    pub base: *const c_char,
    /// What changed since `base`: a change-list file, "hash" (compare every chunk) or
    /// "chain" (what a snapshot-chain child allocates).
    pub changes: *const c_char,
    /// The change list's format ("vmware-cbt", "hyperv-rct", "extents"; NULL: detected).
    pub changes_format: *const c_char,
    /// The source's change-tracking id now, recorded for the next delta (or NULL).
    pub change_id: *const c_char,
    /// Share of unchanged chunks a delta reads to check its list (0 to 1; default 0.01).
    pub verify_sample: f64,
    /// Since ABI version 2: warn when the store has acknowledged nothing for this many
    /// seconds while uploads are in flight (0: the default, 30).
    pub stall_warning_secs: u32,
}

/// `sizeof(bf_replicate_options)` in ABI version 1, before `stall_warning_secs`.
const REPLICATE_OPTIONS_V1: usize = 128;
const _: () = assert!(offset_of!(bf_replicate_options, stall_warning_secs) == REPLICATE_OPTIONS_V1);

sized!(
    bf_replicate_options,
    [REPLICATE_OPTIONS_V1],
    bf_replicate_options {
        size: size_of::<bf_replicate_options>(),
        name: std::ptr::null(),
        same_disk: false,
        allow_outside_folder: false,
        disk: std::ptr::null(),
        state_dir: std::ptr::null(),
        no_state: false,
        restart: false,
        compression: true,
        direct: false,
        workers: 0,
        memory_budget: 0,
        io_engine: BF_IO_ENGINE_PREAD,
        io_depth: 0,
        upload_jobs: 0,
        wait_secs: 0,
        part_size: 0,
        bwlimit: 0,
        base: std::ptr::null(),
        changes: std::ptr::null(),
        changes_format: std::ptr::null(),
        change_id: std::ptr::null(),
        verify_sample: blockferry::DEFAULT_VERIFY_SAMPLE,
        stall_warning_secs: 0,
    }
);

/// Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
///
/// # Safety
/// `opts` is writable for `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_replicate_options_init(
    opts: *mut bf_replicate_options,
    size: usize,
) -> bf_result {
    boundary(|| ffi_arg!(abi::init(opts, size, "opts")))
}

/// What `bf_replicate` did. Set `size` to `sizeof(bf_replicate_report)` before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_replicate_report {
    /// The struct's size in bytes (set by the caller).
    pub size: usize,
    /// The new snapshot's id (NUL-terminated hex).
    pub snapshot: [c_char; 33],
    /// The job id (NUL-terminated hex; empty without job state).
    pub job: [c_char; 33],
    /// Whether this run resumed an interrupted one.
    pub resumed: bool,
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes recorded as zero.
    pub bytes_zero: u64,
    /// Bytes the store already held.
    pub bytes_deduplicated: u64,
    /// Plaintext bytes of new chunks.
    pub bytes_new: u64,
    /// Bytes written to the store.
    pub bytes_stored: u64,
    /// Bytes a delta took from its base unread.
    pub bytes_unchanged: u64,
    /// Bytes an earlier, interrupted run had made durable.
    pub bytes_resumed: u64,
    /// New chunks stored.
    pub chunks_stored: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

sized!(
    bf_replicate_report,
    bf_replicate_report {
        size: size_of::<bf_replicate_report>(),
        snapshot: [0; 33],
        job: [0; 33],
        resumed: false,
        virtual_size: 0,
        bytes_read: 0,
        bytes_zero: 0,
        bytes_deduplicated: 0,
        bytes_new: 0,
        bytes_stored: 0,
        bytes_unchanged: 0,
        bytes_resumed: 0,
        chunks_stored: 0,
        seconds: 0.0,
    }
);

fn copy_id(dst: &mut [c_char; 33], id: &str) {
    for (d, b) in dst.iter_mut().zip(id.bytes().take(32)) {
        *d = c_char::from_ne_bytes([b]);
    }
}

/// The engine's delta request from the C options.
///
/// # Safety
/// The options' strings are NULL or NUL-terminated.
unsafe fn delta_request(o: &bf_replicate_options) -> FfiResult<DeltaRequest> {
    let base = ffi_arg!(opt_str_arg(o.base, "opts.base"))?;
    let changes = ffi_arg!(opt_str_arg(o.changes, "opts.changes"))?;
    let format = ffi_arg!(opt_str_arg(o.changes_format, "opts.changes_format"))?;
    let change_id = ffi_arg!(opt_str_arg(o.change_id, "opts.change_id"))?;
    let format = format.map(ChangeFormat::from_name).transpose()?;
    Ok(DeltaRequest {
        base: base.map(BaseRef::parse),
        changes: changes.map(|c| ChangeSource::from_name(c, format)),
        verify_sample: o.verify_sample,
        change_id: change_id.map(str::to_owned),
    })
}

/// Copies `image` into the store as a new snapshot (a delta when `opts->base` is set).
///
/// Blocks until done; `cancel` (NULL: none) stops it from another thread with
/// `BF_RESULT_CANCELLED`, keeping what was made durable: running the same replication again
/// resumes. `progress` (NULL: none) is called with `userdata` on the calling thread.
/// `opts` NULL means the defaults. `report` (NULL: not wanted) is filled on success.
///
/// # Safety
/// `store` is a live store; `image` a NUL-terminated path; `opts` NULL or initialised by
/// `bf_replicate_options_init` with valid strings; `cancel` NULL or live; `report` NULL or
/// writable for its `size`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_replicate(
    store: *const bf_store,
    image: *const c_char,
    opts: *const bf_replicate_options,
    progress: bf_progress_cb,
    userdata: *mut c_void,
    cancel: *const bf_cancel,
    report: *mut bf_replicate_report,
) -> bf_result {
    boundary(|| {
        let store = ffi_arg!(ref_arg(store, "store"))?;
        let image = ffi_arg!(str_arg(image, "image"))?;
        let o = ffi_arg!(abi::read(opts, "opts"))?;
        let report = ffi_arg!(abi::out(report, "report"))?;
        let cancel = ffi_arg!(token(cancel));
        let name = ffi_arg!(opt_str_arg(o.name, "opts.name"))?;
        let disk = ffi_arg!(opt_str_arg(o.disk, "opts.disk"))?;
        let state_dir = ffi_arg!(opt_str_arg(o.state_dir, "opts.state_dir"))?;
        let request = ffi_arg!(delta_request(&o))?;
        let open = OpenOptions {
            allow_outside_folder: o.allow_outside_folder,
            ova_disk: disk.map(str::to_owned),
            ..OpenOptions::default()
        };
        let source = blockferry::open_image_with(Path::new(image), &open)?;
        let delta = request.resolve(source.as_ref())?;
        let job_state = match (o.no_state, state_dir) {
            (true, _) => None,
            (false, Some(d)) => Some(d.into()),
            (false, None) => Some(default_state_dir()?),
        };
        let defaults = ReplicateOptions::default();
        let opts = ReplicateOptions {
            memory_budget: count(o.memory_budget),
            workers: o.workers as usize,
            compression: o.compression,
            disk_name: name.map(str::to_owned),
            same_disk: o.same_disk,
            wait: std::time::Duration::from_secs(u64::from(o.wait_secs)),
            stall_warning: match o.stall_warning_secs {
                0 => defaults.stall_warning,
                s => std::time::Duration::from_secs(u64::from(s)),
            },
            io_engine: io_engine(o.io_engine, "opts.io_engine")?,
            io_depth: o.io_depth as usize,
            direct_io: o.direct,
            cancel,
            job_state,
            restart: o.restart,
            disk_selector: disk.unwrap_or_default().to_owned(),
            upload_jobs: o.upload_jobs as usize,
            part_size: count(o.part_size),
            bwlimit: (o.bwlimit > 0).then_some(o.bwlimit),
            change_id: request.change_id.clone(),
            delta,
            ..defaults
        };
        let r = run(progress, userdata, |observer| {
            blockferry::replicate(&store.store, source.as_ref(), &opts, observer)
        })??;
        let mut out = <bf_replicate_report as abi::Sized>::defaults();
        copy_id(&mut out.snapshot, &r.snapshot);
        copy_id(&mut out.job, r.job.as_deref().unwrap_or_default());
        out.resumed = r.resumed;
        out.virtual_size = r.virtual_size;
        out.bytes_read = r.bytes_read;
        out.bytes_zero = r.bytes_zero;
        out.bytes_deduplicated = r.bytes_deduplicated;
        out.bytes_new = r.bytes_new;
        out.bytes_stored = r.bytes_stored;
        out.bytes_unchanged = r.bytes_unchanged;
        out.bytes_resumed = r.bytes_resumed;
        out.chunks_stored = r.chunks_stored;
        out.seconds = r.seconds;
        report.write(&out);
        Ok(())
    })
}

/// Options of `bf_restore`. Fill with `bf_restore_options_init(&opts, sizeof opts)`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_restore_options {
    /// The struct's size in bytes (set by `bf_restore_options_init`).
    pub size: usize,
    /// Replace an existing file; write onto a block device (what it holds is overwritten).
    pub force: bool,
    /// Write what can be read and leave zeros where chunks are missing or damaged (each
    /// reported as a warning) instead of failing.
    pub salvage: bool,
    /// Decrypting/decompressing threads (0: one per core).
    pub workers: u32,
}

sized!(
    bf_restore_options,
    bf_restore_options {
        size: size_of::<bf_restore_options>(),
        force: false,
        salvage: false,
        workers: 0,
    }
);

/// Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
///
/// # Safety
/// `opts` is writable for `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_restore_options_init(
    opts: *mut bf_restore_options,
    size: usize,
) -> bf_result {
    boundary(|| ffi_arg!(abi::init(opts, size, "opts")))
}

/// What `bf_restore` wrote. Set `size` to `sizeof(bf_restore_report)` before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_restore_report {
    /// The struct's size in bytes (set by the caller).
    pub size: usize,
    /// Virtual size written.
    pub virtual_size: u64,
    /// Bytes of data written (the rest left as holes, or zeros on a device).
    pub bytes_written: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

sized!(
    bf_restore_report,
    bf_restore_report {
        size: size_of::<bf_restore_report>(),
        virtual_size: 0,
        bytes_written: 0,
        seconds: 0.0,
    }
);

/// Writes snapshot `snapshot` (id, unique prefix or "latest") to `out`: a file, created
/// sparse, that appears under its name only once whole, or a block device (only with
/// `opts->force`). Blocks; `progress`, `cancel` and `report` as for `bf_replicate`.
///
/// # Safety
/// `store` live; `snapshot` and `out` NUL-terminated; the rest as for `bf_replicate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_restore(
    store: *const bf_store,
    snapshot: *const c_char,
    out: *const c_char,
    opts: *const bf_restore_options,
    progress: bf_progress_cb,
    userdata: *mut c_void,
    cancel: *const bf_cancel,
    report: *mut bf_restore_report,
) -> bf_result {
    boundary(|| {
        let store = ffi_arg!(ref_arg(store, "store"))?;
        let snapshot = ffi_arg!(str_arg(snapshot, "snapshot"))?;
        let out = ffi_arg!(str_arg(out, "out"))?;
        let o = ffi_arg!(abi::read(opts, "opts"))?;
        let report = ffi_arg!(abi::out(report, "report"))?;
        let opts = RestoreOptions {
            workers: o.workers as usize,
            force: o.force,
            salvage: o.salvage,
            cancel: ffi_arg!(token(cancel)),
        };
        let r = run(progress, userdata, |observer| {
            blockferry::restore(&store.store, snapshot, Path::new(out), &opts, observer)
        })??;
        report.write(&bf_restore_report {
            size: 0,
            virtual_size: r.virtual_size,
            bytes_written: r.bytes_written,
            seconds: r.seconds,
        });
        Ok(())
    })
}

/// An export's image format (`bf_export_options.format`).
pub type bf_export_format = u32;
/// A raw disk, sparse (the default).
pub const BF_EXPORT_FORMAT_RAW: bf_export_format = 0;
/// A dynamic VHDX.
pub const BF_EXPORT_FORMAT_VHDX: bf_export_format = 1;
/// A dynamic VHD.
pub const BF_EXPORT_FORMAT_VHD: bf_export_format = 2;
/// A fixed VHD of a whole number of MiB (what Azure takes).
pub const BF_EXPORT_FORMAT_VHD_FIXED: bf_export_format = 3;
/// A streamOptimized VMDK (what AWS VM Import and vSphere's OVF deployment take).
pub const BF_EXPORT_FORMAT_VMDK: bf_export_format = 4;

/// Options of `bf_export` (since ABI version 3). Fill with
/// `bf_export_options_init(&opts, sizeof opts)`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_export_options {
    /// The struct's size in bytes (set by `bf_export_options_init`).
    pub size: usize,
    /// The image format (`BF_EXPORT_FORMAT_*`).
    pub format: bf_export_format,
    /// Replace an existing file.
    pub force: bool,
    /// Worker threads (0: one per core).
    pub workers: u32,
}

sized!(
    bf_export_options,
    bf_export_options {
        size: size_of::<bf_export_options>(),
        format: BF_EXPORT_FORMAT_RAW,
        force: false,
        workers: 0,
    }
);

/// Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
///
/// # Safety
/// `opts` is writable for `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_export_options_init(
    opts: *mut bf_export_options,
    size: usize,
) -> bf_result {
    boundary(|| ffi_arg!(abi::init(opts, size, "opts")))
}

/// What `bf_export` wrote (since ABI version 3). Set `size` to `sizeof(bf_export_report)`
/// before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_export_report {
    /// The struct's size in bytes (set by the caller).
    pub size: usize,
    /// The snapshot exported (NUL-terminated hex).
    pub snapshot: [c_char; 33],
    /// The disk's size in the image (a fixed VHD's is rounded up to a whole MiB).
    pub virtual_size: u64,
    /// The image file's size (sparse: only data and metadata take space).
    pub file_size: u64,
    /// Bytes of the disk's data written.
    pub bytes_written: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

sized!(
    bf_export_report,
    bf_export_report {
        size: size_of::<bf_export_report>(),
        snapshot: [0; 33],
        virtual_size: 0,
        file_size: 0,
        bytes_written: 0,
        seconds: 0.0,
    }
);

/// Writes snapshot `snapshot` (id, unique prefix or "latest") to `out` as an image in
/// `opts->format` that a platform imports; only data is written, and the file appears under
/// its name only once whole. `out` may be an object, `s3://BUCKET/KEY`, reached as the store
/// is when it is on S3: one multipart upload that a later call continues if this one stops
/// (the store opened with a state folder records it). `opts` NULL means a raw export;
/// `progress`, `cancel` and `report` as for `bf_replicate`.
///
/// # Safety
/// `store` live; `snapshot` and `out` NUL-terminated; `opts` NULL or initialised; the rest
/// as for `bf_replicate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_export(
    store: *const bf_store,
    snapshot: *const c_char,
    out: *const c_char,
    opts: *const bf_export_options,
    progress: bf_progress_cb,
    userdata: *mut c_void,
    cancel: *const bf_cancel,
    report: *mut bf_export_report,
) -> bf_result {
    boundary(|| {
        let store = ffi_arg!(ref_arg(store, "store"))?;
        let snapshot = ffi_arg!(str_arg(snapshot, "snapshot"))?;
        let out = ffi_arg!(str_arg(out, "out"))?;
        let o = ffi_arg!(abi::read(opts, "opts"))?;
        let report = ffi_arg!(abi::out(report, "report"))?;
        let format = match o.format {
            BF_EXPORT_FORMAT_RAW => ExportFormat::Raw,
            BF_EXPORT_FORMAT_VHDX => ExportFormat::Vhdx,
            BF_EXPORT_FORMAT_VHD => ExportFormat::Vhd,
            BF_EXPORT_FORMAT_VHD_FIXED => ExportFormat::VhdFixed,
            BF_EXPORT_FORMAT_VMDK => ExportFormat::Vmdk,
            v => {
                return Err(invalid(format!(
                    "opts.format {v} is none of BF_EXPORT_FORMAT_RAW (0), _VHDX (1), _VHD (2), \
                     _VHD_FIXED (3) or _VMDK (4)"
                )));
            }
        };
        let opts = ExportOptions {
            format,
            workers: o.workers as usize,
            force: o.force,
            cancel: ffi_arg!(token(cancel)),
            ..ExportOptions::default()
        };
        let r = run(progress, userdata, |observer| {
            blockferry::export(&store.store, snapshot, Path::new(out), &opts, observer)
        })??;
        let mut rep = <bf_export_report as abi::Sized>::defaults();
        copy_id(&mut rep.snapshot, &r.snapshot);
        rep.virtual_size = r.virtual_size;
        rep.file_size = r.file_size;
        rep.bytes_written = r.bytes_written;
        rep.seconds = r.seconds;
        report.write(&rep);
        Ok(())
    })
}

/// Options of `bf_verify`. Fill with `bf_verify_options_init(&opts, sizeof opts)`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_verify_options {
    /// The struct's size in bytes (set by `bf_verify_options_init`).
    pub size: usize,
    /// Compare the snapshot with this image too (NULL: only check the store's chunks).
    pub image: *const c_char,
    /// Which disk of an OVA `image` is (index from 0, or file name; NULL: the first).
    pub disk: *const c_char,
    /// Follow the image's parent and extent paths outside its folder.
    pub allow_outside_folder: bool,
    /// Rebuild unreadable index objects from the packs and record damaged chunks (and
    /// snapshots) as damaged, so that the next replication stores that data again.
    pub repair: bool,
    /// Read engine for the image (`BF_IO_ENGINE_*`).
    pub io_engine: bf_io_engine,
    /// Checking threads (0: one per core).
    pub workers: u32,
}

sized!(
    bf_verify_options,
    bf_verify_options {
        size: size_of::<bf_verify_options>(),
        image: std::ptr::null(),
        disk: std::ptr::null(),
        allow_outside_folder: false,
        repair: false,
        io_engine: BF_IO_ENGINE_PREAD,
        workers: 0,
    }
);

/// Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
///
/// # Safety
/// `opts` is writable for `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_verify_options_init(
    opts: *mut bf_verify_options,
    size: usize,
) -> bf_result {
    boundary(|| ffi_arg!(abi::init(opts, size, "opts")))
}

/// What `bf_verify` found. Set `size` to `sizeof(bf_verify_report)` before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_verify_report {
    /// The struct's size in bytes (set by the caller).
    pub size: usize,
    /// Whether the snapshot checked out.
    pub ok: bool,
    /// Whether the image was compared too.
    pub image_compared: bool,
    /// Distinct chunks checked.
    pub chunks_checked: u64,
    /// Virtual bytes covered.
    pub bytes_checked: u64,
    /// Problems found.
    pub problems_total: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

sized!(
    bf_verify_report,
    bf_verify_report {
        size: size_of::<bf_verify_report>(),
        ok: false,
        image_compared: false,
        chunks_checked: 0,
        bytes_checked: 0,
        problems_total: 0,
        seconds: 0.0,
    }
);

/// Checks every chunk of snapshot `snapshot` and, with `opts->image`, compares it with that
/// image. Returns `BF_RESULT_VERIFY_MISMATCH` when problems were found (the last error
/// describes the first) and fills `report` then too.
///
/// # Safety
/// `store` live; `snapshot` NUL-terminated; the rest as for `bf_replicate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_verify(
    store: *const bf_store,
    snapshot: *const c_char,
    opts: *const bf_verify_options,
    progress: bf_progress_cb,
    userdata: *mut c_void,
    cancel: *const bf_cancel,
    report: *mut bf_verify_report,
) -> bf_result {
    boundary(|| {
        let store = ffi_arg!(ref_arg(store, "store"))?;
        let snapshot = ffi_arg!(str_arg(snapshot, "snapshot"))?;
        let o = ffi_arg!(abi::read(opts, "opts"))?;
        let report = ffi_arg!(abi::out(report, "report"))?;
        let image = ffi_arg!(opt_str_arg(o.image, "opts.image"))?;
        let disk = ffi_arg!(opt_str_arg(o.disk, "opts.disk"))?;
        let opts = VerifyOptions {
            image: image.map(Into::into),
            ova_disk: disk.map(str::to_owned),
            allow_outside_folder: o.allow_outside_folder,
            workers: o.workers as usize,
            io_engine: io_engine(o.io_engine, "opts.io_engine")?,
            repair: o.repair,
            cancel: ffi_arg!(token(cancel)),
        };
        let r = run(progress, userdata, |observer| {
            blockferry::verify(&store.store, snapshot, &opts, observer)
        })??;
        report.write(&bf_verify_report {
            size: 0,
            ok: r.ok(),
            image_compared: r.image_compared,
            chunks_checked: r.chunks_checked,
            bytes_checked: r.bytes_checked,
            problems_total: r.problems_total,
            seconds: r.seconds,
        });
        match r.problems.first() {
            None => Ok(()),
            Some(p) => Err(Fail::Code(
                bf_result::VerifyMismatch,
                format!(
                    "snapshot {}: {} problem(s); the first{}: {}",
                    r.snapshot,
                    r.problems_total,
                    p.offset
                        .map(|o| format!(" at offset {o}"))
                        .unwrap_or_default(),
                    p.message
                ),
            )),
        }
    })
}

/// Options of `bf_convert`. Fill with `bf_convert_options_init(&opts, sizeof opts)`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_convert_options {
    /// The struct's size in bytes (set by `bf_convert_options_init`).
    pub size: usize,
    /// Replace an existing file; write onto a block device.
    pub force: bool,
    /// Read engine (`BF_IO_ENGINE_*`).
    pub io_engine: bf_io_engine,
    /// Threads (0: one per core).
    pub workers: u32,
}

sized!(
    bf_convert_options,
    bf_convert_options {
        size: size_of::<bf_convert_options>(),
        force: false,
        io_engine: BF_IO_ENGINE_PREAD,
        workers: 0,
    }
);

/// Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
///
/// # Safety
/// `opts` is writable for `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_convert_options_init(
    opts: *mut bf_convert_options,
    size: usize,
) -> bf_result {
    boundary(|| ffi_arg!(abi::init(opts, size, "opts")))
}

/// Writes an image's virtual disk to `out` as a sparse raw file that appears under its name
/// only once whole (or onto a block device, only with `opts->force`).
///
/// # Safety
/// `image` and `out` NUL-terminated; `opts` NULL or initialised; the rest as for
/// `bf_replicate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_convert(
    image: *const c_char,
    out: *const c_char,
    opts: *const bf_convert_options,
    progress: bf_progress_cb,
    userdata: *mut c_void,
    cancel: *const bf_cancel,
) -> bf_result {
    boundary(|| {
        let image = ffi_arg!(str_arg(image, "image"))?;
        let out = ffi_arg!(str_arg(out, "out"))?;
        let o = ffi_arg!(abi::read(opts, "opts"))?;
        let src = blockferry::open_image(Path::new(image))?;
        let opts = ConvertOptions {
            force: o.force,
            io_engine: io_engine(o.io_engine, "opts.io_engine")?,
            workers: o.workers as usize,
            cancel: ffi_arg!(token(cancel)),
        };
        run(progress, userdata, |observer| {
            blockferry::convert(src.as_ref(), Path::new(out), &opts, observer)
        })??;
        Ok(())
    })
}

/// Options of `bf_store_prune`: which snapshots to keep, per disk. Fill with
/// `bf_prune_options_init(&opts, sizeof opts)`; a policy that keeps nothing is refused.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_prune_options {
    /// The struct's size in bytes (set by `bf_prune_options_init`).
    pub size: usize,
    /// Keep the newest this many.
    pub keep_last: u32,
    /// Keep the newest of each of the last this many days (UTC) that have snapshots.
    pub keep_daily: u32,
    /// Keep the newest of each of the last this many weeks (Monday to Sunday, UTC).
    pub keep_weekly: u32,
    /// Keep the newest of each of the last this many months (UTC).
    pub keep_monthly: u32,
    /// Only this disk's snapshots (NULL: every disk's).
    pub disk: *const c_char,
    /// Only count; forget nothing.
    pub dry_run: bool,
}

sized!(
    bf_prune_options,
    bf_prune_options {
        size: size_of::<bf_prune_options>(),
        keep_last: 0,
        keep_daily: 0,
        keep_weekly: 0,
        keep_monthly: 0,
        disk: std::ptr::null(),
        dry_run: false,
    }
);

/// Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
///
/// # Safety
/// `opts` is writable for `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_prune_options_init(
    opts: *mut bf_prune_options,
    size: usize,
) -> bf_result {
    boundary(|| ffi_arg!(abi::init(opts, size, "opts")))
}

/// What `bf_store_prune` did (or would do, on a dry run). Set `size` to
/// `sizeof(bf_prune_report)` before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_prune_report {
    /// The struct's size in bytes (set by the caller).
    pub size: usize,
    /// Snapshots kept.
    pub kept: u64,
    /// Snapshots forgotten.
    pub forgotten: u64,
}

sized!(
    bf_prune_report,
    bf_prune_report {
        size: size_of::<bf_prune_report>(),
        kept: 0,
        forgotten: 0,
    }
);

/// Forgets the snapshots a retention policy does not keep.
///
/// # Safety
/// `store` live; `opts` initialised (not NULL: a policy is needed), its `disk` NULL or
/// NUL-terminated; `report` NULL or writable for its `size`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_store_prune(
    store: *const bf_store,
    opts: *const bf_prune_options,
    report: *mut bf_prune_report,
) -> bf_result {
    boundary(|| {
        let store = ffi_arg!(ref_arg(store, "store"))?;
        ffi_arg!(ref_arg(opts, "opts"))?;
        let o = ffi_arg!(abi::read(opts, "opts"))?;
        let report = ffi_arg!(abi::out(report, "report"))?;
        let disk = ffi_arg!(opt_str_arg(o.disk, "opts.disk"))?;
        let policy = blockferry::KeepPolicy {
            last: o.keep_last as usize,
            daily: o.keep_daily as usize,
            weekly: o.keep_weekly as usize,
            monthly: o.keep_monthly as usize,
        };
        let r = blockferry::prune(&store.store, &policy, disk, o.dry_run)?;
        report.write(&bf_prune_report {
            size: 0,
            kept: r.kept.len() as u64,
            forgotten: r.forgotten.len() as u64,
        });
        Ok(())
    })
}

/// Options of `bf_store_gc`. Fill with `bf_gc_options_init(&opts, sizeof opts)`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_gc_options {
    /// The struct's size in bytes (set by `bf_gc_options_init`).
    pub size: usize,
    /// Repack packs until at most this share (0 to 1) of their bytes is unused (default
    /// 0.1).
    pub max_unused: f64,
    /// Seconds to wait for running replications (0: fail with `BF_RESULT_BUSY` at once).
    pub wait_secs: u32,
    /// Only count; change nothing.
    pub dry_run: bool,
}

sized!(bf_gc_options, {
    let d = blockferry::GcOptions::default();
    bf_gc_options {
        size: size_of::<bf_gc_options>(),
        max_unused: d.max_unused,
        wait_secs: u32::try_from(d.wait.as_secs()).unwrap_or(u32::MAX),
        dry_run: false,
    }
});

/// Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
///
/// # Safety
/// `opts` is writable for `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_gc_options_init(opts: *mut bf_gc_options, size: usize) -> bf_result {
    boundary(|| ffi_arg!(abi::init(opts, size, "opts")))
}

/// What `bf_store_gc` did (or would do, on a dry run). Set `size` to
/// `sizeof(bf_gc_report)` before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_gc_report {
    /// The struct's size in bytes (set by the caller).
    pub size: usize,
    /// Snapshots found.
    pub snapshots: u64,
    /// Chunks some snapshot references.
    pub chunks_live: u64,
    /// Referenced chunks missing from the store (should be 0).
    pub chunks_missing: u64,
    /// Packs deleted.
    pub packs_deleted: u64,
    /// Packs repacked.
    pub packs_repacked: u64,
    /// Store bytes before.
    pub bytes_before: u64,
    /// Store bytes after.
    pub bytes_after: u64,
}

sized!(
    bf_gc_report,
    bf_gc_report {
        size: size_of::<bf_gc_report>(),
        snapshots: 0,
        chunks_live: 0,
        chunks_missing: 0,
        packs_deleted: 0,
        packs_repacked: 0,
        bytes_before: 0,
        bytes_after: 0,
    }
);

/// Deletes what no snapshot references, repacking packs with too much unused space.
/// `opts` NULL means the defaults; the rest as for `bf_replicate`.
///
/// # Safety
/// `store` live; `opts` NULL or initialised; the rest as for `bf_replicate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_store_gc(
    store: *const bf_store,
    opts: *const bf_gc_options,
    progress: bf_progress_cb,
    userdata: *mut c_void,
    cancel: *const bf_cancel,
    report: *mut bf_gc_report,
) -> bf_result {
    boundary(|| {
        let store = ffi_arg!(ref_arg(store, "store"))?;
        let o = ffi_arg!(abi::read(opts, "opts"))?;
        let report = ffi_arg!(abi::out(report, "report"))?;
        let opts = blockferry::GcOptions {
            max_unused: o.max_unused,
            wait: std::time::Duration::from_secs(u64::from(o.wait_secs)),
            dry_run: o.dry_run,
            cancel: ffi_arg!(token(cancel)),
        };
        let r = run(progress, userdata, |observer| {
            blockferry::gc(&store.store, &opts, observer)
        })??;
        report.write(&bf_gc_report {
            size: 0,
            snapshots: r.snapshots as u64,
            chunks_live: r.chunks_live,
            chunks_missing: r.chunks_missing,
            packs_deleted: r.packs_deleted,
            packs_repacked: r.packs_repacked,
            bytes_before: r.bytes_before,
            bytes_after: r.bytes_after,
        });
        Ok(())
    })
}
