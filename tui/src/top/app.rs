//! The dashboard's own state (view, selection, filter, sort, dialogs) and what keys do to it.
//! Pure: a key and the current model in, an optional [`Action`] out; the run loop carries
//! actions out (control-socket requests), so every key is testable without a terminal.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use nflib::slot::{ProcessKind, SlotState};

use super::model::{Model, ProcRow};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Overview,
    Processes,
    Chains,
    Migrations,
    Events,
    Cluster,
}

impl View {
    pub const ALL: [View; 6] = [
        View::Overview,
        View::Processes,
        View::Chains,
        View::Migrations,
        View::Events,
        View::Cluster,
    ];

    pub fn title(self) -> &'static str {
        match self {
            View::Overview => "Overview",
            View::Processes => "Processes",
            View::Chains => "Chains",
            View::Migrations => "Migrations",
            View::Events => "Events",
            View::Cluster => "Cluster",
        }
    }

    fn index(self) -> usize {
        View::ALL.iter().position(|v| *v == self).unwrap_or(0)
    }
}

/// Columns the process table sorts by (`s` cycles, `r` reverses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    Server,
    Name,
    Kind,
    State,
    Rx,
    Tx,
    Drops,
    Flows,
    Busy,
}

impl SortKey {
    const ORDER: [SortKey; 9] = [
        SortKey::Server,
        SortKey::Name,
        SortKey::Kind,
        SortKey::State,
        SortKey::Rx,
        SortKey::Tx,
        SortKey::Drops,
        SortKey::Flows,
        SortKey::Busy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SortKey::Server => "server",
            SortKey::Name => "name",
            SortKey::Kind => "kind",
            SortKey::State => "state",
            SortKey::Rx => "rx",
            SortKey::Tx => "tx",
            SortKey::Drops => "drops",
            SortKey::Flows => "flows",
            SortKey::Busy => "busy",
        }
    }

    fn next(self) -> SortKey {
        let i = SortKey::ORDER.iter().position(|k| *k == self).unwrap_or(0);
        SortKey::ORDER[(i + 1) % SortKey::ORDER.len()]
    }
}

/// Flow counts the migration dialog offers (`None`: all of them).
pub const MIGRATE_COUNTS: [Option<u32>; 6] =
    [None, Some(1), Some(10), Some(100), Some(1000), Some(10_000)];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dialog {
    Help,
    /// Typing a filter (the text so far).
    Filter(String),
    ConfirmKill {
        spec: String,
        pid: u32,
    },
    Migrate {
        from: String,
        chain: String,
        targets: Vec<String>,
        target: usize,
        count: usize,
    },
}

/// What the run loop must do for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Quit,
    Kill(String),
    Migrate {
        from: String,
        to: String,
        flows: Option<u32>,
    },
}

#[derive(Clone, Debug)]
pub struct App {
    pub view: View,
    pub frozen: bool,
    pub filter: String,
    pub sort: SortKey,
    pub reverse: bool,
    /// Index into [`App::visible_procs`].
    pub selected: usize,
    pub dialog: Option<Dialog>,
    /// The outcome of the last action, shown in the footer.
    pub notice: Option<String>,
}

impl Default for App {
    fn default() -> Self {
        App {
            view: View::Overview,
            frozen: false,
            filter: String::new(),
            sort: SortKey::Server,
            reverse: false,
            selected: 0,
            dialog: None,
            notice: None,
        }
    }
}

fn state_rank(s: SlotState) -> u8 {
    match s {
        SlotState::Running => 0,
        SlotState::Starting => 1,
        SlotState::Stopping => 2,
        SlotState::Dead => 3,
        SlotState::Failed => 4,
        SlotState::Free => 5,
    }
}

fn kind_rank(k: ProcessKind) -> u8 {
    match k {
        ProcessKind::Manager => 0,
        ProcessKind::Vswitch => 1,
        ProcessKind::Runtime => 2,
        _ => 3,
    }
}

impl App {
    pub fn matches(&self, text: &str) -> bool {
        self.filter.is_empty() || text.to_lowercase().contains(&self.filter.to_lowercase())
    }

    fn proc_matches(&self, p: &ProcRow) -> bool {
        if self.filter.is_empty() {
            return true;
        }
        let text = format!(
            "{} {:?} {:?} {}",
            p.spec(),
            p.kind,
            p.state,
            p.chain.as_deref().unwrap_or("")
        );
        self.matches(&text)
    }

