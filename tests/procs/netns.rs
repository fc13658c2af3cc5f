//! Hosts in network namespaces joined by a bridge, so a test can cut one host's link and
//! heal it: a real partition. Everything is named after the test process's pid and
//! removed on drop; nothing else on the machine is touched.
#![allow(dead_code)]

use std::process::Command;

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `n` namespaces on one bridge, host side reachable at `.254`.
pub struct Hosts {
    tag: u32,
    subnet: u32,
    n: usize,
}

impl Hosts {
    /// Creates the bridge and `n` namespaces with addresses `10.231.<s>.<i+1>`.
    pub fn create(n: usize) -> Hosts {
        // Tests of one binary run in parallel in one process: each set gets its own tag.
        static CREATED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let serial = CREATED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 10;
        let tag = (std::process::id() % 10_000) * 10 + serial;
        let hosts = Hosts {
            tag,
            subnet: tag % 250,
            n,
        };
        hosts.teardown();
        let bridge = hosts.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("10.231.{}.254/24", hosts.subnet),
            "dev",
            &bridge,
        ]);
        ip(&["link", "set", &bridge, "up"]);
        for i in 0..n {
            let (ns, host_end, ns_end) = (hosts.ns(i), hosts.host_end(i), hosts.ns_end(i));
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ]);
            ip(&["link", "set", &ns_end, "netns", &ns]);
            ip(&["link", "set", &host_end, "master", &bridge]);
            ip(&["link", "set", &host_end, "up"]);
            let addr = format!("{}/24", hosts.addr(i));
            ip(&[
                "netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", &ns_end,
            ]);
            ip(&["netns", "exec", &ns, "ip", "link", "set", &ns_end, "up"]);
            ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        }
        hosts
    }

    fn bridge(&self) -> String {
        format!("fb{}", self.tag)
    }

    /// Namespace name of host `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("fn{}h{i}", self.tag)
    }

    fn host_end(&self, i: usize) -> String {
        format!("fv{}h{i}", self.tag)
    }

    fn ns_end(&self, i: usize) -> String {
        format!("fp{}h{i}", self.tag)
    }

    /// Address of host `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("10.231.{}.{}", self.subnet, i + 1)
    }

    /// The command prefix that runs a program on host `i`.
    pub fn wrapper(&self, i: usize) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.ns(i)]
    }

    /// Takes host `i`'s link down: it can reach nobody and nobody can reach it.
    pub fn cut(&self, i: usize) {
        ip(&["link", "set", &self.host_end(i), "down"]);
    }

    /// Brings host `i`'s link back.
    pub fn heal(&self, i: usize) {
        ip(&["link", "set", &self.host_end(i), "up"]);
    }

    fn teardown(&self) {
        for i in 0..self.n {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &self.host_end(i)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .output();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.teardown();
    }
}
