//! A bump arena for what the host copies into the guest between two calls.
//!
//! A call into a policy starts with the host asking the guest's allocator for one block per string and list of
//! its arguments — about eight per record for a residency batch (ids, project, text, metadata, each tag) — and the
//! guest frees every one of them when the batch is dropped. With the general-purpose allocator that is a
//! `malloc` and a `free` per string, a good part of what crossing into WASM costs per record. In the arena each
//! is a pointer bump and a no-op.
//!
//! The arena is *open* from the end of one export's body to the start of the next export's body. What gets
//! allocated while it is open: the results the bindings lower after a body returns (freed by the post-return
//! function before the host makes another call) and the next call's arguments (dropped before that call's body
//! ends). So at the end of a body, once its arguments are dropped, nothing in the arena is alive and its cursor
//! goes back to the start. Everything a policy allocates itself — its decisions, regex caches, anything it keeps —
//! comes from the backing allocator, because the body runs with the arena closed.
//!
//! A batch that does not fit takes the rest from the backing allocator (freed there as usual) and the next reset
//! grows the arena to fit such a batch, up to [`MAX_CAPACITY`]; after the first batches its size is stable, so the
//! guest's memory does not grow from batch to batch.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;

/// The arena's first size.
pub const INITIAL_CAPACITY: usize = 64 * 1024;
/// The arena never grows past this; larger batches take the excess from the backing allocator.
pub const MAX_CAPACITY: usize = 16 * 1024 * 1024;
const CHUNK_ALIGN: usize = 16;

/// An allocator that serves allocations from a resettable bump arena while it is open and from `backing`
/// otherwise. Not thread-safe: WASM guests are single-threaded.
pub struct ArgumentArena<A> {
    backing: A,
    state: UnsafeCell<State>,
}

struct State {
    open: bool,
    base: *mut u8,
    capacity: usize,
    used: usize,
    /// Bytes that did not fit since the last reset.
    overflow: usize,
}

impl State {
    fn contains(&self, p: *mut u8) -> bool {
        !self.base.is_null() && p >= self.base && (p as usize) < self.base as usize + self.capacity
    }

    fn bump(&mut self, layout: Layout) -> Option<*mut u8> {
        let start = self.base as usize + self.used;
        let aligned = start.checked_add(layout.align() - 1)? & !(layout.align() - 1);
        let end = aligned.checked_add(layout.size())?;
        if self.base.is_null() || end > self.base as usize + self.capacity {
            return None;
        }
        self.used = end - self.base as usize;
        // Derived from `base` so the pointer keeps the chunk's provenance.
        Some(self.base.wrapping_add(aligned - self.base as usize))
    }
}

impl<A: GlobalAlloc> ArgumentArena<A> {
    /// A closed arena with no memory yet.
    pub const fn new(backing: A) -> Self {
        Self {
            backing,
            state: UnsafeCell::new(State { open: false, base: ptr::null_mut(), capacity: 0, used: 0, overflow: 0 }),
        }
    }

    /// Stops serving from the arena: called when an export's body starts.
    pub fn close(&self) {
        // SAFETY: single-threaded; no reference into the state outlives a method.
        unsafe { (*self.state.get()).open = false }
    }

    /// Forgets everything in the arena, grows it if the last batch overflowed, and opens it: called when an
    /// export's body ends, after its arguments are dropped.
    ///
    /// # Safety
    /// Nothing allocated from the arena may be used after this call.
    pub unsafe fn reset_and_open(&self) {
        // SAFETY: single-threaded; the caller guarantees no arena allocation is alive.
        let state = unsafe { &mut *self.state.get() };
        let wanted = (state.capacity + state.overflow).max(INITIAL_CAPACITY).next_power_of_two().min(MAX_CAPACITY);
        if state.base.is_null() || wanted > state.capacity {
            if !state.base.is_null() {
                // SAFETY: allocated below with this layout.
                unsafe { self.backing.dealloc(state.base, chunk_layout(state.capacity)) };
            }
            // SAFETY: the layout has a non-zero size.
            let base = unsafe { self.backing.alloc(chunk_layout(wanted)) };
            state.base = base;
            state.capacity = if base.is_null() { 0 } else { wanted };
        }
        state.used = 0;
        state.overflow = 0;
        state.open = true;
    }

    /// Bytes of the arena in use (for tests).
    pub fn used(&self) -> usize {
        // SAFETY: single-threaded.
        unsafe { (*self.state.get()).used }
    }

    /// The arena's size (for tests).
    pub fn capacity(&self) -> usize {
        // SAFETY: single-threaded.
        unsafe { (*self.state.get()).capacity }
    }
}

fn chunk_layout(size: usize) -> Layout {
    // The sizes are powers of two no larger than MAX_CAPACITY: always a valid layout.
    Layout::from_size_align(size, CHUNK_ALIGN).unwrap_or(Layout::new::<u8>())
}

