//! The floor of the observer's metrics without a Wasm VM, for `make bench-filter`: an Envoy
//! [dynamic module] access logger (a native shared object Envoy loads with `dlopen`) that makes,
//! per request, the four reads per-subset metrics need, through Envoy's C ABI instead of
//! proxy-wasm: the upstream cluster, the response code, the code details (did the upstream
//! answer, completely) and the duration; then counts in memory like `filter/floor`.
//!
//! Envoy calls an access logger once per finished request, on the worker thread, with no VM
//! to enter and nothing copied: each read is a native call returning a value or a pointer
//! into Envoy's own memory. What this costs next to `none` (no filter at all) is what a
//! native observer would pay; what `floor` costs next to it is the Wasm VM's share.
//!
//! Counts are published as `fledge_native_floor_requests_total.<class>` counters, at most
//! once a second per worker (by the first request logged a second after the last
//! publication), so the bench and the e2e test can see that every request was read.
//!
//! Built for the machine's own target (`libfledge_native_floor.so`), not for Wasm. The
//! signatures below are Envoy 1.40's (checked against its binary); Envoy warns that the ABI
//! version string is not its own, and loads the module. Bench-only: not a product module.
//!
//! [dynamic module]: https://www.envoyproxy.io/docs/envoy/latest/intro/arch_overview/advanced/dynamic_modules

/// `2xx`…`5xx`, `none` (no cluster, no code, or the upstream did not answer completely).
pub const CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "none"];
/// Publish pending counts once this much time has passed since the last publication.
pub const PUBLISH_NANOS: i64 = 1_000_000_000;
/// Distinct clusters kept apart per worker; more are folded into the last.
pub const MAX_CLUSTERS: usize = 16;

/// The class index of a finished request (see [`CLASSES`]).
pub fn class(has_cluster: bool, code: u32, via_upstream: bool) -> usize {
    match (has_cluster && via_upstream, code / 100) {
        (true, 2) => 0,
        (true, 3) => 1,
        (true, 4) => 2,
        (true, 5) => 3,
        _ => 4,
    }
}

/// One worker's counts since the last publication.
#[derive(Debug, Default)]
pub struct Counts {
    clusters: Vec<(Vec<u8>, [u64; 5])>,
    /// Summed and never published, as `filter/floor` does: the floor uses each value it
    /// reads, it does not ship a histogram.
    duration_ms: i64,
    last_publish: Option<i64>,
}

impl Counts {
    /// Record one request of `cluster` in class `class`.
    pub fn record(&mut self, cluster: &[u8], class: usize, duration_ms: i64) {
        let index = match self.clusters.iter().position(|(name, _)| name == cluster) {
            Some(index) => index,
            None if self.clusters.len() < MAX_CLUSTERS => {
                self.clusters.push((cluster.to_vec(), [0; 5]));
                self.clusters.len() - 1
            }
            None => MAX_CLUSTERS - 1,
        };
        if let Some(count) = self
            .clusters
            .get_mut(index)
            .and_then(|(_, counts)| counts.get_mut(class))
        {
            *count += 1;
        }
        self.duration_ms += duration_ms;
    }

    /// The per-class totals to publish for a request that started at `now_nanos`, if a
    /// second has passed since the last publication (the first request only starts the
    /// clock); they are then cleared.
    pub fn due(&mut self, now_nanos: i64) -> Option<[u64; 5]> {
        let last = *self.last_publish.get_or_insert(now_nanos);
        if now_nanos.saturating_sub(last) < PUBLISH_NANOS {
            return None;
        }
        self.last_publish = Some(now_nanos);
        let mut totals = [0u64; 5];
        for (_, counts) in &mut self.clusters {
            for (total, count) in totals.iter_mut().zip(counts.iter_mut()) {
                *total += std::mem::take(count);
            }
        }
        Some(totals)
    }
}

/// Envoy's C ABI (version 1.40): the callbacks this logger makes and the hooks it exports.
/// Left out of test builds: the callbacks are Envoy's symbols, resolved when Envoy loads the
/// shared object, so a test executable could not link them.
#[cfg(not(test))]
// The dynamic-module ABI: raw imports and `#[no_mangle]` exports, each with a SAFETY comment.
#[allow(unsafe_code)]
mod abi {
    use super::{class, Counts, CLASSES};
    use std::ffi::c_void;

