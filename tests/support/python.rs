//! Python virtualenvs for tests that drive real Python tools (Helm's engine, Alembic and
//! Flask-Migrate...), made once under `target/` from a pinned requirements file and made
//! again when the pins change. Creation is serialised with a lock file, so test processes
//! running in parallel never build the same one twice.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(c: &mut Command) {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `bin/` directory of a virtualenv `target/<name>` with `requirements` installed.
pub fn venv(name: &str, requirements: &Path) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&root).expect("target dir");
    let env = root.join(name);
    let lock = std::fs::File::create(root.join(format!("{name}.lock"))).expect("lock file");
    lock.lock().expect("lock the virtualenv");
    let wanted = std::fs::read_to_string(requirements).expect("requirements file");
    let stamp = env.join("requirements.installed");
    let bin = env.join("bin");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str())
        && bin.join("python").exists()
    {
        return bin;
    }
    let _ = std::fs::remove_dir_all(&env);
    run(Command::new("python3").arg("-m").arg("venv").arg(&env));
    run(Command::new(bin.join("python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--only-binary",
            ":all:",
            "-r",
        ])
        .arg(requirements));
    std::fs::write(&stamp, wanted).expect("stamp");
    bin
}
