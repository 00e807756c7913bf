//! OVF descriptors (DMTF DSP0243): the XML an OVA carries, or a standalone `.ovf`.
//!
//! The descriptor is read into a small element tree with caps (size, elements, depth), then
//! read as an envelope: the files it references, its disks (`DiskSection`), and each virtual
//! system with its hardware items (CIM `ResourceType`: 3 CPU, 4 memory, 5/6/20 controllers,
//! 10 Ethernet, 17 disk), operating system section and `vmw:Config` extras (firmware, secure
//! boot). A document type declaration is refused: entities, external or internal, are never
//! expanded, and an OVF has no use for them.

use std::collections::HashMap;

use quick_xml::events::Event;

/// Most elements read from one descriptor.
const MAX_ELEMENTS: usize = 200_000;
/// Deepest nesting read.
const MAX_DEPTH: usize = 64;
/// Most disks, files or virtual systems taken from one OVF.
pub const MAX_OVF_ITEMS: usize = 4096;

/// An element of the descriptor: its local name (namespace prefix dropped), attributes by
/// local name, children and text.
#[derive(Debug, Clone, Default)]
pub struct Element {
    /// Local name (`Item`, `Disk`, …).
    pub name: String,
    /// Attributes by local name (`id`, `href`, …), in document order.
    pub attrs: Vec<(String, String)>,
    /// Child elements, in order.
    pub children: Vec<Element>,
    /// Text directly inside (trimmed, pieces joined).
    pub text: String,
}

impl Element {
    /// An attribute's value by local name.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first child of that local name.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The children of that local name.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The text of the first child of that name, if not empty.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name)
            .map(|c| c.text.as_str())
            .filter(|t| !t.is_empty())
    }

    /// Every element below (depth first), this one included.
    fn walk<'a>(&'a self, out: &mut Vec<&'a Element>) {
        out.push(self);
        for c in &self.children {
            c.walk(out);
        }
    }
}

