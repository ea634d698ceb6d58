//! Feeds arbitrary bytes to every config parser: the application config (all dialects), the
//! deployment config, and both together with the cross-file checks. Any panic is a bug.

#![no_main]

use std::path::Path;

use flocker_ctl::config::{self, NodeResolver};
use libfuzzer_sys::fuzz_target;

/// Never touches DNS, so runs are fast and reproducible.
struct LiteralsOnly;

impl NodeResolver for LiteralsOnly {
    fn resolves(&self, address: &str) -> bool {
        address.parse::<std::net::IpAddr>().is_ok()
    }
}

fuzz_target!(|data: &[u8]| {
    let file = Path::new("fuzz.yml");
    let Ok(text) = config::decode(data, file) else {
        return;
    };
    let _ = config::parse_application(text, file);
    let _ = config::parse_deployment(text, file);
    // Split the input in two so the cross-file checks see two different files.
    let middle = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= text.len() / 2)
        .unwrap_or(text.len());
    let (deployment, application) = text.split_at(middle);
    let _ = config::load_texts(
        deployment,
        file,
        application,
        Path::new("other.yml"),
        &LiteralsOnly,
    );
});
