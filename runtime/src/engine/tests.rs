//! The engine stepped in memory: packets are byte vectors ([`MemIo`]), messages are kept
//! decoded, and the clock is the `now_ms` each call is given.

use super::*;
use crate::io::mem::{MemIo, MemPacket};
use nflib::config::Config;
use nflib::packet::build::UdpV4;
use std::path::Path;

const ME: EndpointAddr = EndpointAddr::new(1, 2);
const PEER: EndpointAddr = EndpointAddr::new(1, 3);
const VSWITCH_SLOT: u16 = 1;
const VSWITCH: EndpointAddr = EndpointAddr::new(1, VSWITCH_SLOT);
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

fn config(nfs: &str) -> Config {
    let text = format!(
        "[[vswitch]]\nname = \"vs0\"\n[[runtime]]\nname = \"rt0\"\nchain = \"c\"\n\
         [[runtime]]\nname = \"rt1\"\nchain = \"c\"\n[[chain]]\nname = \"c\"\n{nfs}"
    );
    Config::parse(&text, Path::new(".")).unwrap()
}

const MONITOR: &str = "[[chain.nf]]\nkind = \"firewall\"\ndefault = \"allow\"\n\
    [[chain.nf]]\nkind = \"flow_monitor\"\n";
const NAT: &str = "[[chain.nf]]\nkind = \"nat\"\nexternal_ip = \"10.77.0.100\"\n\
    external_mac = \"02:4e:41:54:00:01\"\ninternal = \"10.0.0.0/8\"\nports = \"20000-20100\"\n";

fn settings() -> FlowSettings {
    FlowSettings {
        max_flows: 1000,
        idle_ms: 30_000,
        unreplied_ms: 5_000,
        closed_linger_ms: 1_000,
        alias_wait_ms: 100,
    }
}

fn runtime_as(me: EndpointAddr, nfs: &str) -> Runtime<MemPacket> {
    let cfg = config(nfs);
    let name = if me == ME { "rt0" } else { "rt1" };
    let stages = nfs::registry()
        .build_chain(&cfg, "c", name, u32::from(me.slot - 2), 2)
        .unwrap();
    Runtime::new(stages, settings(), EventLog::disabled(), me)
}

fn frame(src_port: u16) -> Vec<u8> {
    let mut b = vec![0u8; 64];
    UdpV4 {
        src_mac: CLIENT_MAC,
        dst_mac: GATEWAY_MAC,
        src_ip: [10, 0, 0, 1],
        dst_ip: [192, 0, 2, 9],
        src_port,
        dst_port: 53,
        payload_len: 22,
    }
    .write(&mut b)
    .unwrap();
    b
}

/// Sets the clock the engine reads to `now_ms` of the runtime's own.
fn at(rt: &Runtime<MemPacket>, io: &mut MemIo, now_ms: u64) {
    io.now_ns = rt.epoch_ns() + now_ms * 1_000_000;
}

/// One turn of the runtime's loop on `frames` (as the vswitch hands them over) at `now_ms`.
fn turn(rt: &mut Runtime<MemPacket>, io: &mut MemIo, frames: &[Vec<u8>], now_ms: u64) {
    at(rt, io, now_ms);
    let mac = rt.me().input_mac();
    let mut batch: Vec<(u16, MemPacket)> = frames
        .iter()
        .map(|f| (VSWITCH_SLOT, MemPacket::addressed(f, mac)))
        .collect();
    rt.process_batch(io, &mut batch, now_ms);
    rt.expire(io, now_ms);
    rt.flush(io, io.now_ns);
}

#[test]
fn a_flows_packets_run_the_chain_and_leave_with_their_own_destination() {
    let mut rt = runtime_as(ME, MONITOR);
    let mut io = MemIo::default();
    turn(
        &mut rt,
        &mut io,
        &[frame(1000), frame(1000), frame(1001)],
        10,
    );
    let out = io.take_ring(MANAGER_SLOT);
    assert_eq!(out.len(), 3);
    for p in &out {
        assert_eq!(
            &p.frame()[..6],
            &GATEWAY_MAC,
            "the vswitch's addressing undone"
        );
    }
    assert_eq!(io.count_of(ProcCounter::FlowsCreated), 2);
    assert_eq!(rt.flows().len(), 2);
    assert_eq!(io.count_of(ProcCounter::DropMisaddressed), 0);
    // A frame the vswitch addressed to another runtime is counted (and still handled).
    let mut batch = vec![(
        VSWITCH_SLOT,
        MemPacket::addressed(&frame(1000), PEER.input_mac()),
    )];
    rt.process_batch(&mut io, &mut batch, 11);
    assert_eq!(io.count_of(ProcCounter::DropMisaddressed), 1);
}

