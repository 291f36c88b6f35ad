//! Drawing the dashboard: a pure function of the [`App`] and the [`Model`], so every view is
//! tested at fixed sizes from fixed data (ratatui's `TestBackend`).
//!
//! Every view fits 80x24; wider terminals (120 columns and up) get more columns, taller
//! ones more panels.

use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState, Wrap};
use ratatui::Frame;

use nflib::slot::{ProcessKind, SlotState};
use nflib::stats::PortKind;

use super::app::{App, Dialog, SortKey, View, KEYS, MIGRATE_COUNTS};
use super::model::{Link, Model, ProcRow};
use crate::text::si;

/// Wide enough for the full process table.
const WIDE: u16 = 120;

fn pps(v: f64) -> String {
    si(v)
}

fn bps(v: f64) -> String {
    format!("{}b", si(v))
}

/// `HH:MM:SS` (UTC) of a wall-clock time in ms.
pub fn hms(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

fn dur_ms(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.0} s", ms / 1000.0)
    } else if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.1} ms")
    }
}

fn kind_name(k: ProcessKind) -> &'static str {
    match k {
        ProcessKind::Manager => "nfmgr",
        ProcessKind::Vswitch => "vswitch",
        ProcessKind::Runtime => "runtime",
        _ => "?",
    }
}

fn state_cell(s: SlotState, quick_deaths: u32) -> Cell<'static> {
    if quick_deaths > 0 {
        // Whatever its state this instant, a crash loop is what the operator must see.
        return Cell::from(format!("CRASH {quick_deaths}")).style(Style::default().fg(Color::Red));
    }
    let (text, color) = match s {
        SlotState::Running => ("running", Color::Green),
        SlotState::Starting => ("starting", Color::Yellow),
        SlotState::Stopping => ("stopping", Color::Yellow),
        SlotState::Dead => ("DEAD", Color::Red),
        SlotState::Failed => ("FAILED", Color::Red),
        SlotState::Free => ("free", Color::DarkGray),
    };
    Cell::from(text).style(Style::default().fg(color))
}

fn port_kind(k: PortKind) -> &'static str {
    match k {
        PortKind::AfPacket => "afpacket",
        PortKind::Generator => "generator",
        PortKind::Sink => "sink",
        PortKind::Pcap => "pcap",
        PortKind::Null => "null",
        PortKind::Dpdk => "dpdk",
        PortKind::Unused => "-",
    }
}

fn drops_cell(total: u64, per_sec: f64) -> Cell<'static> {
    let text = if per_sec > 0.0 {
        format!("{}/s", si(per_sec))
    } else {
        si(total as f64)
    };
    let style = if per_sec > 0.0 {
        Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
    } else {
        Style::default()
    };
    Cell::from(text).style(style)
}

fn header_row(cells: &[&str]) -> Row<'static> {
    Row::new(cells.iter().map(|c| Cell::from(c.to_string()))).style(
        Style::default()
            .add_modifier(Modifier::BOLD)
            .fg(Color::Cyan),
    )
}

fn block(title: String) -> Block<'static> {
    Block::bordered().title(Span::styled(
        title,
        Style::default().add_modifier(Modifier::BOLD),
    ))
}

