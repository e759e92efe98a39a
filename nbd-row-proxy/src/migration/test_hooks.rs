//! Test hooks: named points where a test can make the proxy wait (`NBD_ROW_PAUSE`).

/// Waits at a named point when the `NBD_ROW_PAUSE` test hook asks for it.
pub async fn pause(point: &str) {
    if let Some(d) = control_api::pause_at(point) {
        tracing::warn!(point, ?d, "pausing ({})", control_api::PAUSE_VAR);
        tokio::time::sleep(d).await;
    }
}
