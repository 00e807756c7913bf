//! The C ABI of blockferry (`ffi/include/blockferry.h`, generated from this crate by cbindgen).
//!
//! Conventions (rustls-ffi's):
//! - Every fallible function returns a [`bf_result`]; `BF_RESULT_OK` is 0. On failure,
//!   `bf_last_error` copies the calling thread's error message (naming file, structure,
//!   offset) into a caller buffer.
//! - Objects are opaque handles made by a `_new`/`_open`/`_create` function and released by
//!   exactly one call of their `_free` (which takes NULL).
//! - Out-parameters are written only on success, unless a function says otherwise.
//! - Every pointer argument is checked for NULL (`BF_RESULT_NULL_PARAMETER`); strings are
//!   NUL-terminated UTF-8.
//! - A panic never crosses the boundary: it becomes `BF_RESULT_PANIC`.
//! - Long calls block the calling thread; `bf_cancel_request` stops them from any thread.
//!   Progress callbacks run on blockferry's threads, one call at a time.
//!
//! All `unsafe` is in `handle` and in the callback adapter here, each block with its
//! `// SAFETY:` comment.

#![allow(non_camel_case_types)] // C names: bf_store, bf_result…

mod error;
mod handle;
pub mod sync;

use std::ffi::{CStr, c_char, c_void};
use std::path::Path;
use std::sync::Mutex;

use blockferry::S3Options;
use blockferry::{BaseRef, ChangeFormat, ChangeSource, DeltaRequest};
use blockferry::{
    CancelToken, ConvertOptions, Event, InitOptions, Observer, Phase, ReplicateOptions,
    RestoreOptions, VerifyOptions,
};
use blockferry::{JobDb, default_state_dir};
use blockferry::{OpenOptions, Target};
use serde_json::json;

pub use error::bf_result;
use error::{Fail, FfiResult, boundary, invalid, with_last};
/// One call of a `handle` helper on an export's pointer arguments.
macro_rules! ffi_arg {
    ($e:expr) => {{
        // SAFETY: every export's `# Safety` section requires of its caller what the `handle`
        // helpers require of their pointer arguments (NULL or valid, strings NUL-terminated).
        unsafe { $e }
    }};
}

use handle::{
    box_out, bytes_arg, free_box, opt_ref_arg, opt_str_arg, ref_arg, str_arg, write_opt, write_text,
};

/// An open store (opaque). Safe to use from several threads at once, including for
/// concurrent replications; free it once no call on it is running.
#[derive(Debug)]
pub struct bf_store {
    store: blockferry::Store,
}

/// A cancellation flag (opaque). `bf_cancel_request` may be called from any thread while an
/// operation that was given it runs.
#[derive(Debug)]
pub struct bf_cancel {
    token: CancelToken,
}

/// What an operation is doing.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum bf_phase {
    /// Reading the source and storing chunks.
    Replicating = 0,
    /// Writing the index and the snapshot manifest.
    Committing = 1,
    /// Writing a snapshot (or an image) out.
    Restoring = 2,
    /// Checking a snapshot.
    Verifying = 3,
    /// Collecting garbage.
    Collecting = 4,
}

/// The kind of a progress event.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum bf_event_kind {
    /// A phase started; `bytes_total` is set.
    Started = 0,
    /// Counters moved (at most every 100 ms).
    Progress = 1,
    /// Something the user should know; `message` is set.
    Warning = 2,
    /// The phase finished (the operation's result says whether it succeeded).
    Finished = 3,
}

/// A progress event, valid only during the callback.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_event {
    /// What happened.
    pub kind: bf_event_kind,
    /// The phase it belongs to.
    pub phase: bf_phase,
    /// Virtual bytes the phase covers.
    pub bytes_total: u64,
    /// Virtual bytes done (read, found zero, or skipped).
    pub bytes_done: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes found zero or unallocated.
    pub bytes_zero: u64,
    /// Bytes the store already held.
    pub bytes_deduplicated: u64,
    /// Bytes written to the store (replicate) or the output (restore).
    pub bytes_written: u64,
    /// Of `bytes_done`, bytes done without work (durable from an earlier run, or unchanged).
    pub bytes_skipped: u64,
    /// Seconds since the phase started.
    pub elapsed_seconds: f64,
    /// Virtual bytes per second on average.
    pub rate: f64,
    /// For `BF_EVENT_KIND_WARNING`: the text (NUL-terminated); else NULL.
    pub message: *const c_char,
}

/// A progress callback: `userdata` as given, and the event (valid during the call only).
/// Called on one of blockferry's threads, one call at a time; keep it quick.
pub type bf_progress_cb =
    Option<unsafe extern "C" fn(userdata: *mut c_void, event: *const bf_event)>;

