//! A whole header map as `proxy_get_header_map_pairs` returns it (the log phase's one read of
//! the response headers when `clusterHeader` is set; see [`crate::plugin::ResponseHeaders`]).
//! Dependency-free: `filter/floor` includes this file too.
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

/// Serialize pairs as Envoy does (for the fakes and the tests).
#[cfg(test)]
pub fn serialize<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
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

/// A gRPC error's response headers, with the cluster named in `x-fledge-cluster` (for tests).
#[cfg(test)]
pub fn example_response_map() -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> Vec<u8> {
        example_response_map()
    }

    #[test]
    fn reads_every_pair_in_order() {
        let map = map();
        let read: Vec<_> = pairs(&map).collect();
        assert_eq!(read.len(), 4);
        assert_eq!(read[0], (b":status".as_slice(), b"503".as_slice()));
        assert_eq!(read[3], (b"grpc-status".as_slice(), b"14".as_slice()));
        assert_eq!(pairs(&serialize([])).count(), 0);
        assert_eq!(pairs(&[]).count(), 0);
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
