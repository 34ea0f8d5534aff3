//! What Envoy calls in each build of the filter, as plain Rust: the state of one Wasm VM (one
//! per Envoy worker thread) and one function per exported callback. `host.rs` exports these
//! functions with the proxy-wasm ABI names; the tests call them the way Envoy does.
//!
//! Envoy enters the VM only for the callbacks a module exports (proxy-wasm-cpp-host returns
//! `Continue` without a VM call for a missing export), and every entry and every hostcall costs
//! CPU on every request; a hostcall that returns a value costs the most (a lookup, a second VM
//! entry for the allocator, a copy). So each build exports only what it needs ([`Callback`],
//! [`exports`]), trading entries against reads as measured (docs/filter-performance.md):
//!
//! | callback | full (`fledge_filter.wasm`) | observer (`fledge_observer.wasm`) |
//! |---|---|---|
//! | request headers | ✓ (clock; tagging, guard, strip) | — |
//! | response headers | ✓ (`responseHeader`, bodiless) | — |
//! | response body (every chunk; no hostcall) | ✓ (end of stream) | — |
//! | response trailers (only when there are trailers) | ✓ (`grpc-status`) | ✓ (`grpc-status`) |
//! | log | ✓ (metrics) | ✓ (metrics) |
//! | tick (per root context, 1 s or 100 ms) | ✓ | ✓ |
//!
//! Neither exports context create, the request body callbacks, `on_done` or `on_delete`. The
//! first stream callback a module has takes the stream's slot in a fixed ring indexed by
//! context id (nothing to delete): the request headers in the full module (with the clock: the
//! start), the trailers in the observer (only responses that have them). The full module's
//! body callback notes the end of stream (a response whose body ended is complete), sparing
//! `on_log` the `response.code_details` read for a complete response below 400. The observer
//! has only the log phase: it reads `request.duration` and `response.code_details` there (one
//! VM entry and two reads measured cheaper than three entries and two clock reads). Batched
//! counts of every root context are published by any root's tick, so nothing waits for a
//! root's `on_done`.
//!
//! Without context create, nothing tells which root context (plugin configuration) a stream
//! belongs to. A VM with one root (the usual case: Envoy shares a root between filters with
//! the same configuration) needs no telling; when several share the VM, the stream's first
//! callback reads `plugin_name` and picks the root configured under that name
//! ([`Vm::on_configure`] reads each root's name, and warns when two share one).
//!
//! The rust SDK's dispatcher would export all callbacks and keep boxed contexts in hash maps;
//! this module replaces it.

use crate::guard::SharedData;
use crate::metrics::MetricHost;
use crate::plugin::{Configured, GuardEvent, Plugin, Property, StreamHost, StreamState};
use fledge_core::filter_config::FilterModule;
use std::collections::BTreeMap;

/// Stream slots per VM. A stream whose slot a newer stream took (more than this many streams
/// started on the worker while it was in flight) is still recorded: `on_log` then reads the
/// duration, the cluster and the gRPC status from Envoy instead of from the slot.
pub const STREAM_SLOTS: usize = 4096;
/// Streams remembered as lost: a stream that found its slot held by another one (see
/// [`Vm::store`]) reads everything in `on_log`. More than this many at once is not expected:
/// a slot is held from a stream's first callback to its log phase, and 4096 slots are free
/// unless thousands of streams are in flight on one worker.
pub const LOST_STREAMS: usize = 16;
/// Root contexts remembered per VM (one per distinct plugin configuration). Envoy does not tell
/// a module without `on_delete` that a root context is gone, so beyond this the one that ticked
/// longest ago is dropped (after publishing its counts).
pub const MAX_ROOTS: usize = 8;
/// How often batched request counts reach Envoy's counters. Envoy publishes stats at its own
/// flush interval (1 s in the Fledge configs), so this adds at most ~1 s.
pub const COUNTER_FLUSH_MILLIS: u32 = 1000;
/// The tick when a guard is configured: how often a worker merges its guard counts and learns
/// other workers' trips. Counters are still flushed every [`COUNTER_FLUSH_MILLIS`].
pub const GUARD_TICK_MILLIS: u32 = 100;

/// A callback a module can export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callback {
    RequestHeaders,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    Log,
    Tick,
}

impl Callback {
    /// The proxy-wasm export name.
    pub const fn export_name(self) -> &'static str {
        match self {
            Callback::RequestHeaders => "proxy_on_request_headers",
            Callback::ResponseHeaders => "proxy_on_response_headers",
            Callback::ResponseBody => "proxy_on_response_body",
            Callback::ResponseTrailers => "proxy_on_response_trailers",
            Callback::Log => "proxy_on_log",
            Callback::Tick => "proxy_on_tick",
        }
    }
}

/// The stream and timer callbacks `module` exports (besides `proxy_on_vm_start`,
/// `proxy_on_configure` and `proxy_on_memory_allocate`, which every module has).
pub const fn exports(module: FilterModule) -> &'static [Callback] {
    match module {
        FilterModule::Full => &[
            Callback::RequestHeaders,
            Callback::ResponseHeaders,
            Callback::ResponseBody,
            Callback::ResponseTrailers,
            Callback::Log,
            Callback::Tick,
        ],
        FilterModule::Observer => &[Callback::ResponseTrailers, Callback::Log, Callback::Tick],
    }
}

