//! `blockferry._native`: the engine as a Python extension module (pyo3, abi3).
//!
//! Thin by rule: arguments are converted, the engine is called, results come back as plain
//! dicts and lists that the pure-Python package (`python/blockferry`) turns into typed
//! objects. Long operations run as a [`task::Task`] on their own thread with the GIL
//! released; errors map to the `blockferry.Error` classes in [`errors`].

// pyo3 extracts arguments as owned values; a signature of references is not on offer.
#![allow(clippy::needless_pass_by_value)]

mod convert;
mod errors;
mod task;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockferry::GcOptions;
use blockferry::KeepPolicy;
use blockferry::OpenOptions;
use blockferry::{BaseRef, ChangeSource, DeltaRequest, SyncChanges, SyncRequest};
use blockferry::{
    CancelToken, ConvertOptions, InitOptions, Phase, ReplicateOptions, RestoreOptions,
    VerifyOptions,
};
use blockferry::{ChangeFormat, ChangeList};
use blockferry::{JobDb, default_state_dir};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde_json::json;

use convert::{s3_options, seconds, to_py};
use errors::{ToPyResult, config_error};
use task::Task;

/// The version of the engine.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn open_options(disk: Option<String>, allow_outside_folder: bool) -> OpenOptions {
    OpenOptions {
        allow_outside_folder,
        ova_disk: disk,
        ..OpenOptions::default()
    }
}

/// The names of every engine error kind (what `blockferry.Error.kind` takes).
#[pyfunction]
fn error_kinds() -> Vec<&'static str> {
    blockferry::ErrorKind::ALL
        .iter()
        .map(|k| errors::kind_name(*k))
        .collect()
}

/// What an image is: format, sizes, notes and its chain of files (top first).
#[pyfunction]
#[pyo3(signature = (path, *, disk=None, allow_outside_folder=false))]
fn image_info(
    py: Python<'_>,
    path: PathBuf,
    disk: Option<String>,
    allow_outside_folder: bool,
) -> PyResult<Py<PyAny>> {
    let opts = open_options(disk, allow_outside_folder);
    let info = py
        .detach(|| -> blockferry::Result<blockferry::Description> {
            Ok(blockferry::describe(
                blockferry::open_image_with(&path, &opts)?.as_ref(),
            ))
        })
        .py_err(py)?;
    let mut info = serde_json::to_value(info).map_err(|e| config_error(e.to_string()))?;
    info["file"] = json!(path.to_string_lossy());
    convert::json_to_py(py, &info)
}

