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
//! A batch that does not fit goes on in overflow chunks taken from the backing allocator, released at the next
//! reset, which also grows the arena to fit such a batch, up to [`MAX_CAPACITY`]; after the first batches its size
//! is stable, so the guest's memory does not grow from batch to batch.
//!
//! Everything allocated while the arena is open lives in the arena or an overflow chunk, and freeing any address
//! inside them is a no-op. That lets the host place all of a call's strings and lists in **one** allocation
//! instead of one per string — each allocation is a call from the host into the guest, the largest part of what
//! crossing the boundary costs per record. A guest tells the host it may do so with the custom section
//! [`BULK_ARGUMENTS_SECTION`], which this SDK embeds; a guest without it gets one allocation per string, as the
//! canonical ABI describes.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;

/// The arena's first size.
pub const INITIAL_CAPACITY: usize = 64 * 1024;
/// The arena never grows past this; larger batches go on in overflow chunks.
pub const MAX_CAPACITY: usize = 16 * 1024 * 1024;
const CHUNK_ALIGN: usize = 16;
/// Each overflow chunk starts with the address and size of the previous one (a list walked by `contains`).
const OVERFLOW_HEADER: usize = 16;

/// Name of the custom section by which a guest tells the host that freeing any address inside a block it
/// allocated for a call's arguments is harmless, so the host may put all of them in one block. Its content is the
/// version of that promise, [`BULK_ARGUMENTS_VERSION`].
pub const BULK_ARGUMENTS_SECTION: &str = "akosha:bulk-arguments";
/// The content of [`BULK_ARGUMENTS_SECTION`].
pub const BULK_ARGUMENTS_VERSION: &[u8; 2] = b"v1";

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
    /// The newest overflow chunk (null when none), its size and the bytes used in it.
    spill: *mut u8,
    spill_capacity: usize,
    spill_used: usize,
}

/// Bumps `used` within the chunk at `base` of `capacity` bytes.
fn bump_in(base: *mut u8, capacity: usize, used: &mut usize, layout: Layout) -> Option<*mut u8> {
    if base.is_null() {
        return None;
    }
    let start = base as usize + *used;
    let aligned = start.checked_add(layout.align() - 1)? & !(layout.align() - 1);
    let end = aligned.checked_add(layout.size())?;
    if end > base as usize + capacity {
        return None;
    }
    *used = end - base as usize;
    // Derived from `base` so the pointer keeps the chunk's provenance.
    Some(base.wrapping_add(aligned - base as usize))
}

fn within(base: *mut u8, capacity: usize, p: *mut u8) -> bool {
    !base.is_null() && p >= base && (p as usize) < base as usize + capacity
}

/// The previous overflow chunk and its size, from a chunk's header.
///
/// # Safety
/// `chunk` is a live overflow chunk.
unsafe fn previous_spill(chunk: *mut u8) -> (*mut u8, usize) {
    // SAFETY: every overflow chunk starts with this header, written when it was allocated (CHUNK_ALIGN-aligned).
    unsafe { (chunk.cast::<*mut u8>().read(), chunk.add(OVERFLOW_HEADER / 2).cast::<usize>().read()) }
}

impl State {
    fn contains(&self, p: *mut u8) -> bool {
        if within(self.base, self.capacity, p) {
            return true;
        }
        let (mut chunk, mut size) = (self.spill, self.spill_capacity);
        while !chunk.is_null() {
            if within(chunk, size, p) {
                return true;
            }
            // SAFETY: the list holds only live overflow chunks.
            (chunk, size) = unsafe { previous_spill(chunk) };
        }
        false
    }

    fn bump(&mut self, layout: Layout) -> Option<*mut u8> {
        bump_in(self.base, self.capacity, &mut self.used, layout)
    }
}

