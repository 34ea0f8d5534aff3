//! Pure pieces of canary tagging: sticky buckets, cookie parsing, client addresses and
//! forced-canary tokens. No hostcalls; `plugin.rs` decides when to use them.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::IpAddr;

type HmacSha256 = Hmac<Sha256>;

/// FNV-1a, 64 bit: stable across versions, platforms and processes (unlike `std`'s hasher), so
/// every gateway replica and every filter version puts a user in the same bucket.
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash
}

/// The sticky bucket of a user key: `fnv1a64(salt, 0x00, key) mod buckets`. The 0 byte keeps
/// `("ab", "c")` and `("a", "bc")` apart.
pub fn sticky_bucket(salt: &[u8], key: &[u8], buckets: u64) -> u64 {
    // Finalizer (from SplitMix64) so nearby keys ("user-1", "user-2") spread over all buckets.
    let mut x = fnv1a64(&[salt, &[0], key]);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    x % buckets.max(1)
}

/// Format `value` as decimal into `buffer`, returning the digits (no allocation).
pub fn decimal(value: u64, buffer: &mut [u8; 20]) -> &[u8] {
    let mut n = value;
    let mut start = buffer.len();
    loop {
        start -= 1;
        if let Some(slot) = buffer.get_mut(start) {
            *slot = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || start == 0 {
            break;
        }
    }
    buffer.get(start..).unwrap_or_default()
}

/// The value of cookie `name` in a `Cookie` header (`a=1; b=2`), without surrounding quotes.
/// `None` if absent or empty.
pub fn cookie_value<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    header.split(|b| *b == b';').find_map(|pair| {
        let pair = trim(pair);
        let eq = pair.iter().position(|b| *b == b'=')?;
        let (key, value) = (pair.get(..eq)?, pair.get(eq + 1..)?);
        if trim(key) != name {
            return None;
        }
        let value = trim(value);
        let value = value
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(value);
        (!value.is_empty()).then_some(value)
    })
}

/// A header value as a key: trimmed, `None` if empty.
pub fn header_key(value: &[u8]) -> Option<&[u8]> {
    let value = trim(value);
    (!value.is_empty()).then_some(value)
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or_default()
}

/// The IP of Envoy's `source.address` property: `1.2.3.4:5678`, `[::1]:5678`, or a bare
/// address (pipes and other non-IP addresses give `None`).
pub fn source_ip(address: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(address).ok()?.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (ip, _port) = rest.split_once(']')?;
        return ip.parse().ok();
    }
    let (ip, _port) = text.rsplit_once(':')?;
    ip.parse().ok()
}

/// Why a forced-canary token was refused (for tests and debugging; the filter only counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not `<digits>.<64 hex digits>`.
    Malformed,
    /// The MAC does not match.
    BadSignature,
    /// The expiry has passed.
    Expired,
    /// The expiry is further away than the configured maximum lifetime.
    TooLong,
    /// The host did not tell the time.
    NoClock,
}

/// Check a token `<unix-expiry>.<hex HMAC-SHA256(secret, "<unix-expiry>")>` at time `now`.
/// The MAC comparison is constant-time (`hmac`'s `verify_slice`).
pub fn verify_token(
    token: &[u8],
    secret: &[u8],
    now: Option<u64>,
    max_lifetime: u64,
) -> Result<(), TokenError> {
    let token = trim(token);
    let dot = token
        .iter()
        .position(|b| *b == b'.')
        .ok_or(TokenError::Malformed)?;
    let (expiry_text, mac_hex) = (
        token.get(..dot).ok_or(TokenError::Malformed)?,
        token.get(dot + 1..).ok_or(TokenError::Malformed)?,
    );
    if expiry_text.is_empty()
        || expiry_text.len() > 19
        || !expiry_text.iter().all(u8::is_ascii_digit)
    {
        return Err(TokenError::Malformed);
    }
    let mut mac_bytes = [0u8; 32];
    if mac_hex.len() != 64 || !decode_hex(mac_hex, &mut mac_bytes) {
        return Err(TokenError::Malformed);
    }
    let mut mac = HmacSha256::new_from_slice(secret).map_err(|_| TokenError::BadSignature)?;
    mac.update(expiry_text);
    mac.verify_slice(&mac_bytes)
        .map_err(|_| TokenError::BadSignature)?;
    let expiry = expiry_text
        .iter()
        .try_fold(0u64, |acc, d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or(TokenError::Malformed)?;
    let now = now.ok_or(TokenError::NoClock)?;
    if expiry < now {
        return Err(TokenError::Expired);
    }
    if expiry - now > max_lifetime {
        return Err(TokenError::TooLong);
    }
    Ok(())
}

/// Make a token valid until `expiry` (unix seconds): what testers send in the forced-canary
/// header. Same as `printf %s "$expiry" | openssl dgst -sha256 -hmac "$secret"`.
pub fn mint_token(secret: &[u8], expiry: u64) -> String {
    let expiry = expiry.to_string();
    let hex = match HmacSha256::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(expiry.as_bytes());
            mac.finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        }
        Err(_) => String::new(),
    };
    format!("{expiry}.{hex}")
}

