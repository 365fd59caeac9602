//! The Rust client SDK. It arrives with the disaggregated serving work; see README.md.
