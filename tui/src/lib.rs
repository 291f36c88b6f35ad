//! What operators watch: renderings of a running instance, computed from region snapshots.
//!
//! Today this is the text view that `nfmgr start` (with `manager.log_rates`) and
//! `nfmgr demo` print every interval, and the summary printed at exit. The live terminal
//! dashboard (`nfmgr top`, ratatui) will be built here on the same snapshots, so the two can
//! never disagree about a number.

pub mod text;

pub use text::{si, summary, LiveRates};
