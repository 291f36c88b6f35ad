//! The runtime's liaison actor answers over real message rings in a real region, through
//! the same mailbox and reliable transport the processes use.

use nf_runtime::liaison::Liaison;
use nflib::endpoint::Endpoint;
use nflib::frame::EndpointAddr;
use nflib::local::{LocalManager, LocalRegion};
use nflib::msg::{Call, Message, Reply};
use nflib::slot::ProcessKind;

/// A runtime's liaison and nfmgr's side of its message rings, in a real region.
struct Bed {
    mgr: LocalManager,
    ep: Endpoint,
    rt: nf_runtime::Runtime,
    mb: nflib::mailbox::Mailbox,
    liaison: Liaison,
    /// Last: the region outlives what maps it.
    _local: LocalRegion,
}

fn bed(tag: &str) -> Bed {
    let local = LocalRegion::new(
        tag,
        "[[vswitch]]\nname = \"vs\"\n[[runtime]]\nname = \"rt\"\n",
        &[(2, ProcessKind::Runtime, "rt")],
        |_| {},
    )
    .unwrap();
    let mut mgr = LocalManager::new(&local);
    mgr.service();
    let ep = Endpoint::attach(local.path(), 2, ProcessKind::Runtime).unwrap();
    let rt = nf_runtime::from_region(&ep, &local.config).unwrap();
    let mb = nf_runtime::mailbox(&ep, &local.config);
    Bed {
        mgr,
        ep,
        rt,
        mb,
        liaison: Liaison::default(),
        _local: local,
    }
}

