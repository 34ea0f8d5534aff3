//! The floor of what the filter's metrics cost through proxy-wasm, for `make bench-filter`:
//! a module that exports only `proxy_on_log` (and the tick that publishes its counts) and makes,
//! per request, exactly the four reads per-subset metrics need — `xds.cluster_name` (which
//! subset), `response.code` (the class), `response.code_details` (did the upstream answer,
//! completely: resets, local replies and cut-off responses are `none`) and `request.duration`
//! — then counts in memory. No gRPC status, no configuration, no guard: whatever a real
//! metrics filter costs above this is its own doing; this much any proxy-wasm filter with
//! these metrics pays.
//!
//! Its plugin configuration can list other reads instead, to measure what each costs
//! (`make bench-filter BENCH_ARGS=--reads` runs such a ladder): `none`, or reads separated by
//! commas — property paths with dots (`xds.cluster_name`, `response.code`, ...), `hdr:NAME` (a
//! response header), `pairs:NAME` (all response headers in one read: `:status` is the code,
//! `NAME` the cluster, as the filter's `clusterHeader` reads them) and `now` (a clock read). An empty configuration means the four above.
//!
//! Counts are published once a second as `fledge_floor_requests_total.<cluster>.<class>`
//! counters (so the bench can see it counted) and nothing else.
//!
//! With the cargo feature `cel`, the four reads are one CEL expression instead, compiled once
//! with Envoy's `expr_create` and evaluated per request with `expr_evaluate` (one hostcall, one
//! allocator entry). docs/filter-performance.md has what each costs; to compare:
//!
//! ```sh
//! cargo build -p fledge-floor-filter --features cel --target wasm32-wasip1 --release --target-dir /tmp/cel
//! make bench-filter BENCH_ARGS="--only floor --variant cel@/tmp/cel/wasm32-wasip1/release/fledge_floor_filter.wasm="
//! ```
//!
//! With the cargo feature `tagging`, the module also exports the request- and response-headers
//! callbacks, and its configuration can add, next to the reads: `sticky` (read the `x-user-id`
//! request header, hash it to a bucket and write it as `x-fledge-route`, which the bench's
//! weighted route picks on: what sticky routing costs any proxy-wasm filter), `sticky-read` (the
//! read alone), `req:NAME` (look a request header up by name; the bench's requests carry none of
//! the forced-canary, guard or route headers, so these are the lookups that find nothing) and
//! `resp-set` (write `x-fledge-subset: canary` into the response headers). Each callback returns
//! at once when it has nothing to do. The package `fledge-floor-tagging-filter` is this build.

/// The filter's walk of a serialized header map (`pairs:NAME` reads), dependency-free.
#[cfg(all(target_arch = "wasm32", not(feature = "cel")))]
#[path = "../../src/header_pairs.rs"]
mod header_pairs;

#[cfg(target_arch = "wasm32")]
// The proxy-wasm ABI: raw imports and `#[no_mangle]` exports, each with a SAFETY comment.
#[allow(unsafe_code)]
mod wasm {
    use std::cell::RefCell;
    use std::ptr::null_mut;

    #[link(wasm_import_module = "env")]
    extern "C" {
        #[cfg(not(feature = "cel"))]
        fn proxy_get_property(
            path_data: *const u8,
            path_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> u32;
        #[cfg(not(feature = "cel"))]
        fn proxy_get_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> u32;
        #[cfg(not(feature = "cel"))]
        fn proxy_get_header_map_pairs(
            map_type: u32,
            return_map_data: *mut *mut u8,
            return_map_size: *mut usize,
        ) -> u32;
        #[cfg(not(feature = "cel"))]
        fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
        #[cfg(not(feature = "cel"))]
        fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            return_buffer_data: *mut *mut u8,
            return_buffer_size: *mut usize,
        ) -> u32;
        fn proxy_define_metric(
            metric_type: u32,
            name_data: *const u8,
            name_size: usize,
            return_id: *mut u32,
        ) -> u32;
        fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
        #[cfg(feature = "tagging")]
        fn proxy_replace_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        #[cfg(feature = "cel")]
        fn proxy_call_foreign_function(
            name_data: *const u8,
            name_size: usize,
            arguments_data: *const u8,
            arguments_size: usize,
            results_data: *mut *mut u8,
            results_size: *mut usize,
        ) -> u32;
    }