/// Draws the whole screen.
pub fn draw(f: &mut Frame, app: &App, model: &Model) {
    let area = f.area();
    let [top, tabs, body, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_title(f, top, app, model);
    draw_tabs(f, tabs, app);
    match app.view {
        View::Overview => draw_overview(f, body, app, model),
        View::Processes => draw_processes(f, body, app, model, true),
        View::Chains => draw_chains(f, body, model),
        View::Migrations => draw_migrations(f, body, model),
        View::Events => draw_events(f, body, app, model, "Events"),
        View::Cluster => draw_cluster(f, body, model),
    }
    draw_footer(f, foot, app, model);
    match &app.dialog {
        Some(Dialog::Help) => draw_help(f, area),
        Some(Dialog::ConfirmKill { spec, pid }) => draw_confirm_kill(f, area, spec, *pid),
        Some(Dialog::Migrate {
            from,
            chain,
            targets,
            target,
            count,
        }) => draw_migrate(f, area, from, chain, targets, *target, *count),
        Some(Dialog::Filter(_)) | None => {}
    }
}

fn draw_title(f: &mut Frame, area: Rect, app: &App, model: &Model) {
    let status = match &model.link {
        Link::Connecting => Span::styled(
            " CONNECTING ",
            Style::default().bg(Color::Yellow).fg(Color::Black),
        ),
        Link::Lost { failures, .. } => Span::styled(
            format!(" NFMGR LOST ({failures} tries) "),
            Style::default()
                .bg(Color::Red)
                .fg(Color::White)
                .add_modifier(Modifier::BOLD),
        ),
        Link::Up if app.frozen => Span::styled(
            " FROZEN ",
            Style::default().bg(Color::Blue).fg(Color::White),
        ),
        Link::Up => Span::styled(" LIVE ", Style::default().bg(Color::Green).fg(Color::Black)),
    };
    let servers_alive = model.servers.iter().filter(|s| s.alive).count();
    let room = (area.width as usize).saturating_sub(status.width() + 1);
    // The parts that fit, most important first.
    let mut text = format!(" nfmgr top · {} · server {}", model.instance, model.server);
    for part in [
        format!(" ({})", model.server_name),
        format!(" · {}", model.role),
        format!(" · up {}", dur_ms(model.uptime_s * 1000.0)),
        format!(" · {}/{} servers up", servers_alive, model.servers.len()),
        format!(" · view v{}", model.view_version),
        format!(" · {} UTC", hms(model.taken_ms)),
    ] {
        if text.chars().count() + part.chars().count() <= room {
            text.push_str(&part);
        }
    }
    if text.chars().count() > room {
        text = text.chars().take(room).collect();
    }
    let pad = room.saturating_sub(text.chars().count());
    let line = Line::from(vec![
        Span::styled(text, Style::default().add_modifier(Modifier::BOLD)),
        Span::raw(" ".repeat(pad)),
        status,
    ]);
    f.render_widget(Paragraph::new(line), area);
}

fn draw_tabs(f: &mut Frame, area: Rect, app: &App) {
    let mut spans = Vec::new();
    for (i, v) in View::ALL.iter().enumerate() {
        let label = format!(" {} {} ", i + 1, v.title());
        let style = if *v == app.view {
            Style::default()
                .bg(Color::Cyan)
                .fg(Color::Black)
                .add_modifier(Modifier::BOLD)
        } else {
            Style::default()
        };
        spans.push(Span::styled(label, style));
    }
    if !app.filter.is_empty() {
        spans.push(Span::styled(
            format!("  filter: {}", app.filter),
            Style::default().fg(Color::Yellow),
        ));
    }
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn draw_footer(f: &mut Frame, area: Rect, app: &App, model: &Model) {
    let line = match (&app.dialog, &app.notice) {
        (Some(Dialog::Filter(text)), _) => Line::from(vec![
            Span::styled(" filter: ", Style::default().fg(Color::Yellow)),
            Span::raw(format!("{text}█")),
            Span::styled(
                "   Enter keep · Esc clear",
                Style::default().fg(Color::DarkGray),
            ),
        ]),
        (_, Some(n)) => Line::from(Span::styled(
            format!(" {n}"),
            Style::default().fg(Color::Yellow),
        )),
        (_, None) if matches!(model.link, Link::Lost { .. }) => {
            let error = match &model.link {
                Link::Lost { error, .. } => error.as_str(),
                _ => "",
            };
            Line::from(Span::styled(
                // What is happening first: the error (a socket path) can be long.
                format!(" retrying; the figures shown are the last received · {error}"),
                Style::default().fg(Color::Red),
            ))
        }
        _ => Line::from(Span::styled(
            " q quit  ? help  Tab view  / filter  s sort  space freeze  k kill  m migrate",
            Style::default().fg(Color::DarkGray),
        )),
    };
    f.render_widget(Paragraph::new(line), area);
}

fn draw_overview(f: &mut Frame, area: Rect, app: &App, model: &Model) {
    let ports = (model.ports.len() as u16 + 3).min(8);
    let tall = area.height >= 40;
    let events = if tall { 12 } else { 5 };
    let mut constraints = vec![
        Constraint::Length(ports),
        Constraint::Min(6),
        Constraint::Length(if tall { 6 } else { 1 }),
    ];
    if tall {
        constraints.push(Constraint::Length(7));
    }
    constraints.push(Constraint::Length(events));
    let areas = Layout::vertical(constraints).split(area);
    draw_ports(f, areas[0], model);
    draw_processes(f, areas[1], app, model, false);
    draw_throughput(f, areas[2], model);
    if tall {
        draw_activity(f, areas[3], model);
    }
    draw_events(f, areas[areas.len() - 1], app, model, "Events");
}

fn draw_ports(f: &mut Frame, area: Rect, model: &Model) {
    let wide = area.width >= WIDE;
    let rows = model.ports.iter().map(|p| {
        let mut cells = vec![
            Cell::from(format!("{}@{}", p.name, p.server)),
            Cell::from(port_kind(p.kind)),
            Cell::from(pps(p.rx_pps)),
            Cell::from(pps(p.tx_pps)),
        ];
        if wide {
            cells.push(Cell::from(bps(p.rx_bps)));
            cells.push(Cell::from(bps(p.tx_bps)));
        } else {
            cells.push(Cell::from(bps(p.rx_bps.max(p.tx_bps))));
        }
        cells.push(drops_cell(p.drops, p.drops_ps));
        Row::new(cells)
    });
    let (header, widths): (&[&str], Vec<Constraint>) = if wide {
        (
            &[
                "PORT", "KIND", "RX pps", "TX pps", "RX bps", "TX bps", "DROPS",
            ],
            vec![
                Constraint::Length(16),
                Constraint::Length(10),
                Constraint::Length(9),
                Constraint::Length(9),
                Constraint::Length(10),
                Constraint::Length(10),
                Constraint::Length(10),
            ],
        )
    } else {
        (
            &["PORT", "KIND", "RX pps", "TX pps", "bps", "DROPS"],
            vec![
                Constraint::Length(14),
                Constraint::Length(10),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(9),
                Constraint::Length(9),
            ],
        )
    };
    let t = Table::new(rows, widths)
        .header(header_row(header))
        .block(block(format!("Ports ({})", model.ports.len())));
    f.render_widget(t, area);
}

fn proc_cells(p: &ProcRow, wide: bool) -> Vec<Cell<'static>> {
    let mut cells = vec![Cell::from(p.name.clone())];
    if wide {
        cells.push(Cell::from(p.slot.to_string()));
    }
    cells.push(Cell::from(kind_name(p.kind)));
    cells.push(Cell::from(p.server.to_string()));
    if wide {
        cells.push(Cell::from(p.core.map_or("-".into(), |c| c.to_string())));
        cells.push(Cell::from(if p.pid == 0 {
            "-".into()
        } else {
            p.pid.to_string()
        }));
    }
    cells.push(state_cell(p.state, p.quick_deaths));
    // A dead process has no rate: the last interval's would mislead.
    let live = !matches!(p.state, SlotState::Dead | SlotState::Failed);
    let rate = |v: f64| if live { pps(v) } else { "-".into() };
    cells.push(Cell::from(rate(p.rx_pps)));
    cells.push(Cell::from(rate(p.tx_pps)));
    cells.push(drops_cell(p.drops, p.drops_ps));
    if wide {
        cells.push(drops_cell(p.input_drops, p.input_drops_ps));
    }
    let runtime = p.kind == ProcessKind::Runtime;
    cells.push(Cell::from(if runtime {
        p.flows.to_string()
    } else {
        "-".into()
    }));
    if wide {
        let mig = if runtime {
            format!("{}/{}", p.migrating_in, p.migrating_out)
        } else {
            "-".into()
        };
        cells.push(Cell::from(mig));
        cells.push(Cell::from(if runtime {
            p.replicas.to_string()
        } else {
            "-".into()
        }));
    }
    let busy = if p.kind == ProcessKind::Manager || p.state != SlotState::Running {
        "-".to_string()
    } else {
        format!("{:.0}%", p.busy_pct)
    };
    cells.push(Cell::from(busy));
    if wide {
        let ns = match p.ns_per_pkt {
            Some(n) if p.kind != ProcessKind::Manager => format!("{n:.0}"),
            _ => "-".into(),
        };
        cells.push(Cell::from(ns));
        cells.push(Cell::from(p.restarts.to_string()));
    }
    cells
}

fn draw_processes(f: &mut Frame, area: Rect, app: &App, model: &Model, full: bool) {
    let wide = area.width >= WIDE;
    let procs = app.visible_procs(model);
    let arrow = if app.reverse { "▲" } else { "▼" };
    let mark = |label: &str, key: SortKey| -> String {
        if app.sort == key && key != SortKey::Server {
            format!("{label}{arrow}")
        } else {
            label.to_string()
        }
    };
    let mut header = vec![mark("NAME", SortKey::Name)];
    let mut widths = vec![Constraint::Length(9)];
    let mut col = |h: String, w: u16, header: &mut Vec<String>| {
        header.push(h);
        widths.push(Constraint::Length(w));
    };
    if wide {
        col("ID".into(), 3, &mut header);
    }
    col(mark("KIND", SortKey::Kind), 8, &mut header);
    col(mark("SRV", SortKey::Server), 3, &mut header);
    if wide {
        col("CORE".into(), 4, &mut header);
        col("PID".into(), 7, &mut header);
    }
    col(mark("STATE", SortKey::State), 9, &mut header);
    col(mark("RX pps", SortKey::Rx), 8, &mut header);
    col(mark("TX pps", SortKey::Tx), 8, &mut header);
    col(mark("DROPS", SortKey::Drops), 8, &mut header);
    if wide {
        col("RING DROP".into(), 9, &mut header);
    }
    col(mark("FLOWS", SortKey::Flows), 7, &mut header);
    if wide {
        col("MIG/s IN/OUT".into(), 12, &mut header);
        col("REPL".into(), 4, &mut header);
    }
    col(mark("BUSY", SortKey::Busy), 5, &mut header);
    if wide {
        col("ns/pkt".into(), 6, &mut header);
        col("RESTARTS".into(), 8, &mut header);
    }
    let header_refs: Vec<&str> = header.iter().map(|s| s.as_str()).collect();
    let rows = procs.iter().map(|p| {
        let r = Row::new(proc_cells(p, wide));
        if p.state == SlotState::Dead || p.state == SlotState::Failed {
            r.style(Style::default().fg(Color::Red))
        } else {
            r
        }
    });
    let title = format!(
        "Processes ({} of {}) · sort {}{}",
        procs.len(),
        model.procs.len(),
        app.sort.label(),
        if app.reverse { " reversed" } else { "" }
    );
    let t = Table::new(rows, widths)
        .header(header_row(&header_refs))
        .block(block(title))
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .highlight_symbol("›");
    let mut state = TableState::default();
    if !procs.is_empty() {
        state.select(Some(app.selected.min(procs.len() - 1)));
    }
    if full && area.height >= 20 {
        // Under the table: the selected process's throughput.
        let [table, spark] =
            Layout::vertical([Constraint::Min(6), Constraint::Length(5)]).areas(area);
        f.render_stateful_widget(t, table, &mut state);
        if let Some(p) = app.selected_proc(model) {
            let data: Vec<u64> = model
                .proc_history
                .get(&p.spec())
                .map(|h| h.iter().copied().collect())
                .unwrap_or_default();
            draw_spark(
                f,
                spark,
                format!("{} rx {}pps", p.spec(), pps(p.rx_pps)),
                &data,
                Color::Green,
            );
        }
    } else {
        f.render_stateful_widget(t, area, &mut state);
    }
}

fn draw_spark(f: &mut Frame, area: Rect, title: String, data: &[u64], color: Color) {
    let inner = area.width.saturating_sub(2) as usize;
    let start = data.len().saturating_sub(inner);
    let s = Sparkline::default()
        .block(block(title))
        .data(&data[start..])
        .style(Style::default().fg(color));
    f.render_widget(s, area);
}

fn draw_throughput(f: &mut Frame, area: Rect, model: &Model) {
    let now = model.runtime_history.back().copied().unwrap_or(0) as f64;
    let peak = model.runtime_history.iter().copied().max().unwrap_or(0) as f64;
    let data: Vec<u64> = model.runtime_history.iter().copied().collect();
    if area.width >= WIDE {
        let [a, b] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
            .areas(area);
        draw_spark(
            f,
            a,
            format!("Runtimes rx {}pps (peak {})", pps(now), pps(peak)),
            &data,
            Color::Green,
        );
        let rx: Vec<u64> = model.port_rx_history.iter().copied().collect();
        let rx_now = rx.last().copied().unwrap_or(0) as f64;
        let tx_now = model.port_tx_history.back().copied().unwrap_or(0) as f64;
        draw_spark(
            f,
            b,
            format!("Ports rx {}pps · tx {}pps", pps(rx_now), pps(tx_now)),
            &rx,
            Color::Cyan,
        );
    } else if area.height < 3 {
        // One line: the label, then the most recent samples that fit.
        let label = format!(" Runtimes rx {}pps (peak {}) ", pps(now), pps(peak));
        let w = label.chars().count() as u16;
        let [a, b] = Layout::horizontal([Constraint::Length(w), Constraint::Min(0)]).areas(area);
        f.render_widget(
            Paragraph::new(Span::styled(label, Style::default().bold())),
            a,
        );
        let start = data.len().saturating_sub(b.width as usize);
        f.render_widget(
            Sparkline::default()
                .data(&data[start..])
                .style(Style::default().fg(Color::Green)),
            b,
        );
    } else {
        draw_spark(
            f,
            area,
            format!("Runtimes rx {}pps (peak {})", pps(now), pps(peak)),
            &data,
            Color::Green,
        );
    }
}

fn migration_rows(model: &Model, now_ms: u64, wide: bool) -> Vec<Row<'static>> {
    model
        .migrations
        .iter()
        .rev()
        .map(|m| {
            let flows = m.requested.map_or("all".to_string(), |n| n.to_string());
            let (state, style) = match (&m.error, m.done) {
                (Some(_), _) => ("failed".to_string(), Style::default().fg(Color::Red)),
                (None, true) => ("done".to_string(), Style::default().fg(Color::Green)),
                (None, false) => (
                    format!(
                        "running {}",
                        dur_ms(now_ms.saturating_sub(m.started_ms) as f64)
                    ),
                    Style::default().fg(Color::Yellow),
                ),
            };
            let mut cells = vec![
                Cell::from(m.id.to_string()),
                Cell::from(hms(m.started_ms)),
                Cell::from(format!("{} → {}", m.from, m.to)),
                Cell::from(flows),
                Cell::from(state).style(style),
                Cell::from(m.moved.to_string()),
                Cell::from(m.ms.map_or("-".into(), dur_ms)),
            ];
            if wide {
                cells.push(Cell::from(m.rolled_back.to_string()));
                cells.push(Cell::from(m.lost.to_string()));
                cells.push(Cell::from(m.error.clone().unwrap_or_default()));
            }
            Row::new(cells)
        })
        .collect()
}

