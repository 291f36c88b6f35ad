//! nfmgr's control socket's protocol (one JSON request per line, one JSON answer): the
//! requests it takes ([`Request`]), and the client side, through which the CLI subcommands
//! and the dashboard ask ([`call`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

/// Why a request to nfmgr's control socket got no answer, or a refusal.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("nfmgr is not running (no control socket at {})", .0.display())]
    NotRunning(PathBuf),
    #[error("nfmgr is not running (stale control socket at {})", .0.display())]
    Stale(PathBuf),
    #[error(
        "no permission to use the control socket {} (run as the user that started nfmgr)",
        .0.display()
    )]
    NoPermission(PathBuf),
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send to nfmgr: {0}")]
    Send(#[source] std::io::Error),
    #[error("no answer from nfmgr: {0}")]
    NoAnswer(#[source] std::io::Error),
    #[error("nfmgr closed the connection without answering (is it stopping?)")]
    Closed,
    #[error("unreadable answer: {0}")]
    Unreadable(#[source] serde_json::Error),
    /// nfmgr answered, with an error: its reason.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request to the control socket at `path` and returns the answer's data.
pub fn call(path: &Path, request: &Value, timeout: Duration) -> Result<Value, ClientError> {
    let mut stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ClientError::NotRunning(path.to_path_buf()),
        std::io::ErrorKind::ConnectionRefused => ClientError::Stale(path.to_path_buf()),
        std::io::ErrorKind::PermissionDenied => ClientError::NoPermission(path.to_path_buf()),
        _ => ClientError::Connect {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    let _ = stream.set_read_timeout(Some(timeout));
    let mut text = request.to_string();
    text.push('\n');
    stream
        .write_all(text.as_bytes())
        .map_err(ClientError::Send)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(ClientError::NoAnswer)?;
    if line.is_empty() {
        return Err(ClientError::Closed);
    }
    let v: Value = serde_json::from_str(line.trim()).map_err(ClientError::Unreadable)?;
    if v["ok"] == json!(true) {
        Ok(v["data"].clone())
    } else {
        Err(ClientError::Refused(
            v["error"].as_str().unwrap_or("unknown error").to_string(),
        ))
    }
}

/// A request to the control socket, as JSON: `{"cmd":"status"}`, and so on (nfmgr's
/// `control::socket` serves them).
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Runtimes,
    Flows {
        runtime: Option<String>,
        limit: Option<u32>,
    },
    Stop,
    Msgtest {
        from: String,
        to: String,
        count: u64,
        size: u32,
        depth: Option<u32>,
        timeout_s: Option<f64>,
    },
    Migrate {
        from: String,
        to: String,
        /// Flows to move; absent: all.
        flows: Option<u32>,
        timeout_s: Option<f64>,
    },
    Top,
    Kill {
        process: String,
    },
    /// Read the cluster keys again from the configuration file (`cluster.key_file`,
    /// `cluster.accept_key_files`): a step of a key rotation.
    Rekey,
}

impl Request {
    /// Whether the request only reads (a monitoring client may make it).
    pub fn read_only(&self) -> bool {
        matches!(
            self,
            Request::Status | Request::Runtimes | Request::Flows { .. } | Request::Top
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Runtimes => "runtimes",
            Request::Flows { .. } => "flows",
            Request::Stop => "stop",
            Request::Msgtest { .. } => "msgtest",
            Request::Migrate { .. } => "migrate",
            Request::Top => "top",
            Request::Kill { .. } => "kill",
            Request::Rekey => "rekey",
        }
    }
}
