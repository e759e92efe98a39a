//! The disk migration's sessions, without I/O: what each side may do next, what it must
//! persist before doing it, and which blocks each round sends.
//!
//! - [`source::SourceSession`]: `idle → setup → precopy → ready → finishing → handed-over →
//!   completed` (or `cancelled` / `failed`).
//! - [`dest::DestSession`]: `waiting → receiving → committed → owner`.
//! - [`durable::Ownership`]: the record both persist next to the image, so a restart honours
//!   a hand-over: a source that handed its disk over keeps refusing writes, a destination that
//!   committed one keeps serving it and never takes a new session over it.
//! - [`abandon`]: when a receiving destination knows its VM manager abandoned the migration.
//! - [`residual`]: post-copy's set of blocks a destination serves but does not hold yet, and
//!   its durable log.
//! - [`plan`]: the round planners of the row and bitmap strategies.
//! - [`world`]: both machines and a lossy network, stepped by bytes, for the property test and
//!   the fuzz target of the hand-over protocol.
//!
//! Like `nbd-proto` and `migration-stream`, this is the logic the proxy's tokio code drives:
//! every input is a method returning the actions to perform (in order) or a typed refusal
//! that leaves the state unchanged.

pub mod abandon;
pub mod dest;
pub mod durable;
pub mod link;
pub mod phase;
pub mod plan;
pub mod residual;
pub mod source;
pub mod world;

pub use abandon::AbandonWatch;
pub use dest::{DestAction, DestRefusal, DestSession};
pub use durable::{now_rfc3339, BadRecord, DestStage, Ownership, SessionId, SourceStage};
pub use plan::{data_blocks, take_data_blocks, BitmapPlan, RowPlan, Span, WriteLog, Written};
pub use residual::{BadResidual, BlockSet, ResidualLog, Residue};
pub use source::{RevokeAnswer, SourceAction, SourceRefusal, SourceSession};
