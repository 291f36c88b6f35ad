//! Frames on the managers' TCP sessions (`nflib::peer_frame`), as a stranger sends them
//! before the handshake (plain, bounded) and as a session carries them (tagged, counted):
//! each read ends in a message or an error, never a panic or an allocation beyond the
//! phase's bound; a join that decodes gets its proof computed like the coordinator does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nflib::peer_frame::{read_frame, AuthKey, JoinRequest, PeerMsg, MAX_FRAME, MAX_HANDSHAKE_FRAME};

fuzz_target!(|data: &[u8]| {
    let auth = AuthKey::derive(b"fuzzing cluster key, 32 bytes..");
    // The handshake: plain frames from whoever connected.
    let mut r = data;
    for _ in 0..4 {
        match read_frame(&mut r, None, MAX_HANDSHAKE_FRAME) {
            Ok(PeerMsg::Join {
                server,
                name,
                incarnation,
                nonce,
                endpoints,
                chains,
                ..
            }) => {
                let said = JoinRequest {
                    server,
                    name,
                    incarnation,
                    endpoints,
                    chains,
                };
                let _ = auth.proof(&[0; 16], &nonce, &said);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // A session: tagged frames under a per-direction key and counter.
    let (key, _) = auth.session(&[1; 16], &[2; 16]);
    let mut r = data;
    for counter in 0..4 {
        if read_frame(&mut r, Some((&key, counter)), MAX_FRAME).is_err() {
            break;
        }
    }
});
