//! The runtime's event log: records that network functions emit (alerts, flow records),
//! written as JSON lines by a thread of their own so the packet path never waits for a disk.
//!
//! The worker hands records over through a bounded `ringbuf` queue; when it is full the record
//! is dropped and counted (`events_dropped`), never blocking.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nflib::nf::EventSink;
use ringbuf::traits::{Consumer as _, Observer as _, Producer as _, Split};
use ringbuf::{HeapProd, HeapRb};

struct Record {
    nf: &'static str,
    body: serde_json::Value,
}

pub struct EventLog {
    queue: Option<HeapProd<Record>>,
    stop: Arc<AtomicBool>,
    writer: Option<JoinHandle<()>>,
    pub dropped: u64,
    pub path: Option<PathBuf>,
}

impl EventLog {
    /// A log that discards records (no `events` configured).
    pub fn disabled() -> EventLog {
        EventLog {
            queue: None,
            stop: Arc::new(AtomicBool::new(false)),
            writer: None,
            dropped: 0,
            path: None,
        }
    }

    /// Appends to `path`, tagging every record with the runtime's name.
    pub fn open(path: &Path, runtime: &str) -> std::io::Result<EventLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let (prod, mut cons) = HeapRb::<Record>::new(8192).split();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let runtime = runtime.to_string();
        // The thread names itself and sets up its signal stack as it starts (prctl,
        // mmap, sigaltstack): system calls the sandbox, entered soon after, forbids. Its
        // start is awaited so that none of them races the filter.
        let (started, running) = std::sync::mpsc::sync_channel::<()>(1);
        let writer = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                let _ = started.send(());
                let mut out = BufWriter::new(file);
                loop {
                    let mut wrote = false;
                    while let Some(r) = cons.try_pop() {
                        let mut obj = match r.body {
                            serde_json::Value::Object(m) => m,
                            other => {
                                let mut m = serde_json::Map::new();
                                m.insert("value".into(), other);
                                m
                            }
                        };
                        obj.insert("runtime".into(), runtime.clone().into());
                        obj.insert("nf".into(), r.nf.into());
                        let _ = serde_json::to_writer(&mut out, &obj);
                        let _ = out.write_all(b"\n");
                        wrote = true;
                    }
                    if wrote {
                        let _ = out.flush();
                    }
                    if stop2.load(Ordering::Acquire) && cons.is_empty() {
                        let _ = out.flush();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })?;
        // Err only if the thread died before saying so; its start is over either way.
        let _ = running.recv();
        Ok(EventLog {
            queue: Some(prod),
            stop,
            writer: Some(writer),
            dropped: 0,
            path: Some(path.to_path_buf()),
        })
    }

    /// Writes everything queued and stops the writer.
    pub fn close(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        self.queue = None;
    }
}

impl EventSink for EventLog {
    fn emit(&mut self, nf: &'static str, body: serde_json::Value) {
        if let Some(q) = self.queue.as_mut() {
            if q.try_push(Record { nf, body }).is_err() {
                self.dropped += 1;
            }
        }
    }

    fn enabled(&self) -> bool {
        self.queue.is_some()
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_reach_the_file_as_json_lines() {
        let path = std::env::temp_dir().join(format!("nf-events-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut log = EventLog::open(&path, "rt9").unwrap();
        log.emit("ids", serde_json::json!({"sid": 1}));
        log.emit("flow_monitor", serde_json::json!({"packets": [1, 2]}));
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["sid"], 1);
        assert_eq!(lines[0]["runtime"], "rt9");
        assert_eq!(lines[1]["nf"], "flow_monitor");
        std::fs::remove_file(path).unwrap();
    }
}