/// One root context: a plugin configuration and its timer.
#[derive(Debug)]
struct Root {
    plugin: Plugin,
    /// `plugin_name` as Envoy reports it in this root: how a stream names its root when
    /// several share the VM.
    name: Option<Vec<u8>>,
    tick_millis: u32,
    ticks: u64,
    /// Bumped on every tick; the smallest is the root gone longest (see [`MAX_ROOTS`]).
    last_tick: u64,
}

/// The stream a slot belongs to, and what the filter learned about it.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    context_id: u32,
    root_id: u32,
    state: StreamState,
}

/// The state of one VM.
#[derive(Debug)]
pub struct Vm {
    module: FilterModule,
    /// Root contexts by id.
    roots: BTreeMap<u32, Root>,
    /// The root created last: the one a stream is recorded under when its plugin name does not
    /// pick one.
    newest_root: Option<u32>,
    slots: Vec<Slot>,
    /// Streams whose slot another stream held (a ring, [`LOST_STREAMS`] long).
    lost: [u32; LOST_STREAMS],
    lost_next: usize,
    /// Ticks seen by the whole VM, for [`Root::last_tick`].
    clock: u64,
}

/// What `on_configure` did, for the shell to log and to set the root's tick period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigureOutcome {
    pub configured: Configured,
    pub tick_millis: u32,
    /// Another root context of this VM has the same `plugin_name` and another configuration:
    /// streams of the two cannot be told apart, and are recorded under the newer one.
    pub name_clash: bool,
}

impl Vm {
    pub fn new(module: FilterModule) -> Self {
        Vm {
            module,
            roots: BTreeMap::new(),
            newest_root: None,
            slots: vec![Slot::default(); STREAM_SLOTS],
            lost: [0; LOST_STREAMS],
            lost_next: 0,
            clock: 0,
        }
    }

    pub fn module(&self) -> FilterModule {
        self.module
    }

    /// The plugin of root context `root_id`, if known.
    pub fn plugin(&self, root_id: u32) -> Option<&Plugin> {
        self.roots.get(&root_id).map(|root| &root.plugin)
    }

    /// `proxy_on_configure`: (re)configure root context `root_id` with the raw plugin
    /// configuration, and learn its `plugin_name`. Never fails (see [`Plugin::configure`]).
    pub fn on_configure<H: StreamHost + MetricHost>(
        &mut self,
        root_id: u32,
        raw: Option<&[u8]>,
        host: &mut H,
    ) -> ConfigureOutcome {
        let name = host.property(Property::PluginName);
        let root = self.root(root_id, host);
        root.name = name;
        let configured = root.plugin.configure(raw, host);
        root.tick_millis = if root.plugin.has_guards() {
            GUARD_TICK_MILLIS
        } else {
            COUNTER_FLUSH_MILLIS
        };
        let tick_millis = root.tick_millis;
        ConfigureOutcome {
            configured,
            tick_millis,
            name_clash: self.name_clash(root_id),
        }
    }

    /// Whether another root has root `root_id`'s name and another configuration.
    fn name_clash(&self, root_id: u32) -> bool {
        let Some(root) = self.roots.get(&root_id) else {
            return false;
        };
        self.roots.iter().any(|(id, other)| {
            *id != root_id
                && other.name == root.name
                && other.plugin.config() != root.plugin.config()
        })
    }

    /// Root context `root_id`, created if new (dropping the stalest beyond [`MAX_ROOTS`]).
    fn root<H: MetricHost>(&mut self, root_id: u32, host: &mut H) -> &mut Root {
        if !self.roots.contains_key(&root_id) && self.roots.len() >= MAX_ROOTS {
            let stalest = self
                .roots
                .iter()
                .min_by_key(|(_, root)| root.last_tick)
                .map(|(id, _)| *id);
            if let Some(mut gone) = stalest.and_then(|id| self.roots.remove(&id)) {
                gone.plugin.flush(host);
            }
        }
        let (module, clock) = (self.module, self.clock);
        let newest = &mut self.newest_root;
        self.roots.entry(root_id).or_insert_with(|| {
            *newest = Some(root_id);
            Root {
                plugin: Plugin::new(module),
                name: None,
                tick_millis: COUNTER_FLUSH_MILLIS,
                ticks: 0,
                last_tick: clock,
            }
        })
    }

    /// The root context a stream belongs to, asked in its first callback: the only one, or
    /// (several sharing the VM) the newest root named as `plugin_name` says, else the newest.
    fn root_of_stream(&self, host: &mut impl StreamHost) -> Option<u32> {
        if self.roots.len() <= 1 {
            return self.roots.keys().next().copied();
        }
        let name = host.property(Property::PluginName);
        self.roots
            .iter()
            .rev()
            .find(|(_, root)| name.is_some() && root.name == name)
            .map(|(id, _)| *id)
            .or(self.newest_root)
    }

    fn slot_index(context_id: u32) -> usize {
        context_id as usize % STREAM_SLOTS
    }

    /// The slot of stream `context_id`: its root and state, if the stream still holds it.
    fn slot(&self, context_id: u32) -> Option<(u32, StreamState)> {
        let slot = self.slots.get(Self::slot_index(context_id))?;
        (slot.context_id == context_id && context_id != 0).then_some((slot.root_id, slot.state))
    }