#[test]
fn malformed_frames_are_counted_and_freed() {
    let mut rt = runtime_as(ME, MONITOR);
    let mut io = MemIo::default();
    let mut short = frame(1000);
    short.truncate(40);
    turn(&mut rt, &mut io, &[vec![0xff; 10], short], 10);
    assert!(io.take_ring(MANAGER_SLOT).is_empty());
    assert_eq!(io.freed, 2);
    assert_eq!(
        io.count_of(ProcCounter::DropRunt) + io.count_of(ProcCounter::DropTruncated),
        2
    );
    assert!(rt.flows().is_empty());
}

/// A flow that never got a reply ends after `unreplied_ms` (on the clock the engine is
/// given): every function sees its end, and its vswitch is told to forget its key.
#[test]
fn an_unreplied_flow_ends_on_time_and_its_vswitch_forgets_it() {
    let mut rt = runtime_as(ME, MONITOR);
    let mut io = MemIo::default();
    turn(&mut rt, &mut io, &[frame(1000)], 10);
    io.take_sent();
    turn(&mut rt, &mut io, &[], 4_000);
    assert_eq!(rt.flows().len(), 1, "not before its time");
    turn(&mut rt, &mut io, &[], 5_200);
    assert!(rt.flows().is_empty());
    assert_eq!(io.count_of(ProcCounter::FlowsExpired), 1);
    let sent = io.take_sent();
    let key = FlowKey::of(&nflib::packet::parse(&frame(1000)).unwrap()).0;
    assert!(
        matches!(sent.as_slice(), [(to, Message::FlowEnded { keys, .. })] if *to == VSWITCH && keys == &vec![key]),
        "{sent:?}"
    );
}

/// A NAT's translation is a new key for the flow's replies: the vswitch must know it before
/// the packet that made it leaves, so the packet waits for the vswitch's answer.
#[test]
fn a_translated_packet_waits_until_the_vswitch_knows_the_reply_key() {
    let mut rt = runtime_as(ME, NAT);
    let mut io = MemIo::default();
    turn(&mut rt, &mut io, &[frame(1000)], 10);
    assert!(io.take_ring(MANAGER_SLOT).is_empty(), "held");
    let sent = io.take_sent();
    let [(to, Message::AddAliases { aliases, request })] = sent.as_slice() else {
        panic!("expected one alias request, got {sent:?}");
    };
    assert_eq!(*to, VSWITCH);
    assert_eq!(aliases.len(), 1);
    assert_ne!(*request, 0, "an answer is asked for");
    rt.on_aliases_added(&mut io, VSWITCH, *request, &[], 11);
    turn(&mut rt, &mut io, &[], 11);
    let out = io.take_ring(MANAGER_SLOT);
    assert_eq!(out.len(), 1, "released by the answer");
    let h = nflib::packet::parse(out[0].frame()).unwrap();
    assert_eq!(h.src_ip, FlowKey::v4([10, 77, 0, 100]), "translated");
}

/// The vswitch refuses a reply key (another runtime's translation holds it): the waiting
/// packet is dropped and the flow ends, since its replies would reach the other flow.
#[test]
fn a_refused_reply_key_ends_its_flow_and_drops_the_packet() {
    let mut rt = runtime_as(ME, NAT);
    let mut io = MemIo::default();
    turn(&mut rt, &mut io, &[frame(1000)], 10);
    let sent = io.take_sent();
    let [(_, Message::AddAliases { aliases, request })] = sent.as_slice() else {
        panic!("{sent:?}");
    };
    let refused = aliases.clone();
    rt.on_aliases_added(&mut io, VSWITCH, *request, &refused, 11);
    turn(&mut rt, &mut io, &[], 11);
    assert!(io.take_ring(MANAGER_SLOT).is_empty());
    assert!(rt.flows().is_empty());
    assert_eq!(io.count_of(ProcCounter::AliasesRefused), 1);
}

/// Output commit: a packet leaves only once its replica holds the state the packet made.
#[test]
fn under_output_commit_a_packet_waits_for_its_replica() {
    let mut rt = runtime_as(ME, MONITOR);
    rt.set_replication(
        replication::Settings {
            mode: replication::Mode::OutputCommit,
            ..replication::Settings::default()
        },
        1,
    );
    rt.repl.set_replicas(&[PEER], 0);
    let mut io = MemIo::default();
    turn(&mut rt, &mut io, &[frame(1000)], 10);
    assert!(
        io.take_ring(MANAGER_SLOT).is_empty(),
        "held for the replica"
    );
    let sent = io.take_sent();
    let Some((
        to,
        Message::Replicate {
            incarnation,
            version,
            flows,
            ..
        },
    )) = sent
        .iter()
        .find(|(_, m)| matches!(m, Message::Replicate { .. }))
    else {
        panic!("no replication message: {sent:?}");
    };
    assert_eq!(*to, PEER);
    assert_eq!(flows.len(), 1);
    rt.repl.on_replicated(
        PEER,
        *incarnation,
        *version,
        &[],
        &[],
        rt.epoch_ns() + 11_000_000,
    );
    turn(&mut rt, &mut io, &[], 11);
    assert_eq!(io.take_ring(MANAGER_SLOT).len(), 1, "out once acknowledged");
}

