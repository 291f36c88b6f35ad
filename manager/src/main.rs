//! nfmgr: owns the ports and the shared region, supervises the nf-vswitch and nf-runtime
//! processes, and reports.
//!
//! ```text
//! nfmgr start --config FILE     run an instance in the foreground until SIGTERM/SIGINT
//! nfmgr demo                    generator -> vswitch -> 2 runtimes -> sink, no root needed
//! nfmgr stats [--json]          counters of a running instance, read from its region
//! nfmgr status|runtimes|flows|stop|msgtest|migrate|kill|rekey [--json]
//!                               ask a running instance through its control socket
//! nfmgr top                     the live dashboard
//! ```

mod cli;
mod control;
mod dataplane;
mod hugepages;
mod instance;
mod linkwatch;
mod listen;
mod ports;
mod relay;
mod supervisor;
mod sys;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nflib::doorbell::Doorbells;
use nflib::layout::Layout;
use nflib::pool::ManagerPool;
use nflib::region::{CreateOptions, Region};
use nflib::sandbox::RunAs;
use nflib::slot::ProcessKind;
use nflib::snapshot::RegionSnapshot;
use nflib::stats::LocalCounters;
use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;
use ringbuf::traits::Split;
use ringbuf::HeapRb;

use crate::control::socket::Access;
use crate::dataplane::{Channels, Command, Dataplane, PortSlot};
use crate::instance::Instance;
use crate::ports::Port;
use crate::supervisor::{ProcSpec, Supervisor};
use nflib::config::{parse_cpu_list, Config, PortSpec};

