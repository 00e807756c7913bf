//! A child image joined to its parent: what the child leaves unallocated comes from the parent.

use super::{BlockSource, Identity, ImageInfo, Layer, Mapping, Target};
use crate::error::Result;
use crate::io::SourceFile;
use crate::store::SourceFingerprint;

/// A child over its parent (which may itself be a chain). Files are numbered child first.
#[derive(Debug)]
pub(crate) struct Chain {
    child: Box<dyn BlockSource>,
    parent: Box<dyn BlockSource>,
    info: ImageInfo,
}

/// Virtual bytes mapped per step when summing what a chain allocates.
const SUM_STEP: u64 = 1 << 30;

impl Chain {
    /// Joins `child` to `parent` (same virtual size, identity already checked by the caller).
    pub(crate) fn new(child: Box<dyn BlockSource>, parent: Box<dyn BlockSource>) -> Result<Chain> {
        let mut chain = Chain {
            info: child.info().clone(),
            child,
            parent,
        };
        chain.info.allocated_bytes = chain.sum_data()?;
        Ok(chain)
    }

    fn sum_data(&self) -> Result<u64> {
        let size = self.info.virtual_size;
        let mut maps = Vec::new();
        let mut total = 0;
        let mut off = 0;
        while off < size {
            let len = SUM_STEP.min(size - off);
            maps.clear();
            self.map(off, len, &mut maps)?;
            total += maps
                .iter()
                .filter(|m| m.target.is_data())
                .map(|m| m.len)
                .sum::<u64>();
            off += len;
        }
        Ok(total)
    }
}

impl BlockSource for Chain {
    fn info(&self) -> &ImageInfo {
        &self.info
    }

    fn n_files(&self) -> usize {
        self.child.n_files() + self.parent.n_files()
    }

    fn file(&self, idx: usize) -> Option<&SourceFile> {
        let n = self.child.n_files();
        if idx < n {
            self.child.file(idx)
        } else {
            self.parent.file(idx - n)
        }
    }

    fn map(&self, offset: u64, len: u64, out: &mut Vec<Mapping>) -> Result<()> {
        let mut own = Vec::new();
        self.child.map(offset, len, &mut own)?;
        let shift = self.child.n_files();
        for m in own {
            if m.target == Target::Unallocated {
                let start = out.len();
                self.parent.map(m.virt, m.len, out)?;
                for p in &mut out[start..] {
                    if let Some(file) = p.target.file_mut() {
                        *file += shift;
                    }
                }
            } else {
                out.push(m);
            }
        }
        Ok(())
    }

    fn opened_path(&self) -> Option<&std::path::Path> {
        self.child.opened_path()
    }

    fn member(&self) -> Option<&str> {
        self.child.member()
    }

    fn fingerprint(&self) -> &SourceFingerprint {
        self.child.fingerprint()
    }

    fn layers(&self) -> Vec<Layer> {
        let mut layers = self.child.layers();
        layers.extend(self.parent.layers());
        layers
    }

    fn identity(&self) -> Option<Identity> {
        self.child.identity()
    }

    fn top_layer(&self) -> Option<&dyn BlockSource> {
        Some(self.child.as_ref())
    }
}
