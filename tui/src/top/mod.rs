//! `nfmgr top`: the live terminal dashboard.
//!
//! - [`model`]: what is shown, computed from consecutive control-socket answers (pure);
//! - [`app`]: the dashboard's own state and what each key does to it (pure);
//! - [`render`]: drawing, a pure function of the two;
//! - this module: the terminal, the loop, and the threads that talk to nfmgr.
//!
//! A fetcher thread asks nfmgr for `top` once a second; a lost nfmgr shows on screen and is
//! retried at the same pace. Drill actions (kill, migrate) run on their own threads so the
//! screen never waits for them. The terminal is restored on quit, on SIGTERM, SIGINT or
//! SIGHUP, and on a panic (ratatui's hook).

pub mod app;
pub mod model;
pub mod render;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use ratatui::crossterm::event::{self, Event, KeyEventKind};
use serde_json::json;

use app::{Action, App};
use model::Model;
use nflib::control_client::ClientError;
use nflib::top::TopReport;

pub struct Options {
    pub socket: PathBuf,
    /// How often to ask nfmgr.
    pub interval: Duration,
}

/// Why the dashboard stopped (or never started).
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("nfmgr top needs a terminal (use `nfmgr status --json` in scripts)")]
    NotATerminal,
    #[error("cannot block signals: {0}")]
    BlockSignals(#[source] nix::Error),
    /// A thread of its own (signals, fetching) did not start.
    #[error(transparent)]
    Thread(std::io::Error),
    #[error("cannot draw: {0}")]
    Draw(#[source] std::io::Error),
    /// The terminal's input could not be read.
    #[error(transparent)]
    Input(std::io::Error),
}

/// Why a `top` answer is missing: shown on screen, and asked again.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("unexpected answer: {0}")]
    Answer(#[source] serde_json::Error),
}

enum Msg {
    Report(Result<Box<TopReport>, FetchError>),
    /// A drill action finished: what to tell the operator.
    Done(String),
    Signal(Signal),
}

/// Runs the dashboard until the operator quits or a termination signal arrives.
pub fn run(opts: Options) -> Result<(), TopError> {
    if !std::io::stdout().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    // Termination signals are taken by a thread (sigwait), so they end the loop cleanly and
    // the terminal is restored; the mask is set before any thread starts so all inherit it.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)
        .map_err(TopError::BlockSignals)?;
    let (tx, rx) = mpsc::channel();
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("top-signals".into())
            .spawn(move || {
                if let Ok(sig) = signals.wait() {
                    let _ = tx.send(Msg::Signal(sig));
                    // After a hang-up crossterm may spin reading a closed terminal and never
                    // return to the loop: if the loop has not ended the process by now, this
                    // thread does.
                    std::thread::sleep(Duration::from_secs(2));
                    ratatui::restore();
                    eprintln!("nfmgr top: stopped by {sig}");
                    std::process::exit(0);
                }
            })
            .map_err(TopError::Thread)?;
    }
    let (refresh_tx, refresh_rx) = mpsc::channel::<()>();
    {
        let tx = tx.clone();
        let socket = opts.socket.clone();
        let interval = opts.interval;
        std::thread::Builder::new()
            .name("top-fetch".into())
            .spawn(move || fetch_loop(&socket, interval, &tx, &refresh_rx))
            .map_err(TopError::Thread)?;
    }
    let mut terminal = ratatui::init();
    let result = ui_loop(&mut terminal, &opts, &rx, &tx, &refresh_tx);
    ratatui::restore();
    if let Some(sig) = result? {
        eprintln!("nfmgr top: stopped by {sig}");
    }
    Ok(())
}

fn fetch_loop(
    socket: &std::path::Path,
    interval: Duration,
    tx: &Sender<Msg>,
    refresh: &Receiver<()>,
) {
    loop {
        let answer =
            nflib::control_client::call(socket, &json!({ "cmd": "top" }), Duration::from_secs(3))
                .map_err(FetchError::from)
                .and_then(|v| {
                    serde_json::from_value::<TopReport>(v)
                        .map(Box::new)
                        .map_err(FetchError::Answer)
                });
        if tx.send(Msg::Report(answer)).is_err() {
            return;
        }
        match refresh.recv_timeout(interval) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn act(socket: PathBuf, action: Action, tx: Sender<Msg>, refresh: Sender<()>) {
    let _ = std::thread::Builder::new()
        .name("top-action".into())
        .spawn(move || {
            let text = match action {
                Action::Kill(spec) => {
                    match nflib::control_client::call(
                        &socket,
                        &json!({ "cmd": "kill", "process": spec }),
                        Duration::from_secs(5),
                    ) {
                        Ok(_) => {
                            format!("{spec} killed; watch its recovery in the Migrations view")
                        }
                        Err(e) => format!("kill {spec} failed: {e}"),
                    }
                }
                Action::Migrate { from, to, flows } => {
                    let mut req =
                        json!({ "cmd": "migrate", "from": from, "to": to, "timeout_s": 60.0 });
                    if let Some(n) = flows {
                        req["flows"] = json!(n);
                    }
                    let _ = refresh.send(());
                    match nflib::control_client::call(&socket, &req, Duration::from_secs(65)) {
                        Ok(v) => format!(
                        "migrated {} flows from {from} to {to} in {:.1} ms ({} groups rolled back)",
                        v["moved"],
                        v["ms"].as_f64().unwrap_or(0.0),
                        v["groups_rolled_back"]
                    ),
                        Err(e) => format!("migration from {from} to {to} failed: {e}"),
                    }
                }
                Action::Quit => return,
            };
            let _ = tx.send(Msg::Done(text));
            let _ = refresh.send(());
        });
}

fn ui_loop(
    terminal: &mut ratatui::DefaultTerminal,
    opts: &Options,
    rx: &Receiver<Msg>,
    tx: &Sender<Msg>,
    refresh: &Sender<()>,
) -> Result<Option<Signal>, TopError> {
    let mut app = App::default();
    let mut model = Model::default();
    let mut dirty = true;
    let mut last_draw = Instant::now();
    loop {
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Report(Ok(r)) if !app.frozen => model.update(*r),
                Msg::Report(Ok(_)) => model.link = model::Link::Up,
                Msg::Report(Err(e)) => model.lost(e.to_string()),
                Msg::Done(text) => app.notice = Some(text),
                Msg::Signal(sig) => return Ok(Some(sig)),
            }
            app.clamp(&model);
            dirty = true;
        }
        // Redrawn on change, and once a second for the ages shown.
        if dirty || last_draw.elapsed() >= Duration::from_secs(1) {
            terminal
                .draw(|f| render::draw(f, &app, &model))
                .map_err(TopError::Draw)?;
            dirty = false;
            last_draw = Instant::now();
        }
        if event::poll(Duration::from_millis(100)).map_err(TopError::Input)? {
            match event::read().map_err(TopError::Input)? {
                Event::Key(k) if k.kind == KeyEventKind::Press => {
                    match app.update(k, &model) {
                        Some(Action::Quit) => return Ok(None),
                        Some(a) => act(opts.socket.clone(), a, tx.clone(), refresh.clone()),
                        None => {}
                    }
                    dirty = true;
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
    }
}
