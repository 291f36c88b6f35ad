//! nfmgr's part in actor messaging and in carrying traffic between servers, run by the
//! data-plane thread.
//!
//! - nfmgr's own control endpoint (slot 0): a mailbox whose messages go to and come from the
//!   control thread (control calls to liaisons and their answers).
//! - Actor frames a process addressed to another server arrive on its message ring to
//!   nfmgr; they are signed with the cluster key and sent out of the cluster port. Frames
//!   arriving on the cluster port are checked (tag, sender a live member, addressed here),
//!   stripped of the tag and put on the message ring of their slot.
//! - Data a vswitch sends to a runtime on another server (`DESC_REMOTE`) is wrapped in a
//!   data frame (`frame::DataEncap`), signed and sent out of the cluster port; the runtime's
//!   server unwraps it, notes where it came from in the buffer (`Route`) and hands it to the
//!   runtime. The runtime's output for such a packet goes back to the server it came from,
//!   which sends it out of the port it was meant for.
//!
//! Every frame between servers carries a keyed MAC; frames that fail, or come from a server
//! that is not a live member, are dropped and counted on the cluster port (`ctl_auth_failed`,
//! `ctl_not_member`). Nothing here trusts a byte from the wire before its tag is checked.

use std::sync::mpsc;

use nflib::buffer::{Route, DESC_REMOTE};
use nflib::frame::{
    self, auth, DataEncap, EndpointAddr, Frame, ReplayWindow, ENCAP_LEN, ETHERTYPE_CONTROL,
    ETHERTYPE_DATA, LIAISON,
};
use nflib::mailbox::{Envelope, Mailbox};
use nflib::msg::Message;
use nflib::pool::ManagerPool;
use nflib::reliable::PeerEvent;
use nflib::stats::{LocalCounters, PortCounter, PORT_COUNTERS};

use crate::linkwatch::{LinkChange, LinkWatch};
use nflib::slot::ProcessKind;
use nflib::{Packet, Region, MANAGER_SLOT};

/// Control thread -> relay.
#[derive(Debug)]
pub enum RelayCommand {
    /// Send a message from nfmgr's control endpoint.
    Send {
        to: EndpointAddr,
        src_actor: u64,
        dst_actor: u64,
        msg: Message,
    },
    /// The servers frames from other servers are accepted from (live members).
    Members(Vec<u16>),
    /// New cluster keys (`nfmgr rekey`): sign with the first, accept any.
    Keys(auth::FrameKeys),
}

/// Takes the relay's events to the control thread.
pub type EventSink = Box<dyn Fn(RelayEvent) + Send>;

/// Relay -> control thread.
#[derive(Debug)]
pub enum RelayEvent {
    Delivered(Box<Envelope>),
    Peer(PeerEvent),
    /// The cluster link's view of a server changed (`linkwatch`).
    Link(LinkChange),
}

/// Where a frame from the cluster port goes.
pub enum Inbound {
    /// Onto the message ring of this local slot.
    Message(u16, Packet),
    /// Onto the data ring of this local runtime.
    Data(u16, Packet),
    /// Out of this port (a runtime's output coming back).
    Port(u8, Packet),
    /// Handled here (nfmgr's own messages) or dropped and counted.
    Done,
}

pub struct Relay {
    pub me: u16,
    key: Option<auth::FrameKeys>,
    /// Index of the cluster port.
    pub port: Option<usize>,
    /// Live member servers, one bit each.
    members: Vec<u64>,
    pub mailbox: Mailbox,
    /// Where what the relay has for the control thread goes (its inbox, wrapped by the
    /// caller: the relay knows nothing of the control thread).
    events: Option<EventSink>,
    commands: Option<mpsc::Receiver<RelayCommand>>,
    /// Frames waiting to leave on the cluster port.
    pub cluster_tx: Vec<Packet>,
    /// Frames for other servers dropped because there is no cluster port.
    pub no_route: u64,
    /// Liveness of the other servers on the cluster link (`None`: off, or no cluster).
    link: Option<LinkWatch>,
    beats: u64,
    /// The last data frame counter this nfmgr used (`DataEncap::seq`).
    data_seq: u64,
    /// Per server: the data frame counters seen from it lately.
    replay: std::collections::HashMap<u16, ReplayWindow>,
}

