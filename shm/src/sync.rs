//! Atomics and interior-mutability cells that switch to `loom` under `--cfg loom`.
//!
//! The ring and the pool are written against these names only, so the same source is
//! model-checked by loom (every interleaving of producer and consumer) and compiled into the
//! processes that share the region. Nothing here may allocate or hold a pointer: these types
//! live inside the shared region in normal builds.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::AtomicU32;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::AtomicU32;

/// A cell whose contents are handed between threads or processes by an external protocol
/// (the ring's indices). Same API as `loom::cell::UnsafeCell` so loom can track accesses.
#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell as Cell;

#[cfg(not(loom))]
#[repr(transparent)]
pub(crate) struct Cell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> Cell<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(core::cell::UnsafeCell::new(value))
    }

    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
