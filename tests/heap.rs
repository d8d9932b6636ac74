//! A heap counter for memory-bound tests.
//!
//! Each test binary that measures heap use installs it as its global allocator:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: tests::heap::Counting = tests::heap::Counting;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts the heap bytes allocated and not freed on each thread, and otherwise leaves
/// every allocation to the system allocator. A `#[tokio::test]` runs its runtime, and so
/// both ends and every task, on the test's thread: the count on that thread is the
/// memory the test's connections hold, with no other test's mixed in.
pub struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

fn count(delta: i64) {
    // `try_with`: the allocator runs while a thread's locals are being torn down too.
    let _ = LIVE.try_with(|live| live.set(live.get() + delta));
}

/// Heap bytes live on this thread (allocated here and not freed here).
pub fn heap_live() -> i64 {
    LIVE.with(Cell::get)
}

// SAFETY: every method hands the call to `System` unchanged and returns its result; the
// counting touches a const-initialised thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size() as i64);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(layout.size() as i64);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        new
    }
}
