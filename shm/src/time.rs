//! The two clocks the platform reads.

/// Monotonic nanoseconds (CLOCK_MONOTONIC): timers, latency stamps. The same clock in every
/// process and network namespace of one machine.
pub fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Wall-clock nanoseconds since the Unix epoch (capture timestamps, incarnations).
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