#[derive(Parser)]
#[command(name = "nfmgr", version, about = "NFActor platform manager")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an instance in the foreground (stops on SIGTERM or SIGINT).
    Start {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the built-in demo: generator -> vswitch -> runtimes -> sink, printing live rates.
    /// Needs no root, no NIC and no huge pages.
    Demo {
        #[arg(long, default_value_t = 10)]
        duration_secs: u64,
        /// Generated flows.
        #[arg(long, default_value_t = 256)]
        flows: u32,
        /// Packets per second per flow (0 = as fast as possible).
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 2)]
        runtimes: u32,
        #[arg(long, default_value_t = 64)]
        packet_size: u32,
        #[arg(long, default_value = "demo")]
        instance: String,
        /// Also write the final report as JSON here.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// The instance, its cluster (members, their state) and its processes.
    Status {
        #[command(flatten)]
        target: cli::Target,
    },
    /// Every vswitch and runtime of the cluster, with its workload.
    Runtimes {
        #[command(flatten)]
        target: cli::Target,
    },
    /// Flows held by the runtimes (or one of them: NAME, NAME@SERVER or SERVER/SLOT).
    Flows {
        #[command(flatten)]
        target: cli::Target,
        #[arg(long)]
        runtime: Option<String>,
        /// Flows listed per runtime at most.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Stop the instance (as SIGTERM does).
    Stop {
        #[command(flatten)]
        target: cli::Target,
    },
    /// Send numbered actor messages from one runtime's liaison to another's and check that
    /// every one arrives exactly once, in order; report rate, latency and retransmissions.
    Msgtest {
        #[command(flatten)]
        target: cli::Target,
        /// Sending runtime (NAME, NAME@SERVER or SERVER/SLOT).
        #[arg(long)]
        from: String,
        /// Receiving runtime.
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Payload bytes per message.
        #[arg(long, default_value_t = 64)]
        size: u32,
        /// Messages unacknowledged at a time (0: the send window). 1 measures latency alone.
        #[arg(long, default_value_t = 0)]
        depth: u32,
        #[arg(long, default_value_t = 300.0)]
        timeout_s: f64,
    },
    /// Move flows from one runtime to another (the three-step migration protocol) and
    /// report flows moved, time, packets buffered, lost and reordered.
    Migrate {
        #[command(flatten)]
        target: cli::Target,
        /// Source runtime (NAME, NAME@SERVER or SERVER/SLOT).
        #[arg(long)]
        from: String,
        /// Target runtime (same chain).
        #[arg(long)]
        to: String,
        /// How many flows (default: all of them).
        #[arg(long, conflicts_with = "all")]
        flows: Option<u32>,
        /// Every flow of the source (the default).
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 120.0)]
        timeout_s: f64,
    },
    /// The live dashboard: ports, processes, chains, migrations, recoveries and events of
    /// the instance (of the whole cluster, on the coordinator). `?` lists the keys.
    Top {
        #[command(flatten)]
        target: cli::Target,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval_s: f64,
    },
    /// Failover drill: kill a vswitch or runtime (NAME, NAME@SERVER or SERVER/SLOT)
    /// anywhere in the cluster with SIGKILL; its nfmgr restarts it as after a crash.
    Kill {
        #[command(flatten)]
        target: cli::Target,
        process: String,
    },
    /// Read the cluster keys again from the configuration (cluster.key_file signs, it and
    /// cluster.accept_key_files are accepted): one step of a key rotation, run on every
    /// server in turn (docs/SECURITY.md).
    Rekey {
        #[command(flatten)]
        target: cli::Target,
    },
    /// Print the counters of a running instance.
    Stats {
        #[arg(long, default_value = "default")]
        instance: String,
        /// Where the instance keeps its lock (its manager.run_dir; default: /run/nfactor for
        /// root, $XDG_RUNTIME_DIR/nfactor or /tmp/nfactor-UID for others).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NFMGR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Start { config } => Config::load(&config)
            .map_err(anyhow::Error::from)
            .and_then(|c| run(c, false)),
        Cmd::Demo {
            duration_secs,
            flows,
            rate,
            runtimes,
            packet_size,
            instance,
            report,
        } => demo_config(
            duration_secs,
            flows,
            rate,
            runtimes,
            packet_size,
            &instance,
            report,
        )
        .and_then(|c| run(c, true)),
        Cmd::Stats {
            instance,
            dir,
            json,
        } => stats(
            &instance,
            &dir.unwrap_or_else(nflib::config::default_run_dir),
            json,
        ),
        Cmd::Status { target } => cli::status(&target),
        Cmd::Runtimes { target } => cli::runtimes(&target),
        Cmd::Flows {
            target,
            runtime,
            limit,
        } => cli::flows(&target, runtime, limit),
        Cmd::Stop { target } => cli::stop(&target),
        Cmd::Top { target, interval_s } => cli::top(&target, interval_s),
        Cmd::Kill { target, process } => cli::kill(&target, &process),
        Cmd::Rekey { target } => cli::rekey(&target),
        Cmd::Msgtest {
            target,
            from,
            to,
            count,
            size,
            depth,
            timeout_s,
        } => cli::msgtest(&target, &from, &to, count, size, depth, timeout_s),
        Cmd::Migrate {
            target,
            from,
            to,
            flows,
            all: _,
            timeout_s,
        } => cli::migrate(&target, &from, &to, flows, timeout_s),
    };
    if let Err(e) = result {
        eprintln!("nfmgr: {e:#}");
        std::process::exit(1);
    }
}

fn demo_config(
    secs: u64,
    flows: u32,
    rate: f64,
    runtimes: u32,
    size: u32,
    instance: &str,
    report: Option<PathBuf>,
) -> Result<Config> {
    if runtimes == 0 || runtimes > 16 {
        bail!("--runtimes: between 1 and 16");
    }
    let mut text = format!(
        "instance = \"{instance}\"\n\
         [region]\nhugepages = \"off\"\n\
         [manager]\nexit_when_done = true\nlog_rates = true\n"
    );
    if let Some(r) = report {
        text += &format!("report = {:?}\n", r.display().to_string());
    }
    text += "[[vswitch]]\nname = \"vs0\"\n";
    for i in 0..runtimes {
        text += &format!("[[runtime]]\nname = \"rt{i}\"\n");
    }
    // Every flow through a stateful firewall and a flow monitor.
    text += "[[chain]]\nname = \"demo\"\n\
             [[chain.nf]]\nkind = \"firewall\"\ndefault = \"deny\"\n\
             rules = [ { action = \"allow\", proto = \"udp\" } ]\n\
             [[chain.nf]]\nkind = \"flow_monitor\"\n";
    text += &format!(
        "[[port]]\nname = \"gen0\"\nspec = \"gen:\"\nto = \"sink0\"\nflows = {flows}\n\
         rate_pps = {rate:?}\npacket_size = {size}\nduration_ms = {}\n\
         [[port]]\nname = \"sink0\"\nspec = \"sink:\"\n",
        secs * 1000
    );
    Config::parse(&text, Path::new(".")).context("demo configuration")
}

