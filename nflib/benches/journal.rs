//! The coordinator's journal at the scale: a view of 100 servers and 10,000
//! runtimes written (encoded, synced, renamed) and replayed (read, decoded, restored into
//! a fresh membership), next to the floor of reading the same bytes back raw.
//!
//! Prints one JSON line. `NF_BENCH_SMOKE=1` runs one iteration of a tenth of the size.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nflib::cluster::{ClusterView, EndpointInfo, ServerInfo};
use nflib::frame::EndpointAddr;
use nflib::journal::JournalFile;
use nflib::membership::{Journal, Membership, Settings};
use nflib::slot::ProcessKind;

fn journal(servers: u16, runtimes_per_server: u16) -> Journal {
    let view = ClusterView {
        epoch: 1_765_000_000_000_000_000,
        version: 12_345,
        coordinator: 1,
        servers: (1..=servers)
            .map(|s| ServerInfo {
                server: s,
                name: format!("server-{s}"),
                incarnation: 1_765_000_000_000_000_000 + u64::from(s),
                alive: true,
                endpoints: std::iter::once(EndpointInfo {
                    addr: EndpointAddr::new(s, 1),
                    kind: ProcessKind::Vswitch,
                    name: "vs0".into(),
                    chain: None,
                    alive: true,
                    generation: 1,
                })
                .chain((0..runtimes_per_server).map(|r| EndpointInfo {
                    addr: EndpointAddr::new(s, 2 + r),
                    kind: ProcessKind::Runtime,
                    name: format!("rt{r}"),
                    chain: Some("web".into()),
                    alive: true,
                    generation: 1,
                }))
                .collect(),
            })
            .collect(),
    };
    Journal {
        view,
        addrs: (2..=servers)
            .map(|s| {
                (
                    s,
                    SocketAddr::from(([10, 0, (s >> 8) as u8, s as u8], 7700)),
                )
            })
            .collect(),
    }
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn main() {
    let smoke = std::env::var_os("NF_BENCH_SMOKE").is_some();
    let (servers, per, iters) = if smoke { (10, 100, 1) } else { (100, 100, 7) };
    let j = journal(servers, per);
    let dir = std::env::temp_dir().join(format!("nf-journal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("coordinator.journal");
    let file = JournalFile::new(path.clone(), &[b"bench cluster key 0123456789"]);
    let settings = Settings {
        heartbeat: Duration::from_millis(100),
        member_timeout: Duration::from_millis(500),
        rejoin_every: Duration::from_millis(500),
        fence_wait: Duration::from_secs(5),
        restore_grace: Duration::from_secs(3),
        replicated: ["web".to_string()].into(),
        chains: vec![],
        can_join: true,
        rejoin_at_once: false,
    };
    let (mut write, mut read_raw, mut replay) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..iters {
        let t = Instant::now();
        file.write(&j).unwrap();
        write.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(std::fs::read(&path).unwrap());
        read_raw.push(t.elapsed());
        let t = Instant::now();
        let loaded = file.load().unwrap().unwrap();
        let mut m = Membership::new(
            1,
            "server-1".into(),
            1_765_000_000_000_000_999,
            nflib::membership::Start::Coordinator,
            settings.clone(),
            vec![],
            Instant::now(),
        );
        m.restore(loaded, Instant::now()).unwrap();
        while m.poll().is_some() {}
        replay.push(t.elapsed());
        assert_eq!(m.view().servers.len(), servers as usize);
    }
    let bytes = std::fs::metadata(&path).unwrap().len();
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{{\"bench\": \"coordinator journal\", \"servers\": {servers}, \"runtimes\": {}, \"bytes\": {bytes}, \"write_ms\": {:.2}, \"replay_ms\": {:.2}, \"reference_raw_read_ms\": {:.3}}}",
        u32::from(servers) * u32::from(per),
        median(write),
        median(replay),
        median(read_raw)
    );
}
