//! What every test module imports: the test support (`support/`), re-exported.

pub use crate::support::*;