impl<A: GlobalAlloc> ArgumentArena<A> {
    /// A closed arena with no memory yet.
    pub const fn new(backing: A) -> Self {
        Self {
            backing,
            state: UnsafeCell::new(State {
                open: false,
                base: ptr::null_mut(),
                capacity: 0,
                used: 0,
                overflow: 0,
                spill: ptr::null_mut(),
                spill_capacity: 0,
                spill_used: 0,
            }),
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
        while !state.spill.is_null() {
            // SAFETY: a live overflow chunk, allocated with this layout in `spill`.
            let previous = unsafe { previous_spill(state.spill) };
            unsafe { self.backing.dealloc(state.spill, chunk_layout(state.spill_capacity)) };
            (state.spill, state.spill_capacity) = previous;
        }
        state.spill_used = 0;
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

    /// Serves `layout` from the newest overflow chunk, or from a new one.
    fn spill(&self, state: &mut State, layout: Layout) -> *mut u8 {
        if let Some(p) = bump_in(state.spill, state.spill_capacity, &mut state.spill_used, layout) {
            return p;
        }
        let Some(size) = layout
            .size()
            .checked_add(layout.align().max(CHUNK_ALIGN) + OVERFLOW_HEADER)
            .map(|needed| needed.max(INITIAL_CAPACITY).next_multiple_of(CHUNK_ALIGN))
        else {
            return ptr::null_mut();
        };
        let Ok(chunk_layout) = Layout::from_size_align(size, CHUNK_ALIGN) else { return ptr::null_mut() };
        // SAFETY: the layout has a non-zero size.
        let chunk = unsafe { self.backing.alloc(chunk_layout) };
        if chunk.is_null() {
            return chunk;
        }
        // SAFETY: the chunk is at least OVERFLOW_HEADER bytes, CHUNK_ALIGN-aligned.
        unsafe {
            chunk.cast::<*mut u8>().write(state.spill);
            chunk.add(OVERFLOW_HEADER / 2).cast::<usize>().write(state.spill_capacity);
        }
        state.spill = chunk;
        state.spill_capacity = size;
        state.spill_used = OVERFLOW_HEADER;
        bump_in(chunk, size, &mut state.spill_used, layout).unwrap_or(ptr::null_mut())
    }
}

fn chunk_layout(size: usize) -> Layout {
    // Sizes are multiples of CHUNK_ALIGN that were valid layouts when allocated: always a valid layout.
    Layout::from_size_align(size, CHUNK_ALIGN).unwrap_or(Layout::new::<u8>())
}

// SAFETY: allocations come either from a chunk this arena owns (the arena or an overflow chunk, never handed out
// twice before a reset, which the caller of `reset_and_open` guarantees is only done once they are all dead) or
// from `backing`; frees and reallocations are routed by address, so each block goes back to where it came from.
unsafe impl<A: GlobalAlloc> GlobalAlloc for ArgumentArena<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded; the borrow ends before the backing allocator is called.
        let state = unsafe { &mut *self.state.get() };
        if state.open {
            if let Some(p) = state.bump(layout) {
                return p;
            }
            state.overflow = state.overflow.saturating_add(layout.size());
            return self.spill(state, layout);
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

    // The promise described in the module documentation; its name is `BULK_ARGUMENTS_SECTION` (an attribute
    // needs the literal).
    #[used]
    #[unsafe(link_section = "akosha:bulk-arguments")]
    static BULK_ARGUMENTS: [u8; 2] = *super::BULK_ARGUMENTS_VERSION;
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
    fn overflow_spills_and_grows_the_arena_for_the_next_batch() {
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
    fn whatever_is_allocated_while_open_tolerates_interior_frees() {
        let arena = ArgumentArena::new(System);
        unsafe {
            arena.reset_and_open();
            // One block for a whole batch, larger than the arena will ever be, then one that spills again.
            let batch = arena.alloc(layout(MAX_CAPACITY + 100, 4));
            assert!(!batch.is_null());
            batch.write_bytes(1, MAX_CAPACITY + 100);
            let small = arena.alloc(layout(10, 1));
            small.write_bytes(2, 10);
            let more = arena.alloc(layout(INITIAL_CAPACITY * 2, 8));
            assert_eq!(more as usize % 8, 0);
            more.write_bytes(3, INITIAL_CAPACITY * 2);
            // The guest frees each string it was given: addresses inside the blocks, with their own layouts.
            arena.dealloc(batch.add(4096), layout(17, 1));
            arena.dealloc(more.add(8), layout(3, 1));
            assert_eq!(*batch.add(MAX_CAPACITY + 99), 1, "an interior free left the block alone");
            assert_eq!(*small.add(9), 2);
            assert_eq!(*more.add(INITIAL_CAPACITY * 2 - 1), 3);
            // A string kept past the body is moved out of the arena before the reset.
            arena.close();
            let kept = arena.realloc(batch.add(100), layout(4, 1), 4);
            assert_eq!(std::slice::from_raw_parts(kept, 4), &[1, 1, 1, 1]);
            arena.reset_and_open();
            assert_eq!(arena.capacity(), MAX_CAPACITY, "grown to the cap, the spills released");
            assert_eq!(std::slice::from_raw_parts(kept, 4), &[1, 1, 1, 1]);
            arena.dealloc(kept, layout(4, 1));
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
