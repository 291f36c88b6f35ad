//! Every view of `nfmgr top`, rendered from fixed statistics at 80x24 and 160x48 and
//! compared with the reviewed snapshots in `tests/snapshots/` (`cargo insta review` after
//! an intended change).
//!
//! The fixture is a two-server cluster seen from its coordinator, one second apart: server
//! 1 runs a vswitch and two runtimes of chain `web`; server 2 a vswitch, an IDS runtime and
//! a `web` runtime that was just killed and is being restarted. One migration is done and
//! one is running.

use std::collections::BTreeMap;

use nf_tui::top::app::{App, Dialog, SortKey, View};
use nf_tui::top::model::Model;
use nf_tui::top::render;
use nflib::cluster::EndpointInfo;
use nflib::frame::EndpointAddr;
use nflib::region::RegionState;
use nflib::slot::{ProcessKind, SlotState};
use nflib::snapshot::{NfSnapshot, PoolSnapshot, PortSnapshot, ProcessSnapshot, RegionSnapshot};
use nflib::stats::PortKind;
use nflib::top::{
    ChainInfo, MigrationRecord, RecoveryRecord, ServerReport, ServerStats, TopEvent, TopReport,
};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use ratatui::Terminal;

/// 2026-11-22 12:00:00 UTC.
const T0: u64 = 1_795_348_800_000;

fn counters(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

struct P {
    slot: u16,
    name: &'static str,
    kind: ProcessKind,
    state: SlotState,
    pid: u32,
    core: Option<u32>,
    /// Packets per second through it.
    pps: u64,
    flows: u64,
    busy_pct: u64,
    drops_ps: u64,
    input_drops_ps: u64,
    migrated_in_ps: u64,
    migrated_out_ps: u64,
    restarts: u32,
    nfs: &'static [(&'static str, u64, Option<u64>)],
}

fn process(p: &P, secs: u64) -> ProcessSnapshot {
    let pkts = p.pps * secs + 1_000_000;
    ProcessSnapshot {
        slot: p.slot,
        name: p.name.to_string(),
        kind: p.kind,
        state: p.state,
        pid: p.pid,
        core: p.core,
        generation: 1,
        restarts: p.restarts,
        last_exit: (p.restarts > 0).then_some(-9),
        quick_deaths: 0,
        input_drops: p.input_drops_ps * secs,
        counters: counters(&[
            ("rx_pkts", pkts),
            ("tx_pkts", pkts - p.drops_ps * secs),
            ("rx_bytes", pkts * 512),
            ("tx_bytes", pkts * 512),
            ("drop_ring_full", p.drops_ps * secs),
            ("busy_ns", p.busy_pct * 10_000_000 * secs),
            ("flows_active", p.flows),
            ("migrated_in", 500 + p.migrated_in_ps * secs),
            ("migrated_out", 500 + p.migrated_out_ps * secs),
        ]),
        nfs: p
            .nfs
            .iter()
            .map(|(kind, drops_ps, alerts)| NfSnapshot {
                kind: kind.to_string(),
                counters: {
                    let mut c = counters(&[("drops", 10 + drops_ps * secs)]);
                    if let Some(a) = alerts {
                        c.insert("alerts".into(), a + secs);
                    }
                    c
                },
            })
            .collect(),
    }
}

fn port(index: u16, name: &str, pps: u64, drops_ps: u64, secs: u64) -> PortSnapshot {
    let pkts = pps * secs + 5_000_000;
    PortSnapshot {
        index,
        name: name.to_string(),
        kind: PortKind::AfPacket,
        counters: counters(&[
            ("rx_pkts", pkts),
            ("tx_pkts", pkts),
            ("rx_bytes", pkts * 512),
            ("tx_bytes", pkts * 512),
            ("rx_kernel_drops", drops_ps * secs),
        ]),
    }
}

const WEB: &[(&str, u64, Option<u64>)] = &[
    ("firewall", 12, None),
    ("nat", 0, None),
    ("flow_monitor", 0, None),
];
const IDS: &[(&str, u64, Option<u64>)] = &[("ids", 0, Some(3))];