/// A replica takes over a dead primary's flows: the vswitch is asked to send their keys
/// here, and the flows go on with the state the primary had (no new flow is made).
#[test]
fn a_replica_takes_over_with_the_primarys_state() {
    let (mut replica, mut rio, key) = replica_with_a_copy(None);
    // The primary dies; the replica is told to recover it.
    let (flows, messages) = replica.recover(&mut rio, ME, u64::MAX, 77);
    assert_eq!((flows, messages), (1, 1));
    let sent = rio.take_sent();
    assert!(
        matches!(sent.as_slice(), [(VSWITCH, Message::SetRuntime { keys, from, runtime, request: 77 })]
            if keys == &vec![key] && *from == ME && *runtime == PEER),
        "{sent:?}"
    );
    // The flow's next packet runs here as the same flow.
    turn(&mut replica, &mut rio, &[frame(1000)], 20);
    assert_eq!(rio.count_of(ProcCounter::FlowsCreated), 0, "no new flow");
    assert_eq!(replica.flows().len(), 1);
    let row = replica.flows().rows().into_iter().next().unwrap();
    assert_eq!(replica.flows().get(row).map(|a| a.key), Some(key));
}

/// A primary (`ME`) whose one flow (`frame(1000)`) is replicated to `PEER`; returns the
/// replica, holding its copy, with its I/O, and the flow's key.
fn replica_with_a_copy(
    migration: Option<MigrationSettings>,
) -> (Runtime<MemPacket>, MemIo, FlowKey) {
    let mut primary = runtime_as(ME, MONITOR);
    primary.set_replication(
        replication::Settings {
            mode: replication::Mode::OutputCommit,
            ..replication::Settings::default()
        },
        1,
    );
    primary.repl.set_replicas(&[PEER], 0);
    let mut pio = MemIo::default();
    turn(&mut primary, &mut pio, &[frame(1000), frame(1000)], 10);
    let mut replica = runtime_as(PEER, MONITOR);
    if let Some(m) = migration {
        replica.set_migration(Some("c".into()), m);
    }
    replica.set_replication(
        replication::Settings {
            mode: replication::Mode::OutputCommit,
            max_replica_flows: 100,
            ..replication::Settings::default()
        },
        1,
    );
    let mut rio = MemIo::default();
    for (to, m) in pio.take_sent() {
        if let (
            true,
            Message::Replicate {
                incarnation,
                version,
                flows,
                states,
                ended,
            },
        ) = (to == PEER, m)
        {
            replica.on_replicate(&mut rio, ME, incarnation, version, &flows, &states, &ended);
        }
    }
    assert!(matches!(
        rio.take_sent().as_slice(),
        [(ME, Message::Replicated { .. })]
    ));
    assert_eq!(replica.replica.len(), 1);
    let key = FlowKey::of(&nflib::packet::parse(&frame(1000)).unwrap()).0;
    (replica, rio, key)
}

/// A takeover's vswitch gives a key to a third runtime (a migration's target): the copy
/// waits, and is made live with its state if the key comes back (that target never got
/// the state), or is dropped once the wait is over.
#[test]
fn a_copy_whose_key_went_to_a_migrations_target_waits_for_it_to_come_back() {
    for comes_back in [true, false] {
        let (mut replica, mut rio, key) = replica_with_a_copy(None);
        let (flows, _) = replica.recover(&mut rio, ME, u64::MAX, 77);
        assert_eq!(flows, 1);
        rio.take_sent();
        at(&replica, &mut rio, 12);
        replica.drop_unmoved(&mut rio, &[key]);
        turn(&mut replica, &mut rio, &[], 13);
        assert_eq!(replica.flows().len(), 0, "not made live in the background");
        let later = if comes_back { 500 } else { 3_000 };
        turn(&mut replica, &mut rio, &[], later);
        turn(&mut replica, &mut rio, &[frame(1000)], later + 1);
        assert_eq!(replica.flows().len(), 1);
        let not_ours = rio.count_of(ProcCounter::RecoveredNotOurs);
        let created = rio.count_of(ProcCounter::FlowsCreated);
        if comes_back {
            assert_eq!((not_ours, created), (0, 0), "the copy, made live");
        } else {
            assert_eq!((not_ours, created), (1, 1), "dropped: a new flow");
        }
    }
}