    /// `2xx`…`5xx`, `none`.
    const CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "none"];
    /// Distinct clusters counted; more are folded into the last.
    const MAX_CLUSTERS: usize = 16;

    #[derive(Default)]
    struct Cluster {
        name: Vec<u8>,
        pending: [i64; 5],
        ids: [Option<u32>; 5],
        duration_ms: i64,
    }

    thread_local! {
        static CLUSTERS: RefCell<Vec<Cluster>> = const { RefCell::new(Vec::new()) };
    }

    /// Take the bytes the host wrote into memory from `proxy_on_memory_allocate`.
    fn owned(status: u32, data: *mut u8, size: usize) -> Option<Vec<u8>> {
        if status != 0 || data.is_null() {
            return None;
        }
        #[cfg(feature = "bump")]
        if bump::contains(data) {
            // SAFETY: the host filled `size` bytes of the arena, which stay put until the
            // next `proxy_on_log` resets it.
            return Some(unsafe { std::slice::from_raw_parts(data, size) }.to_vec());
        }
        // SAFETY: the host filled `size` bytes it got from `proxy_on_memory_allocate`.
        Some(unsafe { Vec::from_raw_parts(data, size, size) })
    }

    /// Experiment (`bump`): host-written values land in a static arena, reset per `on_log`.
    #[cfg(feature = "bump")]
    mod bump {
        use std::cell::Cell;
        const SIZE: usize = 16 * 1024;
        static mut ARENA: [u8; SIZE] = [0; SIZE];
        thread_local! {
            static USED: Cell<usize> = const { Cell::new(0) };
        }
        fn base() -> *mut u8 {
            std::ptr::addr_of_mut!(ARENA).cast::<u8>()
        }
        pub fn alloc(size: usize) -> Option<*mut u8> {
            let used = USED.get();
            let end = used.checked_add(size)?;
            if end > SIZE {
                return None;
            }
            USED.set(end);
            // SAFETY: `used + size <= SIZE`, inside the arena.
            Some(unsafe { base().add(used) })
        }
        pub fn reset() {
            USED.set(0);
        }
        pub fn contains(p: *mut u8) -> bool {
            let (start, p) = (base() as usize, p as usize);
            p >= start && p < start + SIZE
        }
    }

    #[cfg(not(feature = "cel"))]
    fn property(path: &[u8]) -> Option<Vec<u8>> {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: `path` is live for the call; out-pointers are valid locals.
        let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
        owned(status, data, size)
    }

    /// The four values of a finished request: cluster, code, code details, duration (ns).
    type Values = (Vec<u8>, Option<i64>, Option<Vec<u8>>, Option<i64>);

    #[cfg(not(feature = "cel"))]
    fn values() -> Values {
        READS.with(|reads| match reads.try_borrow().ok().as_deref() {
            Some(Some(reads)) => configured_values(reads),
            _ => (
                property(b"xds\0cluster_name").unwrap_or_default(),
                int(property(b"response\0code")),
                property(b"response\0code_details"),
                int(property(b"request\0duration")),
            ),
        })
    }

    #[cfg(not(feature = "cel"))]
    /// What a configured read stands for (its value feeds the counts, or is dropped).
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Role {
        Cluster,
        Code,
        Details,
        Duration,
        Other,
    }

    #[cfg(not(feature = "cel"))]
    /// One hostcall per request, from the plugin configuration (to measure what each costs).
    enum Read {
        /// A property path, NUL-separated.
        Property(Vec<u8>, Role),
        /// A response header (a `:status` value is parsed as the code).
        Header(String, Role),
        /// A clock read.
        Now,
        /// All response headers in one hostcall: `:status` is the code, the named header
        /// (which Envoy's route sets to the upstream cluster) the cluster.
        Pairs(String),
    }

    #[cfg(not(feature = "cel"))]
    thread_local! {
        /// `None`: the four default reads (empty configuration).
        static READS: RefCell<Option<Vec<Read>>> = const { RefCell::new(None) };
    }

    /// `none`, or reads separated by commas or spaces: property paths with dots
    /// (`xds.cluster_name`, `cluster_name`, `response.code`, `response.code_details`,
    /// `request.duration`, ...), `hdr:NAME` (a response header) or `now` (the clock).
    #[cfg(not(feature = "cel"))]
    fn parse_reads(config: &str) -> Option<Vec<Read>> {
        let config = config.trim();
        if config.is_empty() {
            return None;
        }
        let role = |name: &str| match name {
            _ if name.ends_with("cluster_name") => Role::Cluster,
            "response.code" | ":status" => Role::Code,
            "response.code_details" => Role::Details,
            "request.duration" => Role::Duration,
            _ => Role::Other,
        };
        let reads = config
            .split([',', ' '])
            .filter(|token| !token.is_empty() && *token != "none" && !is_header_phase(token))
            .map(|token| match token {
                "now" => Read::Now,
                _ => match (token.strip_prefix("hdr:"), token.strip_prefix("pairs:")) {
                    (Some(name), _) => Read::Header(name.to_string(), role(name)),
                    (_, Some(name)) => Read::Pairs(name.to_string()),
                    _ => Read::Property(token.replace('.', "\0").into_bytes(), role(token)),
                },
            })
            .collect();
        Some(reads)
    }

    /// Whether a configuration token is request- or response-phase work (the `tagging` build),
    /// not a log-phase read.
    #[cfg(not(feature = "cel"))]
    fn is_header_phase(token: &str) -> bool {
        matches!(token, "sticky" | "sticky-read" | "resp-set") || token.starts_with("req:")
    }

    /// What the `tagging` build does in the header callbacks (from the configuration).
    #[cfg(feature = "tagging")]
    #[derive(Default)]
    struct Tagging {
        /// Request headers looked up by name first (absent on the bench's requests, as the
        /// forced-canary, guard and route headers are); values dropped.
        lookups: Vec<String>,
        sticky_read: bool,
        sticky_write: bool,
        response_set: bool,
    }

    #[cfg(feature = "tagging")]
    thread_local! {
        static TAGGING_WORK: RefCell<Tagging> = RefCell::new(Tagging::default());
    }

    #[cfg(feature = "tagging")]
    fn parse_tagging(config: &str) -> Tagging {
        let tokens = || config.split([',', ' ']);
        let has = |name: &str| tokens().any(|token| token == name);
        Tagging {
            lookups: tokens()
                .filter_map(|token| token.strip_prefix("req:").map(str::to_string))
                .collect(),
            sticky_read: has("sticky") || has("sticky-read"),
            sticky_write: has("sticky"),
            response_set: has("resp-set"),
        }
    }

    /// FNV-1a of the key, to a bucket of 10000 (what the full module's sticky routing computes,
    /// without its salt and finalizer).
    #[cfg(feature = "tagging")]
    fn bucket(key: &[u8]) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in key {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash % 10_000
    }

    #[cfg(feature = "tagging")]
    fn request_header(name: &str) -> Option<Vec<u8>> {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: `name` is live for the call; out-pointers are valid locals.
        let status = unsafe {
            proxy_get_header_map_value(0, name.as_ptr(), name.len(), &mut data, &mut size)
        };
        owned(status, data, size)
    }

    #[cfg(feature = "tagging")]
    fn replace_header(map_type: u32, name: &str, value: &[u8]) {
        // SAFETY: `name` and `value` are live for the call.
        unsafe {
            proxy_replace_header_map_value(
                map_type,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            );
        }
    }

    #[cfg(feature = "tagging")]
    #[no_mangle]
    pub extern "C" fn proxy_on_request_headers(
        _context_id: u32,
        _headers: usize,
        _end: bool,
    ) -> u32 {
        TAGGING_WORK.with(|work| {
            let Ok(work) = work.try_borrow() else {
                return;
            };
            for name in &work.lookups {
                let _ = request_header(name);
            }
            if !work.sticky_read {
                return;
            }
            if let (Some(key), true) = (request_header("x-user-id"), work.sticky_write) {
                let digits = bucket(&key).to_string();
                replace_header(0, "x-fledge-route", digits.as_bytes());
            }
        });
        0
    }

    #[cfg(feature = "tagging")]
    #[no_mangle]
    pub extern "C" fn proxy_on_response_headers(
        _context_id: u32,
        _headers: usize,
        _end: bool,
    ) -> u32 {
        let set = TAGGING_WORK.with(|work| work.try_borrow().is_ok_and(|work| work.response_set));
        if set {
            replace_header(2, "x-fledge-subset", b"canary");
        }
        0
    }

    #[cfg(not(feature = "cel"))]
    fn configured_values(reads: &[Read]) -> Values {
        let mut values: Values = (Vec::new(), None, None, None);
        for read in reads {
            let (value, role) = match read {
                Read::Property(path, role) => (property(path), *role),
                Read::Header(name, role) => (response_header(name), *role),
                Read::Pairs(name) => {
                    let (cluster, code) = response_pairs(name);
                    values.0 = cluster;
                    values.1 = code;
                    continue;
                }
                Read::Now => {
                    let mut nanos = 0u64;
                    // SAFETY: out-pointer is a valid local.
                    unsafe {
                        proxy_get_current_time_nanoseconds(&mut nanos);
                    }
                    continue;
                }
            };
            match role {
                Role::Cluster => values.0 = value.unwrap_or_default(),
                Role::Code if matches!(read, Read::Header(..)) => {
                    values.1 =
                        value.and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<i64>().ok())
                }
                Role::Code => values.1 = int(value),
                Role::Details => values.2 = value,
                Role::Duration => values.3 = int(value),
                Role::Other => {}
            }
        }
        values
    }

    /// The response headers' `cluster_header` and `:status`, from one
    /// `proxy_get_header_map_pairs` (walked as the filter walks it).
    #[cfg(not(feature = "cel"))]
    fn response_pairs(cluster_header: &str) -> (Vec<u8>, Option<i64>) {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: out-pointers are valid locals.
        let status = unsafe { proxy_get_header_map_pairs(2, &mut data, &mut size) };
        let Some(bytes) = owned(status, data, size) else {
            return (Vec::new(), None);
        };
        let (mut cluster, mut code) = (Vec::new(), None);
        for (name, value) in super::header_pairs::pairs(&bytes) {
            match name {
                b":status" => {
                    code = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                }
                _ if name == cluster_header.as_bytes() => cluster = value.to_vec(),
                _ => {}
            }
        }
        (cluster, code)
    }

    #[cfg(not(feature = "cel"))]
    fn response_header(name: &str) -> Option<Vec<u8>> {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: `name` is live for the call; out-pointers are valid locals.
        let status = unsafe {
            proxy_get_header_map_value(2, name.as_ptr(), name.len(), &mut data, &mut size)
        };
        owned(status, data, size)
    }

    #[cfg(not(feature = "cel"))]
    fn plugin_configuration() -> String {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: out-pointers are valid locals.
        let status = unsafe { proxy_get_buffer_bytes(7, 0, usize::MAX, &mut data, &mut size) };
        owned(status, data, size)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    #[cfg(feature = "cel")]
    const EXPRESSION: &str = "[has(xds.cluster_name) ? xds.cluster_name : '', \
        has(response.code) ? response.code : 0, \
        has(response.code_details) ? response.code_details : '', \
        has(request.duration) ? request.duration : -1]";

    #[cfg(feature = "cel")]
    thread_local! {
        static TOKEN: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
    }

    #[cfg(feature = "cel")]
    fn foreign(name: &str, arguments: &[u8]) -> Option<Vec<u8>> {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: `name` and `arguments` are live for the call; out-pointers are valid locals.
        let status = unsafe {
            proxy_call_foreign_function(
                name.as_ptr(),
                name.len(),
                arguments.as_ptr(),
                arguments.len(),
                &mut data,
                &mut size,
            )
        };
        owned(status, data, size)
    }

    /// `expr_evaluate`'s list: a count, (key size, value size) per item, then NUL-terminated
    /// keys and values; the items are the keys.
    #[cfg(feature = "cel")]
    fn values() -> Values {
        let result = TOKEN
            .get()
            .and_then(|token| foreign("expr_evaluate", &token.to_le_bytes()))
            .unwrap_or_default();
        let word = |at: usize| -> usize {
            result
                .get(at..at + 4)
                .and_then(|w| w.try_into().ok())
                .map_or(0, |w| u32::from_le_bytes(w) as usize)
        };
        let mut items: [Vec<u8>; 4] = Default::default();
        if word(0) == 4 {
            let mut at = 4 + 4 * 8;
            for (i, item) in items.iter_mut().enumerate() {
                let (key, value) = (word(4 + i * 8), word(8 + i * 8));
                *item = result.get(at..at + key).unwrap_or_default().to_vec();
                at += key + 1 + value + 1;
            }
        }
        let [cluster, code, details, duration] = items;
        (cluster, int(Some(code)), Some(details), int(Some(duration)))
    }

    fn int(bytes: Option<Vec<u8>>) -> Option<i64> {
        Some(i64::from_le_bytes(bytes?.as_slice().try_into().ok()?))
    }

    fn class(code: Option<i64>, via_upstream: bool) -> usize {
        match (code, via_upstream) {
            (Some(code @ 200..=599), true) => (code / 100 - 2) as usize,
            (Some(code), true) if code < 200 => 0,
            _ => 4,
        }
    }

    #[cfg(target_os = "wasi")]
    extern "C" {
        fn __wasm_call_ctors();
    }

    #[no_mangle]
    pub extern "C" fn _initialize() {
        #[cfg(target_os = "wasi")]
        // SAFETY: the WASI reactor contract: static constructors once, before anything else.
        unsafe {
            __wasm_call_ctors();
        }
    }

    #[no_mangle]
    pub extern "C" fn proxy_abi_version_0_2_1() {}

    #[no_mangle]
    pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
        #[cfg(feature = "bump")]
        if let Some(p) = bump::alloc(size) {
            return p;
        }
        let buffer: Box<[std::mem::MaybeUninit<u8>]> = Box::new_uninit_slice(size);
        Box::into_raw(buffer).cast::<u8>()
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_vm_start(_root_id: u32, _size: usize) -> bool {
        true
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_configure(_root_id: u32, _size: usize) -> bool {
        #[cfg(feature = "cel")]
        if TOKEN.get().is_none() {
            let token = foreign("expr_create", EXPRESSION.as_bytes())
                .and_then(|t| t.as_slice().try_into().ok())
                .map(u32::from_le_bytes);
            TOKEN.set(token);
        }
        #[cfg(not(feature = "cel"))]
        let configuration = plugin_configuration();
        #[cfg(feature = "tagging")]
        TAGGING_WORK.with(|work| {
            if let Ok(mut work) = work.try_borrow_mut() {
                *work = parse_tagging(&configuration);
            }
        });
        #[cfg(not(feature = "cel"))]
        READS.with(|reads| {
            if let Ok(mut reads) = reads.try_borrow_mut() {
                *reads = parse_reads(&configuration);
            }
        });
        // SAFETY: plain integer.
        unsafe {
            proxy_set_tick_period_milliseconds(1000);
        }
        true
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_log(_context_id: u32) {
        #[cfg(feature = "bump")]
        bump::reset();
        let (cluster, code, details, duration) = values();
        let via_upstream = details.as_deref() == Some(b"via_upstream");
        let duration_ms = duration.filter(|d| *d >= 0).map(|nanos| nanos / 1_000_000);
        let class = class(code.filter(|_| !cluster.is_empty()), via_upstream);
        CLUSTERS.with(|clusters| {
            let Ok(mut clusters) = clusters.try_borrow_mut() else {
                return;
            };
            let index = match clusters.iter().position(|c| c.name == cluster) {
                Some(index) => index,
                None if clusters.len() < MAX_CLUSTERS => {
                    clusters.push(Cluster {
                        name: cluster,
                        ..Cluster::default()
                    });
                    clusters.len() - 1
                }
                None => MAX_CLUSTERS - 1,
            };
            if let Some(entry) = clusters.get_mut(index) {
                if let Some(count) = entry.pending.get_mut(class) {
                    *count += 1;
                }
                entry.duration_ms += duration_ms.unwrap_or(0);
            }
        });
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_tick(_root_id: u32) {
        CLUSTERS.with(|clusters| {
            let Ok(mut clusters) = clusters.try_borrow_mut() else {
                return;
            };
            for cluster in clusters.iter_mut() {
                for (class, name) in CLASSES.iter().enumerate() {
                    let (Some(count), Some(id)) = (
                        cluster.pending.get(class).copied(),
                        cluster.ids.get_mut(class),
                    ) else {
                        continue;
                    };
                    if count == 0 {
                        continue;
                    }
                    if id.is_none() {
                        let metric = format!(
                            "fledge_floor_requests_total.{}.{name}",
                            String::from_utf8_lossy(&cluster.name)
                        );
                        let mut new_id = 0u32;
                        // SAFETY: `metric` is live for the call; out-pointer is a valid local.
                        let status = unsafe {
                            proxy_define_metric(0, metric.as_ptr(), metric.len(), &mut new_id)
                        };
                        *id = (status == 0).then_some(new_id);
                    }
                    if let Some(id) = *id {
                        // SAFETY: plain integers.
                        unsafe {
                            proxy_increment_metric(id, count);
                        }
                    }
                }
                cluster.pending = [0; 5];
            }
        });
    }
}