/// How to reach S3 (ignored for local stores). Zeroed fields (NULL, 0, -1 for `path_style`)
/// take the defaults: the standard AWS chain for credentials and region, `AWS_ENDPOINT_URL`.
/// Over HTTPS, only the authorities in the PEM file `AWS_CA_BUNDLE` names are trusted when it
/// is set (else the system's).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_s3_options {
    /// Endpoint URL of an S3-compatible service, or NULL.
    pub endpoint: *const c_char,
    /// Region, or NULL.
    pub region: *const c_char,
    /// Path-style addressing: 1 on, 0 off, -1 automatic (on for a custom endpoint).
    pub path_style: i32,
    /// Access key id, or NULL (then `secret_key` must be NULL too, and the AWS chain is used).
    pub access_key: *const c_char,
    /// Secret access key, or NULL.
    pub secret_key: *const c_char,
    /// Time limit of one attempt of one request, in seconds; 0 for the default (300).
    pub attempt_timeout_secs: u32,
}

/// Options of `bf_replicate`. Fill with `bf_replicate_options_init`, then set fields.
/// Strings are borrowed for the call only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_replicate_options {
    /// Disk name recorded (NULL: the image's file name).
    pub name: *const c_char,
    /// Which disk of an OVA (index from 0, or file name; NULL: the first).
    pub disk: *const c_char,
    /// Follow parent and extent paths outside the image's folder.
    pub allow_outside_folder: bool,
    /// Folder of the job database (NULL: `BLOCKFERRY_STATE_DIR`, else the XDG state folder).
    pub state_dir: *const c_char,
    /// Record no job state (the run cannot be resumed).
    pub no_state: bool,
    /// Start over instead of resuming an unfinished run of this job.
    pub restart: bool,
    /// Hashing/compression/encryption threads (0: one per core).
    pub workers: u32,
    /// Memory for data in flight, in bytes (0: chosen from the machine).
    pub memory_budget: u64,
    /// Compress chunks with lz4.
    pub compression: bool,
    /// Read engine: 0 pread, 1 `io_uring` where the kernel allows (else pread), 2 `io_uring`.
    pub io_engine: u32,
    /// Chunks in flight with `io_uring` (0: the default).
    pub io_depth: u32,
    /// `O_DIRECT` reads with `io_uring`.
    pub direct: bool,
    /// Uploads in flight on S3 (0: default 4).
    pub upload_jobs: u32,
    /// S3 part size in bytes (0: from the memory budget).
    pub part_size: u64,
    /// Upload cap in bytes per second (0: none).
    pub bwlimit: u64,
    /// Make a delta on this snapshot (id, prefix or "latest"); NULL for a full copy.
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
}

/// What `bf_replicate` did.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_replicate_report {
    /// The new snapshot's id (NUL-terminated hex).
    pub snapshot: [c_char; 33],
    /// The job id (NUL-terminated hex; empty without job state).
    pub job: [c_char; 33],
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
    /// Whether this run resumed an interrupted one.
    pub resumed: bool,
}

/// What `bf_restore` wrote.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_restore_report {
    /// Virtual size written.
    pub virtual_size: u64,
    /// Bytes of data written (the rest left as holes, or zeros on a device).
    pub bytes_written: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// What `bf_verify` found.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_verify_report {
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

/// What `bf_store_prune` did (or would do, on a dry run).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_prune_report {
    /// Snapshots kept.
    pub kept: u64,
    /// Snapshots forgotten.
    pub forgotten: u64,
}

/// What `bf_store_gc` did (or would do, on a dry run).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_gc_report {
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

/// The engine's version, e.g. "0.1.0" (static; never NULL).
#[unsafe(no_mangle)]
pub extern "C" fn bf_version() -> *const c_char {
    const VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

/// A static description of a result code (never NULL; unknown codes get one too).
#[unsafe(no_mangle)]
pub extern "C" fn bf_result_text(result: u32) -> *const c_char {
    error::describe(result).as_ptr()
}

/// Copies the calling thread's last error message into `buf` (`len` bytes, NUL-terminated)
/// and sets `*out_n` (if not NULL) to its length without the NUL. If it does not fit, as
/// much as fits is written and `BF_RESULT_INSUFFICIENT_SIZE` returned. Does not change the
/// last error.
///
/// # Safety
/// `buf` is NULL (with `len` 0) or writable for `len` bytes; `out_n` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_last_error(
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
) -> bf_result {
    let message = with_last(|l| l.message.clone());
    // SAFETY: forwarded contract.
    match unsafe { write_text(buf, len, out_n, &message, true) } {
        Ok(()) => bf_result::Ok,
        Err(Fail::Code(code, _)) => code,
        Err(Fail::Engine(_)) => bf_result::Internal,
    }
}

/// The file the calling thread's last error concerns, like `bf_last_error`;
/// `BF_RESULT_NOT_FOUND` (writing nothing) when it names none.
///
/// # Safety
/// As `bf_last_error`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_last_error_path(
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
) -> bf_result {
    let Some(path) = with_last(|l| l.path.clone()) else {
        return bf_result::NotFound;
    };
    // SAFETY: forwarded contract.
    match unsafe { write_text(buf, len, out_n, &path, true) } {
        Ok(()) => bf_result::Ok,
        Err(Fail::Code(code, _)) => code,
        Err(Fail::Engine(_)) => bf_result::Internal,
    }
}

