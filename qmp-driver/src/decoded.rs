//! Lenient decoding of replies: typed when the `qapi` types accept the JSON, raw otherwise.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// A reply (or part of one) decoded as leniently as possible.
///
/// The `qapi` crate's types follow QEMU 9.x; an older QEMU (7.2) sends enum values they do not
/// know and omits fields they require, and a newer one may do the reverse. Rather than fail,
/// such a reply is kept as [`Raw`](Self::Raw) JSON with the decode error. The raw JSON is kept
/// in both cases, so members the typed form drops (unknown fields) stay reachable.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded<T> {
    /// The JSON matched the `qapi` type.
    Typed {
        /// The decoded value.
        value: T,
        /// The JSON it was decoded from.
        raw: Value,
    },
    /// The JSON did not match; kept as received.
    Raw {
        /// The JSON as received.
        raw: Value,
        /// Why typed decoding failed (serde's message).
        error: String,
    },
}

impl<T: DeserializeOwned> Decoded<T> {
    /// Decodes `raw` as `T`, keeping it raw (logged at `warn`) if it does not match. `what`
    /// names the value in the log, e.g. the command.
    pub fn decode(what: &str, raw: Value) -> Self {
        match T::deserialize(&raw) {
            Ok(value) => Self::Typed { value, raw },
            Err(e) => {
                let error = e.to_string();
                tracing::warn!(
                    %what, %error, %raw,
                    "QMP reply does not match the qapi type; keeping it as raw JSON"
                );
                Self::Raw { raw, error }
            }
        }
    }

    /// Like [`decode`](Self::decode), but logs a mismatch at `debug`: for replies known not
    /// to fit on some QEMU versions and read from the raw JSON anyway, e.g. 7.2's mirror jobs
    /// polled in a loop.
    pub fn decode_quiet(what: &str, raw: Value) -> Self {
        match T::deserialize(&raw) {
            Ok(value) => Self::Typed { value, raw },
            Err(e) => {
                let error = e.to_string();
                tracing::debug!(
                    %what, %error,
                    "QMP reply does not match the qapi type; keeping it as raw JSON"
                );
                Self::Raw { raw, error }
            }
        }
    }

    /// Decodes each element of a JSON array separately, so one element with an unknown enum
    /// value does not cost the others their typed form. A non-array decodes as one element.
    pub fn decode_each(what: &str, raw: Value) -> Vec<Self> {
        match raw {
            Value::Array(items) => items.into_iter().map(|item| Self::decode(what, item)).collect(),
            other => vec![Self::decode(what, other)],
        }
    }
}

impl<T> Decoded<T> {
    /// The typed value, if decoding succeeded.
    pub fn typed(&self) -> Option<&T> {
        match self {
            Self::Typed { value, .. } => Some(value),
            Self::Raw { .. } => None,
        }
    }

    /// Consumes `self`, giving the typed value if decoding succeeded.
    pub fn into_typed(self) -> Option<T> {
        match self {
            Self::Typed { value, .. } => Some(value),
            Self::Raw { .. } => None,
        }
    }

    /// The JSON as received, in either case.
    pub fn raw(&self) -> &Value {
        match self {
            Self::Typed { raw, .. } | Self::Raw { raw, .. } => raw,
        }
    }

    /// Consumes `self`, giving the JSON as received.
    pub fn into_raw(self) -> Value {
        match self {
            Self::Typed { raw, .. } | Self::Raw { raw, .. } => raw,
        }
    }

    /// True for [`Typed`](Self::Typed).
    pub fn is_typed(&self) -> bool {
        matches!(self, Self::Typed { .. })
    }

    /// Why typed decoding failed, for [`Raw`](Self::Raw).
    pub fn decode_error(&self) -> Option<&str> {
        match self {
            Self::Typed { .. } => None,
            Self::Raw { error, .. } => Some(error),
        }
    }
}

impl<T> fmt::Display for Decoded<T> {
    /// Shows the raw JSON (typed or not).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.raw(), f)
    }
}
