//! The disks a migration moves: one per `--disk`, or the single-disk flags
//! (`--src-proxy`, `--dst-proxy`, `--disk-uri`) as the first.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::Args;

/// One disk of the VM: its two proxies' control sockets and where its stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The source nbd-row-proxy's control socket.
    pub src_proxy: PathBuf,
    /// The destination nbd-row-proxy's control socket.
    pub dst_proxy: PathBuf,
    /// Where the disk goes (`tcp:HOST:PORT` of `receive --listen`, or `nbd://...` for
    /// qemu-mirror); empty with `--recover`, which does not need it.
    pub uri: String,
}

/// The flags that named disk `i`'s two control sockets, for messages: the single-disk flags for
/// the first disk when they were used, `--disk` otherwise.
pub fn proxy_flags(args: &Args, i: usize) -> (String, String) {
    if i == 0 && args.src_proxy.is_some() {
        ("--src-proxy".into(), "--dst-proxy".into())
    } else {
        let n = if args.src_proxy.is_some() { i } else { i + 1 };
        (format!("--disk #{n} (source)"), format!("--disk #{n} (destination)"))
    }
}

/// The name of disk `index` (from 0) of `count` in messages: `disk` alone, `disk 2` among several.
pub fn disk_name(index: usize, count: usize) -> String {
    if count > 1 {
        format!("disk {}", index + 1)
    } else {
        "disk".to_string()
    }
}

/// How a `--disk` value is written, for the error messages and `--help`.
pub const DISK_SYNTAX: &str = "SRC_CONTROL,DST_CONTROL,URI or src=SRC_CONTROL,dst=DST_CONTROL,uri=URI";

/// Parses one `--disk` value: three comma-separated parts, positional or named.
pub fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != 3 {
        return Err(format!("{s:?}: expected {DISK_SYNTAX} (three parts, no commas inside them)"));
    }
    const KEYS: [&str; 7] = ["src", "src-proxy", "source", "dst", "dst-proxy", "destination", "uri"];
    let named = parts.iter().any(|p| p.split_once('=').is_some_and(|(k, _)| KEYS.contains(&k) || k == "disk-uri"));
    let (mut src, mut dst, mut uri) = (None, None, None);
    if named {
        for p in &parts {
            let (key, value) = p.split_once('=').ok_or_else(|| format!("{p:?}: expected KEY=VALUE ({DISK_SYNTAX})"))?;
            let slot = match key {
                "src" | "src-proxy" | "source" => &mut src,
                "dst" | "dst-proxy" | "destination" => &mut dst,
                "uri" | "disk-uri" => &mut uri,
                other => return Err(format!("{other:?} is not a --disk key (src, dst, uri)")),
            };
            if slot.replace(value).is_some() {
                return Err(format!("{s:?}: {key} is given twice"));
            }
        }
    } else {
        (src, dst, uri) = (Some(parts[0]), Some(parts[1]), Some(parts[2]));
    }
    let (Some(src), Some(dst), Some(uri)) = (src, dst, uri) else {
        return Err(format!("{s:?}: src, dst and uri are all needed ({DISK_SYNTAX})"));
    };
    if src.is_empty() || dst.is_empty() || uri.is_empty() {
        return Err(format!("{s:?}: an empty part ({DISK_SYNTAX})"));
    }
    Ok(DiskSpec { src_proxy: src.into(), dst_proxy: dst.into(), uri: uri.into() })
}

/// The disks of this run, checked: the single-disk flags (all or none of them) first, then
/// every `--disk`; no control socket or stream address used twice.
pub fn disk_specs(args: &Args) -> Result<Vec<DiskSpec>, String> {
    let mut disks = Vec::new();
    match (&args.src_proxy, &args.dst_proxy) {
        (Some(src), Some(dst)) => {
            let uri = args.disk_uri.clone().unwrap_or_default();
            if uri.is_empty() && !args.recover {
                return Err("--src-proxy and --dst-proxy need --disk-uri".into());
            }
            disks.push(DiskSpec { src_proxy: src.clone(), dst_proxy: dst.clone(), uri });
        }
        (None, None) if args.disk_uri.is_some() => {
            return Err("--disk-uri goes with --src-proxy and --dst-proxy (or use --disk)".into())
        }
        (None, None) => {}
        _ => return Err("--src-proxy and --dst-proxy go together (or use --disk for each disk)".into()),
    }
    disks.extend(args.disks.iter().cloned());
    if disks.is_empty() {
        return Err(format!(
            "no disk: give --disk {DISK_SYNTAX} (repeatable), or --src-proxy, --dst-proxy and --disk-uri"
        ));
    }
    // A path behind --src-ssh/--dst-ssh is on that host: the same path on the two sides names
    // two sockets (e.g. /run/nbd-row-proxy/vm1.ctl on both hosts).
    let side = |remote: bool, tag: &str, path: &Path| {
        if remote {
            format!("{tag}:{}", path.display())
        } else {
            identity(path)
        }
    };
    let mut seen = HashSet::new();
    for d in &disks {
        let keys =
            [side(args.src_ssh.is_some(), "src", &d.src_proxy), side(args.dst_ssh.is_some(), "dst", &d.dst_proxy)];
        for (path, key) in [&d.src_proxy, &d.dst_proxy].into_iter().zip(keys) {
            if !seen.insert(key) {
                return Err(format!("the control socket {} is given for two disks", path.display()));
            }
        }
        if !d.uri.is_empty() && !seen.insert(d.uri.clone()) {
            return Err(format!("the stream address {} is given for two disks", d.uri));
        }
    }
    Ok(disks)
}

