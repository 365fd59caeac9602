//! The router. Its HTTP and gRPC front door arrives with the disaggregated serving work; see README.md.
