//! The NBD server: sans-I/O negotiation and transmission over `nbd-proto`, the exports they
//! serve, and the connection task that moves the bytes.

pub mod connection;
pub mod errno;
pub mod export;
pub mod negotiation;
pub mod transmission;
