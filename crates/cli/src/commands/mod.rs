//! One module per subcommand (and one for the quality mode of `bench`).

pub mod attack;
pub mod bench;
pub mod cert;
pub mod codec_quality;
pub mod edge;
pub mod fetch;
pub mod finetune;
pub mod generate;
pub mod health;
pub mod image;
pub mod inspect;
pub mod serve;
pub mod trunk_check;
