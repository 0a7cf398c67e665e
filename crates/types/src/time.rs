//! Wall-clock time as milliseconds since the Unix epoch; passed into the engine, never read by it.

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// The current wall-clock time. Only runtimes call this; the engine is handed `now`.
pub fn now_ms() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
