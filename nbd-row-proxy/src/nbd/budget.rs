//! The byte budgets that bound what NBD requests in flight may hold: each connection's own
//! ([`MAX_IN_FLIGHT_BYTES`]) and the process-wide ones ([`SharedBudget`]).

use std::sync::Arc;

use nbd_proto::{Command, Request};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::export::MAX_REQUEST_LEN;

/// Bytes of request payloads and replies a connection may have in flight (two of the largest
/// requests).
pub const MAX_IN_FLIGHT_BYTES: u32 = 2 * MAX_REQUEST_LEN;

/// Bytes of request payloads and replies all connections together may have in flight.
pub const TOTAL_IN_FLIGHT_BYTES: u32 = 256 << 20;
/// The part of [`TOTAL_IN_FLIGHT_BYTES`] TCP connections together may hold: the rest is always
/// there for the Unix socket's (QEMU's).
pub const TCP_IN_FLIGHT_BYTES: u32 = TOTAL_IN_FLIGHT_BYTES / 2;

/// Byte budgets shared by connections, taken in order by each request besides its own
/// connection's: the process-wide one, and for a class of connections (TCP) a cap of its own.
#[derive(Debug, Clone)]
pub struct SharedBudget(Vec<Arc<Semaphore>>);

impl SharedBudget {
    /// A process-wide budget of `bytes`.
    pub fn new(bytes: u32) -> Self {
        Self(vec![Arc::new(Semaphore::new(bytes as usize))])
    }

    /// The same budget, with a cap of `bytes` on what the connections given this one hold
    /// together.
    pub fn capped(&self, bytes: u32) -> Self {
        Self(std::iter::once(Arc::new(Semaphore::new(bytes as usize))).chain(self.0.iter().cloned()).collect())
    }
}

/// The shares of the budgets a request holds until its reply is written.
#[derive(Debug)]
pub(super) struct Held {
    _permits: Vec<OwnedSemaphorePermit>,
}

/// A connection's own budget and the shared ones, in the order they are taken.
pub(super) struct Budget {
    pools: Vec<Arc<Semaphore>>,
}

impl Budget {
    pub(super) fn new(shared: &SharedBudget) -> Self {
        let own = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES as usize));
        Self { pools: std::iter::once(own).chain(shared.0.iter().cloned()).collect() }
    }

    /// `bytes` of every budget if they are all free now; none otherwise.
    pub(super) fn try_take(&self, bytes: u32) -> Option<Held> {
        let mut held = Vec::with_capacity(self.pools.len());
        for pool in &self.pools {
            held.push(pool.clone().try_acquire_many_owned(bytes).ok()?);
        }
        Some(Held { _permits: held })
    }

    /// `bytes` of every budget, waiting for them in order.
    pub(super) async fn take(&self, bytes: u32) -> Held {
        let mut held = Vec::with_capacity(self.pools.len());
        for pool in &self.pools {
            held.push(pool.clone().acquire_many_owned(bytes).await.expect("budgets are never closed"));
        }
        Held { _permits: held }
    }
}

/// What a request costs of the byte budget: its payload or its reply.
pub(super) fn cost(req: &Request) -> u32 {
    match req.command {
        Command::Read | Command::Write => req.length.clamp(1, MAX_IN_FLIGHT_BYTES),
        _ => 1,
    }
}