    /// A string Envoy owns (`envoy_dynamic_module_type_envoy_buffer`).
    #[repr(C)]
    pub struct EnvoyBuffer {
        ptr: *const u8,
        length: usize,
    }

    /// A string the module owns (`envoy_dynamic_module_type_module_buffer`).
    #[repr(C)]
    pub struct ModuleBuffer {
        ptr: *const u8,
        length: usize,
    }

    /// `envoy_dynamic_module_type_timing_info`: eight `int64_t`, -1 when unknown; the first
    /// two are the start (Unix ns) and the request's duration (ns).
    #[repr(C)]
    struct TimingInfo {
        start_time_unix_ns: i64,
        request_complete_duration_ns: i64,
        rest: [i64; 6],
    }

    extern "C" {
        fn envoy_dynamic_module_callback_access_logger_get_upstream_cluster(
            logger_envoy: *mut c_void,
            result: *mut EnvoyBuffer,
        ) -> bool;
        /// 0 when no response was sent.
        fn envoy_dynamic_module_callback_access_logger_get_response_code(
            logger_envoy: *mut c_void,
        ) -> u32;
        fn envoy_dynamic_module_callback_access_logger_get_response_code_details(
            logger_envoy: *mut c_void,
            result: *mut EnvoyBuffer,
        ) -> bool;
        fn envoy_dynamic_module_callback_access_logger_get_timing_info(
            logger_envoy: *mut c_void,
            result: *mut TimingInfo,
        ) -> bool;
        /// Returns 0 (`Success`) and writes the counter's id.
        fn envoy_dynamic_module_callback_access_logger_config_define_counter(
            config_envoy: *mut c_void,
            name: ModuleBuffer,
            counter_id: *mut usize,
        ) -> u32;
        fn envoy_dynamic_module_callback_access_logger_increment_counter(
            config_envoy: *mut c_void,
            counter_id: usize,
            value: u64,
        ) -> u32;
    }

    /// Not Envoy's ABI version string: Envoy logs a warning and loads the module.
    static ABI_VERSION: &[u8] = b"fledge-native-floor (Envoy 1.40 dynamic-module ABI)\0";

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const u8 {
        ABI_VERSION.as_ptr()
    }