fn stats(instance: &str, dir: &Path, json: bool) -> Result<()> {
    let path = instance::find_region(instance, dir)?;
    let region = Region::attach_lazily(&path)?;
    let snap = RegionSnapshot::read(&region);
    if json {
        println!("{}", serde_json::to_string_pretty(&snap)?);
    } else {
        print!(
            "{}",
            nf_tui::summary(&snap, &vec![(String::new(), None); snap.ports.len()])
        );
    }
    Ok(())
}

fn bin_dir(cfg: &Config) -> Result<PathBuf> {
    if let Some(d) = &cfg.manager.bin_dir {
        return Ok(cfg.base_dir.join(d));
    }
    let exe = std::env::current_exe().context("cannot locate nfmgr's own executable")?;
    Ok(exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".")))
}

fn find_binary(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        return Ok(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&paths) {
            let p = d.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "cannot find {name} next to nfmgr ({}) or on PATH; build the workspace (cargo build --release) or set manager.bin_dir",
        dir.display()
    )
}

/// Blocks SIGINT and SIGTERM in this thread (and threads spawned later) and returns a
/// signalfd that reports them.
fn termination_signals() -> Result<SignalFd> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .context("cannot block termination signals")?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).context("signalfd")
}

fn pin_current_thread(core: usize) {
    let mut set = CpuSet::new();
    if set.set(core).is_ok() {
        if let Err(e) = sched_setaffinity(Pid::from_raw(0), &set) {
            tracing::warn!(core, error = %e, "cannot pin the data-plane thread");
        }
    }
}

/// Builds every runtime's chain once, so a bad function setting is an error at start (naming
/// its key) rather than a runtime that keeps failing to start.
fn check_chains(cfg: &Config) -> Result<()> {
    let registry = nfs::registry();
    for r in &cfg.runtimes {
        let Some(chain) = cfg.chain_of(r) else {
            continue;
        };
        let peers: Vec<&str> = cfg
            .runtimes
            .iter()
            .filter(|p| cfg.chain_of(p) == Some(chain))
            .map(|p| p.name.as_str())
            .collect();
        let index = peers.iter().position(|n| *n == r.name).unwrap_or(0) as u32;
        registry.build_chain(cfg, chain, &r.name, index, peers.len() as u32)?;
    }
    Ok(())
}

/// The user and group runtimes and vswitches switch to before their first packet
/// (`supervisor.user`; `nflib::sandbox`), or None when they keep nfmgr's: nfmgr is not root
/// (they are unprivileged already), or the configuration says `"root"`.
fn data_path_user(cfg: &Config) -> Result<Option<RunAs>> {
    use nix::unistd::{geteuid, Group, Uid, User};
    let named = cfg.supervisor.user.as_deref();
    let wanted = named.unwrap_or("nobody");
    let user_gid = |uid: u32| {
        User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .map_or(uid, |u| u.gid.as_raw())
    };
    let ids: Option<(u32, u32)> = if wanted == "root" {
        None
    } else if let Some(r) = wanted
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)))
    {
        Some(r)
    } else if let Ok(uid) = wanted.parse::<u32>() {
        Some((uid, user_gid(uid)))
    } else if let Some(u) = User::from_name(wanted).ok().flatten() {
        Some((u.uid.as_raw(), u.gid.as_raw()))
    } else if named.is_none() {
        // The conventional overflow ids, where the system has no `nobody` entry.
        let gid = Group::from_name("nogroup")
            .ok()
            .flatten()
            .map_or(65534, |g: Group| g.gid.as_raw());
        Some((65534, gid))
    } else {
        bail!(
            "supervisor.user: no user `{wanted}` on this system (create one, e.g. `useradd --system --no-create-home nfactor`, or give UID:GID)"
        )
    };
    let me = geteuid();
    if !me.is_root() {
        return match (named, ids) {
            (Some(n), Some((uid, _))) if uid != me.as_raw() => bail!(
                "supervisor.user = `{n}` needs nfmgr to run as root (it runs as uid {me}); without root, runtimes and vswitches run as nfmgr's user"
            ),
            _ => Ok(None),
        };
    }
    let Some((uid, gid)) = ids else {
        tracing::warn!(
            "supervisor.user = \"root\": runtimes and vswitches keep root while they parse traffic"
        );
        return Ok(None);
    };
    if uid == 0 {
        bail!("supervisor.user: `{wanted}` is root; say \"root\" to keep the data path privileged");
    }
    Ok(Some(RunAs { uid, gid }))
}