fn server1() -> Vec<P> {
    let p = |slot, name, kind, pid, core, pps, flows, busy| P {
        slot,
        name,
        kind,
        state: SlotState::Running,
        pid,
        core,
        pps,
        flows,
        busy_pct: busy,
        drops_ps: 0,
        input_drops_ps: 0,
        migrated_in_ps: 0,
        migrated_out_ps: 0,
        restarts: 0,
        nfs: &[],
    };
    let mut v = vec![
        p(
            0,
            "nfmgr",
            ProcessKind::Manager,
            4100,
            Some(0),
            1_200_000,
            0,
            0,
        ),
        p(
            1,
            "vs0",
            ProcessKind::Vswitch,
            4101,
            Some(1),
            1_200_000,
            0,
            61,
        ),
        p(
            2,
            "rt0",
            ProcessKind::Runtime,
            4102,
            Some(2),
            700_000,
            182_000,
            88,
        ),
        p(
            3,
            "rt1",
            ProcessKind::Runtime,
            4103,
            Some(3),
            500_000,
            131_000,
            57,
        ),
    ];
    v[2].nfs = WEB;
    v[2].drops_ps = 120;
    v[2].input_drops_ps = 2_500;
    v[2].migrated_out_ps = 4_000;
    v[3].nfs = WEB;
    v[3].migrated_in_ps = 4_000;
    v
}

fn server2() -> Vec<P> {
    let mut v = server1();
    v.truncate(4);
    v[0].pid = 7200;
    v[1].pid = 7201;
    v[1].pps = 300_000;
    v[0].pps = 300_000;
    v[2].name = "ids0";
    v[2].pid = 7202;
    v[2].pps = 300_000;
    v[2].flows = 90_000;
    v[2].busy_pct = 45;
    v[2].nfs = IDS;
    v[2].drops_ps = 0;
    v[2].input_drops_ps = 0;
    v[2].migrated_out_ps = 0;
    v[3].name = "rt2";
    v[3].state = SlotState::Starting;
    v[3].pid = 0;
    v[3].pps = 0;
    v[3].flows = 0;
    v[3].busy_pct = 0;
    v[3].restarts = 1;
    v[3].migrated_in_ps = 0;
    v
}

fn snapshot(procs: &[P], secs: u64, ports: Vec<PortSnapshot>) -> RegionSnapshot {
    RegionSnapshot {
        instance: "edge".into(),
        state: RegionState::Ready,
        region: "/dev/hugepages/nfactor-edge".into(),
        hugetlbfs: true,
        manager_pid: 4100,
        pool: PoolSnapshot {
            total: 65536,
            free: 60000,
            cached: 3000,
            in_use: 2536,
            reclaimed: 344,
            double_frees: 0,
        },
        processes: procs.iter().map(|p| process(p, secs)).collect(),
        ports,
    }
}

fn endpoint(
    server: u16,
    slot: u16,
    kind: ProcessKind,
    name: &str,
    chain: Option<&str>,
    alive: bool,
) -> EndpointInfo {
    EndpointInfo {
        addr: EndpointAddr { server, slot },
        kind,
        name: name.into(),
        chain: chain.map(String::from),
        alive,
        generation: 1,
    }
}

fn event(at_s: u64, server: u16, source: &str, what: &str) -> TopEvent {
    TopEvent {
        at_ms: T0 + at_s * 1000,
        server,
        source: source.into(),
        what: what.into(),
    }
}