fn recovery_rows(model: &Model, now_ms: u64) -> Vec<Row<'static>> {
    model
        .recoveries
        .iter()
        .rev()
        .map(|r| {
            let (state, took, style) = match r.recovered_ms {
                Some(t) => (
                    "recovered".to_string(),
                    dur_ms(t.saturating_sub(r.died_ms) as f64),
                    Style::default().fg(Color::Green),
                ),
                None => (
                    "restarting".to_string(),
                    format!("{} so far", dur_ms(now_ms.saturating_sub(r.died_ms) as f64)),
                    Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
                ),
            };
            Row::new(vec![
                Cell::from(format!("{}@{}", r.process, r.server)),
                Cell::from(hms(r.died_ms)),
                Cell::from(r.cause.clone()),
                Cell::from(state).style(style),
                Cell::from(took),
            ])
        })
        .collect()
}

const MIGRATION_HEADER: [&str; 10] = [
    "ID",
    "STARTED",
    "FROM → TO",
    "ASKED",
    "STATE",
    "MOVED",
    "TOOK",
    "ROLLED BACK",
    "LOST",
    "ERROR",
];
const RECOVERY_HEADER: [&str; 5] = ["PROCESS", "DIED", "CAUSE", "STATE", "TOOK"];

fn migration_table(model: &Model, wide: bool, title: String) -> Table<'static> {
    let mut widths = vec![
        Constraint::Length(3),
        Constraint::Length(8),
        Constraint::Length(if wide { 24 } else { 17 }),
        Constraint::Length(6),
        Constraint::Length(14),
        Constraint::Length(7),
        Constraint::Length(8),
    ];
    if wide {
        widths.extend([
            Constraint::Length(11),
            Constraint::Length(6),
            Constraint::Min(10),
        ]);
    }
    let header = if wide {
        &MIGRATION_HEADER[..]
    } else {
        &MIGRATION_HEADER[..7]
    };
    Table::new(migration_rows(model, model.taken_ms, wide), widths)
        .header(header_row(header))
        .block(block(title))
}

