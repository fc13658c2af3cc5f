//! Compiles `proto/**/*.proto` with protox (a pure-Rust protobuf compiler) and prost-build,
//! so a fresh machine builds with `cargo build` alone: no system `protoc`.
//!
//! The `service` blocks are the RPC API's only declaration. From each one this generates,
//! into its package's module, a `rpc` module: the wire names (`rpc::name::*`), a typed
//! descriptor per method carrying its policy (`rpc::CREATE_SERVICE`, ...), the service's
//! method table (`rpc::METHODS`), a typed client stub (`rpc::Client`), and for a service with
//! forwarded writes the glue of its `ForwardRequest`/`ForwardResponse` oneofs
//! (`rpc::forward`). `rpc_methods.rs` holds every declared method and the name lookup the
//! router dispatches with. The policy of each rpc is a `policy:` line in its leading
//! comment, parsed strictly: a missing, repeated or unknown word fails the build (the words
//! are documented in `src/net/method.rs`).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::rc::Rc;

use prost_build::{Service, ServiceGenerator};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut files: Vec<PathBuf> = Vec::new();
    collect_protos(&PathBuf::from("proto"), &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(&files, ["proto"])?;
    let declared = Rc::new(RefCell::new(Declared::default()));
    let mut config = prost_build::Config::new();
    // Payloads are shared between a frame and its retransmissions without copying.
    config.bytes(["."]);
    // Store objects are snapshotted on every manager: ordered maps make their encoding
    // identical everywhere.
    config.btree_map([".flotilla.objects"]);
    // The CA key must never reach a log through `{:?}`: its Debug is written by hand
    // (src/proto.rs) and prints no key bytes.
    config.skip_debug([
        ".flotilla.objects.RootCaKey",
        ".flotilla.objects.EncryptionKey",
        ".flotilla.objects.SecretSpec",
    ]);
    add_json_attributes(&mut config, &descriptors);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("proto_enums.rs"), enum_impls(&descriptors))?;
    config.service_generator(Box::new(RpcGenerator {
        declared: declared.clone(),
    }));
    config.compile_fds(descriptors.clone())?;
    let declared = declared.borrow();
    if !declared.errors.is_empty() {
        return Err(format!("proto/: {}", declared.errors.join("\n")).into());
    }
    check_forward_oneofs(&declared, &descriptors)?;
    std::fs::write(
        out_dir.join("rpc_methods.rs"),
        method_table(&declared.methods),
    )?;
    Ok(())
}

fn collect_protos(dir: &PathBuf, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

/// What the generator saw, for the checks and the global table that follow it.
#[derive(Default)]
struct Declared {
    methods: Vec<DeclaredMethod>,
    errors: Vec<String>,
}

struct DeclaredMethod {
    /// `control.CreateService`.
    wire_name: String,
    /// `crate::proto::control::rpc::CREATE_SERVICE`.
    descriptor_path: String,
    /// `flotilla.control`.
    package: String,
    /// `create_service`.
    snake_name: String,
    /// `.flotilla.control.CreateServiceRequest`.
    input_proto_type: String,
    output_proto_type: String,
    forward: bool,
}

struct RpcGenerator {
    declared: Rc<RefCell<Declared>>,
}

/// A method's policy, parsed from its `policy:` line.
struct Policy {
    allow: &'static str,
    access: &'static str,
    forward: bool,
    idempotent: bool,
    demoted: bool,
    internal: bool,
}

const POLICY_PREFIX: &str = "policy:";
const POLICY_KEYS: [&str; 6] = [
    "allow",
    "access",
    "forward",
    "idempotent",
    "demoted",
    "internal",
];

fn yes_no(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => Err(format!("{key}={other}: expected yes or no")),
    }
}

