//! The committed generated code must be exactly what `capnpc` makes of the schemas today.
//!
//! Regenerates every schema listed in `duplex_schemas::SCHEMAS` into a temporary directory with
//! `capnpc::CompilerCommand` and compares it byte for byte with `src/generated/`.
//!
//! * `DUPLEX_REGENERATE_SCHEMAS=1 cargo test -p duplex-schemas --test fresh` rewrites the
//!   committed files instead of comparing.
//! * Without the `capnp` compiler on `PATH` the test fails when `CI` is set (`scripts/setup`
//!   installs it there) and is skipped, loudly, otherwise.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const REGENERATE_VAR: &str = "DUPLEX_REGENERATE_SCHEMAS";

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Whether a usable `capnp` compiler is on `PATH`.
fn capnp_available() -> bool {
    Command::new("capnp")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles `schema` (relative to the crate directory) into `out_dir`.
fn generate(schema: &str, out_dir: &Path) {
    let dir = crate_dir();
    let result = capnpc::CompilerCommand::new()
        // Paths in the generated code (its `// source:` line) are relative to the crate
        // directory, whatever the checkout's location.
        .src_prefix(&dir)
        .no_standard_import()
        .file(dir.join(schema))
        .output_path(out_dir)
        .run();
    if let Err(err) = result {
        panic!("capnpc failed to compile {schema}: {err}");
    }
}

/// The generated code with its `// capnp binary version: X` header line removed: a compiler of
/// another version that produces the same code is not a reason to fail. (Any real difference in
/// its output still is.)
fn without_compiler_version(code: &[u8]) -> Vec<&[u8]> {
    code.split(|&b| b == b'\n')
        .filter(|line| !line.starts_with(b"// capnp binary version:"))
        .collect()
}

#[test]
fn committed_generated_code_is_fresh() {
    if !capnp_available() {
        if env_flag("CI") {
            panic!(
                "the Cap'n Proto compiler `capnp` is not on PATH, and CI is set: \
                 scripts/setup must install it (Debian package `capnproto`)"
            );
        }
        // Written to the process's stderr directly, not with eprintln!, so that the test
        // harness's output capture does not swallow it.
        let _ = writeln!(
            std::io::stderr(),
            "\n\
             **************************************************************************\n\
             * SKIPPED committed_generated_code_is_fresh: `capnp` is not on PATH.     *\n\
             * The committed generated code was NOT checked against the schemas.      *\n\
             * Install it (apt-get install capnproto) to run this check.              *\n\
             **************************************************************************"
        );
        return;
    }

    let regenerate = env_flag(REGENERATE_VAR);
    let tmp = match tempfile::tempdir() {
        Ok(tmp) => tmp,
        Err(err) => panic!("cannot create a temporary directory: {err}"),
    };
    let generated_dir = crate_dir().join("src").join("generated");
    let mut stale = Vec::new();

    for (schema, generated) in duplex_schemas::SCHEMAS {
        generate(schema, tmp.path());
        let fresh_path = tmp.path().join(generated);
        let fresh = std::fs::read(&fresh_path)
            .unwrap_or_else(|err| panic!("capnpc did not write {}: {err}", fresh_path.display()));
        let committed_path = generated_dir.join(generated);
        if regenerate {
            if let Err(err) = std::fs::write(&committed_path, &fresh) {
                panic!("cannot write {}: {err}", committed_path.display());
            }
            eprintln!("regenerated {} from {schema}", committed_path.display());
            continue;
        }
        match std::fs::read(&committed_path) {
            Ok(committed)
                if without_compiler_version(&committed) == without_compiler_version(&fresh) => {}
            Ok(_) => stale.push(format!(
                "{} differs from what {schema} compiles to",
                generated
            )),
            Err(err) => stale.push(format!(
                "{} cannot be read: {err}",
                committed_path.display()
            )),
        }
    }

    assert!(
        stale.is_empty(),
        "committed generated schema code is stale:\n  {}\n\
         Regenerate it with `{REGENERATE_VAR}=1 cargo test -p duplex-schemas --test fresh` \
         and commit src/generated/.",
        stale.join("\n  ")
    );
}