fn recovery_widths() -> Vec<Constraint> {
    vec![
        Constraint::Length(12),
        Constraint::Length(8),
        Constraint::Length(24),
        Constraint::Length(10),
        Constraint::Min(10),
    ]
}

/// Overview, tall terminals: what is moving and what is coming back, side by side.
fn draw_activity(f: &mut Frame, area: Rect, model: &Model) {
    let [a, b] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(area);
    let now = model.taken_ms;
    let m = migration_table(
        model,
        false,
        format!(
            "Migrations ({} running)",
            model.migrations_in_progress().count()
        ),
    );
    f.render_widget(m, a);
    let r = Table::new(recovery_rows(model, now), recovery_widths())
        .header(header_row(&RECOVERY_HEADER))
        .block(block(format!(
            "Recoveries ({} in progress)",
            model.recoveries_in_progress().count()
        )));
    f.render_widget(r, b);
}

fn draw_migrations(f: &mut Frame, area: Rect, model: &Model) {
    let [a, b] =
        Layout::vertical([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(area);
    let now = model.taken_ms;
    let m = migration_table(
        model,
        area.width >= WIDE,
        format!(
            "Migrations ({} running, {} recent)",
            model.migrations_in_progress().count(),
            model.migrations.len()
        ),
    );
    f.render_widget(m, a);
    let r = Table::new(recovery_rows(model, now), recovery_widths())
        .header(header_row(&RECOVERY_HEADER))
        .block(block(format!(
            "Recoveries ({} in progress, {} recent)",
            model.recoveries_in_progress().count(),
            model.recoveries.len()
        )));
    f.render_widget(r, b);
}

fn draw_events(f: &mut Frame, area: Rect, app: &App, model: &Model, title: &str) {
    let events: Vec<_> = model
        .events
        .iter()
        .filter(|e| app.matches(&format!("{} {}", e.source, e.what)))
        .collect();
    let room = area.height.saturating_sub(2) as usize;
    let shown = &events[events.len().saturating_sub(room)..];
    let lines: Vec<Line> = shown
        .iter()
        .map(|e| {
            let bad = ["killed", "died", "exited", "failed", "down", "DEAD", "lost"]
                .iter()
                .any(|w| e.what.contains(w));
            let style = if bad {
                Style::default().fg(Color::Red)
            } else if e.what.contains("recovered") || e.what.contains("joined") {
                Style::default().fg(Color::Green)
            } else {
                Style::default()
            };
            Line::from(vec![
                Span::styled(
                    format!("{} ", hms(e.at_ms)),
                    Style::default().fg(Color::DarkGray),
                ),
                Span::styled(
                    format!("{}@{} ", e.source, e.server),
                    Style::default().fg(Color::Cyan),
                ),
                Span::styled(e.what.clone(), style),
            ])
        })
        .collect();
    let p = Paragraph::new(lines).block(block(format!(
        "{title} ({} of {})",
        events.len(),
        model.events.len()
    )));
    f.render_widget(p, area);
}

fn draw_chains(f: &mut Frame, area: Rect, model: &Model) {
    let n = model.chains.len() as u16;
    let [a, b] = Layout::vertical([Constraint::Length(n + 3), Constraint::Min(3)]).areas(area);
    let rows = model.chains.iter().map(|c| {
        let runtimes: Vec<Span> = c
            .runtimes
            .iter()
            .flat_map(|(name, alive)| {
                let style = if *alive {
                    Style::default()
                } else {
                    Style::default().fg(Color::Red)
                };
                let label = if *alive {
                    name.clone()
                } else {
                    format!("{name}(down)")
                };
                [Span::styled(label, style), Span::raw(" ")]
            })
            .collect();
        Row::new(vec![
            Cell::from(c.name.clone()),
            Cell::from(
                c.nfs
                    .iter()
                    .map(|n| n.kind.as_str())
                    .collect::<Vec<_>>()
                    .join(" → "),
            ),
            Cell::from(Line::from(runtimes)),
            Cell::from(c.flows.to_string()),
            Cell::from(pps(c.rx_pps)),
        ])
    });
    let t = Table::new(
        rows,
        [
            Constraint::Length(10),
            Constraint::Percentage(40),
            Constraint::Percentage(35),
            Constraint::Length(7),
            Constraint::Length(8),
        ],
    )
    .header(header_row(&[
        "CHAIN",
        "FUNCTIONS",
        "RUNTIMES",
        "FLOWS",
        "RX pps",
    ]))
    .block(block(format!("Service chains ({n})")));
    f.render_widget(t, a);
    let rows = model.chains.iter().flat_map(|c| {
        c.nfs.iter().enumerate().map(move |(i, nf)| {
            Row::new(vec![
                Cell::from(c.name.clone()),
                Cell::from((i + 1).to_string()),
                Cell::from(nf.kind.clone()),
                drops_cell(nf.drops, nf.drops_ps),
                Cell::from(nf.alerts.map_or("-".into(), |a| a.to_string())).style(
                    if nf.alerts.unwrap_or(0) > 0 {
                        Style::default()
                            .fg(Color::Magenta)
                            .add_modifier(Modifier::BOLD)
                    } else {
                        Style::default()
                    },
                ),
            ])
        })
    });
    let t = Table::new(
        rows,
        [
            Constraint::Length(10),
            Constraint::Length(3),
            Constraint::Length(14),
            Constraint::Length(10),
            Constraint::Length(8),
        ],
    )
    .header(header_row(&["CHAIN", "#", "FUNCTION", "DROPS", "ALERTS"]))
    .block(block("Functions (summed over the chain's runtimes)".into()));
    f.render_widget(t, b);
}

fn draw_cluster(f: &mut Frame, area: Rect, model: &Model) {
    let rows = model.servers.iter().map(|s| {
        let role = if s.coordinator {
            "coordinator"
        } else {
            "member"
        };
        let name = if s.this {
            format!("{}*", s.name)
        } else {
            s.name.clone()
        };
        let state = if s.alive {
            Cell::from("up").style(Style::default().fg(Color::Green))
        } else {
            Cell::from("DOWN").style(Style::default().fg(Color::Red).add_modifier(Modifier::BOLD))
        };
        Row::new(vec![
            Cell::from(s.server.to_string()),
            Cell::from(name),
            Cell::from(role),
            state,
            Cell::from(s.stats_age_ms.map_or("none".into(), |a| {
                if a < 10_000 {
                    format!("{a} ms")
                } else {
                    format!("{} s", a / 1000)
                }
            })),
            Cell::from(s.processes.to_string()),
            Cell::from(format!("{}/{}", s.pool_in_use, s.pool_total)),
            Cell::from(if s.hugepages { "hugetlbfs" } else { "shm" }),
        ])
    });
    let t = Table::new(
        rows,
        [
            Constraint::Length(6),
            Constraint::Length(12),
            Constraint::Length(11),
            Constraint::Length(5),
            Constraint::Length(9),
            Constraint::Length(5),
            Constraint::Length(12),
            Constraint::Length(9),
        ],
    )
    .header(header_row(&[
        "SERVER",
        "NAME",
        "ROLE",
        "STATE",
        "STATS AGE",
        "PROCS",
        "BUFFERS USED",
        "MEMORY",
    ]))
    .block(block(format!(
        "Servers ({}) · * this server",
        model.servers.len()
    )));
    f.render_widget(t, area);
}

fn popup(area: Rect, width: u16, height: u16) -> Rect {
    let [v] = Layout::vertical([Constraint::Length(height.min(area.height))])
        .flex(Flex::Center)
        .areas(area);
    let [h] = Layout::horizontal([Constraint::Length(width.min(area.width))])
        .flex(Flex::Center)
        .areas(v);
    h
}

fn draw_help(f: &mut Frame, area: Rect) {
    let r = popup(area, 78, KEYS.len() as u16 + 2);
    let lines: Vec<Line> = KEYS
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(
                    format!("{k:>16}  "),
                    Style::default().fg(Color::Cyan).bold(),
                ),
                Span::raw(*what),
            ])
        })
        .collect();
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(block("Keys (any key closes)".into())),
        r,
    );
}