/// The group of the monitoring socket (`manager.monitor_group`), if one is named; its
/// members must be able to reach the socket, so the run directory becomes searchable.
fn monitor_group(cfg: &Config) -> Result<Option<nix::unistd::Gid>> {
    use std::os::unix::fs::PermissionsExt;
    let Some(name) = &cfg.manager.monitor_group else {
        return Ok(None);
    };
    let gid = match name.parse::<u32>() {
        Ok(g) => nix::unistd::Gid::from_raw(g),
        Err(_) => match nix::unistd::Group::from_name(name).ok().flatten() {
            Some(g) => g.gid,
            None => bail!("manager.monitor_group: no group `{name}` on this system"),
        },
    };
    let dir = cfg.monitor_socket_path();
    if let Some(dir) = dir.parent() {
        if let Ok(md) = std::fs::metadata(dir) {
            let mode = md.permissions().mode() & 0o7777;
            if mode & 0o011 != 0o011 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))
                    .with_context(|| {
                        format!(
                            "manager.monitor_group: cannot make {} searchable",
                            dir.display()
                        )
                    })?;
            }
        }
    }
    Ok(Some(gid))
}

/// The cluster's keys: `cluster.key_file` signs; it and `cluster.accept_key_files`
/// verify (a rotation: docs/SECURITY.md).
pub struct ClusterKeys {
    pub sign: Vec<u8>,
    pub accept: Vec<Vec<u8>>,
}

impl ClusterKeys {
    /// Every key the cluster accepts, the signing one first.
    pub fn all(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.sign.as_slice()).chain(self.accept.iter().map(Vec::as_slice))
    }

    /// The managers' handshake keys, the signing one first.
    pub fn auth_keys(&self) -> Vec<control::peer::AuthKey> {
        self.all().map(control::peer::AuthKey::derive).collect()
    }

    /// The keys of actor and data frames between servers.
    pub fn frame_keys(&self) -> nflib::frame::auth::FrameKeys {
        use nflib::frame::auth::{FrameKey, FrameKeys};
        FrameKeys::new(
            FrameKey::derive(&self.sign),
            self.accept.iter().map(|k| FrameKey::derive(k)).collect(),
        )
    }

    /// A short fingerprint of the signing key for logs and events (not the key: a keyed
    /// hash of it that reveals nothing of it).
    pub fn sign_id(&self) -> String {
        let h = blake3::derive_key("nfactor 2026-12 cluster key fingerprint", &self.sign);
        h[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Reads the cluster keys of `cfg`, or None when it has no `cluster.key_file`.
pub fn load_cluster_keys(cfg: &Config) -> Result<Option<ClusterKeys>> {
    let Some(path) = &cfg.cluster.key_file else {
        if !cfg.cluster.accept_key_files.is_empty() {
            bail!("cluster.accept_key_files: needs cluster.key_file (the key that signs)");
        }
        return Ok(None);
    };
    let sign = load_key(&cfg.base_dir.join(path), "cluster.key_file")?;
    let mut accept = Vec::new();
    for p in &cfg.cluster.accept_key_files {
        let k = load_key(&cfg.base_dir.join(p), "cluster.accept_key_files")?;
        if k != sign && !accept.contains(&k) {
            accept.push(k);
        }
    }
    Ok(Some(ClusterKeys { sign, accept }))
}

/// Reads one cluster key: 64 hex digits are 32 bytes, anything else is taken as raw bytes
/// (at least 16).
fn load_key(path: &Path, what: &str) -> Result<Vec<u8>> {
    let raw =
        std::fs::read(path).with_context(|| format!("{what}: cannot read {}", path.display()))?;
    let text = String::from_utf8_lossy(&raw);
    let t = text.trim();
    let key = if t.len() >= 32 && t.len() % 2 == 0 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..t.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&t[i..i + 2], 16).unwrap_or(0))
            .collect()
    } else {
        raw
    };
    if key.len() < 16 {
        bail!(
            "{what}: {} holds {} bytes; a cluster key needs at least 16 (e.g. `head -c 32 /dev/urandom | xxd -p -c 64`)",
            path.display(),
            key.len()
        );
    }
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "cluster key {} is readable by other users; chmod 600 it",
                path.display()
            );
        }
    }
    Ok(key)
}