/// Writes a field of the thread's last error to `*out`: `NotFound` when it has none.
///
/// # Safety
/// `out` is NULL or writable.
unsafe fn write_last<T>(
    out: *mut T,
    field: impl FnOnce(&error::LastError) -> Option<T>,
) -> bf_result {
    if out.is_null() {
        return bf_result::NullParameter;
    }
    match with_last(field) {
        Some(v) => {
            // SAFETY: `out` is not NULL and writable (the caller's contract).
            unsafe { write_opt(out, v) };
            bf_result::Ok
        }
        None => bf_result::NotFound,
    }
}

/// The byte offset the calling thread's last error concerns (in a file or on the virtual
/// disk) in `*out`; `BF_RESULT_NOT_FOUND` when it names none.
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_last_error_offset(out: *mut u64) -> bf_result {
    // SAFETY: forwarded contract.
    unsafe { write_last(out, |l| l.offset) }
}

/// The multipart upload part the calling thread's last error concerns in `*out`;
/// `BF_RESULT_NOT_FOUND` when it names none.
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_last_error_part(out: *mut u32) -> bf_result {
    // SAFETY: forwarded contract.
    unsafe { write_last(out, |l| l.part) }
}

/// Makes a cancellation flag in `*out`; free it with `bf_cancel_free`.
///
/// # Safety
/// `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_cancel_new(out: *mut *mut bf_cancel) -> bf_result {
    boundary(|| {
        let c = bf_cancel {
            token: CancelToken::new(),
        };
        // SAFETY: forwarded contract.
        unsafe { box_out(out, c, "out") }
    })
}

/// Asks every operation given `cancel` to stop; they return `BF_RESULT_CANCELLED` soon
/// after. Thread-safe; may be called any number of times. NULL is ignored.
///
/// # Safety
/// `cancel` is NULL or a live flag from `bf_cancel_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_cancel_request(cancel: *const bf_cancel) {
    // SAFETY: forwarded contract.
    if let Some(c) = unsafe { opt_ref_arg(cancel) } {
        c.token.cancel();
    }
}

/// Frees a cancellation flag (NULL is ignored). Operations still running with it keep
/// their own reference; no other thread may use this pointer afterwards.
///
/// # Safety
/// `cancel` is NULL or from `bf_cancel_new`, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_cancel_free(cancel: *mut bf_cancel) {
    // SAFETY: forwarded contract.
    unsafe { free_box(cancel) };
}

/// S3 settings from C (NULL: defaults).
///
/// # Safety
/// `s3` is NULL or valid, with its strings NULL or NUL-terminated.
unsafe fn s3_options(s3: *const bf_s3_options) -> FfiResult<S3Options> {
    let mut o = S3Options::default();
    // SAFETY: forwarded contract.
    let Some(c) = (unsafe { opt_ref_arg(s3) }) else {
        return Ok(o);
    };
    let endpoint = ffi_arg!(opt_str_arg(c.endpoint, "s3.endpoint"))?;
    let region = ffi_arg!(opt_str_arg(c.region, "s3.region"))?;
    let key = ffi_arg!(opt_str_arg(c.access_key, "s3.access_key"))?;
    let secret = ffi_arg!(opt_str_arg(c.secret_key, "s3.secret_key"))?;
    o.endpoint = endpoint.map(str::to_owned);
    o.region = region.map(str::to_owned);
    o.path_style = match c.path_style {
        -1 => None,
        0 => Some(false),
        1 => Some(true),
        v => return Err(invalid(format!("s3.path_style {v}: give -1, 0 or 1"))),
    };
    o.static_credentials = match (key, secret) {
        (Some(k), Some(s)) => Some((k.to_owned(), s.to_owned())),
        (None, None) => None,
        _ => {
            return Err(invalid(
                "give both s3.access_key and s3.secret_key, or neither",
            ));
        }
    };
    if c.attempt_timeout_secs > 0 {
        o.attempt_timeout = std::time::Duration::from_secs(u64::from(c.attempt_timeout_secs));
    }
    Ok(o)
}

