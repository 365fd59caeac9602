//! Compiles the tandem.v1 protobuf packages (needs `protoc`, from Debian's protobuf-compiler or $PROTOC).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "tandem/v1/common.proto",
        "tandem/v1/client.proto",
        "tandem/v1/worker.proto",
        "tandem/v1/transfer.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tandem_v1_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
