//! The decode worker. Its service arrives with the disaggregated serving work; see README.md.
