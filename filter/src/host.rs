//! The proxy-wasm shell: the only module that makes hostcalls, and the module's exports. Each
//! exported callback hands the raw hostcalls to [`crate::module::Vm`], one per VM (Envoy runs a
//! VM per worker thread, single-threaded).
//!
//! No SDK: the exports are ours, so a build exports only the callbacks it needs (see
//! [`crate::module`]), and the hostcalls go through the raw ABI because the SDK's wrappers
//! `panic!` on any unexpected status, decode headers with `String::from_utf8(..).unwrap()`, and
//! allocate two vectors to serialize every property path; here every status is handled (a
//! failed call means "absent" or "not done"), values stay bytes, and paths are static.
//!
//! The cargo feature `full-module` (default) builds `fledge_filter.wasm`; `observer-module`
//! (the `fledge-observer` crate) builds `fledge_observer.wasm`.

use crate::guard::{CasWrite, SharedData};
use crate::metrics::{MetricHost, MetricKind};
use crate::module::{ConfigureOutcome, Vm};
use crate::plugin::{Configured, GuardEvent, Headers, Property, StreamHost};
use fledge_core::filter_config::FilterModule;
use std::cell::RefCell;
use std::ptr::{null, null_mut};

#[cfg(feature = "full-module")]
const MODULE: FilterModule = FilterModule::Full;
#[cfg(not(feature = "full-module"))]
const MODULE: FilterModule = FilterModule::Observer;

thread_local! {
    static VM: RefCell<Vm> = RefCell::new(Vm::new(MODULE));
}

/// Run `f` on this VM's state; a re-entrant call (not expected: no callback calls back into the
/// module except the allocator) is skipped rather than panicking.
fn with_vm<R: Default>(f: impl FnOnce(&mut Vm) -> R) -> R {
    VM.with(|vm| match vm.try_borrow_mut() {
        Ok(mut vm) => f(&mut vm),
        Err(_) => R::default(),
    })
}

/// Log levels of the proxy-wasm ABI.
#[derive(Debug, Clone, Copy)]
enum LogLevel {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// The proxy-wasm ABI 0.2.1 imports the filter uses. Integers instead of the SDK's enums, so an
/// unexpected status from the host is just a number, never an invalid enum value.
mod abi {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
        pub fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            return_buffer_data: *mut *mut u8,
            return_buffer_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_pairs(
            map_type: u32,
            return_map_data: *mut *mut u8,
            return_map_size: *mut usize,
        ) -> u32;
        pub fn proxy_replace_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_remove_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
        ) -> u32;
        pub fn proxy_get_property(
            path_data: *const u8,
            path_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
        pub fn proxy_call_foreign_function(
            function_name_data: *const u8,
            function_name_size: usize,
            arguments_data: *const u8,
            arguments_size: usize,
            results_data: *mut *mut u8,
            results_size: *mut usize,
        ) -> u32;
        pub fn proxy_define_metric(
            metric_type: u32,
            name_data: *const u8,
            name_size: usize,
            return_id: *mut u32,
        ) -> u32;
        pub fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
        pub fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
        pub fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        pub fn proxy_get_shared_data(
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
            return_cas: *mut u32,
        ) -> u32;
        pub fn proxy_set_shared_data(
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
            cas: u32,
        ) -> u32;
    }

    pub const OK: u32 = 0;
    pub const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
    pub const MAP_REQUEST_HEADERS: u32 = 0;
    pub const MAP_RESPONSE_HEADERS: u32 = 2;
    pub const MAP_RESPONSE_TRAILERS: u32 = 3;
    pub const CAS_MISMATCH: u32 = 8;
    pub const METRIC_COUNTER: u32 = 0;
    pub const METRIC_GAUGE: u32 = 1;
}

/// Take ownership of bytes the host wrote into memory it got from our allocator export
/// (`proxy_on_memory_allocate`, a boxed slice of exactly `size` bytes).
fn owned(status: u32, data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if status != abi::OK || data.is_null() {
        return None;
    }
    // SAFETY: on success the host returns a pointer obtained from the module's own allocator
    // for exactly `size` bytes, which it filled and handed over; we become its only owner.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Like [`owned`], for header values: a present header with an empty value comes back as
/// success with no data, and must stay "present" (so an empty forced-canary header is stripped).
fn owned_header(status: u32, data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if status == abi::OK && data.is_null() {
        return Some(Vec::new());
    }
    owned(status, data, size)
}

fn log(level: LogLevel, message: &str) {
    // SAFETY: pointer and length describe a live &str for the duration of the call.
    unsafe {
        abi::proxy_log(level as u32, message.as_ptr(), message.len());
    }
}

fn plugin_configuration() -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: out-pointers are valid locals; see `owned` for the returned memory.
    let status = unsafe {
        abi::proxy_get_buffer_bytes(
            abi::BUFFER_PLUGIN_CONFIGURATION,
            0,
            usize::MAX,
            &mut data,
            &mut size,
        )
    };
    owned(status, data, size)
}