/// Parses `policy: allow=… access=… forward=… idempotent=… demoted=… internal=…`: every key
/// exactly once, nothing else.
fn parse_policy(line: &str) -> Result<Policy, String> {
    let mut values: BTreeMap<&str, &str> = BTreeMap::new();
    for word in line.split_whitespace() {
        let (key, value) = word
            .split_once('=')
            .ok_or_else(|| format!("{word:?}: expected key=value"))?;
        if !POLICY_KEYS.contains(&key) {
            return Err(format!(
                "unknown policy key {key:?} (known: {})",
                POLICY_KEYS.join(", ")
            ));
        }
        if values.insert(key, value).is_some() {
            return Err(format!("policy key {key:?} given twice"));
        }
    }
    let missing: Vec<&str> = POLICY_KEYS
        .iter()
        .copied()
        .filter(|key| !values.contains_key(key))
        .collect();
    if !missing.is_empty() {
        return Err(format!("policy keys missing: {}", missing.join(", ")));
    }
    let allow = match values["allow"] {
        "managers" => "MANAGERS",
        "operators" => "OPERATORS",
        "nodes" => "NODES",
        "anyone" => "ANYONE",
        other => {
            return Err(format!(
                "allow={other}: expected managers, operators, nodes or anyone"
            ));
        }
    };
    let access = match values["access"] {
        "read" => "Read",
        "write" => "Write",
        other => return Err(format!("access={other}: expected read or write")),
    };
    let policy = Policy {
        allow,
        access,
        forward: yes_no("forward", values["forward"])?,
        idempotent: yes_no("idempotent", values["idempotent"])?,
        demoted: yes_no("demoted", values["demoted"])?,
        internal: yes_no("internal", values["internal"])?,
    };
    if policy.forward && access != "Write" {
        return Err("forward=yes needs access=write: only writes run on the leader".into());
    }
    if policy.internal && !policy.forward {
        return Err(
            "internal=yes needs forward=yes: an internal method is reached only through a \
             forward or on the leader itself"
                .into(),
        );
    }
    Ok(policy)
}

/// The doc lines of a comment, without its policy line.
fn doc_lines(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .flat_map(|block| block.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|line| !line.trim_start().starts_with(POLICY_PREFIX))
        .map(|line| line.trim_end().to_string())
        .collect()
}

fn push_doc(buf: &mut String, indent: &str, lines: &[String]) {
    for line in lines {
        let line = line.strip_prefix(' ').unwrap_or(line);
        let _ = writeln!(
            buf,
            "{indent}///{}{line}",
            if line.is_empty() { "" } else { " " }
        );
    }
}

struct Shaped {
    shape: &'static str,
    descriptor_type: &'static str,
}

fn shape_of(method: &prost_build::Method) -> Result<Shaped, String> {
    match (method.client_streaming, method.server_streaming) {
        (false, false) => Ok(Shaped {
            shape: "Unary",
            descriptor_type: "UnaryMethod",
        }),
        (false, true) => Ok(Shaped {
            shape: "ServerStream",
            descriptor_type: "ServerStreamMethod",
        }),
        (true, false) => Ok(Shaped {
            shape: "ClientStream",
            descriptor_type: "ClientStreamMethod",
        }),
        (true, true) => Err("bidirectional streams are not supported by the transport".into()),
    }
}

