//! Change-list parsers. Every input is untrusted: sizes are capped before reading, numbers
//! must be non-negative integers, every range must lie within the disk, and a list that does
//! not cover the whole disk (one `QueryChangedDiskAreas` call of several) is refused, since
//! it would make a snapshot that silently misses changes.

use std::io::Read;
use std::path::Path;

use serde::Deserialize;

use super::{Extent, ExtentBuilder, ExtentSet, MAX_LIST_EXTENTS};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{BlockSource, Target};

/// Longest change list read, in bytes.
pub const MAX_LIST_BYTES: u64 = 128 << 20;

/// The kinds of change lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeFormat {
    /// VMware `QueryChangedDiskAreas` results: one `DiskChangeInfo` or an array of them.
    VmwareCbt,
    /// Hyper-V `GetVirtualDiskChanges` results: `ChangedByteOffsets` / `ChangedByteLengths`.
    HypervRct,
    /// `offset,length` per line, or a JSON array of `[offset, length]` / objects.
    Extents,
    /// What the child of a snapshot chain allocates (VMDK delta, VHDX/VHD differencing).
    Chain,
}

impl ChangeFormat {
    /// The format's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ChangeFormat::VmwareCbt => "vmware-cbt",
            ChangeFormat::HypervRct => "hyperv-rct",
            ChangeFormat::Extents => "extents",
            ChangeFormat::Chain => "chain",
        }
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Result<ChangeFormat> {
        match name {
            "vmware-cbt" | "cbt" => Ok(ChangeFormat::VmwareCbt),
            "hyperv-rct" | "rct" => Ok(ChangeFormat::HypervRct),
            "extents" => Ok(ChangeFormat::Extents),
            _ => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "unknown change-list format {name:?}: give vmware-cbt, hyperv-rct or extents"
                ),
            )),
        }
    }
}

/// A parsed change list, checked against the disk it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeList {
    /// What kind of list it was.
    pub format: ChangeFormat,
    /// The change id the list was taken against (VMware `changeId`, Hyper-V `TargetRctId`);
    /// `*` means the list names every allocated area, not changes.
    pub base_change_id: Option<String>,
    /// The source's change id now, if the list carries it (`newChangeId`, `NewRctId`): the
    /// snapshot records it so that the next delta can be checked against it.
    pub new_change_id: Option<String>,
    /// The bytes the list names.
    pub extents: ExtentSet,
}

impl ChangeList {
    /// Whether the list names every allocated area (VMware `changeId` `*`) rather than what
    /// changed since a base.
    pub fn all_allocated(&self) -> bool {
        self.base_change_id.as_deref() == Some("*")
    }

    /// A list of changed byte ranges (offset, length) a caller holds, taken against
    /// `base_change_id`, checked against the disk like a parsed list.
    pub fn from_ranges(
        ranges: &[(u64, u64)],
        base_change_id: Option<String>,
        new_change_id: Option<String>,
        disk_size: u64,
    ) -> Result<ChangeList> {
        let mut set = builder(disk_size);
        for (i, &(offset, len)) in ranges.iter().enumerate() {
            set.add(offset, len)
                .map_err(|e| invalid(format!("range {i} ({offset}, {len}): {}", e.message())))?;
        }
        Ok(ChangeList {
            format: ChangeFormat::Extents,
            base_change_id,
            new_change_id,
            extents: finish(set),
        })
    }