    /// Stream `context_id`'s root and state: from its slot, else (a stream the module meets
    /// for the first time, or a lost one) its root asked from Envoy and `fresh` — or, for a
    /// lost stream, a state that reads everything in `on_log`, so it is still recorded.
    fn stream(
        &mut self,
        context_id: u32,
        fresh: StreamState,
        host: &mut impl StreamHost,
    ) -> (Option<u32>, StreamState) {
        match self.slot(context_id) {
            Some((root_id, state)) if self.roots.contains_key(&root_id) => (Some(root_id), state),
            _ if self.lost.contains(&context_id) => {
                (self.root_of_stream(host), StreamState::default())
            }
            _ => (self.root_of_stream(host), fresh),
        }
    }

    /// Keep `state` in the stream's slot. A slot held by another stream (one not logged yet)
    /// stays with it; this stream is remembered as lost instead.
    fn store(&mut self, context_id: u32, root_id: Option<u32>, state: StreamState) {
        let (Some(root_id), Some(slot)) =
            (root_id, self.slots.get_mut(Self::slot_index(context_id)))
        else {
            return;
        };
        if slot.context_id == 0 || slot.context_id == context_id {
            *slot = Slot {
                context_id,
                root_id,
                state,
            };
        } else if !self.lost.contains(&context_id) {
            if let Some(entry) = self.lost.get_mut(self.lost_next) {
                *entry = context_id;
            }
            self.lost_next = (self.lost_next + 1) % LOST_STREAMS;
        }
    }

    /// The state of a stream this module meets first in its response phase: the observer saw
    /// all it would see; the full module lost track of it (it starts in the request headers).
    fn response_phase_state(&self) -> StreamState {
        match self.module {
            FilterModule::Observer => StreamState::from_response_phase(),
            FilterModule::Full => StreamState::default(),
        }
    }

    fn plugin_mut(&mut self, root_id: Option<u32>) -> Option<&mut Plugin> {
        self.roots.get_mut(&root_id?).map(|root| &mut root.plugin)
    }

    /// `proxy_on_request_headers` (full module): the stream's first callback, so it takes the
    /// stream's slot and reads its start.
    pub fn on_request_headers<H: StreamHost + MetricHost>(
        &mut self,
        context_id: u32,
        host: &mut H,
    ) {
        if context_id == 0 {
            return;
        }
        let root_id = self.root_of_stream(host);
        let mut state = StreamState::started_at(host.now_nanos());
        if let Some(plugin) = self.plugin_mut(root_id) {
            plugin.on_request_headers(&mut state, host);
        }
        self.store(context_id, root_id, state);
    }

    /// `proxy_on_response_headers` (full module).
    pub fn on_response_headers<H: StreamHost + MetricHost>(
        &mut self,
        context_id: u32,
        end_of_stream: bool,
        host: &mut H,
    ) {
        let (root_id, mut state) = self.stream(context_id, StreamState::default(), host);
        if let Some(plugin) = self.plugin_mut(root_id) {
            plugin.on_response_headers(&mut state, end_of_stream, host);
        }
        self.store(context_id, root_id, state);
    }

    /// `proxy_on_response_body` (full module; every chunk of a response body): note the end of
    /// stream in the stream's slot. No plugin, no hostcall: this runs per chunk. A stream
    /// without its slot is left alone (`on_log` then reads everything).
    pub fn on_response_body(&mut self, context_id: u32, body_size: usize, end_of_stream: bool) {
        if context_id == 0 {
            return;
        }
        if let Some(slot) = self.slots.get_mut(Self::slot_index(context_id)) {
            if slot.context_id == context_id {
                slot.state.response_body(body_size, end_of_stream);
            }
        }
    }

    /// `proxy_on_response_trailers` (both modules; only for responses with trailers).
    pub fn on_response_trailers<H: StreamHost>(&mut self, context_id: u32, host: &mut H) {
        let fresh = self.response_phase_state();
        let (root_id, mut state) = self.stream(context_id, fresh, host);
        if let Some(plugin) = self.plugin_mut(root_id) {
            plugin.on_response_trailers(&mut state, host);
        }
        self.store(context_id, root_id, state);
    }

    /// `proxy_on_log`: record the finished stream. Returns what the guard did, if anything.
    pub fn on_log<H: StreamHost + MetricHost + SharedData>(
        &mut self,
        context_id: u32,
        host: &mut H,
    ) -> Option<GuardEvent> {
        let fresh = self.response_phase_state();
        let (root_id, mut state) = self.stream(context_id, fresh, host);
        // The slot is free again; a late callback for this stream finds nothing.
        if self.slot(context_id).is_some() {
            if let Some(slot) = self.slots.get_mut(Self::slot_index(context_id)) {
                *slot = Slot::default();
            }
        }
        if let Some(entry) = self.lost.iter_mut().find(|id| **id == context_id) {
            *entry = 0;
        }
        let plugin = self.plugin_mut(root_id)?;
        plugin.on_log(&mut state, host)
    }

