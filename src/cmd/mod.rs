//! One module per subcommand.

pub mod dev;
pub mod server;
pub mod sim;

/// Exit code for invalid input: a bad spec, file, flag or field.
pub const EXIT_INVALID: u8 = 3;