impl RpcGenerator {
    fn generate_rpc_module(&mut self, service: &Service) -> Result<String, String> {
        let package_leaf = service
            .package
            .rsplit('.')
            .next()
            .expect("rsplit yields at least one piece");
        if service.proto_name.to_ascii_lowercase() != package_leaf {
            return Err(format!(
                "service {} in package {}: name it after its package ({}), whose last part \
                 is the prefix of its wire names",
                service.proto_name, service.package, package_leaf
            ));
        }
        let mut names = String::new();
        let mut descriptors = String::new();
        let mut table = String::new();
        let mut client = String::new();
        let mut forwarded: Vec<(String, String, String, String)> = Vec::new();
        for method in &service.methods {
            let policy_lines: Vec<&str> = method
                .comments
                .leading
                .iter()
                .flat_map(|block| block.lines())
                .map(str::trim)
                .filter(|line| line.starts_with(POLICY_PREFIX))
                .collect();
            let [policy_line] = policy_lines.as_slice() else {
                return Err(format!(
                    "rpc {}.{}: needs exactly one `policy:` line in its leading comment \
                     (found {})",
                    service.proto_name,
                    method.proto_name,
                    policy_lines.len()
                ));
            };
            let policy = parse_policy(&policy_line[POLICY_PREFIX.len()..])
                .map_err(|e| format!("rpc {}.{}: {e}", service.proto_name, method.proto_name))?;
            let shaped = shape_of(method)
                .map_err(|e| format!("rpc {}.{}: {e}", service.proto_name, method.proto_name))?;
            let wire_name = format!("{package_leaf}.{}", method.proto_name);
            let constant = upper_snake(&method.name);
            let input = format!("super::{}", method.input_type);
            let output = format!("super::{}", method.output_type);
            let doc = doc_lines(&method.comments.leading);
            let _ = writeln!(names, "        /// `{wire_name}`.");
            let _ = writeln!(
                names,
                "        pub const {constant}: &str = \"{wire_name}\";"
            );
            push_doc(&mut descriptors, "    ", &doc);
            let _ = writeln!(
                descriptors,
                "    pub const {constant}: {ty}<{input}, {output}> = {ty}::declare(Method {{\n        \
                 name: name::{constant},\n        shape: Shape::{shape},\n        policy: Policy {{\n            \
                 allow: Allow::{allow},\n            access: Access::{access},\n            \
                 forward: {forward},\n            idempotent: {idempotent},\n            \
                 demoted: {demoted},\n            internal: {internal},\n        }},\n    }});",
                ty = shaped.descriptor_type,
                shape = shaped.shape,
                allow = policy.allow,
                access = policy.access,
                forward = policy.forward,
                idempotent = policy.idempotent,
                demoted = policy.demoted,
                internal = policy.internal,
            );
            let _ = writeln!(table, "        {constant}.method(),");
            push_doc(&mut client, "        ", &doc);
            let stub = match shaped.shape {
                "Unary" => format!(
                    "        pub fn {snake}(&self, request: &{input}, options: CallOptions) -> \
                     Result<{output}, Status> {{\n            self.channel.call({constant}, \
                     request, options)\n        }}\n",
                    snake = method.name
                ),
                "ServerStream" => format!(
                    "        pub fn {snake}(&self, request: &{input}, options: CallOptions) -> \
                     Result<crate::net::ResponseStream<{output}>, Status> {{\n            \
                     self.channel.call_server_stream({constant}, request, options)\n        }}\n",
                    snake = method.name
                ),
                _ => format!(
                    "        pub fn {snake}(&self, options: CallOptions) -> \
                     Result<crate::net::RequestStream<{input}, {output}>, Status> {{\n            \
                     self.channel.call_client_stream({constant}, options)\n        }}\n",
                    snake = method.name
                ),
            };
            client.push_str(&stub);
            if policy.forward {
                if shaped.shape != "Unary" {
                    return Err(format!(
                        "rpc {}.{}: forward=yes needs a unary method",
                        service.proto_name, method.proto_name
                    ));
                }
                forwarded.push((
                    constant.clone(),
                    variant_name(&method.proto_name),
                    input.clone(),
                    output.clone(),
                ));
            }
            self.declared.borrow_mut().methods.push(DeclaredMethod {
                wire_name,
                descriptor_path: format!("crate::proto::{package_leaf}::rpc::{constant}"),
                package: service.package.clone(),
                snake_name: method.name.clone(),
                input_proto_type: method.input_proto_type.clone(),
                output_proto_type: method.output_proto_type.clone(),
                forward: policy.forward,
            });
        }
        let mut buf = String::new();
        let service_doc = doc_lines(&service.comments.leading);
        let _ = writeln!(
            buf,
            "/// Service `{}` as declared in `proto/` (generated by `build.rs`): its wire names, \
             a typed\n/// descriptor with the policy of each method, its method table and a \
             typed client stub.\n///",
            service.proto_name
        );
        push_doc(&mut buf, "", &service_doc);
        buf.push_str("pub mod rpc {\n");
        buf.push_str(
            "    #[allow(unused_imports)]\n    use crate::net::method::{\n        Access, \
             ClientStreamMethod, Method, Policy, ServerStreamMethod, Shape, UnaryMethod,\n    \
             };\n    use crate::net::{Allow, CallOptions, Channel};\n    use crate::wire::Status;\n\n",
        );
        buf.push_str("    /// The wire names of the methods.\n    pub mod name {\n");
        buf.push_str(&names);
        buf.push_str("    }\n\n");
        buf.push_str(&descriptors);
        let count = service.methods.len();
        let _ = writeln!(
            buf,
            "\n    /// Every method of the service, in declaration order.\n    pub const \
             METHODS: [Method; {count}] = [\n{table}    ];\n"
        );
        let _ = writeln!(
            buf,
            "    /// Typed calls of service `{}` over one channel.\n    pub struct Client<'a> {{\n        \
             channel: &'a Channel,\n    }}\n\n    impl<'a> Client<'a> {{\n        /// Calls on \
             `channel`.\n        pub fn new(channel: &'a Channel) -> Self {{\n            Self {{ \
             channel }}\n        }}\n\n{client}    }}",
            service.proto_name
        );
        if !forwarded.is_empty() {
            buf.push_str(&forward_module(&forwarded));
        }
        buf.push_str("}\n");
        Ok(buf)
    }
}

