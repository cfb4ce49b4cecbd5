// One fuzz input through the config and policy parsers: a hostile file must give an error,
// never a panic. Shared (via `include!`) by the cargo-fuzz target `fuzz/fuzz_targets/config.rs`
// and the replay test `tests/fuzz_corpus.rs`.
//
// Input layout:
//   byte 0 (mod 2): 0 = the rest is a whole config file (TOML); 1 = a policy file
//   rest:           the text
//
// Check reported in the outcome: `valid-*` seeds (the example configs in config/ and real
// policy files) load.

use portcullis::authz::{PolicyDocument, PolicySet};
use portcullis::config::Config;

#[derive(Debug)]
pub struct ConfigOutcome {
    pub loaded: Result<(), String>,
}

pub fn one_config_input(data: &[u8]) -> Option<ConfigOutcome> {
    let (&selector, rest) = data.split_first()?;
    let text = std::str::from_utf8(rest).ok()?;
    let loaded = if selector % 2 == 0 {
        Config::from_toml(text).map(|_| ()).map_err(|e| e.to_string())
    } else {
        toml::from_str::<PolicyDocument>(text)
            .map_err(|e| e.to_string())
            .and_then(|doc| PolicySet::compile(&doc).map(|_| ()).map_err(|e| e.to_string()))
    };
    Some(ConfigOutcome { loaded })
}
