//! Which Canaries one `fledge controller` instance owns, for running several (Argo Rollouts'
//! `--instance-id`): by label selector (`--selector`, filtered by the API server) or by shard
//! (`--shard N/M`: the namespaces whose name hashes to `N` modulo `M`). Each shard has its own
//! Lease, so each has its own leader and standbys.
//!
//! Shards are whole namespaces because a route object lives in its Canary's namespace: the
//! Canaries that could name the same route are always in one shard, where the one-Canary-per-
//! route check sees them all.

use std::fmt;
use std::str::FromStr;

/// Shard `index` of `count` (`--shard 2/4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// Whether Canaries in `namespace` belong to this shard.
    pub fn owns(&self, namespace: &str) -> bool {
        fnv1a(namespace.as_bytes()) % u64::from(self.count) == u64::from(self.index)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!("--shard {text:?}: write N/M with 0 <= N < M, e.g. --shard 0/4 (shard 0 of 4)")
        };
        let (index, count) = text.split_once('/').ok_or_else(usage)?;
        let index: u32 = index.trim().parse().map_err(|_| usage())?;
        let count: u32 = count.trim().parse().map_err(|_| usage())?;
        if count == 0 || index >= count {
            return Err(usage());
        }
        Ok(Shard { index, count })
    }
}

/// The Lease of the instances sharing `lease_name` that own `shard` / `selector`: each
/// subset of Canaries has its own leader.
pub fn lease_name(lease_name: &str, shard: Option<Shard>, selector: Option<&str>) -> String {
    let mut name = lease_name.to_string();
    if let Some(shard) = shard {
        name.push_str(&format!("-shard-{}-of-{}", shard.index, shard.count));
    }
    if let Some(selector) = selector {
        name.push_str(&format!("-{:08x}", fnv1a(selector.as_bytes()) as u32));
    }
    name
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_split_namespaces_between_them() {
        assert_eq!("1/4".parse(), Ok(Shard { index: 1, count: 4 }));
        for bad in ["4/4", "1", "a/b", "0/0", "-1/3"] {
            let error = bad.parse::<Shard>().unwrap_err();
            assert!(error.contains("N/M"), "{error}");
        }
        let shards: Vec<Shard> = (0..4).map(|i| Shard { index: i, count: 4 }).collect();
        let mut sizes = [0; 4];
        for namespace in (0..400).map(|i| format!("team-{i}")) {
            let owners: Vec<usize> = (0..4).filter(|i| shards[*i].owns(&namespace)).collect();
            assert_eq!(owners.len(), 1, "{namespace} has exactly one shard");
            sizes[owners[0]] += 1;
        }
        assert!(sizes.iter().all(|n| (70..=130).contains(n)), "{sizes:?}");
    }

    #[test]
    fn each_shard_and_selector_has_its_own_lease() {
        let shard = Some(Shard { index: 2, count: 3 });
        assert_eq!(
            lease_name("fledge-controller", None, None),
            "fledge-controller"
        );
        assert_eq!(
            lease_name("fledge-controller", shard, None),
            "fledge-controller-shard-2-of-3"
        );
        let a = lease_name("fledge-controller", None, Some("team=a"));
        let b = lease_name("fledge-controller", None, Some("team=b"));
        assert_ne!(a, b);
        assert!(a.starts_with("fledge-controller-") && a.len() <= 63);
    }
}