    /// Reads a change list from a file (at most [`MAX_LIST_BYTES`]); `format` `None` detects it.
    /// A regular file is parsed as a stream (read again for each window of a long Hyper-V
    /// list), so memory does not grow with the list's length.
    pub fn read(path: &Path, format: Option<ChangeFormat>, disk_size: u64) -> Result<ChangeList> {
        let meta =
            std::fs::metadata(path).map_err(|e| Error::io("opening the change list", path, e))?;
        if !meta.is_file() {
            // A pipe or a device: read once, whole (capped).
            let file = std::fs::File::open(path)
                .map_err(|e| Error::io("opening the change list", path, e))?;
            let mut text = Vec::new();
            file.take(MAX_LIST_BYTES + 1)
                .read_to_end(&mut text)
                .map_err(|e| Error::io("reading the change list", path, e))?;
            return ChangeList::parse(&text, format, disk_size).map_err(|e| e.with_path(path));
        }
        if meta.len() > MAX_LIST_BYTES {
            return Err(too_large().with_path(path));
        }
        parse_input(Input::File(path), format, disk_size).map_err(|e| e.with_path(path))
    }

    /// Parses a change list of a disk of `disk_size` bytes; `format` `None` detects it.
    pub fn parse(text: &[u8], format: Option<ChangeFormat>, disk_size: u64) -> Result<ChangeList> {
        if text.len() as u64 > MAX_LIST_BYTES {
            return Err(too_large());
        }
        parse_input(Input::Bytes(text), format, disk_size)
    }
}

fn too_large() -> Error {
    invalid(format!(
        "change list larger than {} MiB",
        MAX_LIST_BYTES >> 20
    ))
}

fn parse_input(
    input: Input<'_>,
    format: Option<ChangeFormat>,
    disk_size: u64,
) -> Result<ChangeList> {
    let format = match format {
        Some(f) => f,
        None => detect(&input.head()?),
    };
    match format {
        ChangeFormat::VmwareCbt => parse_cbt(input, disk_size),
        ChangeFormat::HypervRct => parse_rct(input, disk_size),
        ChangeFormat::Extents | ChangeFormat::Chain => parse_extents(input, disk_size),
    }
}

/// Where a list's bytes are; a parser may read them more than once.
#[derive(Clone, Copy)]
enum Input<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

impl<'a> Input<'a> {
    fn reader(self) -> Result<Box<dyn std::io::BufRead + 'a>> {
        Ok(match self {
            Input::Bytes(b) => Box::new(b),
            Input::File(p) => Box::new(std::io::BufReader::with_capacity(
                256 << 10,
                std::fs::File::open(p).map_err(|e| Error::io("opening the change list", p, e))?,
            )),
        })
    }

    /// The first 64 KiB, to tell the format.
    fn head(self) -> Result<Vec<u8>> {
        let mut head = Vec::new();
        self.reader()?
            .take(64 << 10)
            .read_to_end(&mut head)
            .map_err(|e| Error::new(ErrorKind::Io, "reading the change list").with_source(e))?;
        Ok(head)
    }

    /// The first byte that is not white space.
    fn first(self) -> Result<Option<u8>> {
        Ok(self.head()?.into_iter().find(|b| !b.is_ascii_whitespace()))
    }
}

impl ChangeList {
    /// The change set of a snapshot chain: every range the top image (the child) allocates,
    /// data or zero, changed since its parent was taken. The list's base change id is the
    /// parent identity the child records, its new one the child's own identity.
    pub fn from_chain(source: &dyn BlockSource) -> Result<ChangeList> {
        let Some(top) = source.top_layer() else {
            return Err(invalid(
                "taking the changes from the snapshot chain needs a child image (a VMDK snapshot \
                 delta or a VHDX/VHD differencing disk) joined to its parent",
            )
            .with_setting("changes"));
        };
        let size = source.info().virtual_size;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut maps = Vec::new();
        let mut at = 0;
        while at < size {
            let len = CHAIN_STEP.min(size - at);
            maps.clear();
            top.map(at, len, &mut maps)?;
            let mut off = at;
            for m in &maps {
                if !matches!(m.target, Target::Unallocated) {
                    match ranges.last_mut() {
                        Some((o, l)) if *o + *l == off => *l += m.len,
                        _ => ranges.push((off, m.len)),
                    }
                }
                off += m.len;
            }
            at += len;
        }
        Ok(ChangeList {
            format: ChangeFormat::Chain,
            base_change_id: top.parent_link().map(|l| l.identity.change_id()),
            new_change_id: top.identity().map(|i| i.change_id()),
            extents: ExtentSet::from_ranges(ranges, size)?,
        })
    }
}

