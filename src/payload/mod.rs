//! Wire-level protobuf access: reading fields without decoding whole messages.

pub mod wire;
