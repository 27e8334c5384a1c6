//! One module per subcommand (and one for the quality mode of `bench`).

pub mod bench;
pub mod cert;
pub mod codec_quality;
pub mod fetch;
pub mod generate;
pub mod inspect;
pub mod serve;
