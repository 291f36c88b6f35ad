//! Finds DPDK through pkg-config (`libdpdk`), generates bindings with bindgen and compiles
//! the C shim, passing DPDK's own cflags (including `-include rte_config.h` and its `-march`)
//! to both, and links the libraries dynamically.

#[cfg(feature = "link")]
use std::path::PathBuf;
#[cfg(feature = "link")]
use std::process::Command;

#[cfg(feature = "link")]
fn pkg_config(args: &[&str]) -> Vec<String> {
    let out = Command::new("pkg-config")
        .args(args)
        .arg("libdpdk")
        .output()
        .unwrap_or_else(|e| panic!("cannot run pkg-config: {e} (install pkg-config)"));
    if !out.status.success() {
        panic!(
            "pkg-config cannot find libdpdk: {} (the `dpdk` feature needs DPDK 22.11: apt-get \
             install libdpdk-dev libclang-dev)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[cfg(not(feature = "link"))]
fn main() {
    // An empty crate: nothing of DPDK (nor bindgen) is needed.
}

#[cfg(feature = "link")]
fn main() {
    println!("cargo:rerun-if-changed=c/shim.c");
    println!("cargo:rerun-if-changed=c/shim.h");
    println!("cargo:rerun-if-changed=c/wrapper.h");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    let version = pkg_config(&["--modversion"]).join("");
    if !version.starts_with("22.11") {
        println!("cargo:warning=built against DPDK {version}; nfmgr is tested with 22.11");
    }
    let cflags = pkg_config(&["--cflags"]);

    let mut cc = cc::Build::new();
    cc.file("c/shim.c").include("c").warnings(true).opt_level(2);
    // rte_pktmbuf_pool_create_extbuf is marked experimental in 22.11.
    cc.define("ALLOW_EXPERIMENTAL_API", None);
    for f in &cflags {
        cc.flag(f);
    }
    cc.compile("nfdpdkshim");

    for f in pkg_config(&["--libs"]) {
        if let Some(lib) = f.strip_prefix("-l") {
            println!("cargo:rustc-link-lib=dylib={lib}");
        } else if let Some(dir) = f.strip_prefix("-L") {
            println!("cargo:rustc-link-search=native={dir}");
        } else if f.starts_with("-Wl,") {
            // --as-needed: keep every library (drivers are plugins loaded by the EAL).
        }
    }

    let bindings = bindgen::Builder::default()
        .header("c/wrapper.h")
        .clang_args(cflags.iter().filter(|f| !f.starts_with("-march")))
        .clang_arg("-Ic")
        .allowlist_function("rte_eal_init|rte_eal_cleanup|rte_eal_iova_mode|rte_strerror")
        .allowlist_function("rte_eth_dev_.*|rte_eth_rx_queue_setup|rte_eth_tx_queue_setup")
        .allowlist_function("rte_eth_stats_get|rte_eth_link_get_nowait|rte_eth_macaddr_get")
        .allowlist_function("rte_eth_promiscuous_enable|rte_eth_dev_count_avail")
        .allowlist_function("rte_extmem_register|rte_extmem_unregister|rte_dev_dma_map")
        .allowlist_function("rte_mempool_free|rte_thread_register|rte_lcore_id")
        .allowlist_function("rte_version|rte_openlog_stream|rte_log_set_global_level")
        .allowlist_function("nf_.*")
        .allowlist_type("rte_eth_conf|rte_eth_stats|rte_eth_link|rte_eth_dev_info")
        .allowlist_type("rte_ether_addr|nf_pool_hooks")
        .allowlist_var("RTE_ETH_.*|RTE_MAX_ETHPORTS|RTE_BAD_IOVA|RTE_LOG_.*|SOCKET_ID_ANY")
        .opaque_type("rte_mbuf|rte_mempool")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .generate()
        .expect("bindgen could not generate DPDK bindings (is libclang-dev installed?)");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings");
}
