//! The buffers one connection uses again for write payloads and read replies. A buffer of a
//! few hundred KiB freed and allocated anew per request is handed back to the kernel by the
//! allocator and faulted in again page by page (with TLB shootdowns when it is unmapped): on
//! sequential 256 KiB reads that was a fifth of the server's time. What is kept is bounded.

/// Bytes of buffer capacity one connection keeps while idle.
pub const POOL_BYTES: usize = 2 << 20;
/// Larger buffers are not kept (rare requests; they would take the whole pool).
pub const POOL_MAX_BUFFER: usize = (1 << 20) + 4096;

/// Empty buffers with capacity, taken and given back by one connection.
#[derive(Debug, Default)]
pub struct BufferPool {
    free: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufferPool {
    /// An empty buffer, with the capacity of one given back if there is one.
    pub fn take(&mut self) -> Vec<u8> {
        match self.free.pop() {
            Some(b) => {
                self.bytes -= b.capacity();
                b
            }
            None => Vec::new(),
        }
    }

    /// Keeps `buf` for a later [`BufferPool::take`] if it fits the bounds; drops it otherwise.
    pub fn give(&mut self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap == 0 || cap > POOL_MAX_BUFFER || self.bytes + cap > POOL_BYTES {
            return;
        }
        buf.clear();
        self.bytes += cap;
        self.free.push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_and_the_pool_stays_bounded() {
        let mut pool = BufferPool::default();
        let mut b = pool.take();
        b.extend_from_slice(&[1; 300_000]);
        let cap = b.capacity();
        pool.give(b);
        let b = pool.take();
        assert!(b.is_empty() && b.capacity() == cap, "the same memory, empty");
        pool.give(b);
        for _ in 0..100 {
            pool.give(Vec::with_capacity(300_000));
        }
        assert!(pool.bytes <= POOL_BYTES);
        assert_eq!(pool.free.iter().map(Vec::capacity).sum::<usize>(), pool.bytes);
        pool.give(Vec::with_capacity(POOL_MAX_BUFFER + 1));
        assert!(pool.free.iter().all(|b| b.capacity() <= POOL_MAX_BUFFER), "a huge buffer is not kept");
    }
}
