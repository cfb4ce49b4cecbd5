//! Embeds Temporal's compiled descriptor set (published by `temporalio-protos`'s build script) and
//! compiles the project's own protos in proto/ (pure Rust: protox, no system protoc).
use std::{env, fs, path::PathBuf};

fn main() {
    let source = env::var("DEP_TEMPORALIO_PROTOS_DESCRIPTOR_PATH").expect(
        "temporalio-protos must publish its descriptor set (DEP_TEMPORALIO_PROTOS_DESCRIPTOR_PATH)",
    );
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    fs::copy(&source, out.join("temporal_descriptors.bin")).expect("copy descriptor set");
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-changed=build.rs");

    let protos = ["proto/portcullis/v1/envelope.proto"];
    let descriptors = protox::compile(protos, ["proto"]).expect("compile proto/ with protox");
    prost_build::Config::new()
        .compile_fds(descriptors)
        .expect("generate Rust for proto/");
    println!("cargo:rerun-if-changed=proto");
}
