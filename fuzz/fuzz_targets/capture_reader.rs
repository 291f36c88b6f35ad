//! Capture files come from anywhere: reading one must never panic nor allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut r) = nflib::pcap::CaptureReader::new(data) {
        let mut buf = Vec::new();
        for _ in 0..1000 {
            match r.next_record(&mut buf) {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
});
