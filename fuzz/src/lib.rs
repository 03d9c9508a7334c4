//! The cloudmig source client, compiled on its own for fuzzing: `src/source/` is plain Rust
//! without pgrx, so it builds here exactly as in the extension.

#[path = "../../src/source/mod.rs"]
pub mod source;