/// Creates a store at `location` (a folder, created if missing, or `s3://BUCKET/PREFIX`)
/// and opens it into `*out`. Encrypted with the passphrase (`passphrase_len` bytes) when
/// `encrypted`; an unencrypted store must be asked for with `encrypted` false and a NULL
/// passphrase. `chunk_size` is a power of two from 65536 to 16777216 (0: 1 MiB).
///
/// # Safety
/// `location` is a NUL-terminated string; `passphrase` is NULL or readable for
/// `passphrase_len` bytes; `s3` is NULL or valid; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_store_create(
    location: *const c_char,
    passphrase: *const u8,
    passphrase_len: usize,
    encrypted: bool,
    chunk_size: u32,
    s3: *const bf_s3_options,
    out: *mut *mut bf_store,
) -> bf_result {
    boundary(|| {
        let location = ffi_arg!(str_arg(location, "location"))?;
        let pass = ffi_arg!(bytes_arg(passphrase, passphrase_len, "passphrase"))?;
        let s3 = ffi_arg!(s3_options(s3))?;
        if out.is_null() {
            return Err(error::null("out"));
        }
        match (encrypted, pass) {
            (true, None) => {
                return Err(Fail::Engine(blockferry::Error::config(
                    "an encrypted store needs a passphrase",
                )));
            }
            (false, Some(_)) => {
                return Err(invalid("an unencrypted store takes no passphrase"));
            }
            _ => {}
        }
        let opts = InitOptions {
            chunk_size: if chunk_size == 0 { 1 << 20 } else { chunk_size },
            passphrase: pass.map(<[u8]>::to_vec),
        };
        opts.check()?;
        let backend = blockferry::open_backend(location, true, &s3)?;
        blockferry::Store::init_client(backend.as_ref(), &opts, None)?;
        let store = blockferry::Store::open_client(backend, pass, None)?;
        // SAFETY: forwarded contract.
        unsafe { box_out(out, bf_store { store }, "out") }
    })
}

/// Opens the store at `location` into `*out`, unlocking it with the passphrase (NULL for
/// an unencrypted store; `BF_RESULT_CREDENTIALS` if it does not unlock, or if a passphrase is
/// given for an unencrypted store). The store is checked against this client's record of it
/// in the default state folder (`BLOCKFERRY_STATE_DIR`, else under `$HOME`): a store whose id
/// or encryption changed under the client is refused (`BF_RESULT_CORRUPT`).
///
/// # Safety
/// As `bf_store_create`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_store_open(
    location: *const c_char,
    passphrase: *const u8,
    passphrase_len: usize,
    s3: *const bf_s3_options,
    out: *mut *mut bf_store,
) -> bf_result {
    boundary(|| {
        let location = ffi_arg!(str_arg(location, "location"))?;
        let pass = ffi_arg!(bytes_arg(passphrase, passphrase_len, "passphrase"))?;
        let s3 = ffi_arg!(s3_options(s3))?;
        if out.is_null() {
            return Err(error::null("out"));
        }
        let backend = blockferry::open_backend(location, false, &s3)?;
        let store = blockferry::Store::open_client(backend, pass, None)?;
        // SAFETY: forwarded contract.
        unsafe { box_out(out, bf_store { store }, "out") }
    })
}

/// Frees a store (NULL is ignored). No call on it may be running.
///
/// # Safety
/// `store` is NULL or from `bf_store_open`/`bf_store_create`, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_store_free(store: *mut bf_store) {
    // SAFETY: forwarded contract.
    unsafe { free_box(store) };
}

fn default_options() -> bf_replicate_options {
    bf_replicate_options {
        name: std::ptr::null(),
        disk: std::ptr::null(),
        allow_outside_folder: false,
        state_dir: std::ptr::null(),
        no_state: false,
        restart: false,
        workers: 0,
        memory_budget: 0,
        compression: true,
        io_engine: 0,
        io_depth: 0,
        direct: false,
        upload_jobs: 0,
        part_size: 0,
        bwlimit: 0,
        base: std::ptr::null(),
        changes: std::ptr::null(),
        changes_format: std::ptr::null(),
        change_id: std::ptr::null(),
        verify_sample: blockferry::DEFAULT_VERIFY_SAMPLE,
    }
}

/// Fills `opts` with the defaults.
///
/// # Safety
/// `opts` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_replicate_options_init(opts: *mut bf_replicate_options) -> bf_result {
    boundary(|| {
        if opts.is_null() {
            return Err(error::null("opts"));
        }
        let d = default_options();
        // SAFETY: `opts` is not NULL and writable (forwarded contract).
        unsafe { write_opt(opts, d) };
        Ok(())
    })
}

/// The C callback as an engine observer.
struct CObserver {
    cb: unsafe extern "C" fn(*mut c_void, *const bf_event),
    userdata: *mut c_void,
    phase: Mutex<Phase>,
}

// SAFETY: the header documents that the callback is called on blockferry's threads, so the
// caller promises that `cb` may be called, with `userdata`, from any thread (one at a time:
// the engine delivers events in order from one thread at a time, and `phase` serialises).
unsafe impl Send for CObserver {}
// SAFETY: as above; the observer itself holds no unsynchronised state (`phase` is a mutex).
unsafe impl Sync for CObserver {}

fn phase_code(p: Phase) -> bf_phase {
    match p {
        Phase::Replicating => bf_phase::Replicating,
        Phase::Committing => bf_phase::Committing,
        Phase::Restoring => bf_phase::Restoring,
        Phase::Verifying => bf_phase::Verifying,
        Phase::Collecting => bf_phase::Collecting,
    }
}

