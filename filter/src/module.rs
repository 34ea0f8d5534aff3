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
//! | response trailers (only when there are trailers) | ✓ (`grpc-status`) | ✓ (`grpc-status`) |
//! | log | ✓ (metrics) | ✓ (metrics) |
//! | tick (per root context, 1 s or 100 ms) | ✓ | ✓ |
//!
//! No body callbacks and no `on_done`/`on_delete` in either: the log phase reads what it needs
//! (see [`crate::plugin::Finished::from_stream`]), stream state lives in a fixed ring of slots
//! indexed by context id instead of a map that needs deleting, and batched counts of every root
//! context are published by any root's tick, so nothing waits for a root's `on_done`.
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
            Callback::ResponseTrailers,
            Callback::Log,
            Callback::Tick,
        ],
        FilterModule::Observer => &[
            Callback::ContextCreate,
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
    pub fn on_request_headers<H: StreamHost + MetricHost>(&mut self, context_id: u32, host: &mut H) {
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
