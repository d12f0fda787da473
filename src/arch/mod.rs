//! Architecture-specific boot setup. Only x86-64 is supported.

mod x86_64;

pub use self::x86_64::*;