fn report(secs: u64) -> TopReport {
    let now = T0 + 60_000 + secs * 1000;
    TopReport {
        instance: "edge".into(),
        server: 1,
        name: "edge-a".into(),
        role: "coordinator".into(),
        uptime_s: 3600.0 + secs as f64,
        view_version: 7,
        taken_ms: now,
        servers: vec![
            ServerReport {
                server: 1,
                name: "edge-a".into(),
                alive: true,
                this: true,
                coordinator: true,
                stats_age_ms: Some(0),
                stats: Some(ServerStats {
                    taken_ms: now,
                    snapshot: snapshot(
                        &server1(),
                        secs,
                        vec![
                            port(0, "eth0", 1_200_000, 0, secs),
                            port(1, "eth1", 1_199_000, 35, secs),
                        ],
                    ),
                }),
            },
            ServerReport {
                server: 2,
                name: "edge-b".into(),
                alive: true,
                this: false,
                coordinator: false,
                stats_age_ms: Some(420),
                stats: Some(ServerStats {
                    taken_ms: now - 420,
                    snapshot: snapshot(&server2(), secs, vec![port(0, "eth0", 300_000, 0, secs)]),
                }),
            },
        ],
        endpoints: vec![
            endpoint(1, 1, ProcessKind::Vswitch, "vs0", None, true),
            endpoint(1, 2, ProcessKind::Runtime, "rt0", Some("web"), true),
            endpoint(1, 3, ProcessKind::Runtime, "rt1", Some("web"), true),
            endpoint(2, 1, ProcessKind::Vswitch, "vs0", None, true),
            endpoint(2, 2, ProcessKind::Runtime, "ids0", Some("ids"), true),
            endpoint(2, 3, ProcessKind::Runtime, "rt2", Some("web"), false),
        ],
        chains: vec![
            ChainInfo {
                name: "web".into(),
                nfs: vec!["firewall".into(), "nat".into(), "flow_monitor".into()],
            },
            ChainInfo {
                name: "ids".into(),
                nfs: vec!["ids".into()],
            },
        ],
        events: vec![
            event(
                0,
                1,
                "cluster",
                "server 2 (edge-b) joined from 10.0.0.2:7400",
            ),
            event(1, 1, "rt0", "running (pid 4102)"),
            event(1, 1, "rt1", "running (pid 4103)"),
            event(
                20,
                1,
                "operator",
                "migration 1 started: 1000 flows from rt0@1 to rt1@1",
            ),
            event(
                20,
                1,
                "operator",
                "migration 1 done: 1000 flows moved in 3.0 ms, 0 groups rolled back",
            ),
            event(
                55,
                2,
                "rt2",
                "killed with SIGKILL by operator on server 1 (pid 7203)",
            ),
            event(55, 2, "rt2", "pid 7203 killed by SIGKILL (9)"),
            event(
                58,
                1,
                "operator",
                "migration 2 started: all flows from rt0@1 to rt1@1",
            ),
        ],
        migrations: vec![
            MigrationRecord {
                id: 1,
                server: 1,
                from: "rt0@1".into(),
                to: "rt1@1".into(),
                requested: Some(1000),
                started_ms: T0 + 20_000,
                done: true,
                ms: Some(3.0),
                moved: 1000,
                rolled_back: 0,
                lost: 0,
                error: None,
            },
            MigrationRecord {
                id: 2,
                server: 1,
                from: "rt0@1".into(),
                to: "rt1@1".into(),
                requested: None,
                started_ms: T0 + 58_000,
                done: false,
                ms: None,
                moved: 0,
                rolled_back: 0,
                lost: 0,
                error: None,
            },
        ],
        recoveries: vec![
            RecoveryRecord {
                server: 1,
                process: "rt1".into(),
                cause: "killed by SIGKILL (9)".into(),
                died_ms: T0 + 5_000,
                recovered_ms: Some(T0 + 5_008),
            },
            RecoveryRecord {
                server: 2,
                process: "rt2".into(),
                cause: "killed by SIGKILL (9)".into(),
                died_ms: T0 + 55_000,
                recovered_ms: None,
            },
        ],
    }
}

/// The model after two answers one second apart (rates need two).
fn model() -> Model {
    let mut m = Model::default();
    for s in 0..=1 {
        m.update(report(s));
    }
    m
}