/// Parses XML into its root element, with the caps above.
///
/// # Errors
/// Not well-formed XML, a DTD, an unknown entity, too many elements or too deep.
pub fn parse_xml(xml: &[u8]) -> Result<Element, String> {
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut stack: Vec<Element> = vec![Element::default()];
    let mut count = 0usize;
    let mut buf = Vec::new();
    loop {
        let pos = reader.buffer_position();
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| format!("not valid XML at byte {pos}: {e}"))?;
        match event {
            Event::DocType(_) => {
                return Err(format!(
                    "a document type declaration at byte {pos}: refused (entities are never \
                     expanded, external or not, and an OVF has no use for them)"
                ));
            }
            Event::Start(e) | Event::Empty(e) if stack.len() > MAX_DEPTH => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                return Err(format!(
                    "element <{name}> at byte {pos} is nested deeper than {MAX_DEPTH}"
                ));
            }
            Event::Start(e) => {
                count += 1;
                stack.push(element(&e, count, pos)?);
            }
            Event::Empty(e) => {
                count += 1;
                let el = element(&e, count, pos)?;
                if let Some(top) = stack.last_mut() {
                    top.children.push(el);
                }
            }
            Event::End(_) => {
                let done = stack.pop().filter(|_| !stack.is_empty());
                match (done, stack.last_mut()) {
                    (Some(mut done), Some(top)) => {
                        let trimmed = done.text.trim();
                        if trimmed.len() != done.text.len() {
                            done.text = String::from(trimmed);
                        }
                        top.children.push(done);
                    }
                    _ => return Err(format!("an end tag without its start at byte {pos}")),
                }
            }
            Event::Text(t) => {
                let text = t
                    .xml10_content()
                    .map_err(|e| format!("bad text at byte {pos}: {e}"))?;
                push_text(stack.last_mut(), &text);
            }
            Event::GeneralRef(r) => {
                let text = resolve_ref(&r).map_err(|why| format!("{why} at byte {pos}"))?;
                push_text(stack.last_mut(), &text);
            }
            Event::CData(c) => {
                let text = String::from_utf8_lossy(&c).into_owned();
                push_text(stack.last_mut(), &text);
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    let mut doc = match stack.pop() {
        Some(doc) if stack.is_empty() => doc,
        _ => return Err("the document ends inside an element".to_owned()),
    };
    match doc.children.len() {
        1 => Ok(doc.children.swap_remove(0)),
        0 => Err("no root element".to_owned()),
        _ => Err("more than one root element".to_owned()),
    }
}

/// Most text kept per element (the values an OVF holds are short; a long text is cut).
const MAX_TEXT: usize = 64 << 10;

fn push_text(top: Option<&mut Element>, text: &str) {
    if let Some(top) = top
        && top.text.len() < MAX_TEXT
    {
        let room = MAX_TEXT - top.text.len();
        let mut end = text.len().min(room);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        top.text.push_str(&text[..end]);
    }
}

/// A character or predefined entity reference; any other entity is an error.
fn resolve_ref(r: &quick_xml::events::BytesRef<'_>) -> Result<String, String> {
    if let Some(c) = r
        .resolve_char_ref()
        .map_err(|e| format!("bad character reference: {e}"))?
    {
        return Ok(c.to_string());
    }
    let name = String::from_utf8_lossy(r.as_ref()).into_owned();
    match name.as_str() {
        "lt" => Ok("<".into()),
        "gt" => Ok(">".into()),
        "amp" => Ok("&".into()),
        "apos" => Ok("'".into()),
        "quot" => Ok("\"".into()),
        _ => Err(format!(
            "entity &{name}; is not defined (entities are never read)"
        )),
    }
}

fn element(
    e: &quick_xml::events::BytesStart<'_>,
    count: usize,
    pos: u64,
) -> Result<Element, String> {
    if count > MAX_ELEMENTS {
        return Err(format!("more than {MAX_ELEMENTS} elements (at byte {pos})"));
    }
    let mut attrs = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|e| format!("bad attribute at byte {pos}: {e}"))?;
        let key = String::from_utf8_lossy(a.key.local_name().as_ref()).into_owned();
        let value = a
            .unescape_value()
            .map_err(|e| format!("bad attribute value at byte {pos}: {e}"))?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Element {
        name: String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
        attrs,
        children: Vec::new(),
        text: String::new(),
    })
}

/// A disk the OVF describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDisk {
    /// `ovf:diskId`.
    pub id: String,
    /// The file (`ovf:href` of the referenced `File`).
    pub file: String,
    /// `ovf:capacity` in bytes (with `ovf:capacityAllocationUnits` applied), if given.
    pub capacity: Option<u64>,
    /// `ovf:format` (a URL naming the disk format).
    pub format: String,
}

/// A hardware item of a virtual system (`rasd:` fields by local name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OvfItem {
    /// `ResourceType` (CIM: 3 CPU, 4 memory, 5 IDE, 6 SCSI, 10 Ethernet, 17 disk, 20 other
    /// storage such as SATA or `NVMe`).
    pub resource_type: u32,
    /// `InstanceID`.
    pub instance: String,
    /// `ElementName`.
    pub name: String,
    /// `ResourceSubType` (`lsilogic`, `VmxNet3`, `vmware.sata.ahci`, …).
    pub subtype: String,
    /// `VirtualQuantity`.
    pub quantity: Option<u64>,
    /// `AllocationUnits` (`byte * 2^20`, `MegaBytes`, …).
    pub units: String,
    /// `HostResource` (a disk's `ovf:/disk/<id>`).
    pub host_resource: String,
    /// `Parent` (the controller's `InstanceID`).
    pub parent: String,
    /// `AddressOnParent` (the unit on the controller).
    pub address_on_parent: String,
    /// `Address` (a NIC's MAC).
    pub address: String,
    /// `Connection` (a NIC's network).
    pub connection: String,
    /// `AutomaticAllocation` (a NIC connected at power on).
    pub automatic_allocation: Option<bool>,
}

