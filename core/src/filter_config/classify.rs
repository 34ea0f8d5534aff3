//! From an Envoy upstream cluster name (and, when the name says nothing about the version,
//! what the upstream tells) to the `(service, subset)` label values the filter writes.

use super::FilterConfig;
use crate::contract;

/// Sanitized label values for one request: `fledge_service` and `fledge_subset`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubsetLabels {
    pub service: String,
    pub subset: String,
}

impl SubsetLabels {
    /// Sanitizes both values with [`contract::sanitize_label_value`].
    pub fn new(service: &str, subset: &str) -> Self {
        SubsetLabels {
            service: contract::sanitize_label_value(service),
            subset: contract::sanitize_label_value(subset),
        }
    }

    /// `(other, other)`: traffic whose service and subset are unknown.
    pub fn other() -> Self {
        SubsetLabels {
            service: contract::OTHER.to_string(),
            subset: contract::OTHER.to_string(),
        }
    }

    pub fn is_other(&self) -> bool {
        self.service == contract::OTHER && self.subset == contract::OTHER
    }
}

/// What the cluster name (and configuration) says about a request's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterResolution {
    /// Service and subset are known.
    Known(SubsetLabels),
    /// The service is known; the subset comes from the upstream (endpoint metadata or response
    /// header), and is `fallback` when the upstream does not say.
    SubsetFromUpstream {
        /// Sanitized service label.
        service: String,
        /// Sanitized subset label used when the upstream gives none.
        fallback: String,
    },
    /// Unknown cluster, or none (no route): `(other, other)`.
    Other,
}

impl ClusterResolution {
    /// The labels, given what the upstream said about its subset (raw, unsanitized; `None` or
    /// empty when it said nothing).
    pub fn labels(&self, upstream_subset: Option<&str>) -> SubsetLabels {
        match self {
            ClusterResolution::Known(labels) => labels.clone(),
            ClusterResolution::SubsetFromUpstream { service, fallback } => SubsetLabels {
                service: service.clone(),
                subset: match upstream_subset.map(str::trim).filter(|s| !s.is_empty()) {
                    Some(subset) => contract::sanitize_label_value(subset),
                    None => fallback.clone(),
                },
            },
            ClusterResolution::Other => SubsetLabels::other(),
        }
    }

    pub fn needs_upstream_subset(&self) -> bool {
        matches!(self, ClusterResolution::SubsetFromUpstream { .. })
    }
}

/// The canonical revision in Istio's endpoint metadata
/// `workload;namespace;canonical-service;canonical-revision;cluster-id` (the fourth field), if
/// present and non-empty.
pub fn istio_workload_revision(workload: &str) -> Option<&str> {
    workload
        .split(';')
        .nth(3)
        .map(str::trim)
        .filter(|revision| !revision.is_empty())
}

impl FilterConfig {
    /// What the cluster name says about a request that went to `cluster` (`None` when no cluster
    /// was picked, e.g. no route matched). Configured clusters win; then Istio names if enabled;
    /// everything else is [`ClusterResolution::Other`].
    pub fn classify_cluster(&self, cluster: Option<&str>) -> ClusterResolution {
        let Some(cluster) = cluster else {
            return ClusterResolution::Other;
        };
        if let Some(entry) = self.clusters.get(cluster) {
            return match &entry.subset {
                Some(subset) => ClusterResolution::Known(SubsetLabels::new(&entry.service, subset)),
                None => ClusterResolution::SubsetFromUpstream {
                    service: contract::sanitize_label_value(&entry.service),
                    fallback: contract::OTHER.to_string(),
                },
            };
        }
        if self.istio_cluster_names {
            if let Some(istio) = IstioCluster::parse(cluster) {
                return match istio.subset {
                    Some(subset) => {
                        ClusterResolution::Known(SubsetLabels::new(istio.service, subset))
                    }
                    None => {
                        let service = contract::sanitize_label_value(istio.service);
                        ClusterResolution::SubsetFromUpstream {
                            fallback: service.clone(),
                            service,
                        }
                    }
                };
            }
        }
        ClusterResolution::Other
    }

    /// The `(service, subset)` labels for `cluster` when the upstream says nothing about its
    /// subset. See [`FilterConfig::classify_cluster`] and [`ClusterResolution::labels`].
    pub fn resolve(&self, cluster: Option<&str>) -> SubsetLabels {
        self.classify_cluster(cluster).labels(None)
    }

    /// Whether any cluster may need the upstream's subset from a response header, so the filter
    /// must look at the cluster while response headers are still available.
    pub fn uses_subset_header(&self) -> bool {
        self.subset_header.is_some()
    }
}

/// An Istio outbound cluster name, `outbound|<port>|<subset>|<host>`, split into the raw
/// (unsanitized) service and subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IstioCluster<'a> {
    /// First DNS label of the host.
    pub service: &'a str,
    /// The subset field; `None` when empty (one Service per version).
    pub subset: Option<&'a str>,
}

impl<'a> IstioCluster<'a> {
    /// `None` unless the name is exactly `outbound|<digits>|<subset>|<host>` with a non-empty
    /// host. Inbound clusters (`inbound|8080||`) describe the local workload, not a subset.
    pub fn parse(name: &'a str) -> Option<Self> {
        let mut fields = name.split('|');
        let direction = fields.next()?;
        let port = fields.next()?;
        let subset = fields.next()?;
        let host = fields.next()?;
        if fields.next().is_some()
            || direction != "outbound"
            || port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let service = host.split('.').next().filter(|s| !s.is_empty())?;
        let subset = Some(subset).filter(|s| !s.is_empty());
        Some(IstioCluster { service, subset })
    }
}