fn decode_hex(hex: &[u8], out: &mut [u8; 32]) -> bool {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    for (slot, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        match (
            pair.first().copied().and_then(nibble),
            pair.get(1).copied().and_then(nibble),
        ) {
            (Some(high), Some(low)) => *slot = high << 4 | low,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a64(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(&[b"foobar"]), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a64(&[b"foo", b"bar"]), fnv1a64(&[b"foobar"]));
    }

    #[test]
    fn buckets_are_stable_uniform_and_salted() {
        // Pinned values: changing the hash would move users between versions mid-rollout.
        assert_eq!(
            sticky_bucket(b"", b"alice", 10_000),
            sticky_bucket(b"", b"alice", 10_000)
        );
        let pinned: Vec<u64> = ["alice", "bob", "carol"]
            .iter()
            .map(|k| sticky_bucket(b"", k.as_bytes(), 10_000))
            .collect();
        assert_eq!(pinned, vec![806, 7097, 7945]);
        assert_ne!(sticky_bucket(b"r2", b"alice", 10_000), pinned[0]);
        assert_ne!(
            sticky_bucket(b"ab", b"c", 1 << 40),
            sticky_bucket(b"a", b"bc", 1 << 40)
        );
        // 20 000 sequential keys: each decile of 0..100 gets 10% ± 1%.
        let mut deciles = [0u32; 10];
        for i in 0..20_000 {
            let b = sticky_bucket(b"", format!("user-{i}").as_bytes(), 10_000) % 100;
            deciles[(b / 10) as usize] += 1;
        }
        for count in deciles {
            assert!((1800..=2200).contains(&count), "{deciles:?}");
        }
        assert_eq!(sticky_bucket(b"", b"x", 0), 0);
    }

    #[test]
    fn decimal_formats_without_allocating() {
        let mut buffer = [0u8; 20];
        assert_eq!(decimal(0, &mut buffer), b"0");
        assert_eq!(decimal(9_999, &mut buffer), b"9999");
        assert_eq!(decimal(u64::MAX, &mut buffer), b"18446744073709551615");
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let header = b"theme=dark; session=\"abc123\" ;sess=zzz; empty=; x";
        assert_eq!(cookie_value(header, b"session"), Some(&b"abc123"[..]));
        assert_eq!(cookie_value(header, b"sess"), Some(&b"zzz"[..]));
        assert_eq!(cookie_value(header, b"theme"), Some(&b"dark"[..]));
        assert_eq!(cookie_value(header, b"empty"), None);
        assert_eq!(cookie_value(header, b"missing"), None);
        assert_eq!(cookie_value(b"", b"session"), None);
        assert_eq!(cookie_value(b";;;==;", b"session"), None);
        assert_eq!(cookie_value(b"a=b=c", b"a"), Some(&b"b=c"[..]));
        assert_eq!(header_key(b"  u1 "), Some(&b"u1"[..]));
        assert_eq!(header_key(b"   "), None);
    }

    #[test]
    fn source_addresses_parse() {
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        assert_eq!(source_ip(b"127.0.0.1:51234"), ip("127.0.0.1"));
        assert_eq!(source_ip(b"[::1]:80"), ip("::1"));
        assert_eq!(source_ip(b"[::ffff:10.0.0.1]:80"), ip("::ffff:10.0.0.1"));
        assert_eq!(source_ip(b"10.0.0.9"), ip("10.0.0.9"));
        assert_eq!(source_ip(b"fd00::1"), ip("fd00::1"));
        assert_eq!(source_ip(b"/var/run/envoy.sock"), None);
        assert_eq!(source_ip(b"\xff\xfe"), None);
        assert_eq!(source_ip(b""), None);
    }

    #[test]
    fn tokens_verify_expire_and_resist_tampering() {
        let now = 1_700_000_000;
        let week = 7 * 24 * 3600;
        let token = mint_token(SECRET, now + 3600);
        assert_eq!(
            verify_token(token.as_bytes(), SECRET, Some(now), week),
            Ok(())
        );
        // Same token as openssl: printf %s 1700003600 | openssl dgst -sha256 -hmac "$SECRET".
        assert_eq!(
            token,
            "1700003600.7656021ecc61e9e58a2dba63e91e4bd056cbd013458a30f4a585fefb526887be"
        );
        let upper = token.to_ascii_uppercase();
        assert_eq!(
            verify_token(upper.as_bytes(), SECRET, Some(now), week),
            Ok(())
        );
        assert_eq!(
            verify_token(token.as_bytes(), SECRET, Some(now + 3601), week),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify_token(
                token.as_bytes(),
                b"another secret of 32 bytes......",
                Some(now),
                week
            ),
            Err(TokenError::BadSignature)
        );
        // Moving the expiry invalidates the MAC.
        let moved = token.replacen("1700003600", "1700009999", 1);
        assert_eq!(
            verify_token(moved.as_bytes(), SECRET, Some(now), week),
            Err(TokenError::BadSignature)
        );
        let far = mint_token(SECRET, now + week + 1);
        assert_eq!(
            verify_token(far.as_bytes(), SECRET, Some(now), week),
            Err(TokenError::TooLong)
        );
        assert_eq!(
            verify_token(token.as_bytes(), SECRET, None, week),
            Err(TokenError::NoClock)
        );
        for bad in [
            &b"canary"[..],
            b"",
            b".",
            b"123.",
            b".abcd",
            b"12a.00",
            b"99999999999999999999.00",
            &token.as_bytes()[..token.len() - 1],
            b"1700003600.zz11bd8db1ac4ab2b94bd5ac7b0fa8ff3e5e92b2f6a4bd27bc5e20c46cd73c7e",
            "1700003600.é8e1bd8db1ac4ab2b94bd5ac7b0fa8ff3e5e92b2f6a4bd27bc5e20c46cd73c".as_bytes(),
        ] {
            assert_eq!(
                verify_token(bad, SECRET, Some(now), week),
                Err(TokenError::Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
