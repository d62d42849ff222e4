//! Wall-clock helpers: unix milliseconds and RFC 3339 rendering.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Milliseconds since the unix epoch.
pub fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
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
}
