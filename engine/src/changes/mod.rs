//! What changed on a disk: extent sets and the change lists hypervisors produce.
//!
//! An [`ExtentSet`] is a set of byte ranges kept sorted, disjoint and coalesced. A
//! [`ChangeList`] is what a change-tracking source said (VMware CBT, Hyper-V RCT, a plain
//! extent list), parsed from untrusted text by [`ChangeList::parse`] and checked against the
//! disk it claims to describe.

mod parse;

pub use parse::{ChangeFormat, ChangeList, MAX_LIST_BYTES};

use crate::error::{Error, ErrorKind, Result};

/// A byte range `[offset, offset + len)`, `len > 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Byte ranges, sorted, disjoint and coalesced (no two touch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentSet {
    extents: Vec<Extent>,
}

impl ExtentSet {
    /// The empty set.
    pub fn new() -> ExtentSet {
        ExtentSet::default()
    }

    /// The set `[0, size)`.
    pub fn whole(size: u64) -> ExtentSet {
        let mut s = ExtentSet::new();
        if size > 0 {
            s.extents.push(Extent {
                offset: 0,
                len: size,
            });
        }
        s
    }

    /// Builds a set from ranges in any order, overlapping or touching; zero-length ranges are
    /// dropped. Every range must lie within `[0, limit)`; the error names the first that does
    /// not (by its position in `ranges`).
    pub fn from_ranges(
        ranges: impl IntoIterator<Item = (u64, u64)>,
        limit: u64,
    ) -> Result<ExtentSet> {
        let mut extents = Vec::new();
        for (i, (offset, len)) in ranges.into_iter().enumerate() {
            if len == 0 {
                continue;
            }
            let end = offset.checked_add(len).filter(|&e| e <= limit);
            if end.is_none() {
                return Err(Error::new(
                    ErrorKind::InvalidChangeList,
                    format!(
                        "extent {i} (offset {offset}, length {len}) ends past the disk's end \
                         ({limit} bytes)"
                    ),
                ));
            }
            extents.push(Extent { offset, len });
        }
        extents.sort_unstable();
        Ok(ExtentSet {
            extents: coalesce(extents),
        })
    }

    /// The ranges, in order.
    pub fn iter(&self) -> impl Iterator<Item = Extent> + '_ {
        self.extents.iter().copied()
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Bytes in the set.
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// The union of two sets.
    #[must_use]
    pub fn union(&self, other: &ExtentSet) -> ExtentSet {
        let mut all = Vec::with_capacity(self.extents.len() + other.extents.len());
        let (mut a, mut b) = (
            self.extents.iter().peekable(),
            other.extents.iter().peekable(),
        );
        // Merge two sorted lists, then coalesce.
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x <= y => a.next(),
                (Some(_) | None, Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, None) => break,
            };
            all.extend(next.copied());
        }
        ExtentSet {
            extents: coalesce(all),
        }
    }

    /// The bytes of `[0, size)` not in the set.
    #[must_use]
    pub fn complement(&self, size: u64) -> ExtentSet {
        let mut out = Vec::new();
        let mut at = 0u64;
        for e in &self.extents {
            if e.offset >= size {
                break;
            }
            if e.offset > at {
                out.push(Extent {
                    offset: at,
                    len: e.offset - at,
                });
            }
            at = at.max(e.end());
        }
        if at < size {
            out.push(Extent {
                offset: at,
                len: size - at,
            });
        }
        ExtentSet { extents: out }
    }

    /// Whether any byte of `[offset, offset + len)` is in the set.
    pub fn intersects(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        // The first extent ending after `offset`.
        let i = self.extents.partition_point(|e| e.end() <= offset);
        self.extents.get(i).is_some_and(|e| e.offset < end)
    }

    /// The chunk positions (of `chunk_size` bytes) the set touches, as sorted, disjoint,
    /// coalesced ranges of positions: every byte of the set rounded out to whole chunks.
    pub fn chunk_ranges(&self, chunk_size: u64) -> Vec<std::ops::Range<u64>> {
        assert!(chunk_size > 0, "chunk size is positive");
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        for e in &self.extents {
            let first = e.offset / chunk_size;
            let last = (e.end() - 1) / chunk_size;
            match out.last_mut() {
                Some(r) if r.end >= first => r.end = r.end.max(last + 1),
                _ => out.push(first..last + 1),
            }
        }
        out
    }
}

/// Coalesces sorted extents: overlapping or touching ones become one.
fn coalesce(sorted: Vec<Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(sorted.len());
    for e in sorted {
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => {
                let end = last.end().max(e.end());
                last.len = end - last.offset;
            }
            _ => out.push(e),
        }
    }
    out
}

#[cfg(test)]
mod tests;
