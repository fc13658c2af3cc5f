//! Compiles `proto/**/*.proto` with protox (a pure-Rust protobuf compiler) and prost-build,
//! so a fresh machine builds with `cargo build` alone: no system `protoc`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut files: Vec<PathBuf> = Vec::new();
    collect_protos(&PathBuf::from("proto"), &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(&files, ["proto"])?;
    let mut config = prost_build::Config::new();
    // Payloads are shared between a frame and its retransmissions without copying.
    config.bytes(["."]);
    // Store objects are snapshotted on every manager: ordered maps make their encoding
    // identical everywhere.
    config.btree_map([".flotilla.objects"]);
    // The CA key must never reach a log through `{:?}`: its Debug is written by hand
    // (src/proto.rs) and prints no key bytes.
    config.skip_debug([".flotilla.objects.RootCaKey"]);
    add_json_attributes(&mut config, &descriptors);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("proto_enums.rs"), enum_impls(&descriptors))?;
    config.compile_fds(descriptors)?;
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
    ".flotilla.objects.Cluster",
];

/// Secrets: never `Serialize`, and a field holding one is skipped, so no JSON can carry
/// them (the control API redacts them as well).
const JSON_SECRETS: &[&str] = &[
    ".flotilla.objects.RootCaKey",
    ".flotilla.objects.JoinTokens",
    ".flotilla.objects.EncryptionKey",
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

/// `TaskState` → `TASK_STATE` (the prefix protobuf style gives every value of an enum).
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
