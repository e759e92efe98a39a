//! `query-digest`: SHA-256 of the disk as the guest sees it, so two hosts can check they hold
//! the same disk before a switchover.

use std::sync::Arc;
use std::time::Instant;

use control_api::{DigestReply, NoArgs};
use qmp_proto::CommandError;
use row_store::{BlockBackend, Disk};
use sha2::{Digest, Sha256};

use super::{refused, Control};

/// Bytes hashed per read.
const CHUNK: u64 = 4 << 20;

fn digest(disk: &Disk) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = Vec::with_capacity(CHUNK as usize);
    let mut pos = 0u64;
    while pos < disk.size() {
        let n = (disk.size() - pos).min(CHUNK) as usize;
        buf.clear();
        disk.read_append(&mut buf, n, pos)?;
        hasher.update(&buf);
        pos += n as u64;
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

pub async fn run(c: Arc<Control>, _: NoArgs) -> Result<DigestReply, CommandError> {
    let disk = c.proxy.disk.clone();
    let started = Instant::now();
    let sha256 = tokio::task::spawn_blocking(move || digest(&disk)).await.map_err(refused)?.map_err(refused)?;
    Ok(DigestReply { sha256, size: c.proxy.disk.size(), seconds: started.elapsed().as_secs_f64() })
}
