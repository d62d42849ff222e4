//! When a partner token expires and when the broker stops handing it out.
//!
//! The JWT `exp` is read by decoding the payload without verifying it: the partner is the
//! authority on its own tokens. `jsonwebtoken::decode` is not used here because it insists on a
//! key and on a header `alg` it knows, neither of which matters for reading one claim.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

/// Longest partner token payload worth decoding.
const MAX_JWT_LEN: usize = 16 * 1024;

/// The `exp` claim (unix seconds) of a JWT-shaped token, if it has one.
pub fn jwt_exp(token: &str) -> Option<i64> {
    if token.len() > MAX_JWT_LEN {
        return None;
    }
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    match claims.get("exp")? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        _ => None,
    }
}

/// An `expires_in` value: a positive number, or a string holding one.
pub fn parse_expires_in(v: &Value) -> Option<i64> {
    let secs = match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))?,
        Value::String(s) => s.trim().parse::<i64>().ok()?,
        _ => return None,
    };
    (secs > 0).then_some(secs)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExpiryError {
    #[error("the token carries no expiry (no expires_in, no JWT exp) and the tenant has no default_ttl_seconds")]
    Unknown,
    #[error("the token was already expired when it arrived")]
    AlreadyExpired,
}

/// The longest lifetime the broker believes: a partner announcing more (an `expires_in` of
/// 9e15, a JWT `exp` in the year 2e11) gets its token cached for a year at most, and no
/// arithmetic on lifetimes can overflow.
pub const MAX_LIFETIME_MS: i64 = 365 * 86_400_000;

/// `expires_at` in unix ms: the earliest of `sent_at + expires_in` and the JWT `exp`, else
/// `sent_at + default_ttl`, at most `sent_at + MAX_LIFETIME_MS`. Lifetimes count from when
/// the request was sent.
pub fn expires_at_ms(
    sent_at_ms: i64,
    expires_in: Option<i64>,
    jwt_exp: Option<i64>,
    default_ttl: Option<u64>,
) -> Result<i64, ExpiryError> {
    let from_in = expires_in.map(|s| sent_at_ms.saturating_add(s.saturating_mul(1000)));
    let from_jwt = jwt_exp.map(|s| s.saturating_mul(1000));
    let at = match (from_in, from_jwt) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => {
            let ttl = default_ttl.ok_or(ExpiryError::Unknown)?;
            sent_at_ms.saturating_add((ttl as i64).saturating_mul(1000))
        }
    };
    if at <= sent_at_ms {
        return Err(ExpiryError::AlreadyExpired);
    }
    Ok(at.min(sent_at_ms.saturating_add(MAX_LIFETIME_MS)))
}

