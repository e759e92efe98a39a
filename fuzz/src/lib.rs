//! What the state-machine fuzz targets share: one tokio runtime per process, and proxies
//! assembled in a scratch directory under /dev/shm (or the temp directory) that goes away with
//! the process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nbd_row_proxy::harness::Lab;
use tokio::runtime::Runtime;

/// The process's runtime.
pub fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap())
}

/// A scratch directory for this process.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("nbd-row-proxy-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Removed at exit, however libFuzzer ends the process.
        extern "C" fn remove() {
            let _ = std::fs::remove_dir_all(scratch());
        }
        // SAFETY: registering a plain extern "C" function with no arguments.
        unsafe { libc::atexit(remove) };
        dir
    })
}

/// A proxy started with `args` around a fresh `size`-byte image in `dir` (under the scratch
/// directory); `{image}` and `{dir}` in `args` are replaced.
pub fn lab(dir: &str, size: u64, args: &[&str]) -> Lab {
    let dir = scratch().join(dir);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.raw");
    std::fs::File::create(&image).unwrap().set_len(size).unwrap();
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("{image}", image.to_str().unwrap()).replace("{dir}", dir.to_str().unwrap()))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    runtime().block_on(Lab::start(&args)).unwrap()
}