impl Bed {
    /// Runs the runtime's message handling until the manager got `want` messages.
    fn exchange(&mut self, want: usize) -> Vec<nflib::mailbox::Envelope> {
        let mut got = Vec::new();
        for _ in 0..1000 {
            let now = nflib::time::mono_ns();
            nf_runtime::serve_messages(
                &mut self.ep,
                &mut self.rt,
                &mut self.liaison,
                &mut self.mb,
                &mut nf_runtime::Backlog::default(),
                now,
            );
            self.liaison
                .tick(&mut self.rt, &mut self.ep, &mut self.mb, now);
            self.mb.flush(&mut self.ep, now);
            got.extend(self.mgr.receive());
            if got.len() >= want {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        got
    }
}

#[test]
fn ping_and_control_calls_are_answered() {
    let mut b = bed("liaison");

    b.mgr.send(2, &Message::Ping { seq: 7 });
    b.mgr.send(
        2,
        &Message::Rpc {
            id: 1,
            call: Call::PollWorkload,
        },
    );
    b.mgr.send(
        2,
        &Message::Rpc {
            id: 2,
            call: Call::SetMigrationTarget {
                target: EndpointAddr::new(1, 3),
                count: 10,
            },
        },
    );
    b.mgr.send(
        2,
        &Message::Rpc {
            id: 3,
            call: Call::Recover {
                failed: EndpointAddr::new(1, 3),
                incarnation: 1,
                epoch: 0,
            },
        },
    );
    let got = b.exchange(4);
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(got.iter().all(|e| e.from == EndpointAddr::new(1, 2)));
    assert_eq!(got[0].msg, Message::Pong { seq: 7, flows: 0 });
    assert!(matches!(
        &got[1].msg,
        Message::RpcReply { id: 1, reply: Reply::Workload(w) } if w.flows_active == 0
    ));
    assert_eq!(
        got[2].msg,
        Message::RpcReply {
            id: 2,
            reply: Reply::Accepted
        }
    );
    // Nothing is replicated here: nothing to take over.
    assert!(matches!(
        &got[3].msg,
        Message::RpcReply {
            id: 3,
            reply: Reply::Recovered { flows: 0, lost: 0 }
        }
    ));
    // The migration target shows in the workload.
    b.mgr.send(
        2,
        &Message::Rpc {
            id: 4,
            call: Call::PollWorkload,
        },
    );
    let got = b.exchange(1);
    assert!(matches!(
        &got[0].msg,
        Message::RpcReply { id: 4, reply: Reply::Workload(w) }
            if w.migration_target == Some(EndpointAddr::new(1, 3))
    ));
    assert_eq!(b.liaison.unknown, 0);
}

#[test]
fn a_probe_run_to_the_manager_is_counted_exactly() {
    let mut b = bed("probe");
    b.mgr.send(
        2,
        &Message::Rpc {
            id: 1,
            call: Call::StartProbe {
                to: EndpointAddr::new(1, 0),
                run: 9,
                count: 2000,
                size: 100,
                depth: 0,
            },
        },
    );
    let mut probes = 0u64;
    let mut next = 0u64;
    for _ in 0..20_000 {
        for e in b.exchange(0) {
            if let Message::Probe { seq, pad, .. } = e.msg {
                assert_eq!(seq, next, "in order, once");
                assert_eq!(pad.len(), 100);
                next += 1;
                probes += 1;
            }
        }
        b.mgr.service();
        if probes == 2000 {
            break;
        }
    }
    assert_eq!(probes, 2000);
}

#[test]
fn a_prepared_target_stays_awake_and_meets_its_source_first() {
    let mut b = bed("prepare");
    assert!(!b.ep.kept_awake());
    // The manager's endpoint stands in for the source here: it gets the ping.
    let source = EndpointAddr::new(1, 0);
    b.mgr.send(
        2,
        &Message::Rpc {
            id: 1,
            call: Call::PrepareMigration {
                source,
                awake_ms: 500,
                flows: 1_000,
            },
        },
    );
    b.mgr.send(
        2,
        &Message::Rpc {
            id: 2,
            call: Call::PrepareMigration {
                source: EndpointAddr::new(1, 2),
                awake_ms: 500,
                flows: 1_000,
            },
        },
    );
    let got = b.exchange(3);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got
        .iter()
        .any(|e| matches!(e.msg, Message::Ping { .. }) && e.from == EndpointAddr::new(1, 2)));
    assert!(got.iter().any(|e| e.msg
        == Message::RpcReply {
            id: 1,
            reply: Reply::Accepted
        }));
    assert!(
        got.iter().any(|e| matches!(
            &e.msg,
            Message::RpcReply { id: 2, reply: Reply::Refused { reason } }
                if reason.contains("itself")
        )),
        "a runtime is not its own migration target: {got:?}"
    );
    assert!(b.ep.kept_awake(), "polls until the migration begins");
    assert_eq!(b.liaison.unknown, 0);
}

/// Issue 25: placement and recovery orders carry the epoch of the view they were made
/// under; a runtime that follows a later coordinator life refuses older ones (a restarted
/// or replaced coordinator may have changed what they were made from) and takes the
/// current life's.
#[test]
fn orders_of_an_earlier_coordinator_life_are_refused() {
    let mut b = bed("liaison-epoch");
    let view = nflib::cluster::ClusterView {
        epoch: 5,
        version: 1,
        coordinator: 1,
        servers: vec![],
    };
    let replicas = vec![EndpointAddr::new(2, 2)];
    let calls = [
        Call::NotifyClusterCfg(view),
        Call::SetReplica {
            replicas: replicas.clone(),
            epoch: 4,
        },
        Call::Recover {
            failed: EndpointAddr::new(2, 3),
            incarnation: u64::MAX,
            epoch: 4,
        },
        Call::SetReplica { replicas, epoch: 5 },
        Call::Recover {
            failed: EndpointAddr::new(2, 3),
            incarnation: u64::MAX,
            epoch: 6,
        },
    ];
    let n = calls.len();
    for (id, call) in calls.into_iter().enumerate() {
        b.mgr.send(
            2,
            &Message::Rpc {
                id: id as u64,
                call,
            },
        );
    }
    let mut got = b.exchange(n);
    got.sort_by_key(|e| match &e.msg {
        Message::RpcReply { id, .. } => *id,
        _ => u64::MAX,
    });
    let replies: Vec<&Reply> = got
        .iter()
        .filter_map(|e| match &e.msg {
            Message::RpcReply { reply, .. } => Some(reply),
            _ => None,
        })
        .collect();
    assert_eq!(replies.len(), n, "{got:?}");
    for stale in [1, 2] {
        assert!(
            matches!(replies[stale], Reply::Refused { reason } if reason.contains("epoch 4")),
            "order {stale}: {:?}",
            replies[stale]
        );
    }
    assert_eq!(*replies[3], Reply::Accepted);
    assert!(
        matches!(replies[4], Reply::Recovered { flows: 0, .. }),
        "{:?}",
        replies[4]
    );
    assert_eq!(b.liaison.replicas(), &[EndpointAddr::new(2, 2)]);
}
