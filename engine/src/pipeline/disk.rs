//! Which disk of the store a replication writes: its name, unique per source.

use std::path::{Component, Path};

use crate::error::{Error, ErrorKind, Result};
use crate::image::BlockSource;
use crate::store::{SourceIdentity, Store};

/// The identity of a source: the file it was opened from, absolute with links resolved (a
/// VMDK's descriptor, an OVA), and which of its disks (an OVA member).
pub(crate) fn source_identity(source: &dyn BlockSource) -> SourceIdentity {
    let canonical = |p: &Path| {
        std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    let layers = source.layers();
    SourceIdentity {
        path: canonical(source.opened_path().unwrap_or(Path::new(""))),
        member: source.member().map(str::to_owned),
        base: (layers.len() > 1)
            .then(|| layers.last().map(|l| canonical(&l.path)))
            .flatten(),
    }
}

/// Names a source may go by, shortest first: its file name, then with more and more of the
/// folders above it (`vm1/disk.vmdk`, `ds1/vm1/disk.vmdk`, …), an OVA member's name after
/// the archive's (`vm.ova/disk1.vmdk`).
fn default_names(id: &SourceIdentity) -> Vec<String> {
    let parts: Vec<String> = Path::new(&id.path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    let mut out: Vec<String> = (1..=parts.len())
        .map(|k| parts[parts.len() - k..].join("/"))
        .collect();
    if out.is_empty() {
        out.push("disk".to_owned());
    }
    if let Some(m) = &id.member {
        for n in &mut out {
            n.push('/');
            n.push_str(m);
        }
    }
    out
}

/// The name a replication of `source` records: `explicit` if given (an error if another
/// source owns it, unless `same_disk` says this is that disk at another path: moved, or a
/// copy or export of it), else the shortest of [`default_names`] that is free or already
/// this source's, so that a source keeps its name and two sources never share one.
pub(crate) fn resolve_name(
    store: &Store,
    source: &dyn BlockSource,
    explicit: Option<&str>,
    same_disk: bool,
) -> Result<(String, SourceIdentity)> {
    let ours = source_identity(source);
    if let Some(name) = explicit {
        if name.is_empty() || name.len() > 1024 || name.contains('\0') {
            return Err(Error::config(
                "a disk name is 1 to 1024 characters, without NUL",
            ));
        }
        let history = store.disk_history(name)?;
        if same_disk || store.may_use_name(&history, &ours)? {
            return Ok((name.to_owned(), ours));
        }
        let owner = store
            .owner_of(&history)?
            .map_or_else(String::new, |(o, _)| o.describe());
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "the store's disk {name:?} is another source's ({owner}), not {}: choose \
                 another name, or, if this is that disk at another path (moved, or a copy or \
                 export of it), say it is the same disk (same_disk)",
                ours.describe()
            ),
        )
        .with_setting("same_disk"));
    }
    for name in default_names(&ours) {
        let history = store.disk_history(&name)?;
        if store.may_use_name(&history, &ours)? {
            return Ok((name, ours));
        }
    }
    Err(Error::config(format!(
        "every name derived from {} is another source's in the store: give the disk a name",
        ours.describe()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_grow_from_the_file_name() {
        let id = SourceIdentity {
            path: "/vmfs/volumes/ds1/web/web.vmdk".into(),
            member: None,
            base: None,
        };
        assert_eq!(
            default_names(&id),
            [
                "web.vmdk",
                "web/web.vmdk",
                "ds1/web/web.vmdk",
                "volumes/ds1/web/web.vmdk",
                "vmfs/volumes/ds1/web/web.vmdk"
            ]
        );
        let ova = SourceIdentity {
            path: "/exports/app.ova".into(),
            member: Some("disk2.vmdk".into()),
            base: None,
        };
        assert_eq!(
            default_names(&ova),
            ["app.ova/disk2.vmdk", "exports/app.ova/disk2.vmdk"]
        );
    }
}
