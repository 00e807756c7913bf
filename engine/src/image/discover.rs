//! Discovery: which disks a folder (a datastore, a Hyper-V VM folder, an export) holds, as this
//! engine reads them.
//!
//! Every file whose name says it is a disk image (`.vmdk`, `.vhdx`, `.avhdx`, `.vhd`, `.avhd`,
//! `.ova`, `.img`, `.raw`) is opened with its whole parent chain. Files that another image
//! uses (a parent of a snapshot chain, the extent of a descriptor) are reported with that role,
//! so the disks to replicate are the entries whose role is [`Role::Disk`]. A file that cannot
//! be opened is reported with its error rather than failing the walk.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::{BlockSource, Layer, OpenOptions, open_with, ova};
use crate::error::{Error, Result};
use crate::io::SourceFile;

/// How deep below the folder discovery looks.
pub const MAX_DEPTH: usize = 16;
/// Most files discovery opens, so that a huge tree cannot make it run without end.
pub const MAX_FILES: usize = 100_000;

/// File name endings that name disk images (compared in lower case).
const EXTENSIONS: [&str; 8] = ["vmdk", "vhdx", "avhdx", "vhd", "avhd", "ova", "img", "raw"];

/// What a discovered file is to the folder's disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A disk to replicate: no other image in the folder builds on it.
    Disk,
    /// The parent of another image's chain (a base disk under snapshots).
    Parent,
    /// A data file of another image (the flat or sparse extent of a VMDK descriptor).
    Extent,
    /// It could not be opened: see [`Found::error`].
    Unreadable,
}

impl Role {
    /// Lowercase name, for JSON and the bindings.
    pub fn name(self) -> &'static str {
        match self {
            Role::Disk => "disk",
            Role::Parent => "parent",
            Role::Extent => "extent",
            Role::Unreadable => "unreadable",
        }
    }
}

/// One discovered image file (or one disk of an OVA).
#[derive(Debug)]
pub struct Found {
    /// The file.
    pub path: PathBuf,
    /// For an OVA, which of its disks (its index, as `OpenOptions::ova_disk` takes it).
    pub ova_disk: Option<usize>,
    /// What it is to the folder's disks.
    pub role: Role,
    /// Format of the top file (`vmdk`, `vhdx`, …); empty when unreadable.
    pub format: &'static str,
    /// Subformat of the top file.
    pub subformat: String,
    /// Virtual size in bytes (0 when unreadable).
    pub virtual_size: u64,
    /// Bytes allocated in the whole chain.
    pub allocated_bytes: u64,
    /// The chain's files, top first (just this file when it has no parent).
    pub chain: Vec<Layer>,
    /// Why it could not be opened, for [`Role::Unreadable`].
    pub error: Option<Error>,
}

/// The one JSON shape of a discovered image (the CLI's `discover --json` lists these under
/// `images`; C and Python give the list): paths as text, the role by name, the chain as its
/// files, an error as its kind and message.
impl serde::Serialize for Found {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        #[derive(serde::Serialize)]
        struct ErrorJson {
            kind: String,
            message: String,
        }
        let mut m = s.serialize_struct("Found", 9)?;
        m.serialize_field("path", &self.path.display().to_string())?;
        m.serialize_field("ova_disk", &self.ova_disk)?;
        m.serialize_field("role", self.role.name())?;
        m.serialize_field("format", self.format)?;
        m.serialize_field("subformat", &self.subformat)?;
        m.serialize_field("virtual_size", &self.virtual_size)?;
        m.serialize_field("allocated_bytes", &self.allocated_bytes)?;
        let chain: Vec<String> = self
            .chain
            .iter()
            .map(|l| l.path.display().to_string())
            .collect();
        m.serialize_field("chain", &chain)?;
        m.serialize_field(
            "error",
            &self.error.as_ref().map(|e| ErrorJson {
                kind: format!("{:?}", e.kind()),
                message: e.to_string(),
            }),
        )?;
        m.end()
    }
}

