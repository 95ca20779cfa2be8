//! Generates the tonic/prost code for `proto/gangway.proto` with the vendored `protoc`, so a build
//! never depends on a system protobuf compiler. Only with the `grpc` feature: the pure core uses the
//! domain types alone.
#[cfg(feature = "grpc")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // A secret's Debug is written by hand (src/lib.rs): the name, never the value.
        .skip_debug(["gangway.v1.SecretVar"])
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &["proto/gangway.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/gangway.proto");
    Ok(())
}

#[cfg(not(feature = "grpc"))]
fn main() {}
