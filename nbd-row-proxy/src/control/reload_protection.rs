//! `reload-protection`: reads the migration streams' TLS credentials and key again (see
//! [`crate::protection`]).

use std::path::PathBuf;
use std::sync::Arc;

use control_api::{ProtectionReply, ReloadProtectionArgs};
use qmp_proto::CommandError;

use super::{refused, Control};

pub async fn run(c: Arc<Control>, args: ReloadProtectionArgs) -> Result<ProtectionReply, CommandError> {
    let live = c.proxy.protection.clone();
    let (tls, key) = (args.tls_creds.map(PathBuf::from), args.auth_key_file.map(PathBuf::from));
    let loaded = tokio::task::spawn_blocking(move || live.reload(tls, key)).await.map_err(refused)?;
    let protection = loaded.map_err(refused)?;
    let files = c.proxy.protection.files();
    tracing::info!(protection = protection.describe(), "reload-protection: protection reloaded");
    Ok(ProtectionReply {
        protection: protection.describe().to_string(),
        tls_creds: files.tls_creds.map(|p| p.display().to_string()),
        auth_key_file: files.auth_key_file.map(|p| p.display().to_string()),
    })
}