/// `CreateService` → the oneof variant prost generates for field `create_service`.
fn variant_name(proto_name: &str) -> String {
    proto_name.to_string()
}

/// The glue between the forwarded writes' descriptors and the `call`/`reply` oneofs of
/// `ForwardRequest`/`ForwardResponse` (their shape is checked after generation).
fn forward_module(forwarded: &[(String, String, String, String)]) -> String {
    let mut buf = String::from(
        "\n    /// The writes a follower forwards to the leader, typed: how each one's request and \
         reply\n    /// travel in `ForwardRequest.call` and `ForwardResponse.reply`.\n    pub mod \
         forward {\n        use super::super::forward_request::Call;\n        use \
         super::super::forward_response::Reply;\n        use crate::net::method::{Method, \
         UnaryMethod};\n\n        /// A forwardable write: its descriptor, and its place in the \
         forward oneofs.\n        pub struct Write<Req, Resp> {\n            /// The method.\n            \
         pub method: UnaryMethod<Req, Resp>,\n            /// Its request as the forward's \
         call.\n            pub wrap: fn(Req) -> Call,\n            /// Its reply, if the forward's \
         reply is this method's.\n            pub unwrap: fn(Reply) -> Option<Resp>,\n        }\n\n        \
         impl<Req, Resp> Clone for Write<Req, Resp> {\n            fn clone(&self) -> Self {\n                \
         *self\n            }\n        }\n\n        impl<Req, Resp> Copy for Write<Req, Resp> {}\n\n",
    );
    for (constant, variant, input, output) in forwarded {
        let _ = writeln!(
            buf,
            "        /// [`super::{constant}`], forwarded.\n        pub const {constant}: \
             Write<super::{input}, super::{output}> = Write {{\n            method: \
             super::{constant},\n            wrap: Call::{variant},\n            unwrap: |reply| \
             match reply {{\n                Reply::{variant}(reply) => Some(reply),\n                \
             _ => None,\n            }},\n        }};\n"
        );
    }
    buf.push_str(
        "        /// The method a forwarded call runs.\n        pub fn method_of(call: &Call) -> \
         Method {\n            match call {\n",
    );
    for (constant, variant, _, _) in forwarded {
        let _ = writeln!(
            buf,
            "                Call::{variant}(_) => super::{constant}.method(),"
        );
    }
    buf.push_str("            }\n        }\n    }\n");
    buf
}

impl ServiceGenerator for RpcGenerator {
    fn generate(&mut self, service: Service, buf: &mut String) {
        match self.generate_rpc_module(&service) {
            Ok(code) => buf.push_str(&code),
            Err(error) => self.declared.borrow_mut().errors.push(error),
        }
    }
}

