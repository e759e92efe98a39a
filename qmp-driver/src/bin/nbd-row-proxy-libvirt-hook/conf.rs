//! The instances `/etc/nbd-row-proxy/NAME.conf` describes, read as systemd reads them for
//! `nbd-row-proxy@NAME.service` (`EnvironmentFile=`): `KEY=VALUE` lines, `#`/`;` comments,
//! optional quotes, and the unit's defaults for what a file leaves out.

use std::path::{Path, PathBuf};

/// One served disk: what `nbd-row-proxy@NAME.service` would run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// NAME (the file's stem, the unit's instance).
    pub name: String,
    /// The file it came from, for the messages.
    pub file: PathBuf,
    /// `serve` or `receive`.
    pub mode: String,
    /// The image (`IMAGE=`), if the file sets it.
    pub image: Option<String>,
    /// The NBD socket QEMU connects to.
    pub socket: PathBuf,
    /// The control socket.
    pub control: PathBuf,
    /// `ARGS=`, split on whitespace as systemd splits an unquoted `$ARGS`.
    pub args: Vec<String>,
    /// `RUST_LOG=`.
    pub rust_log: String,
}

/// The directory the unit's sockets live in (`RuntimeDirectory=nbd-row-proxy`).
pub const RUN_DIR: &str = "/run/nbd-row-proxy";

/// One value of an environment file: surrounding quotes taken off.
fn unquote(v: &str) -> &str {
    let v = v.trim();
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

/// Parses one `NAME.conf`; `Err` names the line that is not `KEY=VALUE`.
pub fn parse(name: &str, file: &Path, text: &str) -> Result<Instance, String> {
    let mut inst = Instance {
        name: name.to_string(),
        file: file.to_path_buf(),
        mode: "serve".into(),
        image: None,
        socket: Path::new(RUN_DIR).join(format!("{name}.sock")),
        control: Path::new(RUN_DIR).join(format!("{name}.ctl")),
        args: Vec::new(),
        rust_log: "info".into(),
    };
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("{} line {}: not KEY=VALUE: {line:?}", file.display(), n + 1));
        };
        let value = unquote(value);
        match key.trim() {
            "MODE" => inst.mode = value.to_string(),
            "IMAGE" => inst.image = Some(value.to_string()),
            "SOCKET" => inst.socket = PathBuf::from(value),
            "CONTROL" => inst.control = PathBuf::from(value),
            "ARGS" => inst.args = value.split_whitespace().map(str::to_string).collect(),
            "RUST_LOG" => inst.rust_log = value.to_string(),
            _ => {}
        }
    }
    Ok(inst)
}

/// Every `*.conf` in `dir` (none if the directory does not exist). A file that cannot be read
/// or parsed is an error: it may be the very disk the domain needs.
pub fn read_dir(dir: &Path) -> Result<Vec<Instance>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        let (Some(stem), Some("conf")) =
            (path.file_stem().and_then(|s| s.to_str()), path.extension().and_then(|s| s.to_str()))
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        out.push(parse(stem, &path, &text)?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conf_is_read_as_systemd_reads_it_with_the_units_defaults() {
        let text = "# comment\n; another\nIMAGE=/var/lib/libvirt/images/vm1.raw\nMODE=receive\n\
                    ARGS=\"--listen 0.0.0.0:10810  --tls-creds /etc/pki/qemu\"\n\nRUST_LOG='debug'\n";
        let i = parse("vm1", Path::new("/etc/nbd-row-proxy/vm1.conf"), text).unwrap();
        assert_eq!(i.mode, "receive");
        assert_eq!(i.image.as_deref(), Some("/var/lib/libvirt/images/vm1.raw"));
        assert_eq!(i.socket, PathBuf::from("/run/nbd-row-proxy/vm1.sock"));
        assert_eq!(i.control, PathBuf::from("/run/nbd-row-proxy/vm1.ctl"));
        assert_eq!(i.args, ["--listen", "0.0.0.0:10810", "--tls-creds", "/etc/pki/qemu"]);
        assert_eq!(i.rust_log, "debug");
        let i = parse("d", Path::new("d.conf"), "SOCKET=/srv/d.sock\nCONTROL=/srv/d.ctl\n").unwrap();
        assert_eq!((i.mode.as_str(), i.socket.to_str(), i.image), ("serve", Some("/srv/d.sock"), None));
        let e = parse("x", Path::new("/etc/nbd-row-proxy/x.conf"), "IMAGE=/a\nbogus\n").unwrap_err();
        assert!(e.contains("x.conf line 2: not KEY=VALUE"), "{e}");
    }
}
