//! What hashing a flow key costs, the way the flow index and migration's maps hash it
//! (foldhash, a per-process seed), next to a reference in the same run: the same key hashed
//! field by field as `#[derive(Hash)]` would (two length prefixes, then every field with its
//! own call), which is what `FlowKey` did before it wrote three words.
//!
//! Prints one JSON line. `NF_BENCH_SMOKE=1` runs a few iterations only.

use std::hash::{BuildHasher, Hash, Hasher};
use std::hint::black_box;
use std::time::Instant;

use nflib::flow::{family, FlowKey};

fn key(i: u32) -> FlowKey {
    let mut a = [0u8; 16];
    let mut b = [0u8; 16];
    a[..4].copy_from_slice(&[10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
    b[..4].copy_from_slice(&[10, 200, 0, 1]);
    FlowKey {
        a,
        b,
        a_port: 1024 + (i % 50_000) as u16,
        b_port: 80,
        vlan: 0,
        proto: 6,
        family: family::IPV4,
        fragment: false,
    }
}

/// The reference: the derived implementation's calls, written out.
struct FieldByField<'a>(&'a FlowKey);

impl Hash for FieldByField<'_> {
    fn hash<H: Hasher>(&self, s: &mut H) {
        let k = self.0;
        k.a.hash(s);
        k.b.hash(s);
        k.a_port.hash(s);
        k.b_port.hash(s);
        k.vlan.hash(s);
        k.proto.hash(s);
        k.family.hash(s);
        k.fragment.hash(s);
    }
}

fn main() {
    let smoke = std::env::var_os("NF_BENCH_SMOKE").is_some();
    let n: u32 = if smoke { 1_000 } else { 1_000_000 };
    let rounds = if smoke { 1 } else { 20 };
    let keys: Vec<FlowKey> = (0..n).map(key).collect();
    let state = foldhash::quality::RandomState::default();
    let mut best = [f64::MAX; 2];
    for _ in 0..rounds {
        for (i, b) in best.iter_mut().enumerate() {
            let t = Instant::now();
            let mut acc = 0u64;
            for k in &keys {
                acc ^= if i == 0 {
                    state.hash_one(black_box(k))
                } else {
                    state.hash_one(FieldByField(black_box(k)))
                };
            }
            black_box(acc);
            *b = b.min(t.elapsed().as_nanos() as f64 / n as f64);
        }
    }
    println!(
        "{{\"bench\": \"flow key hash\", \"keys\": {n}, \"ns_per_key\": {:.2}, \"reference_field_by_field_ns_per_key\": {:.2}}}",
        best[0], best[1]
    );
}