/// The fields of oneof `oneof` of message `message`: name → type.
fn oneof_fields(
    descriptors: &FileDescriptorSet,
    package: &str,
    message: &str,
    oneof: &str,
) -> Result<BTreeMap<String, String>, String> {
    let found = descriptors
        .file
        .iter()
        .filter(|file| file.package() == package)
        .flat_map(|file| file.message_type.iter())
        .find(|m| m.name() == message)
        .ok_or_else(|| format!("package {package} has forwarded writes but no {message}"))?;
    let index = found
        .oneof_decl
        .iter()
        .position(|o| o.name() == oneof)
        .ok_or_else(|| format!("{package}.{message} needs a oneof `{oneof}`"))?;
    Ok(found
        .field
        .iter()
        .filter(|f| f.oneof_index == Some(index as i32))
        .map(|f| (f.name().to_string(), f.type_name().to_string()))
        .collect())
}

/// `ForwardRequest.call` and `ForwardResponse.reply` of each package with forwarded writes
/// hold exactly one field per forward=yes method, named after it, of its request and response
/// types.
fn check_forward_oneofs(
    declared: &Declared,
    descriptors: &FileDescriptorSet,
) -> Result<(), Box<dyn std::error::Error>> {
    let packages: BTreeSet<&str> = declared
        .methods
        .iter()
        .filter(|m| m.forward)
        .map(|m| m.package.as_str())
        .collect();
    for package in packages {
        let wanted = |output: bool| -> BTreeMap<String, String> {
            declared
                .methods
                .iter()
                .filter(|m| m.forward && m.package == package)
                .map(|m| {
                    let ty = if output {
                        &m.output_proto_type
                    } else {
                        &m.input_proto_type
                    };
                    (m.snake_name.clone(), ty.clone())
                })
                .collect()
        };
        for (message, oneof, output) in [
            ("ForwardRequest", "call", false),
            ("ForwardResponse", "reply", true),
        ] {
            let found = oneof_fields(descriptors, package, message, oneof)?;
            let wanted = wanted(output);
            if found != wanted {
                let differ = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| {
                    a.iter()
                        .filter(|(name, ty)| b.get(*name) != Some(ty))
                        .map(|(name, ty)| format!("{ty} {name}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(format!(
                    "{package}.{message}.{oneof} must hold one field per forward=yes rpc, \
                     named after it, of its {} type; missing: [{}]; not forwarded: [{}]",
                    if output { "response" } else { "request" },
                    differ(&wanted, &found),
                    differ(&found, &wanted),
                )
                .into());
            }
        }
    }
    Ok(())
}

/// Every declared method, and the lookup by wire name the router dispatches with: a match on
/// the name's length, then on the name among the few of that length.
fn method_table(methods: &[DeclaredMethod]) -> String {
    let mut buf = String::from(
        "/// Every method declared in `proto/`, in declaration order (generated by `build.rs`).\n",
    );
    let _ = writeln!(
        buf,
        "pub static METHODS: [crate::net::method::Method; {}] = [",
        methods.len()
    );
    for method in methods {
        let _ = writeln!(buf, "    {}.method(),", method.descriptor_path);
    }
    buf.push_str("];\n\n");
    let mut by_len: BTreeMap<usize, Vec<(usize, &str)>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (index, method) in methods.iter().enumerate() {
        assert!(
            seen.insert(method.wire_name.as_str()),
            "method {} declared twice",
            method.wire_name
        );
        by_len
            .entry(method.wire_name.len())
            .or_default()
            .push((index, &method.wire_name));
    }
    buf.push_str(
        "/// The index in [`METHODS`] of the method named `name`, if it is declared.\n\
         pub fn method_index(name: &str) -> Option<usize> {\n    match name.len() {\n",
    );
    for (len, names) in &by_len {
        let _ = writeln!(buf, "        {len} => match name {{");
        for (index, name) in names {
            let _ = writeln!(buf, "            \"{name}\" => Some({index}),");
        }
        buf.push_str("            _ => None,\n        },\n");
    }
    buf.push_str("        _ => None,\n    }\n}\n");
    buf
}

// ---------------------------------------------------------------------------------------------
// JSON (`--format json`): serde derives on the generated types, with rules read from the
// descriptors instead of hand-written conversions. The helpers named here live in
// src/proto/json.rs.

/// The objects the CLI prints as JSON; they and every message they contain derive
/// `serde::Serialize`.
const JSON_ROOTS: &[&str] = &[
    ".flotilla.objects.Node",
    ".flotilla.objects.Service",
    ".flotilla.objects.Task",
    ".flotilla.objects.Network",
    ".flotilla.objects.Endpoint",
    ".flotilla.objects.Cluster",
    ".flotilla.objects.Secret",
    ".flotilla.objects.Config",
];

/// Secrets: never `Serialize`, and a field holding one is skipped, so no JSON can carry
/// them (the control API redacts them as well).
const JSON_SECRETS: &[&str] = &[
    ".flotilla.objects.RootCaKey",
    ".flotilla.objects.JoinTokens",
    ".flotilla.objects.EncryptionKey",
];

/// Fields never printed as JSON: a secret's value (`secret inspect` shows everything else).
const JSON_SKIPPED_FIELDS: &[&str] = &[
    ".flotilla.objects.SecretSpec.data",
    ".flotilla.objects.Cluster.secrets_key",
];

/// Messages whose fields appear in their parent's object (`"version"` beside `"id"`;
/// `"constraints"` in the task spec).
const JSON_FLATTENED: &[&str] = &[".flotilla.objects.Meta", ".flotilla.objects.Placement"];

/// `uint64` fields printed in hex, as the CLI prints and takes Raft ids everywhere.
const JSON_HEX_U64_FIELDS: &[&str] = &["raft_id"];

/// Every message of the descriptor set by full name (`.package.Message`, nested ones as
/// `.package.Outer.Inner`).
fn messages_by_name(descriptors: &FileDescriptorSet) -> BTreeMap<String, &DescriptorProto> {
    fn add<'a>(
        prefix: &str,
        message: &'a DescriptorProto,
        out: &mut BTreeMap<String, &'a DescriptorProto>,
    ) {
        let name = format!("{prefix}.{}", message.name());
        for nested in &message.nested_type {
            add(&name, nested, out);
        }
        out.insert(name, message);
    }
    let mut out = BTreeMap::new();
    for file in &descriptors.file {
        for message in &file.message_type {
            add(&format!(".{}", file.package()), message, &mut out);
        }
    }
    out
}