fn screen(app: &App, model: &Model, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).expect("test terminal");
    t.draw(|f| render::draw(f, app, model)).expect("draw");
    let buf = t.backend().buffer();
    let mut out = String::new();
    for y in 0..h {
        let line: String = (0..w).map(|x| buf[(x, y)].symbol().to_string()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn check(name: &str, app: &App, model: &Model) {
    for (w, h) in [(80, 24), (160, 48)] {
        insta::assert_snapshot!(format!("{name}_{w}x{h}"), screen(app, model, w, h));
    }
}

#[test]
fn every_view_at_both_sizes() {
    let m = model();
    for v in View::ALL {
        let app = App {
            view: v,
            ..App::default()
        };
        check(&v.title().to_lowercase(), &app, &m);
    }
}

#[test]
fn help_lists_every_key() {
    let m = model();
    let app = App {
        dialog: Some(Dialog::Help),
        ..App::default()
    };
    check("help", &app, &m);
    let text = screen(&app, &m, 160, 48);
    for (key, _) in nf_tui::top::app::KEYS {
        assert!(text.contains(key), "help lacks {key}");
    }
}

#[test]
fn kill_and_migrate_ask_first() {
    let m = model();
    let mut app = App::default();
    // Select rt0@1 (nfmgr, vs0, rt0 ...) and press k: a confirmation, no action yet.
    for _ in 0..2 {
        app.update(KeyEvent::from(KeyCode::Down), &m);
    }
    assert_eq!(app.update(KeyEvent::from(KeyCode::Char('k')), &m), None);
    check("confirm_kill", &app, &m);
    assert_eq!(
        app.update(KeyEvent::from(KeyCode::Char('y')), &m),
        Some(nf_tui::top::app::Action::Kill("rt0@1".into()))
    );
    // m on the same runtime: its chain's other running runtimes are the targets (rt2@2 is
    // restarting, so only rt1@1).
    assert_eq!(app.update(KeyEvent::from(KeyCode::Char('m')), &m), None);
    app.update(KeyEvent::from(KeyCode::Char('+')), &m);
    check("confirm_migrate", &app, &m);
    assert_eq!(
        app.update(KeyEvent::from(KeyCode::Char('y')), &m),
        Some(nf_tui::top::app::Action::Migrate {
            from: "rt0@1".into(),
            to: "rt1@1".into(),
            flows: Some(1)
        })
    );
}

#[test]
fn sort_filter_freeze_and_lost_connection() {
    let mut m = model();
    let mut app = App {
        view: View::Processes,
        sort: SortKey::Busy,
        ..App::default()
    };
    let busiest = app.visible_procs(&m)[0].spec();
    assert_eq!(busiest, "rt0@1");
    app.update(KeyEvent::from(KeyCode::Char('/')), &m);
    for c in "ids".chars() {
        app.update(KeyEvent::from(KeyCode::Char(c)), &m);
    }
    app.update(KeyEvent::from(KeyCode::Enter), &m);
    assert_eq!(app.visible_procs(&m).len(), 1, "filter `ids` keeps ids0@2");
    app.update(KeyEvent::from(KeyCode::Esc), &m);
    assert_eq!(app.filter, "");
    app.update(KeyEvent::from(KeyCode::Char(' ')), &m);
    assert!(app.frozen);
    m.lost("no nfmgr at /dev/shm/nfmgr-edge.sock (is it running?)".into());
    m.lost("no nfmgr at /dev/shm/nfmgr-edge.sock (is it running?)".into());
    let app = App::default();
    check("lost", &app, &m);
}

#[test]
fn rates_come_from_two_answers() {
    let m = model();
    let rt0 = m.procs.iter().find(|p| p.spec() == "rt0@1").expect("rt0@1");
    assert_eq!(rt0.rx_pps, 700_000.0);
    assert_eq!(rt0.busy_pct, 88.0);
    assert_eq!(rt0.input_drops_ps, 2_500.0);
    assert_eq!(rt0.migrating_out, 4_000);
    let web = m.chains.iter().find(|c| c.name == "web").expect("web");
    assert_eq!(
        web.nfs[0].drops_ps, 24.0,
        "firewall drops summed over rt0@1 and rt1@1"
    );
    let ids = m.chains.iter().find(|c| c.name == "ids").expect("ids");
    assert_eq!(ids.nfs[0].alerts, Some(4));
    // A first answer alone gives no rates, not nonsense.
    let mut first = Model::default();
    first.update(report(0));
    assert!(first.procs.iter().all(|p| p.rx_pps == 0.0));
}