/// Finds the disk images under `folder` (see the module docs), sorted by path.
///
/// Fails only when `folder` itself cannot be listed; unreadable images are entries.
pub fn discover(folder: &Path, opts: &OpenOptions) -> Result<Vec<Found>> {
    let meta = std::fs::metadata(folder)
        .map_err(|e| Error::io("cannot look into the folder", folder, e))?;
    if !meta.is_dir() {
        return Err(Error::config("discovery needs a folder").with_path(folder));
    }
    let mut files = files_with(folder, &EXTENSIONS)?;
    files.sort();

    let mut found = Vec::new();
    // Files other images use: parents (layers below the top) and data files.
    let mut parents: HashSet<PathBuf> = HashSet::new();
    let mut extents: HashSet<PathBuf> = HashSet::new();
    for path in files {
        if is_ova(&path) {
            found.extend(ova_disks(&path, opts));
            continue;
        }
        let (entry, files) = open_entry(&path, None, opts);
        let own = canonical(&path);
        for l in entry.chain.iter().skip(1) {
            parents.insert(canonical(&l.path));
        }
        extents.extend(files.iter().map(|f| canonical(f)).filter(|f| *f != own));
        found.push(entry);
    }
    for f in &mut found {
        if f.role != Role::Disk || f.ova_disk.is_some() {
            continue;
        }
        let c = canonical(&f.path);
        if parents.contains(&c) {
            f.role = Role::Parent;
        } else if extents.contains(&c) {
            f.role = Role::Extent;
        }
    }
    // A VMDK extent that fails alone (a flat extent reads as raw, but a sparse extent's
    // grains need its descriptor) is still just an extent when a descriptor uses it.
    for f in &mut found {
        if f.role == Role::Unreadable && extents.contains(&canonical(&f.path)) {
            f.role = Role::Extent;
            f.error = None;
        }
    }
    Ok(found)
}

/// The files under `folder` (at most [`MAX_DEPTH`] deep, at most [`MAX_FILES`]) whose name
/// ends with one of `extensions` (lower case, compared without case).
pub(crate) fn files_with(folder: &Path, extensions: &[&str]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    walk(folder, 0, extensions, &mut files)?;
    Ok(files)
}

fn walk(dir: &Path, depth: usize, extensions: &[&str], out: &mut Vec<PathBuf>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io("cannot list the folder", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list the folder", dir, e))?;
        // Symbolic links to folders are not followed (no loops); links to files are.
        let ft = entry
            .file_type()
            .map_err(|e| Error::io("cannot look at", &entry.path(), e))?;
        let path = entry.path();
        if ft.is_dir() {
            if depth + 1 < MAX_DEPTH {
                walk(&path, depth + 1, extensions, out)?;
            }
        } else if has_extension(&path, extensions) && path.is_file() {
            if out.len() >= MAX_FILES {
                return Err(Error::config(format!(
                    "more than {MAX_FILES} image or configuration files under the folder; \
                     discover a smaller one"
                ))
                .with_path(dir));
            }
            out.push(path);
        }
    }
    Ok(())
}

fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.contains(&e.to_ascii_lowercase().as_str()))
}

pub(crate) fn is_ova(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("ova"))
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The entry for one image, and the files it reads (its extents and parents' files).
fn open_entry(path: &Path, ova_disk: Option<usize>, opts: &OpenOptions) -> (Found, Vec<PathBuf>) {
    let opts = OpenOptions {
        ova_disk: ova_disk.map(|i| i.to_string()),
        ..opts.clone()
    };
    match open_with(path, &opts) {
        Ok(src) => {
            let files = (0..src.n_files())
                .filter_map(|i| src.file(i).map(|f| f.path().to_path_buf()))
                .collect();
            (describe(path, ova_disk, src.as_ref()), files)
        }
        Err(e) => (unreadable(path, ova_disk, e), Vec::new()),
    }
}

fn unreadable(path: &Path, ova_disk: Option<usize>, error: Error) -> Found {
    Found {
        path: path.to_path_buf(),
        ova_disk,
        role: Role::Unreadable,
        format: "",
        subformat: String::new(),
        virtual_size: 0,
        allocated_bytes: 0,
        chain: Vec::new(),
        error: Some(error),
    }
}

fn describe(path: &Path, ova_disk: Option<usize>, src: &dyn BlockSource) -> Found {
    let info = src.info();
    let chain = src.layers();
    Found {
        path: path.to_path_buf(),
        ova_disk,
        role: Role::Disk,
        format: chain.first().map_or(info.format, |l| l.format),
        subformat: chain
            .first()
            .map_or_else(|| info.subformat.clone(), |l| l.subformat.clone()),
        virtual_size: info.virtual_size,
        allocated_bytes: info.allocated_bytes,
        chain,
        error: None,
    }
}

/// One entry per disk of an OVA (or one unreadable entry).
fn ova_disks(path: &Path, opts: &OpenOptions) -> Vec<Found> {
    match SourceFile::open(path).and_then(|f| ova::disks(&f)) {
        Ok(disks) => (0..disks.len())
            .map(|i| open_entry(path, Some(i), opts).0)
            .collect(),
        Err(e) => vec![unreadable(path, None, e)],
    }
}
