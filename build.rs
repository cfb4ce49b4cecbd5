//! Embeds Temporal's compiled descriptor set (published by `temporalio-protos`'s build script) and
//! compiles the project's own protos in proto/ (pure Rust: protox, no system protoc).
use std::{env, fs, path::PathBuf};

// The same code strips descriptor sets given at run time (`[schema] descriptor_set`).
#[path = "src/schema/strip.rs"]
mod strip;

fn main() {
    let source = env::var("DEP_TEMPORALIO_PROTOS_DESCRIPTOR_PATH").expect(
        "temporalio-protos must publish its descriptor set (DEP_TEMPORALIO_PROTOS_DESCRIPTOR_PATH)",
    );
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    // Without comments and source positions (about 70 % of the set): the proxy never reads
    // them, and a decoded descriptor pool would keep them in memory.
    let full = fs::read(&source).expect("read the descriptor set");
    let stripped = strip::strip_source_info(&full).expect("the descriptor set is valid protobuf");
    let served =
        strip::drop_files(&stripped, strip::NOT_SERVED).expect("drop files nothing serves");
    fs::write(out.join("temporal_descriptors.bin"), served).expect("write the descriptor set");
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/schema/strip.rs");

    let protos = ["proto/portcullis/v1/envelope.proto"];
    let descriptors = protox::compile(protos, ["proto"]).expect("compile proto/ with protox");
    prost_build::Config::new()
        .compile_fds(descriptors)
        .expect("generate Rust for proto/");
    println!("cargo:rerun-if-changed=proto");
}
