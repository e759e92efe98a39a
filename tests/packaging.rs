//! What the Debian package ships, checked without installing it: the generated man pages and
//! completions name every subcommand and flag `--help` shows, and the systemd unit, the
//! example configuration and the libvirt example agree with each other and with the proxy
//! (its drain time, its sockets). `scripts/package --check` installs the package itself.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use e2e::*;

/// The long flags a `--help` text lists (`--image <IMAGE>`, `-h, --help`, ...).
fn flags_in_help(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| l.split([' ', ',', '=', '<', '[']).filter(|w| w.starts_with("--")).map(str::to_string))
        .collect()
}

/// The subcommands a `--help` text lists under `Commands:` (without `help`).
fn subcommands_in_help(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

fn help(bin_name: &str, sub: Option<&str>) -> String {
    let mut cmd = Command::new(bin(bin_name));
    cmd.args(sub).arg("--help");
    String::from_utf8(run_ok(&mut cmd).stdout).unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// roff escapes the dashes of a flag.
fn roff(flag: &str) -> String {
    flag.replace('-', "\\-")
}

#[test]
fn generated_pages_and_completions_name_every_subcommand_and_flag() {
    let out = tempfile::tempdir().unwrap();
    for b in ["nbd-row-proxy", "row-migrate", "nbd-row-proxy-libvirt-hook"] {
        let listed = run_ok(Command::new(bin(b)).arg("--generate-docs").arg(out.path())).stdout;
        assert!(String::from_utf8_lossy(&listed).contains(&format!("man/man1/{b}.1")));
        let man = |page: &str| read(&out.path().join(format!("man/man1/{page}.1")));
        let top_help = help(b, None);
        let top = man(b);
        assert!(top.contains(".SH SYNOPSIS") && top.contains("SEE ALSO"), "{top}");
        let bash = read(&out.path().join(format!("completions/bash/{b}")));
        let zsh = read(&out.path().join(format!("completions/zsh/_{b}")));
        let fish = read(&out.path().join(format!("completions/fish/{b}.fish")));

        let mut pages = vec![(b.to_string(), top_help.clone())];
        for sub in subcommands_in_help(&top_help) {
            assert!(top.contains(&roff(&format!("{b}-{sub}"))), "{b}(1) does not name {sub}");
            assert!(bash.contains(&sub) && zsh.contains(&sub) && fish.contains(&sub), "{sub} not completed");
            pages.push((format!("{b}-{sub}"), help(b, Some(&sub))));
        }
        if b == "nbd-row-proxy" {
            assert_eq!(pages.len(), 5, "serve, receive, tls-certs and retire expected");
        }
        for (page, help) in pages {
            let text = man(&page);
            let flags = flags_in_help(&help);
            assert!(flags.len() >= 2, "{page}: no flags found in --help:\n{help}");
            for flag in flags {
                assert!(text.contains(&roff(&flag)), "man page {page} does not name {flag}");
                // Completions: bash lists flags as they are typed, zsh and fish by name.
                let name = flag.trim_start_matches('-');
                assert!(bash.contains(&flag), "bash completion of {b} lacks {flag}");
                assert!(zsh.contains(&flag), "zsh completion of {b} lacks {flag}");
                assert!(fish.contains(&format!("-l {name}")), "fish completion of {b} lacks {flag}");
            }
        }
        // Rendered by man itself, when it is here.
        if Path::new("/usr/bin/man").exists() {
            let page = out.path().join(format!("man/man1/{b}.1"));
            let text = run_ok(Command::new("man").arg("-l").arg(&page).env("MANWIDTH", "80")).stdout;
            assert!(String::from_utf8_lossy(&text).contains("SYNOPSIS"));
        }
    }
}

/// `KEY=VALUE` of a unit file's `[Service]` section (last one wins; `Environment=` kept apart).
fn unit_settings(unit: &str) -> (std::collections::HashMap<String, String>, Vec<String>) {
    let (mut settings, mut env) = (std::collections::HashMap::new(), Vec::new());
    for line in unit.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        if let Some((k, v)) = line.split_once('=') {
            if k == "Environment" {
                env.push(v.to_string());
            } else {
                settings.insert(k.to_string(), v.to_string());
            }
        }
    }
    (settings, env)
}

#[test]
fn the_unit_stops_within_the_drain_time_and_agrees_with_the_examples() {
    let root = repo_root();
    let unit = read(&root.join("packaging/systemd/nbd-row-proxy@.service"));
    let (s, env) = unit_settings(&unit);
    assert_eq!(s["Type"], "notify", "the proxy sends READY=1");
    assert_eq!(s["KillSignal"], "SIGTERM");
    assert_eq!(s["EnvironmentFile"], "/etc/nbd-row-proxy/%i.conf");
    assert_eq!(s["RuntimeDirectory"], "nbd-row-proxy");
    assert_eq!(s["RuntimeDirectoryPreserve"], "yes", "instances share /run/nbd-row-proxy");
    assert!(s["ExecStart"].starts_with("/usr/bin/nbd-row-proxy ${MODE} --image ${IMAGE}"), "{}", s["ExecStart"]);
    let stop: u64 = s["TimeoutStopSec"].trim_end_matches('s').parse().unwrap();
    let drain = nbd_row_proxy::server::DRAIN_TIMEOUT.as_secs();
    assert!(stop >= drain + 10, "TimeoutStopSec={stop}s leaves no room for the {drain}s drain and the flush");
    assert!(env.contains(&"SOCKET=/run/nbd-row-proxy/%i.sock".to_string()), "{env:?}");

    // The example configuration, the unit's default socket and the libvirt example agree.
    let conf = read(&root.join("packaging/debian/example.conf"));
    assert!(conf.lines().any(|l| l.starts_with("IMAGE=")), "{conf}");
    assert!(conf.contains("#SOCKET=/run/nbd-row-proxy/vm1.sock"), "{conf}");
    let xml = read(&root.join("packaging/libvirt/vm1.xml"));
    assert!(xml.contains("<host transport='unix' socket='/run/nbd-row-proxy/vm1.sock'/>"), "{xml}");
    assert!(xml.contains("<source protocol='nbd'>"), "{xml}");

    // systemd's own check, on an instance whose ExecStart is the built binary (the installed
    // one is checked by scripts/package --check); the man: links need the installed pages.
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let dir = tempfile::tempdir().unwrap();
        let local: String = unit
            .lines()
            .filter(|l| !l.starts_with("Documentation="))
            .map(|l| l.replace("/usr/bin/nbd-row-proxy", &bin("nbd-row-proxy").display().to_string()) + "\n")
            .collect();
        let path = dir.path().join("nbd-row-proxy@vm1.service");
        std::fs::write(&path, local).unwrap();
        let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
        let findings = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && findings.trim().is_empty(), "systemd-analyze verify:\n{findings}");
    }
}
