//! Embeds Temporal's compiled descriptor set (published by `temporalio-protos`'s build script).
use std::{env, fs, path::PathBuf};

fn main() {
    let source = env::var("DEP_TEMPORALIO_PROTOS_DESCRIPTOR_PATH").expect(
        "temporalio-protos must publish its descriptor set (DEP_TEMPORALIO_PROTOS_DESCRIPTOR_PATH)",
    );
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    fs::copy(&source, out.join("temporal_descriptors.bin")).expect("copy descriptor set");
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-changed=build.rs");
}
