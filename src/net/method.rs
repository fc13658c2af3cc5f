//! What a declared RPC method is: its wire name, call shape and policy. `build.rs` generates
//! one typed descriptor per `rpc` of the `service` blocks in `proto/` (for example
//! `proto::control::rpc::CREATE_SERVICE`) and the table of them all
//! ([`crate::proto::METHODS`]); the router registers handlers by descriptor and checks
//! callers against the descriptor's policy, the leader checks forwarded callers against it,
//! and nothing else lists methods.
//!
//! A policy is declared by a line in the rpc's leading comment, every word required once:
//!
//! ```text
//! // policy: allow=operators access=write forward=yes idempotent=no demoted=no internal=no
//! ```
//!
//! - `allow`: who may call ([`Allow`]): `managers`, `operators` (managers and admins),
//!   `nodes` (managers and workers) or `anyone` (no certificate needed).
//! - `access`: `read` changes nothing; `write` may change the cluster's or the Raft group's
//!   state.
//! - `forward`: `yes` for a write that runs on the leader and that a follower forwards
//!   there inside `control.Forward`, with the caller's identity (it then has a field in the
//!   forward oneofs, which `build.rs` checks).
//! - `idempotent`: `yes` if sending the same request again after an unknown outcome
//!   answers as the first attempt did (or equivalently).
//! - `demoted`: `yes` if a demoted manager's certificate may still call it (see
//!   `control::access`).
//! - `internal`: `yes` for a forwarded write never served to a caller directly: only run by
//!   the leader, on its own behalf or inside a forward.
//!
//! This module must never depend on what a method does.

use std::marker::PhantomData;

use super::server::Allow;

/// How a call's messages flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One request, one reply.
    Unary,
    /// One request, a stream of replies.
    ServerStream,
    /// A stream of requests, one reply.
    ClientStream,
}

/// Whether a method changes state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Changes nothing.
    Read,
    /// May change the cluster's or the Raft group's state.
    Write,
}

/// Who may call a method and how it is run (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The roles that may call it.
    pub allow: Allow,
    /// Read or write.
    pub access: Access,
    /// A follower forwards it to the leader.
    pub forward: bool,
    /// A repeated request answers as the first did.
    pub idempotent: bool,
    /// A demoted manager's certificate may still call it.
    pub demoted: bool,
    /// Never served to a caller directly (only run by the leader).
    pub internal: bool,
}

impl Policy {
    /// The policy of a method not declared in `proto/` (tests, benchmarks): `allow`, and
    /// nothing else granted.
    pub const fn undeclared(allow: Allow) -> Self {
        Self {
            allow,
            access: Access::Write,
            forward: false,
            idempotent: false,
            demoted: false,
            internal: false,
        }
    }
}

/// One method: its wire name, shape and policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Method {
    /// The wire name, `<package>.<Rpc>` (e.g. `control.CreateService`).
    pub name: &'static str,
    /// Its call shape.
    pub shape: Shape,
    /// Who may call it, and how it runs.
    pub policy: Policy,
}

macro_rules! typed_method {
    ($(#[$doc:meta])* $name:ident, $shape:path) => {
        $(#[$doc])*
        pub struct $name<Req, Resp> {
            method: Method,
            _types: PhantomData<fn(Req) -> Resp>,
        }

        impl<Req, Resp> $name<Req, Resp> {
            /// The descriptor of `method` (generated code only).
            ///
            /// # Panics
            /// At compile time, if `method` has another shape.
            pub const fn declare(method: Method) -> Self {
                assert!(matches!(method.shape, $shape), "a descriptor of the wrong shape");
                Self {
                    method,
                    _types: PhantomData,
                }
            }

            /// The method.
            pub const fn method(&self) -> Method {
                self.method
            }

            /// Its wire name.
            pub const fn name(&self) -> &'static str {
                self.method.name
            }

            /// Its policy.
            pub const fn policy(&self) -> Policy {
                self.method.policy
            }
        }

        impl<Req, Resp> Clone for $name<Req, Resp> {
            fn clone(&self) -> Self {
                *self
            }
        }

        impl<Req, Resp> Copy for $name<Req, Resp> {}

        impl<Req, Resp> std::fmt::Debug for $name<Req, Resp> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.method.name)
            }
        }
    };
}