    /// The process rows shown: filtered, then sorted.
    pub fn visible_procs<'a>(&self, model: &'a Model) -> Vec<&'a ProcRow> {
        let mut v: Vec<&ProcRow> = model
            .procs
            .iter()
            .filter(|p| self.proc_matches(p))
            .collect();
        let f = |x: f64| (x * 1000.0) as i64;
        v.sort_by(|a, b| {
            let natural =
                (a.server, kind_rank(a.kind), a.slot).cmp(&(b.server, kind_rank(b.kind), b.slot));
            let by = match self.sort {
                SortKey::Server => std::cmp::Ordering::Equal,
                SortKey::Name => a.name.cmp(&b.name),
                SortKey::Kind => kind_rank(a.kind).cmp(&kind_rank(b.kind)),
                SortKey::State => state_rank(a.state).cmp(&state_rank(b.state)),
                // Numbers sort largest first: that is what one looks for.
                SortKey::Rx => f(b.rx_pps).cmp(&f(a.rx_pps)),
                SortKey::Tx => f(b.tx_pps).cmp(&f(a.tx_pps)),
                SortKey::Drops => {
                    f(b.drops_ps + b.input_drops_ps).cmp(&f(a.drops_ps + a.input_drops_ps))
                }
                SortKey::Flows => b.flows.cmp(&a.flows),
                SortKey::Busy => f(b.busy_pct).cmp(&f(a.busy_pct)),
            };
            let o = by.then(natural);
            if self.reverse {
                o.reverse()
            } else {
                o
            }
        });
        v
    }

    pub fn selected_proc<'a>(&self, model: &'a Model) -> Option<&'a ProcRow> {
        self.visible_procs(model).get(self.selected).copied()
    }

    /// Keeps the selection inside the list after the model changed.
    pub fn clamp(&mut self, model: &Model) {
        let n = self.visible_procs(model).len();
        self.selected = self.selected.min(n.saturating_sub(1));
    }

    pub fn update(&mut self, key: KeyEvent, model: &Model) -> Option<Action> {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Some(Action::Quit);
        }
        if let Some(d) = self.dialog.take() {
            return self.dialog_key(d, key);
        }
        match key.code {
            KeyCode::Char('q') => return Some(Action::Quit),
            KeyCode::Char('?') | KeyCode::F(1) => self.dialog = Some(Dialog::Help),
            KeyCode::Char(' ') => {
                self.frozen = !self.frozen;
            }
            KeyCode::Tab => self.view = View::ALL[(self.view.index() + 1) % View::ALL.len()],
            KeyCode::BackTab => {
                self.view = View::ALL[(self.view.index() + View::ALL.len() - 1) % View::ALL.len()]
            }
            KeyCode::Char(c @ '1'..='6') => {
                self.view = View::ALL[(c as u8 - b'1') as usize];
            }
            KeyCode::Char('/') => self.dialog = Some(Dialog::Filter(self.filter.clone())),
            KeyCode::Esc if !self.filter.is_empty() => self.filter.clear(),
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('r') | KeyCode::Char('S') => self.reverse = !self.reverse,
            KeyCode::Down => self.selected += 1,
            KeyCode::Up => self.selected = self.selected.saturating_sub(1),
            KeyCode::PageDown => self.selected += 10,
            KeyCode::PageUp => self.selected = self.selected.saturating_sub(10),
            KeyCode::Home => self.selected = 0,
            KeyCode::End => self.selected = usize::MAX,
            KeyCode::Char('k') => self.ask_kill(model),
            KeyCode::Char('m') => self.ask_migrate(model),
            _ => {}
        }
        self.clamp(model);
        None
    }

    fn ask_kill(&mut self, model: &Model) {
        let Some(p) = self.selected_proc(model) else {
            self.notice = Some("select a runtime first (up/down)".into());
            return;
        };
        if !matches!(p.kind, ProcessKind::Runtime | ProcessKind::Vswitch) {
            self.notice = Some(format!(
                "{} is nfmgr itself: only runtimes and vswitches can be killed",
                p.spec()
            ));
            return;
        }
        if p.state != SlotState::Running {
            self.notice = Some(format!("{} is not running", p.spec()));
            return;
        }
        self.dialog = Some(Dialog::ConfirmKill {
            spec: p.spec(),
            pid: p.pid,
        });
    }

    fn ask_migrate(&mut self, model: &Model) {
        let Some(p) = self.selected_proc(model) else {
            self.notice = Some("select the source runtime first (up/down)".into());
            return;
        };
        let (ProcessKind::Runtime, Some(chain)) = (p.kind, &p.chain) else {
            self.notice = Some(format!(
                "{} is not a runtime: flows migrate between runtimes",
                p.spec()
            ));
            return;
        };
        let targets: Vec<String> = model
            .procs
            .iter()
            .filter(|q| q.kind == ProcessKind::Runtime && q.state == SlotState::Running)
            .filter(|q| q.chain.as_ref() == Some(chain) && q.spec() != p.spec())
            .map(|q| q.spec())
            .collect();
        if targets.is_empty() {
            self.notice = Some(format!("no other running runtime serves chain {chain}"));
            return;
        }
        self.dialog = Some(Dialog::Migrate {
            from: p.spec(),
            chain: chain.clone(),
            targets,
            target: 0,
            count: 0,
        });
    }

    fn dialog_key(&mut self, d: Dialog, key: KeyEvent) -> Option<Action> {
        match d {
            Dialog::Help => {
                // Any key closes the help; q also quits.
                if key.code == KeyCode::Char('q') {
                    return Some(Action::Quit);
                }
            }
            Dialog::Filter(mut text) => match key.code {
                KeyCode::Enter => {
                    self.filter = text;
                    self.selected = 0;
                }
                KeyCode::Esc => {
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    text.pop();
                    self.dialog = Some(Dialog::Filter(text));
                }
                KeyCode::Char(c) => {
                    text.push(c);
                    self.dialog = Some(Dialog::Filter(text));
                }
                _ => self.dialog = Some(Dialog::Filter(text)),
            },
            Dialog::ConfirmKill { spec, pid } => match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => {
                    self.notice = Some(format!("killing {spec} (pid {pid})..."));
                    return Some(Action::Kill(spec));
                }
                KeyCode::Char('n') | KeyCode::Esc | KeyCode::Char('q') => {
                    self.notice = Some("kill cancelled".into());
                }
                _ => self.dialog = Some(Dialog::ConfirmKill { spec, pid }),
            },
            Dialog::Migrate {
                from,
                chain,
                targets,
                mut target,
                mut count,
            } => {
                match key.code {
                    KeyCode::Char('y') | KeyCode::Char('Y') | KeyCode::Enter => {
                        let to = targets.get(target).cloned().unwrap_or_default();
                        let flows = MIGRATE_COUNTS[count];
                        self.notice = Some(format!("migrating from {from} to {to}..."));
                        return Some(Action::Migrate { from, to, flows });
                    }
                    KeyCode::Char('n') | KeyCode::Esc | KeyCode::Char('q') => {
                        self.notice = Some("migration cancelled".into());
                        return None;
                    }
                    KeyCode::Right | KeyCode::Tab => target = (target + 1) % targets.len().max(1),
                    KeyCode::Left | KeyCode::BackTab => {
                        target = (target + targets.len().max(1) - 1) % targets.len().max(1)
                    }
                    KeyCode::Char('+') | KeyCode::Up => count = (count + 1) % MIGRATE_COUNTS.len(),
                    KeyCode::Char('-') | KeyCode::Down => {
                        count = (count + MIGRATE_COUNTS.len() - 1) % MIGRATE_COUNTS.len()
                    }
                    _ => {}
                }
                self.dialog = Some(Dialog::Migrate {
                    from,
                    chain,
                    targets,
                    target,
                    count,
                });
            }
        }
        None
    }
}

/// Every key, for the help screen (the README's list comes from the same place).
pub const KEYS: &[(&str, &str)] = &[
    ("q, Ctrl-C", "quit"),
    ("?", "this help"),
    ("Tab, Shift-Tab", "next, previous view"),
    (
        "1..6",
        "Overview Processes Chains Migrations Events Cluster",
    ),
    ("space", "freeze the display (again: live)"),
    ("/", "filter processes, events (Enter keeps, Esc clears)"),
    ("s, r", "sort processes by the next column; reverse"),
    ("Up Down PgUp PgDn", "select a process"),
    ("k", "kill the selected runtime or vswitch (asks first)"),
    ("m", "migrate flows from the selected runtime (asks)"),
];
