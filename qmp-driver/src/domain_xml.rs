//! The disks of a libvirt domain's XML (`virsh dumpxml`, or the XML a libvirt hook gets on
//! stdin), as far as moving them goes: which are NBD on a Unix socket (the proxy's, when its
//! control socket is beside it) and which the guest can write.

use std::path::PathBuf;

/// One `<disk>` of a domain's XML, as far as moving it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlDisk {
    /// `<target dev=...>` (vda, sdb, ...).
    pub target: String,
    /// Where its data is.
    pub source: Source,
    /// Whether the guest can write it (not `<readonly/>`, `<shareable/>` or a cdrom/floppy).
    pub writable: bool,
}

/// Where a disk's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// NBD on a Unix socket (the proxy's, if its control socket is beside it).
    NbdUnix(PathBuf),
    /// Anything else: `type/protocol` as the XML says, for the messages.
    Other(String),
}

/// The first child element of `node` named `name`.
fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

/// The disks of a domain's XML (`virsh dumpxml`).
pub fn parse_disks(xml: &str) -> Result<Vec<XmlDisk>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("the domain's XML does not parse: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(format!("the XML is a <{}>, not a <domain>", root.tag_name().name()));
    }
    let mut disks = Vec::new();
    let Some(devices) = child(root, "devices") else { return Ok(disks) };
    for disk in devices.children().filter(|c| c.has_tag_name("disk")) {
        let target = child(disk, "target").and_then(|t| t.attribute("dev")).unwrap_or("?").to_string();
        let device = disk.attribute("device").unwrap_or("disk");
        let writable =
            matches!(device, "disk" | "lun") && child(disk, "readonly").is_none() && child(disk, "shareable").is_none();
        let kind = disk.attribute("type").unwrap_or("?");
        let src = child(disk, "source");
        let protocol = src.and_then(|s| s.attribute("protocol"));
        let unix = src
            .and_then(|s| child(s, "host"))
            .filter(|h| h.attribute("transport") == Some("unix"))
            .and_then(|h| h.attribute("socket"));
        let source = match (kind, protocol, unix) {
            ("network", Some("nbd"), Some(socket)) => Source::NbdUnix(PathBuf::from(socket)),
            _ => Source::Other(match protocol {
                Some(p) => format!("{kind}/{p}"),
                None => kind.to_string(),
            }),
        };
        disks.push(XmlDisk { target, source, writable });
    }
    Ok(disks)
}