/// The allocation map as `(start, length, kind, file, offset)` tuples, neighbours merged;
/// `kind` is `data`, `zero` or `unallocated`.
#[pyfunction]
#[pyo3(signature = (path, *, disk=None, allow_outside_folder=false))]
fn image_map(
    py: Python<'_>,
    path: PathBuf,
    disk: Option<String>,
    allow_outside_folder: bool,
) -> PyResult<Py<PyList>> {
    type Row = (u64, u64, &'static str, Option<String>, Option<u64>);
    let opts = open_options(disk, allow_outside_folder);
    let rows = py
        .detach(|| -> blockferry::Result<Vec<Row>> {
            let src = blockferry::open_image_with(&path, &opts)?;
            let mut rows = Vec::new();
            blockferry::for_each_extent(src.as_ref(), |m| -> blockferry::Result<()> {
                let r = blockferry::MapRow::of(src.as_ref(), m);
                rows.push((r.start, r.length, r.kind, r.file, r.offset));
                Ok(())
            })?;
            Ok(rows)
        })
        .py_err(py)?;
    Ok(PyList::new(py, rows)?.unbind())
}

fn change_format(name: Option<&str>) -> blockferry::Result<Option<ChangeFormat>> {
    name.map(ChangeFormat::from_name).transpose()
}

fn change_list_json(list: &ChangeList) -> serde_json::Value {
    json!({
        "format": list.format.name(),
        "base_change_id": list.base_change_id,
        "new_change_id": list.new_change_id,
        "extents": list.extents.iter().map(|e| [e.offset, e.len]).collect::<Vec<_>>(),
        "bytes": list.extents.bytes(),
    })
}

/// Parses a change list (a file at `path`, or `data`) of a disk of `disk_size` bytes.
#[pyfunction]
#[pyo3(signature = (disk_size, *, path=None, data=None, format=None))]
fn parse_changes(
    py: Python<'_>,
    disk_size: u64,
    path: Option<PathBuf>,
    data: Option<Vec<u8>>,
    format: Option<String>,
) -> PyResult<Py<PyAny>> {
    let list = read_changes(
        path.as_deref(),
        data.as_deref(),
        format.as_deref(),
        disk_size,
    )
    .py_err(py)?;
    convert::json_to_py(py, &change_list_json(&list))
}

fn read_changes(
    path: Option<&Path>,
    data: Option<&[u8]>,
    format: Option<&str>,
    disk_size: u64,
) -> blockferry::Result<ChangeList> {
    let format = change_format(format)?;
    match (path, data) {
        (Some(p), None) => ChangeList::read(p, format, disk_size),
        (None, Some(d)) => ChangeList::parse(d, format, disk_size),
        _ => Err(blockferry::Error::config(
            "give a change list as a path or as data, not both",
        )),
    }
}

/// The disk images under a folder, as dicts (`role` tells disks from parents, extents and
/// unreadable files).
#[pyfunction]
#[pyo3(signature = (folder, *, allow_outside_folder=false))]
fn discover(py: Python<'_>, folder: PathBuf, allow_outside_folder: bool) -> PyResult<Py<PyAny>> {
    let opts = open_options(None, allow_outside_folder);
    let found = py
        .detach(|| blockferry::discover(&folder, &opts))
        .py_err(py)?;
    // The engine's shape (`blockferry discover --json`), with the error as the exception
    // it would raise.
    let list = PyList::empty(py);
    for f in &found {
        let d = convert::to_py(py, f)?;
        if let Some(e) = &f.error {
            d.bind(py)
                .set_item("error", errors::to_py(py, e).into_value(py))?;
        }
        list.append(d)?;
    }
    Ok(list.into_any().unbind())
}

/// The virtual machines under a folder (`.vmx`, OVF and OVA, `.vmcx`), as dicts: the
/// engine's shape (`blockferry discover --json`, its `vms`), an unreadable configuration's
/// error as the exception it would raise.
#[pyfunction]
#[pyo3(signature = (folder, *, allow_outside_folder=false))]
fn discover_vms(
    py: Python<'_>,
    folder: PathBuf,
    allow_outside_folder: bool,
) -> PyResult<Py<PyAny>> {
    let opts = open_options(None, allow_outside_folder);
    let found = py
        .detach(|| blockferry::discover_all(&folder, &opts))
        .py_err(py)?;
    let list = PyList::empty(py);
    for vm in &found.vms {
        let d = convert::to_py(py, vm)?;
        if let Some(e) = &vm.error {
            d.bind(py)
                .set_item("error", errors::to_py(py, e).into_value(py))?;
        }
        list.append(d)?;
    }
    Ok(list.into_any().unbind())
}

/// Guest inspection of an image (`blockferry inspect IMAGE --json`'s shape).
#[pyfunction]
#[pyo3(signature = (path, *, disk=None, allow_outside_folder=false))]
fn inspect_image(
    py: Python<'_>,
    path: PathBuf,
    disk: Option<String>,
    allow_outside_folder: bool,
) -> PyResult<Py<PyAny>> {
    let opts = open_options(disk, allow_outside_folder);
    let found = py
        .detach(|| blockferry::inspect_image(&path, &opts))
        .py_err(py)?;
    convert::to_py(py, &found)
}

/// Readiness validation of a VM or an image for a target (`blockferry validate --json`'s
/// shape); with a store, its free space is checked too.
#[pyfunction]
#[pyo3(signature = (path, *, target, store=None, allow_outside_folder=false))]
fn validate(
    py: Python<'_>,
    path: PathBuf,
    target: &str,
    store: Option<&Store>,
    allow_outside_folder: bool,
) -> PyResult<Py<PyAny>> {
    let target = blockferry::ImportTarget::from_name(target).py_err(py)?;
    let req = blockferry::ValidateRequest {
        target,
        store: store.map(|s| s.store.clone()),
        open: open_options(None, allow_outside_folder),
    };
    let v = py.detach(|| blockferry::validate(&path, &req)).py_err(py)?;
    convert::to_py(py, &v)
}

fn state_dir(dir: Option<PathBuf>) -> blockferry::Result<PathBuf> {
    dir.map_or_else(default_state_dir, Ok)
}

/// Where job state lives by default (`BLOCKFERRY_STATE_DIR`, else the XDG state folder).
#[pyfunction(name = "default_state_dir")]
fn py_default_state_dir(py: Python<'_>) -> PyResult<PathBuf> {
    default_state_dir().py_err(py)
}

/// The replication jobs of a job database.
#[pyfunction]
#[pyo3(signature = (*, state_dir=None))]
fn jobs(py: Python<'_>, state_dir: Option<PathBuf>) -> PyResult<Py<PyAny>> {
    let list = py
        .detach(|| JobDb::open(&self::state_dir(state_dir)?)?.list())
        .py_err(py)?;
    to_py(py, &list)
}

/// Aborts an unfinished job's uploads and forgets it (a finished one is just forgotten).
#[pyfunction]
#[pyo3(signature = (job, *, state_dir=None, s3=None))]
fn abandon_job(
    py: Python<'_>,
    job: String,
    state_dir: Option<PathBuf>,
    s3: Option<&Bound<'_, PyDict>>,
) -> PyResult<Py<PyAny>> {
    let s3 = s3_options(s3)?;
    let record = py
        .detach(|| JobDb::open(&self::state_dir(state_dir)?)?.abandon_job(&job, &s3))
        .py_err(py)?;
    to_py(py, &record)
}

/// Runs an image conversion to a sparse raw file in the background.
#[pyfunction]
#[pyo3(signature = (image, out, *, disk=None, allow_outside_folder=false, force=false, workers=0, progress=None, progress_interval=0.5))]
#[allow(clippy::too_many_arguments)] // the keyword arguments of the Python call
fn start_convert(
    image: PathBuf,
    out: PathBuf,
    disk: Option<String>,
    allow_outside_folder: bool,
    force: bool,
    workers: usize,
    progress: Option<Py<PyAny>>,
    progress_interval: f64,
) -> PyResult<Task> {
    let interval = seconds("progress_interval", progress_interval)?;
    let cancel = CancelToken::new();
    let opts = ConvertOptions {
        workers,
        force,
        cancel: cancel.clone(),
        ..ConvertOptions::default()
    };
    let open = open_options(disk, allow_outside_folder);
    Task::start(
        "convert",
        Phase::Restoring,
        cancel,
        progress,
        interval,
        move |obs| {
            let src = blockferry::open_image_with(&image, &open)?;
            let report = blockferry::convert(src.as_ref(), &out, &opts, obs)?;
            Ok(serde_json::to_value(&report).unwrap_or_default())
        },
    )
}

/// A continuous replication of one disk: the engine's `ContinuousReplication`.
#[pyclass(frozen, module = "blockferry._native")]
struct SyncRun {
    store: Arc<blockferry::Store>,
    sync: Arc<std::sync::Mutex<blockferry::ContinuousReplication>>,
}

impl std::fmt::Debug for SyncRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncRun").finish_non_exhaustive()
    }
}