/// A path's identity for duplicate checks: the canonical path when it exists.
fn identity(path: &Path) -> String {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn args(extra: &[&str]) -> Result<Vec<DiskSpec>, String> {
        let base = ["row-migrate", "--src-qmp", "/a.qmp", "--dst-qmp", "/b.qmp", "--mem-uri", "tcp:h:1"];
        let a = Args::try_parse_from(base.iter().chain(extra)).map_err(|e| e.to_string())?;
        disk_specs(&a)
    }

    #[test]
    fn disks_parse_positional_and_named() {
        let d = parse_disk("/a.ctl,/b.ctl,tcp:10.0.0.2:10810").unwrap();
        assert_eq!(
            d,
            DiskSpec { src_proxy: "/a.ctl".into(), dst_proxy: "/b.ctl".into(), uri: "tcp:10.0.0.2:10810".into() }
        );
        assert_eq!(parse_disk("uri=tcp:10.0.0.2:10810,dst=/b.ctl,src=/a.ctl").unwrap(), d);
        for bad in ["/a,/b", "/a,/b,tcp:x:1,extra", "src=/a,src=/b,uri=tcp:x:1", "src=/a,dest=/b,uri=x", "/a,,tcp:x:1"]
        {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_same_path_on_both_hosts_is_two_sockets_through_ssh() {
        let same = ["--src-proxy", "/run/nbd-row-proxy/vm1.ctl", "--dst-proxy", "/run/nbd-row-proxy/vm1.ctl"];
        let uri = ["--disk-uri", "tcp:h:10810"];
        let e = args(&[&same[..], &uri[..]].concat()).unwrap_err();
        assert!(e.contains("given for two disks"), "{e}");
        let ssh = ["--dst-ssh", "root@host-b"];
        assert_eq!(args(&[&same[..], &uri[..], &ssh[..]].concat()).unwrap().len(), 1);
        let two = ["--disk", "/run/x/a.ctl,/run/x/a.ctl,tcp:h:1", "--disk", "/run/x/a.ctl,/run/x/b.ctl,tcp:h:2"];
        let e = args(&[&two[..], &ssh[..]].concat()).unwrap_err();
        assert!(e.contains("/run/x/a.ctl is given for two disks"), "{e}");
    }

    #[test]
    fn single_disk_flags_and_disks_combine_without_duplicates() {
        let one = args(&["--src-proxy", "/a1", "--dst-proxy", "/b1", "--disk-uri", "tcp:h:10810"]).unwrap();
        assert_eq!(one.len(), 1);
        let two = args(&[
            "--src-proxy",
            "/a1",
            "--dst-proxy",
            "/b1",
            "--disk-uri",
            "tcp:h:10810",
            "--disk",
            "/a2,/b2,tcp:h:10811",
        ])
        .unwrap();
        assert_eq!(two[1].src_proxy, PathBuf::from("/a2"));
        let three = args(&["--disk", "/a1,/b1,tcp:h:1", "--disk", "/a2,/b2,tcp:h:2", "--disk", "/a3,/b3,tcp:h:3"]);
        assert_eq!(three.unwrap().len(), 3);
        for (bad, why) in [
            (vec!["--disk", "/a1,/b1,tcp:h:1", "--disk", "/a1,/b2,tcp:h:2"], "two disks"),
            (vec!["--disk", "/a1,/b1,tcp:h:1", "--disk", "/a2,/b2,tcp:h:1"], "two disks"),
            (vec!["--src-proxy", "/a1", "--disk-uri", "tcp:h:1"], "go together"),
            (vec!["--src-proxy", "/a1", "--dst-proxy", "/b1"], "need --disk-uri"),
            (vec![], "no disk"),
        ] {
            let e = args(&bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