/// Virtual bytes mapped per step when deriving a chain's change set.
const CHAIN_STEP: u64 = 1 << 30;

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidChangeList, message)
}

/// The format of a list by its content: JSON naming CBT or RCT fields, else extents.
fn detect(head: &[u8]) -> ChangeFormat {
    let has = |needle: &str| {
        head.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    };
    let json = head
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| matches!(b, b'{' | b'['));
    if json && has("\"changedByteOffsets\"") {
        ChangeFormat::HypervRct
    } else if json && (has("\"changedArea\"") || has("\"startOffset\"")) {
        ChangeFormat::VmwareCbt
    } else {
        ChangeFormat::Extents
    }
}

/// Keeps the one id every part of a list names (or none); a part naming another is an error.
#[derive(Default)]
struct Agreed(Option<String>);

impl Agreed {
    fn add(&mut self, id: Option<String>, what: &str) -> std::result::Result<(), String> {
        match (&self.0, id) {
            (Some(o), Some(id)) if *o != id => Err(format!(
                "the list's parts name different {what}s ({o:?} and {id:?})"
            )),
            (None, Some(id)) => {
                self.0 = Some(id);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// The set of a list's ranges, built as they are parsed (see [`ExtentBuilder`]).
fn builder(disk_size: u64) -> ExtentBuilder {
    ExtentBuilder::new(disk_size, MAX_LIST_EXTENTS)
}

/// The set a builder made, saying so if the list had to be rounded out.
fn finish(b: ExtentBuilder) -> ExtentSet {
    let granularity = b.granularity();
    let set = b.finish();
    if granularity > 1 {
        tracing::warn!(
            extents = set.len(),
            "the change list names more than {MAX_LIST_EXTENTS} separate ranges: rounded out \
             to {granularity}-byte boundaries (a delta reads a little more, misses nothing)"
        );
    }
    set
}

/// Checks that the ranges the list's parts cover span the whole disk.
fn check_coverage(covered: ExtentBuilder, disk_size: u64, how: &str) -> Result<()> {
    // A coverage set that had to be rounded out had a gap somewhere (tiling parts coalesce).
    let exact = covered.granularity() == 1;
    let set = covered.finish();
    let missing = set.complement(disk_size);
    if let Some(Extent { offset, len }) = missing.iter().next() {
        return Err(invalid(format!(
            "the list covers only {} of the disk's {disk_size} bytes (bytes {offset}..{} are \
             not covered): {how}",
            set.bytes(),
            offset + len
        )));
    }
    if !exact {
        return Err(invalid(format!(
            "the list's parts leave gaps between them: {how}"
        )));
    }
    Ok(())
}

/// The ranges a call covered, kept within the disk (the part past it is not the disk's).
fn cover(covered: &mut ExtentBuilder, offset: u64, len: u64, disk_size: u64) -> Result<()> {
    let end = offset.saturating_add(len).min(disk_size);
    if offset < end {
        covered.add(offset, end - offset)?;
    }
    Ok(())
}

/// Runs `visit` on a list that is one JSON object or an array of them, as a stream: nothing
/// of it is held but what `visit` keeps. `visit` gets each object's index.
fn objects<V>(input: Input<'_>, what: &str, visit: V) -> Result<u64>
where
    V: FnMut(u64, &mut dyn erased::Map) -> std::result::Result<(), String>,
{
    let array = input.first()? == Some(b'[');
    erased::objects(input.reader()?, array, visit)
        .map_err(|e| invalid(format!("not a valid {what}: {e}")))
}

#[derive(Deserialize)]
struct CbtArea {
    #[serde(alias = "Start")]
    start: u64,
    #[serde(alias = "Length")]
    length: u64,
}

fn parse_cbt(input: Input<'_>, disk_size: u64) -> Result<ChangeList> {
    let mut set = builder(disk_size);
    let mut covered = ExtentBuilder::new(disk_size, MAX_LIST_EXTENTS);
    let (mut base, mut new) = (Agreed::default(), Agreed::default());
    let n = objects(input, "VMware DiskChangeInfo list", |i, map| {
        let mut start_offset = None;
        let mut length = None;
        // The first and the last byte any area names, with the area: checked against the
        // call's range once both are known (the keys come in any order).
        let mut lowest: Option<(u64, u64, u64)> = None;
        let mut highest: Option<(u64, u64, u64)> = None;
        let mut area_error = None;
        while let Some(key) = map.next_key()? {
            match key.as_str() {
                "startOffset" | "StartOffset" => start_offset = Some(map.u64()?),
                "length" | "Length" => length = Some(map.u64()?),
                "changeId" | "ChangeId" => base.add(map.opt_string()?, "changeId")?,
                "newChangeId" | "NewChangeId" => new.add(map.opt_string()?, "newChangeId")?,
                "changedArea" | "ChangedArea" => {
                    let mut j = 0;
                    map.each(&mut |v| {
                        let a: CbtArea = serde_json::from_value(v).map_err(|e| e.to_string())?;
                        if a.start.checked_add(a.length).is_none() {
                            return Err(format!(
                                "changedArea {j} (start {}, length {}) overflows",
                                a.start, a.length
                            ));
                        }
                        if lowest.is_none_or(|(_, s, _)| a.start < s) {
                            lowest = Some((j, a.start, a.length));
                        }
                        if highest.is_none_or(|(_, s, l)| a.start + a.length > s + l) {
                            highest = Some((j, a.start, a.length));
                        }
                        if let Err(e) = set.add(a.start, a.length) {
                            area_error.get_or_insert(e);
                        }
                        j += 1;
                        Ok(())
                    })?;
                }
                _ => map.skip()?,
            }
        }
        let start = start_offset.ok_or("missing field `startOffset`")?;
        let len = length.ok_or("missing field `length`")?;
        let end = start
            .checked_add(len)
            .ok_or_else(|| format!("DiskChangeInfo {i}: startOffset + length overflows"))?;
        for (j, a_start, a_len) in lowest.into_iter().chain(highest) {
            if a_start < start || a_start + a_len > end {
                return Err(format!(
                    "DiskChangeInfo {i}, changedArea {j} (start {a_start}, length {a_len}) lies \
                     outside the range the call covered ({start}..{end})"
                ));
            }
        }
        if let Some(e) = area_error {
            return Err(e.message().to_owned());
        }
        cover(&mut covered, start, len, disk_size).map_err(|e| e.message().to_owned())
    })?;
    if n == 0 {
        return Err(invalid("the VMware change list holds no DiskChangeInfo"));
    }
    check_coverage(
        covered,
        disk_size,
        "give the results of every QueryChangedDiskAreas call (loop on startOffset until \
         startOffset + length reaches the disk's capacity)",
    )?;
    Ok(ChangeList {
        format: ChangeFormat::VmwareCbt,
        base_change_id: base.0,
        new_change_id: new.0,
        extents: finish(set),
    })
}

/// Entries of a Hyper-V list's offset and length arrays paired per pass over the text: the
/// two arrays are separate, so each pass keeps one window of both (32 MiB), not all of them.
const RCT_WINDOW: u64 = if cfg!(test) { 3 } else { 1 << 21 };

fn parse_rct(input: Input<'_>, disk_size: u64) -> Result<ChangeList> {
    let mut set = builder(disk_size);
    let mut covered = ExtentBuilder::new(disk_size, MAX_LIST_EXTENTS);
    let (mut base, mut new) = (Agreed::default(), Agreed::default());
    let mut lo = 0u64;
    loop {
        let hi = lo + RCT_WINDOW;
        let first = lo == 0;
        let (mut offsets, mut lengths) = (Vec::new(), Vec::new());
        // Entries seen so far over every result, of each array.
        let (mut n_off, mut n_len) = (0u64, 0u64);
        let calls = objects(input, "Hyper-V GetVirtualDiskChanges result", |i, map| {
            let (off_before, len_before) = (n_off, n_len);
            let (mut has_offsets, mut has_lengths) = (false, false);
            let (mut byte_offset, mut processed) = (None, None);
            while let Some(key) = map.next_key()? {
                match key.as_str() {
                    "ChangedByteOffsets" | "changedByteOffsets" => {
                        has_offsets = true;
                        map.each(&mut |v| {
                            let v = number(&v)?;
                            if (lo..hi).contains(&n_off) {
                                offsets.push(v);
                            }
                            n_off += 1;
                            Ok(())
                        })?;
                    }
                    "ChangedByteLengths" | "changedByteLengths" => {
                        has_lengths = true;
                        map.each(&mut |v| {
                            let v = number(&v)?;
                            if (lo..hi).contains(&n_len) {
                                lengths.push(v);
                            }
                            n_len += 1;
                            Ok(())
                        })?;
                    }
                    "TargetRctId" | "targetRctId" if first => {
                        base.add(map.opt_string()?, "TargetRctId")?;
                    }
                    "NewRctId" | "newRctId" if first => {
                        new.add(map.opt_string()?, "NewRctId")?;
                    }
                    "ByteOffset" | "byteOffset" => byte_offset = map.opt_u64()?,
                    "ProcessedByteLength" | "processedByteLength" => processed = map.opt_u64()?,
                    _ => map.skip()?,
                }
            }
            if !has_offsets || !has_lengths {
                return Err("missing field `ChangedByteOffsets` or `ChangedByteLengths`".into());
            }
            if n_off - off_before != n_len - len_before {
                return Err(format!(
                    "result {i}: {} ChangedByteOffsets but {} ChangedByteLengths",
                    n_off - off_before,
                    n_len - len_before
                ));
            }
            // What the call covered: ProcessedByteLength from ByteOffset (a call may stop
            // short of the length asked for; without the field, coverage is unknown).
            let Some(processed) = processed else {
                return Err(format!(
                    "result {i} has no ProcessedByteLength: cannot tell which part of the disk \
                     it covered"
                ));
            };
            if first {
                cover(&mut covered, byte_offset.unwrap_or(0), processed, disk_size)
                    .map_err(|e| e.message().to_owned())?;
            }
            Ok(())
        })?;
        if calls == 0 {
            return Err(invalid("the Hyper-V change list holds no result"));
        }
        for (o, l) in offsets.into_iter().zip(lengths) {
            set.add(o, l)?;
        }
        if n_off <= hi {
            break;
        }
        lo = hi;
    }
    check_coverage(
        covered,
        disk_size,
        "give the results of every GetVirtualDiskChanges call (loop while ProcessedByteLength \
         is short of the length asked for)",
    )?;
    Ok(ChangeList {
        format: ChangeFormat::HypervRct,
        base_change_id: base.0,
        new_change_id: new.0,
        extents: finish(set),
    })
}

/// A JSON value that must be a non-negative integer below 2^64.
fn number(v: &serde_json::Value) -> std::result::Result<u64, String> {
    v.as_u64()
        .ok_or_else(|| format!("{v} is not a non-negative integer below 2^64"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonExtent {
    Pair(u64, u64),
    Object {
        offset: u64,
        #[serde(alias = "len")]
        length: u64,
    },
}

impl JsonExtent {
    fn pair(self) -> (u64, u64) {
        match self {
            JsonExtent::Pair(o, l)
            | JsonExtent::Object {
                offset: o,
                length: l,
            } => (o, l),
        }
    }
}

fn parse_extents(input: Input<'_>, disk_size: u64) -> Result<ChangeList> {
    let first = input.first()?;
    let mut set = builder(disk_size);
    let add = |v: serde_json::Value, set: &mut ExtentBuilder| {
        let (o, l) = serde_json::from_value::<JsonExtent>(v.clone())
            .map_err(|_| {
                format!(
                    "{v} is not an extent: [offset, length] or {{\"offset\", \"length\"}}, \
                     of integers from 0 to 2^64 - 1"
                )
            })?
            .pair();
        set.add(o, l).map_err(|e| e.message().to_owned())
    };
    let (base, new) = match first {
        Some(b'[') => {
            erased::array(input.reader()?, &mut |v| add(v, &mut set)).map_err(|e| {
                invalid(format!(
                    "not a valid extent list (a JSON array of [offset, length] or \
                     {{\"offset\", \"length\"}}): {e}"
                ))
            })?;
            (None, None)
        }
        Some(b'{') => {
            let (mut base, mut new, mut has_extents) = (None, None, false);
            let n = objects(
                input,
                "extent document ({\"extents\": [...], \"changeId\"?, \"newChangeId\"?})",
                |_, map| {
                    while let Some(key) = map.next_key()? {
                        match key.as_str() {
                            "changeId" => base = map.opt_string()?,
                            "newChangeId" => new = map.opt_string()?,
                            "extents" => {
                                has_extents = true;
                                map.each(&mut |v| add(v, &mut set))?;
                            }
                            _ => map.skip()?,
                        }
                    }
                    if has_extents {
                        Ok(())
                    } else {
                        Err("missing field `extents`".into())
                    }
                },
            )?;
            if n != 1 {
                return Err(invalid("an extent document is one JSON object"));
            }
            (base, new)
        }
        _ => {
            parse_lines(input.reader()?, &mut set)?;
            (None, None)
        }
    };
    Ok(ChangeList {
        format: ChangeFormat::Extents,
        base_change_id: base,
        new_change_id: new,
        extents: finish(set),
    })
}

/// `offset,length` (or whitespace-separated) per line, decimal or `0x` hex; `#` starts a
/// comment. Each range goes straight into `set`.
fn parse_lines(text: impl std::io::BufRead, set: &mut ExtentBuilder) -> Result<()> {
    for (n, line) in text.split(b'\n').enumerate() {
        let line =
            line.map_err(|e| Error::new(ErrorKind::Io, "reading the change list").with_source(e))?;
        let line = std::str::from_utf8(&line).map_err(|e| {
            invalid(format!(
                "line {}: not UTF-8 text (byte {})",
                n + 1,
                e.valid_up_to()
            ))
        })?;
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line
            .split(|c: char| c == ',' || c.is_ascii_whitespace())
            .filter(|f| !f.is_empty());
        let (Some(o), Some(l), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(invalid(format!(
                "line {}: expected `offset,length`, found {line:?}",
                n + 1
            )));
        };
        let num = |s: &str| -> Result<u64> {
            let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse::<u64>(),
            };
            parsed.map_err(|_| {
                invalid(format!(
                    "line {}: {s:?} is not a non-negative integer below 2^64",
                    n + 1
                ))
            })
        };
        set.add(num(o)?, num(l)?)
            .map_err(|e| invalid(format!("line {}: {}", n + 1, e.message())))?;
    }
    Ok(())
}

/// Streaming JSON: visitors that hand each element of an array, or each key of an object, to
/// a closure as it is parsed, so that a list is never held whole as Rust values.
mod erased {
    use serde::de::{
        self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };
    use std::fmt;

    type Res<T> = std::result::Result<T, String>;

    /// One JSON object being read: its keys in order, each value taken by one of the methods.
    pub(super) trait Map {
        fn next_key(&mut self) -> Res<Option<String>>;
        fn u64(&mut self) -> Res<u64>;
        fn opt_u64(&mut self) -> Res<Option<u64>>;
        fn opt_string(&mut self) -> Res<Option<String>>;
        /// The value is an array: each element to `f`, in order.
        fn each(&mut self, f: &mut dyn FnMut(serde_json::Value) -> Res<()>) -> Res<()>;
        fn skip(&mut self) -> Res<()>;
    }

    struct Access<A>(A);

    impl<'de, A: MapAccess<'de>> Map for Access<A> {
        fn next_key(&mut self) -> Res<Option<String>> {
            self.0.next_key::<String>().map_err(|e| e.to_string())
        }
        fn u64(&mut self) -> Res<u64> {
            self.0.next_value::<u64>().map_err(|e| e.to_string())
        }
        fn opt_u64(&mut self) -> Res<Option<u64>> {
            self.0
                .next_value::<Option<u64>>()
                .map_err(|e| e.to_string())
        }
        fn opt_string(&mut self) -> Res<Option<String>> {
            self.0
                .next_value::<Option<String>>()
                .map_err(|e| e.to_string())
        }
        fn each(&mut self, f: &mut dyn FnMut(serde_json::Value) -> Res<()>) -> Res<()> {
            self.0.next_value_seed(Each(f)).map_err(|e| e.to_string())
        }
        fn skip(&mut self) -> Res<()> {
            self.0
                .next_value::<IgnoredAny>()
                .map(drop)
                .map_err(|e| e.to_string())
        }
    }

    /// An array whose elements go to a closure one at a time.
    struct Each<'f>(&'f mut dyn FnMut(serde_json::Value) -> Res<()>);

    impl<'de> DeserializeSeed<'de> for Each<'_> {
        type Value = ();
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for Each<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
            while let Some(v) = seq.next_element::<serde_json::Value>()? {
                (self.0)(v).map_err(de::Error::custom)?;
            }
            Ok(())
        }
    }

    /// An object, handed to a closure with its index.
    struct Object<'f> {
        index: u64,
        f: &'f mut dyn FnMut(u64, &mut dyn Map) -> Res<()>,
    }

    impl<'de> DeserializeSeed<'de> for Object<'_> {
        type Value = ();
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Object<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
            (self.f)(self.index, &mut Access(map)).map_err(de::Error::custom)
        }
    }

    /// An array of objects, each handed on; counts them.
    struct Objects<'f>(&'f mut dyn FnMut(u64, &mut dyn Map) -> Res<()>);

