//! The NBD server: sans-I/O negotiation and transmission over `nbd-proto`, the exports they
//! serve, and the connection task that moves the bytes.

mod budget;
mod buffer_pool;
pub mod connection;
pub mod errno;
pub mod export;
pub mod negotiation;
mod request_reader;
pub mod transmission;
