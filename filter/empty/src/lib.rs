//! An HTTP filter that does nothing: Envoy still creates a context per request and calls every
//! callback into the VM, so this is the cost floor of any Rust proxy-wasm filter.

#![forbid(unsafe_code)]

#[cfg(target_arch = "wasm32")]
mod wasm {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::ContextType;

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}

    struct Root;

    impl Context for Root {}

    impl RootContext for Root {
        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Http))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Http;

    impl Context for Http {}

    impl HttpContext for Http {}
}
