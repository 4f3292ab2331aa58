//! Interior mutability that every fabric thread may share: the target, its subsystems and its
//! controllers are reached from the connections of any I/O thread (an admin queue on one, the
//! I/O queues of the same controller on others), so their state sits behind these instead of
//! `Cell`/`RefCell`. Each lock is held for a lookup or an update, never across an `.await`
//! (clippy's `await_holding_lock` is denied with every warning), and none is taken while
//! another of the same value is held.

use std::sync::{Mutex, MutexGuard};

/// A value behind a mutex. A thread that panicked while holding it poisoned nothing we rely on
/// (every update is a whole assignment or a collection operation), so the poison is cleared.
#[derive(Debug, Default)]
pub struct Locked<T>(Mutex<T>);

impl<T> Locked<T> {
    /// Wraps `v`.
    pub fn new(v: T) -> Self {
        Self(Mutex::new(v))
    }

    /// Locks it (briefly: never across an `.await`).
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A `Cell` for `Copy` values shared between threads: whole values in and out.
#[derive(Debug, Default)]
pub struct SyncCell<T: Copy>(Locked<T>);

impl<T: Copy> SyncCell<T> {
    /// Wraps `v`.
    pub fn new(v: T) -> Self {
        Self(Locked::new(v))
    }

    /// The value.
    pub fn get(&self) -> T {
        *self.0.lock()
    }

    /// Sets the value.
    pub fn set(&self, v: T) {
        *self.0.lock() = v;
    }
}