fn run(cfg: Config, demo: bool) -> Result<()> {
    check_chains(&cfg)?;
    let mut instance = Instance::acquire(&cfg.instance, &cfg.run_dir())?;
    let result = run_instance(&cfg, &mut instance, demo);
    instance.release();
    result
}

fn build_ports(
    cfg: &Config,
    region: &Region,
    pool: &mut ManagerPool,
    // A vswitch's slot, and the slots the frames it receives reach.
    vswitch_of: &dyn Fn(&str) -> (u16, u64),
) -> Result<Vec<PortSlot>> {
    let mut ports = Vec::new();
    let mut flow_base = 0u32;
    for (i, pc) in cfg.ports.iter().enumerate() {
        let spec = PortSpec::parse(&pc.spec, &cfg.base_dir)?;
        let key = format!("port.{}", pc.name);
        let port: Box<dyn Port> = match &spec {
            PortSpec::AfPacket(iface) => Box::new(
                ports::afpacket::AfPacket::open(
                    iface,
                    pc.ring_frames.unwrap_or(4096),
                    region.config().data_room() as usize,
                )
                .with_context(|| format!("{key}: cannot open afpacket:{iface}"))?,
            ),
            PortSpec::Generator => {
                let flows = pc.flows.unwrap_or(1);
                let mut g = ports::generator::Generator::new(
                    flow_base,
                    flows,
                    pc.rate_pps.unwrap_or(0.0),
                    pc.packet_size.unwrap_or(64) as usize,
                    pc.duration_ms.filter(|d| *d > 0).map(Duration::from_millis),
                );
                if let Some(mode) = pc.new_flows {
                    g = g.new_flows(mode);
                }
                if let Some(ms) = pc.start_after_ms.filter(|ms| *ms > 0) {
                    g = g.start_after(Duration::from_millis(ms));
                }
                flow_base += flows;
                Box::new(g)
            }
            PortSpec::Sink => Box::new(ports::sink::Sink::new()),
            PortSpec::Pcap(path) => Box::new(
                ports::pcap::Replay::open(
                    path,
                    pc.speed.unwrap_or_default(),
                    pc.rate_pps,
                    pc.loops.unwrap_or(1),
                )
                .with_context(|| key.clone())?,
            ),
            PortSpec::Null => Box::new(ports::NullPort),
            #[cfg(feature = "dpdk")]
            PortSpec::Dpdk(device) => Box::new(
                ports::dpdk::DpdkPort::open(cfg, region, pool, device)
                    .with_context(|| format!("{key}: dpdk:{device}"))?,
            ),
            #[cfg(not(feature = "dpdk"))]
            PortSpec::Dpdk(device) => {
                let _ = &pool;
                bail!(
                    "{key}: dpdk:{device}: this nfmgr was built without DPDK (build it with \
                     `cargo build --release --features dpdk`, which needs libdpdk-dev)"
                )
            }
        };
        let recorder = match &pc.record {
            Some(path) => Some(
                ports::pcap::Recorder::create(&cfg.base_dir.join(path))
                    .with_context(|| format!("{key}.record"))?,
            ),
            None => None,
        };
        if let Some(rec) = region.port(i as u16) {
            rec.kind
                .store(port.kind().raw(), std::sync::atomic::Ordering::Relaxed);
            rec.name.set(&pc.name);
        }
        let egress = pc
            .to
            .as_ref()
            .and_then(|to| cfg.ports.iter().position(|p| &p.name == to))
            .map(|x| x as u8);
        let (vswitch, reaches) =
            vswitch_of(pc.vswitch.as_deref().unwrap_or(&cfg.vswitches[0].name));
        ports.push(PortSlot {
            name: pc.name.clone(),
            port,
            egress,
            vswitch,
            reaches,
            recorder,
            counters: LocalCounters::default(),
        });
    }
    Ok(ports)
}