impl Observer for CObserver {
    fn event(&self, e: &Event) {
        let mut phase = self
            .phase
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut ev = bf_event {
            kind: bf_event_kind::Progress,
            phase: phase_code(*phase),
            bytes_total: 0,
            bytes_done: 0,
            bytes_read: 0,
            bytes_zero: 0,
            bytes_deduplicated: 0,
            bytes_written: 0,
            bytes_skipped: 0,
            elapsed_seconds: 0.0,
            rate: 0.0,
            message: std::ptr::null(),
        };
        let text;
        match e {
            Event::Started {
                phase: p,
                bytes_total,
            } => {
                *phase = *p;
                ev.kind = bf_event_kind::Started;
                ev.phase = phase_code(*p);
                ev.bytes_total = *bytes_total;
            }
            Event::Progress(p) | Event::Finished(p) => {
                if matches!(e, Event::Finished(_)) {
                    ev.kind = bf_event_kind::Finished;
                }
                ev.bytes_total = p.bytes_total;
                ev.bytes_done = p.bytes_done;
                ev.bytes_read = p.bytes_read;
                ev.bytes_zero = p.bytes_zero;
                ev.bytes_deduplicated = p.bytes_deduplicated;
                ev.bytes_written = p.bytes_written;
                ev.bytes_skipped = p.bytes_skipped;
                ev.elapsed_seconds = p.elapsed.as_secs_f64();
                ev.rate = p.rate();
            }
            Event::Warning(w) => {
                ev.kind = bf_event_kind::Warning;
                text = std::ffi::CString::new(w.replace('\0', " ")).unwrap_or_default();
                ev.message = text.as_ptr();
            }
        }
        // SAFETY: `cb` is the caller's callback, callable from this thread with `userdata`
        // (the contract above); `ev` and `text` outlive the call.
        unsafe { (self.cb)(self.userdata, &raw const ev) };
        drop(phase);
    }
}

fn observer(cb: bf_progress_cb, userdata: *mut c_void) -> Box<dyn Observer> {
    match cb {
        Some(cb) => Box::new(CObserver {
            cb,
            userdata,
            phase: Mutex::new(Phase::Replicating),
        }),
        None => Box::new(blockferry::Silent),
    }
}

/// The token of an optional `bf_cancel`.
///
/// # Safety
/// `cancel` is NULL or a live flag.
unsafe fn token(cancel: *const bf_cancel) -> CancelToken {
    // SAFETY: forwarded contract.
    unsafe { opt_ref_arg(cancel) }.map_or_else(CancelToken::new, |c| c.token.clone())
}

fn copy_id(dst: &mut [c_char; 33], id: &str) {
    for (d, b) in dst.iter_mut().zip(id.bytes().take(32)) {
        *d = c_char::from_ne_bytes([b]);
    }
}

/// Copies `image` into the store as a new snapshot (a delta when `opts->base` is set).
///
/// Blocks until done; `cancel` (NULL: none) stops it from another thread with
/// `BF_RESULT_CANCELLED`, keeping what was made durable: running the same replication again
/// resumes. `progress` (NULL: none) is called with `userdata` on blockferry's threads.
/// `opts` NULL means the defaults. `report` (NULL: not wanted) is filled on success.
///
/// # Safety
/// `store` is a live store; `image` a NUL-terminated path; `opts` NULL or initialised by
/// `bf_replicate_options_init` with valid strings; `progress` callable from any thread with
/// `userdata`; `cancel` NULL or live; `report` NULL or writable.
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
        let o = ffi_arg!(opt_ref_arg(opts));
        let cancel = ffi_arg!(token(cancel));
        let d = default_options();
        let o = o.unwrap_or(&d);
        let name = ffi_arg!(opt_str_arg(o.name, "opts.name"))?;
        let disk = ffi_arg!(opt_str_arg(o.disk, "opts.disk"))?;
        let state_dir = ffi_arg!(opt_str_arg(o.state_dir, "opts.state_dir"))?;
        let base = ffi_arg!(opt_str_arg(o.base, "opts.base"))?;
        let changes = ffi_arg!(opt_str_arg(o.changes, "opts.changes"))?;
        let changes_format = ffi_arg!(opt_str_arg(o.changes_format, "opts.changes_format"))?;
        let change_id = ffi_arg!(opt_str_arg(o.change_id, "opts.change_id"))?;
        let io_engine = match o.io_engine {
            0 => blockferry::IoEngine::Pread,
            1 => blockferry::IoEngine::Auto,
            2 => blockferry::IoEngine::Uring,
            v => return Err(invalid(format!("opts.io_engine {v}: give 0, 1 or 2"))),
        };
        let open = OpenOptions {
            allow_outside_folder: o.allow_outside_folder,
            ova_disk: disk.map(str::to_owned),
            ..OpenOptions::default()
        };
        let source = blockferry::open_image_with(Path::new(image), &open)?;
        let request = DeltaRequest {
            base: base.map(BaseRef::parse),
            changes: changes
                .map(|c| {
                    changes_format
                        .map(ChangeFormat::from_name)
                        .transpose()
                        .map(|format| ChangeSource::from_name(c, format))
                })
                .transpose()?,
            verify_sample: o.verify_sample,
            change_id: change_id.map(str::to_owned),
        };
        let delta = request.resolve(source.as_ref())?;
        let job_state = if o.no_state {
            None
        } else {
            Some(match state_dir {
                Some(d) => d.into(),
                None => default_state_dir()?,
            })
        };
        let opts = ReplicateOptions {
            memory_budget: usize::try_from(o.memory_budget).unwrap_or(usize::MAX),
            workers: o.workers as usize,
            compression: o.compression,
            disk_name: name.map(str::to_owned),
            io_engine,
            io_depth: o.io_depth as usize,
            direct_io: o.direct,
            cancel,
            job_state,
            restart: o.restart,
            disk_selector: disk.unwrap_or_default().to_owned(),
            upload_jobs: o.upload_jobs as usize,
            part_size: usize::try_from(o.part_size).unwrap_or(usize::MAX),
            bwlimit: (o.bwlimit > 0).then_some(o.bwlimit),
            delta,
            change_id: change_id.map(str::to_owned),
            ..ReplicateOptions::default()
        };
        let observer = observer(progress, userdata);
        let r = blockferry::replicate(&store.store, source.as_ref(), &opts, observer.as_ref())?;
        let mut out = bf_replicate_report {
            snapshot: [0; 33],
            job: [0; 33],
            virtual_size: r.virtual_size,
            bytes_read: r.bytes_read,
            bytes_zero: r.bytes_zero,
            bytes_deduplicated: r.bytes_deduplicated,
            bytes_new: r.bytes_new,
            bytes_stored: r.bytes_stored,
            bytes_unchanged: r.bytes_unchanged,
            bytes_resumed: r.bytes_resumed,
            chunks_stored: r.chunks_stored,
            seconds: r.seconds,
            resumed: r.resumed,
        };
        copy_id(&mut out.snapshot, &r.snapshot);
        copy_id(&mut out.job, r.job.as_deref().unwrap_or_default());
        // SAFETY: forwarded contract.
        unsafe { write_opt(report, out) };
        Ok(())
    })
}

