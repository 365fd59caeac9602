//! KV block transfer between workers. The chunk format and transports arrive with the disaggregated serving work; see README.md.
