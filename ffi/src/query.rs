//! Queries answered as JSON in a caller's buffer: the shapes are the engine's (each
//! serialised by the engine's own `Serialize`), the same the CLI prints with `--json`.

use std::ffi::c_char;
use std::path::Path;

use blockferry::{JobDb, OpenOptions, default_state_dir};

use crate::bf_result;
use crate::error::{Fail, FfiResult, boundary};
use crate::handle::{opt_str_arg, ref_arg, str_arg, write_text};
use crate::store::bf_store;

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> FfiResult<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Fail::Engine(blockferry::Error::internal(e.to_string())))
}

/// Writes JSON `value` to the caller's buffer (not truncated: `BF_RESULT_INSUFFICIENT_SIZE`
/// with `*out_n` the size needed).
///
/// # Safety
/// As [`write_text`].
pub(crate) unsafe fn write_json(
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

/// An image's allocation map as a JSON array of `{"start","length","data","zero","kind",
/// "file","offset"}` (`kind`: data, zero, unallocated; neighbours merged), as `blockferry map
/// --json` prints it; buffer rules as for `bf_store_snapshots_json`.
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
            list.push(blockferry::MapRow::of(src.as_ref(), m));
            Ok(())
        })?;
        // SAFETY: forwarded contract.
        unsafe { write_json(buf, len, out_n, &to_json(&list)?) }
    })
}

/// The disk images under `folder` as a JSON array of `{"path","ova_disk","role","format",
/// "subformat","virtual_size","allocated_bytes","chain","error"}` (`role`: disk, parent,
/// extent, unreadable; `error`: `{"kind","message"}` or null), as `blockferry discover
/// --json` lists them; buffer rules as for `bf_store_snapshots_json`.
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
        // SAFETY: forwarded contract.
        unsafe { write_json(buf, len, out_n, &to_json(&found)?) }
    })
}

/// The virtual machines under `folder` (VMware `.vmx` with their `.vmsd` snapshots, OVF and
/// OVA, Hyper-V `.vmcx`) as a JSON array, as `blockferry discover --json` lists them under
/// `vms`: per VM `{"config","kind","system","name","id","cpus","memory_bytes","firmware",
/// "secure_boot","guest_os","encrypted","nics","disks","snapshots","warnings","error"}`,
/// each disk with its `slot`, `controller`, resolved `path`, `chain` and `problem`; buffer
/// rules as for `bf_store_snapshots_json`.
///
/// # Safety
/// As `bf_image_info_json`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_discover_vms_json(
    folder: *const c_char,
    buf: *mut c_char,
    len: usize,
    out_n: *mut usize,
) -> bf_result {
    boundary(|| {
        // SAFETY: forwarded contract.
        let folder = unsafe { str_arg(folder, "folder")? };
        let found = blockferry::discover_all(Path::new(folder), &OpenOptions::default())?;
        // SAFETY: forwarded contract.
        unsafe { write_json(buf, len, out_n, &to_json(&found.vms)?) }
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
