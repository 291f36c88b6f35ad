//! Limits several layers agree on (the region's layout, the configuration's checks, the NF
//! API), in a module that imports nothing, so that none of them imports another for a
//! number.

/// Most functions in one service chain.
pub const MAX_NFS: usize = 8;