/// How long before `expires_at` the broker stops handing a token out: about the square root
/// of the lifetime in seconds (4 s for 20 s, 30 s for 15 min, 3.5 min for 12 h), at most a
/// quarter of the lifetime.
pub fn skew_ms(lifetime_ms: i64) -> i64 {
    let lifetime_ms = lifetime_ms.max(0);
    let sqrt_ms = ((lifetime_ms as f64 / 1000.0).sqrt() * 1000.0) as i64;
    sqrt_ms.min(lifetime_ms / 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The sample access token from Setu's "Generate partner token" page.
    const SETU_SAMPLE: &str = "eyJhbGciOiJSUzI1NiIsInR5cCIgOiAiSldUIiwia2lkIiA6ICJQMmNLU05oQ1dIbHRyVjExRldMMHE0M3dzN1FJOWN2cExhdU1pQ3pOZ09vIn0.eyJleHAiOjE2MzcyNDI4NjksImlhdCI6MTYzNzI0MjU2OSwianRpIjoiN2I4Y2NlOGQtOWI4ZC00NWFjLWE1NWQtZDBhMWM2MmVkMTMxIiwiaXNzIjoiaHR0cHM6Ly9hdXRoLWRldi5zZXR1LmNvL2F1dGgvcmVhbG1zL2ZkIiwiYXVkIjoiYWNjb3VudCIsInN1YiI6IjVlMGVlZGIwLWQyZDktNDg4My04ZmI0LTIxY2RjZjZiNzFmMCIsInR5cCI6IkJlYXJlciIsImF6cCI6InRlc3QiLCJzZXNzaW9uX3N0YXRlIjoiMDAwMjM0ODItNTBjOC00YzdjLWJkODgtNzllZTE5NzVhOTFhIiwiYWNyIjoiMSIsInJlYWxtX2FjY2VzcyI6eyJyb2xlcyI6WyJvZmZsaW5lX2FjY2VzcyIsInVtYV9hdXRob3JpemF0aW9uIl19LCJyZXNvdXJjZV9hY2Nlc3MiOnsiYWNjb3VudCI6eyJyb2xlcyI6WyJtYW5hZ2UtYWNjb3VudCIsIm1hbmFnZS1hY2NvdW50LWxpbmtzIiwidmlldy1wcm9maWxlIl19fSwic2NvcGUiOiJwcm9maWxlIGVtYWlsIiwiZW1haWxfdmVyaWZpZWQiOmZhbHNlLCJjbGllbnRIb3N0IjoiMzUuMjQ0LjQ4LjcxIiwiY2xpZW50SWQiOiJ0ZXN0IiwiZ3JvdXBzIjpbIm9mZmxpbmVfYWNjZXNzIiwidW1hX2F1dGhvcml6YXRpb24iXSwicHJlZmVycmVkX3VzZXJuYW1lIjoic2VydmljZS1hY2NvdW50LXRlc3QiLCJjbGllbnRBZGRyZXNzIjoiMzUuMjQ0LjQ4LjcxIn0.RkbgE1K8JgoUewkbOTK19TKPma2hiTv-qcg2SW7CZEaeiroKljDByVeeWVNVmThPmm4ExnZvj6L8k4pRSUsbBqeYBaji6qhx6w0S5z7hDq-A6P4wBXTVf_k5m_yv3zARNdcASxNJMwjK0QuJG6T5-L44HCfxrQuvsOGp9sNCXs_VS1lemUesgdoz_8WIGkOSdfE1y_gD3GsDe8pxNpJhpJ_T9tjhMSVV_NeM72Q7mrmVyaC99wIHUuPRf36A5_x9Rwwg36Hhmwn9hsk2AyMn2eVK7jbWBBsfzMdDMm6DtvMxoNz_tOoYOdgmK8U4uVrnA9WajL4tvWQfwgghPvOLhg";
    /// The sample access token from Comm100's Partner API quick start.
    const COMM100_SAMPLE: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6ImF0K2p3dCJ9.eyJuYmYiOjE2NTI5MzkzOTEsImV4cCI6MTY1Mjk4MjU5MSwiaXNzIjoiaHR0cDovL2ludGVybmFscGFydG5lci50ZXN0aW5nLmNvbW0xMDBkZXYuaW8iLCJhdWQiOiJpZHMucmVzb3VyY2UuMSIsImNsaWVudF9pZCI6ImRhdGFzeW5jIDEwMDAwIiwic3ViIjoiYmZlYjQ1ZDctNTBkYy00MTZkLWIzYzgtMzVkYjY0ZDI4OGYzIiwiYXV0aF90aW1lIjoxNjUyOTM5MzkxLCJpZHAiOiJsb2NhbCIsInVzZXJJZCI6ImJmZWI0NWQ3LTUwZGMtNDE2ZC1iM2M4LTM1ZGI2NGQyODhmMyIsInBhcnRuZXJJZCI6IjEwMDAwIiwidGh1bWJwcmludCI6Ijk2MTY2Q0EzQjM0QUJGMkQwNERGOTZBMDE1QkJEREQwOUIwQTdDNTkiLCJzdWNjZXNzIjoiVHJ1ZSIsInJvbGUiOiJVc2VyIiwianRpIjoiODVFNzUzQTYwRDY4MzI4MjlEMkU4MDEwNUU3NTAwNjIiLCJpYXQiOjE2NTI5MzkzOTEsInNjb3BlIjpbImlkcy5zY29wZSIsIm9wZW5pZCIsInByb2ZpbGUiLCJvZmZsaW5lX2FjY2VzcyJdLCJhbXIiOlsicHdkIl19.ADZQq2R3-zJl_Bg9jOUREvrXvvmLc669iZSUZhU6oRmd6vu1UXU8VkXgxQZSk4pFxCW7j2UGuDi0jTF27e5W4PzyGWmE-qj9gE-iY9b7PSOPwYENS8rylFwB3dL7f_qlQCbzQ2kUoCoAlIPLqVbQHN76ftMoo57Ge9rg0xOw-BJT4GBKiflgE6dz8ikQhlg7_DAM-JY51Vk7bmsvny356P5Rv5cdJnBvrCCqAJeV-Y5jzUblAKx61HSZE9gBoRhYOprYgK37pw3XMqG9H5BvCr32DSufA0U91rA1sOX945yNLrYAAsDHlMO2-nmEHgOMFrnIOvzsgjnMktcxkR0NQG";

    #[test]
    fn reads_sample_exp_claims() {
        assert_eq!(jwt_exp(SETU_SAMPLE), Some(1_637_242_869));
        assert_eq!(jwt_exp(COMM100_SAMPLE), Some(1_652_982_591));
    }

    #[test]
    fn setu_sample_lives_300s_from_its_iat() {
        let iat_ms = 1_637_242_569_000;
        let at = expires_at_ms(iat_ms, None, jwt_exp(SETU_SAMPLE), Some(900)).unwrap();
        assert_eq!(
            at - iat_ms,
            300_000,
            "the JWT exp beats the documented 15 minutes"
        );
    }

    #[test]
    fn comm100_sample_lives_43200s() {
        let nbf_ms = 1_652_939_391_000;
        let at = expires_at_ms(nbf_ms, Some(43_200), jwt_exp(COMM100_SAMPLE), None).unwrap();
        assert_eq!(at - nbf_ms, 43_200_000);
    }

    #[test]
    fn earliest_wins_then_default() {
        assert_eq!(expires_at_ms(0, Some(100), Some(50), None), Ok(50_000));
        assert_eq!(expires_at_ms(0, Some(10), Some(50), None), Ok(10_000));
        assert_eq!(expires_at_ms(0, None, None, Some(7)), Ok(7_000));
        assert_eq!(
            expires_at_ms(0, None, None, None),
            Err(ExpiryError::Unknown)
        );
        assert_eq!(
            expires_at_ms(100_000, None, Some(50), None),
            Err(ExpiryError::AlreadyExpired)
        );
    }

    #[test]
    fn non_jwt_tokens_have_no_exp() {
        for t in [
            "F13741023427FFB7404FDE64EF485D858721D88A488763592B08CF303E721BE0",
            "a.b.c",
            "a.e30.c",
            "a.eyJleHAiOiJzb29uIn0.c",
            "",
            "...",
        ] {
            assert_eq!(jwt_exp(t), None, "{t}");
        }
    }

    #[test]
    fn expires_in_forms() {
        assert_eq!(parse_expires_in(&json!(43200)), Some(43200));
        assert_eq!(parse_expires_in(&json!("3599")), Some(3599));
        assert_eq!(parse_expires_in(&json!(3599.9)), Some(3599));
        assert_eq!(parse_expires_in(&json!(0)), None);
        assert_eq!(parse_expires_in(&json!(-5)), None);
        assert_eq!(parse_expires_in(&json!("soon")), None);
        assert_eq!(parse_expires_in(&json!(null)), None);
    }

    #[test]
    fn absurd_lifetimes_are_clamped_to_a_year() {
        let sent = 1_700_000_000_000;
        for (expires_in, exp) in [
            (Some(9_000_000_000_000_000), None),
            (Some(i64::MAX), None),
            (parse_expires_in(&json!(1e300)), None),
            (None, Some(i64::MAX)),
        ] {
            assert_eq!(
                expires_at_ms(sent, expires_in, exp, None).unwrap(),
                sent + MAX_LIFETIME_MS
            );
        }
        assert_eq!(
            expires_at_ms(sent, Some(300), None, None).unwrap(),
            sent + 300_000,
            "ordinary lifetimes are untouched"
        );
    }

    #[test]
    fn skew_scales_with_lifetime() {
        assert_eq!(skew_ms(20_000), 4_472);
        assert_eq!(skew_ms(900_000), 30_000);
        assert!((200_000..=220_000).contains(&skew_ms(43_200_000)));
        assert_eq!(skew_ms(2_000), 500);
        assert_eq!(skew_ms(-1), 0);
    }
}
