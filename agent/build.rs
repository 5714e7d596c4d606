//! Builds the kernel programs (`agent-ebpf`) for the BPF target with the nightly toolchain and
//! `bpf-linker`, so `include_bytes_aligned!` in `kernel.rs` can embed the object.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // aya-build reruns us when agent-ebpf changes; the kernel programs also use `common`.
    println!("cargo:rerun-if-changed=../common");
    // The nested cargo's progress lines would reach the user as `warning:` lines (aya-build
    // forwards its stderr as cargo warnings); errors and real compiler warnings still do.
    // SAFETY: a build script is single-threaded here; nothing reads the environment meanwhile.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "airlock-ebpf")
        .ok_or_else(|| anyhow!("package airlock-ebpf not found in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: package.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs failed; `cargo xtask setup` installs the nightly rust-src component and bpf-linker")
}
