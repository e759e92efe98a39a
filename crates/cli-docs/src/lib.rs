//! Man pages and shell completions generated from a binary's clap definition.
//!
//! Each binary of the workspace calls [`hook`] first thing in `main`: run as
//! `BINARY --generate-docs DIR` it writes its pages and completions under `DIR` and exits, so
//! the Debian package (`scripts/package`) and an operator who installed with `cargo install`
//! get documentation that always matches the flags of the binary they have. Nothing generated
//! is committed.
//!
//! The layout under `DIR` mirrors where the files go once installed:
//!
//! ```text
//! man/man1/NAME.1              the binary: synopsis, options, subcommands, see also
//! man/man1/NAME-SUB.1          one page per subcommand, with its own options
//! completions/bash/NAME        /usr/share/bash-completion/completions/NAME
//! completions/zsh/_NAME        /usr/share/zsh/vendor-completions/_NAME
//! completions/fish/NAME.fish   /usr/share/fish/vendor_completions.d/NAME.fish
//! ```

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Command;
use clap_complete::Shell;

/// The first argument that asks a binary for its documentation instead of running. It is read
/// before clap parses anything, so it appears in no `--help` and no completion.
pub const FLAG: &str = "--generate-docs";

/// The shells completions are written for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Where the completion script for `shell` goes under the output directory.
pub fn completion_path(shell: Shell, name: &str) -> PathBuf {
    let file = match shell {
        Shell::Zsh => format!("_{name}"),
        Shell::Fish => format!("{name}.fish"),
        _ => name.to_string(),
    };
    Path::new("completions").join(shell.to_string()).join(file)
}

/// Subcommands that get a page of their own: the visible ones.
fn subcommands(cmd: &Command) -> impl Iterator<Item = &Command> {
    cmd.get_subcommands().filter(|s| !s.is_hide_set())
}

/// Renders one page, followed by a SEE ALSO section naming `see_also` (page names, section 1).
fn render_page(cmd: Command, see_also: &[String]) -> io::Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut page)?;
    if !see_also.is_empty() {
        let refs: Vec<String> = see_also.iter().map(|p| format!("\\fB{}\\fR(1)", p.replace('-', "\\-"))).collect();
        writeln!(page, ".SH \"SEE ALSO\"\n{}", refs.join(", "))?;
    }
    Ok(page)
}

/// Every file for `cmd`, as (path under the output directory, contents). `related` names other
/// binaries' pages the SEE ALSO sections point to.
pub fn render(cmd: Command, related: &[&str]) -> io::Result<Vec<(PathBuf, Vec<u8>)>> {
    // clap's own `help` subcommand is no page of its own, so the pages do not list it.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let name = cmd.get_name().to_string();
    let man = Path::new("man").join("man1");
    let mut files = Vec::new();

    let mut see_also: Vec<String> = subcommands(&cmd).map(|s| format!("{name}-{}", s.get_name())).collect();
    see_also.extend(related.iter().map(|r| r.to_string()));
    files.push((man.join(format!("{name}.1")), render_page(cmd.clone(), &see_also)?));
    for sub in subcommands(&cmd) {
        let page = format!("{name}-{}", sub.get_name());
        // The page is named NAME-SUB; its synopsis shows how it is typed, `NAME SUB`.
        let bin_name = format!("{name} {}", sub.get_name());
        let sub = sub.clone().name(page.clone()).display_name(page.clone()).bin_name(bin_name);
        let mut refs = vec![name.clone()];
        refs.extend(related.iter().map(|r| r.to_string()));
        files.push((man.join(format!("{page}.1")), render_page(sub, &refs)?));
    }
    for shell in SHELLS {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut script);
        if shell == Shell::Bash {
            script = fix_bash_labels(&script, &name);
        }
        files.push((completion_path(shell, &name), script));
    }
    Ok(files)
}

/// The separator clap_complete's bash script puts between a command and its subcommand in the
/// names its `cmd` variable takes (`nbd__row__proxy__subcmd__serve`).
const BASH_SUBCMD: &str = "__subcmd__";

/// Makes the bash script of a binary whose name has a dash complete its subcommands:
/// clap_complete (4.6) sets `cmd` to `nbd__row__proxy__subcmd__serve` (the name's dashes as
/// `__`) but labels that subcommand's case `nbd__subcmd__row__subcmd__proxy__subcmd__serve` (the
/// name's dashes as `__subcmd__`), so no subcommand's options were ever offered. The labels are
/// rewritten to what `cmd` holds; a name without a dash is left as it is.
fn fix_bash_labels(script: &[u8], name: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(script);
    let wrong = format!("{}{BASH_SUBCMD}", name.replace('-', BASH_SUBCMD));
    let right = format!("{}{BASH_SUBCMD}", name.replace('-', "__"));
    text.replace(&wrong, &right).into_bytes()
}

