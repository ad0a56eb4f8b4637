//! Starting a child `llmq` process (a benchmark worker, a test's worker or CLI call) with
//! exactly a given configuration: the whole of it in a private file passed with `--config`,
//! and nothing inherited from this process's environment that could change it.

use std::{ffi::OsStr, io::Write, path::Path, process::Command};

use super::{Config, ENV_PREFIX};

/// Variables the configuration is read from besides the file: `LLMQ_*` overrides keys,
/// `OPENAI_API_KEY` fills in an empty `llm.api_key`, `RUST_LOG` overrides `log.level`.
fn is_config_variable(name: &OsStr) -> bool {
    let name = name.as_encoded_bytes();
    name.starts_with(ENV_PREFIX.as_bytes()) || name == b"OPENAI_API_KEY" || name == b"RUST_LOG"
}

/// A command for `program` without this process's configuration variables (`LLMQ_*`,
/// `OPENAI_API_KEY`, `RUST_LOG`), so that the child reads only what it is given; the rest of
/// the environment is inherited.
pub fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if is_config_variable(&name) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// `program --config <file>` with `config` in whole in `file`, from a [`clean_command`]; the
/// caller adds the subcommand and anything else (`--config` is a global flag, so it may come
/// first). Variables the caller sets afterwards (say `LLMQ_LOG__LEVEL`) still override the
/// file, as they would for any `llmq` process.
///
/// The file holds the secrets in clear: it is created private (mode 0600) in the temporary
/// directory, and removed when the returned [`ChildConfigFile`] is dropped, so keep that until
/// the child has started and read it. A tokio command is `tokio::process::Command::from` the
/// returned one.
pub fn child_command(
    program: &Path,
    config: &Config,
) -> Result<(Command, ChildConfigFile), ChildConfigError> {
    let text = config.to_toml()?;
    let mut file = tempfile::Builder::new()
        .prefix("llmq-config-")
        .suffix(".toml")
        .tempfile()?;
    file.write_all(text.as_bytes())?;
    let mut cmd = clean_command(program);
    cmd.arg("--config").arg(file.path());
    Ok((cmd, ChildConfigFile(file)))
}

/// The file a child `llmq` process reads its configuration from; removed on drop.
#[derive(Debug)]
pub struct ChildConfigFile(tempfile::NamedTempFile);

impl ChildConfigFile {
    /// Where the file is.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// Why a child's configuration file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ChildConfigError {
    /// A value TOML cannot hold (an integer above `i64::MAX`).
    #[error("cannot write the configuration as TOML: {0}")]
    Serialize(#[from] toml::ser::Error),
    /// The temporary file could not be created or written.
    #[error("cannot write the child's configuration file: {0}")]
    Write(#[from] std::io::Error),
}

#[cfg(test)]
// figment's Jail API fixes the closure's error type.
#[allow(clippy::result_large_err)]
mod tests {
    use std::{ffi::OsString, os::unix::fs::PermissionsExt};

    use figment::Jail;

    use super::*;

    /// The variables `cmd` removes from its inherited environment.
    fn removed(cmd: &Command) -> Vec<OsString> {
        cmd.get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| name.to_os_string())
            .collect()
    }

    #[test]
    fn a_clean_command_inherits_no_configuration() {
        Jail::expect_with(|jail| {
            jail.set_env("LLMQ_WORKER__PREFETCH", "3");
            jail.set_env("LLMQ_HOME", "/x");
            jail.set_env("OPENAI_API_KEY", "sk-x");
            jail.set_env("RUST_LOG", "trace");
            jail.set_env("LLMQTEST_UNRELATED", "kept");
            let gone = removed(&clean_command(Path::new("llmq")));
            for name in [
                "LLMQ_WORKER__PREFETCH",
                "LLMQ_HOME",
                "OPENAI_API_KEY",
                "RUST_LOG",
            ] {
                assert!(gone.iter().any(|g| g == name), "{name} inherited: {gone:?}");
            }
            assert!(!gone.iter().any(|g| g == "LLMQTEST_UNRELATED"));
            Ok(())
        });
    }

    #[test]
    fn a_child_gets_the_whole_configuration_in_a_private_file() {
        let mut config = Config::default();
        config.idempotency.ttl_secs = 42;
        config.llm.api_key = crate::config::Secret::new("sk-child");
        let (cmd, file) = child_command(Path::new("llmq"), &config).expect("written");
        let args: Vec<&OsStr> = cmd.get_args().collect();
        assert_eq!(args, [OsStr::new("--config"), file.path().as_os_str()]);
        let mode = std::fs::metadata(file.path())
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "only the owner may read the secrets");
        let text = std::fs::read_to_string(file.path()).expect("readable");
        assert_eq!(text, config.to_toml().expect("serializes"));
        let path = file.path().to_path_buf();
        drop(file);
        assert!(!path.exists(), "removed on drop");
    }
}