// SAFETY: allocations come either from a chunk this arena owns (never handed out twice before a reset, which
// the caller of `reset_and_open` guarantees is only done once they are all dead) or from `backing`; frees and
// reallocations are routed by address, so each block goes back to where it came from.
unsafe impl<A: GlobalAlloc> GlobalAlloc for ArgumentArena<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded; the borrow ends before the backing allocator is called.
        let state = unsafe { &mut *self.state.get() };
        if state.open {
            if let Some(p) = state.bump(layout) {
                return p;
            }
            state.overflow += layout.size();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { self.backing.alloc(layout) }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: single-threaded.
        let in_arena = unsafe { (*self.state.get()).contains(p) };
        if !in_arena {
            // SAFETY: not from the arena, so from `backing` with this layout.
            unsafe { self.backing.dealloc(p, layout) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: single-threaded.
        let in_arena = unsafe { (*self.state.get()).contains(p) };
        if !in_arena {
            // SAFETY: from `backing` with this layout.
            return unsafe { self.backing.realloc(p, layout, new_size) };
        }
        // SAFETY: GlobalAlloc::realloc's contract makes this a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: forwarded to our own alloc.
        let fresh = unsafe { self.alloc(new_layout) };
        if !fresh.is_null() {
            // SAFETY: both blocks hold at least the copied length and do not overlap (the arena never hands out
            // a live block twice).
            unsafe { ptr::copy_nonoverlapping(p, fresh, layout.size().min(new_size)) };
        }
        fresh
    }
}

/// The guest's global allocator: the arena in front of the standard one.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
mod global {
    use super::ArgumentArena;

    pub(super) struct SingleThreaded(pub(super) ArgumentArena<std::alloc::System>);

    // SAFETY: wasm32 without the atomics feature has exactly one thread.
    unsafe impl Sync for SingleThreaded {}

    // SAFETY: forwards to the arena.
    unsafe impl core::alloc::GlobalAlloc for SingleThreaded {
        unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
            unsafe { self.0.alloc(layout) }
        }
        unsafe fn dealloc(&self, p: *mut u8, layout: core::alloc::Layout) {
            unsafe { self.0.dealloc(p, layout) }
        }
        unsafe fn realloc(&self, p: *mut u8, layout: core::alloc::Layout, new_size: usize) -> *mut u8 {
            unsafe { self.0.realloc(p, layout, new_size) }
        }
    }

    #[global_allocator]
    pub(super) static ALLOCATOR: SingleThreaded = SingleThreaded(ArgumentArena::new(std::alloc::System));
}

/// Called by the export macros when a body starts.
#[doc(hidden)]
pub fn enter_body() {
    #[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
    global::ALLOCATOR.0.close();
}

/// Called by the export macros when a body ends, after its arguments are dropped.
///
/// # Safety
/// Nothing the host passed to the export (nothing allocated while the arena was open) may be alive.
#[doc(hidden)]
pub unsafe fn leave_body() {
    #[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
    // SAFETY: the caller guarantees the arguments are gone.
    unsafe {
        global::ALLOCATOR.0.reset_and_open()
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::System;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn closed_arena_forwards_to_the_backing_allocator() {
        let arena = ArgumentArena::new(System);
        unsafe {
            let p = arena.alloc(layout(100, 8));
            assert!(!p.is_null());
            assert_eq!(arena.used(), 0);
            arena.dealloc(p, layout(100, 8));
        }
    }

    #[test]
    fn open_arena_bumps_aligned_and_frees_nothing_until_reset() {
        let arena = ArgumentArena::new(System);
        unsafe {
            arena.reset_and_open();
            let a = arena.alloc(layout(3, 1));
            let b = arena.alloc(layout(8, 8));
            assert_eq!(b as usize % 8, 0);
            assert!(b as usize >= a as usize + 3);
            a.write_bytes(0xAA, 3);
            b.write_bytes(0xBB, 8);
            arena.dealloc(a, layout(3, 1));
            assert!(arena.used() >= 11, "a free in the arena is a no-op");
            assert_eq!(*b, 0xBB);
            arena.close();
            arena.reset_and_open();
            assert_eq!(arena.used(), 0);
        }
    }

    #[test]
    fn overflow_falls_back_and_grows_the_arena_for_the_next_batch() {
        let arena = ArgumentArena::new(System);
        unsafe {
            arena.reset_and_open();
            assert_eq!(arena.capacity(), INITIAL_CAPACITY);
            let mut blocks = Vec::new();
            for _ in 0..300 {
                let p = arena.alloc(layout(1024, 4));
                assert!(!p.is_null());
                p.write_bytes(7, 1024);
                blocks.push(p);
            }
            for p in blocks {
                arena.dealloc(p, layout(1024, 4));
            }
            arena.close();
            arena.reset_and_open();
            assert!(arena.capacity() >= 300 * 1024, "grown to fit: {}", arena.capacity());
            let capacity = arena.capacity();
            for _ in 0..300 {
                arena.alloc(layout(1024, 4));
            }
            arena.close();
            arena.reset_and_open();
            assert_eq!(arena.capacity(), capacity, "a batch that fits does not grow it");
        }
    }

    #[test]
    fn realloc_moves_arena_blocks_out_when_closed_and_keeps_their_bytes() {
        let arena = ArgumentArena::new(System);
        unsafe {
            arena.reset_and_open();
            let p = arena.alloc(layout(4, 1));
            p.copy_from_nonoverlapping(b"abcd".as_ptr(), 4);
            arena.close();
            let q = arena.realloc(p, layout(4, 1), 64);
            assert!(!q.is_null());
            assert_eq!(std::slice::from_raw_parts(q, 4), b"abcd");
            // Now a backing block: freeing it must go to the backing allocator.
            arena.dealloc(q, layout(64, 1));
        }
    }
}