/// Writes snapshot `snapshot` (id, unique prefix or "latest") to `out`: a file, created
/// sparse, that appears under its name only once whole (`force` to replace an existing one),
/// or a block device (only with `force`: what it holds is overwritten). Blocks; `progress`,
/// `cancel` and `report` as for `bf_replicate`. `workers` 0 means one per core.
///
/// # Safety
/// `store` live; `snapshot` and `out` NUL-terminated; the rest as for `bf_replicate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_restore(
    store: *const bf_store,
    snapshot: *const c_char,
    out: *const c_char,
    force: bool,
    workers: u32,
    progress: bf_progress_cb,
    userdata: *mut c_void,
    cancel: *const bf_cancel,
    report: *mut bf_restore_report,
) -> bf_result {
    boundary(|| {
        let store = ffi_arg!(ref_arg(store, "store"))?;
        let snapshot = ffi_arg!(str_arg(snapshot, "snapshot"))?;
        let out = ffi_arg!(str_arg(out, "out"))?;
        let cancel = ffi_arg!(token(cancel));
        let opts = RestoreOptions {
            workers: workers as usize,
            force,
            salvage: false,
            cancel,
        };
        let observer = observer(progress, userdata);
        let r = blockferry::restore(
            &store.store,
            snapshot,
            Path::new(out),
            &opts,
            observer.as_ref(),
        )?;
        let rep = bf_restore_report {
            virtual_size: r.virtual_size,
            bytes_written: r.bytes_written,
            seconds: r.seconds,
        };
        // SAFETY: forwarded contract.
        unsafe { write_opt(report, rep) };
        Ok(())
    })
}