    /// `proxy_on_tick` of root `root_id`: its guards (every tick), and every root's batched
    /// counts once per [`COUNTER_FLUSH_MILLIS`] — also those of roots that no longer tick.
    pub fn on_tick<H: StreamHost + MetricHost + SharedData>(
        &mut self,
        root_id: u32,
        host: &mut H,
    ) -> Vec<GuardEvent> {
        self.clock = self.clock.wrapping_add(1);
        let clock = self.clock;
        let Some(root) = self.roots.get_mut(&root_id) else {
            return Vec::new();
        };
        root.ticks = root.ticks.wrapping_add(1);
        root.last_tick = clock;
        let events = if root.plugin.has_guards() {
            root.plugin.guard_tick(host)
        } else {
            Vec::new()
        };
        let flush_every = u64::from((COUNTER_FLUSH_MILLIS / root.tick_millis.max(1)).max(1));
        if root.ticks.is_multiple_of(flush_every) {
            for root in self.roots.values_mut() {
                root.plugin.flush(host);
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeStream;
    use crate::metrics::fake::{requests_name, FakeHost};
    use fledge_core::contract;

    const APP: &str = r#"{"clusters": {"app_stable": {"service": "app", "subset": "stable"},
                                       "app_canary": {"service": "app", "subset": "canary"}}}"#;
    /// `APP`, with the cluster named by the route in a response header.
    const APP_NAMED: &str = r#"{"clusters": {"app_stable": {"service": "app", "subset": "stable"},
                                             "app_canary": {"service": "app", "subset": "canary"}},
                                "clusterHeader": "x-fledge-cluster"}"#;
    const ROOT: u32 = 1;

    /// Each module with the cluster from the property (`APP`) and from the route's response
    /// header (`APP_NAMED`).
    fn each_setup() -> [(FilterModule, &'static str); 4] {
        [
            (FilterModule::Full, APP),
            (FilterModule::Observer, APP),
            (FilterModule::Full, APP_NAMED),
            (FilterModule::Observer, APP_NAMED),
        ]
    }

    /// As Envoy shows `stream` when the route names the cluster: every response carries the
    /// header, and the property is not needed (removed, so a read of it would miss).
    fn named_by_route(mut stream: FakeStream) -> FakeStream {
        if stream.response.is_empty() {
            return stream;
        }
        if let Some(cluster) = stream.properties.remove("cluster") {
            stream.response.insert("x-fledge-cluster".into(), cluster);
        }
        stream
    }

    /// Envoy as seen by one VM: the metric store every request adds to, and the next context id.
    struct Envoy {
        vm: Vm,
        metrics: FakeHost,
        next_context: u32,
    }

    impl Envoy {
        fn new(module: FilterModule, config: &str) -> Envoy {
            let mut envoy = Envoy {
                vm: Vm::new(module),
                metrics: FakeHost::default(),
                next_context: ROOT + 1,
            };
            let mut s = FakeStream::new();
            let outcome = envoy.vm.on_configure(ROOT, Some(config.as_bytes()), &mut s);
            assert!(
                matches!(outcome.configured, Configured::Applied { .. }),
                "{outcome:?}"
            );
            envoy.metrics = std::mem::take(&mut s.metrics);
            envoy
        }

        /// One stream, calling exactly the callbacks `module` exports, in Envoy's order, for a
        /// response shaped as `response`; it has trailers when the fake has any. Returns the
        /// fake with its hostcall log.
        fn request(&mut self, mut s: FakeStream, response: Response) -> FakeStream {
            let context = self.next_context;
            self.next_context += 1;
            s.metrics = std::mem::take(&mut self.metrics);
            let exported = exports(self.vm.module());
            if exported.contains(&Callback::RequestHeaders) {
                self.vm.on_request_headers(context, &mut s);
            }
            if response == Response::Reset {
                self.vm.on_log(context, &mut s);
                self.metrics = std::mem::take(&mut s.metrics);
                return s;
            }
            if exported.contains(&Callback::ResponseHeaders) {
                let bodiless = response == Response::Bodiless;
                self.vm.on_response_headers(context, bodiless, &mut s);
            }
            let trailers = !s.trailers.is_empty();
            if exported.contains(&Callback::ResponseBody) {
                // The end of stream comes with the last chunk, unless trailers follow.
                let chunks: &[(usize, bool)] = match response {
                    Response::Bodiless | Response::Reset => &[],
                    Response::Body if trailers => &[(10, false)],
                    Response::Body => &[(10, false), (20, true)],
                    Response::CutOff => &[(10, false)],
                    Response::EmptyEnd => &[(0, true)],
                };
                for (size, end_of_stream) in chunks {
                    self.vm.on_response_body(context, *size, *end_of_stream);
                }
            }
            if trailers && exported.contains(&Callback::ResponseTrailers) {
                self.vm.on_response_trailers(context, &mut s);
            }
            self.vm.on_log(context, &mut s);
            self.metrics = std::mem::take(&mut s.metrics);
            s
        }

        /// The 1 s tick: batched counts reach the counters.
        fn tick(&mut self) -> FakeStream {
            let mut s = FakeStream::new();
            s.metrics = std::mem::take(&mut self.metrics);
            self.vm.on_tick(ROOT, &mut s);
            self.metrics = std::mem::take(&mut s.metrics);
            s
        }

        fn count(&self, subset: &str, class: &str) -> i64 {
            self.metrics.counter(&requests_name("app", subset, class))
        }
    }

    /// How a response goes through Envoy's callbacks.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Response {
        /// Headers with end of stream: no body callback.
        Bodiless,
        /// Headers, then body chunks; the last one ends the stream (or the trailers do).
        Body,
        /// Headers and a body chunk, then the upstream reset: no end of stream.
        CutOff,
        /// Headers, then one empty body chunk that ends the stream (an HTTP/2 upstream may end
        /// a bodiless response with an empty DATA frame).
        EmptyEnd,
        /// No response callbacks at all: the stream was reset before any response.
        Reset,
    }

    fn both() -> [FilterModule; 2] {
        [FilterModule::Full, FilterModule::Observer]
    }

    #[test]
    fn each_module_makes_few_hostcalls_per_plain_request() {
        // Per request, in order. Each hostcall costs Envoy CPU on every request; the class and
        // the duration are counted in the VM and wait for the tick.
        let want = |module| -> Vec<&str> {
            match module {
                // The request headers start the stream; the body's end of stream (a VM entry, no
                // hostcall) says the response is complete and not trailers-only: no
                // `response.code_details` read, no `grpc-status` lookup in the headers.
                FilterModule::Full => vec![
                    "now",                        // request headers: the start
                    "get Request x-fledge-route", //   strip a client's copy
                    "property cluster",           // log: the subset
                    "now",                        //   the duration
                    "get Response :status",       //   the class
                ],
                // The log phase alone: the duration from Envoy, and a 200 might be a
                // trailers-only gRPC response (trailers would have had their callback).
                FilterModule::Observer => vec![
                    "property cluster",
                    "property duration",
                    "get Response :status",
                    "get Response grpc-status",
                    "property details",
                ],
            }
        };
        for module in both() {
            let mut envoy = Envoy::new(module, APP);
            for _ in 0..3 {
                let s = envoy.request(FakeStream::finished("app_canary", 200), Response::Body);
                assert_eq!(s.calls, want(module), "{module:?}");
            }
            assert_eq!(envoy.count("canary", "2xx"), 0);
            // One increment per counter that moved: the class, the duration count, the
            // buckets at or above 7 ms (10 ms … 10 s and +Inf), the sum.
            let tick = envoy.tick();
            assert!(
                tick.calls.iter().all(|c| c == "increment"),
                "{:?}",
                tick.calls
            );
            assert_eq!(tick.calls.len(), 1 + 1 + 11 + 1, "{module:?}");
            assert_eq!(envoy.count("canary", "2xx"), 3, "{module:?}");
            let (count, sum, buckets) = envoy.metrics.durations("app", "canary");
            assert_eq!((count, sum), (3, 21));
            assert_eq!(buckets, [0, 0, 0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]);
            // Nothing new: a tick makes no hostcall.
            assert!(envoy.tick().calls.is_empty());
        }
    }

    #[test]
    fn a_cluster_named_by_the_route_is_read_with_the_status_in_one_hostcall() {
        let named = |status| named_by_route(FakeStream::finished("app_canary", status));
        // (response, shape, the hostcalls after the full module's request phase: its clock
        // read and route-header strip)
        let grpc_only = || {
            let mut s = named(200);
            s.response.insert("grpc-status".into(), b"14".to_vec());
            s
        };
        let unnamed = FakeStream::finished("app_canary", 200);
        type Case = (
            &'static str,
            FakeStream,
            Response,
            [&'static [&'static str]; 2],
        );
        let cases: Vec<Case> = vec![
            (
                "200 with a body: one read for the cluster and the status",
                named(200),
                Response::Body,
                [
                    &["pairs Response", "now"],
                    &["pairs Response", "property duration", "property details"],
                ],
            ),
            (
                // Only the full module sees the headers end the stream: complete.
                "200, no body",
                named(200),
                Response::Bodiless,
                [
                    &["get Response grpc-status", "pairs Response", "now"],
                    &["pairs Response", "property duration", "property details"],
                ],
            ),
            (
                "trailers-only gRPC error",
                grpc_only(),
                Response::Bodiless,
                [
                    &[
                        "get Response grpc-status",
                        "pairs Response",
                        "now",
                        "property details",
                    ],
                    &["pairs Response", "property duration", "property details"],
                ],
            ),
            (
                "503: the details say whose",
                named(503),
                Response::Body,
                [
                    &["pairs Response", "now", "property details"],
                    &["pairs Response", "property duration", "property details"],
                ],
            ),
            (
                // A route that does not name its cluster: the property, the status still read
                // once.
                "no header: the property",
                unnamed,
                Response::Body,
                [
                    &["pairs Response", "property cluster", "now"],
                    &[
                        "pairs Response",
                        "property cluster",
                        "property duration",
                        "property details",
                    ],
                ],
            ),
            (
                // No response headers at all: the property, and `:status` (absent) alone.
                "reset before any response",
                FakeStream::new().with_property("cluster", b"app_canary"),
                Response::Reset,
                [
                    &[
                        "pairs Response",
                        "property cluster",
                        "now",
                        "get Response :status",
                    ],
                    &[
                        "pairs Response",
                        "property cluster",
                        "property duration",
                        "get Response :status",
                    ],
                ],
            ),
        ];
        let want_class = ["2xx", "2xx", "5xx", "5xx", "2xx", "none"];
        for (i, module) in both().into_iter().enumerate() {
            for ((name, stream, response, want), class) in cases.iter().zip(want_class) {
                let mut envoy = Envoy::new(module, APP_NAMED);
                let mut copy = FakeStream::new();
                copy.response = stream.response.clone();
                copy.properties = stream.properties.clone();
                let s = envoy.request(copy, *response);
                let start: &[&str] = match module {
                    FilterModule::Full => &["now", "get Request x-fledge-route"],
                    FilterModule::Observer => &[],
                };
                let (first, rest) = s.calls.split_at(start.len());
                assert_eq!(first, start, "{module:?}: {name}");
                assert_eq!(rest, want[i], "{module:?}: {name}");
                envoy.tick();
                assert_eq!(envoy.count("canary", class), 1, "{module:?}: {name}");
            }
        }
    }

    #[test]
    fn both_modules_class_alike_from_the_log_phase() {
        type Case = (
            &'static str,
            FakeStream,
            Response,
            &'static str,
            &'static str,
        );
        let grpc_trailers = |code: &str| {
            let mut s = FakeStream::finished("app_canary", 200);
            s.trailers
                .insert("grpc-status".into(), code.as_bytes().to_vec());
            s
        };
        let grpc_only = |code: &str| {
            let mut s = FakeStream::finished("app_canary", 200);
            s.response
                .insert("grpc-status".into(), code.as_bytes().to_vec());
            s
        };
        let cases: Vec<Case> = vec![
            (
                "200",
                FakeStream::finished("app_canary", 200),
                Response::Body,
                "canary",
                "2xx",
            ),
            (
                "404",
                FakeStream::finished("app_canary", 404),
                Response::Body,
                "canary",
                "4xx",
            ),
            (
                "upstream 503",
                FakeStream::finished("app_canary", 503),
                Response::Body,
                "canary",
                "5xx",
            ),
            (
                "no healthy upstream",
                FakeStream::finished("app_canary", 503)
                    .with_property("details", b"no_healthy_upstream"),
                Response::Body,
                "canary",
                "none",
            ),
            (
                "reset before the response",
                FakeStream::finished("app_canary", 503).with_property(
                    "details",
                    b"upstream_reset_before_response_started{connection_failure}",
                ),
                Response::Body,
                "canary",
                "none",
            ),
            (
                "cut off mid-body",
                FakeStream::finished("app_canary", 200).with_property(
                    "details",
                    b"upstream_reset_after_response_started{remote_reset}",
                ),
                Response::CutOff,
                "canary",
                "none",
            ),
            (
                "reset, no response at all",
                FakeStream::new().with_property("cluster", b"app_canary"),
                Response::Reset,
                "canary",
                "none",
            ),
            (
                "grpc OK in trailers",
                grpc_trailers("0"),
                Response::Body,
                "canary",
                "2xx",
            ),
            (
                "grpc UNAVAILABLE in trailers",
                grpc_trailers("14"),
                Response::Body,
                "canary",
                "5xx",
            ),
            (
                "grpc NOT_FOUND in trailers",
                grpc_trailers("5"),
                Response::Body,
                "canary",
                "4xx",
            ),
            (
                "grpc UNKNOWN trailers-only",
                grpc_only("2"),
                Response::Bodiless,
                "canary",
                "5xx",
            ),
            (
                "grpc OK trailers-only",
                grpc_only("0"),
                Response::Bodiless,
                "canary",
                "2xx",
            ),
            (
                "Envoy's gRPC local reply",
                grpc_only("14").with_property("details", b"no_healthy_upstream"),
                Response::Bodiless,
                "canary",
                "none",
            ),
            (
                "stable 200",
                FakeStream::finished("app_stable", 200),
                Response::Body,
                "stable",
                "2xx",
            ),
            (
                "200, no body",
                FakeStream::finished("app_canary", 200),
                Response::Bodiless,
                "canary",
                "2xx",
            ),
            (
                // An empty body ending the stream could be trailers-only: the read.
                "200, an empty end of stream",
                FakeStream::finished("app_canary", 200),
                Response::EmptyEnd,
                "canary",
                "2xx",
            ),
            (
                "cut off mid-body, 503",
                FakeStream::finished("app_canary", 503).with_property(
                    "details",
                    b"upstream_reset_after_response_started{remote_reset}",
                ),
                Response::CutOff,
                "canary",
                "none",
            ),
        ];
        for (module, config) in each_setup() {
            for (name, stream, response, subset, class) in &cases {
                let mut envoy = Envoy::new(module, config);
                let mut copy = FakeStream::new();
                copy.request = stream.request.clone();
                copy.response = stream.response.clone();
                copy.trailers = stream.trailers.clone();
                copy.properties = stream.properties.clone();
                if config == APP_NAMED {
                    copy = named_by_route(copy);
                }
                envoy.request(copy, *response);
                envoy.tick();
                assert_eq!(envoy.count(subset, class), 1, "{module:?} {config}: {name}");
            }
            // No route: (other, other, none) without reading the response.
            let mut envoy = Envoy::new(module, config);
            let s = envoy.request(FakeStream::new().with_status(404), Response::Body);
            assert_eq!(
                s.calls
                    .iter()
                    .filter(|c| c.starts_with("get Response"))
                    .count(),
                0
            );
            envoy.tick();
            assert_eq!(
                envoy
                    .metrics
                    .counter(&requests_name("other", "other", "none")),
                1,
                "{module:?}"
            );
        }
    }

    #[test]
    fn each_module_reads_by_the_shape_of_the_response() {
        // The hostcalls beyond the cluster, the duration (clock or property), `:status` (and
        // the full module's route header strip), per module and response shape: what the
        // callbacks saw spares reads.
        let grpc_trailers = || {
            let mut s = FakeStream::finished("app_canary", 200);
            s.trailers.insert("grpc-status".into(), b"0".to_vec());
            s
        };
        type Case = (
            &'static str,
            FakeStream,
            Response,
            [&'static [&'static str]; 2],
        );
        let cases: Vec<Case> = vec![
            (
                // The full module saw the body end: complete, not trailers-only. The observer
                // sees no body: the details say whether it was complete, and it looks for a
                // trailers-only gRPC status (absent: a cheap lookup).
                "200 with a body",
                FakeStream::finished("app_canary", 200),
                Response::Body,
                [&[], &["get Response grpc-status", "property details"]],
            ),
            (
                // Complete, but only the full module sees the headers' end of stream (and reads
                // grpc-status there): the observer falls back to both reads.
                "200, no body",
                FakeStream::finished("app_canary", 200),
                Response::Bodiless,
                [
                    &["get Response grpc-status"],
                    &["get Response grpc-status", "property details"],
                ],
            ),
            (
                "200, an empty end of stream",
                FakeStream::finished("app_canary", 200),
                Response::EmptyEnd,
                [
                    &["property details"],
                    &["get Response grpc-status", "property details"],
                ],
            ),
            (
                // No end of stream: code_details says whether the upstream cut it off.
                "200 cut off mid-body",
                FakeStream::finished("app_canary", 200),
                Response::CutOff,
                [
                    &["property details"],
                    &["get Response grpc-status", "property details"],
                ],
            ),
            (
                // A status of 400 or more: code_details tells the upstream's from Envoy's.
                "503 with a body",
                FakeStream::finished("app_canary", 503),
                Response::Body,
                [&["property details"], &["property details"]],
            ),
            (
                // gRPC with trailers: complete, the status from the trailers.
                "grpc OK in trailers",
                grpc_trailers(),
                Response::Body,
                [
                    &["get ResponseTrailers grpc-status"],
                    &["get ResponseTrailers grpc-status"],
                ],
            ),
        ];
        for (i, module) in both().into_iter().enumerate() {
            for (name, stream, response, want) in &cases {
                let mut envoy = Envoy::new(module, APP);
                let mut copy = FakeStream::new();
                copy.response = stream.response.clone();
                copy.trailers = stream.trailers.clone();
                copy.properties = stream.properties.clone();
                let s = envoy.request(copy, *response);
                // Every request makes these; the rest depends on the response.
                let always = [
                    "now",
                    "get Request x-fledge-route",
                    "property cluster",
                    "property duration",
                    "get Response :status",
                ];
                let reads: Vec<&str> = s
                    .calls
                    .iter()
                    .map(String::as_str)
                    .filter(|call| !always.contains(call))
                    .collect();
                assert_eq!(reads, want[i].to_vec(), "{module:?}: {name}");
            }
        }
    }

    #[test]
    fn a_stream_whose_slot_another_holds_is_still_recorded() {
        for module in both() {
            let mut envoy = Envoy::new(module, APP);
            // Context ids that share a slot: the first stream holds it while the second runs.
            let (first, second) = (10, 10 + STREAM_SLOTS as u32);
            let mut s = FakeStream::finished("app_canary", 200);
            s.trailers.insert("grpc-status".into(), b"14".to_vec());
            s.properties
                .insert("duration", 42_000_000i64.to_le_bytes().to_vec());
            s.metrics = std::mem::take(&mut envoy.metrics);
            if module == FilterModule::Full {
                envoy.vm.on_request_headers(first, &mut s);
                envoy.vm.on_request_headers(second, &mut s);
            }
            envoy.vm.on_response_trailers(first, &mut s);
            envoy.vm.on_response_trailers(second, &mut s);
            s.calls.clear();
            envoy.vm.on_log(second, &mut s);
            // Lost: the duration from Envoy, the gRPC status from the trailers again, and
            // code_details to tell an upstream's gRPC error from Envoy's own.
            assert_eq!(
                s.calls,
                vec![
                    "property cluster",
                    "property duration",
                    "get Response :status",
                    "get ResponseTrailers grpc-status",
                    "property details",
                ],
                "{module:?}"
            );
            // The slot's holder kept what its callbacks saw: no read of the trailers again.
            s.calls.clear();
            envoy.vm.on_log(first, &mut s);
            assert!(
                !s.calls.iter().any(|c| c.contains("grpc-status")),
                "{module:?}: {:?}",
                s.calls
            );
            envoy.metrics = std::mem::take(&mut s.metrics);
            envoy.tick();
            assert_eq!(envoy.count("canary", "5xx"), 2, "{module:?}");
            let (count, sum, _) = envoy.metrics.durations("app", "canary");
            assert_eq!(count, 2, "{module:?}");
            assert!(sum >= 42, "{module:?}: {sum}");
            // Both slots are free again: a new stream there is followed as usual.
            let s = envoy.request(FakeStream::finished("app_canary", 200), Response::Body);
            assert!(!s
                .calls
                .contains(&"get ResponseTrailers grpc-status".to_string()));
        }
    }

    /// Configure root `root` of `vm` as plugin `name` with the metric store `metrics`.
    fn configure_named(
        vm: &mut Vm,
        metrics: &mut FakeHost,
        root: u32,
        name: &str,
        config: &str,
    ) -> ConfigureOutcome {
        let mut s = FakeStream::new().with_property("plugin_name", name.as_bytes());
        s.metrics = std::mem::take(metrics);
        let outcome = vm.on_configure(root, Some(config.as_bytes()), &mut s);
        *metrics = std::mem::take(&mut s.metrics);
        outcome
    }

    #[test]
    fn a_body_seen_for_a_lost_stream_marks_neither_stream_complete() {
        let mut envoy = Envoy::new(FilterModule::Full, APP);
        let (first, second) = (10, 10 + STREAM_SLOTS as u32);
        let mut s = FakeStream::finished("app_canary", 200);
        s.metrics = std::mem::take(&mut envoy.metrics);
        envoy.vm.on_request_headers(first, &mut s);
        envoy.vm.on_request_headers(second, &mut s);
        // The second stream's body ends while the first holds the slot.
        envoy.vm.on_response_body(second, 10, true);
        s.calls.clear();
        envoy.vm.on_log(second, &mut s);
        // Lost: everything is read again, code_details included.
        assert!(s.calls.contains(&"property details".to_string()));
        // The first stream (cut off: no end of stream of its own) was not marked complete.
        envoy.vm.on_response_body(first, 10, false);
        s.calls.clear();
        envoy.vm.on_log(first, &mut s);
        assert_eq!(
            s.calls,
            vec![
                "property cluster",
                "now",
                "get Response :status",
                "property details"
            ]
        );
    }

    #[test]
    fn streams_are_recorded_under_the_root_their_plugin_name_picks() {
        const WEB: &str = r#"{"clusters": {"app_canary": {"service": "web", "subset": "canary"}}}"#;
        for module in both() {
            let mut vm = Vm::new(module);
            let mut metrics = FakeHost::default();
            let m = &mut metrics;
            assert!(!configure_named(&mut vm, m, 1, "a", APP).name_clash);
            assert!(!configure_named(&mut vm, m, 2, "b", WEB).name_clash);
            // The same name and configuration (another listener): nothing to tell apart.
            assert!(!configure_named(&mut vm, m, 3, "a", APP).name_clash);
            assert!(configure_named(&mut vm, m, 4, "b", APP).name_clash);
            // One stream of plugin `name`; returns web's 2xx count after it.
            let send = |vm: &mut Vm, metrics: &mut FakeHost, context: u32, name: &str| {
                let mut r = FakeStream::finished("app_canary", 200)
                    .with_property("plugin_name", name.as_bytes());
                r.metrics = std::mem::take(metrics);
                if module == FilterModule::Full {
                    vm.on_request_headers(context, &mut r);
                    vm.on_response_headers(context, false, &mut r);
                }
                vm.on_log(context, &mut r);
                vm.on_tick(1, &mut r);
                let reads = r.calls.iter().filter(|c| *c == "property plugin_name");
                assert_eq!(reads.count(), 1, "{module:?}: {:?}", r.calls);
                *metrics = std::mem::take(&mut r.metrics);
                metrics.counter_sum(&requests_name("web", "canary", "2xx"))
            };
            // "a": roots 1 and 3 (the same configuration); "b": the newest, root 4 (app).
            assert_eq!(send(&mut vm, &mut metrics, 10, "a"), 0, "{module:?}");
            assert_eq!(send(&mut vm, &mut metrics, 11, "b"), 0, "{module:?}");
            // No root of that name: the newest root (4).
            assert_eq!(send(&mut vm, &mut metrics, 12, "c"), 0, "{module:?}");
            let app = metrics.counter_sum(&requests_name("app", "canary", "2xx"));
            assert_eq!(app, 3, "{module:?}");
            // Root 4 reconfigured as WEB: "b" streams are web's now.
            configure_named(&mut vm, &mut metrics, 4, "b", WEB);
            assert_eq!(send(&mut vm, &mut metrics, 13, "b"), 1, "{module:?}");
            assert_eq!(send(&mut vm, &mut metrics, 14, "a"), 1, "{module:?}");
        }
    }

    #[test]
    fn the_observer_rejects_tagging_settings_and_keeps_counting() {
        let mut envoy = Envoy::new(FilterModule::Observer, APP);
        let mut s = FakeStream::new();
        s.metrics = std::mem::take(&mut envoy.metrics);
        let outcome = envoy.vm.on_configure(
            ROOT,
            Some(br#"{"clusters": {}, "responseHeader": "x-fledge-subset"}"#),
            &mut s,
        );
        let Configured::Rejected(err) = outcome.configured else {
            panic!("accepted: {outcome:?}");
        };
        assert_eq!(err.field(), "responseHeader");
        assert_eq!(s.metrics.counter(contract::CONFIG_ERRORS_TOTAL), 1);
        envoy.metrics = std::mem::take(&mut s.metrics);
        // The previous configuration stays: requests are still labelled by it.
        envoy.request(FakeStream::finished("app_canary", 200), Response::Body);
        envoy.tick();
        assert_eq!(envoy.count("canary", "2xx"), 1);
    }

    #[test]
    fn every_root_is_flushed_by_any_tick_and_old_roots_are_dropped() {
        let mut vm = Vm::new(FilterModule::Observer);
        let mut s = FakeStream::new();
        for root in 1..=(MAX_ROOTS as u32 + 1) {
            s.properties
                .insert("plugin_name", format!("root-{root}").into_bytes());
            vm.on_configure(root, Some(APP.as_bytes()), &mut s);
            if root > 1 {
                vm.on_tick(root, &mut s);
            }
        }
        // Root 1 never ticked: it was dropped for the newest, after publishing its counts.
        assert!(vm.plugin(1).is_none());
        assert!(vm.plugin(MAX_ROOTS as u32 + 1).is_some());
        // A stream of root 2 is counted; root 3's tick publishes it.
        let context = 100;
        let mut r = FakeStream::finished("app_canary", 200).with_property("plugin_name", b"root-2");
        r.metrics = std::mem::take(&mut s.metrics);
        vm.on_log(context, &mut r);
        vm.on_tick(3, &mut r);
        assert_eq!(
            r.metrics
                .counter_sum(&requests_name("app", "canary", "2xx")),
            1
        );
    }
}
