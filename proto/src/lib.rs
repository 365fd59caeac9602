//! The `tandem.v1` wire contract: the protobuf packages under `tandem/v1/`, the gRPC code generated from them, and
//! [`convert`], the one place where wire messages become engine types and back.
//!
//! Messages stay plain data; validation that needs a model (context length, vocabulary) happens in the nodes, but
//! every conversion that can fail names the field it refused.

pub mod convert;

/// Generated messages and services of package `tandem.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("tandem.v1");
}

/// The encoded file descriptor set of every `tandem.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tandem_v1_descriptor");

pub use convert::ConvertError;
