//! What an incoming migration needs from this host's proxies (pure): which of the domain's disks
//! are served by nbd-row-proxy, by which instance, and whether a proxy's state lets the guest
//! run here.

use std::path::{Path, PathBuf};

use control_api::{IncomingPhase, StatusReply};
use qmp_driver::domain_xml::{Source, XmlDisk};

use crate::conf::Instance;

/// One disk of the domain that this host's proxy must receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need<'a> {
    /// `<target dev=...>`.
    pub target: String,
    /// The NBD socket QEMU will open.
    pub socket: PathBuf,
    /// The proxy's control socket.
    pub control: PathBuf,
    /// The configured instance serving `socket`, if one is configured (it can then be started).
    pub instance: Option<&'a Instance>,
}

/// The sockets of the domain's writable NBD disks on Unix sockets (the disks that may be ours).
pub fn unix_sockets(disks: &[XmlDisk]) -> Vec<(&str, &Path)> {
    disks
        .iter()
        .filter(|d| d.writable)
        .filter_map(|d| match &d.source {
            Source::NbdUnix(socket) => Some((d.target.as_str(), socket.as_path())),
            Source::Other(_) => None,
        })
        .collect()
}

/// The domain's writable disks on nbd-row-proxy: an NBD disk on a Unix socket that a configured
/// instance serves (its `SOCKET=`, compared after `same`), or with a control socket `X.ctl`
/// beside `X.sock` that `is_control` accepts (a proxy started by hand). Other disks are not ours
/// and left to libvirt; a socket named twice is checked once.
pub fn needs<'a>(
    disks: &[XmlDisk],
    instances: &'a [Instance],
    same: impl Fn(&Path) -> PathBuf,
    is_control: impl Fn(&Path) -> bool,
) -> Vec<Need<'a>> {
    let mut out: Vec<Need<'a>> = Vec::new();
    for (target, socket) in unix_sockets(disks) {
        let socket = same(socket);
        if out.iter().any(|n| n.socket == socket) {
            continue;
        }
        let instance = instances.iter().find(|i| same(&i.socket) == socket);
        let control = match instance {
            Some(i) => i.control.clone(),
            None => socket.with_extension("ctl"),
        };
        if instance.is_some() || is_control(&control) {
            out.push(Need { target: target.to_string(), socket, control, instance });
        }
    }
    out
}

/// Why an instance cannot be started for an incoming migration, if it cannot.
pub fn startable(i: &Instance) -> Result<(), String> {
    if i.mode != "receive" {
        return Err(format!(
            "{} has MODE={}: an incoming migration needs a receiving proxy (MODE=receive, ARGS=--listen HOST:PORT ...)",
            i.file.display(),
            i.mode
        ));
    }
    if i.image.as_deref().is_none_or(str::is_empty) {
        return Err(format!("{} sets no IMAGE=", i.file.display()));
    }
    Ok(())
}

