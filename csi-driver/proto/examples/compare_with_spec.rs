//! Compares the descriptor of our `proto/csi.proto` (as embedded in the
//! crate) with a reference `csi.proto` from the CSI spec repository.
//!
//! Usage: `cargo run -p livedisk-csi-proto --example compare_with_spec -- PATH/TO/csi.proto`
//! (`check-against-spec.sh` finds the reference in the Go module cache).
//!
//! Everything that reaches the wire or a reflection client is compared:
//! package, imports, messages (nested, map entries), fields (number, label,
//! type, type name, oneof, JSON name), reserved numbers and names, enums and
//! their values, services and methods (types, streaming), the custom option
//! extensions, and every option set on any element. Comments, layout and
//! declaration order are not compared. Exit status 0 means identical.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

use protox::prost_reflect::{
    DescriptorPool, DynamicMessage, EnumDescriptor, FileDescriptor, MessageDescriptor,
};

const FILE_NAME: &str = "csi.proto";

fn options(message: &DynamicMessage) -> String {
    let mut set: Vec<String> = message
        .fields()
        .map(|(field, value)| format!("{}={value:?}", field.name()))
        .chain(
            message
                .extensions()
                .map(|(ext, value)| format!("({})={value:?}", ext.full_name())),
        )
        .collect();
    set.sort();
    format!("[{}]", set.join(", "))
}

fn dump_enum(e: &EnumDescriptor, out: &mut BTreeSet<String>) {
    let reserved: Vec<String> = e.reserved_ranges().map(|r| format!("{r:?}")).collect();
    let names: Vec<&str> = e.reserved_names().collect();
    out.insert(format!(
        "enum {} options={} reserved={reserved:?} reserved_names={names:?}",
        e.full_name(),
        options(&e.options())
    ));
    for v in e.values() {
        out.insert(format!(
            "enum-value {} = {} options={}",
            v.full_name(),
            v.number(),
            options(&v.options())
        ));
    }
}

fn dump_message(m: &MessageDescriptor, out: &mut BTreeSet<String>) {
    let reserved: Vec<String> = m.reserved_ranges().map(|r| format!("{r:?}")).collect();
    let names: Vec<&str> = m.reserved_names().collect();
    out.insert(format!(
        "message {} options={} reserved={reserved:?} reserved_names={names:?}",
        m.full_name(),
        options(&m.options())
    ));
    for f in m.fields() {
        let proto = f.field_descriptor_proto();
        out.insert(format!(
            "field {}.{} = {} label={:?} type={:?} type_name={} oneof={} json={} proto3_optional={} options={}",
            m.full_name(),
            f.name(),
            f.number(),
            proto.label(),
            proto.r#type(),
            proto.type_name(),
            f.containing_oneof()
                .map(|o| o.name().to_owned())
                .unwrap_or_default(),
            f.json_name(),
            proto.proto3_optional(),
            options(&f.options())
        ));
    }
    for o in m.oneofs() {
        let fields: Vec<String> = o.fields().map(|f| f.name().to_owned()).collect();
        out.insert(format!(
            "oneof {}.{} fields={fields:?} options={}",
            m.full_name(),
            o.name(),
            options(&o.options())
        ));
    }
    for child in m.child_messages() {
        dump_message(&child, out);
    }
    for e in m.child_enums() {
        dump_enum(&e, out);
    }
    for ext in m.child_extensions() {
        out.insert(format!("nested-extension {}", ext.full_name()));
    }
}

fn dump_file(file: &FileDescriptor) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let proto = file.file_descriptor_proto();
    out.insert(format!("package {}", file.package_name()));
    out.insert(format!("syntax {}", proto.syntax()));
    for dep in file.dependencies() {
        out.insert(format!("import {}", dep.name()));
    }
    // File options like go_package only steer other languages' code
    // generators; they are reported separately, not compared.
    for ext in file.extensions() {
        out.insert(format!(
            "extension {} = {} extends={} type={:?} cardinality={:?} json={}",
            ext.full_name(),
            ext.number(),
            ext.containing_message().full_name(),
            ext.kind(),
            ext.cardinality(),
            ext.json_name()
        ));
    }
    for m in file.messages() {
        dump_message(&m, &mut out);
    }
    for e in file.enums() {
        dump_enum(&e, &mut out);
    }
    for s in file.services() {
        out.insert(format!(
            "service {} options={}",
            s.full_name(),
            options(&s.options())
        ));
        for method in s.methods() {
            out.insert(format!(
                "method {} ({}{}) -> ({}{}) options={}",
                method.full_name(),
                if method.is_client_streaming() {
                    "stream "
                } else {
                    ""
                },
                method.input().full_name(),
                if method.is_server_streaming() {
                    "stream "
                } else {
                    ""
                },
                method.output().full_name(),
                options(&method.options())
            ));
        }
    }
    out
}

fn count(lines: &BTreeSet<String>, kind: &str) -> usize {
    let prefix = format!("{kind} ");
    lines.iter().filter(|l| l.starts_with(&prefix)).count()
}

fn run(reference: &Path) -> Result<bool, String> {
    let ours = DescriptorPool::decode(livedisk_csi_proto::FILE_DESCRIPTOR_SET)
        .map_err(|e| format!("decoding our descriptor set: {e}"))?;
    let ours = ours
        .get_file_by_name(FILE_NAME)
        .ok_or("our descriptor set has no csi.proto")?;

    let dir = reference
        .parent()
        .ok_or("reference path has no parent directory")?;
    let file_name = reference
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("reference path has no file name")?;
    let mut compiler = protox::Compiler::new([dir]).map_err(|e| format!("{e:?}"))?;
    compiler
        .open_file(file_name)
        .map_err(|e| format!("compiling {}: {e:?}", reference.display()))?;
    let theirs_pool = compiler.descriptor_pool();
    let theirs = theirs_pool
        .get_file_by_name(file_name)
        .ok_or("reference file missing from its own pool")?;

    let a = dump_file(&ours);
    let b = dump_file(&theirs);

    println!("reference: {}", reference.display());
    for kind in [
        "message",
        "field",
        "oneof",
        "enum",
        "enum-value",
        "service",
        "method",
        "extension",
    ] {
        println!(
            "  {kind:<11} ours {:>4}  reference {:>4}",
            count(&a, kind),
            count(&b, kind)
        );
    }
    let ours_file_opts = options(&ours.options());
    let theirs_file_opts = options(&theirs.options());
    if ours_file_opts != theirs_file_opts {
        println!(
            "  (file options differ, not compared: ours {ours_file_opts}, reference {theirs_file_opts})"
        );
    }

    let only_ours: Vec<&String> = a.difference(&b).collect();
    let only_theirs: Vec<&String> = b.difference(&a).collect();
    for line in &only_theirs {
        println!("- reference only: {line}");
    }
    for line in &only_ours {
        println!("+ ours only:      {line}");
    }
    Ok(only_ours.is_empty() && only_theirs.is_empty())
}

fn main() -> ExitCode {
    let Some(reference) = std::env::args_os().nth(1) else {
        eprintln!("usage: compare_with_spec PATH/TO/csi.proto");
        return ExitCode::from(2);
    };
    match run(Path::new(&reference)) {
        Ok(true) => {
            println!("MATCH: no differences");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("MISMATCH: see the lines above");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
