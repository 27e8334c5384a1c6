//! One module per subcommand.

pub mod attack;
pub mod bench;
pub mod cert;
pub mod edge;
pub mod fetch;
pub mod generate;
pub mod inspect;
pub mod serve;