/// Writes every file for `cmd` under `out`; returns the paths written.
pub fn generate(cmd: Command, related: &[&str], out: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (rel, contents) in render(cmd, related)? {
        let path = out.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, contents)?;
        written.push(path);
    }
    Ok(written)
}

/// What [`hook`] does with the process's arguments: `None` to run the binary as usual,
/// `Some(Ok(dir))` to generate into `dir`, `Some(Err(usage))` when the directory is missing.
pub fn requested(args: impl IntoIterator<Item = OsString>) -> Option<Result<PathBuf, String>> {
    let mut args = args.into_iter().skip(1);
    if args.next()? != FLAG {
        return None;
    }
    Some(match (args.next(), args.next()) {
        (Some(dir), None) => Ok(PathBuf::from(dir)),
        _ => Err(format!("usage: {FLAG} DIR")),
    })
}

/// Called first thing in a binary's `main`: when the arguments are `--generate-docs DIR`,
/// writes the man pages and completions of `cmd()` under `DIR` and returns the exit code to
/// end with; otherwise returns `None` and the binary runs as usual.
pub fn hook(cmd: impl FnOnce() -> Command, related: &[&str]) -> Option<ExitCode> {
    let dir = match requested(std::env::args_os())? {
        Ok(dir) => dir,
        Err(usage) => {
            eprintln!("{usage}");
            return Some(ExitCode::from(2));
        }
    };
    let cmd = cmd();
    let name = cmd.get_name().to_string();
    Some(match generate(cmd, related, &dir) {
        Ok(files) => {
            // The list is informative: a closed stdout (`| head`) is no failure.
            let mut stdout = io::stdout().lock();
            for f in files {
                let _ = writeln!(stdout, "{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: writing documentation into {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn sample() -> Command {
        Command::new("tool")
            .version("1.2.3")
            .about("A sample tool")
            .subcommand(Command::new("serve").about("Serve it").arg(Arg::new("image").long("image").required(true)))
            .subcommand(Command::new("secret").hide(true))
            .arg(Arg::new("verbose").long("verbose").action(ArgAction::SetTrue))
    }

    #[test]
    fn pages_and_completions_for_every_visible_subcommand() {
        let files = render(sample(), &["other"]).unwrap();
        let names: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
        assert_eq!(
            names,
            [
                "man/man1/tool.1",
                "man/man1/tool-serve.1",
                "completions/bash/tool",
                "completions/zsh/_tool",
                "completions/fish/tool.fish"
            ]
        );
        let top = String::from_utf8(files[0].1.clone()).unwrap();
        assert!(top.contains("\\-\\-verbose") && top.contains("SEE ALSO") && top.contains("tool\\-serve"), "{top}");
        assert!(top.contains("other"), "{top}");
        assert!(!top.contains("secret"), "{top}");
        assert!(!top.contains("tool\\-help"), "clap's help subcommand has no page: {top}");
        let serve = String::from_utf8(files[1].1.clone()).unwrap();
        assert!(serve.contains("\\-\\-image") && serve.contains("tool serve"), "{serve}");
    }

    #[test]
    fn bash_case_labels_match_what_cmd_is_set_to() {
        let cmd = Command::new("my-tool")
            .subcommand(Command::new("serve").arg(Arg::new("image").long("image")))
            .subcommand(Command::new("tls-certs").arg(Arg::new("out").long("out")));
        let files = render(cmd, &[]).unwrap();
        let (_, bash) = files.iter().find(|(p, _)| p.ends_with("completions/bash/my-tool")).unwrap();
        let bash = String::from_utf8(bash.clone()).unwrap();
        // Every name `cmd` is set to has a case of its own, and no case is unreachable.
        let set: Vec<&str> = bash
            .lines()
            .filter_map(|l| l.trim().strip_prefix("cmd=\"")?.strip_suffix('"'))
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(set, ["my__tool", "my__tool__subcmd__serve", "my__tool__subcmd__tls__subcmd__certs"], "{bash}");
        for c in &set {
            assert!(bash.contains(&format!("\n        {c})\n")), "no case for {c}:\n{bash}");
        }
        assert!(!bash.contains("my__subcmd__tool"), "{bash}");
    }

    #[test]
    fn the_hook_only_answers_its_flag() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(requested(args(&["bin", "serve", "--image", "x"])), None);
        assert_eq!(requested(args(&["bin"])), None);
        assert_eq!(requested(args(&["bin", FLAG, "out"])), Some(Ok(PathBuf::from("out"))));
        assert!(matches!(requested(args(&["bin", FLAG])), Some(Err(_))));
        assert!(matches!(requested(args(&["bin", FLAG, "a", "b"])), Some(Err(_))));
    }

    #[test]
    fn generate_writes_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let written = generate(sample(), &[], dir.path()).unwrap();
        assert_eq!(written.len(), 5);
        assert!(dir.path().join("completions/zsh/_tool").is_file());
        assert!(dir.path().join("man/man1/tool-serve.1").is_file());
    }
}
