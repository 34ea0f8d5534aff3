//! What Envoy calls in each build of the filter, as plain Rust: the state of one Wasm VM (one
//! per Envoy worker thread) and one function per exported callback. `host.rs` exports these
//! functions with the proxy-wasm ABI names; the tests call them the way Envoy does.
//!
//! Envoy enters the VM only for the callbacks a module exports (proxy-wasm-cpp-host returns
//! `Continue` without a VM call for a missing export), and every entry costs CPU on every
//! request. So each build exports only what it needs ([`Callback`], [`exports`]):
//!
//! | callback | full (`fledge_filter.wasm`) | observer (`fledge_observer.wasm`) |
//! |---|---|---|
//! | context create | ✓ (clock) | ✓ (clock) |
//! | request headers | ✓ (tagging, guard, strip) | — |
//! | response headers | ✓ (`responseHeader`, bodiless) | — |
//! | response body (every chunk; no hostcall) | ✓ (end of stream) | ✓ (end of stream) |
//! | response trailers (only when there are trailers) | ✓ (`grpc-status`) | ✓ (`grpc-status`) |
//! | log | ✓ (metrics) | ✓ (metrics) |
//! | tick (per root context, 1 s or 100 ms) | ✓ | ✓ |
//!
//! The response body callback only notes the end of stream: a response whose body ended is
//! complete, so for a 2xx/3xx `on_log` skips the `response.code_details` read (a value read,
//! ~1–1.5 µs, against ~0.2–0.5 µs for the VM entry), and the observer skips the trailers-only
//! `grpc-status` lookup for any response with a body. Envoy enters the VM once per body chunk,
//! so a response streamed in many chunks pays one entry per chunk (docs/filter-performance.md).
//! No request body callbacks and no `on_done`/`on_delete` in either: the log phase reads what
//! it needs (see [`crate::plugin::Finished::from_stream`]), stream state lives in a fixed ring
//! of slots indexed by context id instead of a map that needs deleting, and batched counts of
//! every root context are published by any root's tick, so nothing waits for a root's
//! `on_done`.
//!
//! The rust SDK's dispatcher would export all callbacks and keep boxed contexts in hash maps;
//! this module replaces it.

use crate::guard::SharedData;
use crate::metrics::MetricHost;
use crate::plugin::{Configured, GuardEvent, Plugin, StreamHost, StreamState};
use fledge_core::filter_config::FilterModule;
use std::collections::BTreeMap;

/// Stream slots per VM. A stream whose slot a newer stream took (more than this many streams
/// started on the worker while it was in flight) is still recorded: `on_log` then reads the
/// duration, the cluster and the gRPC status from Envoy instead of from the slot.
pub const STREAM_SLOTS: usize = 4096;
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
    ContextCreate,
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
            Callback::ContextCreate => "proxy_on_context_create",
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
            Callback::ContextCreate,
            Callback::RequestHeaders,
            Callback::ResponseHeaders,
            Callback::ResponseBody,
            Callback::ResponseTrailers,
            Callback::Log,
            Callback::Tick,
        ],
        FilterModule::Observer => &[
            Callback::ContextCreate,
            Callback::ResponseBody,
            Callback::ResponseTrailers,
            Callback::Log,
            Callback::Tick,
        ],
    }
}

/// One root context: a plugin configuration and its timer.
#[derive(Debug)]
struct Root {
    plugin: Plugin,
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
    /// The root created last: the one a stream the VM lost track of is recorded under.
    newest_root: Option<u32>,
    slots: Vec<Slot>,
    /// Ticks seen by the whole VM, for [`Root::last_tick`].
    clock: u64,
}

/// What `on_configure` did, for the shell to log and to set the root's tick period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigureOutcome {
    pub configured: Configured,
    pub tick_millis: u32,
}

