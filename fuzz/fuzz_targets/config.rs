//! The configuration is an operator's file, or one a script wrote wrong: parsing and
//! validating it, and building every runtime's chain from it (each function checks its own
//! settings), must end in a configuration or an error that names the key, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nflib::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Relative paths (key files, rules, captures) resolve under a directory that does not
    // exist: reading them fails, as a typo would.
    let Ok(cfg) = Config::parse(text, Path::new("/nonexistent-fuzz-dir")) else {
        return;
    };
    let _ = Config::from_frozen(&cfg.frozen());
    let registry = nfs::registry();
    for r in &cfg.runtimes {
        let Some(chain) = cfg.chain_of(r) else {
            continue;
        };
        let peers = cfg
            .runtimes
            .iter()
            .filter(|p| cfg.chain_of(p) == Some(chain))
            .count() as u32;
        let _ = registry.build_chain(&cfg, chain, &r.name, 0, peers);
    }
});
