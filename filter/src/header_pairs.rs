//! A whole header map as `proxy_get_header_map_pairs` returns it, and the three values the log
//! phase wants from the response headers when `clusterHeader` is set.
//!
//! One such read costs Envoy less than the `xds.cluster_name` property and the `:status`
//! header read separately (docs/filter-performance.md has the numbers): each value through the
//! ABI is a hostcall plus a VM entry into the module's allocator, and the property lookup is
//! the dearer of the two.
//!
//! The serialization (proxy-wasm ABI 0.2.1, little-endian): the number of pairs `n` as a u32,
//! then `n` times the name's and the value's sizes as two u32s, then each name and each value
//! followed by a NUL byte. Anything malformed ends the walk: the pairs read so far stand, the
//! rest are treated as absent (the log phase then falls back to its single reads).

use crate::plugin::{parse_grpc_status, parse_status};

/// The (name, value) pairs of a serialized header map, in order; stops at the first
/// inconsistency instead of failing.
pub fn pairs(map: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let count = word(map, 0).unwrap_or(0);
    let sizes_end = count.checked_mul(8).and_then(|n| n.checked_add(4));
    let mut data = sizes_end.unwrap_or(usize::MAX);
    (0..count).map_while(move |index| {
        let sizes = index.checked_mul(8)?.checked_add(4)?;
        let (name_len, value_len) = (word(map, sizes)?, word(map, sizes.checked_add(4)?)?);
        let name = map.get(data..data.checked_add(name_len)?)?;
        let value_start = data.checked_add(name_len)?.checked_add(1)?;
        let value = map.get(value_start..value_start.checked_add(value_len)?)?;
        data = value_start.checked_add(value_len)?.checked_add(1)?;
        Some((name, value))
    })
}

fn word(map: &[u8], at: usize) -> Option<usize> {
    let bytes: [u8; 4] = map.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(bytes)).ok()
}

/// What the log phase takes from the response headers in `clusterHeader` mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseHeaders {
    /// The value of `clusterHeader` (the upstream cluster's name), if the route set it.
    pub cluster: Option<Vec<u8>>,
    /// `:status`; `None`: no response was sent.
    pub status: Option<u16>,
    /// `grpc-status` (a trailers-only gRPC response carries it here).
    pub grpc_status: Option<u32>,
}

impl ResponseHeaders {
    /// Pick `cluster_header` (lowercase, as Envoy stores names), `:status` and `grpc-status`
    /// from a serialized response header map.
    pub fn from_map(map: &[u8], cluster_header: &str) -> Self {
        let mut found = ResponseHeaders::default();
        for (name, value) in pairs(map) {
            match name {
                b":status" => found.status = parse_status(value),
                b"grpc-status" => found.grpc_status = parse_grpc_status(value),
                _ if name == cluster_header.as_bytes() && !value.is_empty() => {
                    found.cluster = Some(value.to_vec());
                }
                _ => {}
            }
        }
        found
    }
}

/// Serialize pairs as Envoy does (for the fakes and the tests).
#[cfg(test)]
pub fn serialize<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])> + Clone) -> Vec<u8> {
    let list: Vec<(&str, &[u8])> = headers.into_iter().collect();
    let mut out = (list.len() as u32).to_le_bytes().to_vec();
    for (name, value) in &list {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in &list {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> Vec<u8> {
        serialize([
            (":status", b"503".as_slice()),
            ("content-type", b"application/grpc"),
            (
                "x-fledge-cluster",
                b"outbound|80|canary|app.ns.svc.cluster.local",
            ),
            ("grpc-status", b"14"),
        ])
    }

    #[test]
    fn picks_the_cluster_status_and_grpc_status() {
        let found = ResponseHeaders::from_map(&map(), "x-fledge-cluster");
        assert_eq!(
            found,
            ResponseHeaders {
                cluster: Some(b"outbound|80|canary|app.ns.svc.cluster.local".to_vec()),
                status: Some(503),
                grpc_status: Some(14),
            }
        );
        let other = ResponseHeaders::from_map(&map(), "x-other");
        assert_eq!(other.cluster, None);
        assert_eq!(other.status, Some(503));
    }

    #[test]
    fn an_empty_cluster_value_is_absent() {
        let map = serialize([(":status", b"200".as_slice()), ("x-fledge-cluster", b"")]);
        assert_eq!(
            ResponseHeaders::from_map(&map, "x-fledge-cluster").cluster,
            None
        );
    }

    #[test]
    fn no_headers_at_all_is_no_response() {
        for map in [Vec::new(), serialize([])] {
            assert_eq!(
                ResponseHeaders::from_map(&map, "x-fledge-cluster"),
                ResponseHeaders::default()
            );
        }
    }

    #[test]
    fn malformed_maps_keep_what_was_read_and_never_panic() {
        let whole = map();
        // Every truncation: the complete pairs before the cut are read, nothing panics.
        for cut in 0..whole.len() {
            let read: Vec<_> = pairs(&whole[..cut]).collect();
            assert!(read.len() <= 4, "cut {cut}");
        }
        assert_eq!(pairs(&whole).count(), 4);
        assert_eq!(pairs(&whole[..whole.len() - 2]).count(), 3);
        // A count far beyond the data, sizes pointing past the end.
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0xff; 16]);
        assert_eq!(pairs(&huge).count(), 0);
        let mut lying = 1u32.to_le_bytes().to_vec();
        lying.extend_from_slice(&u32::MAX.to_le_bytes());
        lying.extend_from_slice(&u32::MAX.to_le_bytes());
        lying.extend_from_slice(b"x\0y\0");
        assert_eq!(pairs(&lying).count(), 0);
    }
}