/// The Rust path of a top-level enum: `.flotilla.objects.TaskState` →
/// `crate::proto::objects::TaskState` (src/proto.rs names one module per package).
fn enum_rust_path(full_name: &str, top_level_enums: &BTreeSet<String>) -> String {
    assert!(
        top_level_enums.contains(full_name),
        "{full_name}: only top-level enums are printed as JSON; add a rule in build.rs"
    );
    let parts: Vec<&str> = full_name.trim_start_matches('.').split('.').collect();
    let (name, package) = parts.split_last().expect("a full name has segments");
    let module = package.last().expect("enums live in a package");
    format!("crate::proto::{module}::{name}")
}

fn top_level_enums(descriptors: &FileDescriptorSet) -> BTreeSet<String> {
    descriptors
        .file
        .iter()
        .flat_map(|file| {
            file.enum_type
                .iter()
                .map(move |e| format!(".{}.{}", file.package(), e.name()))
        })
        .collect()
}

/// Adds the serde attributes described at the top of this section.
fn add_json_attributes(config: &mut prost_build::Config, descriptors: &FileDescriptorSet) {
    let messages = messages_by_name(descriptors);
    let enums = top_level_enums(descriptors);
    let mut pending: Vec<String> = JSON_ROOTS.iter().map(ToString::to_string).collect();
    let mut done = BTreeSet::new();
    while let Some(name) = pending.pop() {
        if JSON_SECRETS.contains(&name.as_str()) || !done.insert(name.clone()) {
            continue;
        }
        let message = messages
            .get(&name)
            .unwrap_or_else(|| panic!("{name}: no such message"));
        config.type_attribute(&name, "#[derive(serde::Serialize)]");
        for field in &message.field {
            let path = format!("{name}.{}", field.name());
            let repeated = field.label() == Label::Repeated;
            if JSON_SKIPPED_FIELDS.contains(&path.as_str()) {
                config.field_attribute(&path, "#[serde(skip)]");
                continue;
            }
            let attribute = match field.r#type() {
                Type::Message => {
                    let type_name = field.type_name();
                    let target = messages
                        .get(type_name)
                        .unwrap_or_else(|| panic!("{type_name}: no such message"));
                    if target.options.as_ref().is_some_and(|o| o.map_entry()) {
                        // A map: serde prints it as an object. Its values need the rules too.
                        for entry_field in &target.field {
                            match entry_field.r#type() {
                                Type::Message => pending.push(entry_field.type_name().into()),
                                Type::Enum | Type::Bytes => {
                                    panic!("{path}: maps of enums or bytes need a rule in build.rs")
                                }
                                _ => {}
                            }
                        }
                        None
                    } else if JSON_SECRETS.contains(&type_name) {
                        Some("#[serde(skip)]".to_string())
                    } else {
                        pending.push(type_name.into());
                        JSON_FLATTENED
                            .contains(&type_name)
                            .then(|| "#[serde(flatten)]".to_string())
                    }
                }
                Type::Enum => {
                    assert!(
                        !repeated && !field.proto3_optional(),
                        "{path}: repeated or optional enums need a rule in build.rs"
                    );
                    let rust = enum_rust_path(field.type_name(), &enums);
                    Some(format!(
                        "#[serde(serialize_with = \"crate::proto::json::enum_label::<{rust}, _>\")]"
                    ))
                }
                Type::Bytes => {
                    assert!(
                        !repeated && !field.proto3_optional(),
                        "{path}: repeated or optional bytes need a rule in build.rs"
                    );
                    Some("#[serde(serialize_with = \"crate::proto::json::hex_bytes\")]".into())
                }
                Type::Uint64 if JSON_HEX_U64_FIELDS.contains(&field.name()) => {
                    assert!(
                        !repeated && !field.proto3_optional(),
                        "{path}: needs a rule"
                    );
                    Some("#[serde(serialize_with = \"crate::proto::json::hex_u64\")]".into())
                }
                _ => None,
            };
            if let Some(attribute) = attribute {
                config.field_attribute(&path, attribute);
            }
        }
    }
}

