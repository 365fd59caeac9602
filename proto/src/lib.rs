//! The `tandem.v1` wire contract. Its protobuf packages and conversions arrive with the disaggregated serving work; see README.md.
