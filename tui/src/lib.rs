//! What operators watch: renderings of a running instance.
//!
//! - [`text`]: the rate lines `nfmgr start` (with `manager.log_rates`) and `nfmgr demo`
//!   print every interval, and the summary printed at exit, from region snapshots;
//! - [`top`]: the live terminal dashboard, `nfmgr top`, fed by the control socket's `top`
//!   answer ([`nflib::top`]), which carries the same region snapshots, so the two can never
//!   disagree about a number.

#![forbid(unsafe_code)]

pub mod text;
pub mod top;

pub use text::{si, summary, LiveRates};
