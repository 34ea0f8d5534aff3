//! Test fakes shared by the plugin and module tests: a stream as Envoy shows it, logging every
//! hostcall the filter makes, so tests can pin the per-request hostcall list of each module.

use crate::guard::SharedData;
use crate::metrics::fake::FakeHost;
use crate::metrics::{MetricHost, MetricKind};
use crate::plugin::{Headers, Property, StreamHost, VIA_UPSTREAM};
use std::collections::BTreeMap;

/// The fake clock's start (Unix seconds).
pub const NOW: u64 = 1_700_000_000;

/// A request/response as Envoy would show it, plus a log of every hostcall.
#[derive(Debug, Default)]
pub struct FakeStream {
    pub metrics: FakeHost,
    pub request: BTreeMap<String, Vec<u8>>,
    pub response: BTreeMap<String, Vec<u8>>,
    pub trailers: BTreeMap<String, Vec<u8>>,
    pub properties: BTreeMap<&'static str, Vec<u8>>,
    /// Nanoseconds; every read advances it by 7 ms, so a request lasts 7 ms.
    pub clock: Option<u64>,
    pub calls: Vec<String>,
    /// Shared data (the guard windows), shared by "workers" when tests move it around.
    pub shared: crate::guard::fake::FakeShared,
}

impl FakeStream {
    pub fn new() -> Self {
        FakeStream {
            clock: Some(NOW * 1_000_000_000),
            ..Default::default()
        }
    }
    pub fn with_request(mut self, name: &str, value: &str) -> Self {
        self.request.insert(name.into(), value.as_bytes().to_vec());
        self
    }
    pub fn with_property(mut self, key: &'static str, value: &[u8]) -> Self {
        self.properties.insert(key, value.to_vec());
        self
    }
    pub fn with_status(mut self, status: u16) -> Self {
        self.response
            .insert(":status".into(), status.to_string().into_bytes());
        self
    }
    /// A finished upstream response: cluster, status, via_upstream, 7 ms.
    pub fn finished(cluster: &str, status: u16) -> Self {
        FakeStream::new()
            .with_property("cluster", cluster.as_bytes())
            .with_property("details", VIA_UPSTREAM)
            .with_status(status)
    }
    fn map(&mut self, map: Headers) -> &mut BTreeMap<String, Vec<u8>> {
        match map {
            Headers::Request => &mut self.request,
            Headers::Response => &mut self.response,
            Headers::ResponseTrailers => &mut self.trailers,
        }
    }
}

fn key(property: Property) -> &'static str {
    match property {
        Property::ClusterName => "cluster",
        Property::UpstreamWorkload => "workload",
        Property::SourceAddress => "source",
        Property::ResponseCodeDetails => "details",
        Property::ResponseFlags => "flags",
        Property::RequestDuration => "duration",
    }
}

impl StreamHost for FakeStream {
    fn header(&mut self, map: Headers, name: &str) -> Option<Vec<u8>> {
        self.calls.push(format!("get {map:?} {name}"));
        self.map(map).get(name).cloned()
    }
    fn set_header(&mut self, map: Headers, name: &str, value: &[u8]) {
        self.calls.push(format!("set {map:?} {name}"));
        self.map(map).insert(name.into(), value.to_vec());
    }
    fn remove_header(&mut self, map: Headers, name: &str) {
        self.calls.push(format!("remove {map:?} {name}"));
        self.map(map).remove(name);
    }
    fn property(&mut self, property: Property) -> Option<Vec<u8>> {
        self.calls.push(format!("property {}", key(property)));
        self.properties.get(key(property)).cloned()
    }
    fn response_headers(&mut self) -> Option<Vec<u8>> {
        self.calls.push("pairs Response".into());
        (!self.response.is_empty()).then(|| {
            crate::header_pairs::serialize(
                self.response
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_slice())),
            )
        })
    }
    fn now_nanos(&mut self) -> Option<u64> {
        self.calls.push("now".into());
        let now = self.clock;
        self.clock = now.map(|n| n + 7_000_000);
        now
    }
    fn clear_route_cache(&mut self) {
        self.calls.push("clear_route_cache".into());
    }
}

impl SharedData for FakeStream {
    fn get_shared(&mut self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.calls.push(format!("shared get {key}"));
        self.shared.get_shared(key)
    }
    fn set_shared(&mut self, key: &str, value: &[u8], cas: u32) -> crate::guard::CasWrite {
        self.calls.push(format!("shared set {key}"));
        self.shared.set_shared(key, value, cas)
    }
}

impl MetricHost for FakeStream {
    fn define(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        self.metrics.define(kind, name)
    }
    // Ids defined in another store (tests that don't look at metrics) are only logged.
    fn increment(&mut self, id: u32, delta: i64) {
        self.calls.push("increment".into());
        if (id as usize) < self.metrics.defined.len() {
            self.metrics.increment(id, delta);
        }
    }
    fn record(&mut self, id: u32, value: u64) {
        self.calls.push("record".into());
        if (id as usize) < self.metrics.defined.len() {
            self.metrics.record(id, value);
        }
    }
}
