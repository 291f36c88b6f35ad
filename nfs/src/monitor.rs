//! Flow monitor: per-flow packets and bytes in each direction, first and last packet times.
//! Totals are counters; each flow's figures are written as a flow record (a JSON line in the
//! runtime's event log) when the flow ends, and for every live flow when the runtime stops.
//!
//! ```toml
//! [[chain.nf]]
//! kind = "flow_monitor"
//! ```

use nflib::nf::{
    BuildError, Dir, NetworkFunction, NfContext, NfSpec, PacketMut, Stage, TypedStage, Verdict,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {}

pub struct FlowMonitor;

/// Per direction (0: original, 1: reply).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorState {
    pub packets: [u64; 2],
    /// Frame bytes.
    pub bytes: [u64; 2],
    /// Transport payload bytes.
    pub payload_bytes: [u64; 2],
    pub first_ms: u64,
    pub last_ms: u64,
}

const FLOWS: usize = 1;
const PACKETS: usize = 2;
const BYTES: usize = 3;

pub fn build(spec: &NfSpec<'_>) -> Result<Box<dyn Stage>, BuildError> {
    let _: Settings = spec.settings()?;
    Ok(TypedStage::boxed(FlowMonitor))
}

impl NetworkFunction for FlowMonitor {
    type State = MonitorState;

    fn kind(&self) -> &'static str {
        "flow_monitor"
    }

    fn counters(&self) -> &'static [&'static str] {
        &["flows", "packets", "bytes"]
    }

    fn new_flow(&mut self, _pkt: &PacketMut<'_>, ctx: &mut NfContext<'_>) -> MonitorState {
        ctx.count(FLOWS, 1);
        MonitorState {
            first_ms: ctx.now_ms,
            ..MonitorState::default()
        }
    }

    fn process(
        &mut self,
        pkt: &mut PacketMut<'_>,
        st: &mut MonitorState,
        ctx: &mut NfContext<'_>,
    ) -> Verdict {
        let d = match ctx.dir {
            Dir::Original => 0,
            Dir::Reply => 1,
        };
        st.packets[d] += 1;
        st.bytes[d] += pkt.len() as u64;
        st.payload_bytes[d] += pkt.payload().len() as u64;
        st.last_ms = ctx.now_ms;
        ctx.count(PACKETS, 1);
        ctx.count(BYTES, pkt.len() as u64);
        Verdict::Pass
    }

    fn end_flow(&mut self, st: MonitorState, ctx: &mut NfContext<'_>) {
        if !ctx.events_enabled() {
            return;
        }
        let record = serde_json::json!({
            "flow": ctx.key.to_string(),
            "flow_id": ctx.flow_id,
            "packets": st.packets,
            "bytes": st.bytes,
            "payload_bytes": st.payload_bytes,
            "first_ms": st.first_ms,
            "last_ms": st.last_ms,
        });
        ctx.emit("flow_monitor", record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{build as harness, udp};

    #[test]
    fn counts_each_direction_and_records_at_the_end() {
        let mut h = harness(build, "kind = \"flow_monitor\"").unwrap();
        let a = ([10, 0, 0, 1], 1);
        let b = ([10, 0, 0, 2], 2);
        h.feed(&udp(a, b, b"0123456789"));
        h.feed(&udp(a, b, b"01234"));
        h.feed(&udp(b, a, b"x"));
        h.end_all();
        let r = &h.events.0[0];
        assert_eq!(r["packets"], serde_json::json!([2, 1]));
        assert_eq!(r["payload_bytes"], serde_json::json!([15, 1]));
        assert_eq!(h.counter("packets"), 3);
        assert!(harness(build, "kind = \"flow_monitor\"\nverbose = true").is_err());
    }
}