/// Whether the guest may run here on this proxy: only when a source is pre-copying the disk to
/// it (armed). A proxy with no source would serve its own, stale copy.
pub fn ready(domain: &str, status: &StatusReply) -> Result<(), String> {
    match (status.incoming, status.incoming_phase) {
        (true, Some(IncomingPhase::Receiving)) => Ok(()),
        (true, _) => Err(format!(
            "it is not armed: no source proxy is pre-copying the disk to it. Arm it first, on the source host: \
             row-migrate --domain {domain} --to URI (or with --arm-only before the migration)"
        )),
        (false, phase) => Err(format!(
            "it serves its own copy of the disk (incoming phase {}, not a migration's destination): the guest \
             would run on it, not on the source's disk",
            phase.map_or("none", IncomingPhase::as_str)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conf::parse;
    use qmp_driver::domain_xml::parse_disks;

    const XML: &str = r#"<domain type='qemu'><name>vm1</name><devices>
        <disk type='network' device='disk'>
          <source protocol='nbd'><host transport='unix' socket='/run/nbd-row-proxy/vm1.sock'/></source>
          <target dev='vda'/></disk>
        <disk type='network' device='disk'>
          <source protocol='nbd'><host transport='unix' socket='/srv/by-hand.sock'/></source>
          <target dev='vdb'/></disk>
        <disk type='network' device='disk'>
          <source protocol='nbd'><host transport='unix' socket='/run/other/x.sock'/></source>
          <target dev='vdc'/></disk>
        <disk type='network' device='disk'>
          <source protocol='nbd'><host transport='unix' socket='/run/nbd-row-proxy/ro.sock'/></source>
          <target dev='vdd'/><readonly/></disk>
        <disk type='file' device='disk'><source file='/var/lib/libvirt/images/x.raw'/><target dev='vde'/></disk>
      </devices></domain>"#;

    #[test]
    fn configured_and_hand_started_proxies_are_ours_and_the_rest_is_left_to_libvirt() {
        let disks = parse_disks(XML).unwrap();
        let confs = vec![
            parse("vm1", Path::new("/etc/nbd-row-proxy/vm1.conf"), "IMAGE=/i\nMODE=receive\n"),
            parse("ro", Path::new("/etc/nbd-row-proxy/ro.conf"), "IMAGE=/r\n"),
        ];
        let n = needs(&disks, &confs, Path::to_path_buf, |c| c == Path::new("/srv/by-hand.ctl"));
        assert_eq!(n.len(), 2, "{n:?}");
        assert_eq!((n[0].target.as_str(), n[0].instance.map(|i| i.name.as_str())), ("vda", Some("vm1")));
        assert_eq!(n[0].control, PathBuf::from("/run/nbd-row-proxy/vm1.ctl"));
        assert_eq!((n[1].target.as_str(), n[1].instance), ("vdb", None));
        assert_eq!(n[1].control, PathBuf::from("/srv/by-hand.ctl"));
        assert!(startable(&confs[0]).is_ok());
        let e = startable(&confs[1]).unwrap_err();
        assert!(e.contains("ro.conf has MODE=serve"), "{e}");
        let e = startable(&parse("x", Path::new("x.conf"), "MODE=receive\n")).unwrap_err();
        assert!(e.contains("sets no IMAGE="), "{e}");
        // The same socket under another spelling is the configured one, and is checked once.
        let twice = XML.replace("/srv/by-hand.sock", "/run/./nbd-row-proxy/vm1.sock");
        let same = |p: &Path| PathBuf::from(p.to_str().unwrap().replace("/./", "/"));
        let n = needs(&parse_disks(&twice).unwrap(), &confs, same, |_| false);
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!(n[0].instance.map(|i| i.name.as_str()), Some("vm1"));
    }

    fn status(incoming: bool, phase: Option<IncomingPhase>) -> StatusReply {
        let mut s: StatusReply = serde_json::from_value(serde_json::json!({
            "mode": "direct", "export": "", "image": "/i", "image-size": 1, "read-only": false,
            "reserved": null, "reserved-bytes": 0, "reserved-allocated": 0, "block-size": 4096,
            "incoming": false, "incoming-phase": null, "writes-refused": null, "fence": null
        }))
        .unwrap();
        s.incoming = incoming;
        s.incoming_phase = phase;
        s
    }

    #[test]
    fn only_an_armed_destination_lets_the_guest_run_here() {
        assert!(ready("vm1", &status(true, Some(IncomingPhase::Receiving))).is_ok());
        let e = ready("vm1", &status(true, Some(IncomingPhase::Waiting))).unwrap_err();
        assert!(e.contains("not armed") && e.contains("row-migrate --domain vm1 --to URI"), "{e}");
        let e = ready("vm1", &status(false, Some(IncomingPhase::Owner))).unwrap_err();
        assert!(e.contains("its own copy") && e.contains("phase owner"), "{e}");
        assert!(ready("vm1", &status(false, None)).unwrap_err().contains("phase none"));
    }
}
