//! A boxed future whose heap block goes back to its worker thread when it is dropped, for the
//! next one of the same size.
//!
//! Every HTTP/2 stream's request future is boxed (see `server.rs`), and it is about 5 KB:
//! above glibc's per-thread cache, so each `Box` is a full `malloc`, which under h2c load
//! often starts with a consolidation pass over freed small chunks, and a full `free`
//! (perf: about 3% of the proxy's h2c CPU). A worker reuses the blocks of finished streams
//! instead; it keeps at most [`MAX_SPARE`] of them.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::ptr::{self, NonNull};
use std::task::{Context, Poll};

/// Spare blocks kept per worker thread: enough for a burst of streams, at most a few
/// hundred KB.
pub const MAX_SPARE: usize = 64;

/// Freed blocks of one layout (the first one asked for; other layouts are not kept).
struct Spare {
    layout: Option<Layout>,
    blocks: Vec<NonNull<u8>>,
}

impl Drop for Spare {
    fn drop(&mut self) {
        if let Some(layout) = self.layout {
            for block in self.blocks.drain(..) {
                // SAFETY: every kept block was allocated with `layout` and is not in use.
                unsafe { alloc::dealloc(block.as_ptr(), layout) };
            }
        }
    }
}

thread_local! {
    static SPARE: RefCell<Spare> = const { RefCell::new(Spare { layout: None, blocks: Vec::new() }) };
}

fn take_block(layout: Layout) -> NonNull<u8> {
    let reused = SPARE
        .try_with(|spare| {
            let mut spare = spare.borrow_mut();
            match spare.layout {
                Some(l) if l == layout => spare.blocks.pop(),
                Some(_) => None,
                None => {
                    spare.layout = Some(layout);
                    None
                }
            }
        })
        .ok()
        .flatten();
    if let Some(block) = reused {
        return block;
    }
    // SAFETY: the layout has a non-zero size (checked by the caller).
    let raw = unsafe { alloc::alloc(layout) };
    NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout))
}

fn give_block(block: NonNull<u8>, layout: Layout) {
    let kept = SPARE
        .try_with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.layout == Some(layout) && spare.blocks.len() < MAX_SPARE {
                spare.blocks.push(block);
                true
            } else {
                false
            }
        })
        .unwrap_or(false);
    if !kept {
        // SAFETY: the block was allocated with `layout` and nothing refers to it any more.
        unsafe { alloc::dealloc(block.as_ptr(), layout) };
    }
}

/// A block that goes back to the spares when dropped: while a future is being built into it
/// (a panic in the builder frees it), and after the future in it was dropped (even if its
/// destructor panicked).
struct Returned(NonNull<u8>, Layout);

impl Drop for Returned {
    fn drop(&mut self) {
        if self.1.size() != 0 {
            give_block(self.0, self.1);
        }
    }
}

/// A future on the heap, in a block that is recycled when the future is dropped.
pub struct Recycled<F> {
    future: NonNull<F>,
    _owns: PhantomData<F>,
}

// SAFETY: `Recycled<F>` owns its `F` exactly as `Box<F>` does; the block itself is plain
// memory that any thread may free or keep.
unsafe impl<F: Send> Send for Recycled<F> {}
// SAFETY: as above; `&Recycled<F>` gives no access to the `F`.
unsafe impl<F: Sync> Sync for Recycled<F> {}

// The future never moves: it stays in its block until it is dropped in place.
impl<F> Unpin for Recycled<F> {}

impl<F: Future> Recycled<F> {
    /// Takes a block first and then builds the future, so that it can be built in place
    /// rather than on the stack and copied (a 5 KB `memcpy` per stream otherwise).
    #[inline(always)]
    pub fn new_with(make: impl FnOnce() -> F) -> Self {
        let layout = Layout::new::<F>();
        if layout.size() == 0 {
            let dangling = NonNull::<F>::dangling();
            // SAFETY: a zero-sized value may be written through a dangling, aligned pointer.
            unsafe { ptr::write(dangling.as_ptr(), make()) };
            return Recycled {
                future: dangling,
                _owns: PhantomData,
            };
        }
        let block = take_block(layout).cast::<F>();
        let unfilled = Returned(block.cast(), layout);
        // SAFETY: the block is unused, and has the size and alignment of `F`.
        unsafe { ptr::write(block.as_ptr(), make()) };
        std::mem::forget(unfilled);
        Recycled {
            future: block,
            _owns: PhantomData,
        }
    }
}

impl<F: Future> Future for Recycled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the future is initialised and never moved out of its block before it is
        // dropped in place, so pinning it there is sound.
        let future = unsafe { Pin::new_unchecked(&mut *self.future.as_ptr()) };
        future.poll(cx)
    }
}

impl<F> Drop for Recycled<F> {
    fn drop(&mut self) {
        let _returned = Returned(self.future.cast(), Layout::new::<F>());
        // SAFETY: the future is initialised and this is its only owner.
        unsafe { ptr::drop_in_place(self.future.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn spare_count() -> usize {
        SPARE.with(|s| s.borrow().blocks.len())
    }

    /// A future that carries `N` bytes.
    fn carrying<const N: usize>(v: u8) -> impl Future<Output = usize> {
        let bytes = [v; N];
        async move { bytes.iter().map(|&b| b as usize).sum() }
    }

    #[tokio::test]
    async fn runs_the_future_and_reuses_its_block() {
        let first = Recycled::new_with(|| carrying::<4096>(7));
        let address = first.future.as_ptr() as usize;
        assert_eq!(first.await, 7 * 4096);
        let kept = spare_count();
        assert!(kept >= 1);
        let second = Recycled::new_with(|| carrying::<4096>(1));
        assert_eq!(second.future.as_ptr() as usize, address, "the freed block is reused");
        assert_eq!(spare_count(), kept - 1);
        assert_eq!(second.await, 4096);
    }

    #[test]
    fn drops_an_unfinished_future_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        struct Counted(Arc<AtomicUsize>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let counted = Counted(drops.clone());
        let pending = Recycled::new_with(|| async move {
            let _held = counted;
            std::future::pending::<()>().await
        });
        drop(pending);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn keeps_at_most_max_spare_blocks() {
        let live: Vec<_> = (0..MAX_SPARE + 10)
            .map(|i| Recycled::new_with(|| carrying::<2048>(i as u8)))
            .collect();
        drop(live);
        assert_eq!(spare_count(), MAX_SPARE);
    }

    #[test]
    fn other_layouts_and_zero_sized_futures_are_not_kept() {
        drop(Recycled::new_with(|| carrying::<3000>(1)));
        let kept = spare_count();
        assert_eq!(kept, 1);
        drop(Recycled::new_with(|| carrying::<100>(1)));
        assert_eq!(spare_count(), kept, "a second layout is freed, not kept");
        struct Nothing;
        impl Future for Nothing {
            type Output = ();
            fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
                Poll::Ready(())
            }
        }
        drop(Recycled::new_with(|| Nothing));
        assert_eq!(spare_count(), kept);
    }
}
