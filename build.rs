//! Sets `LLMQ_COMMIT` for `llmq --version`: the `LLMQ_COMMIT` variable when the build is given
//! one (the Dockerfile's build argument, since the image's build context has no `.git`), else
//! the checkout's commit from `git`, else `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LLMQ_COMMIT");
    // A new commit moves HEAD or the branch it names.
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        println!("cargo:rerun-if-changed={path}");
    }
    let commit = std::env::var("LLMQ_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=LLMQ_COMMIT={}", commit.trim());
}

/// `git rev-parse --short=12 HEAD`, when git and a checkout are there.
fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
}