/// Checks every chunk of snapshot `snapshot` and, with `image` (NULL: none), compares it
/// with that image. Returns `BF_RESULT_VERIFY_MISMATCH` when problems were found (the last
/// error describes the first) and fills `report` then too.
///
/// # Safety
/// `store` live; `snapshot` NUL-terminated; `image` NULL or NUL-terminated; the rest as for
/// `bf_replicate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_verify(
    store: *const bf_store,
    snapshot: *const c_char,
    image: *const c_char,
    workers: u32,
    progress: bf_progress_cb,
    userdata: *mut c_void,
    cancel: *const bf_cancel,
    report: *mut bf_verify_report,
) -> bf_result {
    boundary(|| {
        let store = ffi_arg!(ref_arg(store, "store"))?;
        let snapshot = ffi_arg!(str_arg(snapshot, "snapshot"))?;
        let image = ffi_arg!(opt_str_arg(image, "image"))?;
        let cancel = ffi_arg!(token(cancel));
        let opts = VerifyOptions {
            image: image.map(Into::into),
            workers: workers as usize,
            cancel,
            ..VerifyOptions::default()
        };
        let observer = observer(progress, userdata);
        let r = blockferry::verify(&store.store, snapshot, &opts, observer.as_ref())?;
        let rep = bf_verify_report {
            ok: r.ok(),
            image_compared: r.image_compared,
            chunks_checked: r.chunks_checked,
            bytes_checked: r.bytes_checked,
            problems_total: r.problems_total,
            seconds: r.seconds,
        };
        // SAFETY: forwarded contract.
        unsafe { write_opt(report, rep) };
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

/// Writes an image's virtual disk to `out` as a sparse raw file that appears under its name
/// only once whole (or onto a block device, only with `force`).
///
/// # Safety
/// `image` and `out` NUL-terminated; the rest as for `bf_replicate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_convert(
    image: *const c_char,
    out: *const c_char,
    force: bool,
    progress: bf_progress_cb,
    userdata: *mut c_void,
    cancel: *const bf_cancel,
) -> bf_result {
    boundary(|| {
        let image = ffi_arg!(str_arg(image, "image"))?;
        let out = ffi_arg!(str_arg(out, "out"))?;
        let cancel = ffi_arg!(token(cancel));
        let src = blockferry::open_image(Path::new(image))?;
        let opts = ConvertOptions {
            force,
            cancel,
            ..ConvertOptions::default()
        };
        let observer = observer(progress, userdata);
        blockferry::convert(src.as_ref(), Path::new(out), &opts, observer.as_ref())?;
        Ok(())
    })
}

/// Forgets the snapshots a retention policy does not keep, per disk (all disks when `disk`
/// is NULL); `dry_run` only counts.
///
/// # Safety
/// `store` live; `disk` NULL or NUL-terminated; `report` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_store_prune(
    store: *const bf_store,
    keep_last: u32,
    keep_daily: u32,
    keep_weekly: u32,
    keep_monthly: u32,
    disk: *const c_char,
    dry_run: bool,
    report: *mut bf_prune_report,
) -> bf_result {
    boundary(|| {
        let store = ffi_arg!(ref_arg(store, "store"))?;
        let disk = ffi_arg!(opt_str_arg(disk, "disk"))?;
        let policy = blockferry::KeepPolicy {
            last: keep_last as usize,
            daily: keep_daily as usize,
            weekly: keep_weekly as usize,
            monthly: keep_monthly as usize,
        };
        let r = blockferry::prune(&store.store, &policy, disk, dry_run)?;
        let rep = bf_prune_report {
            kept: r.kept.len() as u64,
            forgotten: r.forgotten.len() as u64,
        };
        // SAFETY: forwarded contract.
        unsafe { write_opt(report, rep) };
        Ok(())
    })
}

/// Deletes what no snapshot references, repacking packs until at most `max_unused` (a
/// share, 0 to 1) of live bytes is unused; waits up to `wait_secs` for running
/// replications. `dry_run` changes nothing.
///
/// # Safety
/// `store` live; the rest as for `bf_replicate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_store_gc(
    store: *const bf_store,
    max_unused: f64,
    wait_secs: u32,
    dry_run: bool,
    progress: bf_progress_cb,
    userdata: *mut c_void,
    cancel: *const bf_cancel,
    report: *mut bf_gc_report,
) -> bf_result {
    boundary(|| {
        let store = ffi_arg!(ref_arg(store, "store"))?;
        let cancel = ffi_arg!(token(cancel));
        let opts = blockferry::GcOptions {
            max_unused,
            wait: std::time::Duration::from_secs(u64::from(wait_secs)),
            dry_run,
            cancel,
        };
        let observer = observer(progress, userdata);
        let r = blockferry::gc(&store.store, &opts, observer.as_ref())?;
        let rep = bf_gc_report {
            snapshots: r.snapshots as u64,
            chunks_live: r.chunks_live,
            chunks_missing: r.chunks_missing,
            packs_deleted: r.packs_deleted,
            packs_repacked: r.packs_repacked,
            bytes_before: r.bytes_before,
            bytes_after: r.bytes_after,
        };
        // SAFETY: forwarded contract.
        unsafe { write_opt(report, rep) };
        Ok(())
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> FfiResult<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Fail::Engine(blockferry::Error::internal(e.to_string())))
}

/// Writes JSON `value` to the caller's buffer (not truncated: `BF_RESULT_INSUFFICIENT_SIZE`
/// with `*out_n` the size needed).
///
/// # Safety
/// As [`write_text`].
unsafe fn write_json(
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
    value: &serde_json::Value,
) -> FfiResult {
    let text = value.to_string();
    // SAFETY: forwarded contract.
    unsafe { write_text(buf, len, out_n, &text, false) }
}

/// The store's snapshots as a JSON array (oldest first) in `buf`, NUL-terminated; `*out_n`
/// gets its length. If `len` is too small, nothing is written, `*out_n` is the length
/// needed (without the NUL) and `BF_RESULT_INSUFFICIENT_SIZE` is returned: call again with
/// a larger buffer. The same holds for every `_json` function.
///
/// # Safety
/// `store` live; `buf` NULL (with `len` 0) or writable for `len` bytes; `out_n` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_store_snapshots_json(
    store: *const bf_store,
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        let store = unsafe { ref_arg(store, "store")? };
        let (snaps, bad) = store.store.snapshots()?;
        if let Some(e) = bad.into_iter().next() {
            return Err(e.into());
        }
        let list: Vec<_> = snaps.iter().map(blockferry::Snapshot::summary).collect();
        // SAFETY: forwarded contract.
        unsafe { write_json(buf, len, out_n, &to_json(&list)?) }
    })
}