/// Property paths, NUL-separated as the ABI wants them, built at compile time.
fn property_path(property: Property) -> &'static [u8] {
    match property {
        Property::ClusterName => b"xds\0cluster_name",
        Property::UpstreamWorkload => {
            b"xds\0upstream_host_metadata\0filter_metadata\0istio\0workload"
        }
        Property::SourceAddress => b"source\0address",
        Property::ResponseCodeDetails => b"response\0code_details",
        Property::ResponseFlags => b"response\0flags",
        Property::RequestDuration => b"request\0duration",
    }
}

fn map_type(map: Headers) -> u32 {
    match map {
        Headers::Request => abi::MAP_REQUEST_HEADERS,
        Headers::Response => abi::MAP_RESPONSE_HEADERS,
        Headers::ResponseTrailers => abi::MAP_RESPONSE_TRAILERS,
    }
}

/// [`StreamHost`] and [`MetricHost`] over the raw hostcalls.
struct Hostcalls;

impl StreamHost for Hostcalls {
    fn header(&mut self, map: Headers, name: &str) -> Option<Vec<u8>> {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: `name` is live for the call; out-pointers are valid locals.
        let status = unsafe {
            abi::proxy_get_header_map_value(
                map_type(map),
                name.as_ptr(),
                name.len(),
                &mut data,
                &mut size,
            )
        };
        owned_header(status, data, size)
    }

    fn set_header(&mut self, map: Headers, name: &str, value: &[u8]) {
        // SAFETY: `name` and `value` are live for the call.
        unsafe {
            abi::proxy_replace_header_map_value(
                map_type(map),
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            );
        }
    }

    fn remove_header(&mut self, map: Headers, name: &str) {
        // SAFETY: `name` is live for the call.
        unsafe {
            abi::proxy_remove_header_map_value(map_type(map), name.as_ptr(), name.len());
        }
    }

    fn property(&mut self, property: Property) -> Option<Vec<u8>> {
        let path = property_path(property);
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: `path` is static; out-pointers are valid locals.
        let status =
            unsafe { abi::proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
        owned(status, data, size)
    }

    fn response_headers(&mut self) -> Option<Vec<u8>> {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: out-pointers are valid locals.
        let status = unsafe {
            abi::proxy_get_header_map_pairs(abi::MAP_RESPONSE_HEADERS, &mut data, &mut size)
        };
        owned(status, data, size)
    }

    fn now_nanos(&mut self) -> Option<u64> {
        let mut nanos = 0u64;
        // SAFETY: out-pointer is a valid local.
        let status = unsafe { abi::proxy_get_current_time_nanoseconds(&mut nanos) };
        (status == abi::OK).then_some(nanos)
    }

    fn clear_route_cache(&mut self) {
        const NAME: &str = "clear_route_cache";
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: `NAME` is static; no arguments; out-pointers are valid locals.
        let status = unsafe {
            abi::proxy_call_foreign_function(
                NAME.as_ptr(),
                NAME.len(),
                null(),
                0,
                &mut data,
                &mut size,
            )
        };
        // Free anything the host returned (nothing, for this function).
        drop(owned(status, data, size));
    }
}

impl MetricHost for Hostcalls {
    fn define(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        let kind = match kind {
            MetricKind::Counter => abi::METRIC_COUNTER,
            MetricKind::Gauge => abi::METRIC_GAUGE,
        };
        let mut id = 0u32;
        // SAFETY: `name` is live for the call; out-pointer is a valid local.
        let status = unsafe { abi::proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) };
        if status == abi::OK {
            Some(id)
        } else {
            log(
                LogLevel::Warn,
                &format!("cannot define metric {name}: status {status}"),
            );
            None
        }
    }

    fn increment(&mut self, id: u32, delta: i64) {
        // SAFETY: plain integers.
        unsafe {
            abi::proxy_increment_metric(id, delta);
        }
    }

    fn record(&mut self, id: u32, value: u64) {
        // SAFETY: plain integers.
        unsafe {
            abi::proxy_record_metric(id, value);
        }
    }
}

impl SharedData for Hostcalls {
    fn get_shared(&mut self, key: &str) -> Option<(Vec<u8>, u32)> {
        let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
        // SAFETY: `key` is live for the call; out-pointers are valid locals.
        let status = unsafe {
            abi::proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        };
        if status == abi::OK && data.is_null() {
            return Some((Vec::new(), cas));
        }
        owned(status, data, size).map(|value| (value, cas))
    }

    fn set_shared(&mut self, key: &str, value: &[u8], cas: u32) -> CasWrite {
        // SAFETY: `key` and `value` are live for the call.
        let status = unsafe {
            abi::proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
        };
        match status {
            abi::OK => CasWrite::Stored,
            abi::CAS_MISMATCH => CasWrite::Mismatch,
            _ => CasWrite::Failed,
        }
    }
}