    /// Shared by every worker's logger; read-only after creation.
    struct Config {
        envoy: *mut c_void,
        counter_ids: [Option<usize>; 5],
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_access_logger_config_new(
        config_envoy: *mut c_void,
        _name: EnvoyBuffer,
        _config: EnvoyBuffer,
    ) -> *const c_void {
        let mut counter_ids = [None; 5];
        for (id, name) in counter_ids.iter_mut().zip(CLASSES) {
            let metric = format!("fledge_native_floor_requests_total.{name}");
            let mut new_id = 0usize;
            let buffer = ModuleBuffer {
                ptr: metric.as_ptr(),
                length: metric.len(),
            };
            // SAFETY: `metric` outlives the call (Envoy copies the name); `new_id` is a valid
            // local; `config_envoy` is the pointer Envoy just passed in.
            let status = unsafe {
                envoy_dynamic_module_callback_access_logger_config_define_counter(
                    config_envoy,
                    buffer,
                    &mut new_id,
                )
            };
            *id = (status == 0).then_some(new_id);
        }
        let config = Box::new(Config {
            envoy: config_envoy,
            counter_ids,
        });
        Box::into_raw(config) as *const c_void
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_access_logger_config_destroy(config: *mut c_void) {
        if !config.is_null() {
            // SAFETY: `config` came from `Box::into_raw` in `config_new`; Envoy destroys once.
            drop(unsafe { Box::from_raw(config as *mut Config) });
        }
    }

    /// One per worker thread.
    struct Logger {
        config: *const Config,
        counts: Counts,
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_access_logger_new(
        config: *const c_void,
        _logger_envoy: *mut c_void,
    ) -> *mut c_void {
        let logger = Box::new(Logger {
            config: config as *const Config,
            counts: Counts::default(),
        });
        Box::into_raw(logger) as *mut c_void
    }

    /// A string Envoy lent for this call, or empty.
    fn lent(found: bool, buffer: &EnvoyBuffer) -> &[u8] {
        if !found || buffer.ptr.is_null() {
            return &[];
        }
        // SAFETY: Envoy points at `length` bytes it owns for the duration of this log call.
        unsafe { std::slice::from_raw_parts(buffer.ptr, buffer.length) }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_access_logger_log(
        logger_envoy: *mut c_void,
        logger: *mut c_void,
        _log_type: u32,
    ) {
        if logger.is_null() {
            return;
        }
        // SAFETY: `logger` came from `Box::into_raw` in `logger_new`; Envoy calls it from the
        // one worker thread that owns it.
        let logger = unsafe { &mut *(logger as *mut Logger) };
        let mut cluster = EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        let mut details = EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        let mut timing = TimingInfo {
            start_time_unix_ns: -1,
            request_complete_duration_ns: -1,
            rest: [-1; 6],
        };
        // SAFETY: `logger_envoy` is the pointer Envoy passed for this call; the out-pointers
        // are valid locals of the ABI's layout.
        let (has_cluster, code, has_details) = unsafe {
            let has_cluster = envoy_dynamic_module_callback_access_logger_get_upstream_cluster(
                logger_envoy,
                &mut cluster,
            );
            let code = envoy_dynamic_module_callback_access_logger_get_response_code(logger_envoy);
            let has_details = envoy_dynamic_module_callback_access_logger_get_response_code_details(
                logger_envoy,
                &mut details,
            );
            envoy_dynamic_module_callback_access_logger_get_timing_info(logger_envoy, &mut timing);
            (has_cluster, code, has_details)
        };
        let cluster = lent(has_cluster, &cluster);
        let via_upstream = lent(has_details, &details) == b"via_upstream";
        let duration_ms = timing.request_complete_duration_ns.max(0) / 1_000_000;
        if let Some(totals) = logger.counts.due(timing.start_time_unix_ns) {
            publish(logger.config, totals);
        }
        let class = class(!cluster.is_empty(), code, via_upstream);
        logger.counts.record(cluster, class, duration_ms);
    }

    fn publish(config: *const Config, totals: [u64; 5]) {
        // SAFETY: Envoy destroys the config only after every logger made from it.
        let Some(config) = (unsafe { config.as_ref() }) else {
            return;
        };
        for (id, count) in config.counter_ids.iter().zip(totals) {
            if let (Some(id), true) = (id, count > 0) {
                // SAFETY: `config.envoy` is the config pointer Envoy gave `config_new`; `id`
                // is a counter it defined there. Envoy's counters are safe to bump from workers.
                unsafe {
                    envoy_dynamic_module_callback_access_logger_increment_counter(
                        config.envoy,
                        *id,
                        count,
                    );
                }
            }
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_access_logger_destroy(logger: *mut c_void) {
        if !logger.is_null() {
            // SAFETY: `logger` came from `Box::into_raw` in `logger_new`; destroyed once.
            drop(unsafe { Box::from_raw(logger as *mut Logger) });
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_access_logger_flush(_logger: *mut c_void) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_need_a_cluster_and_an_upstream_answer() {
        assert_eq!(class(true, 200, true), 0);
        assert_eq!(class(true, 302, true), 1);
        assert_eq!(class(true, 404, true), 2);
        assert_eq!(class(true, 503, true), 3);
        // A local reply, a reset, no cluster, no response.
        assert_eq!(class(true, 503, false), 4);
        assert_eq!(class(false, 200, true), 4);
        assert_eq!(class(true, 0, true), 4);
    }

    #[test]
    fn counts_are_published_a_second_after_the_last_publication() {
        let mut counts = Counts::default();
        assert_eq!(counts.due(5_000_000_000), None);
        counts.record(b"app_canary", 0, 3);
        counts.record(b"app_stable", 0, 3);
        counts.record(b"app_canary", 3, 3);
        assert_eq!(counts.due(5_900_000_000), None);
        assert_eq!(counts.due(6_000_000_000), Some([2, 0, 0, 1, 0]));
        // Cleared, and the clock restarts at the publication.
        counts.record(b"app_canary", 4, 0);
        assert_eq!(counts.due(6_500_000_000), None);
        assert_eq!(counts.due(7_000_000_000), Some([0, 0, 0, 0, 1]));
    }

    #[test]
    fn clusters_beyond_the_limit_fold_into_the_last() {
        let mut counts = Counts::default();
        counts.due(0);
        for i in 0..MAX_CLUSTERS + 3 {
            counts.record(format!("c{i}").as_bytes(), 0, 0);
        }
        assert_eq!(counts.clusters.len(), MAX_CLUSTERS);
        assert_eq!(
            counts.due(PUBLISH_NANOS),
            Some([MAX_CLUSTERS as u64 + 3, 0, 0, 0, 0])
        );
    }
}
