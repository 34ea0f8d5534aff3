//! The proxy-wasm shell: the only module that makes hostcalls. It reads the plugin
//! configuration and four properties per request and hands raw bytes to [`crate::plugin`].
//!
//! Hostcall results are never unwrapped: a failed call means "absent", a metric that cannot be
//! defined is not recorded, and logging failures are ignored.

use crate::metrics::{MetricHost, MetricKind};
use crate::plugin::{Configured, Finished, Plugin};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel, MetricType};
use std::cell::RefCell;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    // Replaces the SDK's hook (which unwraps its log call): log the panic at critical, nothing else.
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("fledge filter panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { plugin: Rc::new(RefCell::new(Plugin::default())) })
    });
}}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// [`MetricHost`] over the proxy-wasm metric hostcalls.
struct Hostcalls;

impl MetricHost for Hostcalls {
    fn define(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Histogram => MetricType::Histogram,
        };
        match hostcalls::define_metric(kind, name) {
            Ok(id) => Some(id),
            Err(status) => {
                log(
                    LogLevel::Warn,
                    &format!("cannot define metric {name}: {status:?}"),
                );
                None
            }
        }
    }

    fn increment(&mut self, id: u32, delta: i64) {
        let _ = hostcalls::increment_metric(id, delta);
    }

    fn record(&mut self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }
}

/// One per plugin configuration per VM: owns the configuration and the metric ids.
struct Root {
    plugin: Rc<RefCell<Plugin>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten();
        let Ok(mut plugin) = self.plugin.try_borrow_mut() else {
            log(LogLevel::Error, "configuration ignored (state busy)");
            return true;
        };
        match plugin.configure(raw.as_deref(), &mut Hostcalls) {
            Configured::Applied { clusters, istio_cluster_names } => log(
                LogLevel::Info,
                &format!(
                    "configured {clusters} cluster(s), istioClusterNames={istio_cluster_names}"
                ),
            ),
            Configured::Rejected(err) => log(
                LogLevel::Error,
                &format!(
                    "invalid plugin configuration, keeping the previous one (or the defaults): {err}"
                ),
            ),
        }
        // Always accept: returning false would NACK the config or keep Envoy from starting.
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            plugin: Rc::clone(&self.plugin),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Per request: nothing but a handle to the root's state; all work happens in `on_log`.
struct Http {
    plugin: Rc<RefCell<Plugin>>,
}

fn property(path: Vec<&str>) -> Option<Vec<u8>> {
    hostcalls::get_property(path).ok().flatten()
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_log(&mut self) {
        let cluster = property(vec!["xds", "cluster_name"]);
        let code = property(vec!["response", "code"]);
        let details = property(vec!["response", "code_details"]);
        // Fallback signal, read only if a host lacks `response.code_details`.
        let flags = match details {
            Some(_) => None,
            None => property(vec!["response", "flags"]),
        };
        let duration = property(vec!["request", "duration"]);
        let finished = Finished::from_properties(
            cluster.as_deref(),
            code.as_deref(),
            details.as_deref(),
            flags.as_deref(),
            duration.as_deref(),
        );
        if let Ok(mut plugin) = self.plugin.try_borrow_mut() {
            plugin.record(&finished, &mut Hostcalls);
        }
    }
}