/// `impl crate::proto::json::ProtoEnum` for every top-level enum: its names come from the
/// protobuf names (prost's `as_str_name` / `from_str_name`), never from a hand table.
fn enum_impls(descriptors: &FileDescriptorSet) -> String {
    let enums = top_level_enums(descriptors);
    let mut out = String::from("// Generated by build.rs: the protobuf enums' names.\n");
    for file in &descriptors.file {
        for enumeration in &file.enum_type {
            let full = format!(".{}.{}", file.package(), enumeration.name());
            let rust = enum_rust_path(&full, &enums);
            let prefix = format!("{}_", upper_snake(enumeration.name()));
            let values: Vec<String> = enumeration
                .value
                .iter()
                .map(|v| v.number().to_string())
                .collect();
            out.push_str(&format!(
                "impl crate::proto::json::ProtoEnum for {rust} {{\n\
                 \x20   const NAME_PREFIX: &'static str = {prefix:?};\n\
                 \x20   const NUMBERS: &'static [i32] = &[{}];\n\
                 \x20   fn from_number(number: i32) -> Option<Self> {{ Self::try_from(number).ok() }}\n\
                 \x20   fn number(self) -> i32 {{ self as i32 }}\n\
                 \x20   fn proto_name(self) -> &'static str {{ self.as_str_name() }}\n\
                 \x20   fn from_proto_name(name: &str) -> Option<Self> {{ Self::from_str_name(name) }}\n\
                 }}\n",
                values.join(", ")
            ));
        }
    }
    out
}

/// `TaskState` → `TASK_STATE` (the prefix protobuf style gives every value of an enum);
/// `create_service` → `CREATE_SERVICE` (a method's constant).
fn upper_snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}
