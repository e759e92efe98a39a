//! The instances `/etc/nbd-row-proxy/NAME.conf` describes, read as systemd reads them for
//! `nbd-row-proxy@NAME.service` (`EnvironmentFile=`): `KEY=VALUE` lines, `#`/`;` comments,
//! lines continued by a trailing backslash, optional quotes, other lines ignored, and the unit's
//! defaults for what a file leaves out.

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

/// The logical lines of an environment file: a line ending in a backslash goes on on the next.
fn logical_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        match line.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(line);
                out.push(std::mem::take(&mut cur));
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Parses one `NAME.conf` (lines that are not `KEY=VALUE` are ignored, as systemd ignores them).
pub fn parse(name: &str, file: &Path, text: &str) -> Instance {
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
    for line in logical_lines(text) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
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
    inst
}

/// The largest conf file read.
const CONF_MAX: u64 = 1 << 20;

/// Every `*.conf` in `dir` (none if the directory does not exist), and the files that could not
/// be read: those matter only for a disk no instance was found for (it may be theirs).
pub fn read_dir(dir: &Path) -> (Vec<Instance>, Vec<String>) {
    use std::io::Read;
    let (mut out, mut unreadable) = (Vec::new(), Vec::new());
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (out, unreadable),
        Err(e) => return (out, vec![format!("{}: {e}", dir.display())]),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let (Some(stem), Some("conf")) =
            (path.file_stem().and_then(|s| s.to_str()), path.extension().and_then(|s| s.to_str()))
        else {
            continue;
        };
        let mut text = String::new();
        let read = std::fs::File::open(&path).and_then(|f| f.take(CONF_MAX).read_to_string(&mut text));
        match read {
            Ok(_) => out.push(parse(stem, &path, &text)),
            Err(e) => unreadable.push(format!("{}: {e}", path.display())),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    (out, unreadable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conf_is_read_as_systemd_reads_it_with_the_units_defaults() {
        let text = "# comment\n; another\nIMAGE=/var/lib/libvirt/images/vm1.raw\nMODE=receive\n\
                    ARGS=\"--listen 0.0.0.0:10810  --tls-creds /etc/pki/qemu\"\n\nRUST_LOG='debug'\n";
        let i = parse("vm1", Path::new("/etc/nbd-row-proxy/vm1.conf"), text);
        assert_eq!(i.mode, "receive");
        assert_eq!(i.image.as_deref(), Some("/var/lib/libvirt/images/vm1.raw"));
        assert_eq!(i.socket, PathBuf::from("/run/nbd-row-proxy/vm1.sock"));
        assert_eq!(i.control, PathBuf::from("/run/nbd-row-proxy/vm1.ctl"));
        assert_eq!(i.args, ["--listen", "0.0.0.0:10810", "--tls-creds", "/etc/pki/qemu"]);
        assert_eq!(i.rust_log, "debug");
        let i = parse("d", Path::new("d.conf"), "SOCKET=/srv/d.sock\nCONTROL=/srv/d.ctl\n");
        assert_eq!((i.mode.as_str(), i.socket.to_str(), i.image), ("serve", Some("/srv/d.sock"), None));
        // A line that is not KEY=VALUE is ignored, and a trailing backslash continues a line.
        let i = parse("x", Path::new("x.conf"), "IMAGE=/a\nbogus\nARGS=--listen 0.0.0.0:1 \\\n  --insecure\n");
        assert_eq!(i.image.as_deref(), Some("/a"));
        assert_eq!(i.args, ["--listen", "0.0.0.0:1", "--insecure"]);
    }
}
