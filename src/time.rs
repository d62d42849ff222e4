//! Wall-clock helpers: unix milliseconds and RFC 3339 rendering.
//!
//! In the crate's unit tests `now_ms` follows tokio's clock (the wall clock when the calling
//! thread first asked, plus tokio's time since), so `tokio::time::pause()` and `advance` move
//! it with the timers: the broker's timing logic is tested without waiting. The service
//! itself always reads the wall clock.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

fn wall_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Milliseconds since the unix epoch.
#[cfg(not(test))]
pub fn now_ms() -> i64 {
    wall_ms()
}

/// Milliseconds since the unix epoch, on tokio's (pausable) clock.
#[cfg(test)]
pub fn now_ms() -> i64 {
    use tokio::time::Instant;
    thread_local! {
        // Per thread: a paused test runtime runs on its own thread with its own clock.
        static ANCHOR: (i64, Instant) = (wall_ms(), Instant::now());
    }
    ANCHOR
        .with(|(wall, at)| wall + Instant::now().saturating_duration_since(*at).as_millis() as i64)
}

/// RFC 3339 (UTC, second precision) for unix ms.
pub fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .format(&Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_rfc3339() {
        assert_eq!(super::rfc3339(1_637_242_869_500), "2021-11-18T13:41:09Z");
    }

    #[tokio::test(start_paused = true)]
    async fn follows_a_paused_clock() {
        let before = super::now_ms();
        tokio::time::advance(std::time::Duration::from_secs(3600)).await;
        let after = super::now_ms();
        assert!(
            (3_600_000..3_600_050).contains(&(after - before)),
            "{}",
            after - before
        );
        assert!(
            (before - super::wall_ms()).abs() < 5_000,
            "anchored at the wall clock"
        );
    }
}