    impl<'de> Visitor<'de> for Objects<'_> {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array of objects")
        }
        fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<u64, S::Error> {
            let mut n = 0;
            while seq
                .next_element_seed(Object {
                    index: n,
                    f: &mut *self.0,
                })?
                .is_some()
            {
                n += 1;
            }
            Ok(n)
        }
    }

    /// One object, or an array of them (`array`), each to `f`; returns how many.
    pub(super) fn objects(
        text: impl std::io::Read,
        array: bool,
        mut f: impl FnMut(u64, &mut dyn Map) -> Res<()>,
    ) -> Res<u64> {
        let mut de = serde_json::Deserializer::from_reader(text);
        let n = if array {
            (&mut de)
                .deserialize_seq(Objects(&mut f))
                .map_err(|e| e.to_string())?
        } else {
            Object {
                index: 0,
                f: &mut f,
            }
            .deserialize(&mut de)
            .map_err(|e| e.to_string())?;
            1
        };
        de.end().map_err(|e| e.to_string())?;
        Ok(n)
    }

    /// An array, each element to `f`.
    pub(super) fn array(
        text: impl std::io::Read,
        f: &mut dyn FnMut(serde_json::Value) -> Res<()>,
    ) -> Res<()> {
        let mut de = serde_json::Deserializer::from_reader(text);
        Each(f).deserialize(&mut de).map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())
    }
}
