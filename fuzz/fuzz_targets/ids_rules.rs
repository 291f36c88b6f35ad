//! Rule files come from operators and from rule feeds: any text must parse or fail with an
//! error, and whatever parses must build a matcher.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(rules) = nfs::ids::rules::parse_rules(&text) {
        let _ = nfs::ids::Ids::new(rules);
    }
});