fn draw_confirm_kill(f: &mut Frame, area: Rect, spec: &str, pid: u32) {
    let r = popup(area, 60, 7);
    let lines = vec![
        Line::from(Span::styled(
            format!("Kill {spec} (pid {pid}) with SIGKILL?"),
            Style::default().bold(),
        )),
        Line::from("Its nfmgr restarts it; its flows are recovered or lost."),
        Line::from(""),
        Line::from(vec![
            Span::styled(
                " y ",
                Style::default().bg(Color::Red).fg(Color::White).bold(),
            ),
            Span::raw(" kill    "),
            Span::styled(" n ", Style::default().bg(Color::DarkGray).fg(Color::White)),
            Span::raw(" cancel"),
        ]),
    ];
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines).block(block("Failover drill".into())),
        r,
    );
}

fn draw_migrate(
    f: &mut Frame,
    area: Rect,
    from: &str,
    chain: &str,
    targets: &[String],
    target: usize,
    count: usize,
) {
    let r = popup(area, 64, 9);
    let flows = MIGRATE_COUNTS[count].map_or("all".to_string(), |n| n.to_string());
    let to = targets.get(target).map(|s| s.as_str()).unwrap_or("-");
    let lines = vec![
        Line::from(format!("Move flows of chain {chain}")),
        Line::from(vec![
            Span::raw("  from    "),
            Span::styled(from.to_string(), Style::default().bold()),
        ]),
        Line::from(vec![
            Span::raw("  to      "),
            Span::styled(format!("< {to} >"), Style::default().fg(Color::Cyan).bold()),
            Span::styled("   Left/Right", Style::default().fg(Color::DarkGray)),
        ]),
        Line::from(vec![
            Span::raw("  flows   "),
            Span::styled(
                format!("< {flows} >"),
                Style::default().fg(Color::Cyan).bold(),
            ),
            Span::styled("   +/-", Style::default().fg(Color::DarkGray)),
        ]),
        Line::from(""),
        Line::from(vec![
            Span::styled(
                " y ",
                Style::default().bg(Color::Green).fg(Color::Black).bold(),
            ),
            Span::raw(" migrate    "),
            Span::styled(" n ", Style::default().bg(Color::DarkGray).fg(Color::White)),
            Span::raw(" cancel"),
        ]),
    ];
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines).block(block("Migrate flows".into())),
        r,
    );
}