fn run_instance(cfg: &Config, instance: &mut Instance, demo: bool) -> Result<()> {
    let started = Instant::now();
    if cfg.cluster.store == nflib::config::ClusterStore::Etcd && !control::store::Store::BUILT {
        bail!(
            "cluster.store = \"etcd\": this nfmgr was built without the etcd client (build \
             it with `cargo build --release --features nf-manager/etcd`, which needs \
             protobuf-compiler)"
        );
    }
    let cluster_keys = load_cluster_keys(cfg)?;
    // Bind what others connect to before anything starts, so a taken address is a clear
    // error at start.
    let listener = match &cfg.cluster.listen {
        Some(a) => Some(
            std::net::TcpListener::bind(a)
                .with_context(|| format!("cluster.listen: cannot listen on {a}"))?,
        ),
        None => None,
    };
    let metrics_listener = match &cfg.manager.metrics_listen {
        Some(a) => Some(
            std::net::TcpListener::bind(a)
                .with_context(|| format!("manager.metrics_listen: cannot listen on {a}"))?,
        ),
        None => None,
    };
    let region_cfg = cfg.region_config();
    let layout = Layout::new(region_cfg)?;
    let placement = hugepages::place(
        cfg.region.hugepages,
        &cfg.hugepages_conf_path(),
        &cfg.region.dir,
        layout.total_size,
    )?;
    if hugepages::memory_backed(placement.dir()) == Some(false) {
        tracing::warn!(
            "region.dir {} is on a disk file system: the kernel will write the shared packet \
             buffers back to disk and fault on writes after each writeback; use a tmpfs such \
             as /dev/shm (the default) or hugetlbfs",
            placement.dir().display()
        );
    }
    let region_path = placement
        .dir()
        .join(instance::region_file_name(&cfg.instance));
    instance.claim_region_path(&region_path)?;
    let region = Region::create(&CreateOptions {
        path: region_path.clone(),
        config: region_cfg,
        instance: cfg.instance.clone(),
        page_size: placement.page_size(),
        hugetlbfs: matches!(placement, hugepages::Placement::Hugetlbfs { .. }),
    })?;
    tracing::info!(
        instance = %cfg.instance,
        size_mib = layout.total_size >> 20,
        buffers = region_cfg.buffers,
        "region in {}",
        placement.describe()
    );
    if !region.write_blob(cfg.frozen().as_bytes()) {
        bail!("the configuration does not fit the region's configuration area");
    }
    let bells = Arc::new(Doorbells::create(&region)?);

    // Slots: 1.. for vswitches, then runtimes.
    let bins = bin_dir(cfg)?;
    let mut specs = Vec::new();
    let mut next_slot = 1u16;
    let slot_of_vswitch = |name: &str| -> u16 {
        1 + cfg
            .vswitches
            .iter()
            .position(|v| v.name == name)
            .unwrap_or(0) as u16
    };
    let runtime_base = 1 + cfg.vswitches.len() as u16;
    let slot_of_runtime = |name: &str| -> Option<u16> {
        cfg.runtimes
            .iter()
            .position(|r| r.name == name)
            .map(|i| runtime_base + i as u16)
    };
    let core_pool = cfg
        .manager
        .cores
        .as_deref()
        .map(parse_cpu_list)
        .transpose()?
        .unwrap_or_default();
    let mut next_core = 0usize;
    let mut assign_core = |explicit: Option<usize>| -> Option<usize> {
        explicit.or_else(|| {
            if core_pool.is_empty() {
                return None;
            }
            let c = core_pool[next_core % core_pool.len()];
            next_core += 1;
            Some(c)
        })
    };
    let idle = cfg.manager.idle_poll_us.to_string();
    // Every runtime and vswitch enters the same sandbox before its first packet.
    let mut sandbox = vec!["--seccomp".to_string(), cfg.supervisor.seccomp.to_string()];
    if let Some(r) = data_path_user(cfg)? {
        sandbox.extend(["--run-as".to_string(), r.to_string()]);
    }
    // The runtimes each vswitch feeds, by its slot.
    let targets_of = |v: &nflib::config::VswitchConfig| match &v.runtimes {
        Some(list) => list
            .iter()
            .filter_map(|n| slot_of_runtime(n))
            .fold(0u64, |m, s| m | 1 << s),
        None => (0..cfg.runtimes.len() as u16).fold(0u64, |m, i| m | 1 << (runtime_base + i)),
    };
    for v in &cfg.vswitches {
        let targets = targets_of(v);
        specs.push(ProcSpec {
            slot: next_slot,
            name: v.name.clone(),
            kind: ProcessKind::Vswitch,
            binary: find_binary(&bins, "nf-vswitch")?,
            args: vec![
                "--region".into(),
                region_path.display().to_string(),
                "--slot".into(),
                next_slot.to_string(),
                "--idle-poll-us".into(),
                idle.clone(),
            ]
            .into_iter()
            .chain(sandbox.iter().cloned())
            .collect(),
            core: assign_core(v.core),
            busy_poll: v.busy_poll,
            targets,
        });
        next_slot += 1;
    }
    for r in &cfg.runtimes {
        specs.push(ProcSpec {
            slot: next_slot,
            name: r.name.clone(),
            kind: ProcessKind::Runtime,
            binary: find_binary(&bins, "nf-runtime")?,
            args: vec![
                "--region".into(),
                region_path.display().to_string(),
                "--slot".into(),
                next_slot.to_string(),
                "--idle-poll-us".into(),
                idle.clone(),
            ]
            .into_iter()
            .chain(sandbox.iter().cloned())
            .collect(),
            core: assign_core(r.core),
            busy_poll: r.busy_poll,
            targets: 1,
        });
        next_slot += 1;
    }
    // Termination signals are blocked before any thread starts (DPDK's EAL starts some when
    // a port opens), so that they all reach the supervisor's signalfd.
    let signals = termination_signals()?;
    let mut pool = ManagerPool::new(&region, region_cfg.pool_ring_size / 2);
    // A port's frames reach its vswitch and the runtimes that vswitch feeds.
    let reaches = |name: &str| {
        let slot = slot_of_vswitch(name);
        let targets = cfg
            .vswitches
            .iter()
            .find(|v| v.name == name)
            .map_or(0, targets_of);
        (slot, targets | 1 << slot)
    };
    let ports = build_ports(cfg, &region, &mut pool, &reaches)?;
    let (cmd_tx, cmd_rx) = HeapRb::<Command>::new(256).split();
    let (ev_tx, ev_rx) = HeapRb::<dataplane::PlaneEvent>::new(1024).split();
    let event_bell = Arc::new(
        EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).context("eventfd")?,
    );
    region.mark_ready();

    // nfmgr's control endpoint and the relay between servers (data-plane thread), and the
    // control thread that drives the cluster.
    let incarnation = nflib::time::wall_ns();
    let (ctl_tx, ctl_rx) = std::sync::mpsc::channel();
    let (relay_tx, relay_rx) = std::sync::mpsc::channel();
    let cluster_port = cfg
        .cluster
        .port
        .as_ref()
        .and_then(|p| cfg.ports.iter().position(|q| &q.name == p));
    let relay = relay::Relay::new(
        cfg.cluster.server_id,
        cluster_keys.as_ref().map(ClusterKeys::frame_keys),
        cluster_port,
        nflib::mailbox::Mailbox::new(
            nflib::frame::EndpointAddr::new(cfg.cluster.server_id, nflib::MANAGER_SLOT),
            incarnation,
            cfg.cluster.transport(),
        ),
    )
    .with_channels(
        {
            let tx = ctl_tx.clone();
            Box::new(move |e| {
                let _ = tx.send(control::Event::Relay(e));
            })
        },
        relay_rx,
    )
    .with_link_watch(linkwatch::LinkWatch::new(
        cfg.cluster.link_beat_ms,
        cfg.cluster.link_misses,
        nflib::time::mono_ns(),
    ));
    // The supervisor's pidfds, by slot: the control thread kills through them.
    let pidfds = supervisor::Pidfds::default();
    let control = control::Control::new(
        cfg.clone(),
        region.clone(),
        bells.clone(),
        relay_tx,
        ctl_tx.clone(),
        incarnation,
        cluster_keys.as_ref(),
    )
    .context("cannot start the etcd client (cluster.store = \"etcd\")")?
    .with_pidfds(pidfds.clone());
    let handle = control.handle();
    let socket_path = cfg.control_socket_path();
    control::socket::serve(&socket_path, handle.clone(), Access::Admin, None).with_context(
        || {
            format!(
                "cannot create the control socket {} (manager.control_socket)",
                socket_path.display()
            )
        },
    )?;
    let monitor_path = cfg.monitor_socket_path();
    let monitor_group = monitor_group(cfg)?;
    control::socket::serve(
        &monitor_path,
        handle.clone(),
        Access::Monitor,
        monitor_group,
    )
    .with_context(|| {
        format!(
            "cannot create the monitoring socket {} (manager.monitor_group)",
            monitor_path.display()
        )
    })?;
    if let Some(l) = metrics_listener {
        control::metrics::serve(l, handle.clone()).context("cannot start the metrics server")?;
    }
    let control_thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || control.run(ctl_rx, listener))
        .context("cannot start the control thread")?;

    let dp = Dataplane::new(
        &region,
        pool,
        bells.clone(),
        ports,
        Channels {
            commands: cmd_rx,
            events: ev_tx,
            event_bell: event_bell.clone(),
        },
        dataplane::Options {
            poll_for: Duration::from_micros(cfg.manager.idle_poll_us),
            busy_poll: cfg.manager.busy_poll,
            publish_every: Duration::from_millis(cfg.manager.stats_interval_ms),
        },
        relay,
    );
    let dp_core = cfg.manager.core;
    let dp_thread = std::thread::Builder::new()
        .name("dataplane".into())
        .spawn(move || {
            if let Some(c) = dp_core {
                pin_current_thread(c);
            }
            // A panic here (a bug) would leave nfmgr up with no packet moving and the
            // supervisor waiting for reclaims that never come. Fail loudly instead: the
            // process exits, its children follow (their parent-death signal), and the next
            // `nfmgr start` (by hand or by systemd) cleans up the region, as after a crash.
            // docs/SECURITY.md says how this meets nfmgr's own restart, later.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dp.run())) {
                Ok(outcome) => outcome,
                Err(_) => {
                    tracing::error!(
                        "the data-plane thread panicked: nfmgr exits (its processes with it); \
                         start it again to recover"
                    );
                    eprintln!("nfmgr: the data-plane thread panicked; exiting");
                    std::process::exit(70);
                }
            }
        })
        .context("cannot start the data-plane thread")?;

    let mut sup = Supervisor::new(
        cfg.clone(),
        region.clone(),
        bells.clone(),
        specs,
        cmd_tx,
        ev_rx,
        event_bell,
        signals,
    )
    .with_pidfds(pidfds);
    let to_control = ctl_tx.clone();
    sup.observe(move |e| {
        let _ = to_control.send(control::Event::Process(e.clone()));
    });
    sup.start_all();
    let mut live = nf_tui::LiveRates::new();
    let print_rates = cfg.manager.log_rates;
    sup.run(|r| {
        let line = live.tick(r);
        if print_rates && !line.is_empty() {
            println!("{line}");
        }
    });
    let _ = ctl_tx.send(control::Event::Shutdown);
    let _ = control_thread.join();
    let _ = std::fs::remove_file(&socket_path);
    let _ = std::fs::remove_file(&monitor_path);
    sup.stop_all();
    sup.shutdown_dataplane();
    let outcome = dp_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the data-plane thread panicked"))?;

    let snap = RegionSnapshot::read(&region);
    let report = serde_json::json!({
        "instance": cfg.instance,
        "uptime_s": started.elapsed().as_secs_f64(),
        "deaths": sup.deaths,
        "restarts": sup.restarts,
        "snapshot": snap,
        "ports": outcome.ports.iter().map(|(n, r)| (n.clone(), r.clone().unwrap_or_default())).collect::<serde_json::Map<_, _>>(),
        "events": sup.log,
    });
    if let Some(path) = &cfg.manager.report {
        let path = cfg.base_dir.join(path);
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write report {}", path.display()))?;
    }
    if demo || print_rates {
        println!("\n{}", nf_tui::summary(&snap, &outcome.ports));
    }
    if snap.pool.in_use != 0 {
        tracing::warn!(in_use = snap.pool.in_use, "buffers still in use at exit");
    }
    Ok(())
}