impl SyncRun {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, blockferry::ContinuousReplication>> {
        self.sync
            .try_lock()
            .map_err(|_| config_error("a cycle of this sync is running"))
    }
}

#[pymethods]
impl SyncRun {
    /// The disk's name in the store.
    #[getter]
    fn disk(&self) -> PyResult<String> {
        Ok(self.lock()?.disk().to_owned())
    }

    /// Where the replication stands: `cycle`, `lag_seconds`, `last_success_unix_ms`.
    fn status(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let status = self.lock()?.status();
        to_py(py, &status)
    }

    /// The base of the next cycle: `snapshot`, `change_id`, `disk_size`.
    fn base(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let sync = self.lock()?;
        let store = &self.store;
        let base = py.detach(|| sync.base(store)).py_err(py)?;
        to_py(py, &base)
    }

    /// Counts a cycle that failed before it ran (its change source failed).
    fn fail_cycle(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let status = self.lock()?.fail_cycle();
        to_py(py, &status)
    }

    /// Starts the next cycle; `changes_data` is its list when the sync's lists are given.
    #[pyo3(signature = (changes_data=None, progress=None, progress_interval=0.5))]
    fn start_cycle(
        &self,
        changes_data: Option<Vec<u8>>,
        progress: Option<Py<PyAny>>,
        progress_interval: f64,
    ) -> PyResult<Task> {
        let interval = seconds("progress_interval", progress_interval)?;
        drop(self.lock()?); // Refused at once while another cycle runs.
        let cancel = CancelToken::new();
        let (store, sync) = (Arc::clone(&self.store), Arc::clone(&self.sync));
        let token = cancel.clone();
        Task::start(
            "sync",
            Phase::Replicating,
            cancel,
            progress,
            interval,
            move |obs| {
                let mut sync = sync
                    .lock()
                    .map_err(|_| blockferry::Error::internal("a cycle panicked"))?;
                let cycle = sync.cycle(&store, changes_data.as_deref(), &token, obs)?;
                Ok(serde_json::to_value(&cycle).unwrap_or_default())
            },
        )
    }
}