impl Vm {
    pub fn new(module: FilterModule) -> Self {
        Vm {
            module,
            roots: BTreeMap::new(),
            newest_root: None,
            slots: vec![Slot::default(); STREAM_SLOTS],
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
    /// configuration. Never fails (see [`Plugin::configure`]).
    pub fn on_configure<H: MetricHost>(
        &mut self,
        root_id: u32,
        raw: Option<&[u8]>,
        host: &mut H,
    ) -> ConfigureOutcome {
        let root = self.root(root_id, host);
        let configured = root.plugin.configure(raw, host);
        root.tick_millis = if root.plugin.has_guards() {
            GUARD_TICK_MILLIS
        } else {
            COUNTER_FLUSH_MILLIS
        };
        ConfigureOutcome {
            configured,
            tick_millis: root.tick_millis,
        }
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
                tick_millis: COUNTER_FLUSH_MILLIS,
                ticks: 0,
                last_tick: clock,
            }
        })
    }

    fn slot_index(context_id: u32) -> usize {
        context_id as usize % STREAM_SLOTS
    }

    /// The tracked state of stream `context_id` and its root's plugin; a stream the VM lost
    /// track of gets a fresh state and the most recently added root.
    fn stream(&mut self, context_id: u32) -> (Option<&mut Plugin>, StreamState, usize) {
        let index = Self::slot_index(context_id);
        let slot = self.slots.get(index).copied().unwrap_or_default();
        let (root_id, state) = if slot.context_id == context_id && context_id != 0 {
            (Some(slot.root_id), slot.state)
        } else {
            (None, StreamState::default())
        };
        let root_id = root_id
            .filter(|id| self.roots.contains_key(id))
            .or(self.newest_root);
        let root = match root_id {
            Some(id) => self.roots.get_mut(&id),
            None => None,
        };
        let plugin = root.map(|root| &mut root.plugin);
        (plugin, state, index)
    }

    fn store(&mut self, index: usize, context_id: u32, state: StreamState) {
        if let Some(slot) = self.slots.get_mut(index) {
            if slot.context_id == context_id {
                slot.state = state;
            }
        }
    }

    /// `proxy_on_context_create`: a root context (`root_id == 0`) or a new stream of root
    /// `root_id`, whose start time is read now.
    pub fn on_context_create<H: StreamHost + MetricHost>(
        &mut self,
        context_id: u32,
        root_id: u32,
        host: &mut H,
    ) {
        if root_id == 0 {
            self.root(context_id, host);
            return;
        }
        let state = StreamState::started_at(host.now_nanos());
        if let Some(slot) = self.slots.get_mut(Self::slot_index(context_id)) {
            *slot = Slot {
                context_id,
                root_id,
                state,
            };
        }
    }

    /// `proxy_on_request_headers` (full module).
    pub fn on_request_headers<H: StreamHost + MetricHost>(
        &mut self,
        context_id: u32,
        host: &mut H,
    ) {
        let (plugin, mut state, index) = self.stream(context_id);
        if let Some(plugin) = plugin {
            plugin.on_request_headers(&mut state, host);
        }
        self.store(index, context_id, state);
    }

    /// `proxy_on_response_headers` (full module).
    pub fn on_response_headers<H: StreamHost + MetricHost>(
        &mut self,
        context_id: u32,
        end_of_stream: bool,
        host: &mut H,
    ) {
        let (plugin, mut state, index) = self.stream(context_id);
        if let Some(plugin) = plugin {
            plugin.on_response_headers(&mut state, end_of_stream, host);
        }
        self.store(index, context_id, state);
    }

    /// `proxy_on_response_body` (both modules; every chunk of a response body): note the end
    /// of stream in the stream's slot. No plugin, no hostcall: this runs per chunk. A stream
    /// whose slot a newer stream took is left alone (`on_log` then reads everything).
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
        let (plugin, mut state, index) = self.stream(context_id);
        if let Some(plugin) = plugin {
            plugin.on_response_trailers(&mut state, host);
        }
        self.store(index, context_id, state);
    }

    /// `proxy_on_log`: record the finished stream. Returns what the guard did, if anything.
    pub fn on_log<H: StreamHost + MetricHost + SharedData>(
        &mut self,
        context_id: u32,
        host: &mut H,
    ) -> Option<GuardEvent> {
        let (plugin, mut state, index) = self.stream(context_id);
        let event = plugin.and_then(|plugin| plugin.on_log(&mut state, host));
        // The slot is free again; a late callback for this stream finds nothing.
        if let Some(slot) = self.slots.get_mut(index) {
            if slot.context_id == context_id {
                *slot = Slot::default();
            }
        }
        event
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
            envoy.vm.on_context_create(ROOT, 0, &mut s);
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
            self.vm.on_context_create(context, ROOT, &mut s);
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
                // The body's end of stream (a VM entry, no hostcall) says the response is
                // complete and not trailers-only: no `response.code_details` read, and no
                // `grpc-status` lookup in the headers.
                FilterModule::Full => vec![
                    "now",                        // context create: the start
                    "get Request x-fledge-route", // request headers: strip a client's copy
                    "property cluster",           // log: the subset
                    "now",                        //   the duration
                    "get Response :status",       //   the class
                ],
                FilterModule::Observer => {
                    vec!["now", "property cluster", "now", "get Response :status"]
                }
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
        // (response, shape, the log phase's hostcalls after the start's clock read and the
        // full module's route-header strip)
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
                [&["pairs Response", "now"], &["pairs Response", "now"]],
            ),
            (
                // The observer sees no headers phase: the details, but no grpc-status lookup.
                "200, no body",
                named(200),
                Response::Bodiless,
                [
                    &["get Response grpc-status", "pairs Response", "now"],
                    &["pairs Response", "now", "property details"],
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
                    &["pairs Response", "now", "property details"],
                ],
            ),
            (
                "503: the details say whose",
                named(503),
                Response::Body,
                [
                    &["pairs Response", "now", "property details"],
                    &["pairs Response", "now", "property details"],
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
                    &["pairs Response", "property cluster", "now"],
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
                        "now",
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
                    FilterModule::Observer => &["now"],
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
        // The hostcalls beyond the cluster, the clock, `:status` (and the full module's route
        // header strip), per module and response shape: what the callbacks saw spares reads.
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
                // Complete (end of stream in the body), not trailers-only.
                "200 with a body",
                FakeStream::finished("app_canary", 200),
                Response::Body,
                [&[], &[]],
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
                // An empty body ending the stream could be trailers-only: the reads.
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
                [&["property details"], &["property details"]],
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
    fn a_stream_the_vm_lost_track_of_is_still_recorded() {
        for module in both() {
            let mut envoy = Envoy::new(module, APP);
            // Context ids that share a slot: the second stream takes the first one's slot
            // while the first is in flight.
            let (first, second) = (10, 10 + STREAM_SLOTS as u32);
            let mut s = FakeStream::finished("app_canary", 200);
            s.trailers.insert("grpc-status".into(), b"14".to_vec());
            s.properties
                .insert("duration", 42_000_000i64.to_le_bytes().to_vec());
            s.metrics = std::mem::take(&mut envoy.metrics);
            envoy.vm.on_context_create(first, ROOT, &mut s);
            envoy.vm.on_context_create(second, ROOT, &mut s);
            if module == FilterModule::Full {
                envoy.vm.on_request_headers(first, &mut s);
            }
            envoy.vm.on_response_trailers(first, &mut s);
            s.calls.clear();
            envoy.vm.on_log(first, &mut s);
            // Nothing known: the duration from Envoy, the gRPC status from the trailers, and
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
            envoy.metrics = std::mem::take(&mut s.metrics);
            envoy.tick();
            assert_eq!(envoy.count("canary", "5xx"), 1, "{module:?}");
            let (count, sum, buckets) = envoy.metrics.durations("app", "canary");
            assert_eq!((count, sum), (1, 42));
            assert_eq!(buckets, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
        }
    }

    #[test]
    fn a_body_seen_for_a_lost_stream_marks_neither_stream_complete() {
        for module in both() {
            let mut envoy = Envoy::new(module, APP);
            let (first, second) = (10, 10 + STREAM_SLOTS as u32);
            let mut s = FakeStream::finished("app_canary", 200);
            s.metrics = std::mem::take(&mut envoy.metrics);
            envoy.vm.on_context_create(first, ROOT, &mut s);
            envoy.vm.on_context_create(second, ROOT, &mut s);
            // The first stream's body ends while the second owns the slot.
            envoy.vm.on_response_body(first, 10, true);
            s.calls.clear();
            envoy.vm.on_log(first, &mut s);
            // Lost: everything is read again, code_details included.
            assert!(
                s.calls.contains(&"property details".to_string()),
                "{module:?}"
            );
            // The second stream (no body seen yet, cut off) was not marked complete.
            envoy.vm.on_response_body(second, 10, false);
            s.calls.clear();
            envoy.vm.on_log(second, &mut s);
            assert_eq!(
                s.calls,
                vec![
                    "property cluster",
                    "now",
                    "get Response :status",
                    "property details"
                ],
                "{module:?}"
            );
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
            vm.on_context_create(root, 0, &mut s);
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
        let mut r = FakeStream::finished("app_canary", 200);
        r.metrics = std::mem::take(&mut s.metrics);
        vm.on_context_create(context, 2, &mut r);
        vm.on_log(context, &mut r);
        vm.on_tick(3, &mut r);
        assert_eq!(
            r.metrics
                .counter_sum(&requests_name("app", "canary", "2xx")),
            1
        );
    }
}