typed_method!(
    /// A unary method taking `Req` and answering `Resp`.
    UnaryMethod,
    Shape::Unary
);
typed_method!(
    /// A server-streaming method taking `Req` and answering a stream of `Resp`.
    ServerStreamMethod,
    Shape::ServerStream
);
typed_method!(
    /// A client-streaming method taking a stream of `Req` and answering `Resp`.
    ClientStreamMethod,
    Shape::ClientStream
);

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::proto::{METHODS, method_index};

    fn names(filter: impl Fn(&Method) -> bool) -> BTreeSet<&'static str> {
        METHODS
            .iter()
            .filter(|m| filter(m))
            .map(|m| m.name)
            .collect()
    }

    fn in_service(method: &Method, service: &str) -> bool {
        method.name.split_once('.').map(|(s, _)| s) == Some(service)
    }

    #[test]
    fn every_declared_method_is_found_by_its_name_and_nothing_else_is() {
        let mut seen = BTreeSet::new();
        for (index, method) in METHODS.iter().enumerate() {
            assert!(seen.insert(method.name), "{} declared twice", method.name);
            assert_eq!(method_index(method.name), Some(index), "{}", method.name);
        }
        for unknown in [
            "",
            "raft.step",
            "raft.Ste",
            "raft.Steps",
            "control.Nope",
            "test.Echo",
            "Step",
        ] {
            assert_eq!(method_index(unknown), None, "{unknown:?}");
        }
        let services: BTreeSet<&str> = METHODS
            .iter()
            .filter_map(|m| m.name.split_once('.').map(|(s, _)| s))
            .collect();
        assert_eq!(
            services,
            BTreeSet::from(["ca", "control", "dispatcher", "gossip", "kv", "raft"])
        );
    }

    #[test]
    fn who_may_call_each_service_is_as_before() {
        for method in &METHODS {
            let expected = match method.name {
                "ca.GetRootCa" | "ca.IssueNodeCertificate" => Allow::ANYONE,
                "ca.RenewNodeCertificate" => Allow::NODES,
                "control.Forward" | "control.ReportManager" | "control.PublishRootCa" => {
                    Allow::MANAGERS
                }
                name if name.starts_with("control.") => Allow::OPERATORS,
                name if name.starts_with("dispatcher.") => Allow::NODES,
                // Every node gossips, a worker too.
                name if name.starts_with("gossip.") => Allow::NODES,
                name if name.starts_with("raft.") || name.starts_with("kv.") => Allow::MANAGERS,
                other => panic!("{other}: a method this test does not know"),
            };
            assert_eq!(method.policy.allow, expected, "{}", method.name);
        }
    }

    #[test]
    fn a_demoted_manager_reaches_raft_the_dispatcher_its_node_and_renewal_only() {
        let demoted = names(|m| m.policy.demoted);
        // It goes on running tasks as a worker, so it gossips too.
        let mut expected = names(|m| {
            in_service(m, "raft") || in_service(m, "dispatcher") || in_service(m, "gossip")
        });
        expected.extend(["control.GetNode", "ca.RenewNodeCertificate"]);
        assert_eq!(demoted, expected);
    }

    #[test]
    fn streams_have_their_shapes() {
        assert_eq!(
            names(|m| m.shape == Shape::ServerStream),
            BTreeSet::from([
                "control.ListConfigs",
                "control.ListNetworks",
                "control.ListNodes",
                "control.ListSecrets",
                "control.ListServices",
                "control.ListTasks",
                "control.ServiceLogs",
                "control.Watch",
                "dispatcher.Session",
            ])
        );
        assert_eq!(
            names(|m| m.shape == Shape::ClientStream),
            BTreeSet::from(["gossip.BulkSync", "raft.InstallSnapshot"])
        );
    }

    #[test]
    fn only_writes_are_forwarded_and_only_forwarded_writes_are_internal() {
        for method in &METHODS {
            let policy = method.policy;
            if policy.forward {
                assert_eq!(policy.access, Access::Write, "{}", method.name);
                assert_eq!(method.shape, Shape::Unary, "{}", method.name);
            }
            if policy.internal {
                assert!(policy.forward, "{}", method.name);
            }
            if policy.access == Access::Read {
                assert!(
                    policy.idempotent,
                    "{} reads and may be repeated",
                    method.name
                );
            }
        }
    }
}