/// An open store.
#[pyclass(frozen, module = "blockferry._native")]
struct Store {
    store: Arc<blockferry::Store>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.store.location())
            .finish()
    }
}

/// How a replication finds what changed since its base.
/// The delta a replication asks for, as the engine takes it.
fn delta_request(
    base: Option<String>,
    changes: ChangesArg,
    verify_sample: f64,
    change_id: Option<String>,
) -> blockferry::Result<DeltaRequest> {
    let changes = match changes {
        ChangesArg::None => None,
        ChangesArg::Hash => Some(ChangeSource::Hash),
        ChangesArg::Chain => Some(ChangeSource::Chain),
        ChangesArg::Path(path, f) => Some(ChangeSource::File {
            path,
            format: change_format(f.as_deref())?,
        }),
        ChangesArg::Data(bytes, f) => Some(ChangeSource::Data {
            bytes,
            format: change_format(f.as_deref())?,
        }),
    };
    Ok(DeltaRequest {
        base: base.as_deref().map(BaseRef::parse),
        changes,
        verify_sample,
        change_id,
    })
}

enum ChangesArg {
    None,
    Hash,
    Chain,
    Path(PathBuf, Option<String>),
    Data(Vec<u8>, Option<String>),
}

#[pymethods]
impl Store {
    /// Creates a store at `location` (a folder or `s3://BUCKET/PREFIX`); encrypted with
    /// `passphrase` unless it is None. Returns the new store's configuration.
    #[staticmethod]
    #[pyo3(signature = (location, *, passphrase, chunk_size=blockferry::DEFAULT_CHUNK_SIZE, s3=None, state_dir=None))]
    fn init(
        py: Python<'_>,
        location: String,
        passphrase: Option<Vec<u8>>,
        chunk_size: u32,
        s3: Option<&Bound<'_, PyDict>>,
        state_dir: Option<PathBuf>,
    ) -> PyResult<Py<PyAny>> {
        let s3 = s3_options(s3)?;
        let c = py
            .detach(|| {
                let opts = InitOptions {
                    chunk_size,
                    passphrase,
                };
                opts.check()?;
                let backend = blockferry::open_backend(&location, true, &s3)?;
                blockferry::Store::init_client(backend.as_ref(), &opts, state_dir.as_deref())
            })
            .py_err(py)?;
        convert::to_py(py, &blockferry::StoreSummary::new(&location, &c))
    }

    /// Opens the store at `location`, unlocking it with `passphrase`.
    #[staticmethod]
    #[pyo3(signature = (location, *, passphrase=None, s3=None, state_dir=None))]
    fn open(
        py: Python<'_>,
        location: String,
        passphrase: Option<Vec<u8>>,
        s3: Option<&Bound<'_, PyDict>>,
        state_dir: Option<PathBuf>,
    ) -> PyResult<Store> {
        let s3 = s3_options(s3)?;
        let store = py
            .detach(|| {
                let backend = blockferry::open_backend(&location, false, &s3)?;
                blockferry::Store::open_client(backend, passphrase.as_deref(), state_dir.as_deref())
            })
            .py_err(py)?;
        Ok(Store {
            store: Arc::new(store),
        })
    }

    /// The store's configuration.
    fn config(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        convert::to_py(py, &self.store.summary())
    }

