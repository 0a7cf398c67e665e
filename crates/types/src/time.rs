//! Wall-clock time as milliseconds since the Unix epoch; passed into the engine, never read by it.

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// Environment variable that shifts this process's clock by a signed number of
/// milliseconds: how the tests run a miner and a validator whose clocks disagree, as two
/// hosts' clocks do. Unset (or unparsable) means no shift.
pub const CLOCK_SKEW_ENV: &str = "TUNENET_CLOCK_SKEW_MS";

/// The shift [`CLOCK_SKEW_ENV`] asks for, read once.
fn skew_ms() -> i64 {
    static SKEW: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *SKEW.get_or_init(|| {
        std::env::var(CLOCK_SKEW_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    })
}

/// The current wall-clock time (shifted by [`CLOCK_SKEW_ENV`] when set). Only runtimes
/// call this; the engine is handed `now`.
pub fn now_ms() -> UnixMillis {
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    real.saturating_add_signed(skew_ms())
}