/// What an image is (format, sizes, allocation, chain) as a JSON object; see
/// `bf_store_snapshots_json` for the buffer rules.
///
/// # Safety
/// `path` NUL-terminated; buffer as for `bf_store_snapshots_json`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_image_info_json(
    path: *const c_char,
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        let path = unsafe { str_arg(path, "path")? };
        let src = blockferry::open_image(Path::new(path))?;
        // SAFETY: forwarded contract.
        unsafe {
            write_json(
                buf,
                len,
                out_n,
                &to_json(&blockferry::describe(src.as_ref()))?,
            )
        }
    })
}

/// An image's allocation map as a JSON array of `{"start","length","kind","offset"}`
/// (`kind`: data, zero, unallocated; neighbours merged); buffer rules as for
/// `bf_store_snapshots_json`.
///
/// # Safety
/// As `bf_image_info_json`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_image_map_json(
    path: *const c_char,
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        let path = unsafe { str_arg(path, "path")? };
        let src = blockferry::open_image(Path::new(path))?;
        let mut list = Vec::new();
        blockferry::for_each_extent(src.as_ref(), |m| -> blockferry::Result<()> {
            let (kind, offset) = match m.target {
                Target::Data { offset, .. } | Target::Deflate { offset, .. } => {
                    ("data", Some(offset))
                }
                Target::Zero => ("zero", None),
                Target::Unallocated => ("unallocated", None),
            };
            list.push(json!({"start": m.virt, "length": m.len, "kind": kind, "offset": offset}));
            Ok(())
        })?;
        // SAFETY: forwarded contract.
        unsafe { write_json(buf, len, out_n, &serde_json::Value::Array(list)) }
    })
}

/// The disk images under `folder` as a JSON array of `{"path","role","format",
/// "virtual_size","chain","error"}` (`role`: disk, parent, extent, unreadable); buffer rules
/// as for `bf_store_snapshots_json`.
///
/// # Safety
/// As `bf_image_info_json`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_discover_json(
    folder: *const c_char,
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        let folder = unsafe { str_arg(folder, "folder")? };
        let found = blockferry::discover(Path::new(folder), &OpenOptions::default())?;
        let list: Vec<_> = found
            .iter()
            .map(|f| {
                json!({
                    "path": f.path.to_string_lossy(),
                    "ova_disk": f.ova_disk,
                    "role": f.role.name(),
                    "format": f.format,
                    "subformat": f.subformat,
                    "virtual_size": f.virtual_size,
                    "chain": f.chain.iter().map(|l| l.path.to_string_lossy()).collect::<Vec<_>>(),
                    "error": f.error.as_ref().map(ToString::to_string),
                })
            })
            .collect();
        // SAFETY: forwarded contract.
        unsafe { write_json(buf, len, out_n, &serde_json::Value::Array(list)) }
    })
}

/// The replication jobs of the job database in `state_dir` (NULL: the default folder) as a
/// JSON array; buffer rules as for `bf_store_snapshots_json`.
///
/// # Safety
/// `state_dir` NULL or NUL-terminated; buffer as for `bf_store_snapshots_json`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_jobs_json(
    state_dir: *const c_char,
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        let dir = unsafe { opt_str_arg(state_dir, "state_dir")? };
        let dir = match dir {
            Some(d) => d.into(),
            None => default_state_dir()?,
        };
        let jobs = JobDb::open(&dir)?.list()?;
        let v = to_json(&jobs)?;
        // SAFETY: forwarded contract.
        unsafe { write_json(buf, len, out_n, &v) }
    })
}

/// Aborts an unfinished job's uploads in its store and forgets it (a finished job is just
/// forgotten); `job` is its id or a unique prefix.
///
/// # Safety
/// `job` NUL-terminated; `state_dir` NULL or NUL-terminated; `s3` NULL or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_abandon_job(
    job: *const c_char,
    state_dir: *const c_char,
    s3: *const bf_s3_options,
) -> bf_result {
    boundary(|| {
        let job = ffi_arg!(str_arg(job, "job"))?;
        let dir = ffi_arg!(opt_str_arg(state_dir, "state_dir"))?;
        let s3 = ffi_arg!(s3_options(s3))?;
        let dir = match dir {
            Some(d) => d.into(),
            None => default_state_dir()?,
        };
        JobDb::open(&dir)?.abandon_job(job, &s3)?;
        Ok(())
    })
}
