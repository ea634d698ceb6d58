//! Compiles every `src/*.bpf.c` with clang for the BPF target into `$OUT_DIR/NAME.bpf.o`.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    let sources = std::fs::read_dir("src").expect("ebpf/src is readable");
    for entry in sources {
        let path = entry.expect("ebpf/src entry is readable").path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".bpf.c") else {
            continue;
        };
        println!("cargo:rerun-if-changed={}", path.display());
        let object = out_dir.join(format!("{stem}.bpf.o"));
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg("-I/usr/include/x86_64-linux-gnu")
            .arg("-c")
            .arg(&path)
            .arg("-o")
            .arg(&object)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("clang failed to compile {} ({s})", path.display()),
            Err(e) => panic!(
                "cannot run `{clang}` to compile the eBPF program {} ({e}): install clang and \
                 libbpf-dev (`cargo xtask deps`), or point the CLANG variable at a clang binary",
                path.display()
            ),
        }
    }
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-env-changed=CLANG");
}
