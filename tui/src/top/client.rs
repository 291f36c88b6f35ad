//! One request to nfmgr's control socket: a JSON line out, a JSON line back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Sends `request` and returns the answer's `data`, or its `error`, or why nfmgr could not
/// be asked.
pub fn call(socket: &Path, request: &Value, timeout: Duration) -> Result<Value, String> {
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("no nfmgr at {} (is it running?)", socket.display())
        }
        std::io::ErrorKind::ConnectionRefused => {
            format!("nfmgr at {} is not answering", socket.display())
        }
        _ => format!("cannot connect to {}: {e}", socket.display()),
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut line = request.to_string();
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .map_err(|e| format!("cannot send: {e}"))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| format!("no answer: {e}"))?;
    if answer.is_empty() {
        return Err("nfmgr closed the connection".into());
    }
    let v: Value = serde_json::from_str(&answer).map_err(|e| format!("unreadable answer: {e}"))?;
    if v["ok"].as_bool() == Some(true) {
        Ok(v["data"].clone())
    } else {
        Err(v["error"].as_str().unwrap_or("failed").to_string())
    }
}
