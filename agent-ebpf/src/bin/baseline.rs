//! An empty cgroup connect4 program: the benchmark attaches it next to Airlock's so that the
//! kernel's own per-run cost (dispatch and `bpf_stats` accounting) is measured in the same run
//! and can be told apart from what Airlock's programs add.
#![no_std]
#![no_main]

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

#[cgroup_sock_addr(connect4)]
pub fn airlock_empty4(_ctx: SockAddrContext) -> i32 {
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
