//! What an agent says about its host in each session request (`NodeDescription`): its
//! platform, its resources (CPU count, memory) and the address it reaches its manager from.
//!
//! Owns nothing; reads `/proc/meminfo` and asks the kernel for a route (`connect` on a UDP
//! socket sends nothing; a manager named by host name is resolved as the dialer resolves
//! it). Must never send a packet or fail a session for want of a figure (an unknown one is
//! left 0 or empty).

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};

use crate::proto::objects::{NodeDescription, Platform, Resources};

/// Nano-CPUs per CPU (`Resources.nano_cpus` counts 1e-9 CPUs).
const NANO_CPUS_PER_CPU: i64 = 1_000_000_000;

/// The platform and resources of this host, with `tasks_max` as the agent's capacity.
pub fn describe(tasks_max: u32) -> NodeDescription {
    NodeDescription {
        platform: Some(Platform {
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
        }),
        resources: Some(Resources {
            nano_cpus: cpu_count().saturating_mul(NANO_CPUS_PER_CPU),
            memory_bytes: memory_bytes().unwrap_or(0),
        }),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        tasks_max,
        addr: String::new(),
    }
}

/// CPUs this process may run on (its affinity mask and cgroup quota, as `std` reads them).
fn cpu_count() -> i64 {
    std::thread::available_parallelism()
        .ok()
        .and_then(|n| i64::try_from(n.get()).ok())
        .unwrap_or(1)
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn memory_bytes() -> Option<i64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total(&meminfo)
}

fn parse_mem_total(meminfo: &str) -> Option<i64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The local IP address of this host's route to `manager` (`HOST:PORT`), if the name
/// resolves and a route exists. No packet is sent.
pub fn local_addr_towards(manager: &str) -> Option<String> {
    let target: SocketAddr = manager.to_socket_addrs().ok()?.next()?;
    let unspecified: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let socket = UdpSocket::bind(unspecified).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_holds_cpus_memory_and_platform() {
        let description = describe(7);
        let resources = description.resources.expect("resources");
        assert!(resources.nano_cpus >= NANO_CPUS_PER_CPU);
        assert_eq!(resources.nano_cpus % NANO_CPUS_PER_CPU, 0);
        assert!(resources.memory_bytes > 0);
        assert_eq!(description.tasks_max, 7);
        assert_eq!(description.platform.expect("platform").os, "linux");
    }

    #[test]
    fn mem_total_is_read_in_bytes() {
        let meminfo = "MemFree:  10 kB\nMemTotal:       16316412 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(16_316_412 * 1024));
        assert_eq!(parse_mem_total("nothing"), None);
    }

    #[test]
    fn the_route_to_a_loopback_manager_starts_at_loopback() {
        assert_eq!(
            local_addr_towards("127.0.0.1:4242").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(local_addr_towards("no-such-host.invalid:1"), None);
    }
}
