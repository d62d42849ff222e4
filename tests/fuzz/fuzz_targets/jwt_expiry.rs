//! JWT expiry decoding and the skew arithmetic on arbitrary tokens and numbers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use token_broker::issuers::expiry;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let exp = expiry::jwt_exp(&text);
    let n = data.iter().take(8).fold(0i64, |a, b| a.wrapping_shl(8) | *b as i64);
    let _ = expiry::expires_at_ms(n, Some(n), exp, Some(n as u64));
    let _ = expiry::skew_ms(n);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = expiry::parse_expires_in(&v);
    }
});