fn log_guard_event(event: &GuardEvent) {
    match event {
        GuardEvent::Tripped { service, window } => log(
            LogLevel::Warn,
            &format!(
                "guard tripped for service {service}: {} of the last {} canary requests failed; \
                 new requests go to stable until the controller rolls back (or the guard re-arms)",
                window.failures, window.requests
            ),
        ),
        GuardEvent::Rearmed { service } => {
            log(LogLevel::Info, &format!("guard re-armed for service {service}"))
        }
        GuardEvent::MergeFailed { service, attempts } => log(
            LogLevel::Debug,
            &format!(
                "guard window of {service} busy after {attempts} attempts; counts kept for the next tick"
            ),
        ),
    }
}

fn log_configured(vm: &Vm, root_id: u32, outcome: &ConfigureOutcome) {
    match &outcome.configured {
        Configured::Applied {
            clusters,
            istio_cluster_names,
        } => {
            let Some(config) = vm.plugin(root_id).map(|plugin| plugin.config()) else {
                return;
            };
            log(
                LogLevel::Info,
                &format!(
                    "{} configured {clusters} cluster(s), istioClusterNames={istio_cluster_names}, \
                     endpointMetadata={}, subsetHeader={:?}, responseHeader={:?}, \
                     routeHeader={}, sticky={}, forceCanary={}, guard={}",
                    vm.module().file_name(),
                    config.endpoint_metadata,
                    config.subset_header,
                    config.response_header,
                    config.route_header,
                    config.sticky.is_some(),
                    config.force_canary.is_some(),
                    config.guard.is_some(),
                ),
            )
        }
        Configured::Rejected(err) => log(
            LogLevel::Error,
            &format!(
                "invalid plugin configuration, keeping the previous one (or the defaults): {err}"
            ),
        ),
    }
}

// The exports. Signatures follow the proxy-wasm ABI 0.2.1 (`usize` is 32 bits on wasm32).

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

/// Module initialisation (WASI reactor): static constructors, then a panic hook that logs at
/// `critical` (the filter is written not to panic; if it does anyway, the message is kept).
#[no_mangle]
pub extern "C" fn _initialize() {
    #[cfg(target_os = "wasi")]
    // SAFETY: the WASI reactor contract: run the static constructors once, before anything else.
    unsafe {
        __wasm_call_ctors();
    }
    std::panic::set_hook(Box::new(|info| {
        log(
            LogLevel::Critical,
            &format!("fledge filter panicked: {info}"),
        );
    }));
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host copies values into memory it gets here (`size` bytes, uninitialised until the host
/// writes them); `owned` takes them back once written.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let buffer: Box<[std::mem::MaybeUninit<u8>]> = Box::new_uninit_slice(size);
    Box::into_raw(buffer).cast::<u8>()
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_id: u32, _vm_configuration_size: usize) -> bool {
    true
}

/// Always accepts: returning false would NACK the configuration or keep Envoy from starting.
#[no_mangle]
pub extern "C" fn proxy_on_configure(root_id: u32, _plugin_configuration_size: usize) -> bool {
    let raw = plugin_configuration();
    with_vm(|vm| {
        let outcome = vm.on_configure(root_id, raw.as_deref(), &mut Hostcalls);
        log_configured(vm, root_id, &outcome);
        // SAFETY: plain integer; applies to the root context being configured.
        let status = unsafe { abi::proxy_set_tick_period_milliseconds(outcome.tick_millis) };
        if status != abi::OK {
            log(
                LogLevel::Error,
                &format!(
                    "cannot set the tick period (status {status}); request counts stay unpublished"
                ),
            );
        }
    });
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, root_id: u32) {
    with_vm(|vm| vm.on_context_create(context_id, root_id, &mut Hostcalls));
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root_id: u32) {
    with_vm(|vm| {
        for event in vm.on_tick(root_id, &mut Hostcalls) {
            log_guard_event(&event);
        }
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_log(context_id: u32) {
    with_vm(|vm| {
        if let Some(event) = vm.on_log(context_id, &mut Hostcalls) {
            log_guard_event(&event);
        }
    });
}

/// `Continue`, the only answer the filter gives: it never holds a stream.
const CONTINUE: u32 = 0;

/// Every chunk of a response body (both modules): only the end of stream is noted.
#[no_mangle]
pub extern "C" fn proxy_on_response_body(
    context_id: u32,
    body_size: usize,
    end_of_stream: bool,
) -> u32 {
    with_vm(|vm| vm.on_response_body(context_id, body_size, end_of_stream));
    CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(context_id: u32, _num_trailers: usize) -> u32 {
    with_vm(|vm| vm.on_response_trailers(context_id, &mut Hostcalls));
    CONTINUE
}

#[cfg(feature = "full-module")]
#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    context_id: u32,
    _num_headers: usize,
    _end_of_stream: bool,
) -> u32 {
    with_vm(|vm| vm.on_request_headers(context_id, &mut Hostcalls));
    CONTINUE
}

#[cfg(feature = "full-module")]
#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    context_id: u32,
    _num_headers: usize,
    end_of_stream: bool,
) -> u32 {
    with_vm(|vm| vm.on_response_headers(context_id, end_of_stream, &mut Hostcalls));
    CONTINUE
}
