//! Fault injection for tests of real processes, read once from `NF_FAILPOINTS` (a comma
//! separated list) and inert when it is unset. A test sets it on the test bed to stop a
//! runtime at a moment no signal can be timed to, then kills it there.
//!
//! - `migrate-state-stall`: a runtime that receives step 3's state as a migration target
//!   stops answering anything (it sleeps until killed), as a hung or dying target would.

use std::sync::OnceLock;

fn enabled(name: &str) -> bool {
    static LIST: OnceLock<Vec<String>> = OnceLock::new();
    LIST.get_or_init(|| {
        std::env::var("NF_FAILPOINTS")
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
            .unwrap_or_default()
    })
    .iter()
    .any(|f| f == name)
}

/// Called with step 3's state in hand: never returns when `migrate-state-stall` is set.
pub fn migrate_state_received() {
    if enabled("migrate-state-stall") {
        eprintln!("nf-runtime: failpoint migrate-state-stall: stopping here until killed");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