/// The replica is also the target of a migration from the primary that died between the
/// switch and the state: its takeover first gives the pending flow back to the dead
/// primary at the vswitch (so that the takeover's request, sent next, moves it here), and
/// the flow goes on here with the primary's state.
#[test]
fn a_replica_that_was_the_dead_sources_migration_target_takes_the_flow_with_its_state() {
    let settings = MigrationSettings {
        hand_back: true,
        ..MigrationSettings::default()
    };
    let (mut replica, mut rio, key) = replica_with_a_copy(Some(settings));
    at(&replica, &mut rio, 11);
    migration_step_1(&mut replica, &mut rio, key, 11);
    assert!(
        rio.take_sent()
            .iter()
            .any(|(to, m)| *to == ME && matches!(m, Message::MigrateReady { .. })),
        "step 1 accepted"
    );
    // Step 2 done: the vswitch sends the flow here, where it waits for its state.
    turn(&mut replica, &mut rio, &[frame(1000)], 12);
    assert_eq!(rio.count_of(ProcCounter::FlowsCreated), 0);
    at(&replica, &mut rio, 13);
    replica.recover(&mut rio, ME, u64::MAX, 77);
    let sent: Vec<(EndpointAddr, Message)> = rio
        .take_sent()
        .into_iter()
        .filter(|(_, m)| matches!(m, Message::SetRuntime { .. }))
        .collect();
    assert!(
        matches!(sent.as_slice(), [
            (VSWITCH, Message::SetRuntime { keys: back, from: PEER, runtime: ME, request: nflib::msg::HAND_BACK_REQUEST }),
            (VSWITCH, Message::SetRuntime { keys: taken, from: ME, runtime: PEER, request: 77 }),
        ] if back == &vec![key] && taken == &vec![key]),
        "{sent:?}"
    );
    turn(&mut replica, &mut rio, &[frame(1000)], 20);
    assert_eq!(rio.count_of(ProcCounter::FlowsCreated), 0, "no new flow");
    assert_eq!(replica.migrator.counters.flows_handed_back, 1);
    assert_eq!(replica.flows().len(), 1);
}

/// A migration's target whose source died before sending the state gives the flow back
/// to the source at the vswitch (its replica, elsewhere, takes it over), and a packet the
/// vswitch sent here meanwhile starts no stateless flow.
#[test]
fn a_target_whose_source_died_gives_the_flow_back_and_starts_no_stateless_one() {
    let mut target = runtime_as(PEER, MONITOR);
    target.set_migration(
        Some("c".into()),
        MigrationSettings {
            hand_back: true,
            ..MigrationSettings::default()
        },
    );
    let mut io = MemIo::default();
    let key = FlowKey::of(&nflib::packet::parse(&frame(1000)).unwrap()).0;
    at(&target, &mut io, 10);
    migration_step_1(&mut target, &mut io, key, 10);
    turn(&mut target, &mut io, &[frame(1000)], 11);
    io.take_sent();
    at(&target, &mut io, 12);
    target.migration_tick(&mut io, &[ME], 12);
    let sent = io.take_sent();
    assert!(
        matches!(sent.as_slice(), [(VSWITCH, Message::SetRuntime { keys, from: PEER, runtime: ME, request: nflib::msg::HAND_BACK_REQUEST })]
            if keys == &vec![key]),
        "{sent:?}"
    );
    turn(&mut target, &mut io, &[frame(1000)], 13);
    assert_eq!(io.count_of(ProcCounter::FlowsCreated), 0);
    assert_eq!(io.count_of(ProcCounter::DropAwaitingRecovery), 1);
    assert_eq!(target.flows().len(), 0);
    // Long after, the key is anyone's again.
    let later = 13 + crate::migration::GAVE_BACK_DROP_MS;
    target.migration_tick(&mut io, &[], later);
    turn(&mut target, &mut io, &[frame(1000)], later);
    assert_eq!(io.count_of(ProcCounter::FlowsCreated), 1);
}

/// Migration step 1 from `ME` to `rt`: group 1 of the one flow `key`, fed by `VSWITCH`.
fn migration_step_1(rt: &mut Runtime<MemPacket>, io: &mut MemIo, key: FlowKey, now_ms: u64) {
    rt.on_migration_message(
        io,
        ME,
        Message::MigrateInit {
            group: 1,
            chain: Some("c".into()),
            vswitch: VSWITCH,
            flows: vec![MigrateFlow {
                key,
                aliases: Vec::new(),
            }],
        },
        now_ms,
    );
}
