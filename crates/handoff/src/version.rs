//! Protocol version numbers: the lowest layer of the wire, read by the
//! frame header and by version negotiation alike.

/// A protocol version number.
pub type ProtoVersion = u16;
/// Lowest protocol version this build can speak.
pub const PROTO_MIN: ProtoVersion = 1;
/// Highest protocol version this build can speak.
pub const PROTO_MAX: ProtoVersion = 5;