    /// Starts a continuous replication of `image` (cycles run with `SyncRun.start_cycle`).
    /// `changes` is `hash` or `chain`; or lists come from `changes_dir`, or are given to each
    /// cycle (`changes_given`).
    #[pyo3(signature = (
        image, *, changes=None, changes_dir=None, changes_given=false, changes_format=None,
        name=None, disk=None, allow_outside_folder=false, verify_sample=0.01, workers=0,
        memory_budget=0, bwlimit=None, state_dir=None, no_state=false
    ))]
    #[allow(clippy::too_many_arguments, clippy::fn_params_excessive_bools)]
    fn start_sync(
        &self,
        py: Python<'_>,
        image: PathBuf,
        changes: Option<String>,
        changes_dir: Option<PathBuf>,
        changes_given: bool,
        changes_format: Option<String>,
        name: Option<String>,
        disk: Option<String>,
        allow_outside_folder: bool,
        verify_sample: f64,
        workers: usize,
        memory_budget: usize,
        bwlimit: Option<u64>,
        state_dir: Option<PathBuf>,
        no_state: bool,
    ) -> PyResult<SyncRun> {
        let format = change_format(changes_format.as_deref()).py_err(py)?;
        let given = [changes.is_some(), changes_dir.is_some(), changes_given];
        let changes = match (changes.as_deref(), changes_dir) {
            _ if given.iter().filter(|g| **g).count() != 1 => {
                return Err(config_error(
                    "a sync takes one source of changes: hash, chain, a folder of dropped \
                     lists, or a list given to each cycle",
                ));
            }
            (Some("hash"), _) => SyncChanges::Hash,
            (Some("chain"), _) => SyncChanges::Chain,
            (Some(other), _) => {
                return Err(config_error(format!(
                    "changes {other:?}: a sync takes \"hash\" or \"chain\" (lists come from \
                     a folder or are given to each cycle)"
                )));
            }
            (None, Some(dir)) => SyncChanges::Folder { dir, format },
            (None, None) => SyncChanges::Given { format },
        };
        let job_state = if no_state {
            None
        } else {
            Some(self::state_dir(state_dir).py_err(py)?)
        };
        let request = SyncRequest {
            image,
            open: open_options(disk, allow_outside_folder),
            name,
            changes,
            verify_sample,
            replicate: ReplicateOptions {
                workers,
                memory_budget,
                bwlimit,
                job_state,
                ..ReplicateOptions::default()
            },
        };
        let store = Arc::clone(&self.store);
        let sync = py
            .detach(|| blockferry::ContinuousReplication::new(&store, request))
            .py_err(py)?;
        Ok(SyncRun {
            store,
            sync: Arc::new(std::sync::Mutex::new(sync)),
        })
    }

    /// The snapshots (oldest first) and the errors of those that could not be read.
    fn snapshots(&self, py: Python<'_>) -> PyResult<(Py<PyAny>, Vec<Py<PyAny>>)> {
        let store = &self.store;
        let (snaps, bad) = py.detach(|| store.snapshots()).py_err(py)?;
        let list: Vec<_> = snaps.iter().map(blockferry::Snapshot::summary).collect();
        let errors = bad
            .iter()
            .map(|e| errors::to_py(py, e).into_value(py).into_any())
            .collect();
        Ok((to_py(py, &list)?, errors))
    }

    /// Guest inspection of a snapshot (`blockferry inspect --store S SNAP --json`'s shape).
    fn inspect(&self, py: Python<'_>, spec: &str) -> PyResult<Py<PyAny>> {
        let store = &self.store;
        let found = py
            .detach(|| blockferry::inspect_snapshot(store, spec, &blockferry::Silent))
            .py_err(py)?;
        to_py(py, &found)
    }

    /// One snapshot: an id, a unique id prefix, or `latest`.
    fn snapshot(&self, py: Python<'_>, spec: &str) -> PyResult<Py<PyAny>> {
        let store = &self.store;
        let s = py.detach(|| store.snapshot(spec)).py_err(py)?;
        to_py(py, &s.summary())
    }

    /// Forgets the snapshots a retention policy does not keep (per disk).
    #[pyo3(signature = (*, keep_last=0, keep_daily=0, keep_weekly=0, keep_monthly=0, disk=None, dry_run=false))]
    #[allow(clippy::too_many_arguments)] // the keyword arguments of the Python call
    fn prune(
        &self,
        py: Python<'_>,
        keep_last: usize,
        keep_daily: usize,
        keep_weekly: usize,
        keep_monthly: usize,
        disk: Option<String>,
        dry_run: bool,
    ) -> PyResult<Py<PyAny>> {
        let policy = KeepPolicy {
            last: keep_last,
            daily: keep_daily,
            weekly: keep_weekly,
            monthly: keep_monthly,
        };
        let store = &self.store;
        let r = py
            .detach(|| blockferry::prune(store, &policy, disk.as_deref(), dry_run))
            .py_err(py)?;
        to_py(py, &r)
    }

    /// Aborts the multipart uploads stopped jobs left in this store.
    #[pyo3(signature = (*, older_than=86400.0, dry_run=false, state_dir=None, include_stopped_jobs=false))]
    fn cleanup(
        &self,
        py: Python<'_>,
        older_than: f64,
        dry_run: bool,
        state_dir: Option<PathBuf>,
        include_stopped_jobs: bool,
    ) -> PyResult<Py<PyAny>> {
        let older_than = seconds("older_than", older_than)?;
        let store = &self.store;
        let r = py
            .detach(|| {
                JobDb::open(&self::state_dir(state_dir)?)?.cleanup_uploads(
                    store.backend(),
                    older_than,
                    include_stopped_jobs,
                    dry_run,
                )
            })
            .py_err(py)?;
        to_py(py, &r)
    }

    /// Starts a replication of `image` into the store (see the Python `Store.replicate`).
    #[pyo3(signature = (
        image, *, disk=None, name=None, same_disk=false, wait=0.0, allow_outside_folder=false, workers=0,
        compression=true, memory_budget=0, io_engine="pread", io_depth=0, direct=false,
        upload_jobs=0, part_size=0, bwlimit=None, base=None, changes=None,
        changes_data=None, changes_format=None, changes_hash=false, changes_from_chain=false,
        change_id=None, verify_sample=0.01, state_dir=None, no_state=false, restart=false,
        progress=None, progress_interval=0.5
    ))]
    #[allow(clippy::too_many_arguments, clippy::fn_params_excessive_bools)]
    fn start_replicate(
        &self,
        py: Python<'_>,
        image: PathBuf,
        disk: Option<String>,
        name: Option<String>,
        same_disk: bool,
        wait: f64,
        allow_outside_folder: bool,
        workers: usize,
        compression: bool,
        memory_budget: usize,
        io_engine: &str,
        io_depth: usize,
        direct: bool,
        upload_jobs: usize,
        part_size: usize,
        bwlimit: Option<u64>,
        base: Option<String>,
        changes: Option<PathBuf>,
        changes_data: Option<Vec<u8>>,
        changes_format: Option<String>,
        changes_hash: bool,
        changes_from_chain: bool,
        change_id: Option<String>,
        verify_sample: f64,
        state_dir: Option<PathBuf>,
        no_state: bool,
        restart: bool,
        progress: Option<Py<PyAny>>,
        progress_interval: f64,
    ) -> PyResult<Task> {
        let interval = seconds("progress_interval", progress_interval)?;
        let wait = seconds("wait", wait)?;
        let io_engine = blockferry::IoEngine::from_name(io_engine).ok_or_else(|| {
            config_error(format!(
                "io_engine {io_engine:?}: give auto, uring or pread"
            ))
        })?;
        let given = [
            changes.is_some(),
            changes_data.is_some(),
            changes_hash,
            changes_from_chain,
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(config_error(
                "give one source of changes: a change list (path or data), hash, or the chain",
            ));
        }
        let changes_arg = match (changes, changes_data) {
            (Some(p), _) => ChangesArg::Path(p, changes_format),
            (None, Some(d)) => ChangesArg::Data(d, changes_format),
            (None, None) if changes_hash => ChangesArg::Hash,
            (None, None) if changes_from_chain => ChangesArg::Chain,
            (None, None) => ChangesArg::None,
        };
        let request = delta_request(base, changes_arg, verify_sample, change_id.clone())
            .map_err(|e| errors::to_py(py, &e))?;
        let cancel = CancelToken::new();
        let job_state = if no_state {
            None
        } else {
            Some(self::state_dir(state_dir).py_err(py)?)
        };
        let mut opts = ReplicateOptions {
            memory_budget,
            workers,
            compression,
            disk_name: name,
            same_disk,
            wait,
            io_engine,
            io_depth,
            direct_io: direct,
            cancel: cancel.clone(),
            job_state,
            restart,
            disk_selector: disk.clone().unwrap_or_default(),
            upload_jobs,
            part_size,
            bwlimit,
            change_id: change_id.clone(),
            ..ReplicateOptions::default()
        };
        let open = open_options(disk, allow_outside_folder);
        let store = Arc::clone(&self.store);
        Task::start(
            "replicate",
            Phase::Replicating,
            cancel,
            progress,
            interval,
            move |obs| {
                let src = blockferry::open_image_with(&image, &open)?;
                opts.delta = request.resolve(src.as_ref())?;
                let report = blockferry::replicate(&store, src.as_ref(), &opts, obs)?;
                Ok(serde_json::to_value(&report).unwrap_or_default())
            },
        )
    }

    /// Starts writing snapshot `snapshot` out to `out` (a sparse file or a block device).
    #[pyo3(signature = (snapshot, out, *, force=false, salvage=false, workers=0, progress=None, progress_interval=0.5))]
    #[allow(clippy::too_many_arguments)] // the keyword arguments of the Python call
    fn start_restore(
        &self,
        snapshot: String,
        out: PathBuf,
        force: bool,
        salvage: bool,
        workers: usize,
        progress: Option<Py<PyAny>>,
        progress_interval: f64,
    ) -> PyResult<Task> {
        let interval = seconds("progress_interval", progress_interval)?;
        let cancel = CancelToken::new();
        let opts = RestoreOptions {
            workers,
            force,
            salvage,
            cancel: cancel.clone(),
        };
        let store = Arc::clone(&self.store);
        Task::start(
            "restore",
            Phase::Restoring,
            cancel,
            progress,
            interval,
            move |obs| {
                let r = blockferry::restore(&store, &snapshot, &out, &opts, obs)?;
                Ok(serde_json::to_value(&r).unwrap_or_default())
            },
        )
    }

    /// Starts writing snapshot `snapshot` out to `out` as an image in `format`.
    #[pyo3(signature = (snapshot, out, *, format, force=false, workers=0, memory_budget=0, jobs=0, part_size=0, base_export=None, incremental=false, progress=None, progress_interval=0.5))]
    #[allow(clippy::too_many_arguments)] // the keyword arguments of the Python call
    fn start_export(
        &self,
        py: Python<'_>,
        snapshot: String,
        out: PathBuf,
        format: &str,
        force: bool,
        workers: usize,
        memory_budget: usize,
        jobs: usize,
        part_size: usize,
        base_export: Option<String>,
        incremental: bool,
        progress: Option<Py<PyAny>>,
        progress_interval: f64,
    ) -> PyResult<Task> {
        let interval = seconds("progress_interval", progress_interval)?;
        let format =
            blockferry::ExportFormat::from_name(format).map_err(|e| errors::to_py(py, &e))?;
        let cancel = CancelToken::new();
        let opts = blockferry::ExportOptions {
            format,
            workers,
            force,
            cancel: cancel.clone(),
            memory_budget,
            upload_jobs: jobs,
            part_size,
            base_export,
            incremental,
            ..blockferry::ExportOptions::default()
        };
        let store = Arc::clone(&self.store);
        Task::start(
            "export",
            Phase::Restoring,
            cancel,
            progress,
            interval,
            move |obs| {
                let r = blockferry::export(&store, &snapshot, &out, &opts, obs)?;
                Ok(serde_json::to_value(&r).unwrap_or_default())
            },
        )
    }

    /// Starts a cutover of the live source `image` to `to` (see `blockferry cutover`).
    #[pyo3(signature = (image, *, to, max_downtime, format="raw", now=false, interval=5.0, max_cycles=100, pre_hook=None, post_hook=None, rollback_hook=None, hook_timeout=120.0, changes="hash", name=None, verify_sample=0.01, state_dir=None, progress=None, progress_interval=0.5))]
    #[allow(clippy::too_many_arguments)] // the keyword arguments of the Python call
    fn start_cutover(
        &self,
        py: Python<'_>,
        image: PathBuf,
        to: String,
        max_downtime: f64,
        format: &str,
        now: bool,
        interval: f64,
        max_cycles: u64,
        pre_hook: Option<String>,
        post_hook: Option<String>,
        rollback_hook: Option<String>,
        hook_timeout: f64,
        changes: &str,
        name: Option<String>,
        verify_sample: f64,
        state_dir: Option<PathBuf>,
        progress: Option<Py<PyAny>>,
        progress_interval: f64,
    ) -> PyResult<Task> {
        let interval_events = seconds("progress_interval", progress_interval)?;
        let changes = match changes {
            "hash" => blockferry::SyncChanges::Hash,
            "chain" => blockferry::SyncChanges::Chain,
            other => {
                let e = blockferry::Error::config(format!("changes {other:?}: hash or chain"))
                    .with_setting("changes");
                return Err(errors::to_py(py, &e));
            }
        };
        let format =
            blockferry::ExportFormat::from_name(format).map_err(|e| errors::to_py(py, &e))?;
        let cancel = CancelToken::new();
        let request = blockferry::CutoverRequest {
            sync: blockferry::SyncRequest {
                image,
                open: blockferry::OpenOptions::default(),
                name,
                changes,
                verify_sample: 0.0,
                replicate: ReplicateOptions {
                    job_state: Some(self::state_dir(state_dir).py_err(py)?),
                    cancel: cancel.clone(),
                    ..ReplicateOptions::default()
                },
            },
            max_downtime: seconds("max_downtime", max_downtime)?,
            now,
            interval: seconds("interval", interval)?,
            max_cycles: max_cycles.max(1),
            pre_hook,
            post_hook,
            rollback_hook,
            hook_timeout: seconds("hook_timeout", hook_timeout)?,
            to,
            format,
            export: blockferry::ExportOptions::default(),
            boot_test: None,
            verify_sample,
            cancel: cancel.clone(),
        };
        let store = Arc::clone(&self.store);
        Task::start(
            "cutover",
            Phase::Replicating,
            cancel,
            progress,
            interval_events,
            move |obs| {
                let report = blockferry::cutover(&store, &request, obs)?;
                Ok(serde_json::to_value(&report).unwrap_or_default())
            },
        )
    }

    /// Starts checking snapshot `snapshot` (and comparing it with `image`, if given).
    #[pyo3(signature = (snapshot, *, image=None, disk=None, allow_outside_folder=false, workers=0, progress=None, progress_interval=0.5))]
    #[allow(clippy::too_many_arguments)] // the keyword arguments of the Python call
    fn start_verify(
        &self,
        snapshot: String,
        image: Option<PathBuf>,
        disk: Option<String>,
        allow_outside_folder: bool,
        workers: usize,
        progress: Option<Py<PyAny>>,
        progress_interval: f64,
    ) -> PyResult<Task> {
        let interval = seconds("progress_interval", progress_interval)?;
        let cancel = CancelToken::new();
        let opts = VerifyOptions {
            image,
            ova_disk: disk,
            allow_outside_folder,
            workers,
            cancel: cancel.clone(),
            ..VerifyOptions::default()
        };
        let store = Arc::clone(&self.store);
        Task::start(
            "verify",
            Phase::Verifying,
            cancel,
            progress,
            interval,
            move |obs| {
                let r = blockferry::verify(&store, &snapshot, &opts, obs)?;
                let mut v = serde_json::to_value(&r).unwrap_or_default();
                v["ok"] = json!(r.ok());
                Ok(v)
            },
        )
    }

    /// Starts a garbage collection (see the Python `Store.gc`).
    #[pyo3(signature = (*, max_unused=0.05, wait=1800.0, dry_run=false, progress=None, progress_interval=0.5))]
    fn start_gc(
        &self,
        max_unused: f64,
        wait: f64,
        dry_run: bool,
        progress: Option<Py<PyAny>>,
        progress_interval: f64,
    ) -> PyResult<Task> {
        let interval = seconds("progress_interval", progress_interval)?;
        let cancel = CancelToken::new();
        let opts = GcOptions {
            max_unused,
            wait: seconds("wait", wait)?,
            dry_run,
            cancel: cancel.clone(),
        };
        let store = Arc::clone(&self.store);
        Task::start(
            "gc",
            Phase::Collecting,
            cancel,
            progress,
            interval,
            move |obs| {
                let r = blockferry::gc(&store, &opts, obs)?;
                Ok(serde_json::to_value(&r).unwrap_or_default())
            },
        )
    }

    fn __repr__(&self) -> String {
        format!("<blockferry store {}>", self.store.location())
    }
}

/// The native part of the `blockferry` package.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(error_kinds, m)?)?;
    m.add_function(wrap_pyfunction!(image_info, m)?)?;
    m.add_function(wrap_pyfunction!(image_map, m)?)?;
    m.add_function(wrap_pyfunction!(parse_changes, m)?)?;
    m.add_function(wrap_pyfunction!(discover, m)?)?;
    m.add_function(wrap_pyfunction!(discover_vms, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_image, m)?)?;
    m.add_function(wrap_pyfunction!(validate, m)?)?;
    m.add_function(wrap_pyfunction!(py_default_state_dir, m)?)?;
    m.add_function(wrap_pyfunction!(jobs, m)?)?;
    m.add_function(wrap_pyfunction!(abandon_job, m)?)?;
    m.add_function(wrap_pyfunction!(start_convert, m)?)?;
    m.add_class::<Store>()?;
    m.add_class::<SyncRun>()?;
    m.add_class::<Task>()?;
    m.add_class::<task::Waker>()?;
    Ok(())
}
