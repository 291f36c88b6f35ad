//! The platform's built-in network functions.
//!
//! Each function is one file written against `nflib::nf`: a settings type parsed from its
//! table in the configuration, a per-flow state type, and the three calls of the NF API.
//! Adding a function means adding a file and a line to [`registry`].

#![forbid(unsafe_code)]

pub mod firewall;
pub mod http;
pub mod ids;
pub mod lb;
pub mod monitor;
pub mod nat;

#[cfg(test)]
pub(crate) mod testing;

use nflib::nf::{NfEntry, NfRegistry};

/// Every function that may appear in a chain, by the `kind` that names it.
pub fn registry() -> NfRegistry {
    NfRegistry::new(vec![
        NfEntry {
            kind: "firewall",
            about: "ordered allow/deny rules and stateful TCP tracking",
            build: firewall::build,
        },
        NfEntry {
            kind: "nat",
            about: "source NAT with port allocation and the reverse mapping",
            build: nat::build,
        },
        NfEntry {
            kind: "load_balancer",
            about: "a virtual IP spread over backends, one backend per flow",
            build: lb::build,
        },
        NfEntry {
            kind: "flow_monitor",
            about: "per-flow packets, bytes and times, exported as flow records",
            build: monitor::build,
        },
        NfEntry {
            kind: "http_parser",
            about: "HTTP requests and responses across segments: method, host, URI, status",
            build: http::build,
        },
        NfEntry {
            kind: "ids",
            about: "Snort-style content signatures matched across packets of a flow",
            build: ids::build,
        },
    ])
}
