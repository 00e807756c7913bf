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

/// Most extents an [`ExtentBuilder`] keeps (16 MiB of them); a list with more disjoint ranges
/// is rounded out to coarser boundaries until it fits.
pub(crate) const MAX_LIST_EXTENTS: usize = 1 << 20;
/// The first boundary a list is rounded out to when it has too many extents: the smallest
/// chunk size, so that rounding to it changes no chunk a delta reads.
const FIRST_GRANULARITY: u64 = 64 << 10;

/// Builds an [`ExtentSet`] from ranges in any order in bounded memory: ranges are coalesced as
/// they come, and should the set grow past `cap` disjoint extents, every extent is rounded
/// out to a boundary (64 KiB, then doubling) until it fits. Rounding out only makes a delta
/// read more (what it reads is compared by chunk id), never miss a change.
#[derive(Debug)]
pub(crate) struct ExtentBuilder {
    limit: u64,
    cap: usize,
    extents: Vec<Extent>,
    /// Whether `extents` is sorted and coalesced.
    sorted: bool,
    /// 1 while exact; the boundary ranges are rounded out to once coarsened.
    granularity: u64,
    /// Ranges added so far (the next one's index, for messages).
    added: u64,
}

impl ExtentBuilder {
    /// A builder for ranges within `[0, limit)`, keeping at most `cap` extents.
    pub(crate) fn new(limit: u64, cap: usize) -> ExtentBuilder {
        ExtentBuilder {
            limit,
            cap: cap.max(1),
            extents: Vec::new(),
            sorted: true,
            granularity: 1,
            added: 0,
        }
    }

    /// Adds `[offset, offset + len)`; a zero-length range is ignored. A range reaching past
    /// the limit is an error naming it by its position among the ranges added.
    pub(crate) fn add(&mut self, offset: u64, len: u64) -> Result<()> {
        let i = self.added;
        self.added += 1;
        if len == 0 {
            return Ok(());
        }
        let end = offset.checked_add(len).filter(|&e| e <= self.limit);
        let Some(end) = end else {
            return Err(Error::new(
                ErrorKind::InvalidChangeList,
                format!(
                    "extent {i} (offset {offset}, length {len}) ends past the disk's end \
                     ({} bytes)",
                    self.limit
                ),
            ));
        };
        let e = self.round(Extent {
            offset,
            len: end - offset,
        });
        match self.extents.last_mut() {
            // In order: coalesce with the last one, or append.
            Some(last) if self.sorted && e.offset >= last.offset => {
                if e.offset <= last.end() {
                    last.len = last.end().max(e.end()) - last.offset;
                } else {
                    self.extents.push(e);
                }
            }
            None => self.extents.push(e),
            Some(_) => {
                self.extents.push(e);
                self.sorted = false;
            }
        }
        // At 2 × cap, before the vector would grow past that (it holds at most 2 × cap).
        if self.extents.len() >= 2 * self.cap || (self.sorted && self.extents.len() > self.cap) {
            self.compact();
        }
        Ok(())
    }

    /// `e` rounded out to the builder's boundary (and kept within the limit).
    fn round(&self, e: Extent) -> Extent {
        if self.granularity == 1 {
            return e;
        }
        let start = e.offset / self.granularity * self.granularity;
        let end = e
            .end()
            .div_ceil(self.granularity)
            .saturating_mul(self.granularity)
            .min(self.limit);
        Extent {
            offset: start,
            len: end - start,
        }
    }

    /// Sorts and coalesces; coarsens while there are more extents than the cap.
    fn compact(&mut self) {
        if !self.sorted {
            self.extents.sort_unstable();
            self.extents = coalesce(std::mem::take(&mut self.extents));
            self.sorted = true;
        }
        while self.extents.len() > self.cap {
            self.granularity = (self.granularity * 2).max(FIRST_GRANULARITY);
            let rounded: Vec<Extent> = self.extents.iter().map(|&e| self.round(e)).collect();
            self.extents = coalesce(rounded);
        }
        self.extents.shrink_to(2 * self.cap);
    }

    /// The boundary ranges were rounded out to, if the list had to be coarsened (else 1).
    pub(crate) fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The set.
    pub(crate) fn finish(mut self) -> ExtentSet {
        self.compact();
        ExtentSet {
            extents: self.extents,
        }
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
