//! The control socket's requests: one JSON line from any local client of the socket (the
//! monitoring socket's are any member of a group). Decoding must end in a request or an
//! error, never a panic; what a request may do is then judged by its kind.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nflib::control_client::Request;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(req) = serde_json::from_str::<Request>(line.trim()) {
        let _ = (req.read_only(), req.name());
    }
});