/// A virtual system (one VM) of the descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OvfSystem {
    /// `ovf:id`.
    pub id: String,
    /// `Name`, else the id.
    pub name: String,
    /// `VirtualSystemIdentifier` of its `System` element, if any.
    pub identifier: Option<String>,
    /// `vssd:VirtualSystemType` (e.g. `vmx-19`).
    pub system_type: Option<String>,
    /// The operating system section: `ovf:id` (a CIM OS number), `vmw:osType` and
    /// `Description`.
    pub os_id: Option<String>,
    /// `vmw:osType`.
    pub os_type: Option<String>,
    /// The section's `Description`.
    pub os_description: Option<String>,
    /// Its hardware items.
    pub items: Vec<OvfItem>,
    /// `vmw:Config` key/value pairs of its hardware section (`firmware`,
    /// `uefi.secureBoot.enabled`, …).
    pub config: Vec<(String, String)>,
}

/// An OVF descriptor, as blockferry reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// The disks (`DiskSection`), in order: what an OVA's disk index counts.
    pub disks: Vec<OvfDisk>,
    /// The virtual systems (one, or those of a `VirtualSystemCollection`).
    pub systems: Vec<OvfSystem>,
}

/// Parses an OVF descriptor.
///
/// # Errors
/// Bad XML (see [`parse_xml`]), a disk naming a file the descriptor does not list, or more
/// than [`MAX_OVF_ITEMS`] disks, files or systems.
pub fn parse_envelope(xml: &[u8]) -> Result<Envelope, String> {
    let root = parse_xml(xml)?;
    if root.name != "Envelope" {
        return Err(format!(
            "the root element is <{}>, not <Envelope>",
            root.name
        ));
    }
    let mut all = Vec::new();
    root.walk(&mut all);
    let files: HashMap<&str, &str> = all
        .iter()
        .filter(|e| e.name == "File")
        .filter_map(|e| Some((e.attr("id")?, e.attr("href")?)))
        .collect();
    let disk_elements: Vec<&Element> = all.iter().copied().filter(|e| e.name == "Disk").collect();
    let systems: Vec<&Element> = all
        .iter()
        .copied()
        .filter(|e| e.name == "VirtualSystem")
        .collect();
    if files.len() > MAX_OVF_ITEMS || disk_elements.len() > MAX_OVF_ITEMS {
        return Err(format!("more than {MAX_OVF_ITEMS} disks or files"));
    }
    if systems.len() > MAX_OVF_ITEMS {
        return Err(format!("more than {MAX_OVF_ITEMS} virtual systems"));
    }
    let disks = disk_elements
        .into_iter()
        .map(|d| {
            let id = d.attr("diskId").unwrap_or_default().to_owned();
            let file_ref = d.attr("fileRef").unwrap_or_default();
            let file = files.get(file_ref).ok_or_else(|| {
                format!("disk {id} names file {file_ref:?}, which the OVF does not list")
            })?;
            let unit = d
                .attr("capacityAllocationUnits")
                .map_or(Some(1), allocation_unit);
            let capacity = d
                .attr("capacity")
                .and_then(|c| c.trim().parse::<u64>().ok())
                .zip(unit)
                .and_then(|(c, u)| c.checked_mul(u));
            Ok(OvfDisk {
                id,
                file: (*file).to_owned(),
                capacity,
                format: d.attr("format").unwrap_or_default().to_owned(),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let systems = systems.into_iter().map(system).collect();
    Ok(Envelope { disks, systems })
}

fn system(vs: &Element) -> OvfSystem {
    let id = vs.attr("id").unwrap_or_default().to_owned();
    let name = vs
        .child_text("Name")
        .map_or_else(|| id.clone(), str::to_owned);
    let os = vs.child("OperatingSystemSection");
    let hw = vs.child("VirtualHardwareSection");
    let sys = hw.and_then(|h| h.child("System"));
    let items = hw
        .map(|h| {
            h.children
                .iter()
                .filter(|c| matches!(c.name.as_str(), "Item" | "EthernetPortItem" | "StorageItem"))
                .map(item)
                .collect()
        })
        .unwrap_or_default();
    let config = hw
        .map(|h| {
            h.all("Config")
                .filter_map(|c| Some((c.attr("key")?.to_owned(), c.attr("value")?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    OvfSystem {
        id,
        name,
        identifier: sys
            .and_then(|s| s.child_text("VirtualSystemIdentifier"))
            .map(str::to_owned),
        system_type: sys
            .and_then(|s| s.child_text("VirtualSystemType"))
            .map(str::to_owned),
        os_id: os.and_then(|o| o.attr("id")).map(str::to_owned),
        os_type: os.and_then(|o| o.attr("osType")).map(str::to_owned),
        os_description: os
            .and_then(|o| o.child_text("Description"))
            .map(str::to_owned),
        items,
        config,
    }
}

fn item(e: &Element) -> OvfItem {
    let text = |name: &str| e.child_text(name).unwrap_or_default().to_owned();
    OvfItem {
        resource_type: e
            .child_text("ResourceType")
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0),
        instance: text("InstanceID"),
        name: text("ElementName"),
        subtype: text("ResourceSubType"),
        quantity: e
            .child_text("VirtualQuantity")
            .and_then(|q| q.trim().parse().ok()),
        units: text("AllocationUnits"),
        host_resource: text("HostResource"),
        parent: text("Parent"),
        address_on_parent: text("AddressOnParent"),
        address: text("Address"),
        connection: text("Connection"),
        automatic_allocation: e
            .child_text("AutomaticAllocation")
            .map(|v| v.trim().eq_ignore_ascii_case("true")),
    }
}

/// The multiplier of an allocation unit: `byte * 2^30`, `byte*1024`, `KiloBytes`,
/// `MegaBytes`, `GigaBytes`; `None` for one not understood.
pub fn allocation_unit(unit: &str) -> Option<u64> {
    let compact: String = unit
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    match compact.as_str() {
        "" | "byte" | "bytes" => return Some(1),
        "kilobytes" | "kb" => return Some(1 << 10),
        "megabytes" | "mb" => return Some(1 << 20),
        "gigabytes" | "gb" => return Some(1 << 30),
        _ => {}
    }
    let rest = compact.strip_prefix("byte*")?;
    match rest.split_once('^') {
        Some((base, power)) => {
            let base: u64 = base.parse().ok()?;
            let power: u32 = power.parse().ok()?;
            base.checked_pow(power)
        }
        None => rest.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(allocation_unit("byte * 2^20"), Some(1 << 20));
        assert_eq!(allocation_unit("byte*2^30"), Some(1 << 30));
        assert_eq!(allocation_unit("MegaBytes"), Some(1 << 20));
        assert_eq!(allocation_unit("byte * 1024"), Some(1024));
        assert_eq!(allocation_unit("byte * 2^99"), None);
        assert_eq!(allocation_unit("furlongs"), None);
    }

    #[test]
    fn entities_and_doctypes_are_refused() {
        let xxe = br#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><Envelope>&e;</Envelope>"#;
        let err = parse_xml(xxe).unwrap_err();
        assert!(err.contains("document type declaration"), "{err}");
        let undefined = br"<Envelope>&e;</Envelope>";
        let err = parse_xml(undefined).unwrap_err();
        assert!(err.contains("entity &e;"), "{err}");
        assert_eq!(
            parse_xml(br"<a> x &amp; &#65; </a>").map(|e| e.text),
            Ok("x & A".to_owned())
        );
    }

    #[test]
    fn depth_and_shape_are_checked() {
        let deep = "<a>".repeat(100) + &"</a>".repeat(100);
        assert!(parse_xml(deep.as_bytes()).unwrap_err().contains("deeper"));
        assert!(parse_xml(b"<a></b>").is_err());
        assert!(parse_xml(b"<a>").is_err());
        assert!(parse_xml(b"").unwrap_err().contains("no root"));
    }
}