impl Relay {
    pub fn new(
        me: u16,
        key: Option<auth::FrameKeys>,
        port: Option<usize>,
        mailbox: Mailbox,
    ) -> Relay {
        Relay {
            me,
            key,
            port,
            members: vec![0; 1024],
            mailbox,
            events: None,
            commands: None,
            cluster_tx: Vec::new(),
            no_route: 0,
            link: None,
            beats: 0,
            // Above anything an earlier life of this nfmgr sent, as long as the clock did
            // not step back by more than that life lasted.
            data_seq: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
            replay: std::collections::HashMap::new(),
        }
    }

    /// Watches the other servers' liveness on the cluster link (only with a cluster port).
    pub fn with_link_watch(mut self, link: Option<LinkWatch>) -> Relay {
        self.link = link.filter(|_| self.port.is_some());
        self
    }

    /// Beats due now go to every member server's nfmgr, and silences are judged.
    pub fn link_tick(&mut self, now_ns: u64) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if link.beat_due(now_ns) {
            let peers: Vec<u16> = link.peers().collect();
            for server in peers {
                self.beats += 1;
                let to = EndpointAddr::new(server, MANAGER_SLOT);
                let beat = Message::Ping { seq: self.beats };
                // A full queue (the link has been cut for seconds) refuses it: the silence
                // is already known.
                let _ = self.mailbox.send(to, LIAISON, LIAISON, &beat);
            }
        }
        let mut changes = Vec::new();
        if let Some(link) = self.link.as_mut() {
            link.check(now_ns, &mut changes);
        }
        for c in changes {
            self.link_changed(c);
        }
    }

    /// When the link watch must run next (`mono_ns`).
    pub fn link_deadline_ns(&self) -> Option<u64> {
        self.link.as_ref().map(LinkWatch::next_deadline_ns)
    }

    fn heard(&mut self, server: u16, now_ns: u64) {
        if let Some(c) = self.link.as_mut().and_then(|l| l.heard(server, now_ns)) {
            self.link_changed(c);
        }
    }

    fn link_changed(&mut self, c: LinkChange) {
        if let Some(tx) = &self.events {
            tx(RelayEvent::Link(c));
        }
    }

    /// Connects the relay to the control thread.
    pub fn with_channels(
        mut self,
        events: EventSink,
        commands: mpsc::Receiver<RelayCommand>,
    ) -> Relay {
        self.events = Some(events);
        self.commands = Some(commands);
        self
    }

    fn next_data_seq(&mut self) -> u64 {
        self.data_seq += 1;
        self.data_seq
    }

    fn is_member(&self, server: u16) -> bool {
        self.members[server as usize / 64] >> (server % 64) & 1 == 1
    }

    /// Carries out what the control thread asked. Returns how many commands.
    pub fn handle_commands(&mut self) -> usize {
        let mut n = 0;
        let cmds: Vec<RelayCommand> = match &self.commands {
            Some(rx) => rx.try_iter().collect(),
            None => return 0,
        };
        for c in cmds {
            n += 1;
            match c {
                RelayCommand::Send {
                    to,
                    src_actor,
                    dst_actor,
                    msg,
                } => {
                    if let Err(e) = self.mailbox.send(to, src_actor, dst_actor, &msg) {
                        tracing::warn!(%to, error = %e, "control message not sent");
                    }
                }
                RelayCommand::Keys(keys) => {
                    if self.key.is_some() {
                        self.key = Some(keys);
                    }
                }
                RelayCommand::Members(list) => {
                    // A server that left starts afresh if it joins again (a new life, whose
                    // counter may be below the old one's if its clock stepped back).
                    self.replay.retain(|s, _| list.contains(s));
                    self.members.iter_mut().for_each(|w| *w = 0);
                    let others: Vec<u16> = list.into_iter().filter(|s| *s != self.me).collect();
                    for &s in &others {
                        self.members[s as usize / 64] |= 1 << (s % 64);
                    }
                    if let Some(link) = self.link.as_mut() {
                        link.set_members(&others, nflib::time::mono_ns());
                    }
                }
            }
        }
        n
    }

    /// Hands what nfmgr's mailbox received to the control thread.
    pub fn deliver(&mut self) {
        let inbox = self.mailbox.take_inbox();
        let events = self.mailbox.take_events();
        if let Some(tx) = &self.events {
            for e in inbox {
                // Another server's link beat: hearing it was the point.
                if e.from.server != self.me
                    && e.from.slot == MANAGER_SLOT
                    && matches!(e.msg, Message::Ping { .. })
                {
                    continue;
                }
                tx(RelayEvent::Delivered(Box::new(e)));
            }
            for e in events {
                tx(RelayEvent::Peer(e));
            }
        }
    }

    /// Signs a frame for another server and queues it on the cluster port.
    fn send_to_cluster(
        &mut self,
        region: &Region,
        pool: &mut ManagerPool,
        mut p: Packet,
        control: bool,
        c: &mut LocalCounters<PORT_COUNTERS>,
    ) {
        let (Some(key), Some(_)) = (&self.key, self.port) else {
            self.no_route += 1;
            pool.free(p);
            return;
        };
        let len = p.len();
        let signed = if control {
            auth::sign(key.signing(), region.room_mut(&mut p), len)
        } else {
            auth::append_tag(key.signing(), region.room_mut(&mut p), len)
        };
        match signed {
            Ok(n) if region.set_len(&mut p, n) => {
                c.add(
                    if control {
                        PortCounter::CtlTx
                    } else {
                        PortCounter::DataTx
                    } as usize,
                    1,
                );
                self.cluster_tx.push(p);
            }
            _ => {
                c.add(PortCounter::TxErrors as usize, 1);
                pool.free(p);
            }
        }
    }

    /// A frame a process sent to nfmgr on its message ring.
    pub fn on_process_message(
        &mut self,
        region: &Region,
        pool: &mut ManagerPool,
        p: Packet,
        now_ns: u64,
        c: &mut LocalCounters<PORT_COUNTERS>,
    ) {
        let bytes = region.data(&p);
        let dst = (frame::ethertype(bytes) == Some(ETHERTYPE_CONTROL))
            .then(|| EndpointAddr::from_control_mac(bytes))
            .flatten();
        match dst {
            Some(d) if d.server == self.me && d.slot == MANAGER_SLOT => {
                self.mailbox.handle_frame(bytes, now_ns);
                pool.free(p);
            }
            Some(d) if d.server != self.me => self.send_to_cluster(region, pool, p, true, c),
            _ => {
                self.no_route += 1;
                pool.free(p);
            }
        }
    }

    /// A packet a process sent to nfmgr on its data ring: wrapped for another server when it
    /// is meant for one, else handed back for its egress port.
    pub fn on_process_data(
        &mut self,
        region: &Region,
        pool: &mut ManagerPool,
        from: u16,
        mut p: Packet,
        c: &mut LocalCounters<PORT_COUNTERS>,
    ) -> Option<Packet> {
        let meta = region.meta_of(&p);
        // What each process may ask for: only a vswitch dispatches to another server's
        // runtime, only a runtime sends output back to another server's port, and only to
        // member servers (the buffer's metadata is the process's to write, so it is checked
        // here, not trusted).
        let kind = region.slot(from).map(|s| s.kind());
        let (encap, outer_dst) = if p.flags() & DESC_REMOTE != 0 {
            let dst = EndpointAddr::from_input_mac(region.data(&p));
            let allowed = kind == Some(ProcessKind::Vswitch)
                && dst.is_some_and(|d| d.server != self.me && self.is_member(d.server));
            if !allowed {
                c.add(PortCounter::DataBad as usize, 1);
                pool.free(p);
                return None;
            }
            let Some(dst) = dst else {
                // A remote packet not addressed to a runtime's input MAC: the vswitch is
                // wrong, the buffer must still come back.
                c.add(PortCounter::TxErrors as usize, 1);
                pool.free(p);
                return None;
            };
            let orig = meta.take_dst_mac().unwrap_or([0xff; 6]);
            (
                DataEncap {
                    to_runtime: true,
                    orig_dst: orig,
                    origin_server: self.me,
                    origin_vswitch: from as u8,
                    egress: p.egress_port(),
                    ingress: p.ingress_port(),
                    seq: self.next_data_seq(),
                },
                dst.input_mac(),
            )
        } else if let Some(r) = meta.route() {
            if kind != Some(ProcessKind::Runtime)
                || r.server == self.me
                || !self.is_member(r.server)
            {
                c.add(PortCounter::DataBad as usize, 1);
                pool.free(p);
                return None;
            }
            (
                DataEncap {
                    to_runtime: false,
                    orig_dst: [0; 6],
                    origin_server: r.server,
                    origin_vswitch: r.vswitch,
                    egress: p.egress_port(),
                    ingress: p.ingress_port(),
                    seq: self.next_data_seq(),
                },
                EndpointAddr::new(r.server, MANAGER_SLOT).input_mac(),
            )
        } else {
            return Some(p);
        };
        if !region.prepend(&mut p, ENCAP_LEN) {
            c.add(PortCounter::TxErrors as usize, 1);
            pool.free(p);
            return None;
        }
        let src = EndpointAddr::new(self.me, MANAGER_SLOT).input_mac();
        if encap
            .write(region.data_mut(&mut p), outer_dst, src)
            .is_err()
        {
            c.add(PortCounter::TxErrors as usize, 1);
            pool.free(p);
            return None;
        }
        p.set_flags(p.flags() & !DESC_REMOTE);
        self.send_to_cluster(region, pool, p, false, c);
        None
    }

    /// A frame received on the cluster port.
    pub fn on_cluster_frame(
        &mut self,
        region: &Region,
        pool: &mut ManagerPool,
        mut p: Packet,
        now_ns: u64,
        slot_alive: &dyn Fn(u16) -> bool,
        c: &mut LocalCounters<PORT_COUNTERS>,
    ) -> Inbound {
        let Some(key) = self.key.as_ref() else {
            c.add(PortCounter::RxIgnored as usize, 1);
            pool.free(p);
            return Inbound::Done;
        };
        let et = frame::ethertype(region.data(&p));
        let drop = |c: &mut LocalCounters<PORT_COUNTERS>,
                    pool: &mut ManagerPool,
                    p: Packet,
                    why: PortCounter| {
            pool.free(p);
            c.add(why as usize, 1);
            Inbound::Done
        };
        match et {
            Some(ETHERTYPE_CONTROL) => {
                let (src, dst, len) = {
                    let bytes = region.data(&p);
                    let Ok(f) = Frame::parse(bytes) else {
                        return drop(c, pool, p, PortCounter::CtlBad);
                    };
                    // The cheap filter first: a stranger's frames cost no MAC.
                    if !self.is_member(f.header.src.server) {
                        return drop(c, pool, p, PortCounter::CtlNotMember);
                    }
                    if !key.verify(&f) {
                        return drop(c, pool, p, PortCounter::CtlAuthFailed);
                    }
                    (f.header.src, f.header.dst, bytes.len())
                };
                if dst.server != self.me || src.server == self.me {
                    return drop(c, pool, p, PortCounter::CtlBad);
                }
                let n = auth::strip(region.data_mut(&mut p), len);
                region.set_len(&mut p, n);
                c.add(PortCounter::CtlRx as usize, 1);
                if dst.slot == MANAGER_SLOT {
                    // Liveness only from what the transport takes as fresh (the beats among
                    // it): an authentic frame replayed from a dead server must not keep it
                    // alive. Frames for local processes are not judged here (their
                    // transports are); the beats and data frames keep the link watch fed.
                    if self.mailbox.handle_frame(region.data(&p), now_ns) {
                        self.heard(src.server, now_ns);
                    }
                    pool.free(p);
                    return Inbound::Done;
                }
                if !slot_alive(dst.slot) {
                    return drop(c, pool, p, PortCounter::CtlBad);
                }
                Inbound::Message(dst.slot, p)
            }
            Some(ETHERTYPE_DATA) => {
                // Cheap checks first (a member, a counter not seen), then the tag.
                let (encap, dst, src) = {
                    let bytes = region.data(&p);
                    let (Ok(e), Some(d), Some(s)) = (
                        DataEncap::parse(bytes),
                        EndpointAddr::from_input_mac(bytes),
                        EndpointAddr::from_input_mac(&bytes[6..]),
                    ) else {
                        return drop(c, pool, p, PortCounter::DataBad);
                    };
                    (e, d, s)
                };
                if !self.is_member(src.server) {
                    return drop(c, pool, p, PortCounter::CtlNotMember);
                }
                // Looked up, not inserted: a frame that fails its tag leaves no entry.
                let window = self.replay.get(&src.server).copied().unwrap_or_default();
                if !window.fresh(encap.seq) {
                    return drop(c, pool, p, PortCounter::DataReplayed);
                }
                let checked = key.check_tag(region.data(&p));
                let Some(len) = checked else {
                    return drop(c, pool, p, PortCounter::CtlAuthFailed);
                };
                self.replay.entry(src.server).or_default().mark(encap.seq);
                if dst.server != self.me || len < ENCAP_LEN + 14 {
                    return drop(c, pool, p, PortCounter::DataBad);
                }
                self.heard(src.server, now_ns);
                region.set_len(&mut p, len);
                region.strip_front(&mut p, ENCAP_LEN);
                p.set_egress_port(encap.egress);
                p.set_ingress_port(encap.ingress);
                c.add(PortCounter::DataRx as usize, 1);
                if encap.to_runtime {
                    if dst.slot == MANAGER_SLOT || !slot_alive(dst.slot) {
                        return drop(c, pool, p, PortCounter::DataBad);
                    }
                    let meta = region.meta_of(&p);
                    meta.save_dst_mac(encap.orig_dst);
                    meta.set_route(Route {
                        server: encap.origin_server,
                        vswitch: encap.origin_vswitch,
                        egress: encap.egress,
                        ingress: encap.ingress,
                    });
                    Inbound::Data(dst.slot, p)
                } else {
                    if dst.slot != MANAGER_SLOT || encap.origin_server != self.me {
                        return drop(c, pool, p, PortCounter::DataBad);
                    }
                    Inbound::Port(encap.egress, p)
                }
            }
            _ => drop(c, pool, p, PortCounter::RxIgnored),
        }
    }

    /// Writes what nfmgr's mailbox has due: frames to local processes are returned with
    /// their slot, frames to other servers are signed and queued on the cluster port.
    pub fn flush(
        &mut self,
        region: &Region,
        pool: &mut ManagerPool,
        now_ns: u64,
        local: &mut Vec<(u16, Packet)>,
        c: &mut LocalCounters<PORT_COUNTERS>,
    ) {
        let mut spare = Vec::new();
        self.mailbox
            .build_frames(now_ns, region, &mut || pool.alloc(), &mut |p| spare.push(p));
        for p in spare {
            pool.free(p);
        }
        let out: Vec<(EndpointAddr, Packet)> = self.mailbox.take_out().collect();
        for (to, p) in out {
            if to.server == self.me {
                local.push((to.slot, p));
            } else {
                self.send_to_cluster(region, pool, p, true, c);
            }
        }
        self.deliver();
    }
}
